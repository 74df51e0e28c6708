"""`adaptlab decide`: LoRA or full fine-tuning for this model, these data and this hardware, answered
in the time given. spec.py (the question), target.py (what fits the target hardware), design.py (the
experiment sized to --time), search.py (LR successive halving with Optuna), run.py (the driver),
answer.py (the answer from the replicated comparison), progress.py (the whole decision's ETA).

    python -c "from adaptlab.decide import decide; help(decide)"
"""

from adaptlab.decide.run import decide, prepare
from adaptlab.decide.spec import DecideSpec

__all__ = ["DecideSpec", "decide", "prepare"]
