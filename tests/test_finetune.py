"""The finetune stage with the real LLaMA-Factory on the tiny base model: rendering, a QLoRA run with live
MLflow metrics, skip on unchanged rerun, resume after a kill, verification that refuses a do-nothing adapter,
and failures that name their cause."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from finetune.prepare import prepare_dataset
from finetune.finetune_stage import log_finetune, run_finetune
from finetune.train import (
    EXIT_INVALID, RENDERED, AdapterNoEffectError, FinetuneError, MethodMismatch, check_method, dump_rendered,
    plain_config, render_llamafactory_config, run_key, train, verify_adapter,
)
from workspace.config import load_config
from workspace.envrunner import EnvCommandError, run_in_env
from workspace.paths import ROOT, VENVS, resolve

QLORA = ["finetune.method=qlora", "finetune.quantization_bit=4"]  # cpu_tiny trains LoRA; cpu_smoke and GPU profiles QLoRA
TINY = ["finetune.max_steps=6", "finetune.save_steps=3", "finetune.logging_steps=1", "finetune.lora_rank=8",
        "finetune.lora_alpha=16", "finetune.batch_size=4", "finetune.verify_prompts=2",
        "serving.adapter_mode=lora"]  # no merged copy here: the merge path is the pipeline test's (cpu_smoke)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("processed")
    loaded = load_config(overrides=[f"data.output_dir={out}"])
    return prepare_dataset(loaded)


def test_rendered_config_for_the_cpu_default(tmp_path, prepared):
    loaded = load_config()
    cfg = render_llamafactory_config(loaded, prepared.path, tmp_path / "out")
    plain = plain_config(cfg)
    assert plain["stage"] == "sft" and plain["finetuning_type"] == "lora" and "quantization_bit" not in plain
    q = plain_config(render_llamafactory_config(load_config(overrides=QLORA), prepared.path, tmp_path / "q"))
    assert q["quantization_bit"] == 4 and q["quantization_method"] == "bnb"  # QuantizationMethod.BNB
    assert plain["lora_rank"] == 64 and plain["lora_alpha"] == 128 and plain["lora_target"] == "all"
    assert plain["template"] == "chatml" and plain["use_cpu"] is True and plain["bf16"] is False
    assert plain["eval_dataset"] == "val" and plain["overwrite_output_dir"] is False
    text = dump_rendered(cfg, "llamafactory-cli train x.yaml")
    assert text.startswith("# llamafactory-cli train x.yaml")
    assert yaml.safe_load(text) == plain  # the rendered file is exactly the config, comments aside


def _lf_check(*args) -> tuple[int, str]:
    try:
        res = run_in_env("train", ["python", "-m", "finetune.lf_train", *map(str, args), "--check-only"], echo=False)
        return res.returncode, "\n".join(res.tail)
    except EnvCommandError as exc:
        return exc.returncode, "\n".join(exc.tail)


@pytest.mark.slow  # LLaMA-Factory's parser in the train env
def test_llamafactory_parser_accepts_the_rendering_and_names_a_bad_value(tmp_path, prepared):
    """The rendered YAML passes LLaMA-Factory's own argument parser and enum types; the value every earlier
    "QLoRA" run was rendered with (`bitsandbytes`, silently ignored by LLaMA-Factory) is refused by name."""
    plain = plain_config(render_llamafactory_config(load_config(overrides=QLORA), prepared.path, tmp_path / "out"))
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(plain))
    rc, out = _lf_check(good)
    assert rc == 0 and "VALID" in out, out[-2000:]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**plain, "quantization_method": "bitsandbytes", "lora_rnak": 8}))
    rc, out = _lf_check(bad)
    assert rc == EXIT_INVALID
    assert "INVALID quantization_method: 'bitsandbytes' is not one of ['bnb'" in out
    assert "INVALID lora_rnak" in out


@pytest.mark.slow  # LLaMA-Factory's parser in the train env
def test_the_stage_refuses_an_invalid_rendering_before_training(tmp_path, prepared, monkeypatch):
    import finetune.train as train_mod

    rendered = train_mod.render_llamafactory_config
    monkeypatch.setattr(train_mod, "render_llamafactory_config",
                        lambda *a, **k: {**rendered(*a, **k), "quantization_method": "bitsandbytes"})
    with pytest.raises(FinetuneError, match="argument parser rejects .*quantization_method: 'bitsandbytes' is not one of"):
        train(load_config(overrides=TINY), prepared.path, prepared.content_hash, output_root=tmp_path)
    assert not list(tmp_path.rglob("checkpoint-*")) and not list(tmp_path.rglob("adapter_model.safetensors"))


@pytest.mark.slow  # LLaMA-Factory's parser in the train env
def test_every_profile_renders_what_llamafactory_accepts(tmp_path, prepared):
    """GPU profiles too, on this CPU machine: keys and enum values through LLaMA-Factory's parser (bf16/fp16 are
    not checked against hardware this machine lacks)."""
    profiles = sorted(p.stem for p in (ROOT / "configs" / "profiles").glob("*.yaml"))
    paths = []
    for profile in profiles:
        plain = plain_config(render_llamafactory_config(load_config(profile=profile), prepared.path, tmp_path / profile))
        assert plain.get("quantization_method", "bnb") == "bnb"
        paths.append(tmp_path / f"{profile}.yaml")
        paths[-1].write_text(yaml.safe_dump(plain))
    rc, out = _lf_check(*paths, "--other-machine")
    assert rc == 0 and out.count("VALID ") == len(profiles) >= 6, out[-2000:]


def test_method_check_refuses_a_qlora_run_that_did_not_quantize(tmp_path):
    loaded = load_config(overrides=QLORA + ["finetune.lora_rank=8", "finetune.lora_alpha=16"])
    targets = ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]
    report = {"layer_types": {"torch.nn.Linear": 29}, "lora_modules": 28, "lora_ranks": [8], "lora_alphas": [16],
              "lora_base_layer_types": {"torch.nn.modules.linear.Linear": 28}, "lora_targets": targets,
              "unwrapped_linear": []}
    path = tmp_path / "method_report.json"
    path.write_text(json.dumps(report))  # what the live model looked like with `quantization_method: bitsandbytes`
    with pytest.raises(MethodMismatch, match="method qlora .4-bit. asked for bitsandbytes Linear4bit"):
        check_method(loaded, path)
    report.update({"layer_types": {"bnb.Linear4bit": 28, "torch.nn.Linear": 1},
                   "lora_base_layer_types": {"bitsandbytes.nn.modules.Linear4bit": 28}})
    path.write_text(json.dumps(report))
    assert check_method(loaded, path)["quantized_layers"] == 28
    report.update({"lora_ranks": [16], "unwrapped_linear": ["o_proj"]})
    path.write_text(json.dumps(report))
    with pytest.raises(MethodMismatch, match="lora_rank is 8; the LoRA modules had rank .16.*without LoRA: .'o_proj'"):
        check_method(loaded, path)


def test_rendered_config_for_gpu_profiles_and_lora(tmp_path, prepared):
    loaded = load_config(profile="a100x1_qwen32b_qlora")
    plain = plain_config(render_llamafactory_config(loaded, prepared.path, tmp_path))
    assert plain["model_name_or_path"] == "Qwen/Qwen2.5-32B-Instruct" and plain["template"] == "qwen"
    assert plain["bf16"] is True and "use_cpu" not in plain and plain["gradient_accumulation_steps"] == 4
    assert plain["full_determinism"] is True and plain["seed"] == 42  # reproducible on CUDA too
    lora = plain_config(render_llamafactory_config(load_config(overrides=["finetune.method=lora",
                                                                          "finetune.quantization_bit=null"]),
                                                   prepared.path, tmp_path))
    assert "quantization_bit" not in lora and lora["finetuning_type"] == "lora"


@pytest.mark.slow
def test_qlora_run_logs_live_metrics_verifies_and_is_skipped_when_unchanged(tmp_path, prepared, tmp_tracking):
    import mlflow

    from workspace.tracking import stage_run

    loaded = load_config(overrides=TINY + QLORA + tmp_tracking)
    with stage_run(loaded, "finetune") as run:
        result = run_finetune(loaded, prepared.path, prepared.content_hash, mlflow_run_id=run.info.run_id,
                              output_root=tmp_path / "adapters")
        log_finetune(result, loaded)
    out = result.output_dir
    m = json.loads((out / "manifest.json").read_text())
    for key in ("base_model", "base_model_revision", "dataset_hash", "config_hash", "git_commit", "trainable_params",
                "final_val_loss", "best_val_loss"):
        assert m[key] is not None, key
    assert m["dataset_hash"] == prepared.content_hash and m["global_step"] == 6
    assert m["verification"]["outputs_differ"] >= 1
    assert m["verification"]["val_loss_candidate"] < m["verification"]["val_loss_base"]
    assert (out / "adapter_model.safetensors").exists() and (out / "loss_curve.png").exists()
    assert yaml.safe_load((out / RENDERED).read_text())["quantization_bit"] == 4
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(history) >= 5 and sorted(h.step for h in history)[-1] == 6  # per-step, not only the final value
    arts = {a.path for a in client.list_artifacts(run.info.run_id, "finetune")}
    assert {"finetune/loss_curve.png", f"finetune/{RENDERED}", "finetune/manifest.json"} <= arts
    assert client.get_run(run.info.run_id).data.params["lf.quantization_bit"] == "4"
    # QLoRA that quantized: every LoRA module sat on a bitsandbytes 4-bit layer of the model being trained
    mc = m["method_check"]
    assert mc["verified"] and mc["quantized_layer_type"] == "bnb.Linear4bit" and mc["quantized_layers"] == mc["lora_modules"] > 0
    assert mc["lora_rank"] == 8 and {"q_proj", "v_proj", "down_proj"} <= set(mc["lora_targets"])
    assert "Quantizing model to 4 bit" in (out / "train.log").read_text()
    tags = client.get_run(run.info.run_id).data.tags
    assert tags["finetune.method_verified"] == "true" and tags["finetune.quantized_layer_type"] == "bnb.Linear4bit"

    stamp = (out / "adapter_model.safetensors").stat().st_mtime_ns
    again = run_finetune(loaded, prepared.path, prepared.content_hash, output_root=tmp_path / "adapters")
    assert again.skipped and again.output_dir == out and again.manifest == m
    assert (out / "adapter_model.safetensors").stat().st_mtime_ns == stamp  # nothing was trained again


@pytest.mark.slow
def test_killed_training_resumes_from_its_last_checkpoint(tmp_path, prepared):
    """Killed after checkpoint-4 with steps 5+ already logged, the rerun resumes from step 4; the trainer log and the
    curve the stage reports (MLflow's) are monotonic in steps: the killed run's entries past the checkpoint are
    dropped, the kept ones replayed."""
    loaded = load_config(overrides=["finetune.max_steps=12", "finetune.save_steps=4", "finetune.logging_steps=1",
                                    "finetune.lora_rank=8", "finetune.batch_size=4"])
    out = tmp_path / "adapters" / f"{loaded.config.project.name}-{run_key(loaded, prepared.content_hash)}"
    out.mkdir(parents=True)
    rendered = out / RENDERED
    rendered.write_text(dump_rendered(render_llamafactory_config(loaded, prepared.path, out), "test"))
    env = dict(os.environ, DISABLE_VERSION_CHECK="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([str(VENVS["train"] / "bin" / "llamafactory-cli"), "train", str(rendered)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def logged(key: str = "current_steps") -> list[int]:
        path = out / "trainer_log.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return [e["current_steps"] for e in (json.loads(x) for x in lines if x.endswith("}")) if key in e]

    deadline = time.time() + 300
    try:
        while time.time() < deadline and not ((out / "checkpoint-4" / "trainer_state.json").exists() and max(logged() or [0]) >= 5):
            assert proc.poll() is None, "training ended before its first checkpoint"
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # as an OOM killer or a power cut would
        proc.wait()
    assert (out / "checkpoint-4").exists() and not (out / "checkpoint-8").exists() and max(logged()) >= 5
    assert not (out / "manifest.json").exists()
    reported: list[dict] = []
    result = train(loaded, prepared.path, prepared.content_hash, output_root=tmp_path / "adapters",
                   on_entry=reported.append)
    assert result.resumed_from == 4
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 12
    assert "Resuming training from" in (out / "train.log").read_text()
    steps = [h["step"] for h in state["log_history"] if "loss" in h]
    assert steps[-1] == 12
    assert logged("loss") == list(range(1, 13))  # no training step twice, none missing
    assert logged() == sorted(logged())  # evaluation entries share their step; nothing steps backwards
    assert [e["current_steps"] for e in reported if "loss" in e] == list(range(1, 13))
    assert [e["current_steps"] for e in reported] == sorted(e["current_steps"] for e in reported)


@pytest.mark.slow
def test_verification_refuses_a_zero_initialised_adapter(tmp_path, prepared):
    base = resolve(load_config().config.base_model.path)
    adapter = tmp_path / "zero-adapter"
    code = (
        "import sys; from transformers import AutoModelForCausalLM; from peft import LoraConfig, get_peft_model\n"
        "m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "p = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules='all-linear'))  # B = 0 at init\n"
        "p.save_pretrained(sys.argv[2])\n"
    )
    run_in_env("train", ["python", "-c", code, str(base), str(adapter)], timeout=300, echo=False)
    with pytest.raises(AdapterNoEffectError, match=r"changes nothing.*all 3 probe prompts"):
        verify_adapter(load_config(), adapter, prepared.path / "val.jsonl", tmp_path / "v.json", prompts=3)
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["outputs_differ"] == 0 and report["lora_b_norm"] == 0


@pytest.mark.slow
def test_failures_name_their_cause(tmp_path, prepared, tmp_tracking):
    loaded = load_config(overrides=TINY)
    with pytest.raises(FinetuneError, match="has no dataset_info.json: run `make prepare`"):
        train(loaded, tmp_path, "x", output_root=tmp_path / "a")
    missing = load_config(overrides=TINY + [f"base_model.path={tmp_path / 'nope'}"])
    with pytest.raises(FinetuneError, match="base model not found.*make base-model"):
        train(missing, prepared.path, prepared.content_hash, output_root=tmp_path / "a")

    import mlflow

    from workspace.tracking import stage_run

    broken = load_config(overrides=TINY + tmp_tracking + ["finetune.template=no_such_template"])
    run_id = None
    with pytest.raises(FinetuneError) as err:
        with stage_run(broken, "finetune") as run:
            run_id = run.info.run_id
            train(broken, prepared.path, prepared.content_hash, output_root=tmp_path / "b")
    msg = str(err.value)
    assert "LLaMA-Factory crashed" in msg and "train.log" in msg and "no_such_template" in msg
    assert mlflow.MlflowClient().get_run(run_id).info.status == "FAILED"
