"""LoRA vs full fine-tuning head to head: the arm matrix -> run dirs -> results.json -> report.

spec.py (compare.yaml), arms.py (studies, matched params, runs), runner.py (train in child
processes, evaluate, analyse, cache), sweeps.py (LR sweeps: best LR, grid extension, the LR study's
ratio), results.py (results.json).

    adaptlab compare --config examples/compare.yaml --out runs/cmp
"""

from __future__ import annotations

from adaptlab.compare.runner import compare
from adaptlab.compare.spec import CompareSpec, build_spec

__all__ = ["CompareSpec", "build_spec", "compare"]
