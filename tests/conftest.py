"""Shared fixtures: the tiny-random model, the shared offline data, a CLI runner that returns exit codes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import adaptlab.healed  # noqa: F401  the healed bases' builder, as the command line registers it

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if workers := int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0")):
    # several pytest workers share the cores: torch threads (and those of child processes) split them
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data (read-only JSONL used by tests); skips when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def embedded_models_built(request) -> None:
    """Build the embedded models before the first test: on an empty cache the workers meet here, one
    builds under the cache lock while the other waits, and no test's output carries the build's line."""
    from adaptlab.models import local_dir

    local_dir("tiny-random")
    if any(item.get_closest_marker("integration") for item in request.session.items):
        local_dir("smollm2-135m")


@pytest.fixture(scope="session")
def tiny():
    """The tiny-random base model and tokenizer (LoadedModel); tests must not modify its weights."""
    from adaptlab.models import load_model

    return load_model("tiny-random")


@pytest.fixture()
def run_cli(capsys):
    """Run `adaptlab ARGS...` in-process; returns (exit_code, stdout, stderr)."""
    from adaptlab.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run
