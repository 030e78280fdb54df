"""The serve-check stage under the stage contract (workspace/stage.py): the champion the registry now names is
fetched by version, started with its promoted vLLM configuration on a free port, asked one question through the
shared endpoint client (with the configured API key), and stopped. Cached while the champion version, the serving
config and the prompt are unchanged. Wired by flows/pipeline.py, the pipeline's last stage.
"""
from __future__ import annotations

from typing import Optional

from rich.console import Console

from serving.registry import PromotionError, champion_info
from serving.serve import smoke_test
from workspace.config.load import LoadedConfig
from workspace.endpoint import EndpointError
from workspace.paths import CACHE
from workspace.stage import Stage, StageData, digest
from workspace.tracking import configure, stage_run
from workspace.vllm_server import ServerError

SERVE_CHECK_VERSION = "1"


class ServeCheckInputs(StageData):
    prompt: str


class ServeCheckOutputs(StageData):
    version: str
    model: str
    prompt: str
    answer: str
    latency_s: float
    completion_tokens: int
    served_at: str
    startup_s: float
    run_id: str


class ServeCheckStage(Stage[ServeCheckInputs, ServeCheckOutputs]):
    name = "serve"
    Inputs, Outputs = ServeCheckInputs, ServeCheckOutputs
    error = ServerError
    deterministic = (PromotionError, EndpointError)

    def cache_key(self, loaded: LoadedConfig, inputs: ServeCheckInputs) -> str:
        configure(loaded)
        champ = champion_info(loaded.config.tracking.registered_model)
        return digest(champ and (champ["version"], champ["run_id"]), loaded.config.serving.model_dump(mode="json", exclude={"bench"}),
                      inputs.prompt, SERVE_CHECK_VERSION)

    def run(self, loaded: LoadedConfig, inputs: ServeCheckInputs, console: Optional[Console] = None) -> ServeCheckOutputs:
        import mlflow

        with stage_run(loaded, "serve-check") as run:
            out = smoke_test(loaded, inputs.prompt, dest=CACHE / "pipeline-serve-check")
            mlflow.log_metrics({"serve/check_latency_s": out["latency_s"],
                                "serve/check_completion_tokens": out["completion_tokens"], "serve/startup_s": out["startup_s"]})
            mlflow.log_dict(out, "serve/check.json")
            mlflow.set_tag("champion_version", out["version"])
        (console or Console()).print(f"[serve] champion v{out['version']} answered {out['completion_tokens']} tokens in "
                                     f"{out['latency_s']:.2f} s at {out['served_at']}")
        return ServeCheckOutputs(**out, run_id=run.info.run_id)


SERVE_CHECK = ServeCheckStage()
