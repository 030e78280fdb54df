"""Serving configuration: every shipped profile renders a `vllm serve --config` file that vLLM's own parser
accepts (in the serve env), and the fit check gives the expected verdicts with its arithmetic shown."""
from __future__ import annotations

import pytest

from serving.config import FitError, ModelSpec, fit_report, model_spec, render_vllm_config, validate_with_vllm, write_vllm_config
from workspace.config import ConfigError, ServingConfig, load_config
from workspace.paths import PROFILES, resolve

PROFILE_NAMES = sorted(p.stem for p in PROFILES.glob("*.yaml"))
QWEN32B = ModelSpec(32.8, 64, 8, 128)


def model_of(cfg):
    return cfg.base_model.hub_id if cfg.base_model.source == "hub" else str(resolve(cfg.base_model.path))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = {}
    for profile in PROFILE_NAMES:
        cfg = load_config(profile=profile).config
        d = tmp_path_factory.mktemp(profile)
        conf = render_vllm_config(cfg.serving, model_of(cfg), lora_modules={"candidate": str(d)},
                                  max_lora_rank=cfg.finetune.lora_rank)
        out[profile] = (cfg, conf, write_vllm_config(conf, d / "serving.yaml", cfg.serving.api_key_env))
    validate_with_vllm(*(p for _, _, p in out.values()))  # one serve-env start parses them all; raises on any
    return out


@pytest.mark.slow
@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_every_profile_renders_passes_vllms_parser_and_fits(profile, rendered):
    cfg, conf, path = rendered[profile]
    assert conf["max-lora-rank"] >= cfg.finetune.lora_rank and conf["enable-lora"] is True
    assert conf["tensor-parallel-size"] == cfg.serving.tensor_parallel_size
    assert "api-key" not in path.read_text()  # the key comes from the environment, never from a file
    report = fit_report(model_spec(model_of(cfg)), cfg.serving)
    assert report.fits, report.text()


@pytest.mark.slow
def test_vllms_parser_rejects_a_bad_config(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: x\nmax-model-len: not-a-number\n")
    with pytest.raises(FitError, match="rejected by vLLM's argument parser"):
        validate_with_vllm(path)


def test_a_missing_serve_env_is_named_not_called_a_refusal(tmp_path, monkeypatch):
    """On a machine without the serve env (the lent GPU machine: vLLM cannot travel) the check says what is missing;
    it used to say "rejected by vLLM's argument parser: " with an empty reason."""
    import workspace.envrunner as envrunner

    path = tmp_path / "ok.yaml"
    path.write_text("model: x\n")
    monkeypatch.setitem(envrunner.VENVS, "serve", tmp_path / "no-such-venv")
    with pytest.raises(FitError, match=r"could not be checked by vLLM's argument parser: .*no-such-venv/bin/python not "
                                       r"found: the serve environment is missing.*make setup") as err:
        validate_with_vllm(path)
    assert "rejected" not in str(err.value)


def gpu(**kw) -> ServingConfig:
    base = dict(engine="vllm", gpus=1, gpu_memory_gib=24, gpu_memory_utilization=0.92, dtype="float16",
                max_model_len=4096, max_num_seqs=4)
    base.update(kw)
    return ServingConfig(**base)


def test_32b_fp16_does_not_fit_one_24gb_gpu_and_the_arithmetic_says_why():
    r = fit_report(QWEN32B, gpu())
    # weights: 32.8e9 x 2 B = 61.09 GiB alone exceed 24 x 0.92 = 22.08 GiB
    assert not r.fits and r.weights_gib == pytest.approx(32.8e9 * 2 / 1024**3)
    assert r.budget_per_gpu_gib == pytest.approx(22.08)
    assert "weights = 32.8B params x 2.0 B (float16) = 61.09 GiB" in r.arithmetic[0]
    assert "quantised weights" in r.suggestion


def test_32b_awq_with_shorter_context_fits_one_24gb_gpu():
    r = fit_report(QWEN32B, gpu(quantization="awq", max_model_len=4096, max_num_seqs=4))
    # 32.8e9 x 0.5 B = 15.27 GiB; KV/token = 2 x 64 x 8 x 128 x 2 B = 262,144 B; x 4096 x 4 = 4.00 GiB;
    # (15.27 + 4.00) / 1 + 1.5 = 20.77 GiB <= 22.08 GiB
    assert r.fits and r.kv_gib == pytest.approx(4.0) and r.need_per_gpu_gib == pytest.approx(20.77, abs=0.01)
    long_ctx = fit_report(QWEN32B, gpu(quantization="awq", max_model_len=32768, max_num_seqs=4))
    assert not long_ctx.fits and "kv_cache_dtype: fp8" in long_ctx.suggestion
    fp8 = fit_report(QWEN32B, gpu(quantization="awq", max_model_len=8192, max_num_seqs=4, kv_cache_dtype="fp8"))
    assert fp8.kv_gib == pytest.approx(4.0) and fp8.fits


def test_tensor_parallelism_splits_the_load_and_needs_the_gpus():
    two = fit_report(QWEN32B, gpu(gpus=2, tensor_parallel_size=2, gpu_memory_gib=80, dtype="bfloat16"))
    assert two.fits and two.need_per_gpu_gib == pytest.approx((61.09 + 4.0) / 2 + 1.5, abs=0.01)
    too_few = fit_report(QWEN32B, gpu(gpus=1, tensor_parallel_size=2, gpu_memory_gib=80))
    assert not too_few.fits and any("> 1 GPUs" in line for line in too_few.arithmetic)


def test_unknown_hub_model_is_named():
    with pytest.raises(FitError, match="no architecture known for 'org/unknown-model'"):
        model_spec("org/unknown-model")


def test_adapter_mode_auto_chooses_by_the_number_of_served_versions_and_says_why():
    from workspace.config import adapter_mode

    mode = lambda *sets: adapter_mode(load_config(overrides=list(sets)).config)  # noqa: E731
    assert mode("serving.adapter_mode=auto") == ("merged", "auto: one finetuned model is served; merged weights skip "
                                                 "the per-token LoRA cost")
    m, why = mode("serving.adapter_mode=auto", "serving.gateway.canary.percent=10")
    assert m == "lora" and "serving.gateway.canary" in why
    m, why = mode("serving.adapter_mode=auto", 'serving.gateway.routes=[{"name": "x", "model": "candidate", "keywords": ["XML"]}]')
    assert m == "lora" and "routes" in why
    assert mode("serving.adapter_mode=merged", "serving.gateway.canary.percent=10")[0] == "merged"  # explicit wins
    assert mode()[0] == "merged"  # the embedded default (cpu_tiny) says auto and serves one model
    assert ServingConfig().adapter_mode == "lora"  # the schema's default: every alias servable from one vLLM
    with pytest.raises(ConfigError, match="neither keywords nor regex"):
        load_config(overrides=['serving.gateway.routes=[{"name": "x", "model": "candidate"}]'])
    with pytest.raises(ConfigError, match="does not compile"):
        load_config(overrides=['serving.gateway.routes=[{"name": "x", "model": "candidate", "regex": "("}]'])
    with pytest.raises(ConfigError, match="limits_storage"):
        load_config(overrides=["serving.gateway.limits_storage=memcached://x"])


def test_the_lora_rank_served_is_the_adapters_own(random_adapter, tmp_path):
    """vLLM's --max-lora-rank covers the adapter it serves: read from the adapter (PEFT's `r`), not from
    finetune.lora_rank, which an adapter continued from the champion's need not match (the default config says 64,
    the adapter is rank 8)."""
    from workspace.model_ref import ModelNotFound, adapter_rank

    assert load_config().config.finetune.lora_rank == 64 and adapter_rank(random_adapter) == 8
    with pytest.raises(ModelNotFound, match="adapter_config.json does not exist: .* is not a LoRA adapter folder"):
        adapter_rank(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"r": "8"}')
    with pytest.raises(ModelNotFound, match="r = '8' is not a positive integer rank"):
        adapter_rank(tmp_path)
    (tmp_path / "adapter_config.json").write_text('{"peft_type": "LORA"}')
    with pytest.raises(ModelNotFound, match="no LoRA rank `r`"):
        adapter_rank(tmp_path)


def test_vllm_is_handed_a_path_named_by_the_folders_content(tmp_path, monkeypatch):
    """vLLM keys its torch.compile cache on the model's path: the same weights in two folders get one path (the
    later folder takes the link over), other weights another; what is not a folder (a hub id) passes unchanged."""
    import os
    from pathlib import Path

    from workspace.vllm_server import VllmServer, content_path

    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "vllm"))
    first, copy, other = (tmp_path / n for n in ("run-1/merged", "champion/merged", "run-2/merged"))
    for folder, weights in ((first, b"w1"), (copy, b"w1"), (other, b"w2")):
        folder.mkdir(parents=True)
        (folder / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
        (folder / "model.safetensors").write_bytes(weights)
        (folder / "train.log").write_text(str(folder))  # not part of the content
    a = content_path(first)
    assert Path(a).parent == tmp_path / "vllm" / "models" and Path(a).resolve() == first.resolve()
    b = content_path(copy)
    assert b == a and Path(b).resolve() == copy.resolve()  # the same content: the same path, now the copy's
    assert content_path(other) != a and Path(content_path(other)).resolve() == other.resolve()
    assert content_path(first) == a and Path(a).resolve() == first.resolve()  # and back
    assert not [p for p in os.listdir(tmp_path / "vllm" / "models") if p.startswith(".")]  # no link half made
    assert content_path("Qwen/Qwen2.5-7B-Instruct") == "Qwen/Qwen2.5-7B-Instruct"
    argv = VllmServer(str(copy), ServingConfig(), port=8123).argv()
    assert argv[4] == a and argv[:4] == ["python", "-m", "workspace.vllm_launcher", "serve"]


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_a_started_server_gets_the_settings_of_the_promoted_config(profile):
    """VllmServer's command line (the SLO step, the vLLM evaluation, the benchmarks) carries every setting the
    promoted serving.yaml carries, so that what they measure is what `make serve` runs. (max-num-seqs was missing:
    the SLO step measured a server with vLLM's default and compiled for it again.)"""
    from workspace.vllm_server import VllmServer

    cfg = load_config(profile=profile).config.serving
    conf = render_vllm_config(cfg, "m", lora_modules={"candidate": "/a"}, max_lora_rank=16)
    argv = VllmServer("m", cfg, lora_modules={"candidate": "/a"}, max_lora_rank=16, port=8123).argv()
    flags = {}
    for i, arg in enumerate(argv):
        if arg.startswith("--"):
            value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else True
            flags[arg[2:]] = value
    skip = {"model", "host", "port", "served-model-name", "lora-modules", "override-generation-config"}
    for key, value in conf.items():
        if key in skip or value is False:
            continue
        assert key in flags, key
        assert flags[key] == (True if value is True else str(value)), (key, flags[key], value)
