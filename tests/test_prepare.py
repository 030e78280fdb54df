"""Dataset preparation: every kind of bad input is quarantined with its exact reason, good rows all survive,
PII never reaches a written file or MLflow, reruns are cache hits, and the output is what LLaMA-Factory reads."""
from __future__ import annotations

import json

import pytest

from finetune.prepare import PrepareError, clean_text, mask_pii, prepare_dataset
from workspace.config import load_config

PII_VALUES = ["hong.gildong@example.co.kr", "010-1234-5678", "02-345-6789", "900101-1234567", "4111-1111-1111-1111",
              "+82 10 9876 5432", "031-987-6543"]


def good_alpaca(i: int) -> dict:
    return {"instruction": f"회원 목록 화면 {i}번을 만들어 주세요.", "input": "필드: 이름, 이메일",
            "output": f'<Screen id="s{i}">\n  <Grid id="g{i}"/>\n</Screen>'}


def jsonl(path, rows, raw_lines=()):
    with open(path, "wb") as fh:
        for r in rows:
            fh.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
        for line in raw_lines:
            fh.write(line + b"\n")
    return path


def cfg(tmp_path, sources, *extra, test_source=None):
    srcs = "[" + ", ".join(f"{{path: '{p}', format: {f}}}" for p, f in sources) + "]"
    overrides = [f"data.sources={srcs}", f"data.output_dir={tmp_path / 'processed'}", "data.max_reject_ratio=1.0",
                 "data.test_source=" + (f"{{path: '{test_source}', format: auto}}" if test_source else "null"), *extra]
    return load_config(overrides=overrides)


def read_quarantine(result):
    return [json.loads(line) for line in (result.path / "quarantine.jsonl").read_text(encoding="utf-8").splitlines()]


def all_written_text(result) -> str:
    return "\n".join(p.read_text(encoding="utf-8", errors="replace") for p in result.path.iterdir()
                     if p.suffix in (".jsonl", ".json"))


def test_each_kind_of_bad_row_is_quarantined_with_its_reason(tmp_path):
    good = [good_alpaca(i) for i in range(20)]
    bad = [
        {"instruction": "", "output": "x"},                                # empty field
        {"output": "x"},                                                    # missing field
        {"instruction": 3, "output": "x"},                                  # wrong type
        {"instruction": "a", "input": ["list"], "output": "x"},            # wrong type (input)
        good_alpaca(0),                                                     # exact duplicate of row 1
        {**good_alpaca(1), "instruction": "회원  목록 화면 1번을   만들어 주세요."},  # normalised duplicate
        {"instruction": "긴 요청 " * 400, "output": "x"},                   # over the token budget
    ]
    path = jsonl(tmp_path / "a.jsonl", good + bad, raw_lines=[b'{"instruction": "broken', b'\xff\xfe{"bad": "utf8"}',
                                                              b'[1, 2]'])
    result = prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.val_ratio=0.2"))
    reasons = [q["reason"] for q in read_quarantine(result)]
    assert reasons.count("empty_field:instruction") == 1
    assert reasons.count("missing_field:instruction") == 1
    assert reasons.count("wrong_type:instruction") == 1
    assert reasons.count("wrong_type:input") == 1
    assert reasons.count("over_token_budget") == 1
    assert reasons.count("unparsable_json") == 1
    assert reasons.count("invalid_utf8") == 1
    assert reasons.count("not_an_object") == 1
    assert reasons.count("duplicate_exact") == 1
    assert reasons.count("duplicate_normalized") == 1
    assert len(reasons) == 10
    q = {q["reason"]: q for q in read_quarantine(result)}
    assert q["unparsable_json"]["line"] == 28 and q["invalid_utf8"]["line"] == 29
    assert q["duplicate_exact"]["detail"].endswith("a.jsonl:1")
    s = result.stats
    assert s["splits"]["train"] + s["splits"]["val"] == 20  # every good row survives
    assert s["splits"]["val"] == 4
    assert s["rows_read"] == 30 and s["rows_rejected"] == 8
    assert s["duplicates_exact"] == 1 and s["duplicates_normalized"] == 1


def test_conversation_formats_and_role_errors(tmp_path):
    share = [{"conversations": [{"from": "system", "value": "너는 화면 생성기다."}, {"from": "human", "value": f"질문 {i}"},
                                {"from": "gpt", "value": f"답 {i}"}]} for i in range(6)]
    share += [
        {"conversations": [{"from": "robot", "value": "x"}, {"from": "gpt", "value": "y"}]},   # unknown role
        {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]},  # not alternating
        {"conversations": [{"from": "human", "value": "a"}]},                                 # ends with user
        {"conversations": "not a list"},
    ]
    openai = [{"messages": [{"role": "user", "content": f"요청 {i}"}, {"role": "assistant", "content": f"응답 {i}"},
                            {"role": "user", "content": "하나 더"}, {"role": "assistant", "content": "네"}]} for i in range(4)]
    openai += [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": 5}]},
               {"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "late"},
                             {"role": "assistant", "content": "b"}]}]
    a = jsonl(tmp_path / "share.jsonl", share)
    b = tmp_path / "openai.json"
    b.write_text(json.dumps(openai, ensure_ascii=False), encoding="utf-8")
    result = prepare_dataset(cfg(tmp_path, [(a, "auto"), (b, "auto")], "data.val_ratio=0"))
    reasons = sorted(q["reason"] for q in read_quarantine(result))
    assert reasons == sorted(["unknown_role:robot", "not_alternating", "not_ending_with_assistant",
                              "wrong_type:conversations", "wrong_type:messages[1].content", "misplaced_system"])
    rows = [json.loads(line) for line in (result.path / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 10
    sys_rows = [r for r in rows if r["messages"][0]["role"] == "system"]
    assert len(sys_rows) == 6 and all(len(r["messages"]) == 3 for r in sys_rows)
    assert sum(len(r["messages"]) == 4 for r in rows) == 4


def test_csv_with_and_without_bom(tmp_path):
    header = "instruction,input,output\n"
    body = "".join(f'"주문 화면 {i}",필드: 금액,"<Screen id=""o{i}""/>"\n' for i in range(5))
    with_bom = tmp_path / "bom.csv"
    with_bom.write_bytes(b"\xef\xbb\xbf" + (header + body).encode("utf-8"))
    plain = tmp_path / "plain.csv"
    plain.write_text(header + body.replace("주문", "배송"), encoding="utf-8")
    result = prepare_dataset(cfg(tmp_path, [(with_bom, "auto"), (plain, "alpaca")], "data.val_ratio=0"))
    assert result.stats["splits"]["train"] == 10 and result.stats["rows_rejected"] == 0
    text = (result.path / "train.jsonl").read_text(encoding="utf-8")
    assert "\ufeff" not in text and '<Screen id=\\"o3\\"/>' in text


def test_pii_is_masked_everywhere_it_is_written(tmp_path, tmp_tracking):
    rows = [{"instruction": f"고객 {i} 연락처는 {PII_VALUES[i % len(PII_VALUES)]} 입니다. 화면을 만들어 주세요.",
             "input": "", "output": f"담당: {PII_VALUES[(i + 1) % len(PII_VALUES)]}"} for i in range(14)]
    rows.append({"instruction": f"메일 {PII_VALUES[0]}", "output": ""})  # rejected row with PII -> quarantine
    path = jsonl(tmp_path / "pii.jsonl", rows, raw_lines=[f'{{"broken": "{PII_VALUES[1]}'.encode()])
    loaded = cfg(tmp_path, [(path, "alpaca")], "data.val_ratio=0.2", *tmp_tracking)
    result = prepare_dataset(loaded)
    written = all_written_text(result)
    for value in PII_VALUES:
        assert value not in written, value
    assert "<EMAIL>" in written and "<PHONE>" in written and "<RRN>" in written and "<CARD>" in written
    pii = result.stats["pii_masked"]
    assert pii["email"] == 4 and pii["rrn"] == 4 and pii["card"] == 4
    assert pii["phone_mobile"] == 8 and pii["phone_landline"] == 8
    # and not in MLflow
    import mlflow

    from finetune.prepare import log_to_mlflow
    from workspace.tracking import stage_run

    with stage_run(loaded, "prepare") as run:
        log_to_mlflow(result)
    client = mlflow.MlflowClient()
    r = client.get_run(run.info.run_id)
    blob = json.dumps([r.data.params, r.data.metrics, r.data.tags], ensure_ascii=False)
    art_dir = client.download_artifacts(run.info.run_id, "dataset", str(tmp_path / "dl"))
    import pathlib

    for p in pathlib.Path(art_dir).iterdir():
        if p.suffix in (".json", ".jsonl"):
            blob += p.read_text(encoding="utf-8")
    for value in PII_VALUES:
        assert value not in blob
    assert r.data.metrics["data/pii_email"] == 4
    inputs = r.inputs.dataset_inputs
    assert {i.dataset.name.split("-")[-1] for i in inputs} == {"train", "val"}
    assert all(i.dataset.digest.startswith(result.content_hash) for i in inputs)


def test_mask_pii_leaves_ordinary_numbers_alone():
    text = "주문 3건, 2024-01-15 등록, 수량 12345, 포트 8080"
    assert mask_pii(text) == text
    assert mask_pii("전화 010.2222.3333 / 053-123-4567") == "전화 <PHONE> / <PHONE>"


def test_cleaning_normalises_unicode_and_whitespace_but_keeps_indentation():
    decomposed = "\u1112\u1161\u11ab"  # 한 as conjoining jamo (NFD)
    assert clean_text(f"  {decomposed}\u200b글\u00a0화면 \r\n  <Grid/>  \r\n\n\n\n끝  ") == "한글 화면\n  <Grid/>\n\n끝"


def test_empty_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(PrepareError, match=r"empty.jsonl: empty file"):
        prepare_dataset(cfg(tmp_path, [(empty, "alpaca")]))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(PrepareError, match=r"blank.jsonl: no rows"):
        prepare_dataset(cfg(tmp_path, [(blank, "alpaca")]))
    assert not (tmp_path / "processed").exists() or not any((tmp_path / "processed").iterdir())


def test_reject_ceiling_fails_the_stage_and_writes_nothing(tmp_path):
    rows = [good_alpaca(i) for i in range(8)] + [{"instruction": "", "output": "x"}] * 2
    path = jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(PrepareError, match=r"2 of 10 rows rejected \(20.0% > data.max_reject_ratio 5.0%\).*empty_field:instruction"):
        prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.max_reject_ratio=0.05"))
    assert not any((tmp_path / "processed").glob("*")), "a failed run must leave nothing behind"


def test_rerun_is_skipped_and_one_changed_row_changes_the_hash(tmp_path):
    rows = [good_alpaca(i) for i in range(12)]
    path = jsonl(tmp_path / "r.jsonl", rows)
    first = prepare_dataset(cfg(tmp_path, [(path, "alpaca")]))
    again = prepare_dataset(cfg(tmp_path, [(path, "alpaca")]))
    assert not first.skipped and again.skipped and again.path == first.path
    rows[5]["output"] = "<Screen id=\"changed\"/>"
    jsonl(path, rows)
    changed = prepare_dataset(cfg(tmp_path, [(path, "alpaca")]))
    assert changed.content_hash != first.content_hash and not changed.skipped
    other_seed = prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.seed=9"))
    assert other_seed.content_hash != changed.content_hash


def test_split_is_deterministic_and_stratified(tmp_path):
    rows = [{**good_alpaca(i), "category": "list" if i % 4 else "form"} for i in range(80)]
    path = jsonl(tmp_path / "s.jsonl", rows)
    a = prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.val_ratio=0.25", "data.test_ratio=0.25",
                            "data.stratify_by=category"))
    files = {n: (a.path / f"{n}.jsonl").read_text(encoding="utf-8") for n in ("train", "val", "test")}
    assert a.stats["splits"] == {"train": 40, "val": 20, "test": 20}
    forms = {n: sum('화면 %d번' % i in t for i in range(0, 80, 4)) for n, t in files.items()}
    assert forms == {"train": 10, "val": 5, "test": 5}  # exact proportions inside each stratum
    b = prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.val_ratio=0.25", "data.test_ratio=0.25",
                            "data.stratify_by=category"), force=True)
    assert {n: (b.path / f"{n}.jsonl").read_text(encoding="utf-8") for n in files} == files


def test_supplied_test_split_overlapping_train_is_refused(tmp_path):
    train = jsonl(tmp_path / "t.jsonl", [good_alpaca(i) for i in range(10)])
    test = jsonl(tmp_path / "test.jsonl", [good_alpaca(3), good_alpaca(100)])
    with pytest.raises(PrepareError, match=r"1 test example\(s\) from .*test.jsonl also appear in the training data.*test.jsonl:1 = .*t.jsonl:4"):
        prepare_dataset(cfg(tmp_path, [(train, "alpaca")], test_source=test))
    clean = jsonl(tmp_path / "test2.jsonl", [good_alpaca(100), good_alpaca(101)])
    result = prepare_dataset(cfg(tmp_path, [(train, "alpaca")], test_source=clean))
    assert result.stats["splits"]["test"] == 2


def test_source_weights_apply_to_training_rows(tmp_path):
    a = jsonl(tmp_path / "a.jsonl", [good_alpaca(i) for i in range(10)])
    b = jsonl(tmp_path / "b.jsonl", [good_alpaca(i) for i in range(100, 110)])
    loaded = load_config(overrides=[f"data.sources=[{{path: '{a}', weight: 2.0}}, {{path: '{b}', weight: 1.0}}]",
                                    f"data.output_dir={tmp_path / 'p'}", "data.val_ratio=0", "data.test_source=null"])
    result = prepare_dataset(loaded)
    assert result.stats["splits"]["train"] == 30


def test_missing_source_file_names_it(tmp_path):
    with pytest.raises(PrepareError, match=r"nope.jsonl: file not found"):
        prepare_dataset(cfg(tmp_path, [(tmp_path / "nope.jsonl", "alpaca")]))


def test_shipped_data_prepares_cleanly(tmp_path):
    result = prepare_dataset(load_config(overrides=[f"data.output_dir={tmp_path}"]))
    s = result.stats
    assert s["rows_rejected"] == 0 and s["splits"]["test"] == 200
    assert s["splits"]["train"] + s["splits"]["val"] == 1200 - s["duplicates_exact"] - s["duplicates_normalized"]
    info = json.loads((result.path / "dataset_info.json").read_text())
    assert set(info) == {"train", "val", "test"} and info["train"]["formatting"] == "sharegpt"
