"""Decide before you train: memory, time, capacity and a recommendation for full, LoRA, DoRA and QLoRA.

planner.py holds `plan(...)`; arch.py reads the architecture (meta device, no weights), datasize.py
counts the data in the model's tokens, estimate.py computes memory, time and artifact size per
method, measure.py times this device, advice.py turns the estimates into a recommendation.

    python -c "from adaptlab.plan import plan; import json; \
print(json.dumps(plan('tiny-random', ['python-stdlib'], benchmark=False)['recommendation'], indent=1))"
"""

from adaptlab.plan.arch import Arch, load_arch
from adaptlab.plan.datasize import DataSize, measure_data
from adaptlab.plan.planner import parse_memory, plan

__all__ = ["plan", "parse_memory", "Arch", "load_arch", "DataSize", "measure_data"]
