"""Dataset preparation: every kind of bad input is quarantined with its exact reason, good rows all survive,
PII never reaches a written file or MLflow, reruns are cache hits, and the output is what LLaMA-Factory reads."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from finetune.prepare import PrepareError, clean_text, prepare_dataset
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


# PII planted in every way a row can carry it; each with fragments that must not survive either (a number cut in
# half by a snippet is still PII)
PLANTED = {
    "rrn_hyphen": ("851203-2345678", ["851203-2"]),
    "rrn_plain": ("9001011234567", ["9001011"]),
    "landline_paren": ("(02) 3456-7890", ["3456-7890"]),
    "card15": ("378282246310005", ["3782822463"]),
    "card16": ("4111-1111-1111-1111", ["4111-1111-1111"]),
    "mobile_intl": ("+82 10 9876 5432", ["9876 5432"]),
    "mobile_dots": ("010.2468.1357", ["2468.1357"]),
    "voip": ("070-8765-4321", ["8765-4321"]),
    "email": ("hong.gildong@example.co.kr", ["hong.gildong@"]),
}


def _assert_no_pii(text: str, where: str) -> None:
    from workspace.pii import find_pii

    for name, (value, fragments) in PLANTED.items():
        for needle in [value, *fragments]:
            assert needle not in text, f"{name} ({needle!r}) found in {where}"
    # MLflow's 32-hex run/artifact ids can hold ten decimal digits in a row that read as a phone number
    # ("...0358817692..." failed a clean-clone run once): ids are not user data, so they are blanked first
    text = re.sub(r"[0-9a-f]{32}", "<id>", text)
    assert not find_pii(text), f"{find_pii(text)} in {where}"


def test_pii_never_reaches_a_written_file_or_mlflow(tmp_path, tmp_tracking):
    """PII in good rows, in rejected rows (also straddling the quarantine snippet's cut), in JSON that fails to
    parse, in a CSV with a BOM and in a role name: nothing under the processed folder, the MLflow database or its
    artifacts carries any of it, whole or cut in half."""
    from finetune.prepare import QUARANTINE_SNIPPET
    from finetune.prepare_stage import PREPARE, PrepareInputs

    values = [v for v, _ in PLANTED.values()]
    rows = [{"instruction": f"고객 {i} 연락처는 {values[i % len(values)]} 입니다. 화면을 만들어 주세요.",
             "input": "", "output": f"<Screen>담당: {values[(i + 3) % len(values)]}</Screen>"} for i in range(27)]
    rows.append({"instruction": f"메일 {values[-1]}", "output": ""})  # rejected: PII in the quarantine snippet
    head = '{"instruction": "'
    filler = "가" * 0 + "a" * (QUARANTINE_SNIPPET - len(head) - 6)  # the RRN starts 6 characters before the cut
    straddle = {"instruction": filler + "900101-1234567 끝", "output": ""}
    assert json.dumps(straddle, ensure_ascii=False)[QUARANTINE_SNIPPET - 6:QUARANTINE_SNIPPET + 8] == "900101-1234567"
    rows.append(straddle)
    path = jsonl(tmp_path / "pii.jsonl", rows, raw_lines=[f'{{"instruction": "연락 {values[0]} {values[1]}'.encode()])
    csv_path = tmp_path / "pii.csv"
    csv_path.write_bytes(b"\xef\xbb\xbf" + ("instruction,input,output\n" + "".join(
        f'"주문 {i} 문의 {values[(i + 5) % len(values)]}",,"<Screen>{values[(i + 6) % len(values)]}</Screen>"\n'
        for i in range(9))).encode("utf-8"))
    share = jsonl(tmp_path / "roles.jsonl", [
        {"conversations": [{"from": "human", "value": f"질문 {i}"}, {"from": "gpt", "value": f"답 {i}"}]} for i in range(9)]
        + [{"conversations": [{"from": "010-5555-4444", "value": "x"}, {"from": "gpt", "value": "y"}]}])
    PLANTED_ROLE = "010-5555-4444"
    loaded = cfg(tmp_path, [(path, "alpaca"), (csv_path, "auto"), (share, "auto")], "data.val_ratio=0.2", *tmp_tracking)
    out = PREPARE.run(loaded, PrepareInputs())
    pii = json.loads((Path(out.path) / "stats.json").read_text())["pii_masked"]
    assert pii["rrn"] >= 6 and pii["card"] >= 6 and pii["phone"] >= 12 and pii["email"] >= 3, pii
    written = [p for p in (tmp_path / "processed").rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"train.jsonl", "val.jsonl", "quarantine.jsonl", "stats.json"}
    quarantine = (Path(out.path) / "quarantine.jsonl").read_text(encoding="utf-8")
    assert "<RRN>" in quarantine and "<EMAIL>" in quarantine and "unknown_role:<PHONE>" in quarantine
    stores = written + [p for p in (tmp_path / "artifacts").rglob("*") if p.is_file()] + [tmp_path / "mlflow.db"]
    assert len(stores) > len(written) + 3  # MLflow wrote artifacts and its database
    for p in stores:
        text = p.read_bytes().decode("utf-8", errors="replace")
        _assert_no_pii(text, str(p))
        assert PLANTED_ROLE not in text, p


def test_cleaning_normalises_unicode_and_whitespace_but_keeps_indentation():
    decomposed = "\u1112\u1161\u11ab"  # 한 as conjoining jamo (NFD)
    assert clean_text(f"  {decomposed}\u200b글\u00a0화면 \r\n  <Grid/>  \r\n\n\n\n끝  ") == "한글 화면\n  <Grid/>\n\n끝"


def test_empty_file_is_an_error_naming_it(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    with pytest.raises(PrepareError, match=r"empty.jsonl \(data.sources\[0\]\): empty file"):
        prepare_dataset(cfg(tmp_path, [(empty, "alpaca")]))
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n\n")
    with pytest.raises(PrepareError, match=r"blank.jsonl \(data.sources\[0\]\): no rows"):
        prepare_dataset(cfg(tmp_path, [(blank, "alpaca")]))
    assert all(p.name.startswith("failed-") for p in (tmp_path / "processed").iterdir())  # evidence only, no dataset


def test_reject_ceiling_fails_the_stage_and_writes_only_its_evidence(tmp_path):
    rows = [good_alpaca(i) for i in range(8)] + [{"instruction": "", "output": "x"}] * 2
    path = jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(PrepareError, match=r"c.jsonl \(data.sources\[0\]\): 2 of 10 rows rejected \(20.0% > "
                       r"data.max_reject_ratio 5.0%\), top reasons: empty_field:instruction x2.*failed-\w+/quarantine.jsonl"):
        prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.max_reject_ratio=0.05"))
    (failed,) = (tmp_path / "processed").iterdir()
    assert failed.name.startswith("failed-") and not (failed / "train.jsonl").exists()
    assert len((failed / "quarantine.jsonl").read_text().splitlines()) == 2


def test_a_source_cannot_vanish(tmp_path):
    """A file whose rows are all rejected fails the stage by name even when other sources are good, with its top
    reasons and the quarantine written; a misdeclared format says which format the rows look like; every source is
    counted in stats.json, the supplied test file apart."""
    good = jsonl(tmp_path / "good.jsonl", [good_alpaca(i) for i in range(40)])
    bad = jsonl(tmp_path / "bad.jsonl", [{"instruction": "", "output": "x"}] * 3)
    with pytest.raises(PrepareError, match=r"bad.jsonl \(data.sources\[1\]\): 3 of 3 rows rejected.*"
                       r"empty_field:instruction x3.*failed-\w+/quarantine.jsonl"):
        prepare_dataset(cfg(tmp_path, [(good, "alpaca"), (bad, "alpaca")], "data.max_reject_ratio=0.5"))
    (failed,) = [p for p in (tmp_path / "processed").iterdir() if p.name.startswith("failed-")]
    assert len((failed / "quarantine.jsonl").read_text().splitlines()) == 3
    by_source = json.loads((failed / "stats.json").read_text())["by_source"]
    assert [(s["file"].split("/")[-1], s["kept"], s["rejected"]) for s in by_source] == [("good.jsonl", 40, 0), ("bad.jsonl", 0, 3)]

    alone = jsonl(tmp_path / "alone.jsonl", [{"instruction": 7, "output": "x"}] * 4)
    with pytest.raises(PrepareError, match=r"alone.jsonl.*4 of 4 rows rejected.*wrong_type:instruction x4"):
        prepare_dataset(cfg(tmp_path, [(alone, "alpaca")]))

    share = jsonl(tmp_path / "share.jsonl", [{"conversations": [{"from": "human", "value": f"q{i}"},
                                                                 {"from": "gpt", "value": f"a{i}"}]} for i in range(3)])
    with pytest.raises(PrepareError, match=r"share.jsonl.*missing_field:instruction x3; its rows look like sharegpt but "
                       r"data.sources\[1\].format is alpaca \(set it to sharegpt or auto\)"):
        prepare_dataset(cfg(tmp_path, [(good, "alpaca"), (share, "alpaca")]))

    test = jsonl(tmp_path / "test.jsonl", [good_alpaca(i) for i in range(100, 105)] + [{"output": "x"}])
    ok = prepare_dataset(cfg(tmp_path, [(good, "alpaca"), (share, "sharegpt")], "data.max_reject_ratio=0.2",
                             test_source=test))
    s = ok.stats
    assert s["rows_read"] == 43 and s["rows_rejected"] == 0  # the test file is counted apart
    assert s["test_rows_read"] == 6 and s["test_rows_rejected"] == 1
    assert [(x["key"], x["split"], x["kept"]) for x in s["by_source"]] == [
        ("data.sources[0]", "train+val", 40), ("data.sources[1]", "train+val", 3), ("data.test_source", "test", 5)]


def test_split_keeps_every_answer_to_one_prompt_in_one_split(tmp_path):
    """Several answers to one (normalised) prompt never straddle train/val/test; the split is seeded and reported
    in prompt groups."""
    rows = []
    for p in range(40):
        for a in range(1 + p % 3):  # 1, 2 or 3 answers per prompt
            prompt = f"화면 {p}번을 만들어 주세요." if a != 1 else f"  화면 {p}번을   만들어 주세요. "  # same, normalised
            rows.append({"instruction": prompt, "output": f'<Screen id="p{p}-a{a}"/>'})
    path = jsonl(tmp_path / "g.jsonl", rows)
    loaded = cfg(tmp_path, [(path, "alpaca")], "data.val_ratio=0.2", "data.test_ratio=0.2")
    result = prepare_dataset(loaded)
    where: dict[str, set] = {}
    for name in ("train", "val", "test"):
        for line in (result.path / f"{name}.jsonl").read_text(encoding="utf-8").splitlines():
            msgs = json.loads(line)["messages"]
            where.setdefault(" ".join(msgs[0]["content"].split()), set()).add(name)
    assert len(where) == 40 and all(len(s) == 1 for s in where.values()), {k: v for k, v in where.items() if len(v) > 1}
    groups = result.stats["prompt_groups"]
    assert sum(groups.values()) == 40 and all(groups[n] > 0 for n in ("train", "val", "test"))
    assert sum(result.stats["splits"].values()) == len(rows)
    again = prepare_dataset(loaded, force=True)
    assert (again.path / "test.jsonl").read_text() == (result.path / "test.jsonl").read_text()


def test_a_killed_force_rewrite_leaves_the_old_folder_whole(tmp_path):
    """`--force` builds beside the old folder and swaps: killed while the old copy is being deleted (SIGKILL inside
    the first rmtree), the processed folder is still complete; the next run cleans up what the killed one left."""
    import subprocess
    import sys

    path = jsonl(tmp_path / "k.jsonl", [good_alpaca(i) for i in range(30)])
    overrides = [f"data.sources=[{{path: '{path}', format: alpaca}}]", f"data.output_dir={tmp_path / 'processed'}",
                 "data.test_source=null"]
    first = prepare_dataset(load_config(overrides=overrides))
    before = {p.name: p.read_bytes() for p in first.path.iterdir() if p.name not in ("stats.json", "length_hist.png")}
    code = (
        "import os, shutil, signal, sys\n"
        "from pathlib import Path\n"
        "def killing_rmtree(p, *a, **k):\n"
        "    files = sorted(f for f in Path(p).rglob('*') if f.is_file())\n"
        "    files[0].unlink()  # midway through deleting\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "shutil.rmtree = killing_rmtree\n"
        "from finetune.prepare import prepare_dataset\n"
        "from workspace.config import load_config\n"
        "prepare_dataset(load_config(overrides=sys.argv[1:]), force=True)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *overrides], capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    after = {p.name: p.read_bytes() for p in first.path.iterdir() if p.name not in ("stats.json", "length_hist.png")}
    assert after == before and (first.path / "stats.json").exists() and (first.path / "length_hist.png").exists()
    leftovers = [p.name for p in (tmp_path / "processed").iterdir() if p.name.startswith(".")]
    assert leftovers, "the killed run left its staging folder (this test must have killed it midway)"
    again = prepare_dataset(load_config(overrides=overrides))
    assert again.skipped and not [p for p in (tmp_path / "processed").iterdir() if p.name.startswith(".")]


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


def test_the_stage_key_is_the_folder_prepare_writes_and_follows_the_tokenizer_files(tmp_path):
    """The stage's cache key (computed on every pipeline run, from the tokenizer's files without loading it) names
    the folder prepare_dataset writes (which loads the tokenizer to count tokens); a changed tokenizer file changes it."""
    import shutil

    from finetune.prepare import TokenCounter, tokenizer_fingerprint, tokenizer_path
    from finetune.prepare_stage import PREPARE

    loaded = cfg(tmp_path, [(jsonl(tmp_path / "r.jsonl", [good_alpaca(i) for i in range(12)]), "alpaca")])
    assert PREPARE.cache_key(loaded, PREPARE.Inputs()) == prepare_dataset(loaded).path.name
    copy = tmp_path / "tok"
    shutil.copytree(tokenizer_path(loaded), copy, ignore=shutil.ignore_patterns("*.safetensors"))
    assert tokenizer_fingerprint(str(copy)) == TokenCounter(str(copy)).fingerprint
    before = tokenizer_fingerprint(str(copy))
    (copy / "tokenizer_config.json").write_text((copy / "tokenizer_config.json").read_text() + "\n")
    assert tokenizer_fingerprint(str(copy)) != before


def test_the_content_hash_is_the_data_not_the_settings_that_wrote_it(tmp_path):
    """A setting that changes nothing written (a looser reject threshold on clean data) gives a new folder, but the
    same content hash, and so the same finetune run key: cached adapters are found again. The hash is of the files
    training reads, as written, and stats.json records it beside the folder's inputs key."""
    from finetune.prepare import files_hash
    from finetune.train import run_key

    path = jsonl(tmp_path / "r.jsonl", [good_alpaca(i) for i in range(12)])
    first = prepare_dataset(cfg(tmp_path, [(path, "alpaca")]))
    looser = prepare_dataset(cfg(tmp_path, [(path, "alpaca")], "data.max_reject_ratio=0.5"))
    assert looser.path != first.path and not looser.skipped
    assert looser.content_hash == first.content_hash == files_hash(first.path)
    stats = json.loads((first.path / "stats.json").read_text())
    assert stats["content_hash"] == first.content_hash and stats["inputs_key"] == first.path.name
    loaded = cfg(tmp_path, [(path, "alpaca")])
    assert run_key(loaded, looser.content_hash) == run_key(loaded, first.content_hash)
    (first.path / "stats.json").write_text("{}")  # a report, not training input: the hash does not move
    assert files_hash(first.path) == first.content_hash
    (first.path / "train.jsonl").write_text((first.path / "train.jsonl").read_text()[:-1] + " \n")
    assert files_hash(first.path) != first.content_hash


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


def test_source_path_errors_name_the_key_and_the_file_that_set_it(tmp_path):
    own = tmp_path / "team.yaml"
    own.write_text(f"data:\n  sources:\n    - path: {tmp_path / 'missing.jsonl'}\n  test_source: null\n"
                   f"  output_dir: {tmp_path / 'p'}\n")
    with pytest.raises(PrepareError, match=rf"data.sources\[0\].path = .*missing.jsonl: file not found \(set in {own}\)"):
        prepare_dataset(load_config(own))


@pytest.mark.slow  # a whole flow command (Prefect's temporary server)
def test_a_directory_as_a_source_ends_with_one_line_and_exit_2(tmp_path):
    """Run as a user would: `make prepare` with a folder as a source prints one [error] line (no traceback) naming
    the key, the flag that set it and the fix, and exits with the documented code 2."""
    import subprocess
    import sys

    from workspace.paths import ROOT

    folder = tmp_path / "screens"
    folder.mkdir()
    jsonl(folder / "a.jsonl", [good_alpaca(1)])
    flag = f"data.sources=[{{path: '{folder}'}}]"
    proc = subprocess.run([sys.executable, "-m", "llmops", "prepare", "--set", flag, "--set", f"data.output_dir={tmp_path / 'p'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "Traceback" not in out and "IsADirectoryError" not in out
    (line,) = [x for x in out.splitlines() if x.startswith("[error]")]
    assert f"data.sources[0].path = {folder}: is a directory, not a file (set in --set {flag}); list each" in line
    assert "(it holds a.jsonl)" in line
