"""The data-size study refuses fractions that would train on the same documents (a pool too small for
them to differ), naming the fractions, the budget and what to raise; distinct fractions get nested
subsets of their own sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adaptlab.compare.runner import data_subsets, resolve_spec
from adaptlab.compare.spec import build_spec
from adaptlab.errors import StudyRefused, UserError


def _corpus(path: Path, n: int) -> Path:
    path.write_text(
        "".join(json.dumps({"id": f"d{i}", "text": f"document {i} " * 8}) + "\n" for i in range(n))
    )
    return path


def _spec(data: Path, tokens: int):
    return resolve_spec(
        build_spec(
            {
                "model": "tiny-random",
                "data": {"train": [str(data)]},
                "tokens": tokens,
                "seeds": 1,
                "study": "data-size",
                "train": {"seq_len": 16},
            }
        )
    )


def test_fractions_that_select_the_same_documents_are_refused_in_one_line(tmp_path: Path) -> None:
    spec = _spec(_corpus(tmp_path / "c.jsonl", 200), tokens=64)
    with pytest.raises(StudyRefused) as err:
        data_subsets(spec, spec.arms, tmp_path / "out")
    line = str(err.value)
    assert isinstance(err.value, UserError) and "\n" not in line
    assert "1%, 10% and 100% train on the same 1 document(s)" in line
    assert "--tokens 64" in line and "raise --tokens or give fewer fractions" in line


def test_distinct_fractions_train_on_nested_subsets_of_their_own_size(tmp_path: Path) -> None:
    spec = _spec(_corpus(tmp_path / "c.jsonl", 400), tokens=12_000)
    subsets, notes = data_subsets(spec, spec.arms, tmp_path / "out")
    docs = {}
    for name in ("full-1pct", "full-10pct", "full-100pct"):
        (path,), _ = subsets[name]
        docs[name] = {json.loads(x)["id"] for x in Path(path).read_text().splitlines()}
    assert docs["full-1pct"] < docs["full-10pct"] < docs["full-100pct"]
    assert "data-size: the 100% pool" in notes[0]
