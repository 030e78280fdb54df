"""The stage contract: one shape for every stage of the pipeline, so a reader learns it once.

A stage is an object with a `name`, typed `Inputs` and `Outputs` (frozen pydantic models, JSON-serialisable so
a cached result can be stored and read back), its own `error` class, and:
  - `cache_key(loaded, inputs) -> str`: only what changes the result; cheap (never reads a model's weights whole);
  - `run(loaded, inputs) -> Outputs`: the work, with its MLflow stage run;
  - `outputs_present(loaded, outputs) -> bool`: is a cached result still usable (its files, the registry alias);
  - `skip_reason(loaded, inputs) -> str | None`: why the configuration (its own section, or an input the flow
    fills from another's) turns the stage off, if it does.
Stages live in the stage packages (`finetune/prepare_stage.py`, `finetune/finetune_stage.py`, `rag/rag_stage.py`,
`eval/evaluate_stage.py`, `eval/gate_stage.py`, `serving/slo_stage.py`, `serving/promote_stage.py`,
`serving/serve_check_stage.py`); flows/ wires them (order, Prefect tasks, retries, the MLflow parent run, the
summary) and computes no key of its own.
"""
from __future__ import annotations

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar, Generic, Optional, TypeVar

from pydantic import BaseModel, ConfigDict

from workspace.config import LoadedConfig


class StageData(BaseModel):
    """Base of every stage's Inputs and Outputs: unknown fields are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=False)


I = TypeVar("I", bound=StageData)
O = TypeVar("O", bound=StageData)


class Stage(ABC, Generic[I, O]):
    name: ClassVar[str]
    Inputs: ClassVar[type[StageData]]
    Outputs: ClassVar[type[StageData]]
    error: ClassVar[type[Exception]] = RuntimeError
    # errors that a second attempt cannot fix (bad config, a refusal, a missing file): never retried
    deterministic: ClassVar[tuple[type[Exception], ...]] = ()

    @abstractmethod
    def cache_key(self, loaded: LoadedConfig, inputs: I) -> str:
        """Only what changes the result; cheap."""

    @abstractmethod
    def run(self, loaded: LoadedConfig, inputs: I) -> O:
        """The work, with its MLflow stage run."""

    def outputs_present(self, loaded: LoadedConfig, outputs: O) -> bool:
        return True

    def skip_reason(self, loaded: LoadedConfig, inputs: I) -> Optional[str]:
        return None


def digest(*parts: Any) -> str:
    """A short stable hash of JSON-able parts (dicts are key-sorted)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_digest(path: Path) -> str:
    """sha256 of a file, or of every file under a folder (names and contents); 'missing' when absent."""
    if not path.exists():
        return "missing"
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for f in files:
        h.update(str(f.relative_to(path) if path.is_dir() else f.name).encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]
