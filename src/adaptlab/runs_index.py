"""The runs index: every run directory and comparison under a root, listed, filtered and sorted fast.

A run directory is found by its config.yaml and metrics.jsonl (or summary.json), a comparison by its
results.json or compare.yaml. What `adaptlab runs` shows of each is read from its files once and kept
in an SQLite index with the files' mtimes and sizes; a later listing re-reads only the directories
whose files changed. The index lives in adaptlab's cache ($ADAPTLAB_CACHE or ~/.cache/adaptlab,
runs-index/), never among the user's files; deleting it only costs one full re-read. A directory
whose files do not parse is listed with status `corrupt` and the reason, never fails the listing.

No torch here: `adaptlab runs` answers in well under a second on a thousand runs.

    python -c "from adaptlab.runs_index import list_runs; print(list_runs(['.'])[:3])"
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import sqlite3
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

from adaptlab.errors import UserError
from adaptlab.hub import cache_dir

SCHEMA_VERSION = 1
WATCHED = ("config.yaml", "metrics.jsonl", "summary.json", "eval.json", "results.json", "compare.yaml")
"""The files of a run or comparison whose mtimes and sizes say whether its record is still fresh."""
SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's safe loader when PyYAML has it (10x faster on a first index of thousands of runs)."""
NOT_RUNS = {"adapter", "model", "checkpoints", "tensorboard", "mlruns", "wandb", "plots", "__pycache__"}
"""Folders that never hold a run (a run's own parts, tracker stores) and are not walked into."""

FIELDS = {
    "path": str,
    "kind": str,
    "status": str,
    "method": str,
    "base": str,
    "data": str,
    "tokens": float,
    "steps": float,
    "final_train_loss": float,
    "final_val_loss": float,
    "learning": float,
    "forgetting": float,
    "peak_mem_bytes": float,
    "wall_s": float,
    "mtime": float,
}
"""Every field of a record, with the type a `--where` value is compared as."""


# ----------------------------------------------------------------------------------------------
# find and read


def is_run_dir(path: Path, names: set[str]) -> bool:
    return "config.yaml" in names and ("metrics.jsonl" in names or "summary.json" in names)


def is_comparison_dir(names: set[str]) -> bool:
    return "results.json" in names or ("compare.yaml" in names and "runs" in names)


def discover(root: Path) -> Iterator[tuple[Path, str]]:
    """(directory, "run" | "comparison") under root, recursively; a run's own folders are not walked."""
    for dirpath, dirnames, filenames in os.walk(root):
        names = set(filenames)
        here = Path(dirpath)
        if is_comparison_dir(names):
            yield here, "comparison"
        elif is_run_dir(here, names):
            yield here, "run"
            dirnames[:] = []
            continue
        dirnames[:] = sorted(d for d in dirnames if d not in NOT_RUNS and not d.startswith("."))


def signature(path: Path) -> str:
    """mtime and size of every watched file: a record is re-read when this changes."""
    parts = []
    for name in WATCHED:
        try:
            st = (path / name).stat()
        except OSError:
            continue
        parts.append(f"{name}:{st.st_mtime_ns}:{st.st_size}")
    return "|".join(parts)


class Corrupt(Exception):
    """A run or comparison file that does not parse; the message says which and why."""


def _json(path: Path, required: bool = False) -> dict[str, Any]:
    if not path.exists():
        if required:
            raise Corrupt(f"{path.name} is missing")
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        raise Corrupt(f"{path.name} is not valid JSON") from None
    if not isinstance(data, dict):
        raise Corrupt(f"{path.name} is not a JSON object")
    return data


def _yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.load(path.read_text(), Loader=SAFE_LOADER)
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise Corrupt(f"{path.name} is not valid YAML") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise Corrupt(f"{path.name} is not a mapping")
    return data


def _section(config: dict[str, Any], name: str) -> dict[str, Any]:
    value = config.get(name)
    return value if isinstance(value, dict) else {}


def _last_rows(path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """The last train row and the last eval row of metrics.jsonl (a cut last line is ignored)."""
    train: dict[str, Any] = {}
    val: dict[str, Any] = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError):
        return train, val
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            break
        if isinstance(row, dict):
            if "val_loss" in row:
                val = row
            elif "loss" in row:
                train = row
    return train, val


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def learning_forgetting(ev: dict[str, Any]) -> tuple[float | None, float | None]:
    """learning = -target.delta.nll; forgetting = general.delta.nll, else drift.kl (eval.json's schema)."""
    learning = forgetting = None
    target, general, drift = (
        ev.get(k) if isinstance(ev.get(k), dict) else {} for k in ("target", "general", "drift")
    )
    if isinstance(target.get("delta"), dict) and _number(target["delta"].get("nll")) is not None:
        learning = -float(target["delta"]["nll"])
    if isinstance(general.get("delta"), dict) and _number(general["delta"].get("nll")) is not None:
        forgetting = float(general["delta"]["nll"])
    elif _number(drift.get("kl")) is not None:
        forgetting = float(drift["kl"])
    return learning, forgetting


def read_run(path: Path) -> dict[str, Any]:
    """The record of one run directory (raises Corrupt)."""
    config = _yaml(path / "config.yaml")
    finished = (path / "summary.json").exists()
    summary = _json(path / "summary.json")
    train_row, val_row = _last_rows(path / "metrics.jsonl")
    learning, forgetting = learning_forgetting(_json(path / "eval.json"))
    data = _section(config, "data").get("train") or []
    return {
        "kind": "run",
        "status": "finished" if finished else "unfinished",
        "method": summary.get("method") or _section(config, "method").get("method"),
        "base": summary.get("base_model") or _section(config, "model").get("name"),
        "data": ", ".join(map(str, data)) if isinstance(data, list) else str(data),
        "tokens": _number(summary.get("tokens_seen", train_row.get("tokens"))),
        "steps": _number(summary.get("steps", train_row.get("step"))),
        "final_train_loss": _number(summary.get("final_train_loss", train_row.get("loss"))),
        "final_val_loss": _number(summary.get("final_val_loss", val_row.get("val_loss"))),
        "learning": learning,
        "forgetting": forgetting,
        "peak_mem_bytes": _number(summary.get("peak_mem_bytes", train_row.get("mem_bytes"))),
        "wall_s": _number(summary.get("wall_s", train_row.get("elapsed_s"))),
    }


def read_comparison(path: Path) -> dict[str, Any]:
    """The record of one comparison: its study, model, budget and recommended arm."""
    results = _json(path / "results.json")
    rec = results.get("recommendation") if isinstance(results.get("recommendation"), dict) else {}
    data = results.get("data")
    if isinstance(data, dict):  # results.json: {"target": [...], "general": [...], ...}
        data = data.get("target")
    return {
        "kind": "comparison",
        "status": "finished" if results else "unfinished",
        "method": f"study:{results.get('study')}" if results.get("study") else None,
        "base": results.get("model"),
        "data": ", ".join(map(str, data)) if isinstance(data, list) else data,
        "tokens": _number(results.get("budget_tokens")),
        "pick": rec.get("pick"),
        "recommendation": rec.get("summary"),
    }


def read_record(path: Path, kind: str) -> dict[str, Any]:
    """A record for path; a directory whose files do not parse gets status `corrupt` and the reason."""
    base: dict[str, Any] = dict.fromkeys(FIELDS)
    try:
        record = read_run(path) if kind == "run" else read_comparison(path)
    except Corrupt as err:
        record = {"kind": kind, "status": "corrupt", "error": str(err)}
    except (OSError, TypeError, AttributeError, ValueError) as err:  # files of an unexpected shape
        record = {"kind": kind, "status": "corrupt", "error": f"unreadable ({type(err).__name__})"}
    return {**base, **record}


# ----------------------------------------------------------------------------------------------
# the SQLite index


def index_path(root: Path) -> Path:
    """One index file per root directory, named by a hash of its absolute path."""
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24]
    return cache_dir() / "runs-index" / f"{key}.sqlite"


def _connect(path: Path) -> sqlite3.Connection:
    """The index database; one that is unreadable or of another schema is rebuilt (it is only a cache).
    Where the cache cannot be written, an in-memory index serves this listing."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        path = Path(":memory:")
    for _ in range(2):
        try:
            db = sqlite3.connect(path, timeout=2.0)
            if db.execute("PRAGMA user_version").fetchone()[0] != SCHEMA_VERSION:
                db.execute("DROP TABLE IF EXISTS runs")
                db.execute("CREATE TABLE runs (path TEXT PRIMARY KEY, sig TEXT, record TEXT)")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                db.commit()
            return db
        except sqlite3.OperationalError:  # locked by another listing, or not writable: a private index
            path = Path(":memory:")
        except sqlite3.DatabaseError:  # not a database (damaged): rebuild it
            path.unlink(missing_ok=True)
    return sqlite3.connect(":memory:")


def refresh(root: Path) -> list[dict[str, Any]]:
    """Every record under root, re-reading only directories whose watched files changed."""
    if not root.is_dir():
        raise UserError(f"{root}: no such directory")
    db = _connect(index_path(root))
    try:
        known = {p: (sig, rec) for p, sig, rec in db.execute("SELECT path, sig, record FROM runs")}
        records, changed = [], []
        for path, kind in discover(root):
            key, sig = str(path.relative_to(root)), signature(path)
            old = known.pop(key, None)
            if old is not None and old[0] == sig:
                record = json.loads(old[1])
            else:
                record = {**read_record(path, kind), "mtime": _mtime(path)}
                changed.append((key, sig, json.dumps(record)))
            records.append({**record, "path": os.path.normpath(root / key)})
        with contextlib.suppress(sqlite3.OperationalError):  # another listing holds the index: skip saving
            db.executemany("INSERT OR REPLACE INTO runs VALUES (?, ?, ?)", changed)
            db.executemany("DELETE FROM runs WHERE path = ?", [(p,) for p in known])
            db.commit()
    finally:
        db.close()
    return records


def _mtime(path: Path) -> float:
    times = []
    for name in WATCHED:
        try:
            times.append((path / name).stat().st_mtime)
        except OSError:
            continue
    return max(times, default=0.0)


# ----------------------------------------------------------------------------------------------
# filter and sort

CONDITION = re.compile(r"^\s*([A-Za-z_]+)\s*(<=|>=|==|!=|<|>|=)\s*(.+?)\s*$")


def parse_where(text: str) -> list[tuple[str, str, Any]]:
    """`forgetting<0.05 and method==lora` as [(field, op, value)]; `and` or `,` join conditions.

    A small parser, not eval: FIELD OP VALUE with OP one of < <= > >= == = !=, VALUE a number or a word.
    """
    conditions = []
    for part in re.split(r",|\band\b", text):
        if not part.strip():  # '', 'a<1,' or 'a<1 and': a filter that filters nothing is a mistake
            raise UserError(
                f"--where {text!r}: an empty condition; write FIELD OP VALUE, e.g. 'forgetting<0.05', "
                "joined by 'and' or ','"
            )
        match = CONDITION.match(part)
        if not match:
            raise UserError(
                f"--where {text!r}: write FIELD OP VALUE, e.g. 'forgetting<0.05' (OP: < <= > >= == !=)"
            )
        field, op, raw = match.groups()
        if field not in FIELDS:
            raise UserError(f"--where {text!r}: unknown field {field!r}; fields: {', '.join(FIELDS)}")
        value: Any = raw.strip("'\"")
        if FIELDS[field] is float:
            try:
                value = float(value)
            except ValueError:
                raise UserError(f"--where {text!r}: {field} takes a number, not {raw!r}") from None
        conditions.append((field, "==" if op == "=" else op, value))
    return conditions


def _holds(record: dict[str, Any], field: str, op: str, value: Any) -> bool:
    have = record.get(field)
    if have is None:
        return op == "!="
    if isinstance(value, float) and not isinstance(have, (int, float)):
        return False
    if op in ("==", "!="):
        return (str(have) == value if isinstance(value, str) else have == value) == (op == "==")
    compare = {
        "<": lambda a, b: a < b,
        "<=": lambda a, b: a <= b,
        ">": lambda a, b: a > b,
        ">=": lambda a, b: a >= b,
    }
    return compare[op](have, value if isinstance(value, float) else str(value))


def select(
    records: Sequence[dict[str, Any]],
    method: str | None = None,
    base: str | None = None,
    where: Sequence[str] = (),
    sort: str | None = None,
) -> list[dict[str, Any]]:
    """Records matching every filter, sorted by `sort` (a field; `-field` descending; missing values last)."""
    conditions = [c for w in where for c in parse_where(w)]
    out = [
        r
        for r in records
        if (method is None or r.get("method") == method)
        and (base is None or r.get("base") == base)
        and all(_holds(r, *c) for c in conditions)
    ]
    key, reverse = (sort or "path").lstrip("-"), (sort or "").startswith("-")
    if key not in FIELDS:
        raise UserError(f"--sort {sort!r}: choose a field: {', '.join(FIELDS)} (prefix - for descending)")
    present = [r for r in out if r.get(key) is not None]
    missing = [r for r in out if r.get(key) is None]
    present.sort(key=lambda r: r[key] if FIELDS[key] is float else str(r[key]), reverse=reverse)
    return present + missing


def list_runs(roots: Sequence[str | Path], **filters: Any) -> list[dict[str, Any]]:
    """Every run and comparison under `roots` (refreshing each root's index), filtered and sorted."""
    records: list[dict[str, Any]] = []
    for root in roots or ["."]:
        records += refresh(Path(root))
    return select(records, **filters)


def show_run(path: str | Path) -> dict[str, Any]:
    """One run or comparison in full: its record, summary.json (or results.json) and config."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"{p}: no such directory")
    names = {c.name for c in p.iterdir()}
    if is_comparison_dir(names):
        kind = "comparison"
    elif is_run_dir(p, names):
        kind = "run"
    else:
        raise UserError(f"{p} is neither a run directory (config.yaml, metrics.jsonl) nor a comparison")
    record = {**read_record(p, kind), "path": str(p)}
    detail: dict[str, Any] = {"record": record}
    for name in ("summary.json", "results.json"):
        try:
            detail[name.split(".")[0]] = _json(p / name)
        except Corrupt as err:
            detail[name.split(".")[0]] = {"error": str(err)}
    if kind == "run":
        try:
            detail["config"] = _yaml(p / "config.yaml")
        except Corrupt as err:
            detail["config"] = {"error": str(err)}
    return detail
