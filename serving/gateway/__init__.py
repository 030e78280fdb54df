"""The gateway in front of the served models (`make gateway`).

Inside: app.py (the FastAPI application: auth, limits, metrics, the proxy to the replicas), routes.py (the routers),
routing.py (aliases from the MLflow registry, canary, replicas), db.py (SQLAlchemy: tokens, usage, conversations,
feedback, arena), harvest.py (`make harvest`), migrations/ (Alembic), static/index.html (the chat page).

This package's namespace is its public API: what the rest of the workspace may use (the flows that administer
tokens, gate with arena votes, print canary evidence and harvest; the monitoring rules; the benchmarks). Its
modules are internal (the contract "Gateway internals ..." in pyproject.toml); the one exception is the gateway's
own command, flows/gateway.py, which builds the app. Nothing here imports FastAPI.
"""
from serving.gateway.db import GatewayDb, GatewayDbError, database_url, parse_lifetime
from serving.gateway.harvest import Harvest, HarvestError, parse_since, since_of_version
from serving.gateway.harvest import harvest as harvest_feedback

# The gateway's latency histograms' buckets (seconds): the Prometheus rules (serving/monitoring.py) compute TTFT and
# latency quantiles from them, so both sides read this one tuple.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 1.5, 2.5, 5, 10, 30, 60, 120, 300)

__all__ = ["GatewayDb", "GatewayDbError", "Harvest", "HarvestError", "LATENCY_BUCKETS", "database_url",
           "harvest_feedback", "parse_lifetime", "parse_since", "since_of_version"]
