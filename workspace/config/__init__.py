"""The configuration schema of configs/pipeline.yaml, profile overlays and `--set key=value` overrides.

One module per stage's sections (data, finetune, evaluation, serving, rag, loop; common: the workspace-wide
project, tracking and hub), the whole composed in pipeline.py, and loading in load.py. Strict: every model forbids
unknown keys and is frozen. `load_config()` is what flows and make targets call; its errors name the file (or the
--set flag), the key path, the bad value, what is allowed and the closest valid key.

A stage package imports its own section modules and `workspace.config.load` directly (an import-linter contract);
the flows, benchmarks and tests use this namespace.
"""
from workspace.config.common import HubConfig, ProjectConfig, TrackingConfig
from workspace.config.data import BaseModelBuild, BaseModelConfig, DataConfig, DataSource, FeedbackData
from workspace.config.evaluation import (EvalConfig, GateConfig, GateRule, JudgeConfig, LeaderboardConfig,
                                         LeaderboardModel, MetricSpec)
from workspace.config.finetune import FinetuneConfig
from workspace.config.load import (ConfigError, LoadedConfig, add_cli_args, config_hash, load_config, load_from_args,
                                   parse_override)
from workspace.config.loop import LoopConfig
from workspace.config.pipeline import PipelineConfig, adapter_mode
from workspace.config.rag import QdrantConfig, RagConfig
from workspace.config.serving import (OWN_CONSTRAINT, ArenaConfig, CanaryConfig, DecodingConfig, GatewayConfig,
                                      RouteRule, ServeBenchConfig, ServingConfig, SloConfig)

__all__ = ["ArenaConfig", "BaseModelBuild", "BaseModelConfig", "CanaryConfig", "ConfigError", "DataConfig", "DataSource",
           "DecodingConfig", "EvalConfig", "FeedbackData", "FinetuneConfig", "GateConfig", "GateRule", "GatewayConfig",
           "HubConfig", "JudgeConfig", "LeaderboardConfig", "LeaderboardModel", "LoadedConfig", "LoopConfig",
           "MetricSpec", "OWN_CONSTRAINT", "PipelineConfig", "ProjectConfig", "QdrantConfig", "RagConfig",
           "RouteRule", "ServeBenchConfig", "ServingConfig", "SloConfig", "TrackingConfig", "adapter_mode",
           "add_cli_args", "config_hash", "load_config", "load_from_args", "parse_override"]
