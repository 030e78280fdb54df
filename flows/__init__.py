"""Prefect flows: one per stage plus pipeline.py that chains them. No business logic here: each flow calls
the stage packages' plain functions and records the stage in MLflow."""
