"""Prefect flow for the RAG stage (`make rag`): index data/raw's corpus into Qdrant (incremental: only new or
changed chunks are embedded) and measure retrieval on the shipped QA set for dense, sparse and hybrid search;
the hybrid hit@5 must reach `gate.rag_min_hit_at_5`. `make ask Q="..."` retrieves and answers with the served
model, citing document ids.

    .venv/bin/python -m flows.rag [--set rag.mode=dense]
    .venv/bin/python -m flows.rag --ask "해오름 지사는 어느 도시에 있습니까?" [--endpoint http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

import argparse
import json
import sys

from workspace import offline

offline.apply()

from prefect import flow  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from rag.answer import answer  # noqa: E402
from rag.index import DenseEmbedder, RagError, SparseEncoder, build_index, open_client, retrieval_metrics, search  # noqa: E402
from workspace.config import ConfigError, LoadedConfig, add_cli_args, load_config  # noqa: E402
from workspace.locks import LockBusy, workspace_lock  # noqa: E402
from workspace.paths import resolve  # noqa: E402
from workspace.tracking import stage_run  # noqa: E402


@flow(name="rag")
def rag_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("rag"):
        return run_rag(loaded)


def run_rag(loaded: LoadedConfig) -> dict:
    """Index (incremental) and measure retrieval per mode in a `rag` stage run; fails below the hit@5 floor."""
    import mlflow

    cfg = loaded.config.rag
    client = open_client(cfg)
    try:
        embedder, sparse = DenseEmbedder(cfg.embedder), SparseEncoder()
        with stage_run(loaded, "rag") as run:
            stats = build_index(client, cfg, embedder, sparse)
            metrics, rows = retrieval_metrics(client, stats.collection, resolve(cfg.qa_set), embedder, sparse)
            mlflow.log_params({"rag.collection": stats.collection, "rag.embedder": cfg.embedder, "rag.mode": cfg.mode,
                               "rag.chunk_size": cfg.chunk_size, "rag.chunk_overlap": cfg.chunk_overlap})
            mlflow.log_metrics({**stats.as_metrics(), **metrics})
            out = resolve(loaded.config.data.output_dir) / "rag"
            out.mkdir(parents=True, exist_ok=True)
            (out / "retrieval.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
            mlflow.log_artifact(str(out / "retrieval.jsonl"), "rag")
    finally:
        client.close()
    t = Table(title=f"rag: {stats.collection} ({stats.documents} docs, {stats.chunks} chunks, {stats.embedded} embedded, "
                    f"{stats.deleted} removed, {stats.seconds} s)")
    for col in ("mode", "hit@1", "hit@3", "hit@5", "MRR", "p50 ms"):
        t.add_column(col, justify="right")
    for mode in ("dense", "sparse", "hybrid"):
        t.add_row(mode, *[f"{metrics[f'rag/{mode}/{k}']:.3f}" for k in ("hit_at_1", "hit_at_3", "hit_at_5", "mrr")],
                  f"{metrics[f'rag/{mode}/latency_p50_ms']:.0f}")
    Console().print(t)
    floor = loaded.config.gate.rag_min_hit_at_5
    if metrics["rag/hybrid/hit_at_5"] < floor:
        raise RagError(f"hybrid hit@5 {metrics['rag/hybrid/hit_at_5']:.3f} is below gate.rag_min_hit_at_5 {floor}")
    return {"collection": stats.collection, "metrics": metrics, "run_id": run.info.run_id, "documents": stats.documents,
            "chunks": stats.chunks, "embedded": stats.embedded}


def ask(loaded, question: str, endpoint: str | None, model: str | None) -> dict:
    cfg = loaded.config
    client = open_client(cfg.rag)
    try:
        embedder, sparse = DenseEmbedder(cfg.rag.embedder), SparseEncoder()
        name = build_index(client, cfg.rag, embedder, sparse).collection
        hits = search(client, name, question, cfg.rag.mode, cfg.rag.top_k, embedder, sparse)
    finally:
        client.close()
    base_url = endpoint or f"http://{cfg.serving.host}:{cfg.serving.port}/v1"
    return answer(question, hits, base_url, model or cfg.serving.served_model_name)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--ask", default=None, help="a question to answer from the corpus with the served model")
    ap.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (default: the serving config)")
    ap.add_argument("--model", default=None, help="model name at the endpoint (default: serving.served_model_name)")
    args = ap.parse_args()
    try:
        if args.ask:
            res = ask(load_config(args.config, args.profile, args.overrides), args.ask, args.endpoint, args.model)
            print(res["answer"])
            print(f"\nsources: {', '.join(res['sources'])}   citations: {res['citations']}")
            return 0
        rag_flow(config=args.config, profile=args.profile, overrides=args.overrides)
    except (ConfigError, RagError, RuntimeError) as exc:  # LockBusy is a RuntimeError
        print(f"[error] {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
