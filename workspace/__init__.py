"""Shared plumbing, imported by every stage package and by flows/; imports no stage and no flow (checked by
import-linter in `make test`).

  stage.py      the stage contract every stage implements (Inputs, Outputs, cache_key, run, outputs_present)
  config.py     the strict configuration schema, profiles, --set overrides
  model_ref.py  one reference to a model (base + adapter) and its size-independent fingerprint
  endpoint.py   one OpenAI-compatible client (timeouts, retries, the API key from the configured variable)
  processes.py  one process manager for servers (start, health wait, log tail, stop by PID)
  vllm_server.py, vllm_launcher.py   a vLLM server in the serve environment
  envrunner.py  one-shot commands in the train/serve environments
  tracking.py   MLflow: the store, parent and stage runs, tags      locks.py  one writer per workspace
  offline.py    telemetry off, hub off unless configured, applied by entry points
  paths.py, setup_env.py, doctor.py, ui.py
"""
