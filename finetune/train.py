"""Finetune stage: render a complete LLaMA-Factory YAML from the workspace config, run `llamafactory-cli train`
in the train environment while following its trainer log (progress bar + live MLflow metrics), resume from the
last checkpoint after an interruption, skip a finished run with the same inputs, then verify the adapter
(it loads with peft and changes greedy outputs) and write a manifest.

Called by flows/finetune.py (`make finetune`) and by tests as plain functions.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import yaml

from finetune.fit import TrainFitError, train_fit
from workspace.config.load import LoadedConfig
from workspace.device import detect, require_cuda, resolve_dtype, train_env
from workspace.envrunner import EnvCommandError, run_in_env
from workspace.model_ref import ModelNotFound, base_model
from workspace.paths import resolve
from workspace.processes import free_port
from workspace.tracking import git_commit

FINETUNE_VERSION = "2"  # 2: QLoRA really quantizes (quantization_method bnb); version-1 runs were LoRA
MANIFEST = "manifest.json"
RENDERED = "llamafactory_train.yaml"
TRAINER_LOG = "trainer_log.jsonl"
TRAIN_LOG = "train.log"
METHOD_REPORT = "method_report.json"
EXIT_INVALID = 4  # finetune/lf_train.py: the rendered YAML does not pass LLaMA-Factory's parser
RUN_KEY_EXCLUDES = ("output_dir", "merge", "verify_prompts", "timeout_s", "logging_steps")


class FinetuneError(RuntimeError):
    """The stage failed; the message names the cause and the log file."""


# ------------------------------------------------------------------------------------------- base model
def base_model_ref(loaded: LoadedConfig) -> tuple[str, str]:
    """(model_name_or_path for LLaMA-Factory, the base model's fingerprint for the manifest and the run key):
    workspace.model_ref, whose cost does not grow with the model's size."""
    try:
        ref = base_model(loaded)
        return ref.base, ref.base_fingerprint()
    except ModelNotFound as exc:
        raise FinetuneError(str(exc)) from None


# --------------------------------------------------------------------------------------------- render
def render_llamafactory_config(loaded: LoadedConfig, dataset_dir: Path, output_dir: Path) -> dict:
    """The complete YAML that `llamafactory-cli train` runs: anyone can rerun it by hand."""
    ft = loaded.config.finetune
    model, _ = base_model_ref(loaded)
    cfg: dict = {
        "### model": None,
        "model_name_or_path": model,
        "trust_remote_code": False,
    }
    if loaded.config.base_model.source == "hub" and loaded.config.base_model.revision:
        cfg["model_revision"] = loaded.config.base_model.revision
    cfg.update({
        "### method": None,
        "stage": ft.stage,
        "do_train": True,
        "finetuning_type": "full" if ft.method == "full" else "lora",
    })
    if ft.method != "full":
        cfg.update({"lora_rank": ft.lora_rank, "lora_alpha": ft.lora_alpha, "lora_dropout": ft.lora_dropout,
                    "lora_target": ft.lora_target})
    start = init_adapter(loaded)
    if start is not None:
        # LLaMA-Factory loads the adapter trainable and keeps training it (no new adapter on top: the result is one
        # adapter, served like any other); its rank must be the configured one
        cfg["adapter_name_or_path"] = str(start)
    if ft.stage == "dpo":
        cfg.update({"pref_beta": ft.pref_beta, "pref_loss": ft.pref_loss, "pref_ftx": ft.pref_ftx})
        if start is not None:
            # the reference is the model DPO starts from (base + that adapter, frozen), not the bare base, which
            # LLaMA-Factory would use for a LoRA policy by default (its adapter disabled)
            cfg.update({"ref_model": model, "ref_model_adapters": str(start)})
            if ft.method == "qlora":
                cfg["ref_model_quantization_bit"] = ft.quantization_bit
    if ft.method == "qlora":
        # LLaMA-Factory's enum value is `bnb` (QuantizationMethod.BNB); it accepted `bitsandbytes` without a word
        # and trained unquantized. finetune/lf_train.py now checks every enum value before training starts.
        cfg.update({"quantization_bit": ft.quantization_bit, "quantization_method": "bnb",
                    "quantization_type": "nf4", "double_quantization": True})
    if ft.deepspeed:
        cfg["deepspeed"] = str(resolve(ft.deepspeed))
    if not ft.gradient_checkpointing:
        cfg["disable_gradient_checkpointing"] = True
    if ft.liger_kernel:
        cfg["enable_liger_kernel"] = True
    cfg.update({
        "### dataset": None,
        "dataset_dir": str(dataset_dir),
        "dataset": "pref_train" if ft.stage == "dpo" else "train",
        "template": ft.template,
        "cutoff_len": ft.cutoff_len,
        "overwrite_cache": True,
        "preprocessing_num_workers": 1 if ft.device == "cpu" else 8,
        "dataloader_num_workers": 0,
        "### output": None,
        "output_dir": str(output_dir),
        "logging_steps": ft.logging_steps,
        "save_steps": ft.save_steps,
        "save_total_limit": 3,
        "plot_loss": False,
        "overwrite_output_dir": False,  # keep checkpoints: a rerun resumes from the last one
        "save_only_model": False,
        "report_to": "none",  # the workspace follows trainer_log.jsonl and logs to MLflow itself
        "### train": None,
        "per_device_train_batch_size": ft.batch_size,
        "gradient_accumulation_steps": ft.gradient_accumulation,
        "learning_rate": ft.learning_rate,
        "num_train_epochs": ft.num_epochs,
        "max_steps": ft.max_steps,
        "lr_scheduler_type": ft.lr_scheduler,
        "warmup_ratio": ft.warmup_ratio,
        "seed": loaded.config.project.seed,
        "include_num_input_tokens_seen": True,
    })
    if ft.device == "cpu":
        cfg.update({"use_cpu": True, "bf16": False, "fp16": False})
        if ft.nnodes > 1:  # several CPU hosts: torch.distributed over gloo (NCCL is CUDA's)
            cfg["ddp_backend"] = "gloo"
    else:
        # full_determinism: transformers' enable_full_determinism (deterministic CUDA kernels, CUBLAS workspace):
        # the same config, seed and code give the same adapter, at some cost in speed. On the CPU the same thread
        # count already gives bit-identical adapters (make bench-gate, reproducibility).
        cfg.update({"bf16": ft.bf16, "fp16": not ft.bf16, "ddp_timeout": 180000000, "full_determinism": True})
    if ft.stage == "sft" and (dataset_dir / "val.jsonl").exists():  # (val holds SFT rows, not pairs)
        cfg.update({"### eval": None, "eval_dataset": "val", "per_device_eval_batch_size": ft.batch_size,
                    "eval_strategy": "steps", "eval_steps": ft.save_steps})
    return cfg


def dump_rendered(cfg: dict, command_hint: str) -> str:
    """YAML with section comments (keys starting with ###) and the command that runs it on top."""
    lines = [f"# {command_hint}", "# Rendered by the workspace from configs/pipeline.yaml (+ profile, --set); edit those, not this."]
    for key, value in cfg.items():
        if key.startswith("###"):
            lines.append(f"\n{key}")
            continue
        lines.append(yaml.safe_dump({key: value}, allow_unicode=True, default_flow_style=True, width=10_000).strip()
                     .removeprefix("{").removesuffix("}"))
    return "\n".join(lines) + "\n"


def plain_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("###")}


def init_adapter(loaded: LoadedConfig) -> Optional[Path]:
    """The adapter `finetune.init_adapter` names (training continues it), checked; None when unset. The alias
    `champion` is resolved to a fetched folder by the flows (they may read the registry; this stage may not)."""
    name = loaded.config.finetune.init_adapter
    if not name:
        return None
    if name == "champion":
        raise FinetuneError("finetune.init_adapter is 'champion', which only the flows resolve (make finetune, make "
                            "pipeline, make loop fetch the champion's adapter); here, give the adapter's folder")
    path = resolve(name)
    if not (path / "adapter_config.json").exists():
        raise FinetuneError(f"finetune.init_adapter = {name} (set in {loaded.origin('finetune.init_adapter')}): no "
                            "adapter_config.json there; point it at a LoRA adapter folder (a finished run, or a "
                            "registered version's adapter/)")
    return path


def adapter_fingerprint(path: Path) -> str:
    h = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        if (path / name).exists():
            h.update(name.encode())
            h.update((path / name).read_bytes())
    return h.hexdigest()[:16]


def run_key(loaded: LoadedConfig, dataset_hash: str) -> str:
    """Cache key of a training run: everything that changes the adapter, nothing else. Not part of it: where the
    run is written, whether a merged copy is also exported (done on a cached run when asked), how many prompts the
    verification probes, the time limit (a stopped run resumes), and how often it logs."""
    _, base_rev = base_model_ref(loaded)
    ft = loaded.config.finetune.model_dump(mode="json")
    for key in RUN_KEY_EXCLUDES:
        ft.pop(key)
    if ft["stage"] == "sft":  # the DPO settings change nothing in an SFT run (and old SFT run keys stay valid)
        for key in ("stage", "pref_beta", "pref_loss", "pref_ftx"):
            ft.pop(key)
    if ft["init_adapter"] is None:
        ft.pop("init_adapter")
    else:  # the adapter's bytes, not its path: the same folder may hold another adapter tomorrow
        ft["init_adapter"] = adapter_fingerprint(init_adapter(loaded))
    blob = json.dumps({"finetune": ft, "seed": loaded.config.project.seed, "dataset": dataset_hash, "base": base_rev,
                       "version": FINETUNE_VERSION}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


# -------------------------------------------------------------------------------------------- follow
class TrainerLogFollower:
    """Tails LLaMA-Factory's trainer_log.jsonl while training runs; calls on_entry for each new line."""

    def __init__(self, path: Path, on_entry: Callable[[dict], None], poll: float = 0.5, replay: bool = False):
        self.path, self.on_entry, self.poll = path, on_entry, poll
        # replay: a resumed run reports the entries up to its checkpoint again (the stage's MLflow run then holds
        # the whole curve); otherwise only new lines
        self._offset = 0 if replay or not path.exists() else path.stat().st_size
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)
        self._read()  # whatever was written last

    def _loop(self) -> None:
        while not self._stop.wait(self.poll):
            self._read()

    def _read(self) -> None:
        if not self.path.exists():
            return
        with open(self.path, encoding="utf-8") as fh:
            fh.seek(self._offset)
            while True:
                line = fh.readline()
                if not line or not line.endswith("\n"):
                    break
                self._offset = fh.tell()
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                try:
                    self.on_entry(entry)
                except Exception as exc:  # noqa: BLE001 - a logging hiccup must not stop training
                    print(f"[finetune] could not record a trainer log entry: {exc}")


def trim_trainer_log(path: Path, step: int) -> int:
    """Before resuming from checkpoint-<step>: drop the killed run's entries past that step (they are trained again
    and would make the logged curve step backwards), and a half-written last line. Returns how many were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(entry.get("current_steps", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(line + "\n" for line in kept), encoding="utf-8")
    tmp.replace(path)
    return dropped


def latest_checkpoint(output_dir: Path) -> Optional[Path]:
    ckpts = [p for p in output_dir.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()]
    return max(ckpts, key=lambda p: int(p.name.split("-")[-1])) if ckpts else None


# ---------------------------------------------------------------------------------------------- result
@dataclass
class FinetuneResult:
    output_dir: Path
    adapter_dir: Path
    manifest: dict
    skipped: bool
    resumed_from: Optional[int] = None


_TRAINABLE = re.compile(r"trainable params: ([\d,]+) \|\| all params: ([\d,]+)")
_OOM = ("out of memory", "OutOfMemoryError", "Cannot allocate memory")  # raised inside the process (CUDA, malloc)


def explain_failure(exc: EnvCommandError, log_path: Path, rendered: Path | None = None, method: str | None = None) -> str:
    text = "\n".join(exc.tail)
    invalid = [l.strip() for l in exc.tail if l.strip().startswith("INVALID ")]
    if exc.returncode == EXIT_INVALID and invalid:
        return (f"finetune refused before training: LLaMA-Factory's argument parser rejects the rendered config "
                f"{rendered}: " + "; ".join(i.removeprefix("INVALID ") for i in invalid) +
                ". The workspace renders this file from configs/: fix the setting there (or report a bug if the "
                "workspace rendered it on its own).")
    fix = "lower finetune.batch_size or finetune.cutoff_len" + ("" if method == "qlora" else ", or use method qlora")
    if exc.oom_killed or (exc.returncode is not None and exc.returncode >= 0 and any(s in text for s in _OOM)):
        cause = f"the training process ran out of memory ({exc.killed or 'an out-of-memory error'}); {fix}"
    elif exc.killed:
        cause = (f"the training process did not finish: {exc.killed} Checkpoints are kept, so `make finetune` "
                 f"resumes{'; if memory is short, ' + fix if exc.oom_killed is None else ''}")
    elif "dataset_info.json" in text or "Cannot open" in text and "dataset_info" in text:
        cause = "LLaMA-Factory could not read the dataset (dataset_info.json). Run `make prepare` first"
    elif "No such file or directory" in text and "config.json" in text:
        cause = "the base model folder is incomplete. Run `make base-model`"
    else:
        last = next((l for l in reversed(exc.tail) if l.strip()), "no output")
        cause = f"LLaMA-Factory crashed (exit code {exc.returncode}): {last.strip()[:300]}"
    return f"finetune failed: {cause}. Full log: {log_path}. Checkpoints written so far are kept in {log_path.parent}."


class MethodMismatch(FinetuneError):
    """Training ran, but not with the method the config asked for (e.g. QLoRA that did not quantize)."""


_QUANT_LAYER = {4: "Linear4bit", 8: "Linear8bitLt"}


def check_method(loaded: LoadedConfig, report_path: Path) -> dict:
    """Compare what finetune/lf_train.py saw on the live model when training began with what was asked: 4-bit (or
    8-bit) bitsandbytes layers under every LoRA module for qlora and none for lora; the LoRA rank and alpha; the
    targets (`all`: every linear projection but lm_head). Returns the evidence for the manifest and MLflow;
    raises MethodMismatch naming the difference."""
    ft = loaded.config.finetune
    if not report_path.exists():
        raise MethodMismatch(f"training finished but wrote no method report ({report_path}): the workspace cannot "
                             "tell which method was trained. See train.log beside it.")
    rep = json.loads(report_path.read_text())
    base_types = rep.get("lora_base_layer_types", {})
    quant = {k: v for k, v in rep.get("layer_types", {}).items() if k.startswith("bnb.")}
    problems = []
    if ft.method == "qlora":
        want = _QUANT_LAYER[ft.quantization_bit]
        wrong = {k: v for k, v in base_types.items() if not k.endswith("." + want)}
        if not quant or wrong:
            problems.append(f"method qlora ({ft.quantization_bit}-bit) asked for bitsandbytes {want} layers under "
                            f"every LoRA module; the model had {base_types or 'no LoRA modules'}")
    elif quant:
        problems.append(f"method {ft.method} asked for full-precision weights; the model had quantized layers {quant}")
    if ft.method == "full":
        if rep.get("lora_modules"):
            problems.append(f"method full, but {rep['lora_modules']} LoRA modules were trained")
    else:
        if not rep.get("lora_modules"):
            problems.append(f"method {ft.method}, but the model had no LoRA modules")
        if rep.get("lora_ranks") != [ft.lora_rank]:
            problems.append(f"finetune.lora_rank is {ft.lora_rank}; the LoRA modules had rank {rep.get('lora_ranks')}")
        if rep.get("lora_alphas") and rep["lora_alphas"] != [ft.lora_alpha]:
            problems.append(f"finetune.lora_alpha is {ft.lora_alpha}; the LoRA modules had {rep['lora_alphas']}")
        if ft.lora_target == "all":
            if rep.get("unwrapped_linear"):
                problems.append(f"finetune.lora_target is 'all'; linear layers without LoRA: {rep['unwrapped_linear']}")
        elif set(rep.get("lora_targets", [])) != {t.strip() for t in ft.lora_target.split(",")}:
            problems.append(f"finetune.lora_target is {ft.lora_target!r}; LoRA was put on {rep.get('lora_targets')}")
    if problems:
        raise MethodMismatch("finetune trained something else than configured: " + "; ".join(problems) +
                             f". Evidence: {report_path}")
    return {"method": ft.method, "quantization_bit": ft.quantization_bit if ft.method == "qlora" else None,
            "quantized_layers": sum(quant.values()), "quantized_layer_type": next(iter(quant), None),
            "lora_modules": rep.get("lora_modules"), "lora_rank": (rep.get("lora_ranks") or [None])[0],
            "lora_targets": rep.get("lora_targets"), "trainable_params": rep.get("trainable_params"),
            "quantization_config": rep.get("quantization_config"), "verified": True,
            "peak_rss_mb": rep.get("peak_rss_mb"), "cuda_peak_mb": rep.get("cuda_peak_mb")}


def launch_argv(loaded: LoadedConfig, entry: list[str], environ: Optional[dict] = None) -> list[str]:
    """How LLaMA-Factory's training is started: one process, or torchrun as `llamafactory-cli train` does with
    FORCE_TORCHRUN=1 (its NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT conventions), on the workspace's entry.

    finetune.num_gpus is the GPUs per node, finetune.nnodes the hosts. With nnodes > 1 the NODE_RANK=0 host runs
    `make finetune` and every other host `make finetune-worker` (train_worker), each with NODE_RANK and the rank-0
    host's MASTER_ADDR (and MASTER_PORT, default 29500) in its environment.
    """
    env = os.environ if environ is None else environ
    ft = loaded.config.finetune
    force = str(env.get("FORCE_TORCHRUN", "")).lower() in ("1", "true", "yes")
    if ft.nnodes == 1 and (ft.device != "cuda" or (ft.num_gpus <= 1 and not force)):
        return ["python", *entry]
    if ft.nnodes > 1:
        missing = [v for v in ("NODE_RANK", "MASTER_ADDR") if not env.get(v)]
        if missing:
            raise FinetuneError(
                f"finetune.nnodes is {ft.nnodes}: set {' and '.join(missing)} on every host (NODE_RANK=0 on the host "
                "at MASTER_ADDR, 1.. on the others; MASTER_PORT too if 29500 is taken), e.g. "
                f"NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 make finetune PROFILE={loaded.config.profile}")
        rank = str(env["NODE_RANK"])
        if not rank.isdigit() or int(rank) >= ft.nnodes:
            raise FinetuneError(f"NODE_RANK={rank} is not one of 0..{ft.nnodes - 1} (finetune.nnodes is {ft.nnodes})")
        addr, port = env["MASTER_ADDR"], str(env.get("MASTER_PORT") or 29500)
    else:
        rank, addr, port = "0", "127.0.0.1", str(env.get("MASTER_PORT") or free_port())
    return ["torchrun", "--nnodes", str(ft.nnodes), "--node_rank", rank, "--nproc_per_node", str(max(1, ft.num_gpus)),
            "--master_addr", addr, "--master_port", port, *entry]


def host_commands(loaded: LoadedConfig, environ: Optional[dict] = None) -> list[str]:
    """The command each host of a multi-host run starts, host 0 first: what the finetune stage prints when
    finetune.nnodes > 1, so the other hosts are started with exactly the same profile and overrides."""
    env = os.environ if environ is None else environ
    ft = loaded.config.finetune
    addr, port = env.get("MASTER_ADDR", "<host 0's address>"), str(env.get("MASTER_PORT") or 29500)
    sets = [s.removeprefix("--set ") for s in loaded.sources if s.startswith("--set ")]
    tail = (f" PROFILE={loaded.profile}" if loaded.profile else "") + (f' SET="{" ".join(sets)}"' if sets else "")
    return [f"NODE_RANK={r} MASTER_ADDR={addr} MASTER_PORT={port} make {'finetune' if r == 0 else 'finetune-worker'}{tail}"
            for r in range(ft.nnodes)]


def train_worker(loaded: LoadedConfig, dataset_dir: Path, dataset_hash: str, *, timeout: float | None = None,
                 echo: bool = True) -> float:
    """A NODE_RANK > 0 host of a multi-host run (`make finetune-worker`): the same rendered config and torchrun as
    rank 0, nothing else (rank 0 saves the adapter, verifies it and records the run). Returns seconds."""
    ft = loaded.config.finetune
    rank = os.environ.get("NODE_RANK", "0")
    if ft.nnodes < 2 or rank == "0":
        raise FinetuneError(f"`make finetune-worker` is for the hosts with NODE_RANK 1..{max(ft.nnodes - 1, 1)} of a "
                            f"multi-host run (finetune.nnodes is {ft.nnodes}, NODE_RANK is {rank}); run `make finetune`")
    preflight(loaded)
    dataset_dir = Path(dataset_dir)
    output_dir = resolve(ft.output_dir) / f"{loaded.config.project.name}-{run_key(loaded, dataset_hash)}"
    output_dir.mkdir(parents=True, exist_ok=True)
    rendered = output_dir / f"llamafactory_train.rank{rank}.yaml"
    rendered.write_text(dump_rendered(render_llamafactory_config(loaded, dataset_dir, output_dir),
                                      f"llamafactory-cli train {rendered}"), encoding="utf-8")
    argv = launch_argv(loaded, ["-m", "finetune.lf_train", str(rendered)])
    t0 = time.time()
    try:
        run_in_env(train_env(loaded), argv, timeout=timeout, log_path=output_dir / f"train.rank{rank}.log", echo=echo,
                   hub_enabled=loaded.config.hub.enabled, what=f"LLaMA-Factory training (node {rank})",
                   extra_env={"DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "INFO"})
    except EnvCommandError as exc:
        raise FinetuneError(explain_failure(exc, output_dir / f"train.rank{rank}.log", rendered, ft.method)) from exc
    return time.time() - t0


def preflight(loaded: LoadedConfig) -> Optional[str]:
    """Before anything starts: CUDA present for finetune.device: cuda, and the training fit check. Returns the fit
    arithmetic (None on the CPU); raises DeviceError / FinetuneError."""
    require_cuda(loaded, ("finetune",), what="finetuning")
    if loaded.config.finetune.device != "cuda":
        return None
    hw = detect()
    try:
        fit = train_fit(loaded, detected_gib=min((g.memory_gib for g in hw.gpus), default=None))
    except (TrainFitError, ModelNotFound) as exc:
        raise FinetuneError(str(exc)) from exc
    except Exception as exc:  # noqa: BLE001 - an unknown architecture is reported, not fatal
        return f"training fit check skipped: {exc}"
    if fit and not fit.fits:
        raise FinetuneError(f"profile {loaded.config.profile!r} will not fit in GPU memory:\n{fit.text()}")
    return fit.text() if fit else None


def train(loaded: LoadedConfig, dataset_dir: Path, dataset_hash: str, *, on_entry: Callable[[dict], None] | None = None,
          timeout: float | None = None, output_root: Path | None = None, echo: bool = False,
          force: bool = False) -> FinetuneResult:
    """Run (or resume, or skip) the training. Raises FinetuneError with the cause and the log file."""
    dataset_dir = Path(dataset_dir)
    if not (dataset_dir / "dataset_info.json").exists():
        raise FinetuneError(f"{dataset_dir} has no dataset_info.json: run `make prepare` first (or point at a "
                            "folder written by the prepare stage)")
    if loaded.config.finetune.stage == "dpo" and not (dataset_dir / "pref_train.jsonl").exists():
        raise FinetuneError(f"finetune.stage is dpo but {dataset_dir} has no preference pairs (pref_train.jsonl): "
                            "collect arena votes or corrections in the gateway, run `make harvest`, and keep "
                            "data.feedback.enabled: true")
    rank = os.environ.get("NODE_RANK", "0")
    if loaded.config.finetune.nnodes > 1 and rank != "0":
        raise FinetuneError(f"this host has NODE_RANK={rank}: run `make finetune-worker` here (it only trains); "
                            "`make finetune` runs on the NODE_RANK=0 host, which records, verifies and logs the run")
    key = run_key(loaded, dataset_hash)
    output_dir = (output_root or resolve(loaded.config.finetune.output_dir)) / f"{loaded.config.project.name}-{key}"
    manifest_path = output_dir / MANIFEST
    if force and output_dir.exists():
        shutil.rmtree(output_dir)  # --force: train from scratch, checkpoints included
    if manifest_path.exists():
        return FinetuneResult(output_dir, output_dir, json.loads(manifest_path.read_text()), skipped=True)
    fit_text = preflight(loaded)
    if fit_text:
        print(fit_text)
    if loaded.config.finetune.nnodes > 1:
        print(f"[finetune] {loaded.config.finetune.nnodes} hosts; each starts its command (this one is host 0):",
              *[f"  {c}" for c in host_commands(loaded)], sep="\n", flush=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    cfg = render_llamafactory_config(loaded, dataset_dir, output_dir)
    rendered = output_dir / RENDERED
    tmp = rendered.with_suffix(".tmp")
    tmp.write_text(dump_rendered(cfg, f"llamafactory-cli train {rendered}"), encoding="utf-8")
    tmp.replace(rendered)
    ckpt = latest_checkpoint(output_dir)
    resumed_from = int(ckpt.name.split("-")[-1]) if ckpt else None
    if ckpt:
        dropped = trim_trainer_log(output_dir / TRAINER_LOG, resumed_from)
        print(f"[finetune] resuming from {ckpt.name} (an earlier run with the same inputs was interrupted; "
              f"{dropped} log entries past the checkpoint dropped, they are trained again)")

    trainable: dict[str, int] = {}

    def on_line(line: str) -> None:
        m = _TRAINABLE.search(line)
        if m:
            trainable["trainable"] = int(m.group(1).replace(",", ""))
            trainable["total"] = int(m.group(2).replace(",", ""))

    log_path = output_dir / TRAIN_LOG
    report_path = output_dir / METHOD_REPORT
    report_path.unlink(missing_ok=True)
    extra_env = {"DISABLE_VERSION_CHECK": "1", "LLAMAFACTORY_VERBOSITY": "INFO"}
    ft = loaded.config.finetune
    argv = launch_argv(loaded, ["-m", "finetune.lf_train", str(rendered), "--report", str(report_path)])
    t0 = time.time()
    try:
        with TrainerLogFollower(output_dir / TRAINER_LOG, on_entry or (lambda e: None), replay=ckpt is not None):
            run_in_env(train_env(loaded), argv, timeout=timeout, log_path=log_path, on_line=on_line, echo=echo,
                       hub_enabled=loaded.config.hub.enabled, extra_env=extra_env, what="LLaMA-Factory training")
    except EnvCommandError as exc:
        raise FinetuneError(explain_failure(exc, log_path, rendered, ft.method)) from exc
    seconds = time.time() - t0
    adapter_files = ("adapter_model.safetensors", "model.safetensors")
    if not any((output_dir / f).exists() for f in adapter_files):
        raise FinetuneError(f"llamafactory-cli train finished but wrote no adapter/model in {output_dir}. Log: {log_path}")

    method_check = check_method(loaded, report_path)
    state = json.loads((output_dir / "trainer_state.json").read_text()) if (output_dir / "trainer_state.json").exists() else {}
    history = state.get("log_history", [])
    train_losses = [h["loss"] for h in history if "loss" in h]
    eval_losses = [h["eval_loss"] for h in history if "eval_loss" in h]
    tokens = next((h.get("num_input_tokens_seen") for h in reversed(history) if h.get("num_input_tokens_seen")), None)
    train_runtime = next((h.get("train_runtime") for h in reversed(history) if "train_runtime" in h), None)
    model, base_rev = base_model_ref(loaded)
    manifest = {
        "run_key": key,
        "method": ft.method,
        "stage": ft.stage,
        "learning_rate": ft.learning_rate,
        "pref_beta": ft.pref_beta if ft.stage == "dpo" else None,
        "pref_ftx": ft.pref_ftx if ft.stage == "dpo" else None,
        "init_adapter": str(init_adapter(loaded)) if ft.init_adapter else None,
        "base_model": model,
        "base_model_revision": base_rev,
        "dataset_dir": str(dataset_dir),
        "dataset_hash": dataset_hash,
        "config_hash": loaded.hash,
        "profile": loaded.profile,
        "git_commit": git_commit(),
        "trainable_params": trainable.get("trainable"),
        "total_params": trainable.get("total"),
        "global_step": state.get("global_step"),
        "final_train_loss": train_losses[-1] if train_losses else None,
        "final_val_loss": eval_losses[-1] if eval_losses else None,
        "best_val_loss": min(eval_losses) if eval_losses else None,
        "tokens_seen": tokens,
        "train_runtime_s": train_runtime,
        "stage_wall_s": round(seconds, 1),
        "tokens_per_s": round(tokens / train_runtime, 1) if tokens and train_runtime else None,
        "resumed_from_step": resumed_from,
        "rendered_config": RENDERED,
        "lora_rank": ft.lora_rank if ft.method != "full" else None,
        # DPO: the share of pairs whose chosen answer the policy ranks above the rejected one (relative to the
        # reference), and the mean margin, at the last logged step
        "dpo_reward_accuracy": next((h["rewards/accuracies"] for h in reversed(history) if "rewards/accuracies" in h), None),
        "dpo_reward_margin": next((h["rewards/margins"] for h in reversed(history) if "rewards/margins" in h), None),
        "method_check": method_check,
    }
    return FinetuneResult(output_dir, output_dir, manifest, skipped=False, resumed_from=resumed_from)


def write_manifest(result: FinetuneResult, extra: dict | None = None) -> None:
    """Written last: its presence marks a finished run (the next identical run is skipped)."""
    manifest = dict(result.manifest)
    manifest.update(extra or {})
    tmp = result.output_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False), encoding="utf-8")
    tmp.replace(result.output_dir / MANIFEST)
    result.manifest = manifest


def loss_curve_png(output_dir: Path, path: Path) -> Optional[Path]:
    state_file = output_dir / "trainer_state.json"
    if not state_file.exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = json.loads(state_file.read_text()).get("log_history", [])
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    val = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"Finetune loss: {output_dir.name}")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def merge_adapter(loaded: LoadedConfig, result: FinetuneResult, timeout: float | None = None) -> Path:
    """`llamafactory-cli export`: the adapter merged onto the FULL-PRECISION base (a 4-bit base cannot be
    merged: LLaMA-Factory refuses by design), written next to the adapter."""
    model, _ = base_model_ref(loaded)
    export_dir = result.output_dir / "merged"
    if (export_dir / "config.json").exists():
        return export_dir
    cfg = {"model_name_or_path": model, "adapter_name_or_path": str(result.adapter_dir),
           "template": loaded.config.finetune.template, "finetuning_type": "lora", "trust_remote_code": False,
           "export_dir": str(export_dir) + ".tmp", "export_size": 5, "export_legacy_format": False,
           # merge where training ran: "auto" places the full-precision base on the GPU(s)
           "export_device": "auto" if loaded.config.finetune.device == "cuda" else loaded.config.finetune.device}
    path = result.output_dir / "llamafactory_export.yaml"
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    try:
        run_in_env(train_env(loaded), ["llamafactory-cli", "export", str(path)], timeout=timeout,
                   log_path=result.output_dir / "export.log", echo=False, extra_env={"DISABLE_VERSION_CHECK": "1"},
                   what="llamafactory-cli export")
    except EnvCommandError as exc:
        raise FinetuneError(f"merge failed: {exc}") from exc
    if export_dir.exists():
        shutil.rmtree(export_dir)
    Path(str(export_dir) + ".tmp").rename(export_dir)
    return export_dir


class AdapterNoEffectError(FinetuneError):
    """The adapter loads but its greedy outputs equal the base model's on every probe prompt."""


def verify_adapter(loaded: LoadedConfig, adapter_dir: Path, val_file: Path, out: Path, *, prompts: int = 5,
                   timeout: float = 900) -> dict:
    """Run finetune/verify_adapter.py in the train env (peft lives there). Raises AdapterNoEffectError."""
    model, _ = base_model_ref(loaded)
    argv = ["python", "-m", "finetune.verify_adapter", "--base", model, "--adapter", str(adapter_dir), "--data",
            str(val_file), "--out", str(out), "--prompts", str(prompts), "--max-len", str(loaded.config.finetune.cutoff_len),
            "--device", loaded.config.finetune.device,
            "--dtype", resolve_dtype(loaded.config.finetune.device, "bfloat16" if loaded.config.finetune.bf16 else "auto")]
    try:
        run_in_env(train_env(loaded), argv, timeout=timeout, log_path=out.with_suffix(".log"), echo=False,
                   hub_enabled=loaded.config.hub.enabled, what="adapter verification")
    except EnvCommandError as exc:
        report = json.loads(out.read_text()) if out.exists() else {}
        if exc.returncode == 3:
            raise AdapterNoEffectError(
                f"adapter {adapter_dir} changes nothing: its greedy outputs equal the base model's on all "
                f"{report.get('prompts', prompts)} probe prompts (sum of |lora_B| = {report.get('lora_b_norm', 0):.3g}). "
                "A LoRA that loads but does nothing usually means training did not update it (learning rate 0, "
                "zero steps, frozen modules, or a wrong lora_target). Report: " + str(out)) from exc
        if exc.returncode == 2:
            raise FinetuneError(f"adapter {adapter_dir} does not load on {model}: {report.get('error')}. Report: {out}") from exc
        raise FinetuneError(f"adapter verification failed: {exc}") from exc
    return json.loads(out.read_text())


def finished_run(loaded: LoadedConfig, dataset_hash: str, output_root: Path | None = None) -> Optional[Path]:
    """The folder of a finished finetune run for these inputs (its manifest exists), or None."""
    out = (output_root or resolve(loaded.config.finetune.output_dir)) / f"{loaded.config.project.name}-{run_key(loaded, dataset_hash)}"
    return out if (out / MANIFEST).exists() else None
