"""`make gpu-smoke`: the cuda_tiny path on one GPU in one command, with a report even when a step fails.

    bash benchmarks/gpu_smoke.sh OUT              # on the lent GPU machine: the envs from .gpu-kit/, then this:
    .venv/bin/python -m llmops bench gpu-smoke --out OUT [--device cuda|cpu] [--fit qwen2.5-7b,qwen2.5-14b]
    make gpu-smoke DEVICE=cpu OUT=/tmp/smoke      # the rehearsal here: every step that can run without CUDA

Each step is a child process with its own timeout and log (OUT/<step>.log); what a step hands the next is kept in
OUT/state.json. The stages run through their plain `Stage.run` functions (Prefect does not travel to the machine;
the report says so), on the profile `cuda_tiny` (`cpu_smoke` with DEVICE=cpu: QLoRA 4-bit on the CPU, 40 steps):

    base       build models/base-tiny (the self-built base; nothing is downloaded), on the card with DEVICE cuda
    prepare    the prepare stage
    finetune   the finetune stage: QLoRA 4-bit through LLaMA-Factory (the method check reads bnb Linear4bit layers)
    evaluate   the evaluate stage with the in-process scorer on the device (eval.backend=hf)
    gate       the gate stage against the base (floors-only on cpu_smoke, the full rules on cuda_tiny)
    promote    the promote stage into a file-backed MLflow registry (under --work)
    serve      the champion fetched back from the registry, one chat answer in-process on the device with the served
               decoding (the serve check proper needs vLLM, which cannot travel: its wheel alone is over 64 MiB)
    fit        the training fit check measured (benchmarks/gpu_fit.py) beside `make plan`'s estimate (CUDA only)
    agree      the same adapter scored on the CPU: KoBEST item by item, the custom metrics within TOLERANCE

Writes OUT/report.json and OUT/report.md.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

from workspace.paths import ROOT, VENVS

# The custom metrics may differ between the GPU (bf16) and the CPU (float32) by this much, absolute, as a mean over
# items. Greedy decoding picks the most likely token; bf16 keeps 8 bits of mantissa, so where two tokens are within
# about 0.4% of each other the GPU and the CPU may pick differently and the rest of that answer differs. Such near-ties
# are rare in a trained adapter's answers (they are mostly copied structure); we allow 1 item in 20 to flip, and a
# flipped answer still shares most character n-grams with the reference. KoBEST picks the most likely of fixed choices:
# the agree step scores it in float32 on both devices (eval.dtype=float32 there), so its answers must agree item by
# item; in bf16 a near-tie between two choices could flip, which is a property of bf16, not of the port.
TOLERANCE = {"xml_valid": 0.05, "char_ngram_f1": 0.03}
FIT_PROFILES = {"qwen2.5-7b": "l4x1_qwen7b_qlora", "qwen2.5-14b": "rtx3090x2_qwen14b_qlora"}


def profile_for(device: str) -> str:
    return "cuda_tiny" if device == "cuda" else "cpu_smoke"


def overrides(args, device: Optional[str] = None) -> list[str]:
    work = Path(args.work).resolve()
    return [f"tracking.uri=file://{work}/mlruns", f"tracking.artifact_root={work}/mlruns/artifacts",
            "eval.backend=hf", f"eval.device={device or args.device}", *args.overrides]


def loaded_for(args, device: Optional[str] = None, extra: Optional[list[str]] = None):
    from workspace.config import load_config

    return load_config(None, profile_for(args.device), overrides(args, device) + list(extra or []))


# --------------------------------------------------------------------------------------------------- the steps
def step_prepare(args, state):
    from finetune.prepare_stage import PREPARE, PrepareInputs

    return {"prepared": PREPARE.run(loaded_for(args), PrepareInputs()).model_dump()}


def step_finetune(args, state):
    from finetune.finetune_stage import FINETUNE, FinetuneInputs

    prepared = state["prepared"]
    out = FINETUNE.run(loaded_for(args), FinetuneInputs(dataset_dir=prepared["path"],
                                                        dataset_hash=prepared["content_hash"]))
    m = out.manifest
    return {"tuned": out.model_dump(), "method_check": m.get("method_check"), "verification": m.get("verification"),
            "train": {k: m.get(k) for k in ("global_step", "final_train_loss", "final_val_loss", "train_runtime_s",
                                            "tokens_per_s", "stage_wall_s")}}


def _test_file(state) -> str:
    return str(Path(state["prepared"]["path"]) / "test.jsonl")


def step_evaluate(args, state):
    from eval.evaluate_stage import EVALUATE, EvaluateInputs
    from flows.segments import as_served

    loaded = loaded_for(args)
    out = EVALUATE.run(loaded, EvaluateInputs(test_file=_test_file(state), adapter_dir=state["tuned"]["adapter_dir"],
                                              **as_served(loaded)))
    return {"evaluated": out.model_dump()}


def step_gate(args, state):
    from eval.gate import GateFailed
    from eval.gate_stage import GATE, GateInputs
    from flows.segments import as_served

    tuned = state["tuned"]
    try:
        loaded = loaded_for(args)
        out = GATE.run(loaded, GateInputs(adapter_dir=tuned["adapter_dir"], run_key=tuned["run_key"],
                                          verification=tuned["manifest"].get("verification") or {},
                                          test_file=_test_file(state), **as_served(loaded)))
    except GateFailed as exc:
        return {"gate": {"passed": False, "refusal": str(exc)}}
    return {"gate": out.model_dump()}


def step_promote(args, state):
    from serving.promote_stage import PROMOTE, PromoteInputs
    from workspace.envrunner import EnvMissingError, env_bin

    g = state["gate"]
    if not g.get("passed"):
        raise Skip("the gate refused the candidate: nothing to promote")
    parser = "vLLM's own argument parser (serve env)"
    try:
        env_bin("serve", "python")
    except EnvMissingError:  # the lent machine: vLLM cannot travel (its wheel alone is over the 64 MiB a call carries)
        import serving.promote_stage as promote_stage

        promote_stage.validate_with_vllm = lambda *paths: None
        parser = ("not run: no vLLM on this machine (it cannot travel); the CPU rehearsal runs it on the same "
                  "rendering code")
    out = PROMOTE.run(loaded_for(args), PromoteInputs(
        passed=True, adapter=g["adapter"], run_key=g["run_key"], gate_json=g["gate_json"], gate_md=g["gate_md"],
        report_md=g["report_md"], gate_run_id=g["run_id"], reference_version=g["reference_version"]))
    return {"promoted": {**out.model_dump(), "serving_config_parser": parser}}


def step_serve(args, state):
    from eval.generate import generate_hf
    from serving.registry import fetch_version
    from workspace.device import resolve_dtype
    from workspace.model_ref import base_model
    from workspace.tracking import configure

    if "promoted" not in state:
        raise Skip("nothing was promoted")
    loaded = loaded_for(args)
    configure(loaded)
    p = state["promoted"]
    bundle = fetch_version(p["registered_model"], p["version"], dest=Path(args.work) / "fetched")
    adapter = bundle / "adapter" if (bundle / "adapter").is_dir() else bundle
    row = json.loads(Path(_test_file(state)).read_text(encoding="utf-8").splitlines()[0])
    prompt = next(m["content"] for m in row["messages"] if m["role"] == "user")
    cfg = loaded.config.eval
    t = time.time()
    gens = generate_hf(base_model(loaded).base, str(adapter), [{"id": "serve", "messages": [
        {"role": "user", "content": prompt}]}], cfg.max_new_tokens, device=cfg.device,
        dtype=resolve_dtype(cfg.device, cfg.dtype), sampling=loaded.config.serving.decoding.non_default())
    text = gens.outputs[0]
    return {"serve": {"version": p["version"], "prompt": prompt, "answer": text[:400], "seconds": round(time.time() - t, 1),
                      "engine": "in-process transformers (vLLM cannot travel)"}}


def step_agree(args, state):
    """KoBEST in float32 on the device against the CPU, item by item; the custom metrics as served (the evaluate
    step's, bf16 on a GPU) against the CPU's float32, within TOLERANCE."""
    from eval.evaluate import evaluate
    from flows.segments import as_served
    from eval.gate import item_scores
    from workspace.device import resolve_dtype
    from workspace.model_ref import base_model

    adapter, test = state["tuned"]["adapter_dir"], Path(_test_file(state))

    def run(device: str, extra: list[str], suites: tuple[str, ...]):
        loaded = loaded_for(args, device, extra)
        return evaluate(loaded, base_model(loaded).with_adapter(f"smoke-{device}", adapter), suites, test_file=test,
                        **as_served(loaded))

    cpu = run("cpu", [], ("kobest", "custom"))
    dev32 = run(args.device, ["eval.dtype=float32"], ("kobest",))
    served = run(args.device, [], ("custom",))  # the evaluate step's generation settings: cached when it ran
    kobest = {}
    for metric in sorted(k for k in cpu.metrics if k.startswith("eval/kobest/") and k.endswith("/acc")):
        a, b = item_scores(dev32.items_path, metric), item_scores(cpu.items_path, metric)
        kobest[metric] = {"items": len(a), "differ": sum(a[i] != b.get(i) for i in a) + len(set(b) - set(a))}
    custom = {}
    for short, tol in TOLERANCE.items():
        key = f"eval/custom/screens/{short}"
        if key in cpu.metrics and key in served.metrics:
            diff = abs(served.metrics[key] - cpu.metrics[key])
            custom[key] = {"device": served.metrics[key], "cpu": cpu.metrics[key], "diff": round(diff, 4),
                           "tolerance": tol, "ok": diff <= tol}
    ok = bool(kobest) and all(v["differ"] == 0 for v in kobest.values()) and all(v["ok"] for v in custom.values())
    result = {"agree": {"kobest": kobest, "custom": custom, "ok": ok, "devices": [args.device, "cpu"],
                        "dtypes": {"kobest": "float32 on both", "custom": f"{resolve_dtype(args.device, 'auto')} "
                                   f"({args.device}, as served) vs float32 (cpu)"}}}
    if not ok:
        raise StepFailed("the device and the CPU disagree beyond the stated tolerance", result)
    return result


def _gpu_fit(args, *argv: str) -> tuple[Optional[dict], str]:
    """benchmarks.gpu_fit in the train environment: (its JSON line, or None; stderr's tail)."""
    proc = subprocess.run([str(train_python(args)), "-m", "benchmarks.gpu_fit", *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=args.fit_timeout)
    line = next((x for x in reversed(proc.stdout.splitlines()) if x.startswith("{")), None)
    return (json.loads(line) if proc.returncode == 0 and line else None), proc.stderr[-1500:]


def step_fit(args, state):
    from finetune.fit import train_fit
    from workspace.config import load_config
    from workspace.model_spec import model_spec

    rows = []
    for shape in [s for s in args.fit.split(",") if s]:
        loaded = load_config(None, FIT_PROFILES[shape])
        ft = loaded.config.finetune
        est = train_fit(loaded, model_spec(loaded.config.base_model.hub_id, ROOT), detected_gib=None)
        m, err = _gpu_fit(args, "--shape", shape, "--batch", str(ft.batch_size), "--cutoff", str(ft.cutoff_len),
                          "--rank", str(ft.lora_rank), "--steps", str(args.fit_steps),
                          *(["--checkpointing"] if ft.gradient_checkpointing else []), "--device", args.device)
        if m is None:
            rows.append({"shape": shape, "profile": FIT_PROFILES[shape], "error": err})
            continue
        need = est.need_gib if est else None
        m.update(profile=FIT_PROFILES[shape], estimate_gib=need,
                 estimate_off=round((need - m["peak_gib"]) / m["peak_gib"], 3) if need and m.get("peak_gib") else None,
                 arithmetic=est.arithmetic if est else None)
        rows.append(m)
    return {"fit": rows}


def step_fit_rehearsal(args, state):
    """The fit measurement's code on the CPU with a tiny shape (DEVICE=cpu): the same script, 4-bit on the CPU."""
    m, err = _gpu_fit(args, "--shape", "tiny", "--batch", "2", "--cutoff", "64", "--rank", "8", "--steps", "2",
                      "--checkpointing", "--device", "cpu")
    if m is None:
        raise StepFailed(f"benchmarks.gpu_fit failed: {err}", {})
    return {"fit": [m]}


def train_python(args) -> Path:
    return VENVS["train-gpu" if args.device == "cuda" else "train"] / "bin" / "python"


class Skip(Exception):
    pass


class StepFailed(Exception):
    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# what a step needs from earlier steps: skipped by name when one of them did not succeed
NEEDS = {"prepare": ["base"], "finetune": ["prepare"], "evaluate": ["finetune"], "gate": ["evaluate"],
         "promote": ["gate"], "serve": ["promote"], "agree": ["finetune"]}
# (name, timeout in seconds, function or module command); the base build is a command of its own
STEPS: list[tuple[str, int, Optional[Callable]]] = [
    ("base", 300, None), ("prepare", 120, step_prepare), ("finetune", 300, step_finetune),
    ("evaluate", 240, step_evaluate), ("gate", 180, step_gate), ("promote", 120, step_promote),
    ("serve", 120, step_serve), ("fit", 420, step_fit), ("agree", 300, step_agree),
]


def run_step(args, name: str) -> int:
    """In the child: one step, its result merged into OUT/state.json (written aside, then renamed)."""
    out = Path(args.out)
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    fn = dict((n, f) for n, _, f in STEPS)[name]
    if name == "fit" and args.device != "cuda":  # no card: the same measurement's code on a tiny shape, on the CPU
        fn = step_fit_rehearsal
    status, result, note = "ok", {}, ""
    try:
        result = fn(args, state)
    except Skip as exc:
        status, note = "skipped", str(exc)
    except StepFailed as exc:
        status, note, result = "failed", str(exc), exc.result
    except Exception as exc:  # noqa: BLE001 - the report names it; the traceback goes to the step's log
        traceback.print_exc()
        status, note = "failed", f"{type(exc).__name__}: {exc}"[:1000]
    state.update(result)
    state.setdefault("steps", {})[name] = {"status": status, "note": note}
    tmp = state_path.with_suffix(".part")
    tmp.write_text(json.dumps(state, indent=2, default=str))
    tmp.replace(state_path)
    return 0 if status != "failed" else 1


def machine_facts(args) -> dict:
    facts = {"device": args.device, "python": sys.version.split()[0], "path": "plain Stage.run functions (no Prefect)"}
    try:
        import torch

        facts["torch"] = torch.__version__
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            facts.update(card=p.name, card_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
    except Exception as exc:  # noqa: BLE001 - the report says what it could not read
        facts["torch"] = f"unavailable: {exc}"
    import importlib.util

    facts["prefect"] = ("importable (not used: the smoke runs the same stages on every machine)"
                        if importlib.util.find_spec("prefect") else "not present (did not travel)")
    return facts


def run_bounded(cmd: list[str], env: dict, log, timeout: int) -> tuple[Optional[int], bool]:
    """The step in a process group of its own: at its timeout the whole group (LLaMA-Factory's trainer included) is
    stopped, SIGTERM then SIGKILL, so the next step starts on a free machine."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=timeout), False
    except subprocess.TimeoutExpired:
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        return None, True


def orchestrate(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "state.json").unlink(missing_ok=True)
    work = Path(args.work)
    for old in (work / "mlruns", work / "fetched"):  # the smoke's registry is its own, new on every run
        shutil.rmtree(old, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    # MLFLOW_ALLOW_FILE_STORE: the smoke's registry is a folder (MLflow's file store, in maintenance mode but
    # working), because the SQLite store's SQLAlchemy and Alembic would not fit in what travels
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1", "MLFLOW_ALLOW_FILE_STORE": "true"}
    rows = []
    only = set(args.steps.split(",")) if args.steps else None
    done: set[str] = set()
    facts = machine_facts(args)
    t_start = time.time()
    for name, timeout, _ in STEPS:
        if only and name not in only:
            continue
        missing = [n for n in NEEDS.get(name, []) if n not in done and (not only or n in only)]
        left = args.budget_s - (time.time() - t_start)
        if missing or left < 30:
            why = (f"needs {', '.join(missing)}, which did not succeed" if missing else
                   f"the run's budget (--budget-s {args.budget_s}) is spent")
            rows.append({"step": name, "status": "skipped", "seconds": 0.0, "note": why})
            print(f"[gpu-smoke] {name}: skipped ({why})", flush=True)
            write_report(args, out, facts, rows)
            continue
        if name == "base":  # on the card when there is one (seconds, not minutes); the CPU build if that fails
            build = [sys.executable, "-m", "llmops", "base-model", "--profile", profile_for(args.device),
                     *[a for o in args.overrides for a in ("--set", o)]]
            cmd = ["bash", "-c", '"$@" --device cuda || { echo "[gpu-smoke] the build on cuda failed: on the CPU";'
                   ' "$@"; }', "base", *build] if args.device == "cuda" else build
        else:
            cmd = [sys.executable, "-m", "llmops", "bench", "gpu-smoke", "--step", name, *_child_args(args)]
        t = time.time()
        timeout = int(min(timeout, left))
        print(f"[gpu-smoke] {name} ...", flush=True)
        with open(out / f"{name}.log", "w") as log:
            rc, timed_out = run_bounded(cmd, env, log, timeout)
        seconds = round(time.time() - t, 1)
        state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
        rec = state.get("steps", {}).get(name, {})
        status = ("timed out" if timed_out else rec.get("status") or ("ok" if rc == 0 else "failed"))
        if rc not in (0, None) and status == "ok":
            status = "failed"
        note = rec.get("note", "")
        if status == "failed" and not note:
            note = " ".join((out / f"{name}.log").read_text(errors="replace").strip().splitlines()[-3:])[-400:]
        if timed_out:
            note = f"stopped after {timeout} s"
        rows.append({"step": name, "status": status, "seconds": seconds, "note": note})
        if status == "ok":
            done.add(name)
        print(f"[gpu-smoke] {name}: {status} ({seconds} s){' - ' + note if note else ''}", flush=True)
        write_report(args, out, facts, rows)  # after every step: a run stopped from outside still leaves its report
    write_report(args, out, facts, rows)
    print((out / "report.md").read_text())
    return 0 if all(r["status"] in ("ok", "skipped") for r in rows) else 1


def write_report(args, out: Path, facts: dict, rows: list[dict]) -> None:
    state = json.loads((out / "state.json").read_text()) if (out / "state.json").exists() else {}
    report = {"machine": facts, "profile": profile_for(args.device), "steps": rows,
              **{k: state.get(k) for k in ("method_check", "verification", "train", "gate", "promoted", "serve",
                                           "agree", "fit")}}
    report["evaluate"] = (state.get("evaluated") or {}).get("metrics")
    for name, text in (("report.json", json.dumps(report, indent=2, default=str)), ("report.md", markdown(report))):
        tmp = out / (name + ".part")
        tmp.write_text(text)
        tmp.replace(out / name)


def _child_args(args) -> list[str]:
    return ["--out", args.out, "--work", args.work, "--device", args.device, "--fit", args.fit,
            "--fit-steps", str(args.fit_steps), "--fit-timeout", str(args.fit_timeout),
            *[a for o in args.overrides for a in ("--set", o)]]


def markdown(r: dict) -> str:
    m = r["machine"]
    lines = [f"# gpu-smoke on {m.get('card', 'the CPU')} ({r['profile']})", "",
             f"device {m['device']}, Python {m['python']}, torch {m.get('torch')}, {m['path']}; Prefect: {m['prefect']}",
             "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {s['note'][:200]} |" for s in r["steps"]]
    mc = r.get("method_check") or {}
    if mc:
        lines += ["", f"Trained model's layers: method {mc.get('method')}, quantized layer type "
                      f"{mc.get('quantized_layer_type')}, verified {mc.get('verified')}, peak CUDA MB {mc.get('cuda_peak_mb')}"]
    tr = {k: v for k, v in (r.get("train") or {}).items() if v is not None}
    if tr:
        lines += ["", "Training: " + ", ".join(f"{k} {v}" for k, v in tr.items())]
    ev = r.get("evaluate") or {}
    for model, metrics in ev.items():
        keys = [k for k in metrics if k.endswith(("xml_valid", "char_ngram_f1")) or k.startswith("eval/kobest/")]
        lines += ["", f"{model}: " + ", ".join(f"{k} {metrics[k]:.3f}" for k in sorted(keys))]
    ag = r.get("agree") or {}
    if ag:
        lines += ["", f"## {ag['devices'][0]} vs cpu (same adapter)", "", "| metric | items / device | differ / cpu | ok |",
                  "|---|---|---|---|"]
        lines += [f"| {k} | {v['items']} | {v['differ']} | {v['differ'] == 0} |" for k, v in ag["kobest"].items()]
        lines += [f"| {k} | {v['device']:.4f} | {v['cpu']:.4f} (diff {v['diff']}, tolerance {v['tolerance']}) | "
                  f"{v['ok']} |" for k, v in ag["custom"].items()]
    pr, sv = r.get("promoted") or {}, r.get("serve") or {}
    if pr:
        lines += ["", f"Promoted: {pr.get('registered_model')} v{pr.get('version')}; the serving config's check by "
                      f"vLLM's parser: {pr.get('serving_config_parser')}"]
    if sv:
        lines += [f"Served (fetched back as v{sv.get('version')}, {sv.get('engine')}, {sv.get('seconds')} s): "
                  f"{sv.get('answer', '')[:160]!r}"]
    fit = r.get("fit") or []
    if fit:
        lines += ["", "## the fit check, measured", "",
                  "| shape | profile | batch x cutoff | rank | ckpt | peak GiB | estimate GiB | estimate off | tokens/s | MFU |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for f in fit:
            if "error" in f:
                lines.append(f"| {f['shape']} | {f.get('profile')} | error: {f['error'][-150:]} |||||||")
                continue
            lines.append(f"| {f['shape']} | {f.get('profile', '-')} | {f['batch']} x {f['cutoff']} | {f['rank']} | "
                         f"{f['checkpointing']} | {f.get('peak_gib', f.get('peak_rss_gib'))} | {f.get('estimate_gib')} | "
                         f"{f.get('estimate_off')} | {f['tokens_per_s']} | {f.get('mfu')} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="report, logs and state (what comes back from the machine)")
    ap.add_argument("--work", default="/tmp/gpu-smoke-work", help="the file-backed MLflow store and fetched bundles")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--steps", default="", help="comma-separated subset of " + ",".join(n for n, _, _ in STEPS))
    ap.add_argument("--budget-s", type=int, default=3600,
                    help="the whole run's seconds: a step starts only with 30 s left, and gets at most what is left "
                         "(on the lent GPU machine: 480, inside its 10-minute command limit)")
    ap.add_argument("--fit", default="qwen2.5-7b", help="shapes measured by the fit step: " + ",".join(FIT_PROFILES))
    ap.add_argument("--fit-steps", type=int, default=4)
    ap.add_argument("--fit-timeout", type=int, default=400)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="a config override for every stage (as make pipeline SET=...)")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.step:
        return run_step(args, args.step)
    return orchestrate(args)

