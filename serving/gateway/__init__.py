"""The gateway in front of the served models (`make gateway`): app.py (FastAPI: the OpenAI-compatible API, auth,
limits, usage, conversations, metrics, the chat page), routing.py (aliases from the MLflow registry, canary,
routing table, replicas), db.py (SQLAlchemy: tokens, usage, conversations), static/index.html (the chat page)."""
