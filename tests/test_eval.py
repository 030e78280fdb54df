"""Evaluation stage: KoBEST through lm-eval (hf in-process and vLLM-served, agreeing), the DeepEval custom metrics,
the judge (skipped with a reason when absent or down; real GEval through a served model), per-item evidence,
caching, the report, and clear errors on bad task files."""
from __future__ import annotations

import json
import shutil

import pytest

from eval.evaluate import EvalError, compare_report, evaluate
from workspace.model_ref import ModelRef
from eval.judge import JudgeUnavailable, check_judge
from eval.kobest import task_configs, validate_task_file
from eval.metrics import METRICS
from finetune.prepare import prepare_dataset
from workspace.config import JudgeConfig, load_config
from workspace.paths import DATA_RAW, resolve

BASE = str(resolve(load_config().config.base_model.path))
SMALL = ["eval.limit=8", "eval.custom_limit=4", "eval.max_new_tokens=64"]
SERVED = load_config(overrides=SMALL).config.serving.decoding.non_default()  # the served decoding the flows pass


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return prepare_dataset(load_config(overrides=[f"data.output_dir={tmp_path_factory.mktemp('processed')}"]))


def case(output, reference):
    from deepeval.test_case import LLMTestCase

    return LLMTestCase(input="요청", actual_output=output, expected_output=reference)


REF = '<Screen id="memberList" title="회원 목록">\n  <Grid id="grdMember">\n    <Column id="name" label="이름" type="text"/>\n    <Column id="email" label="이메일" type="email"/>\n  </Grid>\n</Screen>'


def test_custom_metrics_score_what_they_claim():
    scores = {n: m().measure(case(REF, REF)) for n, m in METRICS.items() if n != "json_schema_valid"}
    assert all(v == 1.0 for v in scores.values()), scores
    half = REF.replace('    <Column id="email" label="이메일" type="email"/>\n', '    <Column id="phone" label="전화번호" type="tel"/>\n')
    assert METRICS["xml_structure"]().measure(case(half, REF)) == 0.0
    assert METRICS["field_f1"]().measure(case(half, REF)) == pytest.approx(0.5)
    assert METRICS["xml_valid"]().measure(case("<Screen id='a'><Grid>", REF)) == 0.0
    assert METRICS["xml_valid"]().measure(case("설명입니다.\n" + REF, REF)) == 1.0  # chatter around the document
    assert 0 < METRICS["char_ngram_f1"]().measure(case("회원 목록 화면", REF)) < 0.5
    til = '{"date": "2026-11-23", "learned": ["peft"], "hours": 3}'
    assert METRICS["json_schema_valid"]().measure(case(til, til)) == 1.0
    assert METRICS["json_schema_valid"]().measure(case('{"date": 5, "learned": []}', til)) == pytest.approx(1 / 3)
    assert METRICS["json_schema_valid"]().measure(case("not json", til)) == 0.0
    m = METRICS["xml_valid"](threshold=0.8)
    m.measure(case("nope", REF))
    assert m.is_successful() is False and m.reason == "not well-formed XML"


def test_bad_task_files_are_named(tmp_path):
    bad = tmp_path / "boolq" / "test.jsonl"
    bad.parent.mkdir(parents=True)
    bad.write_text('{"paragraph": "p", "question": "q", "label": 1}\n{"paragraph": "p", "label": 0}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"kobest_boolq: .*test.jsonl:2: wrong schema \(missing \['question'\]"):
        validate_task_file("kobest_boolq", bad)
    bad.write_text('{"paragraph": "p", "question": "q", "label": 7}\n', encoding="utf-8")
    with pytest.raises(EvalError, match=r"test.jsonl:1: label 7 out of range 0..1"):
        validate_task_file("kobest_boolq", bad)
    bad.write_text("", encoding="utf-8")
    with pytest.raises(EvalError, match=r"kobest_boolq: .*test.jsonl is empty"):
        validate_task_file("kobest_boolq", bad)
    cfg = load_config(overrides=[f"eval.kobest_dir={tmp_path}"]).config.eval
    with pytest.raises(EvalError, match=r"kobest_boolq: .* is empty"):
        task_configs(cfg, hub_enabled=False)
    shutil.rmtree(tmp_path / "boolq")
    with pytest.raises(EvalError, match=r"kobest_boolq: data file .*boolq/test.jsonl not found"):
        task_configs(cfg, hub_enabled=False)


def test_user_kobest_files_work_by_pointing_the_config_at_them(tmp_path):
    for task in ("boolq", "copa", "wic", "hellaswag", "sentineg"):
        (tmp_path / task).mkdir()
        rows = (DATA_RAW / "kobest" / task / "test.jsonl").read_text(encoding="utf-8").splitlines()[:3]
        (tmp_path / task / "test.jsonl").write_text("\n".join(rows) + "\n", encoding="utf-8")
    cfgs = task_configs(load_config(overrides=[f"eval.kobest_dir={tmp_path}"]).config.eval, hub_enabled=False)
    assert [c["task"] for c in cfgs] == ["kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]
    assert all(c["dataset_path"] == "json" and str(tmp_path) in c["dataset_kwargs"]["data_files"]["test"] for c in cfgs)
    assert all("training_split" not in c for c in cfgs)  # no train.jsonl given: no few-shot split


def test_judge_absent_is_skipped_with_the_reason_and_down_is_an_error():
    judge, why = check_judge(None)
    assert judge is None and "no judge configured" in why
    with pytest.raises(JudgeUnavailable, match=r"judge endpoint http://127.0.0.1:9/v1 is not usable"):
        check_judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="x"))
    with pytest.raises(JudgeUnavailable, match="NO_SUCH_KEY_VAR_123 is not set"):
        check_judge(JudgeConfig(base_url="http://127.0.0.1:9/v1", model="x", api_key_env="NO_SUCH_KEY_VAR_123"))


def test_a_down_judge_stops_the_stage_and_keeps_partial_results(tmp_path, prepared):
    loaded = load_config(overrides=SMALL + ["eval.judge={base_url: 'http://127.0.0.1:9/v1', model: judge}"])
    with pytest.raises(EvalError, match=r"judge endpoint http://127.0.0.1:9/v1 is not usable.*kept in .*\.partial"):
        evaluate(loaded, ModelRef("base", BASE), test_file=prepared.path / "test.jsonl", out_root=tmp_path, sampling=SERVED,
                 backend="hf")
    partial = next(tmp_path.glob("base-*.partial"))
    kobest_rows = (partial / "items.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(kobest_rows) == 40 and len((partial / "custom_items.jsonl").read_text().splitlines()) == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("base-") and not p.name.endswith(".partial")]


def test_the_stage_asks_a_configured_judge_before_evaluating_anything(tmp_path, prepared, tmp_tracking):
    """The evaluate stage checks the judge first: a judge that is down stops it before any model is evaluated
    (the pipeline's failing-stage test had spent the base model's whole evaluation finding it down)."""
    from eval.evaluate_stage import EVALUATE, EvaluateInputs

    loaded = load_config(overrides=SMALL + tmp_tracking + ["eval.judge={base_url: 'http://127.0.0.1:9/v1', model: judge}"])
    inputs = EvaluateInputs(test_file=str(prepared.path / "test.jsonl"), adapter_dir=str(tmp_path / "adapter"),
                            sampling=SERVED, out_root=str(tmp_path / "evals"), engine={})
    with pytest.raises(EvalError, match=r"judge endpoint http://127.0.0.1:9/v1 is not usable.*Nothing was evaluated"):
        EVALUATE.run(loaded, inputs)
    assert not (tmp_path / "evals").exists()  # no model was evaluated, not even partly
    assert not (tmp_path / "mlflow.db").exists()  # and no MLflow run was opened


def test_evaluate_writes_per_item_evidence_metrics_and_is_cached(tmp_path, prepared):
    loaded = load_config(overrides=SMALL)
    model = ModelRef("base", BASE)
    res = evaluate(loaded, model, test_file=prepared.path / "test.jsonl", out_root=tmp_path, sampling=SERVED,
                   backend="hf")
    m = res.metrics
    for task in ("boolq", "copa", "wic", "hellaswag", "sentineg"):
        assert 0 <= m[f"eval/kobest/{task}/acc"] <= 1 and f"eval/kobest/{task}/f1_macro" in m
    assert "eval/kobest/hellaswag/acc_norm" in m
    for name in ("xml_valid", "xml_structure", "field_f1", "char_ngram_f1"):
        assert f"eval/custom/screens/{name}" in m
    assert m["eval/custom/screens/gen_tokens_per_s"] > 0
    assert "no judge configured" in res.info["judge"]
    rows = [json.loads(line) for line in res.items_path.read_text(encoding="utf-8").splitlines()]
    assert sum(r["suite"] == "kobest" for r in rows) == 5 * 8
    custom = [r for r in rows if r["suite"] == "custom"]
    assert len(custom) == 4 and all({"id", "prompt", "output", "reference", "scores"} <= set(r) for r in custom)
    again = evaluate(loaded, model, test_file=prepared.path / "test.jsonl", out_root=tmp_path, sampling=SERVED,
                     backend="hf")
    assert again.cached and again.metrics == res.metrics
    other = ModelRef("base2", BASE)
    md, png = compare_report([res, again.__class__(other, {k: v * 0.5 for k, v in m.items()}, res.items_path,
                                                   res.out_dir, False, res.info)], tmp_path / "report")
    text = md.read_text()
    assert "| eval/kobest/boolq/acc |" in text and "delta" in text and png.exists()


def test_the_same_evaluation_twice_from_scratch_gives_identical_numbers(tmp_path, prepared, random_adapter):
    """Reproducible evidence: base + adapter evaluated twice, nothing cached, gives the same generations, the same
    per-item scores and the same aggregates (speeds aside)."""
    loaded = load_config(overrides=SMALL)
    model = ModelRef("candidate", BASE, adapter=str(random_adapter))
    runs = [evaluate(loaded, model, test_file=prepared.path / "test.jsonl", out_root=tmp_path / f"run{i}",
                     sampling=SERVED, backend="hf")
            for i in (1, 2)]
    assert not runs[0].cached and not runs[1].cached
    first, second = (r.items_path.read_text(encoding="utf-8") for r in runs)
    assert first == second and first.count("\n") == 5 * 8 + 4
    scores = [{k: v for k, v in r.metrics.items() if "per_s" not in k} for r in runs]
    assert scores[0] == scores[1] and len(scores[0]) > 10


def test_missing_test_split_and_unknown_suite_are_errors(tmp_path):
    loaded = load_config(overrides=SMALL)
    with pytest.raises(EvalError, match="run `make prepare`"):
        evaluate(loaded, ModelRef("base", BASE), test_file=tmp_path / "nope.jsonl", out_root=tmp_path, sampling=SERVED)
    with pytest.raises(EvalError, match="unknown suite"):
        evaluate(loaded, ModelRef("base", BASE), suites=("mmlu",), out_root=tmp_path, sampling=SERVED)


def test_a_model_that_fails_to_load_is_named(tmp_path, prepared):
    loaded = load_config(overrides=SMALL)
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(EvalError, match=r"broken-model"):
        evaluate(loaded, ModelRef("broken", str(broken)), test_file=prepared.path / "test.jsonl", out_root=tmp_path,
                 sampling=SERVED, backend="hf")
    with pytest.raises(EvalError, match=r"generation with .*broken-model"):
        evaluate(loaded, ModelRef("broken", str(broken)), suites=("custom",), test_file=prepared.path / "test.jsonl",
                 out_root=tmp_path, sampling=SERVED, backend="hf")



def test_the_vllm_backend_starts_vllm_with_the_serving_settings_the_flow_passes(tmp_path, prepared):
    """The evaluation stage reads no serving section: the flow passes the serving settings (as_served's `engine`),
    which launch the very command the section itself would; without them (and without an endpoint) it says so."""
    from flows.segments import as_served
    from workspace.vllm_server import VllmServer

    loaded = load_config(overrides=SMALL + ["serving.dtype=float32", "serving.max_model_len=1024",
                                            "serving.decoding.frequency_penalty=0.2"])
    engine = as_served(loaded)["engine"]
    assert "gateway" not in engine
    assert VllmServer(BASE, engine, port=8123).argv() == VllmServer(BASE, loaded.config.serving, port=8123).argv()
    with pytest.raises(EvalError, match="pass engine="):
        evaluate(loaded, ModelRef("base", BASE), suites=("custom",), test_file=prepared.path / "test.jsonl",
                 out_root=tmp_path, sampling=SERVED, backend="vllm")
