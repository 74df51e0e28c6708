"""Weight-update analysis on the real smollm2-135m: all 210 Linear layers of a LoRA r=16 adapter.

python -m pytest -q -m integration tests/integration/test_analysis_smollm2.py
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from adaptlab.analysis import analyze, layer_updates


@pytest.mark.integration
def test_lora_adapter_on_smollm2(tmp_path: Path) -> None:
    from peft import LoraConfig, get_peft_model

    from adaptlab.models import load_model

    torch.manual_seed(0)
    model = load_model("smollm2-135m").model
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(tmp_path / "adapter")

    result = analyze("smollm2-135m", tmp_path / "adapter", out_dir=tmp_path / "out")
    assert result["totals"]["layers"] == 210
    assert len(result["totals"]["by_layer"]) == 30
    assert all(r["effective_rank"] <= 16 for r in result["layers"])
    assert "Q4_1" in result["base_note"]
    assert (tmp_path / "out" / "analysis.json").exists()

    # the batched Gram path agrees with plain full SVDs on a few real layers
    rows = {r["name"]: r for r in result["layers"]}
    for layer in layer_updates("smollm2-135m", tmp_path / "adapter").layers[::35]:
        u0 = torch.linalg.svd(layer.w0, full_matrices=False).U
        u1 = torch.linalg.svd(layer.w0 + layer.dw, full_matrices=False).U
        max_cos = (u1.T @ u0).abs().amax(dim=1)[:10]
        assert int((max_cos < 0.5).sum()) == rows[layer.name]["intruders"], layer.name
