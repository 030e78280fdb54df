"""The workspace's one command line: `.venv/bin/python -m llmops <command> [options]`. Every make target runs it;
`python -m llmops` lists the commands, `python -m llmops <command> --help` shows a command's options.

Before the command's module is imported, it does what every command needs, once:
1. the guard (workspace/guard.py): the command re-runs under it, so nothing it starts (Prefect's temporary API
   server, a uvicorn or vLLM process) outlives it, even when it is killed with SIGKILL (LLMOPS_NO_GUARD=1: off).
   Not for `deploy`: `make prefect-up` starts a server and a worker meant to outlive it (stopped by their PIDs);
2. the offline and telemetry environment (workspace/offline.py), which Prefect, MLflow, DeepEval and transformers
   read when they are imported (the hub stays off unless the configuration's `hub.enabled` switches it on);
3. for the flows: a Prefect server started by `make prefect-up`, if one runs, so their runs show in its UI
   (otherwise Prefect starts a temporary local API for the run).
Then the rest of the command line goes to the command module's own `main(argv)`.

Written with argparse rather than click or typer: the dispatch is one table, and each command keeps its own
argparse parser (its --help, its errors), which a click or typer group would only pass the arguments through to.
"""
from __future__ import annotations

import importlib
import sys
from typing import NamedTuple, Optional


class Command(NamedTuple):
    module: str
    help: str
    flow: bool = False  # a Prefect flow: use `make prefect-up`'s server when one runs
    guard: bool = True  # False: the command starts servers meant to outlive it (stopped later by their recorded PIDs)


COMMANDS: dict[str, Command] = {
    # the job, stage by stage (Prefect flows)
    "pipeline": Command("flows.pipeline", "the whole job: prepare -> finetune -> rag -> evaluate -> gate -> promote -> "
                                          "serve check (make pipeline)", flow=True),
    "prepare": Command("flows.prepare", "validate, clean, mask and split the data (make prepare)", flow=True),
    "finetune": Command("flows.finetune", "QLoRA/LoRA with LLaMA-Factory (make finetune, make finetune-worker)",
                        flow=True),
    "evaluate": Command("flows.evaluate", "KoBEST + the custom metrics, base vs candidate (make eval)", flow=True),
    "promote": Command("flows.promote", "gate, then register and move @champion; --gate-only, --version, --rollback, "
                                        "--card (make gate/promote/rollback/card)", flow=True),
    "rag": Command("flows.rag", "index the corpus in Qdrant and measure retrieval; --ask (make rag, make ask)",
                   flow=True),
    "leaderboard": Command("flows.leaderboard", "base + every registered version on identical items (make leaderboard)",
                           flow=True),
    "loop": Command("flows.loop", "harvest -> DPO from the champion -> evaluate -> gate -> @candidate (make loop)",
                    flow=True),
    "harvest": Command("flows.harvest", "export the gateway's ratings, corrections and votes (make harvest)"),
    # serving and the service
    "serve": Command("flows.serve", "serve the champion with vLLM until Ctrl-C (make serve)"),
    "gateway": Command("flows.gateway", "the OpenAI-compatible gateway; --token, --revoke (make gateway, make token)"),
    "monitoring": Command("flows.monitoring", "Prometheus configuration and rules on the KPIs (make monitoring)"),
    "deploy": Command("flows.deploy", "the local Prefect server, worker and deployments: up, down, status, run, "
                                      "server (make prefect-*)", guard=False),
    "ui": Command("workspace.ui", "the MLflow UI for the configured store (make ui)"),
    # setup and checks
    "plan": Command("flows.plan", "preflight a profile: configs, engine parsers, fit, hardware (make plan)"),
    "base-model": Command("finetune.base_model", "build models/base-tiny when missing (make base-model)"),
    "doctor": Command("workspace.doctor", "check the three environments and engines (make doctor)"),
    "gpu-kit": Command("workspace.gpu_kit", "the wheels the lent GPU machine lacks (make gpu-kit)"),
    "gpu-lock": Command("workspace.gpu_lock", "compile the CUDA locks (make lock)"),
    "inspect-items": Command("eval.inspect_items", "the worst items of an evaluation for one metric"),
}
BENCH_PACKAGE = "benchmarks"  # `llmops bench <name>`: benchmarks/<name>.py (make bench-*, calibrate-gate, ...)
BENCHMARKS = ("decoding", "eval", "finetune", "gate", "gateway", "gpu-smoke", "loop", "model-key", "pii", "pipeline",
              "plan", "prepare", "rag", "serve", "suite", "team-host")


def usage() -> str:
    width = max(len(n) for n in COMMANDS)
    lines = ["usage: python -m llmops <command> [options]     (python -m llmops <command> --help)", "", "commands:"]
    lines += [f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()]
    lines += ["", f"  {'bench':<{width}}  bench <name>: {', '.join(BENCHMARKS)} (make bench-*; each writes its "
                  "section of docs/BENCHMARKS.md)"]
    return "\n".join(lines)


def resolve(argv: list[str]) -> tuple[Command, list[str]]:
    """(the command, the arguments for its own parser); SystemExit(2) naming the choices for an unknown name."""
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        raise SystemExit(0 if argv else 2)
    name, rest = argv[0], argv[1:]
    if name == "bench":
        if not rest or rest[0] not in BENCHMARKS:
            got = f"unknown benchmark {rest[0]!r}" if rest else "no benchmark named"
            print(f"llmops bench: {got}; one of: {', '.join(BENCHMARKS)}", file=sys.stderr)
            raise SystemExit(2)
        return Command(f"{BENCH_PACKAGE}.{rest[0].replace('-', '_')}", "", flow=rest[0] == "pipeline"), rest[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, [*COMMANDS, "bench"], n=1)
        print(f"llmops: unknown command {name!r}{f' (did you mean {close[0]!r}?)' if close else ''}\n\n{usage()}",
              file=sys.stderr)
        raise SystemExit(2)
    return COMMANDS[name], rest


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command, rest = resolve(args)
    if command.guard:
        from workspace.processes import guard_this_process

        guard_this_process()  # re-runs this command line under the guard (once), before anything heavy is imported
    from workspace import offline

    offline.apply()
    if command.flow:
        from flows.deploy import use_local_server_if_up

        use_local_server_if_up()
    module = importlib.import_module(command.module)
    name = " ".join(args[: len(args) - len(rest)])
    sys.argv = [f"llmops {name}", *rest]  # what the command's parser calls itself in --help and errors
    return module.main(rest)
