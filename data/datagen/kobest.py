"""Generate KoBEST-format samples for all five tasks, in exactly the field schema of skt/kobest_v1.

`python -m datagen.kobest` writes data/raw/kobest/<task>/{train,test}.jsonl. Every sentence here was written
for this project (nothing is copied from KoBEST); the items are small and simple, enough to exercise the
evaluation path offline and to tell a broken model from a working one, not to rank real models.
Schemas: boolq {paragraph, question, label}, copa {premise, question, alternative_1, alternative_2, label},
wic {word, context_1, context_2, label}, hellaswag {context, ending_1..ending_4, label},
sentineg {sentence, label}.
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "raw" / "kobest"
TASKS = ("boolq", "copa", "wic", "hellaswag", "sentineg")

# ------------------------------------------------------------------------------------------------- boolq
ORGS = ["한빛도서관", "푸른숲연구소", "새봄병원", "누리소프트", "바다물류", "하늘항공", "초록농장", "별빛극장",
        "은하은행", "햇살유치원", "미래전자", "솔빛호텔", "다온카페", "가람출판사", "나래학교", "다솜마트"]
CITIES = ["부산", "대구", "광주", "대전", "울산", "수원", "전주", "청주", "춘천", "제주", "포항", "창원"]
BOOLQ_TEMPLATES = [
    # (paragraph, true question, false question builder)
    ("{org_t} {year}년에 {city}에서 문을 열었으며 현재 직원은 약 {n}명이다. 매년 봄에는 지역 주민을 위한 행사를 연다.",
     "{org_t} {city}에서 문을 열었는가?", "{org_t} {other_city}에서 문을 열었는가?"),
    ("{org_t} {year}년에 설립되었다. 설립 이후 {city}에 두 번째 지점을 열었고 주말에도 운영한다.",
     "{org_t} 주말에도 운영하는가?", "{org_t} {other_year}년에 설립되었는가?"),
    ("{city}에 있는 {org_t} 직원 {n}명이 일하는 곳으로, 평일 오전 9시에 문을 열고 오후 6시에 문을 닫는다.",
     "{org_t} 오전 9시에 문을 여는가?", "{org_t} 오후 9시에 문을 닫는가?"),
    ("{org_t} {year}년부터 {city} 시민에게 무료 강좌를 제공하고 있다. 강좌는 매달 첫째 주 토요일에 열린다.",
     "{org}의 강좌는 토요일에 열리는가?", "{org}의 강좌는 유료인가?"),
]

# -------------------------------------------------------------------------------------------------- copa
# (cause, effect): used in both directions ("결과": premise=cause, "원인": premise=effect)
CAUSE_EFFECT = [
    ("밤새 눈이 많이 내렸다.", "아침에 길이 미끄러웠다."),
    ("그는 점심을 거르고 일했다.", "오후에 배가 많이 고팠다."),
    ("휴대폰 배터리가 모두 닳았다.", "화면이 켜지지 않았다."),
    ("그녀는 알람을 맞추지 않았다.", "회사에 지각했다."),
    ("창문을 열어 두고 외출했다.", "방 안에 빗물이 들어왔다."),
    ("아이가 감기에 걸렸다.", "아이가 학교를 하루 쉬었다."),
    ("가게가 할인 행사를 시작했다.", "손님이 평소보다 많이 왔다."),
    ("그는 매일 달리기를 했다.", "체력이 눈에 띄게 좋아졌다."),
    ("냉장고 전원이 꺼져 있었다.", "우유가 상했다."),
    ("도로 공사가 시작되었다.", "출근길이 평소보다 막혔다."),
    ("그는 시험 공부를 열심히 했다.", "시험에서 좋은 점수를 받았다."),
    ("물을 끓이던 냄비를 잊고 있었다.", "냄비 바닥이 까맣게 탔다."),
    ("서버에 접속자가 갑자기 몰렸다.", "웹사이트가 느려졌다."),
    ("그녀는 우산을 챙기지 않았다.", "비에 옷이 흠뻑 젖었다."),
    ("회의실 예약이 겹쳤다.", "회의를 다른 방에서 열었다."),
    ("강아지가 하루 종일 혼자 있었다.", "주인이 돌아오자 강아지가 반갑게 뛰었다."),
    ("그는 커피를 여러 잔 마셨다.", "밤에 잠이 오지 않았다."),
    ("비밀번호를 다섯 번 틀렸다.", "계정이 잠겼다."),
    ("농부가 가뭄 동안 물을 주지 못했다.", "작물이 말라 버렸다."),
    ("태풍이 섬에 다가왔다.", "배편이 모두 취소되었다."),
]

# --------------------------------------------------------------------------------------------------- wic
# word -> two senses, each with two example sentences
WIC = {
    "배": (["배를 타고 섬으로 건너갔다.", "항구에 큰 배가 들어왔다."], ["저녁을 많이 먹어서 배가 부르다.", "배가 아파서 병원에 갔다."]),
    "눈": (["눈이 나빠져서 안경을 맞췄다.", "아이의 눈이 반짝였다."], ["밤사이 눈이 하얗게 쌓였다.", "올겨울에는 눈이 자주 내린다."]),
    "밤": (["밤이 깊어 거리가 조용해졌다.", "어젯밤에 잠을 설쳤다."], ["군밤 장수가 밤을 구웠다.", "산에서 밤을 한 바구니 주웠다."]),
    "차": (["새 차를 사서 출근한다.", "주차장에 차가 가득하다."], ["따뜻한 차를 한 잔 마셨다.", "손님에게 녹차를 내어 드렸다."]),
    "다리": (["다리를 다쳐서 걷기 힘들다.", "의자 다리가 하나 부러졌다."], ["강 위에 새 다리가 놓였다.", "다리를 건너면 시장이 나온다."]),
    "말": (["그의 말에 모두 웃었다.", "말을 아끼는 것이 좋을 때도 있다."], ["목장에서 말을 타 보았다.", "말이 들판을 힘차게 달렸다."]),
    "사과": (["빨간 사과를 한 입 베어 물었다.", "시장에서 사과 한 상자를 샀다."], ["늦어서 친구에게 사과했다.", "그는 진심으로 사과의 뜻을 전했다."]),
    "병": (["빈 병을 분리수거함에 넣었다.", "물을 병에 담아 두었다."], ["오랜 병을 앓고 회복했다.", "병이 나아서 다시 출근했다."]),
    "손": (["손을 깨끗이 씻었다.", "아이가 엄마 손을 꼭 잡았다."], ["오늘 가게에 손이 많이 들었다.", "귀한 손을 맞이하려고 집을 치웠다."]),
    "김": (["밥을 김에 싸서 먹었다.", "구운 김을 반찬으로 올렸다."], ["창문에 김이 서렸다.", "주전자에서 하얀 김이 올라왔다."]),
    "발": (["발이 시려서 양말을 신었다.", "발에 맞는 신발을 골랐다."], ["햇빛을 가리려고 창에 발을 쳤다.", "대나무 발 사이로 바람이 들어왔다."]),
    "벌": (["꽃밭에 벌이 날아들었다.", "벌에 쏘여 손이 부었다."], ["규칙을 어겨 벌을 받았다.", "선생님은 벌 대신 청소를 시켰다."]),
    "절": (["산속의 오래된 절을 찾았다.", "절에서 스님을 만났다."], ["설날에 어른께 절을 올렸다.", "그는 공손하게 절을 했다."]),
    "굴": (["바닷가에서 싱싱한 굴을 먹었다.", "굴을 넣어 국을 끓였다."], ["산속 굴에 박쥐가 산다.", "기차가 긴 굴을 지나갔다."]),
    "쓰다": (["편지를 정성껏 쓰다 보니 밤이 되었다.", "일기를 쓰다가 잠이 들었다."], ["약이 너무 쓰다.", "커피가 생각보다 쓰다."]),
    "묻다": (["길을 몰라 행인에게 묻다.", "모르는 것은 선생님께 묻다."], ["옷에 잉크가 묻다.", "손에 흙이 묻다."]),
}

# ---------------------------------------------------------------------------------------------- hellaswag
# (context, correct ending); wrong endings are correct endings of other scenes
HELLASWAG = [
    ("민수는 라면을 끓이려고 냄비에 물을 붓고 불을 켰다.", "물이 끓자 면과 수프를 넣었다."),
    ("지영은 도서관에서 빌린 책을 다 읽었다.", "반납일에 맞춰 책을 도서관에 돌려주었다."),
    ("아버지는 세차를 하려고 호스로 물을 뿌렸다.", "비누 거품으로 차를 문지른 뒤 헹궈 냈다."),
    ("학생들이 운동장에 모여 체육 수업을 기다렸다.", "선생님이 호루라기를 불며 준비 운동을 시켰다."),
    ("그녀는 빨래를 세탁기에서 꺼냈다.", "젖은 옷을 건조대에 하나씩 널었다."),
    ("요리사가 도마 위에 양파를 올려놓았다.", "칼로 양파를 잘게 썰기 시작했다."),
    ("개발자는 새 기능의 코드를 다 작성했다.", "테스트를 실행해 오류가 없는지 확인했다."),
    ("할머니가 화분에 씨앗을 심었다.", "매일 아침 물을 주며 싹이 트기를 기다렸다."),
    ("버스가 정류장에 멈춰 섰다.", "기다리던 사람들이 차례로 버스에 올랐다."),
    ("아이는 생일 케이크의 촛불을 바라보았다.", "소원을 빌고 힘껏 촛불을 불어 껐다."),
    ("그는 이사를 위해 짐을 상자에 담았다.", "상자마다 테이프를 붙이고 내용물을 적었다."),
    ("손님이 식당에 들어와 자리에 앉았다.", "직원이 메뉴판과 물을 가져다주었다."),
    ("수영 선수가 출발대 위에 올라섰다.", "출발 신호와 함께 물속으로 뛰어들었다."),
    ("비가 그치자 하늘이 맑아졌다.", "사람들이 우산을 접고 산책을 나섰다."),
    ("팀장은 회의를 시작하며 자료를 나누어 주었다.", "팀원들은 자료를 보며 의견을 말했다."),
    ("엄마가 김치찌개를 끓이려고 재료를 꺼냈다.", "김치와 돼지고기를 냄비에 넣고 볶았다."),
    ("사진사가 가족들에게 가까이 모이라고 했다.", "모두 웃는 순간 셔터를 눌렀다."),
    ("그는 자전거 바퀴에 바람이 빠진 것을 알았다.", "펌프로 바퀴에 바람을 다시 넣었다."),
    ("우체부가 소포를 들고 현관 앞에 섰다.", "초인종을 누르고 소포를 건네주었다."),
    ("학생은 시험지를 받자 이름을 적었다.", "첫 번째 문제부터 차근차근 풀기 시작했다."),
    ("정원사가 긴 가위를 들고 나무 앞에 섰다.", "웃자란 가지를 하나씩 잘라 냈다."),
    ("관객들이 공연장에 모두 입장했다.", "조명이 어두워지고 막이 올랐다."),
    ("그녀는 새 노트북 상자를 열었다.", "전원을 연결하고 처음으로 노트북을 켰다."),
    ("농부는 잘 익은 벼를 바라보았다.", "낫을 들고 벼를 베기 시작했다."),
    ("등산객이 산 정상에 도착했다.", "땀을 닦으며 아래 풍경을 내려다보았다."),
    ("직원이 매장 문을 열기 전에 진열대를 살폈다.", "비어 있는 칸에 새 상품을 채워 넣었다."),
    ("아이들이 눈 덮인 마당으로 뛰어나갔다.", "눈을 굴려 커다란 눈사람을 만들었다."),
    ("의사가 환자의 진료 기록을 확인했다.", "증상을 묻고 청진기로 가슴 소리를 들었다."),
    ("그는 커피 원두를 그라인더에 넣었다.", "곱게 간 원두로 커피를 내렸다."),
    ("기차가 종착역에 도착했다.", "승객들이 짐을 챙겨 차례로 내렸다."),
    ("작가는 원고의 마지막 문장을 썼다.", "처음부터 다시 읽으며 틀린 글자를 고쳤다."),
    ("축구 선수가 페널티 지점에 공을 놓았다.", "몇 걸음 물러섰다가 힘껏 공을 찼다."),
]

# ---------------------------------------------------------------------------------------------- sentineg
SUBJECTS = ["이 식당 음식", "이번 영화", "새로 산 이어폰", "이 호텔 객실", "배송 서비스", "이 책", "이 앱", "직원 응대",
            "이 카페 커피", "새 노트북", "이 공연", "이 수업", "이 운동화", "고객센터", "이 게임", "매장 분위기",
            "이 샴푸", "이 의자", "이 드라마", "택배 포장"]
POSITIVE = ["정말 만족스러웠다.", "기대 이상으로 좋았다.", "다음에도 꼭 다시 이용하고 싶다.", "친구에게 추천하고 싶을 만큼 훌륭했다.",
            "가격 대비 훌륭하다.", "아주 마음에 든다."]
NEGATIVE = ["정말 실망스러웠다.", "기대보다 훨씬 별로였다.", "다시는 이용하고 싶지 않다.", "돈이 아까울 정도였다.",
            "불편한 점이 너무 많았다.", "전혀 마음에 들지 않는다."]
NEGATED_POSITIVE = ["나쁘지 않았다.", "실망스럽지 않았다."]  # negation that flips polarity (the "neg" of SentiNeg)
NEGATED_NEGATIVE = ["좋지 않았다.", "만족스럽지 않았다.", "추천하고 싶지 않다."]


def gen_boolq(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        paragraph_t, q_true, q_false = BOOLQ_TEMPLATES[i % len(BOOLQ_TEMPLATES)]
        org, city = rng.choice(ORGS), rng.choice(CITIES)
        other_city = rng.choice([c for c in CITIES if c != city])
        year = rng.randint(1975, 2020)
        vals = dict(org=org, org_t=org + ("은" if _has_final_consonant(org) else "는"), city=city, other_city=other_city, year=year, other_year=year + rng.randint(1, 9),
                    n=rng.randint(12, 480))
        label = rng.randint(0, 1)
        out.append({"paragraph": paragraph_t.format(**vals),
                    "question": (q_true if label else q_false).format(**vals), "label": label})
    return out


def gen_copa(rng: random.Random, n: int) -> list[dict]:
    out = []
    pairs = list(CAUSE_EFFECT)
    for i in range(n):
        cause, effect = pairs[i % len(pairs)]
        other_cause, other_effect = rng.choice([p for p in pairs if p[0] != cause])
        if (i // len(pairs)) % 2 == 0:
            premise, question, right, wrong = cause, "결과", effect, other_effect
        else:
            premise, question, right, wrong = effect, "원인", cause, other_cause
        label = rng.randint(0, 1)
        alts = (wrong, right) if label else (right, wrong)
        out.append({"premise": premise, "question": question,
                    "alternative_1": alts[0], "alternative_2": alts[1], "label": label})
    return out


def gen_wic(rng: random.Random, n: int) -> list[dict]:
    out = []
    words = list(WIC)
    for i in range(n):
        word = words[i % len(words)]
        sense_a, sense_b = WIC[word]
        label = rng.randint(0, 1)
        if label:
            s = rng.choice([sense_a, sense_b])
            c1, c2 = s[0], s[1]
        else:
            c1, c2 = rng.choice(sense_a), rng.choice(sense_b)
        if rng.random() < 0.5:
            c1, c2 = c2, c1
        out.append({"word": word, "context_1": c1, "context_2": c2, "label": label})
    return out


def gen_hellaswag(rng: random.Random, n: int) -> list[dict]:
    out = []
    for i in range(n):
        context, right = HELLASWAG[i % len(HELLASWAG)]
        wrongs = rng.sample([e for c, e in HELLASWAG if e != right], 3)
        label = rng.randint(0, 3)
        endings = wrongs[:label] + [right] + wrongs[label:]
        row = {"context": context}
        row.update({f"ending_{k + 1}": e for k, e in enumerate(endings)})
        row["label"] = label
        out.append(row)
    return out


def gen_sentineg(rng: random.Random, n: int) -> list[dict]:
    out = []
    seen = set()
    while len(out) < n:
        subject = rng.choice(SUBJECTS)
        kind = rng.randint(0, 3)
        phrase, label = [(rng.choice(POSITIVE), 1), (rng.choice(NEGATIVE), 0),
                         (rng.choice(NEGATED_POSITIVE), 1), (rng.choice(NEGATED_NEGATIVE), 0)][kind]
        particle = "은" if _has_final_consonant(subject) else "는"
        sentence = f"{subject}{particle} {phrase}"
        if sentence in seen:
            continue
        seen.add(sentence)
        out.append({"sentence": sentence, "label": label})
    return out


def _has_final_consonant(word: str) -> bool:
    ch = word[-1]
    return "가" <= ch <= "힣" and (ord(ch) - 0xAC00) % 28 != 0


GENERATORS = {"boolq": gen_boolq, "copa": gen_copa, "wic": gen_wic, "hellaswag": gen_hellaswag, "sentineg": gen_sentineg}
SIZES = {"test": 40, "train": 8}  # train: few-shot examples for num_fewshot > 0


def generate(seed: int = 11) -> dict[str, dict[str, list[dict]]]:
    out: dict[str, dict[str, list[dict]]] = {}
    for task in TASKS:
        rng = random.Random(f"{seed}-{task}")
        rows = GENERATORS[task](rng, SIZES["test"] + SIZES["train"])
        out[task] = {"test": rows[: SIZES["test"]], "train": rows[SIZES["test"]:]}
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--seed", type=int, default=11)
    args = ap.parse_args(argv)
    from datagen.screens import write_jsonl

    for task, splits in generate(args.seed).items():
        for split, rows in splits.items():
            write_jsonl(rows, args.out / task / f"{split}.jsonl")
    print(f"kobest: {', '.join(TASKS)} ({SIZES['test']} test + {SIZES['train']} train each) -> {args.out}")


if __name__ == "__main__":
    main()
