"""The gate's rules on synthetic per-item evidence: floors, paired non-inferiority per task with Holm, the paired
BCa bootstrap improvement rule with its minimum effect and its floor on evidence (gate.min_items), the adapter
check, and the report naming the deciding rule with n, estimate, interval and method."""
from __future__ import annotations

import json

import pytest

import numpy as np

from eval.gate import GateError, decide, improvement_result, no_regression_results, paired_interval, paired_scores, write_decision
from workspace.config import GateConfig, GateRule, load_config


def items(path, custom: dict[str, float], kobest_acc: dict[str, float]):
    with open(path, "w", encoding="utf-8") as fh:
        for i, v in custom.items():
            fh.write(json.dumps({"suite": "custom", "task": "screens", "id": i, "scores": {"field_f1": v, "char_ngram_f1": v, "xml_valid": 1.0}}) + "\n")
        for i, v in kobest_acc.items():
            fh.write(json.dumps({"suite": "kobest", "task": "kobest_boolq", "id": i, "acc": v}) + "\n")
    return path


def metrics(f1, acc, xml=1.0):
    return {"eval/custom/screens/field_f1": f1, "eval/custom/screens/char_ngram_f1": f1, "eval/custom/screens/xml_valid": xml,
            "eval/kobest/boolq/acc": acc}


def setup(tmp_path, cand_f1, ref_f1, cand_acc=None, ref_acc=None):
    ids = [f"t:{i}" for i in range(len(cand_f1))]
    cand_acc = cand_acc or [1, 1, 0, 0] * 10
    ref_acc = ref_acc or list(cand_acc)
    k = [f"kobest_boolq:{i}" for i in range(len(cand_acc))]
    c = items(tmp_path / "c.jsonl", dict(zip(ids, cand_f1)), dict(zip(k, cand_acc)))
    r = items(tmp_path / "r.jsonl", dict(zip(ids, ref_f1)), dict(zip(k, ref_acc)))
    cm = metrics(sum(cand_f1) / len(cand_f1), sum(cand_acc) / len(cand_acc))
    rm = metrics(sum(ref_f1) / len(ref_f1), sum(ref_acc) / len(ref_acc))
    return cm, rm, c, r


VERIFIED = {"outputs_differ": 5, "prompts": 5}


def test_default_rules_pass_a_real_improvement(tmp_path):
    cfg = load_config().config.gate
    rng = np.random.default_rng(0)
    cand = list(np.clip(0.6 + rng.normal(0, 0.1, 100), 0, 1))
    ref = list(np.clip(0.1 + rng.normal(0, 0.1, 100), 0, 1))
    cm, rm, c, r = setup(tmp_path, cand, ref)
    d = decide(cfg, cm, rm, c, r, VERIFIED, "base")
    assert d.passed and d.decided_by == "all rules passed"
    js, md = write_decision(d, tmp_path / "gate")
    assert json.loads(js.read_text())["passed"] is True
    text = md.read_text()
    assert "| char-ngram-f1-improves | improvement |" in text and "paired bootstrap BCa" in text and "Holm" in text
    imp = next(x for x in d.rules if x.kind == "improvement")
    assert imp.n == 100 and imp.ci_low < imp.estimate < imp.ci_high and imp.value == imp.ci_low


def test_noise_does_not_promote(tmp_path):
    cfg = load_config().config.gate
    cand = [1.0, 0.0] * 20           # mean 0.5
    ref = [0.0, 1.0] * 18 + [0.0] * 4  # mean 0.45: a small gain that is noise
    cm, rm, c, r = setup(tmp_path, cand, ref)
    d = decide(cfg, cm, rm, c, r, VERIFIED, "champion v3")
    assert not d.passed and d.decided_by.startswith("rule 'char-ngram-f1-improves'")
    rule = next(x for x in d.rules if x.kind == "improvement")
    assert rule.value <= 0 and "CI [" in rule.detail and rule.n == 40


def test_three_improving_items_are_too_few_to_decide(tmp_path):
    cfg = load_config().config.gate
    cm, rm, c, r = setup(tmp_path, [0.9, 0.8, 0.95], [0.1, 0.2, 0.1])
    d = decide(cfg, cm, rm, c, r, VERIFIED, "base")
    rule = next(x for x in d.rules if x.kind == "improvement")
    assert not d.passed and not rule.passed and rule.n == 3
    assert f"too few paired items: 3 < gate.min_items {cfg.min_items}" in rule.detail
    # the same three items are promoted by an interval alone: the floor on evidence is what refuses them
    assert paired_interval(np.array([0.9, 0.8, 0.95]), np.array([0.1, 0.2, 0.1]), 0.95, 2000).low > 0


def test_a_planted_one_task_regression_is_caught_and_holm_is_said(tmp_path):
    rule = GateRule(name="kobest-no-regression", kind="no_regression", metric="eval/kobest/*/acc", tolerance=0.1)
    cfg = GateConfig(rules=[rule], min_items=30, floors_only=True)
    rng = np.random.default_rng(1)
    pairs = {}
    for task in ("boolq", "copa", "wic", "hellaswag", "sentineg"):
        ref = (rng.random(200) < 0.6).astype(float)
        cand = ref.copy()
        flip = rng.choice(200, 6, replace=False)  # the adapter changes a few answers either way
        cand[flip] = 1 - cand[flip]
        pairs[f"eval/kobest/{task}/acc"] = (cand, ref)
    cand, ref = pairs["eval/kobest/copa/acc"]
    right = np.flatnonzero(ref == 1)[:60]  # copa: 60 right answers turned wrong, a 0.30 drop
    cand = cand.copy()
    cand[right] = 0
    pairs["eval/kobest/copa/acc"] = (cand, ref)
    rows = no_regression_results(rule, sorted(pairs), pairs, cfg)
    failed = [x.metric for x in rows if not x.passed]
    assert failed == ["eval/kobest/copa/acc"]
    assert all(x.n == 200 and "Holm" in x.method for x in rows)
    copa = next(x for x in rows if x.metric == "eval/kobest/copa/acc")
    assert copa.estimate < -0.2 and "regression not ruled out" in copa.detail
    # with as few items as the cpu_smoke profile evaluates, the rule refuses to decide instead of guessing
    few = {k: (c[:8], r[:8]) for k, (c, r) in pairs.items()}
    assert all(not x.passed and "too few paired items" in x.detail for x in no_regression_results(rule, sorted(few), few, cfg))


def test_floor_regression_and_adapter_failures(tmp_path):
    cfg = load_config().config.gate
    cm, rm, c, r = setup(tmp_path, [0.9] * 40, [0.1] * 40, cand_acc=[0] * 40, ref_acc=[1, 1, 1, 0] * 10)
    cm["eval/custom/screens/xml_valid"] = 0.5
    d = decide(cfg, cm, rm, c, r, {"outputs_differ": 0, "prompts": 5}, "base")
    failed = {x.name for x in d.rules if not x.passed}
    assert failed == {"xml-valid-floor", "kobest-no-regression", "adapter-changes-outputs"}
    assert d.decided_by.startswith("rule 'xml-valid-floor'")
    reg = next(x for x in d.rules if x.name == "kobest-no-regression")
    assert reg.estimate == pytest.approx(-0.75) and reg.n == 40
    assert "**FAIL**" in d.markdown()


def test_unpaired_items_and_unknown_metrics_are_refused(tmp_path):
    with pytest.raises(GateError, match="not evaluated on the same items"):
        paired_scores({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0})
    cfg = GateConfig(rules=[GateRule(name="x", kind="floor", metric="eval/custom/screens/nope", threshold=0.5)], floors_only=True)
    cm, rm, c, r = setup(tmp_path, [0.5] * 4, [0.5] * 4)
    with pytest.raises(GateError, match="matches no evaluated metric"):
        decide(cfg, cm, rm, c, r, {}, "base")


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    cand = np.array([float(i % 3 == 0) for i in range(60)])
    ref = np.array([float(i % 4 == 0) for i in range(60)])
    a = paired_interval(cand, ref, 0.95, 2000)
    assert a == paired_interval(cand, ref, 0.95, 2000)
    assert a.low < a.estimate < a.high and a.n == 60 and "BCa" in a.method
    same = paired_interval(ref, ref, 0.95, 2000)  # every difference 0: BCa is undefined, the interval is the point
    assert same.low == same.high == 0.0


def test_min_effect_raises_the_bar():
    rule = GateRule(name="imp", kind="improvement", metric="m", min_effect=0.05)
    cfg = GateConfig(rules=[rule], floors_only=True)
    rng = np.random.default_rng(2)
    ref = rng.random(100)
    small = improvement_result(rule, "m", ref + 0.04 + rng.normal(0, 0.01, 100), ref, cfg)
    large = improvement_result(rule, "m", ref + 0.10 + rng.normal(0, 0.01, 100), ref, cfg)
    assert small.ci_low > 0 and not small.passed and "minimum effect +0.0500" in small.detail
    assert large.passed


def test_the_simulation_measures_false_promotion_and_power():
    """benchmarks/gate.simulate on differences like the real ones (most items tie, some move either way): no
    promotion without an effect, nearly always with a large one, and min_effect trades power for safety."""
    from benchmarks.gate import simulate

    loaded = load_config()
    rule = next(r for r in loaded.config.gate.rules if r.kind == "improvement")
    rng = np.random.default_rng(3)
    pools = [np.where(rng.random(100) < 0.3, rng.normal(0, 0.3, 100), 0.0) for _ in range(3)]
    sim = simulate(loaded, rule, pools, [100], [0.0, 0.2], trials=60, min_effects=[0.0, 0.1])
    assert sim[(0.0, 100, 0.0)] <= 0.1 and sim[(0.0, 100, 0.2)] >= 0.9
    assert sim[(0.1, 100, 0.0)] <= sim[(0.0, 100, 0.0)] and sim[(0.1, 100, 0.2)] <= sim[(0.0, 100, 0.2)]


# ------------------------------------------------------------------------ the gate cannot be configured away
def test_a_gate_without_a_statistical_rule_on_the_target_is_refused_at_load():
    from workspace.config import ConfigError

    with pytest.raises(ConfigError, match=r"gate\.rules is empty"):
        load_config(overrides=["gate.rules=[]"])
    with pytest.raises(ConfigError, match=r"gate\.rules is empty"):  # floors_only does not make zero rules a gate
        load_config(overrides=["gate.rules=[]", "gate.floors_only=true"])
    floors = "gate.rules=[{name: f, kind: floor, metric: eval/custom/screens/xml_valid, threshold: 0.8}]"
    with pytest.raises(ConfigError, match="no statistical rule on the target metric.*gate.floors_only: true"):
        load_config(overrides=[floors])
    other = ("gate.rules=[{name: i, kind: improvement, metric: eval/custom/screens/field_f1, min_effect: 0.05}]")
    with pytest.raises(ConfigError, match="no statistical rule on the target metric"):  # an improvement elsewhere
        load_config(overrides=[other])
    on = load_config(overrides=[floors, "gate.floors_only=true"]).config.gate
    assert on.mode == "floors_only"
    assert load_config().config.gate.mode == "full"
    smoke = load_config(profile="cpu_smoke").config
    assert smoke.gate.mode == "floors_only"
    assert smoke.tracking.registered_model != load_config().config.tracking.registered_model  # never the real champion


def test_a_floors_only_decision_says_so_everywhere(tmp_path):
    from eval.gate_stage import gate_table
    from rich.console import Console
    from serving.card import model_card

    cfg = GateConfig(rules=[GateRule(name="xml", kind="floor", metric="eval/custom/screens/xml_valid", threshold=0.8)],
                     floors_only=True)
    cm, rm, c, r = setup(tmp_path, [0.5] * 40, [0.5] * 40)
    d = decide(cfg, cm, rm, c, r, VERIFIED, "base")
    assert d.passed and d.mode == "floors_only" and d.to_json()["mode"] == "floors_only"
    assert "Floors only" in d.markdown()
    console = Console(record=True, width=200)
    console.print(gate_table(d))
    assert "FLOORS ONLY" in console.export_text()
    js, _ = write_decision(d, tmp_path / "gate")
    (tmp_path / "gate" / "manifest.json").write_text("{}")
    assert "Promoted on floors only" in model_card(tmp_path / "gate", registered_model="m")
    full = decide(load_config().config.gate, *setup(tmp_path, [0.9] * 40, [0.1] * 40), VERIFIED, "base")
    assert full.mode == "full" and "Floors only" not in full.markdown()


def test_decide_refuses_a_rule_set_with_no_rule(tmp_path):
    cfg = GateConfig.model_construct(rules=[], min_items=30, bootstrap_samples=200)  # past the config's own check
    cm, rm, c, r = setup(tmp_path, [0.5] * 40, [0.5] * 40)
    with pytest.raises(GateError, match="no rule would pass every candidate|gate.rules is empty"):
        decide(cfg, cm, rm, c, r, VERIFIED, "base")


def test_a_refusal_names_what_is_still_served(tmp_path):
    """The refusal says which version keeps serving: the champion, also when the candidate is the champion's own run
    gated again (its reference is then what it was compared with when promoted, or the base model)."""
    from eval.gate_stage import GateInputs, Reference, refusal_text

    loaded = load_config()
    cm, rm, c, r = setup(tmp_path, [1.0, 0.0] * 20, [0.0, 1.0] * 18 + [0.0] * 4)
    d = decide(loaded.config.gate, cm, rm, c, r, VERIFIED, "base")
    assert not d.passed

    def text(**kw) -> str:
        inputs = GateInputs(adapter_dir="a", run_key="k", verification=VERIFIED, test_file="t", sampling={},
                            out_root=str(tmp_path), engine={}, **kw)
        return refusal_text(d, tmp_path / "gate.md", tmp_path / "report.md", c, inputs, loaded)

    name = loaded.config.tracking.registered_model
    assert f"{name} has no champion yet" in text()
    assert f"{name}@champion is still v1 and keeps serving" in text(champion_version="1")  # reference: the base
    ref = Reference(version="2", run_key="r", artifact_uri=f"models:/{name}/2")
    assert f"{name}@champion is still v2 " in text(reference=ref)
    assert f"{name}@champion is still v3 " in text(reference=ref, champion_version="3")


def test_the_gate_decides_again_when_the_scoring_changes(tmp_path, monkeypatch):
    """The evaluations are keyed on the task files and the scorer code; so is the gate's cached decision (a fix to a
    metric re-scores the candidate, and the decision must follow, not stay cached on the old scores)."""
    import shutil

    import eval.evaluate as ev
    from eval.gate_stage import GATE, GateInputs

    loaded = load_config()
    inputs = GateInputs(adapter_dir="a", run_key="k", verification=VERIFIED, test_file="t", sampling={},
                        out_root=str(tmp_path), engine={})
    shutil.copytree(ev.CONFIGS / "tasks", tmp_path / "configs" / "tasks")
    monkeypatch.setattr(ev, "CONFIGS", tmp_path / "configs")  # (files are hashed in path order: compare copies only)
    before = GATE.cache_key(loaded, inputs)
    assert GATE.cache_key(loaded, inputs) == before  # the same files, the same key
    task = tmp_path / "configs" / "tasks" / "kobest_boolq.yaml"
    task.write_text(task.read_text(encoding="utf-8") + "\n# scored differently\n", encoding="utf-8")
    assert GATE.cache_key(loaded, inputs) != before
