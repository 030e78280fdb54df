"""Several hosts, executed: a two-host training through LLaMA-Factory, the two hosts played by two process trees on
this machine, each started with exactly the command the finetune stage prints for it (`make finetune` on host 0,
`make finetune-worker` on host 1, NODE_RANK/MASTER_ADDR/MASTER_PORT on 127.0.0.1), torch.distributed over gloo on
the CPU. Each "host" has its own cache and Prefect home (as separate machines would; on one machine they would
otherwise share the workspace lock); they share the repository's files as hosts share a file system, and report
their flow runs to one Prefect server, as a team's hosts do (docs/team-service.md).

DeepSpeed ZeRO-2 is not tried here: DeepSpeed is not in the CPU train env (requirements/train.lock; it is in
train-gpu.lock, built without its compiled ops), and the config refuses `finetune.deepspeed` with `finetune.device:
cpu` (tests/test_gpu_path.py). Whether its CPU accelerator would run ZeRO-2 over gloo is untested.
"""
from __future__ import annotations

import os
import re
import subprocess
import signal
import time
from pathlib import Path

import pytest

from conftest import prefect_server
from finetune.train import free_port, host_commands, launch_argv, render_llamafactory_config
from workspace.config import load_config
from workspace.tracking import configure

ROOT = Path(__file__).resolve().parents[1]


def _sets(tmp: Path) -> list[str]:
    return ["finetune.nnodes=2", "finetune.max_steps=6", "finetune.save_steps=3", "finetune.logging_steps=1",
            "finetune.lora_rank=8", "finetune.verify_prompts=2", f"finetune.output_dir={tmp}/adapters",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts"]


def test_the_stage_prints_one_command_per_host_and_renders_gloo(tmp_path):
    loaded = load_config(overrides=_sets(tmp_path))
    cmds = host_commands(loaded, {"MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"})
    assert len(cmds) == 2
    assert cmds[0].startswith("NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 make finetune PROFILE=cpu_tiny SET=")
    assert cmds[1].startswith("NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29600 make finetune-worker PROFILE=cpu_tiny SET=")
    assert "finetune.nnodes=2" in cmds[1] and "finetune.max_steps=6" in cmds[1]
    cfg = render_llamafactory_config(loaded, tmp_path, tmp_path / "o")
    assert cfg["ddp_backend"] == "gloo" and cfg["use_cpu"] is True
    argv = launch_argv(loaded, ["-m", "finetune.lf_train", "x.yaml"], {"NODE_RANK": "1", "MASTER_ADDR": "127.0.0.1",
                                                                       "MASTER_PORT": "29601"})
    assert argv[:11] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "1", "--master_addr",
                         "127.0.0.1", "--master_port", "29601"]
    with pytest.raises(Exception, match="num_gpus needs finetune.device: cuda"):
        load_config(overrides=["finetune.num_gpus=2"])


@pytest.mark.slow
def test_two_hosts_train_one_adapter_over_gloo(tmp_path):
    with prefect_server(tmp_path, {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-server")}) as prefect_api:
        _two_hosts(tmp_path, prefect_api)


def _two_hosts(tmp_path, prefect_api: str) -> None:
    port = str(free_port())
    loaded = load_config(overrides=_sets(tmp_path))
    cmds = host_commands(loaded, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
    configure(loaded)  # the shared MLflow store exists before the hosts start (two first opens would race its migration)
    procs, logs = {}, {}
    for rank in (0, 1):
        own = tmp_path / f"host{rank}"
        (own / "prefect" / "storage").mkdir(parents=True)
        env = {**os.environ, "LLMOPS_CACHE": str(own / "cache"), "PREFECT_HOME": str(own / "prefect"),
               "PREFECT_LOCAL_STORAGE_PATH": str(own / "prefect" / "storage"), "PREFECT_API_URL": prefect_api}
        logs[rank] = open(own / "out.log", "w+")
        procs[rank] = subprocess.Popen(["bash", "-c", cmds[rank]], cwd=ROOT, env=env, stdout=logs[rank],
                                       stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 900
    while any(p.poll() is None for p in procs.values()) and time.monotonic() < deadline:
        if any(p.poll() not in (None, 0) for p in procs.values()):  # one host failed: the other would wait forever
            break
        time.sleep(2)
    for p in procs.values():
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
            p.wait(30)
    out_text = {}
    for rank in (0, 1):
        logs[rank].seek(0)
        out_text[rank] = logs[rank].read()
        logs[rank].close()
    results = {r: subprocess.CompletedProcess([], procs[r].returncode, out_text[r], "") for r in (0, 1)}
    for rank in (0, 1):
        assert results[rank].returncode == 0, (rank, results[rank].stdout[-3000:], results[rank].stderr[-3000:])
    # host 0 printed the commands it was started with (the stage's own output)
    assert cmds[1] in results[0].stdout + results[0].stderr
    out = next((tmp_path / "adapters").iterdir())
    rank0, rank1 = (out / "train.log").read_text(errors="replace"), (out / "train.rank1.log").read_text(errors="replace")
    # the trainer's own words: world size 2, distributed, on both ranks
    assert re.search(r"Process rank: 0, world size: 2, .*distributed training: True", rank0)
    assert re.search(r"Process rank: 1, world size: 2, .*distributed training: True", rank1)
    # both ranks stepped to the end: host 0's progress reaches 6/6 and its trainer state step 6; host 1 evaluated at
    # steps 3 and 6 (eval_steps = save_steps) and completed (DDP all-reduces every step: one rank cannot run ahead)
    assert "6/6 [" in rank0 and '"global_step": 6' in (out / "trainer_state.json").read_text()
    assert rank1.count("***** Running Evaluation *****") >= 2 and "Training completed" in rank1
    # one adapter, saved and verified on host 0; host 1 saved none of its own
    manifest = (out / "manifest.json").read_text()
    assert (out / "adapter_model.safetensors").exists() and '"loads": true' in manifest
    assert not (tmp_path / "host1" / "adapters").exists()
