"""The eval package's sections: eval (KoBEST, custom metrics, the judge), gate (rules, SLOs) and leaderboard."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field, model_validator

from workspace.config.base import Strict
from workspace.config.serving import SloConfig  # the gate folds the SLO step's rows into its decision


class MetricSpec(Strict):
    name: str
    threshold: float
    greater_is_better: bool = True


class JudgeConfig(Strict):
    base_url: str
    model: str
    api_key_env: Optional[str] = None  # the NAME of an environment variable; never the key itself
    rubric: str = "The answer is a well-formed screen XML containing every requested field with a Korean label."
    max_tokens: int = Field(512, ge=16)


class EvalConfig(Strict):
    kobest_tasks: list[Literal["kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]] = [
        "kobest_boolq", "kobest_copa", "kobest_wic", "kobest_hellaswag", "kobest_sentineg"]
    kobest_source: Literal["local", "hub"] = "local"
    kobest_dir: str = "data/raw/kobest"
    backend: Literal["hf", "vllm"] = "hf"  # in-process transformers, or the served vLLM endpoint (GPU profiles)
    device: Literal["cpu", "cuda"] = "cpu"  # the in-process (hf) scorer's device
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: float32 on CPU, bf16/fp16 on GPU
    num_fewshot: int = Field(0, ge=0)
    limit: Optional[int] = Field(None, ge=1)
    max_new_tokens: int = Field(320, ge=1)
    custom_limit: Optional[int] = Field(100, ge=1)  # test items generated for the custom metrics (None: all)
    custom_task_name: str = "screens"
    concurrency: int = Field(4, ge=1)  # requests in flight against a served endpoint
    custom_metrics: list[MetricSpec] = [
        MetricSpec(name="xml_valid", threshold=0.8),
        MetricSpec(name="xml_structure", threshold=0.6),
        MetricSpec(name="field_f1", threshold=0.0),
        MetricSpec(name="char_ngram_f1", threshold=0.0),
    ]
    judge: Optional[JudgeConfig] = None


class GateRule(Strict):
    name: str
    kind: Literal["floor", "no_regression", "improvement", "adapter_changes_outputs", "preference"]
    metric: Optional[str] = None
    threshold: Optional[float] = None
    tolerance: float = Field(0.0, ge=0)
    confidence: float = Field(0.95, gt=0, lt=1)
    # improvement: the lower confidence bound of mean(candidate - reference) must exceed this; the gain that
    # retraining with another seed does not produce by itself (make bench-gate measures it)
    min_effect: float = Field(0.0, ge=0)
    # preference: the candidate's arena win rate over the reference (ties count half) from the gateway's votes;
    # the lower bound of its Wilson interval must exceed `threshold` (0.5: people prefer it), on >= min_votes votes
    min_votes: int = Field(20, ge=1)

    @model_validator(mode="after")
    def _kind_fields(self):
        if self.kind == "preference" and self.threshold is not None and not 0 <= self.threshold < 1:
            raise ValueError(f"rule {self.name!r}: a preference threshold is a win rate in [0, 1), got {self.threshold}")
        return self


class GateConfig(Strict):
    rules: list[GateRule] = [
        # the same as configs/pipeline.yaml's gate section, where the values are explained (make bench-gate)
        GateRule(name="xml-valid-floor", kind="floor", metric="eval/custom/screens/xml_valid", threshold=0.8),
        GateRule(name="kobest-no-regression", kind="no_regression", metric="eval/kobest/*/acc", tolerance=0.25),
        GateRule(name="char-ngram-f1-improves", kind="improvement", metric="eval/custom/screens/char_ngram_f1",
                 confidence=0.95, min_effect=0.035),
        GateRule(name="adapter-changes-outputs", kind="adapter_changes_outputs"),
    ]
    bootstrap_samples: int = Field(2000, ge=100)
    # the statistical rules (improvement, no_regression) refuse to decide on fewer paired items than this
    min_items: int = Field(30, ge=1)
    # The metric a promotion must improve. A rule set without an `improvement` rule on it promotes noise (floors
    # alone pass a retrain with another seed), so it is refused at load unless floors_only says so on purpose; a
    # floors-only promotion is then recorded as such (registry tag gate_mode, model card, gate table) and never
    # replaces a champion that passed the statistical gate.
    target_metric: str = "eval/custom/screens/char_ngram_f1"
    floors_only: bool = False
    rag_min_hit_at_5: float = Field(0.9, ge=0, le=1)  # the RAG stage fails below this hybrid hit@5
    slo: SloConfig = SloConfig()

    @model_validator(mode="after")
    def _cannot_be_configured_away(self):
        if not self.rules:
            raise ValueError("gate.rules is empty: a gate with no rule passes every candidate. Keep the rules of "
                             "configs/pipeline.yaml (at least one; with gate.floors_only: true, floors alone)")
        names = [r.name for r in self.rules]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"gate.rules: rule name(s) {dup} used twice; give every rule its own name")
        if not self.floors_only and not self.statistical_rules():
            kinds = ", ".join(f"{r.name} ({r.kind})" for r in self.rules)
            raise ValueError(
                f"gate.rules has no statistical rule on the target metric {self.target_metric} (rules: {kinds}). "
                "Floors and non-regression alone promote a retrain that is only noise. Add "
                f"{{name: ..., kind: improvement, metric: {self.target_metric}, min_effect: ...}} (make "
                "calibrate-gate prints the line), or set gate.floors_only: true to promote on floors alone, "
                "recorded as floors-only in the registry and the model card")
        return self

    def statistical_rules(self) -> list[GateRule]:
        """The improvement rules on the target metric (a glob in a rule's metric counts when it matches it)."""
        import fnmatch

        return [r for r in self.rules if r.kind == "improvement" and r.metric
                and (r.metric == self.target_metric or fnmatch.fnmatchcase(self.target_metric, r.metric))]

    @property
    def mode(self) -> str:
        """'full' (a statistical rule on the target metric decides) or 'floors_only' (recorded on every promotion)."""
        return "full" if self.statistical_rules() else "floors_only"



class LeaderboardModel(Strict):
    """One more model on `make leaderboard`: a base model by local folder or hub id (optionally with an adapter)."""
    name: str
    path: Optional[str] = None
    hub_id: Optional[str] = None
    revision: Optional[str] = None
    adapter: Optional[str] = None

    @model_validator(mode="after")
    def _one_source(self):
        if bool(self.path) == bool(self.hub_id):
            raise ValueError(f"leaderboard model {self.name!r}: give exactly one of path (a local folder) or hub_id")
        return self


class LeaderboardConfig(Strict):
    """`make leaderboard`: the configured base model, `models`, and the registered versions, on identical items."""
    models: list[LeaderboardModel] = []
    registered: Literal["all", "aliases", "none"] = "all"  # every registered version, only aliased ones, or none
    confidence: float = Field(0.95, gt=0, lt=1)
    bootstrap_samples: int = Field(1000, ge=100)
