"""Weight-update analysis: how a LoRA-family adapter or a full fine-tuning changed each Linear layer.

For every adapted Linear layer the update dW is built through one code path for both kinds
(`layer_updates`): LoRA family (LoRA, rsLoRA, DoRA, QLoRA) from the PEFT adapter files,
scaling * B @ A (DoRA: the merged weight minus W0); full fine-tuning as W_tuned - W_base matched
by module name. `layer_stats` then measures, batched over layers of equal shape:
  - ||dW||_F and ||dW||_F / ||W0||_F;
  - effective rank (singular values of dW needed for 90% of its energy) and stable rank
    (||dW||_F^2 / ||dW||_2^2);
  - intruder dimensions (Shuttleworth et al. 2024, arXiv 2410.21228): for each of the top-k left
    singular vectors of W0 + dW, the largest |cosine| with any left singular vector of W0; an
    intruder if that is below eps.
Weights are read from safetensors directly; no model is built and no forward pass runs.
Matrices are taken in nn.Linear orientation (out, in), so left singular vectors live in the
output space (GPT-2 style Conv1D weights are transposed first).

    python -c "from adaptlab.analysis import analyze; print(analyze('tiny-random', 'RUN')['totals'])"

The package, one concern a module: weights.py (reading W0 and tuned weights), updates.py (dW per layer,
`layer_updates`), spectra.py (`layer_stats`, `summarize`), report.py (`analyze`, `heatmaps`).
"""

from __future__ import annotations

from adaptlab.analysis.report import analyze, heatmaps
from adaptlab.analysis.spectra import (
    DEFAULT_EPS,
    DEFAULT_K,
    ENERGY,
    EPS_SWEEP,
    intruder_max_cos,
    layer_stats,
    summarize,
)
from adaptlab.analysis.updates import LayerUpdate, UpdateSet, layer_index, layer_updates, module_type

__all__ = [
    "DEFAULT_EPS",
    "DEFAULT_K",
    "ENERGY",
    "EPS_SWEEP",
    "LayerUpdate",
    "UpdateSet",
    "analyze",
    "heatmaps",
    "intruder_max_cos",
    "layer_index",
    "layer_stats",
    "layer_updates",
    "module_type",
    "summarize",
]
