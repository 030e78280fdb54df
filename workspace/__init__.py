"""Shared plumbing of the workspace: paths, offline settings, configuration, MLflow tracking, env runner.

Imported by every stage package and by flows/; imports no stage package itself.
"""
