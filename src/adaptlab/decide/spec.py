"""What `adaptlab decide` is asked: the model, the data, the time it may take and the hardware the user
will train on. Written to OUT/decide.yaml, so a second invocation with the same settings resumes.

    python -c "from adaptlab.decide.spec import DecideSpec; print(DecideSpec.model_json_schema()['required'])"
"""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

from adaptlab.errors import UserError

METHODS = ("full", "lora", "dora", "qlora")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|hr|d)?\s*$")
_SECONDS = {None: 1.0, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """'20m', '2h', '90s', '1.5h' or plain seconds -> seconds."""
    m = _DURATION.match(str(text).lower())
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--time {text!r}: give a positive duration such as 90s, 20m or 2h")
    return float(m.group(1)) * _SECONDS[m.group(2)]


def parse_tokens(text: str) -> int:
    """'50M', '2B', '300k' or a plain count -> tokens."""
    m = re.match(r"^\s*(\d+(?:\.\d+)?)\s*([kKmMbBgG]?)\s*$", str(text))
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}
    if not m or float(m.group(1)) <= 0:
        raise UserError(f"--target-tokens {text!r}: give a positive count such as 300k, 50M or 2B")
    return int(float(m.group(1)) * scale[m.group(2).lower()])


class DecideSpec(BaseModel):
    """A decision's settings. The pilot (this machine) trains at batch x seq_len; the answer is for the
    target hardware (memory, gpus, device) at target_tokens."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    model: str
    data: list[str]
    text_field: str = "text"
    general: list[str] = Field(default_factory=list)
    """General-domain text: forgetting as its NLL increase; without it, drift KL(base || tuned)."""
    time_s: float = Field(gt=0)
    """Wall time the whole decision may take on this machine (or cluster)."""
    target_tokens: int | None = Field(None, gt=0)
    """The budget the user will really train at; the pilot's budgets are extrapolated to it."""
    memory: str | None = None
    """Memory per device of the target hardware (e.g. 80GiB); default: this machine's."""
    gpus: int = Field(1, ge=1)
    device: str | None = None
    """Target device type (cpu or cuda); default: this machine's."""
    methods: list[str] = Field(default_factory=lambda: ["full", "lora"])
    rank: int = Field(16, ge=1)
    targets: str = "all-linear"
    batch: int = Field(4, ge=1)
    seq_len: int = Field(128, ge=8)
    lr_candidates: int | None = Field(None, ge=2, le=8)
    """LR candidates per method; default: as many (2-4) as the time allows."""
    seeds: int | None = Field(None, ge=1, le=8)
    """Replicates of each method's winner at every pilot budget; default: as many (1-3) as time allows."""
    budgets: int | None = Field(None, ge=1, le=5)
    """Pilot budgets (the search's rungs, each reduction_factor x the last); default 2-3."""
    reduction_factor: int = Field(2, ge=2, le=4)
    eval_docs: int = Field(32, ge=4)
    """Held-out target documents (and general documents) scored per evaluated run."""
    seed: int = Field(0, ge=0)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str]) -> list[str]:
        bad = [m for m in v if m not in METHODS]
        if bad:
            raise ValueError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
        if len(set(v)) != len(v) or len(v) < 2:
            raise ValueError("give at least two different methods to decide between")
        return v

    @field_validator("data")
    @classmethod
    def _data(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("give the target-domain data (--data)")
        return v

    @field_validator("device")
    @classmethod
    def _device(cls, v: str | None) -> str | None:
        if v is not None and v not in ("cpu", "cuda"):
            raise ValueError("device is cpu or cuda")
        return v
