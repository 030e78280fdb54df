"""`make plan PROFILE=<name>`: a preflight that runs nothing expensive and says, per stage, whether the profile
will work on this machine, before hours of work.

    .venv/bin/python -m llmops plan --profile cuda_tiny [--no-hardware-check] [--profile another ...]

For each profile it writes under .cache/plan/<profile>/ and prints:
  - the resolved configuration (config.yaml, with its hash);
  - the rendered LLaMA-Factory training YAML and the DeepSpeed config it names, checked by LLaMA-Factory's own
    argument parser in the train env (finetune/lf_train.py --check-only: unknown keys, enum values, types);
  - the vLLM serving YAML, checked by vLLM's own `vllm serve` parser in the serve env;
  - the training fit arithmetic (finetune/fit.py) and the serving fit arithmetic (serving/config.py);
  - the hardware found (nvidia-smi: GPUs, memory, compute capability, driver, CUDA) against what the profile needs
    (CUDA, GPU count, bf16 support, the CUDA environments of `make setup GPU=1`);
  - what would be fetched from a hub (model ids, revisions, approximate sizes; KoBEST datasets) and whether the
    hub is enabled;
  - a verdict per stage. Exit 1 when any stage will not work, with the reason; 0 otherwise.
--no-hardware-check plans a profile for another machine (CI plans every GPU profile on a CPU box): the hardware
and environment rows are reported as skipped, everything else is checked. Several --profile flags share one
start of each engine's parser.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml
from rich.console import Console
from rich.table import Table

from finetune.fit import TrainFitError, train_fit, zero_stage
from finetune.train import FinetuneError, dump_rendered, render_llamafactory_config
from flows.champion import resolve_init_adapter
from serving.config import FitError, fit_report, model_spec, render_vllm_config, write_vllm_config
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config
from workspace.device import Hardware, cuda_settings, detect, serve_env_for, train_env
from workspace.envrunner import EnvCommandError, run_in_env
from workspace.model_spec import KNOWN_MODELS
from workspace.paths import CACHE, PROFILES, ROOT, VENVS, resolve

OK, FAIL, SKIP, WARN = "ok", "FAIL", "skipped", "warn"


@dataclass
class Check:
    stage: str
    what: str
    verdict: str
    detail: str


@dataclass
class Plan:
    profile: str
    folder: Path
    loaded: Optional[LoadedConfig] = None
    checks: list[Check] = field(default_factory=list)
    lf_yaml: Optional[Path] = None
    vllm_yaml: Optional[Path] = None

    def add(self, stage: str, what: str, verdict: str, detail: str) -> None:
        self.checks.append(Check(stage, what, verdict, detail))

    @property
    def ok(self) -> bool:
        return all(c.verdict != FAIL for c in self.checks)

    def verdicts(self) -> dict[str, str]:
        """Per stage: FAIL if any check failed, skipped if every check was skipped, else ok (warn if one warned)."""
        by_stage: dict[str, list[str]] = {}
        for c in self.checks:
            by_stage.setdefault(c.stage, []).append(c.verdict)
        return {stage: FAIL if FAIL in vs else SKIP if set(vs) == {SKIP} else WARN if WARN in vs else OK
                for stage, vs in by_stage.items()}


def _model(loaded: LoadedConfig) -> str:
    bm = loaded.config.base_model
    return bm.hub_id if bm.source == "hub" else str(resolve(bm.path))


def hub_fetches(loaded: LoadedConfig) -> list[str]:
    """What the profile would download from a hub (nothing on the embedded default)."""
    c = loaded.config
    out = []
    if c.base_model.source == "hub":
        spec = KNOWN_MODELS.get(c.base_model.hub_id or "")
        size = f", about {spec.params_b * 2:.0f} GB of 16-bit safetensors" if spec else ", size unknown offline"
        out.append(f"model {c.base_model.hub_id} @ {c.base_model.revision or 'main (unpinned: set base_model.revision)'}{size}")
    if c.eval.kobest_source == "hub":
        out.append(f"dataset skt/kobest_v1 ({', '.join(t.removeprefix('kobest_') for t in c.eval.kobest_tasks)}), a few MB")
    return out


def plan_static(profile: str, config: Optional[str], overrides: list[str], hardware: Optional[Hardware]) -> Plan:
    """Everything but the engines' parsers (run batched afterwards)."""
    folder = CACHE / "plan" / profile
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    plan = Plan(profile, folder)
    try:
        loaded = load_config(config, profile, overrides)
    except ConfigError as exc:
        plan.add("config", "load and validate", FAIL, str(exc))
        return plan
    if loaded.config.finetune.init_adapter == "champion":  # the adapter a run would start from, fetched as the flows do
        try:
            loaded = resolve_init_adapter(loaded)
        except Exception as exc:  # noqa: BLE001 - no champion, registry down: one FAIL row, the rest still planned
            plan.add("finetune", "init adapter", FAIL, str(exc))
    plan.loaded = loaded
    c = loaded.config
    (folder / "config.yaml").write_text(f"# profile {profile}, config hash {loaded.hash}\n" +
                                        yaml.safe_dump(c.model_dump(mode="json"), allow_unicode=True, sort_keys=False))
    plan.add("config", "load and validate", OK, f"hash {loaded.hash[:12]} -> {folder.relative_to(ROOT) if folder.is_relative_to(ROOT) else folder}/config.yaml")

    # ---- prepare: the sources exist
    missing = [s.path for s in c.data.sources if not resolve(s.path).exists()]
    plan.add("prepare", "data sources", FAIL if missing else OK,
             f"missing: {', '.join(missing)}" if missing else f"{len(c.data.sources)} source(s) present")

    # ---- hub
    fetches = hub_fetches(loaded)
    if fetches and not c.hub.enabled:
        plan.add("hub", "downloads", FAIL, "needs the hub but hub.enabled is false: " + "; ".join(fetches))
    else:
        plan.add("hub", "downloads", OK, "; ".join(fetches) if fetches else "nothing (offline)")
    if c.base_model.source == "build" and not (resolve(c.base_model.path) / "config.json").exists():
        plan.add("finetune", "base model", FAIL, f"{c.base_model.path} is not built: run `make base-model`")

    # ---- finetune: rendered YAML + DeepSpeed + fit
    try:
        rendered = render_llamafactory_config(loaded, resolve(c.data.output_dir) / "<content hash>",
                                              resolve(c.finetune.output_dir) / f"{c.project.name}-<run key>")
        plan.lf_yaml = folder / "llamafactory_train.yaml"
        plan.lf_yaml.write_text(dump_rendered(rendered, f"llamafactory-cli train {plan.lf_yaml.name}"), encoding="utf-8")
        if c.finetune.deepspeed:
            shutil.copy(resolve(c.finetune.deepspeed), folder / "deepspeed.json")
            plan.add("finetune", "DeepSpeed", OK, f"{c.finetune.deepspeed}: ZeRO-{zero_stage(loaded)}, "
                     f"{c.finetune.num_gpus} GPU(s) x {c.finetune.nnodes} node(s) (torchrun)")
    except (FinetuneError, TrainFitError, FileNotFoundError) as exc:
        plan.add("finetune", "render", FAIL, str(exc))
    try:
        gib = min((g.memory_gib for g in hardware.gpus), default=None) if hardware else None
        fit = train_fit(loaded, detected_gib=gib)
        if fit is None:
            plan.add("finetune", "fit", OK, "CPU training (RAM is not planned)")
        else:
            (folder / "train_fit.txt").write_text(fit.text() + "\n")
            plan.add("finetune", "fit", OK if fit.fits else FAIL,
                     f"{fit.need_gib:.1f} of {fit.budget_gib:.1f} GiB per GPU" +
                     ("" if fit.fits else f"; suggestion: {fit.suggestion}"))
    except (TrainFitError, FitError) as exc:
        plan.add("finetune", "fit", FAIL, str(exc))

    # ---- serving: rendered vLLM YAML + fit
    try:
        spec = model_spec(_model(loaded))
        report = fit_report(spec, c.serving)
        (folder / "serve_fit.txt").write_text(report.text() + "\n")
        plan.add("serve", "fit", OK if report.fits else FAIL, f"{report.need_per_gpu_gib:.2f} of "
                 f"{report.budget_per_gpu_gib:.2f} GiB" + ("" if report.fits else f"; suggestion: {report.suggestion}"))
    except FitError as exc:
        plan.add("serve", "fit", FAIL, str(exc))
    vcfg = render_vllm_config(c.serving, _model(loaded))
    plan.vllm_yaml = write_vllm_config(vcfg, folder / "vllm_serve.yaml", c.serving.api_key_env)
    plan.add("evaluate", "scorer", OK, f"backend {c.eval.backend}" + (
        f" (served by {c.serving.engine})" if c.eval.backend == "vllm" else f" on {c.eval.device}, dtype {c.eval.dtype}"))

    # ---- hardware and environments
    if hardware is None:
        plan.add("hardware", "GPUs", SKIP, "--no-hardware-check")
        return plan
    need = cuda_settings(loaded)
    plan.add("hardware", "found", OK, hardware.describe())
    if need and not hardware.has_cuda:
        stage_of = {"finetune": "finetune", "eval": "evaluate", "serving": "serve"}
        for key, value in need:
            plan.add(stage_of[key.split(".")[0]], "CUDA", FAIL, f"{key}: {value} needs CUDA, but this machine has "
                     f"{hardware.describe()}; run on a GPU machine or use PROFILE=cpu_tiny")
    elif need:
        want = max(c.finetune.num_gpus if c.finetune.device == "cuda" else 0,
                   c.serving.tensor_parallel_size * c.serving.pipeline_parallel_size if c.serving.engine == "vllm" else 0)
        plan.add("hardware", "GPU count", OK if want <= len(hardware.gpus) else FAIL,
                 f"needs {want}, has {len(hardware.gpus)}")
        if c.finetune.device == "cuda" and c.finetune.bf16 and not all(g.has_bf16 for g in hardware.gpus):
            plan.add("finetune", "bf16", FAIL, "finetune.bf16 is true but a GPU here has no bf16 (compute capability "
                     "< 8.0, e.g. Turing): set finetune.bf16=false (fp16)")
        if c.serving.engine == "vllm" and c.serving.dtype == "bfloat16" and not all(g.has_bf16 for g in hardware.gpus):
            plan.add("serve", "dtype", FAIL, "serving.dtype is bfloat16 but a GPU here has no bf16: use float16")
    for stage, env in (("finetune", train_env(loaded)), ("serve", serve_env_for(c.serving.engine))):
        present = (VENVS[env] / ".setup-stamp").exists()
        plan.add(stage, "environment", OK if present else FAIL,
                 f"{VENVS[env].name}" + ("" if present else f" missing: run `make setup{' GPU=1' if env.endswith('-gpu') else ''}`"))
    return plan


def _parser_env(cuda_env: str, cpu_env: str, wants_cuda: bool) -> str:
    """The CUDA env's parser where `make setup GPU=1` built it (DeepSpeed included), else the CPU env's (the same
    LLaMA-Factory and vLLM releases, so the same parsers)."""
    return cuda_env if wants_cuda and (VENVS[cuda_env] / ".setup-stamp").exists() else cpu_env


def check_with_engines(plans: list[Plan], hardware_check: bool) -> None:
    """One LLaMA-Factory parser start and one vLLM parser start per environment for all plans (each import takes
    seconds). A GPU config is parsed with bf16/fp16 off unless it is checked in the CUDA env on a CUDA machine."""
    has_cuda = hardware_check and detect().has_cuda
    groups: dict[tuple[str, bool], list[Plan]] = {}
    for p in plans:
        if p.lf_yaml:
            cuda = p.loaded.config.finetune.device == "cuda"
            env = _parser_env("train-gpu", "train", cuda)
            other = not hardware_check or (cuda and not (has_cuda and env == "train-gpu"))
            groups.setdefault((env, other), []).append(p)
    for (env, other), group in groups.items():
        argv = ["python", "-m", "finetune.lf_train", *[str(p.lf_yaml) for p in group], "--check-only"]
        out = _run_parser(env, argv + (["--other-machine"] if other else []))
        for p in group:
            bad = [l for l in out if l.startswith("INVALID") and (str(p.lf_yaml) in l or len(group) == 1)]
            ok = any(l.startswith(f"VALID {p.lf_yaml}") for l in out)
            p.add("finetune", "LLaMA-Factory parser", OK if ok and not bad else FAIL,
                  (f"accepted ({VENVS[env].name})" if ok and not bad else ("; ".join(bad) or (out[-1] if out else "no output"))))
    vgroups: dict[str, list[Plan]] = {}
    for p in plans:
        if p.vllm_yaml:
            vgroups.setdefault(_parser_env("serve-gpu", "serve", p.loaded.config.serving.engine == "vllm"), []).append(p)
    for env, group in vgroups.items():
        out = _run_parser(env, ["python", "-m", "serving.validate_vllm_config", *[str(p.vllm_yaml) for p in group]])
        for p in group:
            line = next((l for l in out if l.startswith(f"VALID {p.vllm_yaml}")), None)
            err = next((l for l in out if str(p.vllm_yaml) in l and "error" in l.lower()), None)
            p.add("serve", "vLLM parser", OK if line else FAIL,
                  f"accepted ({VENVS[env].name})" if line else (err or "not reached (an earlier file failed)"))


def _run_parser(env: str, argv: list[str]) -> list[str]:
    # the CPU envs hold the same engine releases as the CUDA ones, so their parsers judge a GPU profile's files
    lines: list[str] = []
    try:
        run_in_env(env, argv, timeout=300, echo=False, on_line=lines.append, what=f"{env} env parser",
                   extra_env={"DISABLE_VERSION_CHECK": "1"})
    except EnvCommandError as exc:
        lines += [l for l in exc.tail if l not in lines]
    return [l.strip() for l in lines]


def render(plan: Plan, console: Console) -> None:
    table = Table(title=f"plan: {plan.profile}", show_lines=False)
    for col in ("stage", "check", "verdict", "detail"):
        table.add_column(col, overflow="fold")
    for c in plan.checks:
        style = {"FAIL": "red", "ok": "green", "warn": "yellow"}.get(c.verdict, "dim")
        table.add_row(c.stage, c.what, f"[{style}]{c.verdict}[/]", c.detail)
    console.print(table)
    for name in ("train_fit.txt", "serve_fit.txt"):
        if (plan.folder / name).exists():
            console.print((plan.folder / name).read_text().rstrip())
    v = plan.verdicts()
    console.print("verdict: " + ", ".join(f"{k} {'[red]' + s + '[/]' if s == FAIL else s}" for k, s in v.items()) +
                  f"  -> files in {plan.folder}")
    (plan.folder / "plan.json").write_text(json.dumps(
        {"profile": plan.profile, "ok": plan.ok, "verdicts": v,
         "checks": [c.__dict__ for c in plan.checks]}, indent=2, ensure_ascii=False))


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--no-hardware-check", action="store_true",
                    help="plan for another machine: skip the hardware and environment checks")
    ap.add_argument("--no-engine-check", action="store_true",
                    help="a quick look: skip LLaMA-Factory's and vLLM's parsers (about 15 s), check everything else")
    ap.add_argument("--profiles", default="", help="several profiles, comma-separated (one parser start for all)")
    ap.add_argument("--all-profiles", action="store_true", help="every profile under configs/profiles/")
    args = ap.parse_args(argv)
    if args.all_profiles:
        profiles = sorted(p.stem for p in PROFILES.glob("*.yaml"))
    elif args.profiles:
        profiles = [p.strip() for p in args.profiles.split(",") if p.strip()]
    else:
        try:
            profiles = [args.profile or load_config(args.config, None, []).profile]
        except ConfigError as exc:
            print(f"[error] {exc}", file=sys.stderr)
            return 2
    hardware = None if args.no_hardware_check else detect()
    console = Console(width=160)
    plans = [plan_static(p, args.config, list(args.overrides), hardware) for p in profiles]
    if args.no_engine_check:
        for p in plans:
            if p.loaded:
                p.add("finetune", "LLaMA-Factory parser", SKIP, "--no-engine-check")
                p.add("serve", "vLLM parser", SKIP, "--no-engine-check")
    else:
        check_with_engines([p for p in plans if p.loaded], hardware_check=not args.no_hardware_check)
    for p in plans:
        render(p, console)
    failed = [p.profile for p in plans if not p.ok]
    if failed:
        console.print(f"[red]plan: {', '.join(failed)} will not work as configured[/] (the FAIL rows say why)")
        return 1
    console.print(f"[green]plan: {', '.join(p.profile for p in plans)} ready[/]")
    return 0

