"""Stage package: evaluation and the gate.

  evaluate_stage.py the evaluate stage (contract): base vs candidate, report, RAG answer quality
  gate_stage.py     the gate stage (contract): candidate vs reference, rules, decision files
  evaluate.py       one `evaluate(model)` for every model, cached        kobest.py  KoBEST through lm-eval
  generate.py, metrics.py, judge.py, rag_quality.py  custom generation, DeepEval metrics, the LLM judge
  gate.py           the rules and the paired bootstrap
Imports workspace/ only; never another stage package.
"""
from workspace import offline

# DeepEval reads DEEPEVAL_TELEMETRY_OPT_OUT when it is imported: switched off here, before any module of this package
# (judge.py, metrics.py, rag_quality.py import deepeval) can import it, also from a notebook or a test
offline.telemetry_off()
