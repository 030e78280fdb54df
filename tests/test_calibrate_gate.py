"""`make calibrate-gate` on a tiny run: two seeds of a 3-step recipe through the real stages (LLaMA-Factory, the
in-process scorer), the pooled seed SD with its interval, the independent pairs, and a config line that the
workspace's own config loader accepts with the printed min_effect. The statistics are checked on numbers too."""
from __future__ import annotations

import math
import re
import subprocess
import sys

import pytest
import yaml

from benchmarks.gate import min_effect_from_sd, pooled_sd, sd_interval
from workspace import offline
from workspace.config import load_config
from workspace.paths import ROOT


def test_pooled_sd_its_interval_and_min_effect():
    sd, df = pooled_sd([[0.60, 0.62, 0.64], [0.50, 0.52, 0.54]])  # the base builds' means differ: not seed noise
    assert df == 4 and sd == pytest.approx(0.02)
    lo, hi = sd_interval(sd, df)
    assert lo < sd < hi and hi / lo > 3  # with 4 degrees of freedom the SD is known only roughly
    assert min_effect_from_sd(0.012) == pytest.approx(0.030)  # 1.645·√2·0.012 = 0.0279, rounded up to 0.005
    assert min_effect_from_sd(0.0) == 0.0


@pytest.mark.slow
def test_calibrate_gate_prints_the_evidence_and_a_config_line(tmp_path):
    sets = [f"data.output_dir={tmp_path}/processed", f"finetune.output_dir={tmp_path}/adapters",
            f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "finetune.max_steps=3", "finetune.save_steps=3", "finetune.verify_prompts=2", "eval.limit=4",
            "eval.custom_limit=6", "eval.max_new_tokens=24", "eval.kobest_tasks=[kobest_boolq]"]
    argv = [sys.executable, "-m", "llmops", "bench", "gate", "--calibrate", "--seeds", "1,2",
            *[a for s in sets for a in ("--set", s)]]
    proc = subprocess.run(argv, cwd=ROOT, env=offline.subprocess_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "2 runs (2 seeds x 1 base builds)" in out and "Seed SD of `eval/custom/screens/char_ngram_f1`" in out
    assert re.search(r"\| 1234 \| 1 \| [0-9.]+ \| [0-9.]+ \| [0-9.]+ \|", out)  # one recipe row per seed
    assert "independent seed-only pairs" in out and "not held out" in out
    chosen = float(re.search(r"min_effect = .*?\*\*([0-9.]+)\*\*", out).group(1))
    line = out.strip().splitlines()[-1].strip()
    assert line.startswith("- {name: char-ngram-f1-improves, kind: improvement")
    rule = yaml.safe_load(line[2:])
    assert math.isclose(rule["min_effect"], chosen)
    rules = load_config().config.gate.model_dump(mode="json")["rules"]
    rules = [r if r["kind"] != "improvement" else rule for r in rules]
    loaded = load_config(overrides=[f"gate.rules={yaml.safe_dump(rules, default_flow_style=True).strip()}"])
    assert loaded.config.gate.statistical_rules()[0].min_effect == chosen
