"""What every section model shares: strict (unknown keys are errors), frozen, and no boolean where a number
belongs."""
from __future__ import annotations

import types
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _unwrap(ann: Any) -> Any:
    """Optional[X] / list[X] / X | None -> X."""
    for _ in range(4):
        origin = get_origin(ann)
        if origin is list:
            ann = get_args(ann)[0]
        elif origin in (Union, types.UnionType):
            ann = next(a for a in get_args(ann) if a is not type(None))
        else:
            break
    return ann


def _numeric(annotation: Any) -> bool:
    """int or float (also inside Optional/list), not bool: the fields where YAML's true/false is a mistake."""
    ann = _unwrap(annotation)
    return ann in (int, float)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        # pydantic reads true as 1 for an int field; `finetune.lora_rank: true` is a typo, not a rank of 1
        field_info = cls.model_fields.get(info.field_name or "")
        if field_info is not None and _numeric(field_info.annotation):
            items = value if isinstance(value, list) else [value]
            if any(isinstance(v, bool) for v in items):
                raise ValueError(f"expected a number, got a boolean ({str(value).lower()}); write a number")
        return value
