"""What is evaluated is what will be served: lm-eval through the vLLM server (local-completions, echo+logprobs)
agrees with the in-process hf scorer on the same model, item by item; and the GEval judge works against a real
OpenAI-compatible endpoint (the served tiny model, structured outputs)."""
from __future__ import annotations

import pytest

from conftest import BASE_SERVER_KEY_ENV
from eval.evaluate import evaluate
from eval.judge import JudgeUnavailable, check_judge, judge_metric, score_with_judge
from eval.kobest import run_kobest
from workspace.config import JudgeConfig, load_config
from workspace.model_ref import ModelRef
from workspace.paths import resolve

pytestmark = pytest.mark.slow  # vLLM: conftest's base_server, on one worker with test_api_key.py (tests/lanes.py)

BASE = str(resolve(load_config().config.base_model.path))
# float32 serving (conftest's base_server) so that both scorers compute the same log-likelihoods (bf16 would flip
# near-ties)
OVR = ["eval.limit=10", "serving.dtype=float32", "serving.max_model_len=2048"]


@pytest.fixture(scope="module")
def server(base_server):
    return base_server


def test_hf_and_vllm_scoring_agree_item_by_item(server):
    cfg = load_config(overrides=OVR).config.eval
    hf = run_kobest(cfg, BASE, None, backend="hf")
    served = run_kobest(cfg, BASE, None, backend="vllm", endpoint=server.endpoint("base"))
    assert hf.n_items == served.n_items == 50
    by_id = {i["id"]: i for i in served.items}
    for item in hf.items:
        other = by_id[item["id"]]
        assert item["pred"] == other["pred"], (item["id"], item["loglikelihoods"], other["loglikelihoods"])
        for a, b in zip(item["loglikelihoods"], other["loglikelihoods"]):
            assert a == pytest.approx(b, abs=2e-2)
    for key, value in hf.metrics.items():
        assert served.metrics[key] == pytest.approx(value, abs=1e-9), key


def test_custom_suite_through_the_endpoint(server, tmp_path):
    from finetune.prepare import prepare_dataset

    loaded = load_config(overrides=OVR + ["eval.custom_limit=4", "eval.max_new_tokens=48", f"data.output_dir={tmp_path}"])
    prepared = prepare_dataset(loaded)
    res = evaluate(loaded, ModelRef("base", BASE), suites=("custom",), test_file=prepared.path / "test.jsonl",
                   backend="vllm", endpoint=server.endpoint("base"),
                   out_root=tmp_path / "evals", sampling=loaded.config.serving.decoding.non_default())
    assert res.info["custom_items"] == 4 and res.metrics["eval/custom/screens/gen_tokens_per_s"] > 0


def test_geval_judge_runs_against_a_served_model(server):
    cfg = JudgeConfig(base_url=server.base_url, model="base", rubric="The answer is a screen XML with the requested fields.",
                      max_tokens=600, api_key_env=BASE_SERVER_KEY_ENV)
    judge, why = check_judge(cfg)
    assert judge is not None, why
    from deepeval.test_case import LLMTestCase

    metric = judge_metric(judge, cfg)
    # the tiny model as judge: whether its JSON fits the schema is up to its wording, not to this code; a reply that
    # does not is the judge's named error (tests/test_judge.py pins that path on a fixed malformed reply)
    try:
        score, reason = score_with_judge(metric, LLMTestCase(input="회원 목록 화면", actual_output="<Screen id=\"a\"/>",
                                                             expected_output="<Screen id=\"memberList\"/>"))
        assert 0.0 <= score <= 1.0 and isinstance(reason, str)
    except JudgeUnavailable as exc:
        assert "returned no valid" in str(exc) and judge.last_finish_reason in ("stop", "length")


def test_the_served_decoding_default_is_what_the_evaluation_decodes_with(server, tmp_path):
    """serving.decoding (cpu_tiny: frequency_penalty 0.2) reaches vLLM as --override-generation-config, so a client that
    sets nothing gets it; the in-process scorer applies the same penalty with eval/generate.py's logits processor.
    Greedy generations agree token for token (float32 on both sides), and the penalty changes what is generated; the
    stop strings and the grammar, sent with each request, end and constrain the text alike in both engines."""
    from finetune.prepare import prepare_dataset
    from eval.generate import cut_at_stop, generate_hf, load_items

    loaded = load_config(overrides=OVR + [f"data.output_dir={tmp_path}"])
    sampling = loaded.config.serving.decoding.penalties()
    assert sampling == {"frequency_penalty": 0.2}
    items = load_items(prepare_dataset(loaded).path / "test.jsonl", 4)
    ep = server.endpoint("base")

    def served(**sampling):
        return [ep.chat(it["messages"], max_tokens=48, sampling=sampling)[0] for it in items]

    def in_process(**sampling):
        return generate_hf(BASE, None, items, 48, device="cpu", dtype="float32", sampling=sampling).outputs

    assert served() == in_process(**sampling)  # a request that sets nothing gets the configured default
    assert served(frequency_penalty=0.0) == in_process()
    # a strong penalty, set per request, changes the base model's text (0.2 may not, on 48 tokens), and both engines
    # change it the same way
    strong = served(frequency_penalty=1.0, presence_penalty=0.5)
    assert strong == in_process(frequency_penalty=1.0, presence_penalty=0.5)
    assert strong != served(frequency_penalty=0.0)
    # stop strings travel with each request (the gateway adds serving.decoding.stop, kept in the output): both engines
    # end the text at the same place. The stop: a piece from the middle of what the base model writes unstopped.
    plain = served(frequency_penalty=0.0)
    first = plain[0]
    stop = first[len(first) // 2: len(first) // 2 + 3]
    cut = served(frequency_penalty=0.0, stop=[stop], include_stop_str_in_output=True)
    assert cut == in_process(stop=[stop], include_stop_str_in_output=True)
    assert cut[0] == cut_at_stop(first, [stop]).strip() and len(cut[0]) < len(first)
    # the grammar (serving.decoding.grammar) travels as vLLM's structured outputs, and the in-process scorer masks
    # with xgrammar: both engines write the same constrained text. The screen branch alone here (the base model
    # writes prose, which the shipped grammar leaves free), so the grammar changes what the base model writes.
    text = loaded.config.serving.decoding.grammar_text
    forced = {"structured_outputs": {"grammar": text.replace("root ::= screen | prose", "root ::= screen")}}
    assert forced["structured_outputs"]["grammar"] != text
    constrained = served(frequency_penalty=0.0, **forced)
    assert constrained == in_process(**forced)
    assert all(t.startswith("<Screen") for t in constrained) and not any(t.startswith("<Screen") for t in plain)
