"""Every consumer of an OpenAI-compatible endpoint sends the API key the configuration names, through the one
endpoint client (workspace/endpoint.py), against a real vLLM started with that key (`serving.api_key_env`):
custom-metric generation, the LLM judge, lm-eval's local-completions, `make ask`, the load benchmark (whose
`run_step` is also the SLO check's request path, so the SLO check is not served a third time here) and the
pipeline's serve check. A wrong or missing key is an error naming the variable, not a traceback."""
from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

from conftest import BASE_SERVER_KEY, BASE_SERVER_KEY_ENV
from eval.evaluate import evaluate
from eval.judge import JudgeUnavailable, check_judge, judge_metric, score_with_judge
from eval.kobest import EvalError, run_kobest
from finetune.prepare import prepare_dataset
from serving.bench import build_prompts, run_step, workload_texts, write_dataset
from serving.serve import smoke_test
from workspace.config import JudgeConfig, load_config
from workspace.endpoint import Endpoint, EndpointError
from workspace.paths import ROOT, resolve
from workspace.vllm_server import VllmServer

pytestmark = pytest.mark.slow  # vLLM: conftest's base_server, on one worker with test_eval_vllm.py (tests/lanes.py)

KEY_ENV, KEY = BASE_SERVER_KEY_ENV, BASE_SERVER_KEY
BASE = str(resolve(load_config().config.base_model.path))
OVR = ["serving.dtype=float32", "serving.max_model_len=1024", f"serving.api_key_env={KEY_ENV}", "eval.limit=2",
       "eval.custom_limit=3", "eval.max_new_tokens=24", "eval.kobest_tasks=[kobest_boolq]"]


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, base_server):
    """The session's base server (behind the key in $LLMOPS_TEST_API_KEY) and this file's configuration."""
    tmp = tmp_path_factory.mktemp("keyed")
    mp = pytest.MonkeyPatch()
    mp.setenv(KEY_ENV, KEY)
    loaded = load_config(overrides=OVR + [f"data.output_dir={tmp / 'processed'}"])
    yield {"loaded": loaded, "server": base_server, "tmp": tmp, "mp": mp}
    mp.undo()


def test_the_server_refuses_a_request_without_the_key(keyed):
    """The API, and /metrics and /tokenize (which vLLM's own key check leaves open), need the key; /health does not."""
    url = keyed["server"].base_url
    root = url.removesuffix("/v1")
    good = {"Authorization": f"Bearer {KEY}"}
    assert httpx.get(f"{url}/models", timeout=10).status_code == 401
    assert httpx.get(f"{url}/models", headers=good, timeout=10).status_code == 200
    assert httpx.get(f"{root}/metrics", timeout=10).status_code == 401
    assert httpx.get(f"{root}/metrics", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
    metrics = httpx.get(f"{root}/metrics", headers=good, timeout=10)
    assert metrics.status_code == 200 and "vllm:" in metrics.text
    assert httpx.post(f"{root}/tokenize", json={"model": "base", "prompt": "a"}, timeout=10).status_code == 401
    assert httpx.get(f"{root}/health", timeout=10).status_code == 200


def test_the_serve_hint_names_the_key_variable(keyed):
    from serving.serve import usage

    text = usage(keyed["server"], {"version": "3", "served_model_name": "base", "lora_names": ["screen-xml"]})
    assert f"API key: the value of ${KEY_ENV} (serving.api_key_env)" in text
    assert f'api_key=os.environ["{KEY_ENV}"]' in text and '"EMPTY"' not in text and KEY not in text
    assert f'/metrics -H "Authorization: Bearer ${KEY_ENV}"' in text


def test_generation_for_the_custom_metrics_sends_the_key(keyed, tmp_path):
    loaded, server = keyed["loaded"], keyed["server"]
    prepared = prepare_dataset(loaded)
    res = evaluate(loaded, _base(), suites=("custom",), test_file=prepared.path / "test.jsonl", backend="vllm",
                   endpoint=server.endpoint("base"), out_root=tmp_path,
                   sampling=loaded.config.serving.decoding.non_default())
    assert res.info["custom_items"] == 3 and res.info["gen_tokens"] > 0


def test_lm_eval_local_completions_sends_the_key(keyed):
    cfg = keyed["loaded"].config.eval
    res = run_kobest(cfg, BASE, None, backend="vllm", endpoint=keyed["server"].endpoint("base"))
    assert res.n_items == 2 and "kobest_boolq/acc" in res.metrics


def test_the_judge_sends_the_key(keyed):
    """The subject is the key, not the tiny judge's wording: with the key the server answers every judge request
    (a refused key is a 401, named in test_a_wrong_key_is_named_not_a_traceback). Whether that answer is JSON the
    schema accepts depends on what the tiny model writes; when it is not, the error is the judge's clear one
    (tests/test_judge.py checks that path on a fixed malformed answer)."""
    cfg = JudgeConfig(base_url=keyed["server"].base_url, model="base", api_key_env=KEY_ENV, max_tokens=600)
    judge, why = check_judge(cfg)  # GET /v1/models with the key
    assert judge is not None and why == "used"
    from deepeval.test_case import LLMTestCase

    assert isinstance(judge.generate("Say OK."), str) and judge.last_finish_reason in ("stop", "length")
    try:
        score, _ = score_with_judge(judge_metric(judge, cfg), LLMTestCase(
            input="회원 목록 화면", actual_output="<Screen id=\"a\"/>", expected_output="<Screen id=\"memberList\"/>"))
        assert 0.0 <= score <= 1.0
    except JudgeUnavailable as exc:  # served (so the key was accepted), but not JSON the schema takes
        assert "returned no valid" in str(exc) and "eval.judge.max_tokens" in str(exc)


def test_make_ask_sends_the_key(keyed):
    proc = subprocess.run([sys.executable, "-m", "llmops", "rag", "--ask", "가온 지사는 어디에 있나요?", "--endpoint",
                           keyed["server"].base_url, "--model", "base", "--set", "rag.qdrant.location=memory",
                           *[a for o in OVR for a in ("--set", o)]],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-1500:]
    assert "sources: doc-" in proc.stdout


def test_the_load_benchmark_sends_the_key(keyed, tmp_path):
    server = keyed["server"]
    texts = workload_texts(resolve(keyed["loaded"].config.data.test_source.path), None)
    prompts, _ = build_prompts(BASE, texts[0], texts[1], 64, 3)
    step = run_step(server="vllm", endpoint=server.endpoint("base"), tokenizer=BASE,
                    dataset=write_dataset(tmp_path / "p.jsonl", prompts, 8), concurrency=2, prompt_tokens=64,
                    requests=3, output_tokens=8, out_dir=tmp_path, timeout=300,
                    metrics_url=f"http://{server.host}:{server.port}/metrics")
    assert step.completed == 3 and step.error_rate == 0 and step.server_side["requests"] == 3


def test_the_serve_check_sends_the_key(keyed, tmp_path, promote_random_adapter):
    loaded = load_config(overrides=OVR + [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
                                          f"tracking.artifact_root={tmp_path}/artifacts", "tracking.registered_model=keyed"])
    promote_random_adapter(loaded, tmp_path, "keyed", BASE)
    out = smoke_test(loaded, "회원 목록 화면을 생성해주세요. 필드: 이름", dest=tmp_path / "champion", max_tokens=8)
    assert out["version"] == "1" and out["completion_tokens"] > 0


# -------------------------------------------------------------------------------------- wrong or missing key
def test_a_wrong_key_is_named_not_a_traceback(keyed, tmp_path):
    server, mp = keyed["server"], keyed["mp"]
    mp.setenv(KEY_ENV, "sk-wrong")
    try:
        with pytest.raises(EndpointError, match=rf"refused the key in \${KEY_ENV} \(401 Unauthorized\): set {KEY_ENV}"):
            server.endpoint("base").models()
        with pytest.raises(EvalError, match=KEY_ENV):
            run_kobest(keyed["loaded"].config.eval, BASE, None, backend="vllm", endpoint=server.endpoint("base"))
        with pytest.raises(JudgeUnavailable, match=KEY_ENV):
            check_judge(JudgeConfig(base_url=server.base_url, model="base", api_key_env=KEY_ENV))
        prepared = prepare_dataset(keyed["loaded"])
        with pytest.raises(EvalError, match=KEY_ENV):
            evaluate(keyed["loaded"], _base(), suites=("custom",), test_file=prepared.path / "test.jsonl",
                     backend="vllm", endpoint=server.endpoint("base"), out_root=tmp_path,
                     sampling=keyed["loaded"].config.serving.decoding.non_default())
    finally:
        mp.setenv(KEY_ENV, KEY)


def test_a_missing_key_variable_is_named(monkeypatch):
    monkeypatch.delenv("LLMOPS_UNSET_KEY", raising=False)
    with pytest.raises(EndpointError, match="LLMOPS_UNSET_KEY.*is not set"):
        Endpoint("http://127.0.0.1:9/v1", "m", api_key_env="LLMOPS_UNSET_KEY").models()
    with pytest.raises(EndpointError, match="serving.api_key_env names LLMOPS_UNSET_KEY, which is not set"):
        cfg = load_config(overrides=["serving.api_key_env=LLMOPS_UNSET_KEY"]).config.serving
        VllmServer(BASE, cfg).start(timeout=5)


def _base():
    from workspace.model_ref import base_model

    return base_model(load_config())
