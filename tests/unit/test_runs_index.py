"""`adaptlab runs`: the index lists, filters and sorts runs, refreshes from mtimes and never crashes."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from runs_index import write_run  # noqa: E402  (the benchmark's synthetic run directory)

from adaptlab.cli import main  # noqa: E402
from adaptlab.errors import UserError  # noqa: E402
from adaptlab.runs_index import index_path, list_runs, parse_where  # noqa: E402


@pytest.fixture()
def runs_root(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("ADAPTLAB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "runs"
    for i in range(12):
        write_run(root / f"run-{i:02d}", i)
    (root / "run-05" / "summary.json").write_text("{not json")  # corrupt
    (root / "run-06" / "config.yaml").write_text("method: [unclosed")  # corrupt
    unfinished = root / "run-07"
    (unfinished / "summary.json").unlink()
    cmp = root / "cmp"
    cmp.mkdir()
    rec = {"pick": "lora", "summary": "Pick lora."}
    (cmp / "results.json").write_text(
        json.dumps(
            {
                "study": "methods",
                "model": "tiny-random",
                "data": {"target": ["python-stdlib"], "general": []},
                "budget_tokens": 1000,
                "recommendation": rec,
            }
        )
    )
    write_run(cmp / "runs" / "lora", 1)
    return root


def by_path(records):
    return {Path(r["path"]).name: r for r in records}


def test_lists_runs_comparisons_and_corrupt_dirs(runs_root):
    records = by_path(list_runs([runs_root]))
    assert len(records) == 14  # 12 runs, the comparison and its run
    assert records["run-05"]["status"] == "corrupt" and "summary.json" in records["run-05"]["error"]
    assert records["run-06"]["status"] == "corrupt" and "config.yaml" in records["run-06"]["error"]
    assert records["run-07"]["status"] == "unfinished"
    assert records["run-07"]["final_train_loss"] == pytest.approx(0.1)  # from metrics.jsonl's last row
    assert records["cmp"]["kind"] == "comparison" and records["cmp"]["pick"] == "lora"
    assert records["cmp"]["data"] == "python-stdlib" and records["cmp"]["tokens"] == 1000
    run = records["run-03"]
    assert (run["method"], run["base"], run["data"], run["tokens"]) == (
        "qlora",
        "tiny-random",
        "python-stdlib",
        25600,
    )
    assert run["learning"] == pytest.approx(0.03) and run["forgetting"] == pytest.approx(0.03)
    assert run["peak_mem_bytes"] == 10**9 + 3 and run["wall_s"] == 8.0
    assert records["run-04"]["learning"] is None  # not evaluated


def test_filters_and_sorting(runs_root):
    lora = list_runs([runs_root], method="lora")
    assert {Path(r["path"]).name for r in lora} == {"run-01", "run-09", "lora"}
    low = list_runs([runs_root], where=["forgetting<0.05"])
    assert {Path(r["path"]).name for r in low} == {"run-00", "run-03", "run-09"}
    both = list_runs([runs_root], where=["forgetting<0.05 and method==full"])
    assert [Path(r["path"]).name for r in both] == ["run-00"]
    walls = [r["wall_s"] for r in list_runs([runs_root], sort="-wall_s") if r["wall_s"] is not None]
    assert walls == sorted(walls, reverse=True)


def test_where_is_parsed_not_evaluated():
    assert parse_where("forgetting<0.05, method = lora") == [
        ("forgetting", "<", 0.05),
        ("method", "==", "lora"),
    ]
    for bad in ("__import__('os')", "forgetting<<1", "nosuch>1", "learning>abc"):
        with pytest.raises(UserError):
            parse_where(bad)


def test_index_is_reused_until_files_change_and_rebuilt_when_deleted(runs_root):
    list_runs([runs_root])
    summary = runs_root / "run-02" / "summary.json"
    st = summary.stat()
    text = summary.read_text()
    summary.write_text(text.replace('"dora"', '"DORA"'))  # same size
    os.utime(summary, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert by_path(list_runs([runs_root]))["run-02"]["method"] == "dora"  # from the index
    os.utime(summary, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert by_path(list_runs([runs_root]))["run-02"]["method"] == "DORA"  # re-read
    index_path(runs_root).unlink()
    assert by_path(list_runs([runs_root]))["run-02"]["method"] == "DORA"
    index_path(runs_root).write_bytes(b"not a database at all" * 100)
    assert len(list_runs([runs_root])) == 14
    assert index_path(runs_root).read_bytes().startswith(b"SQLite format 3")  # rebuilt, not bypassed
    assert not any(p.name.endswith(".sqlite") for p in runs_root.rglob("*"))  # never among user files


def test_cli_json_show_and_bad_where(runs_root, capsys):
    assert main(["runs", str(runs_root), "--json", "--method", "full"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert {Path(r["path"]).name for r in listed} == {"run-00", "run-04", "run-08"}
    assert main(["runs", "show", str(runs_root / "run-00"), "--json"]) == 0
    detail = json.loads(capsys.readouterr().out)
    assert detail["summary"]["method"] == "full" and detail["config"]["method"]["rank"] == 4
    assert main(["runs", str(runs_root)]) == 0
    assert "corrupt" in capsys.readouterr().out
    assert main(["runs", str(runs_root), "--where", "bogus~1"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


@pytest.mark.parametrize("where", ["", "  ", "forgetting<0.05,", "method==lora and"])
def test_an_empty_where_condition_is_refused(runs_root, capsys, where):
    assert main(["runs", str(runs_root), "--where", where]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: --where {where!r}: an empty condition")
