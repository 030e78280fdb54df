"""The benchmarks: one module per `make bench-*` target, each measuring a stage, a flow or the service on this
machine and writing its section of docs/BENCHMARKS.md (report.py) with the command that reproduces it. The top
layer of the import contracts: a benchmark may use flows, stages and workspace; nothing imports a benchmark.

  prepare.py, finetune.py, eval.py, gate.py (also `make calibrate-gate`), rag.py, serve.py, gateway.py, loop.py,
  pipeline.py, plan.py (the GPU path's fit check and locks), pii.py, model_key.py, suite.py (`make bench-tests`)
"""
