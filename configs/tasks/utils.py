"""Helpers for the KoBEST task YAMLs in this folder (referenced with `!function utils.<name>`).

Same prompts, choices and targets as lm-evaluation-harness's kobest tasks; macro-F1 is computed here with
scikit-learn, because the harness's own kobest YAMLs load "f1" through `evaluate.load`, which needs a hub.
"""


def copa_doc_to_text(doc: dict) -> str:
    connector = {"원인": " 왜냐하면", "결과": " 그래서"}[doc["question"].strip()]
    return f"{doc['premise']} {connector}"


def copa_doc_to_target(doc: dict) -> str:
    return doc["alternative_1"] if doc["label"] == 0 else doc["alternative_2"]


def copa_doc_to_choice(doc: dict) -> list:
    return [doc["alternative_1"], doc["alternative_2"]]


def sentineg_doc_to_text(doc: dict) -> str:
    return f"문장: {doc['sentence']} 긍부정:"


def wic_doc_to_text(doc: dict) -> str:
    return f"문장1: {doc['context_1']} 문장2: {doc['context_2']} 두 문장에서 {doc['word']}가 같은 뜻으로 쓰였나?"


def hellaswag_process_docs(dataset):
    def preprocess(doc):
        return {
            "query": f"문장: {doc['context']}",
            "choices": [doc["ending_1"], doc["ending_2"], doc["ending_3"], doc["ending_4"]],
            "gold": int(doc["label"]),
        }

    return dataset.map(preprocess)


def macro_f1(items) -> float:
    """items: (gold, pred) pairs from lm-eval's passthrough `f1` metric."""
    from sklearn.metrics import f1_score

    golds, preds = zip(*items)
    return float(f1_score(golds, preds, average="macro"))
