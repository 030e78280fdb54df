"""Feedback and the arena through the gateway's API (real HTTP, a real MLflow registry and SQLite), `make harvest`
(the files the prepare stage reads), prepare mixing harvested rows (dedup, PII, no test leak, preference pairs for
LLaMA-Factory), the gate's preference rule and the DPO training config (LLaMA-Factory's own parser). The whole loop
with real training: tests/test_loop.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import httpx
import pytest

from conftest import make_bundle
from serving.gateway.app import create_app
from serving.gateway.db import GatewayDb, database_url
from serving.registry import promote
from upstream_double import ServeApp, Upstream
from workspace.config import ConfigError, GateRule, load_config
from workspace.tracking import configure, stage_run

NAME = "fb-test"
PHONE, EMAIL = "010-9876-5432", "lee@example.com"


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """v1 ("one") and v2 ("two"): champion v2, previous v1, candidate v2."""
    tmp = tmp_path_factory.mktemp("fb")
    base = [f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"tracking.artifact_root={tmp}/artifacts",
            f"tracking.registered_model={NAME}", "serving.gateway.registry_refresh_s=0.2",
            "serving.gateway.health_interval_s=0.2", "serving.gateway.requests_per_min=1000",
            "serving.gateway.arena.votes_per_pair=100"]  # one tester's many votes stand in for many people
    configure(load_config(overrides=base))
    for tag in ("one", "two"):
        with stage_run(load_config(overrides=base), "promote") as run:
            promote(NAME, run.info.run_id, make_bundle(tmp, tag), {})
    return {"tmp": tmp, "overrides": base}


@pytest.fixture
def gw(registry, tmp_path):
    """A gateway with its own database (each test counts its own rows) in front of one stand-in replica."""
    sets = registry["overrides"] + [f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db",
                                    f"data.feedback.dir={tmp_path}/feedback"]
    loaded = load_config(overrides=sets)
    db = GatewayDb(database_url(loaded))
    tokens = {"alice": db.create_token("alice", "user"), "bob": db.create_token("bob", "user"),
              "root": db.create_token("root", "admin")}
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as app:
        yield {"url": app.url, "db": db, "tokens": tokens, "sets": sets, "tmp": tmp_path, "loaded": loaded, "up": up}


def post(gw, path, who="alice", **body):
    return httpx.post(gw["url"] + path, headers={"Authorization": f"Bearer {gw['tokens'][who]}"}, json=body, timeout=30)


def ask(gw, content, model="champion", who="alice", system=None):
    msgs = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]
    r = post(gw, "/v1/chat/completions", who, model=model, messages=msgs, max_tokens=3)
    assert r.status_code == 200, r.text
    return r.json()


def test_feedback_is_stored_masked_with_the_answering_version(gw):
    a = ask(gw, f"회원 목록 화면, 담당자 {PHONE}", system="XML만 답하세요")
    r = post(gw, "/v1/feedback", request_id=a["id"], rating="up")
    assert r.status_code == 200 and r.json()["version"] == "2" and r.json()["rating"] == 1
    # the last word counts: a correction (with PII in it) replaces the rating-only feedback
    r = post(gw, "/v1/feedback", request_id=a["id"], rating="down", correction=f"<Screen id=\"m\"/> 문의 {EMAIL}")
    assert r.status_code == 200 and r.json()["correction"] == '<Screen id="m"/> 문의 <EMAIL>'
    rows = httpx.get(gw["url"] + "/admin/feedback", headers={"Authorization": f"Bearer {gw['tokens']['root']}"}).json()
    [row] = rows["data"]
    assert (row["rating"], row["alias"], row["version"]) == (-1, "champion", "2")
    assert row["messages"] == [{"role": "system", "content": "XML만 답하세요"},
                               {"role": "user", "content": "회원 목록 화면, 담당자 <PHONE>"}]
    assert row["answer"] == "weights-two-0 weights-two-1 weights-two-2"
    # refusals, each named
    assert post(gw, "/v1/feedback", "bob", request_id=a["id"], rating="up").status_code == 404  # not bob's request
    bad = post(gw, "/v1/feedback", request_id=a["id"], rating="meh")
    assert bad.status_code == 400 and "rating" in bad.json()["error"]["message"]
    assert post(gw, "/v1/feedback", request_id=a["id"]).json()["error"]["code"] == "invalid_feedback"
    assert post(gw, "/v1/feedback", request_id="chatcmpl-gw-nope", rating="up").status_code == 404
    raw = b"".join(f.read_bytes() for f in gw["tmp"].glob("gw.db*"))
    assert PHONE.encode() not in raw and EMAIL.encode() not in raw


def test_arena_is_blind_random_and_reveals_after_one_vote(gw):
    orders = set()
    for i in range(16):
        r = post(gw, "/v1/arena", messages=[{"role": "user", "content": f"주문 화면 {i}"}], models=["champion", "previous"],
                 max_tokens=2)
        assert r.status_code == 200, r.text
        m = r.json()
        assert "model" not in json.dumps(m["answers"]) and [x["label"] for x in m["answers"]] == ["A", "B"]
        a_text = m["answers"][0]["content"]
        orders.add(a_text.split("-")[1])  # which version answered as A: "weights-two-0 ..." -> two
        v = post(gw, f"/v1/arena/{m['id']}/vote", winner="A" if "two" in a_text else "B")  # always v2 (champion)
        assert v.status_code == 200
        shown = v.json()
        winner = shown[shown["winner"]]
        assert winner == {"model": "champion", "version": "2"}  # the vote went where the answer came from
    assert orders == {"one", "two"}  # both display orders occur (chance of not: 2 * 0.5**16)
    # every match samples with the arena's fixed settings; a voter cannot pin them (nor ask for more than its cap)
    assert {(b["temperature"], b["top_p"]) for b in gw["up"].state.requests} == {(0.7, 0.95)}
    for pinned in ({"temperature": 0}, {"seed": 7}, {"top_p": 0.1}, {"max_tokens": 513}):
        r = post(gw, "/v1/arena", messages=[{"role": "user", "content": "주문 화면"}], models=["champion", "previous"],
                 **pinned)
        assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_arena", pinned
    again = post(gw, f"/v1/arena/{m['id']}/vote", winner="B")
    assert again.status_code == 409 and "one vote per match" in again.json()["error"]["message"]
    assert post(gw, f"/v1/arena/{m['id']}/vote", "bob", winner="A").status_code == 404
    same = post(gw, "/v1/arena", messages=[{"role": "user", "content": "x"}])  # champion and candidate are both v2
    assert same.status_code == 409 and same.json()["error"]["code"] == "arena_same_model"
    assert gw["db"].arena_tally("2", "1") == {"wins": 16, "losses": 0, "ties": 0}
    summary = httpx.get(gw["url"] + "/admin/arena", headers={"Authorization": f"Bearer {gw['tokens']['root']}"}).json()
    assert [(s["version"], s["win_rate"]) for s in summary["summary"]] == [("2", 1.0), ("1", 0.0)]
    usage = gw["db"].usage()
    assert len(usage) == 32 and {u["requested_model"] for u in usage} == {"arena:champion", "arena:previous"}


def test_one_vote_per_token_per_pair_by_default(registry, tmp_path):
    sets = registry["overrides"] + [f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db",
                                    "serving.gateway.arena.votes_per_pair=1"]
    loaded = load_config(overrides=sets)
    db = GatewayDb(database_url(loaded))
    tokens = {"alice": db.create_token("alice", "user"), "bob": db.create_token("bob", "user")}
    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as app:
        g = {"url": app.url, "tokens": tokens}
        msgs = [{"role": "user", "content": "주문 화면"}]
        first = post(g, "/v1/arena", messages=msgs, models=["champion", "previous"]).json()
        second = post(g, "/v1/arena", messages=msgs, models=["champion", "previous"]).json()  # opened before a vote
        assert post(g, f"/v1/arena/{first['id']}/vote", winner="A").status_code == 200
        late = post(g, f"/v1/arena/{second['id']}/vote", winner="B")
        assert late.status_code == 409 and "votes_per_pair" in late.json()["error"]["message"]
        again = post(g, "/v1/arena", messages=msgs, models=["previous", "champion"])  # the same pair, either order
        assert again.status_code == 409 and again.json()["error"]["code"] == "arena_pair_voted"
        other = post(g, "/v1/arena", "bob", messages=msgs, models=["champion", "previous"])  # another person
        assert other.status_code == 200 and post(g, f"/v1/arena/{other.json()['id']}/vote", "bob",
                                                 winner="tie").status_code == 200
    assert db.arena_tally("2", "1")["wins"] + db.arena_tally("2", "1")["losses"] + db.arena_tally("2", "1")["ties"] == 2


def test_harvest_exports_rows_pairs_and_manifest_once(gw, capsys):
    from flows.harvest import main

    up = ask(gw, "회원 목록 화면을 생성해주세요")
    post(gw, "/v1/feedback", request_id=up["id"], rating="up")
    fixed = ask(gw, f"주문 상세 화면, 연락처 {PHONE}", model="previous")
    post(gw, "/v1/feedback", request_id=fixed["id"], correction='<Screen id="orderDetail"/>')
    down = ask(gw, "아무 화면")
    post(gw, "/v1/feedback", request_id=down["id"], rating="down")  # says nothing about what is right: skipped
    for winner in ("A", "tie"):
        m = post(gw, "/v1/arena", messages=[{"role": "user", "content": f"재고 화면 {winner}"}],
                 models=["champion", "previous"], max_tokens=2).json()
        post(gw, f"/v1/arena/{m['id']}/vote", winner=winner)
    args = [a for s in gw["sets"] for a in ("--set", s)]
    assert main(args) == 0
    [folder] = [p for p in (gw["tmp"] / "feedback").iterdir()]
    sft = [json.loads(x) for x in (folder / "sft.jsonl").read_text().splitlines()]
    pairs = [json.loads(x) for x in (folder / "pref.jsonl").read_text().splitlines()]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert [r["source"] for r in sft] == ["rated_up", "correction"]
    assert sft[0]["messages"][-1] == {"role": "assistant", "content": "weights-two-0 weights-two-1 weights-two-2"}
    assert sft[1]["messages"] == [{"role": "user", "content": "주문 상세 화면, 연락처 <PHONE>"},
                                  {"role": "assistant", "content": '<Screen id="orderDetail"/>'}]
    assert sorted(p["source"] for p in pairs) == ["arena", "correction"]
    corr = next(p for p in pairs if p["source"] == "correction")
    assert corr["chosen"]["value"] == '<Screen id="orderDetail"/>' and corr["rejected"]["value"].startswith("weights-one")
    assert corr["conversations"] == [{"from": "human", "value": "주문 상세 화면, 연락처 <PHONE>"}]
    c = manifest["counts"]
    assert (c["sft_rows"], c["preference_pairs"], c["skipped_ties"], c["skipped_down_without_correction"]) == (2, 2, 1, 1)
    assert manifest["versions"] and manifest["first"] <= manifest["last"]
    assert "harvest:" in capsys.readouterr().out
    # the same rows again: nothing new is written
    assert main(args) == 0 and len(list((gw["tmp"] / "feedback").iterdir())) == 1
    assert "harvested already" in capsys.readouterr().out
    # since a later time: nothing
    later = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(time.time() + 3600))
    assert main(args + ["--since", later]) == 0 and "nothing written" in capsys.readouterr().out
    assert main(args + ["--since", "yesterday"]) == 2


# ------------------------------------------------------------------------------------------------ prepare
def _write(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def test_prepare_mixes_harvested_rows_without_leaking_test_prompts(tmp_path, tmp_tracking):
    from finetune.prepare import prepare_dataset, prompt_key

    test_row = json.loads(Path("data/raw/screens/test.jsonl").read_text(encoding="utf-8").splitlines()[0])
    train_row = json.loads(Path("data/raw/screens/train.jsonl").read_text(encoding="utf-8").splitlines()[0])
    test_prompt = f"{test_row['instruction']}\n{test_row['input']}" if test_row.get("input") else test_row["instruction"]
    train_prompt = f"{train_row['instruction']}\n{train_row['input']}" if train_row.get("input") else train_row["instruction"]
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    new = "설문 응답 화면을 만들어 주세요.\n항목: 응답자, 점수"
    folder = tmp_path / "feedback" / "2026-11-26"
    folder.mkdir(parents=True)
    _write(folder / "sft.jsonl", [
        {"messages": user(new) + [{"role": "assistant", "content": f'<Screen id="survey"/> {PHONE}'}], "source": "rated_up"},
        {"messages": user(train_prompt) + [{"role": "assistant", "content": train_row["output"]}]},  # a duplicate
        {"messages": user(test_prompt) + [{"role": "assistant", "content": "<Screen/>"}]},  # a test prompt
    ])
    pair = lambda prompt, chosen, rejected: {"conversations": [{"from": "human", "value": prompt}],  # noqa: E731
                                             "chosen": {"from": "gpt", "value": chosen},
                                             "rejected": {"from": "gpt", "value": rejected}, "system": ""}
    _write(folder / "pref.jsonl", [pair(new, '<Screen id="survey"/>', f"모름 {EMAIL}"),
                                   pair(test_prompt, "<Screen/>", "no"),  # a test prompt
                                   pair(new, "same", "same")])  # teaches nothing
    (folder / "manifest.json").write_text("{}")
    loaded = load_config(overrides=tmp_tracking + [f"data.output_dir={tmp_path}/processed", "data.feedback.enabled=true",
                                                   f"data.feedback.dir={tmp_path}/feedback", "data.feedback.sft_weight=2"])
    result = prepare_dataset(loaded)
    out = result.path
    train = [json.loads(x)["messages"] for x in (out / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    test = [json.loads(x)["messages"] for x in (out / "test.jsonl").read_text(encoding="utf-8").splitlines()]
    prefs = [json.loads(x) for x in (out / "pref_train.jsonl").read_text(encoding="utf-8").splitlines()]
    survey = [m for m in train if m[0]["content"] == new]
    assert len(survey) == 2 and survey[0][-1]["content"] == '<Screen id="survey"/> <PHONE>'  # weight 2, masked
    assert prefs == [pair(new, '<Screen id="survey"/>', "모름 <EMAIL>")]
    test_keys = {prompt_key(m) for m in test}
    assert not any(prompt_key(m) in test_keys for m in train)  # no harvested test prompt reached training
    info = json.loads((out / "dataset_info.json").read_text())
    assert info["pref_train"]["ranking"] is True and info["pref_train"]["file_name"] == "pref_train.jsonl"
    s = result.stats
    assert s["feedback"] == {"harvests": ["2026-11-26"], "sft_rows": 1, "preference_pairs": 1}
    by = {b["key"]: b for b in s["by_source"]}
    assert by["data.feedback[2026-11-26].sft"]["duplicates"] == 1
    assert by["data.feedback[2026-11-26].sft"]["rejected_by_reason"] == {"harvested_prompt_in_eval_split": 1}
    assert by["data.feedback[2026-11-26].pref"]["rejected_by_reason"] == {"harvested_prompt_in_eval_split": 1,
                                                                          "chosen_equals_rejected": 1}
    written = b"".join(p.read_bytes() for p in out.iterdir() if p.suffix in (".jsonl", ".json"))
    assert PHONE.encode() not in written and EMAIL.encode() not in written
    # a harvest folder without its manifest (an unfinished harvest) is not read; none at all is a named error
    (folder / "manifest.json").unlink()
    with pytest.raises(Exception, match="no finished harvest"):
        prepare_dataset(loaded)


# --------------------------------------------------------------------------------------- gate and config
def test_preference_rule_win_rate_interval_and_votes():
    from eval.gate import preference_result

    rule = GateRule(name="people", kind="preference", min_votes=20, confidence=0.95)
    strong = preference_result(rule, {"wins": 17, "losses": 2, "ties": 2, "version": "3", "reference_version": "2"})
    assert strong.passed and strong.n == 21 and strong.estimate == pytest.approx(18 / 21)
    assert 0.5 < strong.ci_low < strong.estimate and "v3 vs v2" in strong.detail
    even = preference_result(rule, {"wins": 10, "losses": 10, "ties": 4})
    assert not even.passed and even.estimate == pytest.approx(0.5)
    # ties count half: 12 wins and 8 ties out of 20 is a 0.8 win rate
    assert preference_result(rule, {"wins": 12, "losses": 0, "ties": 8}).estimate == pytest.approx(0.8)
    few = {"wins": 5, "losses": 0, "ties": 0}
    assert not preference_result(rule, few).passed and "too few votes" in preference_result(rule, few).detail
    pending = preference_result(rule, few, purpose="candidate")
    assert pending.passed and pending.detail.startswith("pending")
    with pytest.raises(ValueError):
        GateRule(name="x", kind="preference", threshold=1.5)


@pytest.mark.slow  # LLaMA-Factory's parser runs in the train env
def test_dpo_config_renders_and_passes_llamafactorys_parser(tmp_path, random_adapter):
    from finetune.train import FinetuneError, render_llamafactory_config, run_key
    from workspace.envrunner import run_in_env

    with pytest.raises(ConfigError, match="data.feedback.enabled"):
        load_config(overrides=["finetune.stage=dpo"])
    sets = ["finetune.stage=dpo", "data.feedback.enabled=true", "finetune.pref_beta=0.2",
            f"finetune.init_adapter={random_adapter}", "finetune.method=lora", "finetune.quantization_bit=null"]
    loaded = load_config(overrides=sets)
    (tmp_path / "data").mkdir()
    cfg = render_llamafactory_config(loaded, tmp_path / "data", tmp_path / "out")
    assert (cfg["stage"], cfg["dataset"], cfg["pref_beta"], cfg["pref_loss"]) == ("dpo", "pref_train", 0.2, "sigmoid")
    assert cfg["adapter_name_or_path"] == cfg["ref_model_adapters"] == str(random_adapter)
    assert cfg["ref_model"] == cfg["model_name_or_path"] and "eval_dataset" not in cfg
    # the run key follows the starting adapter's bytes and the DPO settings; an SFT run's key ignores pref_beta
    assert run_key(loaded, "h") != run_key(load_config(overrides=sets[:-3] + sets[-2:]), "h")
    assert run_key(load_config(overrides=["finetune.pref_beta=0.5"]), "h") == run_key(load_config(), "h")
    with pytest.raises(FinetuneError, match="only the flows resolve"):
        render_llamafactory_config(load_config(overrides=sets[:3] + ["finetune.init_adapter=champion"] + sets[4:]),
                                   tmp_path, tmp_path)
    # LLaMA-Factory's own argument parser accepts the rendered DPO config
    plain = {k: v for k, v in cfg.items() if not k.startswith("###")}
    code = ("import json,sys; from llamafactory.hparams import get_train_args; "
            "m,d,t,f,g = get_train_args(json.loads(sys.argv[1])); print(f.stage, f.pref_beta, f.ref_model_adapters)")
    out = run_in_env("train", ["python", "-c", code, json.dumps(plain)], timeout=300, echo=False,
                     extra_env={"DISABLE_VERSION_CHECK": "1"})
    assert f"dpo 0.2 {random_adapter}" in "\n".join(out.tail)


def test_model_card_sections_and_a_promotion_that_always_fits(tmp_path):
    from serving.card import model_card, with_promotion
    from serving.registry import MAX_DESCRIPTION

    (tmp_path / "manifest.json").write_text(json.dumps({
        "run_key": "abc", "base_model": "models/base-tiny", "base_model_revision": "sha256:1", "config_hash": "c",
        "git_commit": "g", "profile": "cpu_tiny", "dataset_hash": "d", "stage": "dpo", "method": "lora",
        "pref_beta": 0.1, "global_step": 50, "final_train_loss": 0.8, "dpo_reward_accuracy": 1.0,
        "verification": {"outputs_differ": 5, "prompts": 5}}))
    (tmp_path / "dataset_stats.json").write_text(json.dumps({"splits": {"train": 10}, "rows_read": 12, "rows_rejected": 0,
                                                             "feedback": {"harvests": ["2026-11-26"], "sft_rows": 3,
                                                                          "preference_pairs": 9}}))
    (tmp_path / "gate.json").write_text(json.dumps({"passed": True, "reference": "champion-v1", "decided_by": "all rules passed",
                                                    "rules": [{"name": "people", "kind": "preference", "metric": "arena/win_rate",
                                                               "n": 21, "estimate": 0.86, "ci_low": 0.7, "ci_high": None,
                                                               "value": 0.7, "threshold": 0.5, "passed": True,
                                                               "detail": "win rate 0.857 | 17 won"}]}))
    (tmp_path / "serving.yaml").write_text("model: merged\ndtype: bfloat16\nmax-model-len: 2048\n")
    (tmp_path / "eval_report.md").write_text("| metric | base | candidate |\n" + "| m | 0.1 | 0.2 |\n" * 400)
    full = model_card(tmp_path, registered_model="m", version="3")
    short = model_card(tmp_path, registered_model="m", version="3", report=False)
    for text in (full, short):
        assert text.startswith("# Model card: m v3 (run abc)") and "harvested feedback (2026-11-26): 3 supervised rows, 9" in text
        assert "| stage | dpo |" in text and "| dpo_reward_accuracy | 1.0000 |" in text and "merged weights" in text
        assert "| people | arena/win_rate | 21 | +0.8600 | [+0.7000, +inf]" in text and "win rate 0.857 / 17 won" in text
        assert "Trained with DPO on harvested preferences" in text
    assert "<details>" in full and "<details>" not in short and len(short) < MAX_DESCRIPTION < len(full)
    promoted = with_promotion(full, "3", json.loads((tmp_path / "gate.json").read_text()), "1", limit=MAX_DESCRIPTION)
    assert len(promoted) <= MAX_DESCRIPTION and promoted.rstrip().endswith("| win rate 0.857 / 17 won |")
    assert "## Promotion to champion (v3, replacing v1)" in promoted and "(cut: the full card is MODEL_CARD.md)" in promoted
