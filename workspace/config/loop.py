"""The loop section (flows/loop.py): what the feedback loop's run sets over the config."""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import Field

from workspace.config.base import Strict


class LoopConfig(Strict):
    """`make loop` (flows/loop.py): harvest -> prepare -> finetune -> evaluate -> gate -> register as `candidate`
    (the gateway's canary share answers with it); `make promote VERSION=n` makes it the champion."""
    stage: Literal["sft", "dpo"] = "dpo"  # finetune.stage for the loop's run
    from_champion: bool = True  # start from the champion's adapter (finetune.init_adapter: champion)
    # The loop's run continues a trained adapter on a few hundred rows or pairs: a small step, and DPO with the SFT
    # loss on the chosen answers. make bench-loop (101 harvested pairs, docs/BENCHMARKS.md, loop): at the SFT recipe's
    # lr 1e-3 x 100 steps DPO took well-formed XML from 1.00 to 0.00 while its reward accuracy read 1.00; at 5e-5 x 50
    # steps to 0.14; with pref_ftx 1 it stayed 1.00 and char_ngram_f1 rose +0.044 [+0.026, +0.061]. null keeps the
    # finetune.* value.
    learning_rate: Optional[float] = Field(5e-5, gt=0)
    max_steps: Optional[int] = Field(50, ge=1)
    pref_ftx: Optional[float] = Field(1.0, ge=0)
    since: Optional[str] = None  # harvest feedback from this ISO date; None: since the champion was registered
    min_items: int = Field(1, ge=1)  # fewer harvested rows + pairs and the loop stops after the harvest
    schedule: Optional[str] = "0 3 * * 1"  # the Prefect deployment's cron (Mondays 03:00); null: run by hand
