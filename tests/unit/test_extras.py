"""The server's packages are the extra `adaptlab[serve]`: a core install (no fastapi, no uvicorn) runs
`--help`, train and every module outside adaptlab.serve without importing them, and `adaptlab serve`
names the extra in one line, exit 2.

Each check runs in a fresh interpreter whose import system refuses fastapi, uvicorn and starlette, as
an install without the extra would, and records every attempt to import them.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_NO_SERVE_EXTRA = """
import importlib, importlib.abc, pkgutil, sys
BLOCKED = ("fastapi", "uvicorn", "starlette")
attempts = []

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            attempts.append(name)
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, NotInstalled())
"""

_RUN_CLI = """
from adaptlab.cli import main
code = main(sys.argv[1:])
print("imports of the serve extra:", sorted(set(attempts)))
sys.exit(code)
"""

# every module but the server's, as train, compare, report and the other commands import them
_IMPORT_ALL_BUT_THE_SERVER = """
import adaptlab
names = [m.name for m in pkgutil.walk_packages(adaptlab.__path__, "adaptlab.")
         if not m.name.startswith(("adaptlab.serve.", "adaptlab.__main__"))]
for name in names:
    importlib.import_module(name)
print(len(names), "modules")
print("imports of the serve extra:", sorted(set(attempts)))
"""


def _run_without_serve_extra(body: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    return subprocess.run(
        [sys.executable, "-c", _NO_SERVE_EXTRA + body, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.parametrize(
    "args", [["--help"], ["train", "--help"], ["compare", "--help"], ["serve", "--help"]]
)
def test_help_never_imports_the_server(args) -> None:
    proc = _run_without_serve_extra(_RUN_CLI, *args)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imports of the serve extra: []"


def test_train_runs_without_the_server(tmp_path) -> None:
    out = tmp_path / "run"
    proc = _run_without_serve_extra(
        _RUN_CLI, "train", "--model", "tiny-random", "--method", "lora", "--data", "python-stdlib",
        "--steps", "1", "--batch", "1", "--seq-len", "16", "--quiet", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "imports of the serve extra: []"
    assert (out / "summary.json").is_file()


def test_no_module_outside_the_server_imports_it() -> None:
    proc = _run_without_serve_extra(_IMPORT_ALL_BUT_THE_SERVER)
    assert proc.returncode == 0, proc.stderr
    count, attempts = proc.stdout.strip().splitlines()[-2:]
    assert attempts == "imports of the serve extra: []" and int(count.split()[0]) > 50, proc.stdout


def test_serve_without_the_extra_names_it_in_one_line() -> None:
    proc = _run_without_serve_extra(_RUN_CLI, "serve", "--model", "tiny-random", "--port", "0")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "fastapi and uvicorn" in lines[0] and "pip install 'adaptlab[serve]'" in lines[0]
