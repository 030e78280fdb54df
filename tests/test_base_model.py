"""The embedded base model: it loads with the Auto classes in all three environments, applies its chat
template and generates; it is really pretrained (held-out perplexity far below the untrained architecture);
its build is deterministic for a seed."""
from __future__ import annotations

import hashlib
import json

import pytest

from finetune.base_model import CARD, build_base_model
from workspace.config import BaseModelBuild, load_config
from workspace.envrunner import run_in_env
from workspace.paths import resolve

MODEL = resolve(load_config().config.base_model.path)


@pytest.fixture(scope="module")
def card():
    if not (MODEL / CARD).exists():
        pytest.fail(f"{MODEL} is not built: run `make base-model` (make test runs setup, which builds it)")
    return json.loads((MODEL / CARD).read_text())


def test_card_shows_a_real_pretrained_model(card):
    assert card["architecture"] == "Qwen2ForCausalLM"
    assert card["parameters"] <= 10_000_000
    assert card["heldout_perplexity"] < 20
    assert card["heldout_perplexity_untrained"] > 20 * card["heldout_perplexity"]
    assert card["loss_last"] < card["loss_first"] / 2


def test_loads_applies_chat_template_and_generates_in_workspace_env(card):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL)
    text = tok.apply_chat_template([{"role": "user", "content": "회원 목록 화면을 생성해주세요."}],
                                   tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n회원 목록 화면을 생성해주세요.<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=12, do_sample=False)
    new = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert out.shape[1] > ids.shape[1] and new.strip()
    # the tokenizer knows the domain's words: a field label is one token, with or without a leading space
    assert len(tok.tokenize("이메일")) == 1
    assert tok.tokenize(" 이메일")[-1] == tok.tokenize("이메일")[0]
    assert tok.decode(tok("회원 목록 memberList")["input_ids"]) == "회원 목록 memberList"


@pytest.mark.parametrize("env", ["train", "serve"])
def test_loads_and_generates_in_engine_envs(env, card):
    code = (
        "import sys; from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        "t = AutoTokenizer.from_pretrained(sys.argv[1]); m = AutoModelForCausalLM.from_pretrained(sys.argv[1])\n"
        "s = t.apply_chat_template([{'role': 'user', 'content': '주문 목록'}], tokenize=False, add_generation_prompt=True)\n"
        "ids = t(s, return_tensors='pt').input_ids\n"
        "out = m.generate(ids, max_new_tokens=5, do_sample=False)\n"
        "print('GENERATED', out.shape[1] - ids.shape[1])\n"
    )
    lines: list[str] = []
    run_in_env(env, ["python", "-c", code, str(MODEL)], timeout=300, on_line=lines.append, echo=False)
    assert any(line.startswith("GENERATED") and int(line.split()[1]) > 0 for line in lines), lines[-5:]


def _tiny_build(text_dir) -> BaseModelBuild:
    return BaseModelBuild(text_dir=str(text_dir), vocab_size=400, hidden_size=64, intermediate_size=128,
                          num_layers=1, num_heads=2, num_kv_heads=1, max_position=256, seq_len=32,
                          batch_size=4, steps=4, warmup_steps=1, seed=7)


def test_build_is_deterministic_for_a_seed(tmp_path):
    text_dir = tmp_path / "text"
    text_dir.mkdir()
    src = resolve("data/raw/pretrain/corpus.txt").read_text(encoding="utf-8").splitlines()[:400]
    (text_dir / "t.txt").write_text("\n".join(src), encoding="utf-8")
    digests = []
    for name in ("a", "b"):
        card = build_base_model(_tiny_build(text_dir), tmp_path / name, quiet=True)
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest()
                       + (tmp_path / name / "tokenizer.json").read_text())
        assert card["heldout_perplexity"] < card["heldout_perplexity_untrained"]
    assert digests[0] == digests[1]
    # an up-to-date build is skipped (same fingerprint), a changed seed rebuilds
    again = build_base_model(_tiny_build(text_dir), tmp_path / "a", quiet=True)
    assert again["fingerprint"] == card["fingerprint"]
    other = build_base_model(_tiny_build(text_dir).model_copy(update={"seed": 8}), tmp_path / "a", quiet=True)
    assert other["fingerprint"] != card["fingerprint"]
    assert not list(tmp_path.glob("*.tmp-build"))


def test_bad_shapes_are_config_errors():
    with pytest.raises(ValueError, match="multiple of 64"):
        BaseModelBuild(intermediate_size=688)
    with pytest.raises(ValueError, match="divisible by num_kv_heads"):
        BaseModelBuild(num_heads=4, num_kv_heads=3)


def test_force_never_rebuilds_the_base_model():
    """`make <target> FORCE=1` recomputes the pipeline's tasks; only `make rebuild-base-model` rebuilds the base."""
    import subprocess

    from workspace.paths import ROOT

    for target in ("prepare", "pipeline", "finetune", "test"):
        out = subprocess.run(["make", "-n", target, "FORCE=1"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
        build = [line for line in out.splitlines() if "-m llmops base-model" in line]
        assert build and not any("--force" in line for line in build), (target, build)
    out = subprocess.run(["make", "-n", "rebuild-base-model"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert any("-m llmops base-model" in line and "--force" in line for line in out.splitlines())


def test_the_fingerprint_covers_the_weights_not_the_build_record(tmp_path):
    """The base model's key (part of every finetune and evaluation key) ignores its build card and loss log, which
    record seconds and versions, and changes with one weight byte."""
    import shutil

    from workspace.model_ref import folder_fingerprint

    copy = tmp_path / "base"
    shutil.copytree(MODEL, copy)
    before = folder_fingerprint(copy)
    card = json.loads((copy / CARD).read_text())
    (copy / CARD).write_text(json.dumps({**card, "seconds": card.get("seconds", 0) + 123.4}))
    (copy / "pretrain_loss.json").write_text("[1.0]")
    assert folder_fingerprint(copy) == before
    weights = copy / "model.safetensors"
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 1
    weights.write_bytes(bytes(blob))
    assert folder_fingerprint(copy) != before


def test_every_make_target_is_defined_once_and_runs_its_own_command():
    """A recipe defined twice is a make warning and the later one silently wins (`make ui` once started Prefect)."""
    import re
    import subprocess

    from workspace.paths import ROOT

    text = (ROOT / "Makefile").read_text()
    targets = re.findall(r"^([a-z][a-z-]*):.*##", text, re.M)
    assert len(targets) == len(set(targets)), sorted(t for t in targets if targets.count(t) > 1)
    run = lambda *a: subprocess.run(["make", "-n", *a], cwd=ROOT, capture_output=True, text=True, timeout=60)  # noqa: E731
    assert "warning" not in run("help").stderr
    for target, module in (("ui", "-m llmops ui"), ("prefect-ui", "-m llmops deploy server"),
                           ("gateway", "-m llmops gateway"), ("serve", "-m llmops serve"),
                           ("bench-gateway", "-m llmops bench gateway")):
        assert any(module in line for line in run(target).stdout.splitlines()), target  # under `make test` too
    assert "--token \"alice\" --role admin" in run("token", "NAME=alice", "ROLE=admin").stdout
