"""Spectra and intruder dimensions of weight updates, batched over layers of equal shape.

Per layer: ||dW||_F and ||dW||_F / ||W0||_F; effective rank (singular values of dW needed for ENERGY of
its energy) and stable rank (||dW||_F^2 / ||dW||_2^2); intruder dimensions (Shuttleworth et al. 2024,
arXiv 2410.21228): for each of the top-k left singular vectors of W0 + dW, the largest |cosine| with
any left singular vector of W0, an intruder if that is below eps. `summarize` totals the rows per
module type and per depth, with the intruder counts over a sweep of eps.
"""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from adaptlab.analysis.updates import LayerUpdate, layer_index, module_type, type_key

DEFAULT_K = 10
DEFAULT_EPS = 0.5
ENERGY = 0.9  # fraction of ||dW||_F^2 that the effective rank covers
EPS_SWEEP = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def _top_left_vectors(w: torch.Tensor, k: int) -> torch.Tensor:
    """Top-k left singular vectors of each matrix in a (N, out, in) stack -> (N, out, k).

    Taken from the eigenvectors of the smaller Gram matrix (the same vectors as the SVD's for
    distinct top singular values, up to sign, which |cosine| ignores) at a fraction of a full SVD.
    """
    out, inp = w.shape[-2:]
    if out <= inp:
        _, vecs = torch.linalg.eigh(w @ w.transpose(-1, -2))  # ascending eigenvalues
        return vecs[..., -k:].flip(-1)
    vals, vecs = torch.linalg.eigh(w.transpose(-1, -2) @ w)  # (N, in, in): right singular vectors
    v = vecs[..., -k:].flip(-1)  # (N, in, k)
    s = vals[..., -k:].flip(-1).clamp_min(1e-30).sqrt()  # (N, k)
    return (w @ v) / s.unsqueeze(-2)


def _gram_spectrum(dw: torch.Tensor) -> torch.Tensor:
    """Squared singular values of each (out, in) matrix in a stack, descending -> (N, min(out, in))."""
    out, inp = dw.shape[-2:]
    gram = dw @ dw.transpose(-1, -2) if out <= inp else dw.transpose(-1, -2) @ dw
    return torch.linalg.eigvalsh(gram).flip(-1).clamp_min(0).double()


def intruder_max_cos(w0: torch.Tensor, dw: torch.Tensor, k: int) -> torch.Tensor:
    """For each top-k left singular vector of W0 + dW, the largest |cos| with any left singular vector of W0.

    w0, dw: (N, out, in) stacks; returns (N, min(k, out, in)), ordered by the tuned singular values.
    """
    k = min(k, *w0.shape[-2:])
    u_base = torch.linalg.svd(w0, full_matrices=False).U  # (N, out, min(out, in))
    u_tuned = _top_left_vectors(w0 + dw, k)  # (N, out, k)
    return (u_tuned.transpose(-1, -2) @ u_base).abs().amax(dim=-1)  # (N, k)


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with at most n torch threads, restoring the caller's setting afterwards."""
    old = torch.get_num_threads()
    if n >= old:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def layer_stats(
    layers: list[LayerUpdate], k: int = DEFAULT_K, eps: float = DEFAULT_EPS
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Norms, effective and stable rank, and intruder counts per layer; also seconds per layer shape."""
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, layer in enumerate(layers):
        groups[tuple(layer.w0.shape)].append(i)
    rows: list[dict[str, Any]] = [{} for _ in layers]
    timing: dict[str, Any] = {}
    for shape, idx in groups.items():
        start = time.perf_counter()
        # Small matrices gain nothing from threads, and batched LAPACK calls under a busy CPU lose a lot.
        with torch_threads(1 if max(shape) < 256 else torch.get_num_threads()):
            rows_j = _group_stats([layers[i] for i in idx], shape, k, eps)
        for i, row in zip(idx, rows_j):
            rows[i] = row
        timing[f"{shape[0]}x{shape[1]}"] = {"layers": len(idx), "seconds": time.perf_counter() - start}
    return rows, timing


def _group_stats(
    layers: list[LayerUpdate], shape: tuple[int, int], k: int, eps: float
) -> list[dict[str, Any]]:
    """layer_stats for layers of one shape, stacked into (N, out, in) batches."""
    w0 = torch.stack([layer.w0 for layer in layers])  # (N, out, in)
    dw = torch.stack([layer.dw for layer in layers])  # (N, out, in)
    upd = torch.linalg.matrix_norm(dw).double()  # (N,)
    ref = torch.linalg.matrix_norm(w0).double()  # (N,)
    energy = _gram_spectrum(dw)  # (N, min(out, in)): s_i^2 of dW, descending
    cum = energy.cumsum(-1)
    total = cum[:, -1]
    eff_rank = ((cum < ENERGY * total[:, None]).sum(-1) + 1).where(total > 0, 0)
    stable = (upd**2 / energy[:, 0].clamp_min(1e-300)).where(total > 0, 0.0)
    max_cos = torch.ones(len(layers), min(k, *shape))
    nonzero = [j for j in range(len(layers)) if bool(dw[j].any())]  # dW == 0: the tuned spectrum is W0's
    if nonzero:
        max_cos[nonzero] = intruder_max_cos(w0[nonzero], dw[nonzero], k)
    return [
        {
            "name": layer.name,
            "module_type": module_type(layer.name),
            "layer": layer_index(layer.name),
            "shape": list(shape),
            "update_norm": float(upd[j]),
            "base_norm": float(ref[j]),
            "rel_update_norm": float(upd[j] / ref[j]) if ref[j] > 0 else None,
            "effective_rank": int(eff_rank[j]),
            "stable_rank": float(stable[j]),
            "intruders": int((max_cos[j] < eps).sum()),
            "max_cos": [round(float(c), 5) for c in max_cos[j]],
        }
        for j, layer in enumerate(layers)
    ]


def _aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    upd2 = sum(r["update_norm"] ** 2 for r in rows)
    ref2 = sum(r["base_norm"] ** 2 for r in rows)
    rel = [r["rel_update_norm"] for r in rows if r["rel_update_norm"] is not None]
    return {
        "layers": len(rows),
        "intruders": sum(r["intruders"] for r in rows),
        "layers_with_intruders": sum(r["intruders"] > 0 for r in rows),
        "update_norm": math.sqrt(upd2),
        "rel_update_norm": math.sqrt(upd2 / ref2) if ref2 > 0 else None,
        "mean_rel_update_norm": sum(rel) / len(rel) if rel else None,
        "mean_effective_rank": sum(r["effective_rank"] for r in rows) / len(rows),
        "mean_stable_rank": sum(r["stable_rank"] for r in rows) / len(rows),
    }


def summarize(rows: list[dict[str, Any]], eps: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """Totals (all, per module type, per depth) and the eps sweep, from per-layer rows."""
    by_type: dict[str, list] = defaultdict(list)
    by_depth: dict[str, list] = defaultdict(list)
    for r in rows:
        by_type[r["module_type"]].append(r)
        by_depth["-" if r["layer"] is None else str(r["layer"])].append(r)
    totals = _aggregate(rows) if rows else {}
    totals["by_module_type"] = {t: _aggregate(by_type[t]) for t in sorted(by_type, key=type_key)}
    depth_key = lambda d: (d == "-", int(d) if d != "-" else 0)  # noqa: E731
    totals["by_layer"] = {d: _aggregate(by_depth[d]) for d in sorted(by_depth, key=depth_key)}
    sweep = {}
    for e in sorted({*EPS_SWEEP, eps}):
        counts = [sum(c < e for c in r["max_cos"]) for r in rows]
        sweep[f"{e:g}"] = {"intruders": sum(counts), "layers_with_intruders": sum(c > 0 for c in counts)}
    return totals, sweep
