"""The shipped data: the generators are deterministic, the committed files are their output, and every file
follows its schema (screens: alpaca + well-formed XML with one element per requested field; KoBEST: exactly
skt/kobest_v1's fields; RAG: documents and questions that point at existing documents)."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest

from datagen import corpus, kobest, pretrain_text, screens
from datagen.vocab import FIELDS
from workspace.paths import DATA_RAW


def read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.mark.parametrize("module", [screens, kobest, corpus, pretrain_text])
def test_generator_is_deterministic(module):
    assert module.generate() == module.generate()


def test_different_seed_gives_different_data():
    assert screens.generate(seed=1)[0] != screens.generate(seed=2)[0]


def test_committed_files_are_the_generators_output():
    train, test = screens.generate()
    assert read_jsonl(DATA_RAW / "screens" / "train.jsonl") == train
    assert read_jsonl(DATA_RAW / "screens" / "test.jsonl") == test
    for task, splits in kobest.generate().items():
        for split, rows in splits.items():
            assert read_jsonl(DATA_RAW / "kobest" / task / f"{split}.jsonl") == rows
    docs, qa = corpus.generate()
    assert read_jsonl(DATA_RAW / "rag" / "corpus.jsonl") == docs
    assert read_jsonl(DATA_RAW / "rag" / "qa.jsonl") == qa
    assert (DATA_RAW / "pretrain" / "corpus.txt").read_text(encoding="utf-8").splitlines() == pretrain_text.generate()


def test_screen_rows_are_alpaca_with_valid_xml_per_requested_field():
    train, test = screens.generate()
    assert len(train) >= 1000 and len(test) >= 100
    for row in train + test:
        assert set(row) == {"instruction", "input", "output", "category"}
        assert all(isinstance(v, str) for v in row.values()) and row["instruction"] and row["output"]
        root = ET.fromstring(row["output"])
        assert root.tag == "Screen" and root.get("id")
        elements = [el for el in root.iter() if el.tag in ("Column", "Field")]
        requested = (row["instruction"] + " " + row["input"])
        assert elements, row
        for el in elements:
            label = el.get("label")
            assert FIELDS[el.get("id")][0] == label
            assert label in requested  # every element was asked for, by its Korean label
        assert len({el.get("id") for el in elements}) == len(elements)


def test_held_out_field_combinations_never_occur_in_training():
    train, test = screens.generate()
    train_keys = {screens._key(r) for r in train}
    test_keys = {screens._key(r) for r in test}
    assert not train_keys & test_keys
    assert len(test_keys) >= 80  # varied, not one request repeated


KOBEST_SCHEMA = {
    "boolq": {"paragraph", "question", "label"},
    "copa": {"premise", "question", "alternative_1", "alternative_2", "label"},
    "wic": {"word", "context_1", "context_2", "label"},
    "hellaswag": {"context", "ending_1", "ending_2", "ending_3", "ending_4", "label"},
    "sentineg": {"sentence", "label"},
}
N_LABELS = {"boolq": 2, "copa": 2, "wic": 2, "hellaswag": 4, "sentineg": 2}


@pytest.mark.parametrize("task", sorted(KOBEST_SCHEMA))
def test_kobest_samples_follow_kobest_v1_schema(task):
    rows = read_jsonl(DATA_RAW / "kobest" / task / "test.jsonl")
    assert len(rows) >= 30
    labels = set()
    for row in rows:
        assert set(row) == KOBEST_SCHEMA[task]
        assert isinstance(row["label"], int) and 0 <= row["label"] < N_LABELS[task]
        labels.add(row["label"])
        assert all(isinstance(v, str) and v for k, v in row.items() if k != "label")
    assert labels == set(range(N_LABELS[task])), "every class must occur"
    if task == "copa":
        assert {r["question"] for r in rows} == {"원인", "결과"}
    if task == "hellaswag":
        for r in rows:  # four distinct endings
            assert len({r[f"ending_{i}"] for i in range(1, 5)}) == 4


def test_rag_corpus_and_qa():
    docs = read_jsonl(DATA_RAW / "rag" / "corpus.jsonl")
    qa = read_jsonl(DATA_RAW / "rag" / "qa.jsonl")
    assert len(docs) >= 100 and len(qa) >= 50
    ids = [d["id"] for d in docs]
    assert len(set(ids)) == len(ids)
    assert len({d["title"] for d in docs}) == len(docs)
    by_id = {d["id"]: d for d in docs}
    for q in qa:
        assert set(q) == {"id", "question", "answer", "doc_ids"}
        assert q["doc_ids"] and all(d in by_id for d in q["doc_ids"])
        assert q["answer"] in by_id[q["doc_ids"][0]]["text"], q  # the cited document really answers it
        assert q["question"] not in by_id[q["doc_ids"][0]]["text"]


def test_pretraining_text_has_no_xml_and_no_eval_items():
    lines = pretrain_text.generate()
    assert len(lines) >= 5000
    assert not any("<" in line and ">" in line for line in lines)
    joined = "\n".join(lines)
    for task in KOBEST_SCHEMA:
        for row in read_jsonl(DATA_RAW / "kobest" / task / "test.jsonl"):
            text = row.get("sentence") or row.get("premise") or row.get("context") or row.get("paragraph") or row["context_1"]
            assert text not in joined
