"""Intruder-dimension mitigation: scale the intruder directions of a LoRA update by lambda.

Shuttleworth et al. 2024 (arXiv 2410.21228): the intruder dimensions of W = W0 + dW (top-k left
singular vectors of W whose largest |cos| with every left singular vector of W0 is below eps, as in
adaptlab.analysis) carry much of what a LoRA forgets; scaling them down by lambda (~0.7 in the paper) cuts
forgetting at a small cost in learning. Per adapted layer, with u_i, s_i, v_i the intruder triplets
of the SVD of W (float64):

    dW' = dW - (1 - lambda) * sum_i s_i u_i v_i^T

lambda = 1 leaves the adapter as it is (its files are copied bit for bit); lambda = 0 removes the
intruder triplets from W exactly. dW' has rank up to r + m (m intruders in the layer), so it is no
longer a rank-r product in general. Two ways to write it as a PEFT adapter (rank_mode):
  - exact (default): the layer's rank grows to r + m through rank_pattern / alpha_pattern (alpha is
    chosen so the layer's scaling stays the same); B' = [B, -(1-lambda)/scaling U_I S_I^1/2] and
    A' = [A; S_I^1/2 V_I^T], so the original columns are kept bit for bit and dW' is represented
    exactly. Layers without intruders keep rank r.
  - keep: rank r everywhere, from the truncated SVD of dW' (PEFT's `reduce_intruder_dimension`
    does this); the relative Frobenius error of the truncation is reported per layer.
DoRA is refused: its magnitude vector renormalises every row, so an additive change of the
direction is not the change of the merged weight.

    python -c "from adaptlab.mitigate import mitigate; print(mitigate('RUN', 0.7, 'OUT')['totals'])"
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from adaptlab.analysis.spectra import DEFAULT_EPS, DEFAULT_K, torch_threads
from adaptlab.analysis.updates import layer_updates, pattern_value
from adaptlab.artifacts import ADAPTER_WEIGHTS, resolve
from adaptlab.errors import UserError

RANK_MODES = ("exact", "keep")
_PREFIX = "base_model.model."
REPORT = "mitigation.json"


@dataclass
class Intruders:
    """The intruder triplets of W = W0 + dW (float64) and the max |cos| of its top-k left vectors."""

    index: list[int]  # positions among W's singular values (descending)
    u: torch.Tensor  # (out, m)
    s: torch.Tensor  # (m,)
    vh: torch.Tensor  # (m, in)
    max_cos: list[float]


def find_intruders(
    w0: torch.Tensor, dw: torch.Tensor, k: int = DEFAULT_K, eps: float = DEFAULT_EPS
) -> Intruders:
    """Intruder triplets of w0 + dw, both (out, in); the definition adaptlab.analysis counts."""
    base = w0.double()
    with torch_threads(1 if max(w0.shape) < 256 else torch.get_num_threads()):
        return _find(base, dw, k, eps)


def _find(base: torch.Tensor, dw: torch.Tensor, k: int, eps: float) -> Intruders:
    u_base = torch.linalg.svd(base, full_matrices=False).U  # (out, min)
    u, s, vh = torch.linalg.svd(base + dw.double(), full_matrices=False)
    top = min(k, s.numel())
    max_cos = (u[:, :top].T @ u_base).abs().amax(dim=1)  # (top,)
    index = [int(i) for i in torch.nonzero(max_cos < eps).flatten()]
    return Intruders(index, u[:, index], s[index], vh[index], [round(float(c), 5) for c in max_cos])


def mitigated_update(dw: torch.Tensor, found: Intruders, lam: float) -> torch.Tensor:
    """dW - (1 - lam) U_I S_I V_I^T, float64 (out, in)."""
    removed = (found.u * found.s) @ found.vh  # (out, in)
    return dw.double() - (1.0 - lam) * removed


def _scaling(cfg: dict[str, Any], name: str, rank: int) -> tuple[float, float]:
    """(alpha, scaling) of one layer as peft computes them."""
    alpha = float(pattern_value(cfg.get("alpha_pattern") or {}, name, cfg.get("lora_alpha", 8)))
    return alpha, alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def _exact_factors(
    a: torch.Tensor, b: torch.Tensor, found: Intruders, lam: float, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """A' (r+m, in), B' (out, r+m) with scaling * B'A' = scaling * BA - (1-lam) U_I S_I V_I^T."""
    root = found.s.sqrt()  # (m,)
    b_extra = (-(1.0 - lam) / scaling) * found.u * root  # (out, m)
    a_extra = root[:, None] * found.vh  # (m, in)
    return torch.cat([a, a_extra.to(a.dtype)]), torch.cat([b, b_extra.to(b.dtype)], dim=1)


def _kept_factors(
    dw_new: torch.Tensor, rank: int, scaling: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Rank-r A', B' from the truncated SVD of dW' (S split evenly, as peft does); relative error."""
    u, s, vh = torch.linalg.svd(dw_new / scaling, full_matrices=False)
    root = s[:rank].sqrt()
    b, a = u[:, :rank] * root, root[:, None] * vh[:rank]
    total = float(s.square().sum())
    err = math.sqrt(float(s[rank:].square().sum()) / total) if total > 0 else 0.0
    return a.to(dtype), b.to(dtype), err


def _check_lambda(lam: float) -> None:
    if not 0.0 <= lam <= 1.0 or math.isnan(lam):
        raise UserError(f"--mitigate must be between 0 and 1 (the kept fraction of each intruder), got {lam}")


def _read_adapter(tuned: str | Path) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    art = resolve(tuned)
    if art.kind != "adapter":
        raise UserError(
            f"{tuned} is a full fine-tuning: mitigation rescales a LoRA-family adapter (give a run with adapter/)"
        )
    cfg = json.loads((art.path / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise UserError(
            f"{art.path} is a {cfg.get('peft_type')} adapter: mitigation applies to LoRA adapters"
        )
    if cfg.get("use_dora"):
        raise UserError(
            f"{art.path} is a DoRA adapter: its magnitude vector renormalises each row, so intruder "
            "mitigation (an additive change) is defined for LoRA, rsLoRA and QLoRA only"
        )
    return art.path, cfg, load_file(str(art.path / ADAPTER_WEIGHTS))


def mitigate(
    tuned: str | Path,
    lam: float,
    out: str | Path,
    base: str | None = None,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
    rank_mode: str = "exact",
) -> dict[str, Any]:
    """Write OUT as a PEFT adapter with every intruder direction of `tuned` scaled by `lam`; return the report.

    OUT must be a new or adaptlab-owned directory (the caller claims it). OUT/mitigation.json holds the
    report: per layer the intruders found (positions, max |cos|, singular values), the rank written and
    the relative change of dW; in keep mode also the truncation error.
    """
    _check_lambda(lam)
    if rank_mode not in RANK_MODES:
        raise UserError(f"rank mode {rank_mode!r}: choose one of {', '.join(RANK_MODES)}")
    adapter_dir, cfg, tensors = _read_adapter(tuned)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    updates = layer_updates(base, tuned)
    rows = []
    rank_pattern = dict(cfg.get("rank_pattern") or {})
    alpha_pattern = dict(cfg.get("alpha_pattern") or {})
    new = dict(tensors)
    for layer in updates.layers:
        key = _PREFIX + layer.name
        a, b = tensors[key + ".lora_A.weight"], tensors[key + ".lora_B.weight"]
        rank = a.shape[0]
        alpha, scaling = _scaling(cfg, layer.name, rank)
        found = find_intruders(layer.w0, layer.dw, k, eps)
        row = _layer_row(layer.name, found, rank)
        if found.index and lam < 1.0:
            dw_new = mitigated_update(layer.dw, found, lam)
            norm = float(torch.linalg.matrix_norm(layer.dw.double()))
            row["rel_change"] = float(torch.linalg.matrix_norm(dw_new - layer.dw.double())) / max(norm, 1e-30)
            if rank_mode == "exact":
                a2, b2 = _exact_factors(a, b, found, lam, scaling)
                r2 = a2.shape[0]
                rank_pattern[layer.name] = r2
                alpha_pattern[layer.name] = scaling * (math.sqrt(r2) if cfg.get("use_rslora") else r2)
                row["rank_written"] = r2
            else:
                a2, b2, row["truncation_error"] = _kept_factors(dw_new, rank, scaling, a.dtype)
            new[key + ".lora_A.weight"], new[key + ".lora_B.weight"] = a2.contiguous(), b2.contiguous()
        elif rank_mode == "keep":
            row["truncation_error"] = 0.0
        rows.append(row)
    if lam == 1.0:  # nothing scaled: the original files, bit for bit
        for name in ("adapter_config.json", ADAPTER_WEIGHTS):
            shutil.copyfile(adapter_dir / name, out / name)
    else:
        _write_adapter(out, {**cfg, "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}, new)
    report = {
        "lambda": lam,
        "k": k,
        "eps": eps,
        "rank_mode": rank_mode,
        "tuned": str(adapter_dir),
        "base": updates.base,
        "base_note": updates.base_note,
        "adapter": str(out),
        "layers": rows,
        "totals": _totals(rows, rank_mode),
    }
    (out / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    return report


def _layer_row(name: str, found: Intruders, rank: int) -> dict[str, Any]:
    """A layer's report row before any change: the intruders found (positions, singular values, max |cos|)
    and its rank, written unchanged."""
    return {
        "name": name,
        "intruders": len(found.index),
        "index": found.index,
        "singular_values": [float(x) for x in found.s],
        "max_cos": found.max_cos,
        "rank": rank,
        "rank_written": rank,
        "rel_change": 0.0,
    }


def _write_adapter(out: Path, config: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    """OUT's adapter_config.json and adapter weights (safetensors) from the mitigated config and tensors."""
    from safetensors.torch import save_file

    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _totals(rows: list[dict[str, Any]], rank_mode: str) -> dict[str, Any]:
    touched = [r for r in rows if r["intruders"]]
    totals: dict[str, Any] = {
        "layers": len(rows),
        "intruders": sum(r["intruders"] for r in rows),
        "layers_with_intruders": len(touched),
        "max_rank_written": max((r["rank_written"] for r in rows), default=0),
        "max_rel_change": max((r["rel_change"] for r in rows), default=0.0),
    }
    if rank_mode == "keep":
        totals["max_truncation_error"] = max((r.get("truncation_error", 0.0) for r in rows), default=0.0)
    return totals
