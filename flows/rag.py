"""Prefect flow for the RAG stage (`make rag`): index data/raw's corpus into Qdrant (incremental) and measure
retrieval for dense, sparse and hybrid search (rag/rag_stage.py); the hybrid hit@5 must reach
`gate.rag_min_hit_at_5`. `make ask Q="..."` retrieves and answers with the served model (`make serve`), citing
document ids, through the shared endpoint client (the API key from `serving.api_key_env`).

    .venv/bin/python -m llmops rag [--set rag.mode=dense]
    .venv/bin/python -m llmops rag --ask "해오름 지사는 어느 도시에 있습니까?" [--endpoint http://127.0.0.1:8000/v1]
"""
from __future__ import annotations

from prefect import flow

from flows._cli import run_flow_cli
from flows.runner import StageRunner
from flows.segments import rag_inputs
from rag.rag_stage import RAG, ask
from serving.serve import champion_endpoint, with_serve_key
from workspace.config import load_config
from workspace.locks import workspace_lock


@flow(name="rag")
def rag_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
             force: bool = False) -> dict:
    loaded = load_config(config, profile, overrides or [])
    with workspace_lock("rag"):
        out = StageRunner(loaded, force=force).run(RAG, rag_inputs(loaded))
        return out.model_dump() if out else {}


def ask_flow(config: str | None = None, profile: str | None = None, overrides: list[str] | None = None,
             ask_question: str = "", endpoint: str | None = None, model: str | None = None, **_) -> None:
    loaded = load_config(config, profile, overrides or [])
    if endpoint is None:  # make serve's endpoint: its key (the workspace's own when none is configured)
        loaded = with_serve_key(loaded, config, profile, overrides)
    res = ask(loaded, ask_question, champion_endpoint(loaded, endpoint, model),
              sampling=loaded.config.serving.decoding.request_defaults())  # as a request through the gateway
    print(res["answer"])
    print(f"\nsources: {', '.join(res['sources'])}   citations: {res['citations']}")


def _options(ap) -> None:
    ap.add_argument("--ask", dest="ask_question", default=None, help="a question to answer from the corpus with the served model")
    ap.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (default: the serving config)")
    ap.add_argument("--model", default=None, help="model name at the endpoint (default: serving.served_model_name)")


def main(argv: list[str] | None = None) -> int:
    def dispatch(ask_question: str | None = None, endpoint=None, model=None, **kw):
        if ask_question:
            return ask_flow(ask_question=ask_question, endpoint=endpoint, model=model, **kw)
        return rag_flow(**kw)

    return run_flow_cli(__doc__, dispatch, _options, argv)

