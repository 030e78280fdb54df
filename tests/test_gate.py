"""The gate's rules on synthetic per-item evidence: floors, no-regression with tolerance, the paired bootstrap
improvement rule (noise promotes nothing), the adapter check, and the report naming the deciding rule."""
from __future__ import annotations

import json

import pytest

from eval.gate import GateError, decide, paired_bootstrap_ci, write_decision
from workspace.config import GateConfig, GateRule, load_config


def items(path, custom: dict[str, float], kobest_acc: dict[str, float]):
    with open(path, "w", encoding="utf-8") as fh:
        for i, v in custom.items():
            fh.write(json.dumps({"suite": "custom", "task": "screens", "id": i, "scores": {"field_f1": v, "xml_valid": 1.0}}) + "\n")
        for i, v in kobest_acc.items():
            fh.write(json.dumps({"suite": "kobest", "task": "kobest_boolq", "id": i, "acc": v}) + "\n")
    return path


def metrics(f1, acc, xml=1.0):
    return {"eval/custom/screens/field_f1": f1, "eval/custom/screens/xml_valid": xml, "eval/kobest/boolq/acc": acc}


def setup(tmp_path, cand_f1, ref_f1, cand_acc=None, ref_acc=None):
    ids = [f"t:{i}" for i in range(len(cand_f1))]
    k = [f"kobest_boolq:{i}" for i in range(4)]
    cand_acc = cand_acc or [1, 1, 0, 0]
    ref_acc = ref_acc or [1, 1, 0, 0]
    c = items(tmp_path / "c.jsonl", dict(zip(ids, cand_f1)), dict(zip(k, cand_acc)))
    r = items(tmp_path / "r.jsonl", dict(zip(ids, ref_f1)), dict(zip(k, ref_acc)))
    cm = metrics(sum(cand_f1) / len(cand_f1), sum(cand_acc) / 4)
    rm = metrics(sum(ref_f1) / len(ref_f1), sum(ref_acc) / 4)
    return cm, rm, c, r


def test_default_rules_pass_a_real_improvement(tmp_path):
    cfg = load_config().config.gate
    cm, rm, c, r = setup(tmp_path, [0.8] * 30, [0.1] * 30)
    d = decide(cfg, cm, rm, c, r, {"outputs_differ": 5, "prompts": 5}, "base")
    assert d.passed and d.decided_by == "all rules passed"
    js, md = write_decision(d, tmp_path / "gate")
    assert json.loads(js.read_text())["passed"] is True and "| field-f1-improves | improvement |" in md.read_text()


def test_noise_does_not_promote(tmp_path):
    cfg = load_config().config.gate
    cand = [1.0, 0.0] * 10          # mean 0.5
    ref = [0.0, 1.0] * 9 + [0.0, 0.0]  # mean 0.45: a small gain that is noise
    cm, rm, c, r = setup(tmp_path, cand, ref)
    d = decide(cfg, cm, rm, c, r, {"outputs_differ": 5, "prompts": 5}, "champion v3")
    assert not d.passed and d.decided_by.startswith("rule 'field-f1-improves'")
    rule = next(x for x in d.rules if x.kind == "improvement")
    assert rule.value <= 0 and "CI [" in rule.detail


def test_floor_regression_and_adapter_failures(tmp_path):
    cfg = load_config().config.gate
    cm, rm, c, r = setup(tmp_path, [0.9] * 20, [0.1] * 20, cand_acc=[0, 0, 0, 0], ref_acc=[1, 1, 1, 0])
    cm["eval/custom/screens/xml_valid"] = 0.5
    d = decide(cfg, cm, rm, c, r, {"outputs_differ": 0, "prompts": 5}, "base")
    failed = {x.name for x in d.rules if not x.passed}
    assert failed == {"xml-valid-floor", "kobest-no-regression", "adapter-changes-outputs"}
    assert d.decided_by.startswith("rule 'xml-valid-floor'")
    reg = next(x for x in d.rules if x.name == "kobest-no-regression")
    assert reg.value == 0.0 and reg.threshold == pytest.approx(0.75 - 0.05)
    assert "**FAIL**" in d.markdown()


def test_unpaired_items_and_unknown_metrics_are_refused(tmp_path):
    with pytest.raises(GateError, match="not evaluated on the same items"):
        paired_bootstrap_ci({"a": 1.0, "b": 0.0}, {"a": 1.0, "c": 0.0}, 0.95, 100)
    cfg = GateConfig(rules=[GateRule(name="x", kind="floor", metric="eval/custom/screens/nope", threshold=0.5)])
    cm, rm, c, r = setup(tmp_path, [0.5] * 4, [0.5] * 4)
    with pytest.raises(GateError, match="matches no evaluated metric"):
        decide(cfg, cm, rm, c, r, {}, "base")


def test_bootstrap_is_deterministic_and_brackets_the_mean():
    cand = {str(i): float(i % 3 == 0) for i in range(60)}
    ref = {str(i): float(i % 4 == 0) for i in range(60)}
    a = paired_bootstrap_ci(cand, ref, 0.95, 2000)
    assert a == paired_bootstrap_ci(cand, ref, 0.95, 2000)
    mean, lo, hi, n = a
    assert lo < mean < hi and n == 60
