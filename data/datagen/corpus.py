"""Generate the RAG corpus (short Korean internal documents of a fictional company) and its QA set.

`python -m datagen.corpus` writes data/raw/rag/corpus.jsonl ({id, title, text, source}) and
data/raw/rag/qa.jsonl ({id, question, answer, doc_ids}). Each question is phrased differently from the
sentence that answers it, and names the subject of exactly one document, so hit@k is well defined.
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "raw" / "rag"

PREFIXES = ["해오름", "가온", "누리", "한결", "미르", "아라", "다올", "새벽", "온새미", "라온", "별하", "채움",
            "이음", "나린", "도담", "마루", "보람", "슬기", "여울", "윤슬"]
SYSTEMS = ["주문관리", "인사관리", "재고관리", "회계", "고객상담", "배송추적"]
TEAMS = ["플랫폼팀", "인프라팀", "데이터팀", "보안팀", "고객경험팀", "재무시스템팀", "물류개발팀", "모바일팀"]
DAYS = ["월요일", "화요일", "수요일", "목요일", "금요일", "토요일", "일요일"]
ROOMS = ["한라", "백두", "설악", "지리", "태백", "소백", "덕유", "오대", "속리", "계룡"]
CITIES = ["부산", "대구", "광주", "대전", "울산", "제주", "강릉", "전주", "여수", "춘천"]


def _system_doc(rng, name, i):
    team, port, hour, day = rng.choice(TEAMS), rng.randint(3000, 9899), rng.randint(0, 5), rng.choice(DAYS)
    year = rng.randint(2015, 2025)
    text = (f"{name} 시스템은 {year}년에 도입되었으며 {team}이 운영을 맡고 있다. "
            f"서비스는 내부망의 {port}번 포트로 제공된다. 정기 백업은 매일 새벽 {hour}시에 수행되고, "
            f"정기 점검은 매주 {day} 밤에 진행된다. 장애가 나면 {team} 당직자에게 먼저 연락한다.")
    qa = [(f"{name} 시스템 운영은 어느 팀 담당이야?", team),
          (f"{name} 시스템 백업은 몇 시에 돌아가나요?", f"새벽 {hour}시")]
    return f"{name} 시스템 운영 안내", text, qa


def _room_doc(rng, name, i):
    floor, seats, limit = rng.randint(2, 19), rng.choice([4, 6, 8, 10, 12, 20]), rng.choice([2, 3, 4])
    text = (f"{name} 회의실은 본관 {floor}층에 있으며 최대 {seats}명이 사용할 수 있다. "
            f"예약은 사내 포털에서 하며 한 번에 최대 {limit}시간까지 잡을 수 있다. "
            f"화상회의 장비가 갖춰져 있고, 사용 후에는 화이트보드를 지워야 한다.")
    qa = [(f"{name} 회의실은 몇 층에 있나요?", f"{floor}층"),
          (f"{name} 회의실에는 몇 명까지 들어갈 수 있어?", f"{seats}명")]
    return f"{name} 회의실 이용 안내", text, qa


def _office_doc(rng, name, i):
    city = rng.choice(CITIES)
    staff, opened = rng.randint(8, 150), rng.randint(2005, 2024)
    text = (f"{name} 지사는 {city}에 있는 사무소로 {opened}년에 문을 열었다. 현재 {staff}명이 근무하며 "
            f"주로 영업과 고객 지원 업무를 맡는다. 방문객은 1층 안내데스크에서 출입증을 받아야 한다.")
    qa = [(f"{name} 지사는 어느 도시에 있습니까?", city),
          (f"{name} 지사에는 직원이 몇 명이나 일해?", f"{staff}명")]
    return f"{name} 지사 소개", text, qa


def _policy_doc(rng, name, i):
    days, amount = rng.randint(3, 15), rng.choice([30, 50, 70, 100, 150, 200])
    approver = rng.choice(["팀장", "본부장", "인사팀장", "대표이사"])
    text = (f"{name} 제도는 직원 복지를 위한 사내 규정이다. 신청은 사용 예정일 {days}일 전까지 해야 하며 "
            f"{approver}의 승인을 받아야 한다. 1인당 연간 지원 한도는 {amount}만 원이다.")
    qa = [(f"{name} 제도를 쓰려면 누구 승인이 필요하죠?", approver),
          (f"{name} 제도의 1년 지원 한도는 얼마예요?", f"{amount}만 원")]
    return f"{name} 제도 규정", text, qa


def _project_doc(rng, name, i):
    lead_team, month, budget = rng.choice(TEAMS), rng.randint(1, 12), rng.randint(2, 90)
    text = (f"{name} 프로젝트는 {lead_team}이 주관하며 {month}월에 시작했다. 예산은 {budget}억 원이고, "
            f"목표는 업무 화면을 새 프레임워크로 옮기는 것이다. 진행 상황은 격주 금요일 회의에서 공유한다.")
    qa = [(f"{name} 프로젝트를 주관하는 팀은?", lead_team),
          (f"{name} 프로젝트 예산 규모가 어떻게 되나요?", f"{budget}억 원")]
    return f"{name} 프로젝트 개요", text, qa


KINDS = [("시스템", _system_doc), ("회의실", _room_doc), ("지사", _office_doc), ("제도", _policy_doc),
         ("프로젝트", _project_doc)]


def generate(n_docs: int = 120, seed: int = 5) -> tuple[list[dict], list[dict]]:
    rng = random.Random(seed)
    docs, qa = [], []
    used = set()
    i = 0
    while len(docs) < n_docs:
        kind, builder = KINDS[i % len(KINDS)]
        i += 1
        base = rng.choice(PREFIXES)
        name = base + (rng.choice(SYSTEMS) if kind == "시스템" else rng.choice(ROOMS) if kind == "회의실" else "")
        if (kind, name) in used:
            continue
        used.add((kind, name))
        doc_id = f"doc-{len(docs) + 1:03d}"
        title, text, questions = builder(rng, name, i)
        docs.append({"id": doc_id, "title": title, "text": text, "source": f"handbook/{kind}/{doc_id}.md"})
        if len(docs) % 2 == 1:  # one question for every other document, alternating the asked fact
            q, a = questions[(len(docs) // 2) % 2]
            qa.append({"id": f"q-{len(qa) + 1:03d}", "question": q, "answer": a, "doc_ids": [doc_id]})
    return docs, qa


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    from datagen.screens import write_jsonl

    docs, qa = generate(seed=args.seed)
    write_jsonl(docs, args.out / "corpus.jsonl")
    write_jsonl(qa, args.out / "qa.jsonl")
    print(f"rag: {len(docs)} documents, {len(qa)} questions -> {args.out}")


if __name__ == "__main__":
    main()
