"""The workspace's one command line, `.venv/bin/python -m llmops <command> [options]` (cli.py); every make target
runs it. Nothing here is imported by the workspace's packages: this is the top layer."""
