"""The loop end to end, with the real components: a champion and a candidate in a real MLflow registry, served
through the real gateway (the replica behind it is the stand-in of tests/upstream_double.py, answering with the name
of the version it loaded); ratings, a correction and arena votes posted through the gateway's API; `make harvest`;
`make loop` as a command (prepare mixes the harvest in, LLaMA-Factory trains a few DPO steps from the champion's
adapter, lm-eval and the custom metrics evaluate, the gate decides with the preference rule on, the candidate is
registered with its model card, never as champion); then `make promote VERSION=n` refused without votes and passed
with them, and `make card`."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from workspace.paths import ROOT

NAME = "loop-assistant"
PHONE = "010-2468-1357"
RULES = ('[{"name": "adapter-changes-outputs", "kind": "adapter_changes_outputs"}, '
         '{"name": "people-prefer-it", "kind": "preference", "min_votes": 6, "confidence": 0.9}]')


def _cmd(command: str, sets: list[str], *extra: str, env: dict, timeout: float = 1200) -> subprocess.CompletedProcess:
    argv = [sys.executable, "-m", "llmops", command, "--profile", "cpu_smoke", *[a for s in sets for a in ("--set", s)], *extra]
    return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_feedback_to_dpo_candidate_to_champion(tmp_path, promote_random_adapter, flow_env, capsys):
    import mlflow
    from mlflow import MlflowClient

    from serving.gateway.app import create_app
    from serving.gateway.db import GatewayDb, database_url
    from upstream_double import ServeApp, Upstream
    from workspace.config import load_config
    from workspace.paths import resolve

    sets = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", f"tracking.artifact_root={tmp_path}/artifacts",
            "tracking.experiment=loop", f"tracking.registered_model={NAME}", f"data.output_dir={tmp_path}/processed",
            f"finetune.output_dir={tmp_path}/adapters", f"data.feedback.dir={tmp_path}/feedback",
            f"serving.gateway.database_url=sqlite:///{tmp_path}/gw.db", "serving.gateway.registry_refresh_s=0.2",
            "serving.gateway.canary.alias=candidate", "serving.gateway.canary.percent=20",
            "serving.gateway.arena.votes_per_pair=100", "rag.enabled=false",  # (one tester's votes stand in for many)
            "eval.kobest_tasks=[kobest_copa]", "eval.limit=4", "eval.custom_limit=4", "eval.max_new_tokens=48",
            "loop.max_steps=4", "finetune.save_steps=4", "finetune.logging_steps=1", f"gate.rules={RULES}"]
    loaded = load_config(profile="cpu_smoke", overrides=sets)
    base = str(resolve(loaded.config.base_model.path))
    for v in ("c1", "c2"):  # two random rank-8 LoRAs of the base model: v1 and v2
        (tmp_path / v).mkdir()
        promote_random_adapter(loaded, tmp_path / v, NAME, base)
    client = MlflowClient()
    client.set_registered_model_alias(NAME, "champion", "1")
    client.set_registered_model_alias(NAME, "candidate", "2")
    client.delete_registered_model_alias(NAME, "previous")
    env = flow_env  # the flow commands' environment, with a Prefect server of its own (conftest.py)

    db = GatewayDb(database_url(loaded))
    token = db.create_token("tester", "user")
    head = {"Authorization": f"Bearer {token}"}
    train = [json.loads(x) for x in Path("data/raw/screens/train.jsonl").read_text(encoding="utf-8").splitlines()[:3]]
    test_row = json.loads(Path("data/raw/screens/test.jsonl").read_text(encoding="utf-8").splitlines()[0])

    def vote_for(url: str, version: str, n: int, prompt: str) -> None:
        for i in range(n):
            m = httpx.post(f"{url}/v1/arena", headers=head, timeout=60, json={
                "messages": [{"role": "user", "content": f"{prompt} {i}"}], "max_tokens": 4}).json()
            a = m["answers"][0]["content"]
            httpx.post(f"{url}/v1/arena/{m['id']}/vote", headers=head, json={"winner": "A" if f"lora-{version}-" in a
                                                                               else "B"}).raise_for_status()

    with Upstream() as up, ServeApp(create_app(loaded, upstreams=[up.base_url])) as gw:
        for row in train:  # the answers are the stand-in's; the corrections are real screens (one with a phone number)
            r = httpx.post(f"{gw.url}/v1/chat/completions", headers=head, timeout=60, json={
                "model": f"{NAME}@1", "max_tokens": 4,  # (champion requests may go to the canary)
                "messages": [{"role": "user", "content": f"{row['instruction']} 담당 {PHONE}"}]}).json()
            httpx.post(f"{gw.url}/v1/feedback", headers=head, json={
                "request_id": r["id"], "rating": "down", "correction": row["output"]}).raise_for_status()
        r = httpx.post(f"{gw.url}/v1/chat/completions", headers=head, timeout=60, json={  # a test prompt, rated up
            "model": f"{NAME}@1", "max_tokens": 4, "messages": [{"role": "user", "content":
                                                                f"{test_row['instruction']}\n{test_row['input']}"}]}).json()
        httpx.post(f"{gw.url}/v1/feedback", headers=head, json={"request_id": r["id"], "rating": "up"}).raise_for_status()
        vote_for(gw.url, "2", 6, "주문 화면을 만들어 주세요")  # people prefer the candidate (v2) to the champion

        from flows.harvest import main as harvest_main  # (in-process: not a Prefect flow)
        from flows.promote import main as promote_main

        assert harvest_main(["--profile", "cpu_smoke", *[a for s in sets for a in ("--set", s)]]) == 0
        [folder] = list((tmp_path / "feedback").iterdir())
        manifest = json.loads((folder / "manifest.json").read_text())
        assert manifest["counts"]["pairs_from_arena"] == 6 and manifest["counts"]["pairs_from_corrections"] == 3
        assert manifest["counts"]["sft_rows"] == 4 and manifest["versions"] == {"1": 10, "2": 6}

        t0 = time.monotonic()
        loop = _cmd("loop", sets, env=env)
        loop_s = time.monotonic() - t0
        assert loop.returncode == 0, loop.stdout[-4000:] + loop.stderr[-3000:]
        out = " ".join(loop.stdout.split())  # (rich wraps long lines at the log width)
        assert ("finetune.stage=dpo data.feedback.enabled=true finetune.learning_rate=5e-05 finetune.max_steps=4 "
                "finetune.pref_ftx=1 finetune.init_adapter=champion") in out
        assert "@candidate" in out and "make promote VERSION=3" in out and "canary sends 20%" in out

        mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
        v3 = client.get_model_version(NAME, "3")
        assert str(client.get_model_version_by_alias(NAME, "candidate").version) == "3"
        assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"  # the loop never crowns
        assert v3.tags["finetune_stage"] == "dpo" and "Model card" in v3.description and "dpo" in v3.description
        # the run: DPO from the champion's adapter, on the harvested pairs, evaluated and gated
        [adapter] = [p for p in (tmp_path / "adapters").iterdir() if (p / "manifest.json").exists()]
        run = json.loads((adapter / "manifest.json").read_text())
        assert run["stage"] == "dpo" and run["init_adapter"].endswith("v1/adapter") and run["global_step"] == 4
        assert run["dpo_reward_accuracy"] is not None
        rendered = (adapter / "llamafactory_train.yaml").read_text()
        assert "stage: dpo" in rendered and "ref_model_adapters:" in rendered and "pref_train" in rendered
        assert "pref_ftx: 1.0" in rendered and run["pref_ftx"] == 1.0
        data = Path(run["dataset_dir"])
        pairs = (data / "pref_train.jsonl").read_text(encoding="utf-8").splitlines()
        assert len(pairs) == 9  # 6 arena votes + 3 corrections
        train_text = (data / "train.jsonl").read_text(encoding="utf-8")
        stats = json.loads((data / "stats.json").read_text())
        assert PHONE not in train_text and PHONE not in "".join(pairs) and "<PHONE>" in train_text
        test_prompt = f"{test_row['instruction']}\n{test_row['input']}"
        assert all(json.loads(x)["messages"][-2]["content"] != test_prompt for x in train_text.splitlines())
        assert stats["feedback"] and "harvested_prompt_in_eval_split" in json.dumps(stats["by_source"])
        assert stats["feedback"]["sft_rows"] == 3 and stats["feedback"]["preference_pairs"] == 9
        gate = json.loads(Path(client.download_artifacts(v3.run_id, "model/gate.json", str(tmp_path / "dl"))).read_text())
        pref = next(r for r in gate["rules"] if r["kind"] == "preference")
        assert pref["passed"] and pref["detail"].startswith("pending: 0 of 6")

        # promotion is a decision: without votes on v3 the preference rule refuses it (exit 3)
        refused = _cmd("promote", sets, "--version", "3", env=env, timeout=900)
        assert refused.returncode == 3, refused.stdout[-3000:] + refused.stderr[-2000:]
        assert "too few votes" in refused.stderr + refused.stdout
        time.sleep(0.5)  # the gateway re-reads the aliases (candidate is v3 now)
        vote_for(gw.url, "3", 6, "재고 화면을 만들어 주세요")
        promoted = _cmd("promote", sets, "--version", "3", env=env, timeout=900)
        assert promoted.returncode == 0, promoted.stdout[-3000:] + promoted.stderr[-2000:]
        assert "gateway evidence: v3 vs champion v1" in promoted.stdout
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "3"
    assert str(client.get_model_version_by_alias(NAME, "previous").version) == "1"
    args = ["--profile", "cpu_smoke", *[a for s in sets for a in ("--set", s)]]
    capsys.readouterr()
    assert promote_main(args + ["--card", "3"]) == 0
    card = capsys.readouterr().out
    assert "Promotion to champion (v3, replacing v1)" in card
    assert "win rate 1.000 (6 won, 0 lost, 0 tied; v3 vs v1)" in card

    # the leaderboard: the base model and the three versions on identical items, each with a card
    board = _cmd("leaderboard", sets, env=env, timeout=900)
    assert board.returncode == 0, board.stdout[-3000:] + board.stderr[-2000:]
    md = (tmp_path / "processed" / "leaderboard" / "leaderboard.md").read_text(encoding="utf-8")
    table = [line for line in md.splitlines() if line.startswith("| ") and "|---" not in line]
    assert [line.split(" | ")[0] for line in table[1:5]] == ["| base", "| v1", "| v2", "| v3"]
    assert "COPA acc" in table[0] and "COPA F1" in table[0] and "char_ngram_f1" in table[0]
    assert (tmp_path / "processed" / "leaderboard" / "leaderboard.png").stat().st_size > 10_000
    again = _cmd("leaderboard", sets, env=env, timeout=600)  # everything cached: nothing is evaluated again
    assert again.returncode == 0 and "(0 evaluated now, the rest cached)" in again.stdout
    for v in ("1", "2"):  # registered without a card (the fixture's bundles): one is made from their files
        assert promote_main(args + ["--card", v]) == 0 and f"# Model card: {NAME} v{v}" in capsys.readouterr().out
    print(f"[loop] make loop took {loop_s:.0f} s")
