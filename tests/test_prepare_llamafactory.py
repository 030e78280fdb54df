"""The prepared folder is what LLaMA-Factory reads: a real `llamafactory-cli train` in the train environment
runs a few LoRA steps on the shipped data's dataset_info.json and writes an adapter."""
from __future__ import annotations

import pytest

import json

import yaml

from finetune.prepare import prepare_dataset
from workspace.config import load_config
from workspace.envrunner import run_in_env
from workspace.paths import resolve

pytestmark = pytest.mark.slow  # launches LLaMA-Factory or vLLM


def test_llamafactory_trains_a_few_steps_on_the_prepared_dataset(tmp_path):
    loaded = load_config(overrides=[f"data.output_dir={tmp_path / 'processed'}"])
    prepared = prepare_dataset(loaded)
    out = tmp_path / "adapter"
    train_cfg = {
        "model_name_or_path": str(resolve(loaded.config.base_model.path)),
        "stage": "sft", "do_train": True, "finetuning_type": "lora", "lora_target": "all", "lora_rank": 8,
        "dataset": "train", "eval_dataset": "val", "dataset_dir": str(prepared.path), "template": "qwen",
        "cutoff_len": loaded.config.finetune.cutoff_len, "max_samples": 64, "overwrite_cache": True,
        "preprocessing_num_workers": 1, "output_dir": str(out), "logging_steps": 1, "save_strategy": "no",
        "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4, "max_steps": 3, "learning_rate": 1e-3,
        "report_to": "none", "bf16": False, "fp16": False, "use_cpu": True,
    }
    cfg_path = tmp_path / "train.yaml"
    cfg_path.write_text(yaml.safe_dump(train_cfg, allow_unicode=True), encoding="utf-8")
    lines: list[str] = []
    run_in_env("train", ["llamafactory-cli", "train", str(cfg_path)], timeout=600, on_line=lines.append,
               echo=False, log_path=tmp_path / "train.log", extra_env={"DISABLE_VERSION_CHECK": "1"})
    assert (out / "adapter_model.safetensors").exists(), lines[-20:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert any("loss" in entry for entry in state["log_history"])
