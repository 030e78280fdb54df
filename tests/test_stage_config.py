"""Which config sections each stage package reads (issue 27: a stage owns its section and gets what it needs from
another stage as an explicit input). Read from the source: an attribute `<...>.config.<section>` or
`cfg.<section>` in finetune/, eval/, serving/ and rag/.

Every read of another stage's section is listed below with the reason it is still there; a new one fails this
test, and so does an entry that no longer happens (the list shrinks with the code, it cannot go stale). The
workspace-wide sections (profile, project, tracking, hub) are everyone's. Which section *models* a stage package may
import (workspace/config/<its sections>.py) is import-linter's part (pyproject.toml, the four config contracts).
"""
from __future__ import annotations

import ast
from workspace.config import PipelineConfig
from workspace.paths import ROOT

OWN = {"finetune": {"base_model", "data", "finetune"}, "eval": {"eval", "gate", "leaderboard"},
       "serving": {"serving"}, "rag": {"rag"}}
SHARED = {"profile", "project", "tracking", "hub"}
SECTIONS = set(PipelineConfig.model_fields)

# (module, section): why it still reads it. None is left: the reads this list held (ten when it was written) are
# explicit inputs now, filled by flows/ (flows/segments.py: as_served, rag_inputs, the SLO step's inputs; the
# harvest's out_root; monitoring's slo). A new one must be made an input, or declared here with its reason.
DECLARED: dict[tuple[str, str], str] = {}


def _reads(source: str):
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in SECTIONS:
            v = node.value
            if (isinstance(v, ast.Attribute) and v.attr == "config") or (isinstance(v, ast.Name) and v.id == "cfg"):
                yield node.attr, node.lineno


def cross_reads() -> dict[tuple[str, str], list[int]]:
    out: dict[tuple[str, str], list[int]] = {}
    for pkg, own in OWN.items():
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for section, line in _reads(f.read_text(encoding="utf-8")):
                if section not in own | SHARED:
                    out.setdefault((str(f.relative_to(ROOT)), section), []).append(line)
    return out


def test_the_reader_sees_a_cross_read():
    planted = "def f(loaded, cfg):\n    return loaded.config.finetune.lora_rank, cfg.rag.corpus, cfg.x.rag\n"
    assert sorted(s for s, _ in _reads(planted)) == ["finetune", "rag"]


def test_stages_read_only_their_own_sections_and_the_declared_inputs():
    found = cross_reads()
    new = {k: v for k, v in found.items() if k not in DECLARED}
    assert not new, ("a stage reads another stage's config section: pass what it needs as an explicit input "
                     "(the stage's Inputs, or an argument the flow fills), or declare it here with the reason: "
                     + "; ".join(f"{m}:{lines} reads {s}" for (m, s), lines in sorted(new.items())))
    gone = sorted(set(DECLARED) - set(found))
    assert not gone, f"declared but no longer read (drop them from DECLARED): {gone}"


def test_no_stage_names_the_whole_config_model():
    for pkg in OWN:
        for f in (ROOT / pkg).rglob("*.py"):
            assert "PipelineConfig" not in f.read_text(encoding="utf-8"), f"{f.relative_to(ROOT)} names PipelineConfig"
