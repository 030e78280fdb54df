"""Generate the default finetune task: Korean instructions asking for a UI screen, answered by screen XML.

`python -m datagen.screens` writes data/raw/screens/{train,test}.jsonl (alpaca format) from a seeded
generator. The test rows' field combinations never occur in training (the held-out set measures whether the
model builds screens for requests it has not seen, not whether it remembers them).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from datagen.vocab import ENTITIES, FIELDS, KINDS, container_id, screen_id, screen_title

OUT = Path(__file__).resolve().parents[1] / "raw" / "screens"

INSTRUCTIONS = [
    "{title} 화면을 생성해주세요.",
    "{title} 화면을 만들어 주세요.",
    "{title} 화면 XML을 작성해줘.",
    "xFrame5로 {title} 화면을 구성해 주세요.",
    "{title} 화면이 필요합니다. XML로 만들어 주세요.",
    "{entity} 관리용 {kind} 화면을 생성해 주세요.",
    "{title} 화면을 xFrame5 XML로 작성해 주세요.",
    "다음 조건으로 {title} 화면을 만들어줘.",
]
INPUTS = [
    "필드: {fields}",
    "항목: {fields}",
    "{fields} 필드를 포함해 주세요.",
    "포함할 필드는 {fields}입니다.",
    "표시 항목: {fields}",
]


def render_xml(entity: str, kind: str, fields: list[str]) -> str:
    """The reference answer: a Screen root with an id, one container, one element per requested field."""
    _, _, _, container, _, buttons = KINDS[kind]
    element = "Column" if container == "Grid" else "Field"
    readonly = ' readonly="true"' if kind == "detail" else ""
    lines = [f'<Screen id="{screen_id(entity, kind)}" title="{screen_title(entity, kind)}">']
    lines.append(f'  <{container} id="{container_id(entity, kind)}">')
    for f in fields:
        label, _, widget = FIELDS[f]
        lines.append(f'    <{element} id="{f}" label="{label}" type="{widget}"{readonly}/>')
    lines.append(f"  </{container}>")
    for bid, blabel in buttons:
        lines.append(f'  <Button id="{bid}" label="{blabel}"/>')
    lines.append("</Screen>")
    return "\n".join(lines)


def _example(rng: random.Random, entity: str, kind: str, fields: list[str]) -> dict:
    labels = ", ".join(FIELDS[f][0] for f in fields)
    instruction = rng.choice(INSTRUCTIONS).format(
        title=screen_title(entity, kind), entity=ENTITIES[entity][0], kind=KINDS[kind][0])
    text_input = rng.choice(INPUTS).format(fields=labels)
    if rng.random() < 0.2:  # some requests put everything in the instruction
        instruction, text_input = f"{instruction} {text_input}", ""
    return {
        "instruction": instruction,
        "input": text_input,
        "output": render_xml(entity, kind, fields),
        "category": kind,
    }


def generate(n_train: int = 1200, n_test: int = 200, seed: int = 7, test_share: float = 0.15) -> tuple[list[dict], list[dict]]:
    """Deterministic for a seed. A field combination (as a set, per entity and kind) is held out whole."""
    rng = random.Random(seed)
    entities = sorted(ENTITIES)
    kinds = sorted(KINDS)
    train: list[dict] = []
    test: list[dict] = []
    assignment: dict[tuple, str] = {}
    test_uses: dict[tuple, int] = {}
    guard = 0
    while len(train) < n_train or len(test) < n_test:
        guard += 1
        if guard > 200_000:
            raise RuntimeError("screen generator could not fill the requested sizes; lower n_train/n_test")
        entity = rng.choice(entities)
        kind = rng.choice(kinds)
        pool = ENTITIES[entity][2]
        k = rng.randint(2, min(5, len(pool)))
        fields = rng.sample(pool, k)
        key = (entity, kind, frozenset(fields))
        if key not in assignment:
            assignment[key] = "test" if rng.random() < test_share else "train"
        row = _example(rng, entity, kind, fields)
        if assignment[key] == "train" and len(train) < n_train:
            train.append(row)
        elif assignment[key] == "test" and len(test) < n_test and test_uses.get(key, 0) < 2:
            test_uses[key] = test_uses.get(key, 0) + 1  # at most two phrasings of one held-out request
            test.append(row)
    return train, test


def _key(row: dict) -> tuple:
    """Recover (entity, kind, field set) from a row's reference XML (used by tests to check the hold-out)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(row["output"])
    sid = root.get("id")
    kind = next(k for k, v in KINDS.items() if sid.endswith(v[2]))
    entity = sid[: -len(KINDS[kind][2])]
    fields = frozenset(el.get("id") for el in root.iter() if el.tag in ("Column", "Field"))
    return entity, kind, fields


def write_jsonl(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=7)
    args = ap.parse_args(argv)
    train, test = generate(seed=args.seed)
    write_jsonl(train, args.out / "train.jsonl")
    write_jsonl(test, args.out / "test.jsonl")
    print(f"screens: {len(train)} train, {len(test)} test -> {args.out}")


if __name__ == "__main__":
    main()
