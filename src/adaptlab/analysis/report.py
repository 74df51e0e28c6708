"""`analyze()`: the analysis of one tuned artifact against its base (OUT/analysis.json) and its heatmaps.

python -c "from adaptlab.analysis import analyze; print(analyze('tiny-random', 'RUN')['totals'])"
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from adaptlab.analysis.spectra import DEFAULT_EPS, DEFAULT_K, ENERGY, layer_stats, summarize
from adaptlab.analysis.updates import layer_index, layer_updates, module_type, type_key
from adaptlab.errors import UserError
from adaptlab.models import LoadedModel


def analyze(
    base_spec_or_model: str | LoadedModel | Any | None,
    tuned_path: str | Path,
    k: int = DEFAULT_K,
    eps: float = DEFAULT_EPS,
    out_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Analyse how a tuned artifact changed its base; write OUT/analysis.json and heatmaps when out_dir is set.

    Returns {"k", "eps", "energy", "base", "tuned", "kind", "method", "base_note", "layers": [...],
    "totals": {..., "by_module_type", "by_layer"}, "eps_sweep": {eps: {...}}, "skipped", "timing"}.
    """
    if not isinstance(k, int) or k < 1:
        raise UserError(f"--k must be a positive integer, got {k!r}")
    if not 0 < eps <= 1:
        raise UserError(f"--eps must be in (0, 1], got {eps!r}")
    start = time.perf_counter()
    updates = layer_updates(base_spec_or_model, tuned_path)
    load_s = time.perf_counter() - start
    order = sorted(
        range(len(updates.layers)),
        key=lambda i: (
            layer_index(updates.layers[i].name) is None,
            layer_index(updates.layers[i].name) or 0,
            type_key(module_type(updates.layers[i].name)),
            updates.layers[i].name,
        ),
    )
    rows, shapes = layer_stats([updates.layers[i] for i in order], k, eps)
    totals, sweep = summarize(rows, eps)
    result: dict[str, Any] = {
        "k": k,
        "eps": eps,
        "energy": ENERGY,
        "base": updates.base,
        "tuned": updates.tuned,
        "kind": updates.kind,
        "method": updates.method,
        "base_note": updates.base_note,
        "layers": rows,
        "totals": totals,
        "eps_sweep": sweep,
        "skipped": updates.skipped,
        "timing": {"load_s": load_s, "shapes": shapes, "total_s": time.perf_counter() - start},
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        result["heatmaps"] = [str(p) for p in heatmaps(result, out)]
        (out / "analysis.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


def heatmaps(result: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Two PNGs, layers x module types: intruder counts and relative update norms."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = result["layers"]
    types = sorted({r["module_type"] for r in rows}, key=type_key)
    depths = sorted({r["layer"] for r in rows}, key=lambda d: (d is None, d or 0))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for field_name, title, fname, cmap in (
        (
            "intruders",
            f"intruder dimensions (k={result['k']}, eps={result['eps']:g})",
            "intruders.png",
            "Reds",
        ),
        ("rel_update_norm", "relative update norm ||dW|| / ||W0||", "rel_update_norm.png", "viridis"),
    ):
        grid = np.full((len(depths), len(types)), np.nan)
        for r in rows:
            value = r[field_name]
            if value is not None:
                grid[depths.index(r["layer"]), types.index(r["module_type"])] = value
        fig = Figure(figsize=(1.2 + 0.8 * len(types), 1.5 + 0.28 * len(depths)))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        vmax = max(float(np.nanmax(grid)) if np.isfinite(grid).any() else 1.0, 1e-12)
        image = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_xticks(range(len(types)), types)
        ax.set_yticks(range(len(depths)), ["-" if d is None else str(d) for d in depths])
        ax.set_xlabel("module type")
        ax.set_ylabel("layer")
        ax.set_title(title, fontsize=10)
        if field_name == "intruders" and len(depths) <= 40:
            for (i, j), value in np.ndenumerate(grid):
                if np.isfinite(value) and value > 0:
                    color = "white" if value > 0.6 * vmax else "black"
                    ax.text(j, i, str(int(value)), ha="center", va="center", fontsize=7, color=color)
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = out / fname
        fig.savefig(path, dpi=100)
        paths.append(path)
    return paths
