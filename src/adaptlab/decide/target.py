"""The hardware the user will train on: which methods fit it, their peak memory there, and their time
at the target budget where it can be estimated (the target is this machine, or a device it has).

    python -c "from adaptlab.decide.target import Target; help(Target)"
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from adaptlab.decide.spec import DecideSpec
from adaptlab.errors import UserError


@dataclass
class Target:
    where: str
    methods: dict[str, dict[str, Any]]
    notes: list[str] = field(default_factory=list)

    def fits(self, method: str) -> bool:
        return bool(self.methods.get(method, {}).get("fits"))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def target_hardware(spec: DecideSpec, local: dict[str, Any]) -> Target:
    """Target from spec.memory / gpus / device; `local` is plan.planner.plan on this machine at the
    pilot's batch and seq_len (its memory and step time serve when the target is this machine)."""
    from adaptlab.plan import parse_memory

    here = str(local["setup"]["device"]).split(":")[0]
    limit = parse_memory(spec.memory) if spec.memory else None
    if spec.gpus == 1 and spec.device in (None, here):
        return _this_machine(spec, local, here, limit)
    if limit is None:
        raise UserError(
            f"--gpus {spec.gpus} --device {spec.device or here}: give each device's memory with --memory "
            "(e.g. 80GiB); this machine cannot measure a device it does not have"
        )
    from adaptlab.plan.world import plan_world

    world = plan_world(
        spec.model,
        spec.gpus,
        limit,
        batch=max(spec.batch, spec.gpus),
        seq_len=spec.seq_len,
        rank=spec.rank,
        targets=spec.targets,
        precision="bf16",
    )
    methods = {}
    for m in spec.methods:
        entry = world["methods"].get(m, {})
        peaks = {s: entry[s]["peak_mem_bytes"] for s in world["strategies"] if entry.get(s)}
        strategy = entry.get("strategy")
        methods[m] = {
            "fits": strategy is not None,
            "strategy": strategy,
            "peak_mem_bytes": peaks.get(strategy) if strategy else min(peaks.values(), default=None),
            "time_s": None,
        }
    where = f"{spec.gpus} x {spec.device or 'cuda'}, {_gib(limit)} each"
    notes = [
        f"{m} does not fit {where} (about {_gib(v['peak_mem_bytes'])} per device)"
        for m, v in methods.items()
        if not v["fits"] and v["peak_mem_bytes"]
    ]
    notes.append("time on the target is not estimated: this machine does not have its devices")
    return Target(where, methods, notes)


def _this_machine(spec: DecideSpec, local: dict[str, Any], here: str, limit: int | None) -> Target:
    per_step = spec.batch * spec.seq_len
    available = limit or local["setup"].get("memory_limit_bytes")
    methods = {}
    for m in spec.methods:
        entry = local["methods"].get(m)
        if entry is None:
            raise UserError(f"the planner has no estimate for method {m}")
        peak = int(entry["peak_mem_bytes"])
        fits = bool(entry["fits"]) if limit is None else peak <= limit
        time_s = entry["step_s"] * spec.target_tokens / per_step if spec.target_tokens else None
        methods[m] = {"fits": fits, "strategy": None, "peak_mem_bytes": peak, "time_s": time_s}
    where = f"this machine ({here}" + (f", {_gib(available)}" if available else "") + ")"
    notes = [
        f"{m} does not fit {where}: it needs about {_gib(v['peak_mem_bytes'])}"
        for m, v in methods.items()
        if not v["fits"]
    ]
    return Target(where, methods, notes)
