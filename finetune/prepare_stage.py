"""The prepare stage under the stage contract (workspace/stage.py): data/raw sources -> data/processed/<hash>/,
recorded as an MLflow stage run with the dataset as inputs, and a summary table in the terminal.

The cache key is the processed folder's own name: the content hash of the sources, the data config, the
tokenizer and this stage's code (finetune/prepare.py). Wired by flows/prepare.py and flows/pipeline.py.
"""
from __future__ import annotations

from typing import Optional

from rich.console import Console
from rich.table import Table

from finetune.prepare import (PrepareError, PreparedDataset, inputs_key, log_to_mlflow, prepare_dataset,
                              tokenizer_fingerprint, tokenizer_path)
from workspace.config.load import LoadedConfig
from workspace.model_ref import ModelNotFound
from workspace.stage import Stage, StageData
from workspace.tracking import stage_run


class PrepareInputs(StageData):
    force: bool = False  # redo the work even when the processed folder exists (not part of the key)


class PrepareOutputs(StageData):
    path: str
    content_hash: str
    run_id: str
    skipped: bool
    splits: dict[str, str]
    rows: dict[str, int]
    rows_read: int
    rows_rejected: int


def summary_table(result: PreparedDataset) -> Table:
    s = result.stats
    table = Table(title=f"prepare: {result.path}" + ("  (cache hit: inputs unchanged)" if result.skipped else ""))
    table.add_column("item")
    table.add_column("value", justify="right")
    for src in s.get("by_source", []):  # every source is accounted for: none can vanish without a line here
        reasons = ", ".join(f"{r} {n}" for r, n in list(src["rejected_by_reason"].items())[:3])
        table.add_row(f"{src['file']} ({src['split']})",
                      f"read {src['rows_read']}, kept {src['kept']}, rejected {src['rejected']}"
                      + (f" ({reasons})" if reasons else "") + f", duplicates {src['duplicates']}")
    table.add_row("training rows read", str(s["rows_read"]))
    table.add_row("rejected (quarantine.jsonl)", f"{s['rows_rejected']} ({s['reject_ratio']:.1%})"
                  + (f"; test file {s['test_rows_rejected']} of {s['test_rows_read']}" if s.get("test_rows_read") else ""))
    for reason, n in s["rejected_by_reason"].items():
        table.add_row(f"  {reason}", str(n))
    table.add_row("duplicates exact / normalised", f"{s['duplicates_exact']} / {s['duplicates_normalized']}")
    table.add_row("PII masked", ", ".join(f"{k} {v}" for k, v in s["pii_masked"].items() if v) or "none")
    for name, n in s["splits"].items():
        tok = s["tokens"].get(name) or {}
        groups = (s.get("prompt_groups") or {}).get(name)
        table.add_row(f"{name} rows", f"{n}{f' in {groups} prompt groups' if groups is not None else ''}  (tokens p50 {tok.get('p50', '-')}, p99 {tok.get('p99', '-')}, max {tok.get('max', '-')})")
    if s.get("feedback"):
        fb = s["feedback"]
        table.add_row("harvested feedback", f"{', '.join(fb['harvests'])}: {fb['sft_rows']} supervised rows in train, "
                      f"{fb['preference_pairs']} preference pairs (pref_train.jsonl)")
    table.add_row("seconds", str(s["seconds"]))
    return table


class PrepareStage(Stage[PrepareInputs, PrepareOutputs]):
    name = "prepare"
    Inputs, Outputs = PrepareInputs, PrepareOutputs
    error = PrepareError
    deterministic = (PrepareError, ModelNotFound)

    def cache_key(self, loaded: LoadedConfig, inputs: PrepareInputs) -> str:
        return inputs_key(loaded, tokenizer_fingerprint(tokenizer_path(loaded)))

    def outputs_present(self, loaded: LoadedConfig, outputs: PrepareOutputs) -> bool:
        from pathlib import Path

        return (Path(outputs.path) / "stats.json").exists()

    def run(self, loaded: LoadedConfig, inputs: PrepareInputs, console: Optional[Console] = None) -> PrepareOutputs:
        import mlflow

        with stage_run(loaded, "prepare") as run:
            result = prepare_dataset(loaded, force=inputs.force)
            mlflow.set_tag("cache", "hit" if result.skipped else "miss")
            log_to_mlflow(result)
        (console or Console()).print(summary_table(result))
        return PrepareOutputs(path=str(result.path), content_hash=result.content_hash, run_id=run.info.run_id,
                              skipped=result.skipped, splits={k: str(v) for k, v in result.splits.items()},
                              rows=dict(result.stats["splits"]), rows_read=result.stats["rows_read"],
                              rows_rejected=result.stats["rows_rejected"])


PREPARE = PrepareStage()

