"""Benchmark of the RAG stage: chunks embedded per second (default embedder, 2 cores), indexing time for the shipped
corpus and for a synthetic corpus of N chunks, and query latency p50/p95 per mode; retrieval quality of all three
modes on the shipped QA set.

    .venv/bin/python -m llmops bench rag [--synthetic-chunks 10000]      (make bench-rag)

Writes docs/BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from rag.index import DenseEmbedder, SparseEncoder, build_index, open_client, retrieval_metrics
from benchmarks.report import update_section
from workspace.config import load_config
from workspace.paths import DATA_RAW


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic-chunks", type=int, default=10_000)
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="bench-rag-"))
    try:
        cfg = load_config(overrides=["rag.qdrant.location=memory"]).config.rag
        dense, sparse = DenseEmbedder(cfg.embedder), SparseEncoder()
        client = open_client(cfg)
        shipped = build_index(client, cfg, dense, sparse)
        metrics, _ = retrieval_metrics(client, shipped.collection, DATA_RAW / "rag" / "qa.jsonl", dense, sparse)
        client.close()

        docs = [json.loads(l) for l in (DATA_RAW / "rag" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()]
        synth = work / "synthetic.jsonl"
        with open(synth, "w", encoding="utf-8") as fh:
            for i in range(args.synthetic_chunks):  # one chunk per document (the shipped documents are one chunk each)
                d = docs[i % len(docs)]
                fh.write(json.dumps({"id": f"s{i}", "title": f"{d['title']} ({i})", "text": f"{d['text']} 문서 번호 {i}."},
                                    ensure_ascii=False) + "\n")
        scfg = load_config(overrides=["rag.qdrant.location=memory", f"rag.corpus={synth}"]).config.rag
        sclient = open_client(scfg)
        t0 = time.perf_counter()
        big = build_index(sclient, scfg, dense, sparse)
        big_s = time.perf_counter() - t0
        sclient.close()
        rate = big.embedded / big_s
        lines = [
            f"Embedder `{cfg.embedder}` (512-dim, numpy), sparse BM25 over kiwipiepy morphemes, Qdrant {cfg.qdrant.location} "
            "mode (here: in-memory), chunk size 400 / overlap 50.", "",
            "| corpus | documents | chunks | index time | chunks/s (dense + sparse + upsert) |", "|---|---|---|---|---|",
            f"| shipped (data/raw/rag) | {shipped.documents} | {shipped.chunks} | {shipped.seconds:.1f} s | {shipped.chunks / max(shipped.seconds, 1e-9):.1f} |",
            f"| synthetic | {big.documents:,} | {big.chunks:,} | {big_s:.0f} s | {rate:.1f} |", "",
            "Retrieval on the shipped QA set (60 questions, document-level):", "",
            "| mode | hit@1 | hit@3 | hit@5 | MRR | recall@5 | query p50 | query p95 |", "|---|---|---|---|---|---|---|---|"]
        for mode in ("dense", "sparse", "hybrid"):
            m = {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith(f"rag/{mode}/")}
            lines.append(f"| {mode} | {m['hit_at_1']:.3f} | {m['hit_at_3']:.3f} | {m['hit_at_5']:.3f} | {m['mrr']:.3f} | "
                         f"{m['recall_at_5']:.3f} | {m['latency_p50_ms']:.0f} ms | {m['latency_p95_ms']:.0f} ms |")
        body = "\n".join(lines)
        print(body)
        if not args.no_write:
            update_section("rag", "RAG: indexing speed and retrieval quality",
                           f"make bench-rag  (python -m llmops bench rag --synthetic-chunks {args.synthetic_chunks})", body)
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)

