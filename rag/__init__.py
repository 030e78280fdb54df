"""Stage package: retrieval-augmented generation.

  rag_stage.py the rag stage (contract): incremental Qdrant index, retrieval metrics, the hit@5 floor, the
               question contexts the evaluation reads; `ask` for `make ask`
  index.py     chunking, dense + sparse embeddings, Qdrant, hybrid search      answer.py  prompts and citations
Imports workspace/ only; never another stage package.
"""
