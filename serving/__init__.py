"""Stage package: promotion and serving.

  slo_stage.py        the serving-SLO stage (contract): a brief load step on the candidate, rows for the gate
  promote_stage.py    the promote stage (contract): serving config, fit check, registry, @champion last
  serve_check_stage.py the serve-check stage (contract): the champion starts and answers
  registry.py  MLflow registry: promote, rollback, fetch by version, the gate's reference
  config.py    vLLM config rendering and the hardware fit check     serve.py  the champion's server (`make serve`)
  bench.py     the load benchmark (`vllm bench serve`) and the SLO rules
Imports workspace/ only; never another stage package.
"""
