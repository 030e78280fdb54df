"""Answering with the served model: retrieve, build a prompt that cites document ids, call the OpenAI-compatible
endpoint, and check the citations by rule (every cited id was retrieved; at least one is cited).
Called by flows/rag.py (`make ask Q="..."`)."""
from __future__ import annotations

import re

import httpx

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


def answer(question: str, hits: list[dict], base_url: str, model: str, max_tokens: int = 200, api_key: str = "") -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": build_prompt(question, hits)}],
            "max_tokens": max_tokens, "temperature": 0.0}
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        r = httpx.post(f"{base_url.rstrip('/')}/chat/completions", json=body, headers=headers, timeout=120)
        r.raise_for_status()
    except httpx.HTTPError as exc:
        raise RuntimeError(f"the served model at {base_url} did not answer: {exc}. Is `make serve` running?") from exc
    text = r.json()["choices"][0]["message"]["content"]
    return {"answer": text, "sources": [h["doc_id"] for h in hits], "citations": citation_check(text, hits)}
