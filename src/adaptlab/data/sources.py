"""Where documents come from: files, directories, globs, `datasets` dirs, hub datasets, embedded corpora.

A source string is one of:
  - `python-stdlib`: the running interpreter's standard library source, one document per module
    (tests, site-packages and idle/turtle demos excluded);
  - a file: .txt / .md / .py (one document per file) or .jsonl (one document per line: field
    `text` or `text_field`; or instruction records with `prompt`/`response` or `messages`);
  - a directory: a `datasets.save_to_disk` directory, or every .txt/.md/.py/.jsonl file below it;
  - a glob (`docs/**/*.md`);
  - a hub dataset name (needs a network).

    python -c "from adaptlab.data.sources import load_documents as l; print(len(l('python-stdlib')))"
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from adaptlab.errors import UserError
from adaptlab.hub import check_model_name, hub_reachable

EMBEDDED_CORPORA = ("python-stdlib",)
EMBEDDED_TASKS = ("arithmetic",)
"""Verifiable tasks built in (data/tasks.py); named here so checking names needs no torch."""
TEXT_SUFFIXES = (".txt", ".md", ".py")
SUFFIXES = (*TEXT_SUFFIXES, ".jsonl")
# Parts of the standard library that are tests, demos or vendored third-party code.
_STDLIB_SKIP = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "turtledemo"}


@dataclass(frozen=True)
class Document:
    """One document: plain text, or an instruction record (`messages`) rendered later by a chat template."""

    id: str
    text: str = ""
    messages: tuple[dict[str, str], ...] = field(default=())

    @property
    def is_chat(self) -> bool:
        return bool(self.messages)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stdlib_documents() -> list[Document]:
    root = stdlib_root()
    docs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _STDLIB_SKIP or part.startswith("test_") for part in rel.parts):
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.strip():
            docs.append(Document(id=f"stdlib/{rel.as_posix()}", text=text))
    return docs


def _record_to_document(record: Any, where: str, text_field: str, default_id: str) -> Document:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(record).__name__}")
    doc_id = str(record.get("id", default_id))
    if "messages" in record and text_field not in record:
        messages = record["messages"]
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages
            )
        ):
            raise UserError(f"{where}: `messages` must be a non-empty list of {{role, content}} strings")
        if messages[-1]["role"] != "assistant":
            raise UserError(f"{where}: the last message must be the assistant's response")
        return Document(
            id=doc_id, messages=tuple({"role": m["role"], "content": m["content"]} for m in messages)
        )
    if "prompt" in record and "response" in record and text_field not in record:
        prompt, response = record["prompt"], record["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UserError(f"{where}: `prompt` and `response` must be strings")
        messages = ({"role": "user", "content": prompt}, {"role": "assistant", "content": response})
        return Document(id=doc_id, messages=messages)
    if text_field not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise UserError(
            f"{where}: no field {text_field!r} (fields: {keys}); pass --text-field, or give prompt/response or messages"
        )
    text = record[text_field]
    if not isinstance(text, str):
        raise UserError(f"{where}: field {text_field!r} must be a string, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:  # a JSON escape such as "\udcbe" decodes to an unpaired surrogate
        raise UserError(
            f"{where}: field {text_field!r} holds an unpaired surrogate ({text[err.start]!a} at character "
            f"{err.start}), which is not text: fix or drop that document"
        ) from err
    return Document(id=doc_id, text=text)


def read_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """Yield (line number, parsed object) for each non-blank line; malformed JSON names file:line."""
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise UserError(
                    f"{path}:{lineno}: not UTF-8 text ({err.reason} at byte {err.start})"
                ) from err
            if not line.strip():
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err


def _portable_name(path: Path) -> str:
    """A file's name with its folder ("legal/train.jsonl"): the default document ids built from it,
    and so the splits, stay the same wherever the data folder is copied or moved."""
    return "/".join(path.parts[-2:])


def _file_documents(path: Path, text_field: str) -> list[Document]:
    if path.suffix == ".jsonl":
        name = _portable_name(path)
        return [
            _record_to_document(rec, f"{path}:{lineno}", text_field, default_id=f"{name}:{lineno}")
            for lineno, rec in read_jsonl(path)
        ]
    if path.suffix in TEXT_SUFFIXES:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = raw.count(b"\n", 0, err.start) + 1
            raise UserError(f"{path}:{line}: not UTF-8 text ({err.reason} at byte {err.start})") from err
        text = text.replace("\r\n", "\n").replace("\r", "\n")  # the newlines read_text() gives
        return [Document(id=_portable_name(path), text=text)] if text.strip() else []
    raise UserError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(SUFFIXES)}")


def _datasets_dir_documents(path: Path, text_field: str) -> list[Document]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise UserError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)})")
        ds = ds["train"]
    return [
        _record_to_document(rec, f"{path}[{i}]", text_field, default_id=f"{path.name}:{i}")
        for i, rec in enumerate(ds)
    ]


def _hub_unreachable(name: str) -> ConnectionError | None:
    """Why the hub cannot serve data set `name` (offline mode set, or no answer), or None."""
    if os.environ.get("HF_DATASETS_OFFLINE", "") == "1" or os.environ.get("HF_HUB_OFFLINE", "") == "1":
        return ConnectionError("offline mode is set")
    if not hub_reachable():  # without a network the hub client retries for half a minute
        return ConnectionError("huggingface.co cannot be reached")
    return None


def _not_found(name: str, err: Exception) -> UserError:
    return UserError(
        f"data {name!r}: not a local file, directory, glob or embedded corpus "
        f"({', '.join(EMBEDDED_CORPORA)}), and loading it from the hub failed ({type(err).__name__}; offline?)"
    )


def check_sources(sources: list[str]) -> None:
    """Refuse, before anything is loaded, a source that is not local while the hub cannot be reached."""
    for source in sources:
        if (
            source in EMBEDDED_CORPORA
            or source in EMBEDDED_TASKS
            or Path(source).expanduser().is_dir()
            or local_files(source) is not None
        ):
            continue
        if (err := _hub_unreachable(source)) is not None:
            raise _not_found(source, err)


def check_names(model: str | None, data: Sequence[str] = ()) -> None:
    """Check a model name and data sources before anything heavy is imported."""
    if model:
        check_model_name(model)
    check_sources(list(data))


def _hub_documents(name: str, text_field: str) -> list[Document]:
    try:
        if (unreachable := _hub_unreachable(name)) is not None:
            raise unreachable
        import datasets

        ds = datasets.load_dataset(name, split="train")
    except Exception as err:  # noqa: BLE001 - any hub failure becomes one line for the user
        raise _not_found(name, err) from err
    return [
        _record_to_document(rec, f"{name}[{i}]", text_field, default_id=f"{name}:{i}")
        for i, rec in enumerate(ds)
    ]


def local_files(source: str) -> list[Path] | None:
    """Local files a source names, or None when it is not local (a hub name)."""
    path = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
        files = [p for p in matches if p.is_file() and p.suffix in SUFFIXES]
        if not files:
            raise UserError(f"data {source!r}: the pattern matches no {', '.join(SUFFIXES)} file")
        return files
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(f"data {source!r}: the directory holds no {', '.join(SUFFIXES)} file")
        return files
    if path.exists():
        raise UserError(f"data {source!r}: not a regular file or directory")
    looks_like_path = (
        source.startswith((".", "/", "~")) or Path(source).suffix in SUFFIXES or source.count("/") > 1
    )
    if looks_like_path:
        raise UserError(f"data {source!r}: no such file or directory")
    return None


def load_documents(sources: str | list[str], text_field: str = "text") -> list[Document]:
    """All documents of one or more sources, in a stable order; raises UserError when there are none."""
    if isinstance(sources, str):
        sources = [sources]
    if not sources:
        raise UserError("no data given: pass --data (a file, directory, glob, or python-stdlib)")
    docs: list[Document] = []
    for source in sources:
        if source == "python-stdlib":
            found = _stdlib_documents()
        else:
            path = Path(source).expanduser()
            if path.is_dir() and (
                (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()
            ):
                found = _datasets_dir_documents(path, text_field)
            else:
                files = local_files(source)
                if files is None:
                    found = _hub_documents(source, text_field)
                else:
                    found = [doc for f in files for doc in _file_documents(f, text_field)]
        found = [d for d in found if d.is_chat or d.text.strip()]
        if not found:
            raise UserError(f"data {source!r}: no non-empty documents")
        docs.extend(found)
    return docs


def describe_source(sources: str | list[str]) -> str:
    return ", ".join([sources] if isinstance(sources, str) else sources)
