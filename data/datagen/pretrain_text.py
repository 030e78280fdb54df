"""Generate the XML-free Korean/English text the embedded base model is pretrained on.

`python -m datagen.pretrain_text` writes data/raw/pretrain/corpus.txt. It teaches the tokenizer and the model
the domain's words (entities, field labels and ids, component names) and copy patterns (a list named early in
a line is repeated later in the same line, Korean label next to field id), which is what the screen task needs
later. No line contains XML, and nothing is taken from the eval sets (KoBEST samples, held-out screens).
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

from datagen.vocab import ENTITIES, FIELDS, KINDS, container_id, screen_id, screen_title

OUT = Path(__file__).resolve().parents[1] / "raw" / "pretrain"

EVERYDAY_KO = [
    "오늘은 날씨가 맑아서 공원에 산책을 나갔다.", "회의는 오후 두 시에 시작해서 세 시에 끝났다.",
    "아침에 커피를 한 잔 마시고 일을 시작했다.", "주말에는 가족과 함께 시장에 다녀왔다.",
    "새로운 기능을 배포하기 전에 테스트를 모두 실행했다.", "고객의 문의에 친절하게 답변했다.",
    "팀원들과 점심을 먹으며 다음 일정을 이야기했다.", "비가 와서 우산을 챙겨 집을 나섰다.",
    "보고서를 정리해서 팀장에게 메일로 보냈다.", "도서관에서 책을 빌려 저녁에 읽었다.",
    "지하철이 늦게 와서 회사에 조금 늦었다.", "새 프로젝트의 일정이 다음 달로 정해졌다.",
    "서버 점검 때문에 서비스가 잠시 중단되었다.", "아이들이 운동장에서 공을 차며 놀았다.",
    "저녁에는 친구와 영화를 보고 이야기를 나누었다.", "화면 설계서를 검토하고 수정 사항을 적었다.",
]
EVERYDAY_EN = [
    "The team reviewed the release notes before the deployment.", "Every screen needs a clear title and an id.",
    "The form collects the fields the user asked for.", "We tested the build on a small machine first.",
    "The grid lists one row per record and one column per field.", "Please save the changes before you leave.",
    "The report summarises the results of the last sprint.", "A button at the bottom saves or cancels the form.",
]
COMPONENT_LINES = [
    "Screen 은 화면 전체를 뜻하고 id 와 title 을 가진다.", "Grid 는 목록 화면에서 여러 행을 보여 주는 컴포넌트이다.",
    "Form 은 등록, 수정, 상세 화면에서 입력 항목을 담는다.", "Column 은 Grid 안의 열 하나이고 Field 는 Form 안의 항목 하나이다.",
    "Button 은 저장, 취소, 조회 같은 동작을 실행한다.", "label 은 화면에 보이는 한글 이름이고 type 은 입력 방식이다.",
    "type 에는 text, email, tel, date, number, combo, checkbox, textarea, file, time 이 있다.",
    "readonly 가 true 이면 상세 화면처럼 값을 바꿀 수 없다.",
]


def _field_list(rng: random.Random, entity: str) -> list[str]:
    pool = ENTITIES[entity][2]
    return rng.sample(pool, rng.randint(2, min(5, len(pool))))


def _screen_prose(rng: random.Random) -> str:
    entity = rng.choice(sorted(ENTITIES))
    kind = rng.choice(sorted(KINDS))
    fields = _field_list(rng, entity)
    labels = ", ".join(FIELDS[f][0] for f in fields)
    ids = ", ".join(fields)
    pairs = ", ".join(f"{FIELDS[f][0]}({f})" for f in fields)
    typed = ", ".join(f"{FIELDS[f][0]} {f} {FIELDS[f][2]}" for f in fields)
    sid, title, cid = screen_id(entity, kind), screen_title(entity, kind), container_id(entity, kind)
    en = ", ".join(FIELDS[f][1] for f in fields)
    container = KINDS[kind][3]
    templates = [
        f"{title} 화면({sid})은 {pairs} 항목을 보여 준다.",
        f"요청 항목: {labels} → 화면 항목: {labels}",
        f"필드 {labels} 는 각각 {ids} 로 저장된다.",
        f"{title} 화면의 {container} {cid} 에는 {typed} 이 차례로 놓인다.",
        f"The {ENTITIES[entity][1]} {KINDS[kind][1]} screen {sid} shows {en}.",
        f"{sid} : {labels} ; {ids} ; {labels}",
        f"{title} 화면을 만들 때 {labels} 순서대로 {ids} 를 배치한다.",
        f"항목 목록 {pairs} 를 그대로 {cid} 에 옮긴다: {pairs}",
    ]
    return rng.choice(templates)


def _attribute_lines(rng: random.Random) -> str:
    """Key="value" attribute text with indentation (as in config files and UI specs): teaches the tokenizer
    the punctuation and indentation runs of markup without any XML element in the text."""
    entity = rng.choice(sorted(ENTITIES))
    kind = rng.choice(sorted(KINDS))
    fields = _field_list(rng, entity)
    indent = " " * rng.choice([2, 4, 4, 6])
    head = f'id="{screen_id(entity, kind)}" title="{screen_title(entity, kind)}" container="{container_id(entity, kind)}"'
    attrs = " ".join(f'{f}: id="{f}" label="{FIELDS[f][0]}" type="{FIELDS[f][2]}"' for f in fields)
    return f"{indent}{head} {attrs}" if rng.random() < 0.5 else f"{indent}{attrs}"


def _everyday(rng: random.Random) -> str:
    a, b = rng.sample(EVERYDAY_KO, 2)
    return a + " " + b if rng.random() < 0.5 else a


def generate(n_lines: int = 6000, seed: int = 3) -> list[str]:
    rng = random.Random(seed)
    lines: list[str] = []
    for _ in range(n_lines):
        r = rng.random()
        if r < 0.5:
            lines.append(_screen_prose(rng))
        elif r < 0.65:
            lines.append(_attribute_lines(rng))
        elif r < 0.8:
            lines.append(_everyday(rng))
        elif r < 0.9:
            lines.append(rng.choice(EVERYDAY_EN))
        else:
            lines.append(rng.choice(COMPONENT_LINES))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=3)
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = generate(seed=args.seed)
    path = args.out / "corpus.txt"
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    tmp.replace(path)
    print(f"pretrain text: {len(lines)} lines -> {path}")


if __name__ == "__main__":
    main()
