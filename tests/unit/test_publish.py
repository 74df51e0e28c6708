"""`--push-to-hub`: checked before anything runs (offline: one line), and the model card it uploads."""

from __future__ import annotations

import json

import torch
from safetensors.torch import save_file

from adaptlab.cli import main
from adaptlab.publish import comparison_card, model_card


def test_offline_push_is_one_line_before_training(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(
        ["train", "--model", "tiny-random", "--method", "lora", "--data", "python-stdlib", "--steps", "1"]
        + ["--out", str(tmp_path / "run"), "--push-to-hub", "me/lora"]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "offline" in err[0] and "me/lora" in err[0]
    assert not (tmp_path / "run").exists()
    assert main(["export", "tiny-random", "--out", str(tmp_path / "x"), "--push-to-hub", "not a repo"]) == 2
    assert "hub repository id" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_model_card_carries_the_summary_and_the_recommendation():
    summary = {"method": "lora", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct", "tokens_seen": 20480}
    card = model_card(
        summary | {"final_val_loss": 1.23456}, {"pick": "lora-r16", "summary": "Pick lora-r16."}
    )
    assert card.startswith("---\n") and "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card
    assert "| tokens seen | 20,480 |" in card and "| final validation loss | 1.235 |" in card
    assert "Pick lora-r16." in card and "Recommended arm: **lora-r16**" in card


def test_comparison_card_picks_the_recommended_arm(tmp_path):
    out = tmp_path / "cmp"
    run = out / "runs" / "lora"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": "x"}))
    save_file({"x": torch.zeros(1)}, run / "adapter" / "adapter_model.safetensors")  # a whole (tiny) file
    (run / "config.yaml").write_text("model:\n  name: tiny-random\n")
    (run / "summary.json").write_text(json.dumps({"method": "lora", "base_model": "tiny-random"}))
    arms = [{"name": "lora", "runs": [{"run": "lora", "dir": "runs/lora"}]}]
    rec = {"pick": "lora", "summary": "Pick lora: it learned as much and forgot less."}
    (out / "results.json").write_text(json.dumps({"arms": arms, "recommendation": rec}))
    folder, card = comparison_card(out)
    assert folder == run / "adapter"
    assert "library_name: peft" in card and "it learned as much and forgot less" in card
