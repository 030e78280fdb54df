"""Prefect flows: the table of contents of the workspace. pipeline.py runs every stage in order (segments.py: the
parts other flows share); one module per make target (prepare, finetune, evaluate, promote, rag, serve) runs a
segment of it; runner.py turns a stage (workspace/stage.py) into a cached Prefect task; summary.py writes the
summary and the MLflow parent run; deploy.py runs them as Prefect deployments (the benchmarks live in
benchmarks/). No business logic and no cache key is computed here: the stages own both."""
