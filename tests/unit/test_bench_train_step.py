"""bench/train_step.py's parts on a random-weight model: the shape it builds, the FLOPs its MFU counts,
one interleaved case of both loops, and the GPU check script's usage."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from random_model import SHAPES, random_model_dir  # noqa: E402
from train_step import RANK, Case, flops_per_token, one, paired_ratio_ci  # noqa: E402

from adaptlab.models import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_dir() -> Path:
    return random_model_dir("random-tiny")


def test_random_model_has_its_shape_and_is_built_once(tiny_dir: Path) -> None:
    model = load_model(str(tiny_dir)).model
    for key, value in SHAPES["random-tiny"].items():
        assert getattr(model.config, key) == value
    assert model.dtype == torch.float32  # stored in bf16, loaded in fp32 as both loops load it
    stamp = (tiny_dir / ".complete").stat().st_mtime_ns
    assert random_model_dir("random-tiny") == tiny_dir
    assert (tiny_dir / ".complete").stat().st_mtime_ns == stamp


@pytest.mark.parametrize("method", ["full", "lora"])
def test_flops_per_token_counts_the_models_own_linears(tiny_dir: Path, method: str) -> None:
    model = load_model(str(tiny_dir)).model
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    n = sum(m.weight.numel() for m in linears)  # the decoder's Linears and the (tied) head
    cfg = model.config
    seq_len = 32
    attention = 3 * 2.0 * seq_len * cfg.hidden_size * cfg.num_hidden_layers  # causal half, fwd + 2x bwd
    if method == "full":
        expected = 6.0 * n + attention
    else:
        body = [m for m in linears if m is not model.lm_head]
        adapter = sum(RANK * (m.in_features + m.out_features) for m in body)
        expected = 4.0 * n + 6.0 * adapter + attention
    case = Case("random-tiny", method, "fp32", batch=2, seq_len=seq_len, steps=2)
    assert flops_per_token(case) == pytest.approx(expected, rel=1e-9)


def test_one_interleaved_case_times_both_loops(tiny_dir: Path) -> None:
    result = one("interleaved", Case("random-tiny", "lora", "fp32", batch=2, seq_len=32, steps=3))
    assert len(result["adaptlab_steps_s"]) == len(result["reference_steps_s"]) == 3
    assert all(s > 0 for s in result["adaptlab_steps_s"] + result["reference_steps_s"])
    assert result["speed_ratio"] == pytest.approx(result["reference_step_s"] / result["adaptlab_step_s"])
    low, high = result["adaptlab_speed_ratio_ci95"]
    assert 0 < low <= high


def test_the_ratio_interval_resamples_back_to_back_steps() -> None:
    assert paired_ratio_ci([2.0, 2.2, 1.8, 2.0], [1.0, 1.1, 0.9, 1.0]) == [2.0, 2.0]  # drift shared
    low, high = paired_ratio_ci([2.0, 1.0, 3.0, 2.5, 1.5], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert 1.0 <= low < 2.0 < high <= 3.0


def test_gpu_check_script_parses_and_refuses_an_unknown_mode() -> None:
    script = Path(__file__).resolve().parents[2] / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    done = subprocess.run(["bash", str(script), "bogus"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "usage: bash bench/gpu_check.sh prepare|dry|run" in done.stderr
