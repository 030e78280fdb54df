"""The screen domain shared by the generators: business entities, their fields and screen kinds.

Written for this project (in the spirit of the seeds' xFrame5 screens); read by datagen.screens and
datagen.pretrain_text so the base model's tokenizer sees the same words the finetune task uses.
"""
from __future__ import annotations

# field id -> (Korean label, English label, widget type)
FIELDS: dict[str, tuple[str, str, str]] = {
    "name": ("이름", "name", "text"),
    "email": ("이메일", "email", "email"),
    "phone": ("전화번호", "phone number", "tel"),
    "address": ("주소", "address", "text"),
    "zipCode": ("우편번호", "zip code", "text"),
    "birthDate": ("생년월일", "birth date", "date"),
    "gender": ("성별", "gender", "combo"),
    "regDate": ("등록일", "registration date", "date"),
    "modDate": ("수정일", "modified date", "date"),
    "status": ("상태", "status", "combo"),
    "useYn": ("사용여부", "in use", "checkbox"),
    "remark": ("비고", "remark", "textarea"),
    "title": ("제목", "title", "text"),
    "content": ("내용", "content", "textarea"),
    "writer": ("작성자", "writer", "text"),
    "viewCount": ("조회수", "view count", "number"),
    "attachment": ("첨부파일", "attachment", "file"),
    "category": ("카테고리", "category", "combo"),
    "amount": ("금액", "amount", "number"),
    "quantity": ("수량", "quantity", "number"),
    "unitPrice": ("단가", "unit price", "number"),
    "productName": ("상품명", "product name", "text"),
    "productCode": ("상품코드", "product code", "text"),
    "orderNo": ("주문번호", "order number", "text"),
    "orderDate": ("주문일", "order date", "date"),
    "payMethod": ("결제수단", "payment method", "combo"),
    "deliveryStatus": ("배송상태", "delivery status", "combo"),
    "trackingNo": ("송장번호", "tracking number", "text"),
    "deptName": ("부서명", "department", "text"),
    "position": ("직급", "position", "combo"),
    "hireDate": ("입사일", "hire date", "date"),
    "empNo": ("사번", "employee number", "text"),
    "manager": ("담당자", "manager", "text"),
    "companyName": ("회사명", "company name", "text"),
    "bizNo": ("사업자번호", "business number", "text"),
    "startDate": ("시작일", "start date", "date"),
    "endDate": ("종료일", "end date", "date"),
    "approved": ("승인여부", "approved", "checkbox"),
    "rating": ("평점", "rating", "number"),
    "stockQty": ("재고수량", "stock quantity", "number"),
    "warehouse": ("창고", "warehouse", "combo"),
    "roomName": ("회의실", "meeting room", "combo"),
    "reserveTime": ("예약시간", "reservation time", "time"),
    "couponCode": ("쿠폰코드", "coupon code", "text"),
    "discountRate": ("할인율", "discount rate", "number"),
    "answer": ("답변", "answer", "textarea"),
    "progress": ("진행률", "progress", "number"),
    "budget": ("예산", "budget", "number"),
    "destination": ("출장지", "destination", "text"),
    "leaveType": ("휴가종류", "leave type", "combo"),
    "days": ("일수", "days", "number"),
    "serialNo": ("일련번호", "serial number", "text"),
    "location": ("위치", "location", "text"),
}

# entity id -> (Korean name, English name, fields that make sense for it)
ENTITIES: dict[str, tuple[str, str, list[str]]] = {
    "member": ("회원", "member", ["name", "email", "phone", "address", "zipCode", "birthDate", "gender", "regDate", "status", "useYn"]),
    "order": ("주문", "order", ["orderNo", "orderDate", "productName", "quantity", "amount", "payMethod", "status", "name", "address"]),
    "product": ("상품", "product", ["productCode", "productName", "category", "unitPrice", "stockQty", "useYn", "regDate", "remark"]),
    "notice": ("공지사항", "notice", ["title", "content", "writer", "regDate", "viewCount", "attachment", "useYn"]),
    "post": ("게시글", "post", ["title", "content", "writer", "category", "regDate", "viewCount", "attachment"]),
    "employee": ("직원", "employee", ["empNo", "name", "deptName", "position", "hireDate", "email", "phone", "status"]),
    "dept": ("부서", "department", ["deptName", "manager", "phone", "location", "useYn", "regDate", "remark"]),
    "customer": ("고객", "customer", ["name", "companyName", "email", "phone", "address", "manager", "regDate", "remark"]),
    "stock": ("재고", "stock", ["productCode", "productName", "warehouse", "stockQty", "unitPrice", "modDate"]),
    "payment": ("결제", "payment", ["orderNo", "amount", "payMethod", "status", "regDate", "approved"]),
    "delivery": ("배송", "delivery", ["orderNo", "trackingNo", "deliveryStatus", "address", "zipCode", "name", "phone"]),
    "reservation": ("예약", "reservation", ["roomName", "reserveTime", "name", "startDate", "endDate", "status", "remark"]),
    "coupon": ("쿠폰", "coupon", ["couponCode", "discountRate", "startDate", "endDate", "useYn", "category"]),
    "partner": ("거래처", "partner", ["companyName", "bizNo", "manager", "phone", "email", "address", "useYn"]),
    "project": ("프로젝트", "project", ["title", "manager", "startDate", "endDate", "budget", "progress", "status"]),
    "inquiry": ("문의", "inquiry", ["title", "content", "writer", "category", "regDate", "answer", "status"]),
    "review": ("리뷰", "review", ["productName", "writer", "rating", "content", "regDate", "approved"]),
    "contract": ("계약", "contract", ["companyName", "title", "amount", "startDate", "endDate", "manager", "attachment"]),
    "equipment": ("장비", "equipment", ["serialNo", "productName", "location", "manager", "status", "regDate"]),
    "leave": ("휴가", "leave", ["empNo", "name", "leaveType", "startDate", "endDate", "days", "approved"]),
    "trip": ("출장", "business trip", ["empNo", "name", "destination", "startDate", "endDate", "budget", "approved"]),
    "training": ("교육", "training", ["title", "manager", "startDate", "endDate", "location", "budget", "status"]),
}

# screen kind -> (Korean suffix, English word, id suffix, container tag, container id prefix, buttons)
KINDS: dict[str, tuple[str, str, str, str, str, list[tuple[str, str]]]] = {
    "list": ("목록", "list", "List", "Grid", "grd", [("btnSearch", "조회"), ("btnExcel", "엑셀")]),
    "register": ("등록", "registration", "Register", "Form", "frm", [("btnSave", "저장"), ("btnCancel", "취소")]),
    "detail": ("상세", "detail", "Detail", "Form", "frm", [("btnList", "목록")]),
    "edit": ("수정", "edit", "Edit", "Form", "frm", [("btnSave", "저장"), ("btnDelete", "삭제")]),
}


def screen_id(entity: str, kind: str) -> str:
    return entity + KINDS[kind][2]


def screen_title(entity: str, kind: str) -> str:
    return f"{ENTITIES[entity][0]} {KINDS[kind][0]}"


def container_id(entity: str, kind: str) -> str:
    return KINDS[kind][4] + entity[0].upper() + entity[1:]
