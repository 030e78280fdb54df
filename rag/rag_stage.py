"""The RAG stage under the stage contract (workspace/stage.py): index the corpus into Qdrant (incremental: only
new or changed chunks are embedded), measure retrieval on the QA set for dense, sparse and hybrid search, refuse
when the hybrid hit@5 is below `gate.rag_min_hit_at_5`, and hand the evaluation stage what it needs to score RAG
answers: `qa_contexts.jsonl`, one row per QA question with the passages retrieved in `rag.mode` (top `rag.top_k`)
and the ready prompt. The evaluate stage reads that file; it never builds or opens an index of its own.

Wired by flows/rag.py (`make rag`, `make ask`), flows/evaluate.py and flows/pipeline.py.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from rag.answer import build_prompt
from rag.index import DenseEmbedder, RagError, SparseEncoder, build_and_open, retrieval_metrics, search
from workspace.config.load import LoadedConfig
from workspace.paths import resolve
from workspace.stage import Stage, StageData, digest, file_digest
from workspace.tracking import stage_run

RAG_VERSION = "2"  # bump when the index, the metrics or qa_contexts.jsonl change for the same inputs


class RagInputs(StageData):
    # from the flow: the gate's floor for the index (gate.rag_min_hit_at_5), enforced where the index is measured,
    # and the folder the stage writes under (<data.output_dir>/rag: one subfolder per cache key)
    min_hit_at_5: float
    out_root: str


class RagOutputs(StageData):
    collection: str
    metrics: dict[str, float]
    run_id: str
    documents: int
    chunks: int
    embedded: int
    qa_contexts: str  # JSONL: id, question, gold_answer, gold_docs, retrieved, contexts, messages


def retrieve_for_questions(client, collection: str, loaded: LoadedConfig, embedder, sparse) -> list[dict]:
    cfg = loaded.config.rag
    qa = [json.loads(line) for line in resolve(cfg.qa_set).read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = []
    for q in qa[: cfg.eval_questions]:
        hits = search(client, collection, q["question"], cfg.mode, cfg.top_k, embedder, sparse)
        rows.append({"id": q["id"], "question": q["question"], "gold_answer": q.get("answer", ""),
                     "gold_docs": q["doc_ids"], "retrieved": [h["doc_id"] for h in hits],
                     "contexts": [h["text"] for h in hits],
                     "messages": [{"role": "user", "content": build_prompt(q["question"], hits)}]})
    return rows


def metrics_table(stats, metrics: dict[str, float]) -> Table:
    t = Table(title=f"rag: {stats.collection} ({stats.documents} docs, {stats.chunks} chunks, {stats.embedded} embedded, "
                    f"{stats.deleted} removed, {stats.seconds} s)")
    for col in ("mode", "hit@1", "hit@3", "hit@5", "MRR", "p50 ms"):
        t.add_column(col, justify="right")
    for mode in ("dense", "sparse", "hybrid"):
        t.add_row(mode, *[f"{metrics[f'rag/{mode}/{k}']:.3f}" for k in ("hit_at_1", "hit_at_3", "hit_at_5", "mrr")],
                  f"{metrics[f'rag/{mode}/latency_p50_ms']:.0f}")
    return t


class RagStage(Stage[RagInputs, RagOutputs]):
    name = "rag"
    Inputs, Outputs = RagInputs, RagOutputs
    error = RagError
    deterministic = (RagError,)

    def skip_reason(self, loaded: LoadedConfig, inputs: RagInputs) -> Optional[str]:
        return None if loaded.config.rag.enabled else "rag.enabled is false"

    def cache_key(self, loaded: LoadedConfig, inputs: RagInputs) -> str:
        cfg = loaded.config.rag
        return digest(cfg.model_dump(mode="json"), file_digest(resolve(cfg.corpus)), file_digest(resolve(cfg.qa_set)),
                      inputs.min_hit_at_5, RAG_VERSION)

    def outputs_present(self, loaded: LoadedConfig, outputs: RagOutputs) -> bool:
        q = loaded.config.rag.qdrant
        index = q.location == "server" or (q.location == "local" and resolve(q.path).exists())
        return index and Path(outputs.qa_contexts).exists()

    def run(self, loaded: LoadedConfig, inputs: RagInputs, console: Optional[Console] = None) -> RagOutputs:
        import mlflow

        cfg = loaded.config.rag
        out = Path(inputs.out_root) / self.cache_key(loaded, inputs)
        out.mkdir(parents=True, exist_ok=True)
        embedder, sparse = DenseEmbedder(cfg.embedder), SparseEncoder()
        client, stats = build_and_open(cfg, embedder, sparse)
        try:
            with stage_run(loaded, "rag") as run:
                metrics, rows = retrieval_metrics(client, stats.collection, resolve(cfg.qa_set), embedder, sparse)
                contexts = retrieve_for_questions(client, stats.collection, loaded, embedder, sparse)
                mlflow.log_params({"rag.collection": stats.collection, "rag.embedder": cfg.embedder, "rag.mode": cfg.mode,
                                   "rag.chunk_size": cfg.chunk_size, "rag.chunk_overlap": cfg.chunk_overlap})
                mlflow.log_metrics({**stats.as_metrics(), **metrics})
                _write_jsonl(out / "retrieval.jsonl", rows)
                mlflow.log_artifact(str(out / "retrieval.jsonl"), "rag")
        finally:
            client.close()
        (console or Console()).print(metrics_table(stats, metrics))
        floor = inputs.min_hit_at_5
        if metrics["rag/hybrid/hit_at_5"] < floor:
            raise RagError(f"hybrid hit@5 {metrics['rag/hybrid/hit_at_5']:.3f} is below gate.rag_min_hit_at_5 {floor}")
        _write_jsonl(out / "qa_contexts.jsonl", contexts)  # written only for an index that passed its floor
        return RagOutputs(collection=stats.collection, metrics=metrics, run_id=run.info.run_id, documents=stats.documents,
                          chunks=stats.chunks, embedded=stats.embedded, qa_contexts=str(out / "qa_contexts.jsonl"))


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def ask(loaded: LoadedConfig, question: str, endpoint, sampling: dict) -> dict:
    """`make ask`: retrieve from the (incrementally updated) index and answer with the served model. `sampling`: what
    a request must carry to decode as served (serving.decoding's request defaults: the stop strings, which vLLM has
    no server default for, and the grammar), passed in by the flow."""
    from rag.answer import answer

    cfg = loaded.config
    embedder, sparse = DenseEmbedder(cfg.rag.embedder), SparseEncoder()
    client, stats = build_and_open(cfg.rag, embedder, sparse)
    try:
        hits = search(client, stats.collection, question, cfg.rag.mode, cfg.rag.top_k, embedder, sparse)
    finally:
        client.close()
    return answer(question, hits, endpoint, sampling=sampling)


RAG = RagStage()
