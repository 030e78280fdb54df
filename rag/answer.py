"""Answering with the served model: build a prompt that cites document ids from the retrieved passages, call
the OpenAI-compatible endpoint (workspace.endpoint: timeouts, retries, the configured API key), and check the
citations by rule (every cited id was retrieved; at least one is cited).
Called by rag/rag_stage.py (`make ask Q="..."`; the prompts of the evaluation's RAG answers)."""
from __future__ import annotations

import re
from typing import Optional

from workspace.endpoint import Endpoint, EndpointError

PROMPT = """다음 문서를 근거로 질문에 답하세요. 답 끝에 근거 문서 id를 [doc-001] 형식으로 적으세요.

{context}

질문: {question}"""


def build_prompt(question: str, hits: list[dict]) -> str:
    context = "\n".join(f"[{h['doc_id']}] {h['title']}: {h['text']}" for h in hits)
    return PROMPT.format(context=context, question=question)


def citation_check(answer: str, hits: list[dict]) -> dict:
    cited = set(re.findall(r"\[([^\[\]]+)\]", answer))
    retrieved = {h["doc_id"] for h in hits}
    return {"cited": sorted(cited), "cites_something": bool(cited), "all_cited_retrieved": cited <= retrieved}


def answer(question: str, hits: list[dict], endpoint: Endpoint, max_tokens: int = 200,
           sampling: Optional[dict] = None) -> dict:
    try:
        text, _, _ = endpoint.chat([{"role": "user", "content": build_prompt(question, hits)}], max_tokens=max_tokens,
                                   sampling=sampling)
    except EndpointError as exc:
        raise EndpointError(f"the served model did not answer: {exc}. Is `make serve` running?") from exc
    return {"answer": text, "sources": [h["doc_id"] for h in hits], "citations": citation_check(text, hits)}
