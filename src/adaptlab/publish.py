"""`--push-to-hub REPO`: a run's adapter or model (or an export) on the Hugging Face Hub, with a model card.

The card carries the run's summary (method, base, tokens, losses, cost) and, for a comparison, its
recommendation. Everything is checked before any training starts: the hub must answer and a token
must be configured (`hf auth login` or HF_TOKEN); otherwise one line says so.

    adaptlab train ... --out runs/lora --push-to-hub me/lora-python
    adaptlab export runs/lora --format gguf --out gguf/ --push-to-hub me/lora-python-gguf
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from adaptlab.errors import UserError

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")
CARD_FIELDS = (
    ("method", "method"),
    ("base_model", "base model"),
    ("tokens_seen", "tokens seen"),
    ("steps", "steps"),
    ("final_train_loss", "final train loss"),
    ("final_val_loss", "final validation loss"),
    ("trainable_params", "trainable parameters"),
    ("peak_mem_bytes", "peak memory (bytes)"),
    ("wall_s", "wall time (s)"),
    ("artifact_bytes", "artifact size (bytes)"),
)


def check_push(repo: str | None) -> None:
    """Raise UserError (one line) unless `repo` is a valid id, the hub answers and a token is set."""
    if not repo:
        return
    from adaptlab.hub import hub_reachable

    if not REPO_ID.match(repo):
        raise UserError(f"--push-to-hub {repo!r}: give a hub repository id such as your-name/model-name")
    if not hub_reachable():
        raise UserError(
            f"--push-to-hub {repo}: the Hugging Face Hub cannot be reached (offline); nothing was started. "
            "Drop --push-to-hub, or push later with `hf upload`"
        )
    from huggingface_hub import get_token

    if not get_token():
        raise UserError(f"--push-to-hub {repo}: no Hugging Face token: run `hf auth login` or set HF_TOKEN")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def model_card(
    summary: dict[str, Any],
    recommendation: dict[str, Any] | None = None,
    library: str | None = None,
    extra: Sequence[str] = (),
) -> str:
    """A Hub model card (YAML front matter + Markdown) from a run's summary.json (and a recommendation)."""
    base = summary.get("base_model")
    meta = ["---", "tags:", "- adaptlab", f"- {summary.get('method', 'fine-tuned')}"]
    if library:
        meta.append(f"library_name: {library}")
    if base and "/" in str(base):
        meta.append(f"base_model: {base}")
    meta.append("---")
    lines = [*meta, "", f"# {summary.get('method', 'fine-tuned')} on {base or 'a base model'}", ""]
    lines += ["Trained with [adaptlab](https://pypi.org/project/adaptlab/).", ""]
    lines += ["| run summary | |", "| --- | --- |"]
    lines += [
        f"| {label} | {_fmt(summary[key])} |" for key, label in CARD_FIELDS if summary.get(key) is not None
    ]
    if recommendation:
        lines += ["", "## Recommendation of the comparison", "", str(recommendation.get("summary", ""))]
        if recommendation.get("pick"):
            lines += ["", f"Recommended arm: **{recommendation['pick']}**"]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def upload(folder: Path, repo: str, card: str, files: Sequence[Path] | None = None) -> str:
    """Create `repo` if needed and upload `files` (default: every file of `folder`; adaptlab's marker and lock
    stay behind) and README.md (the card)."""
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi()
    api.create_repo(repo, exist_ok=True)
    paths = list(files) if files is not None else sorted(p for p in folder.rglob("*") if p.is_file())
    ops = [
        CommitOperationAdd(path_in_repo=str(p.relative_to(folder)), path_or_fileobj=str(p))
        for p in paths
        if p.name != "README.md" and not p.name.startswith(".adaptlab")
    ]
    ops.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=card.encode()))
    info = api.create_commit(repo, operations=ops, commit_message="Upload from adaptlab")
    return str(getattr(info, "commit_url", repo))


def run_card(run_dir: str | Path) -> tuple[Path, str]:
    """The folder to upload for a run (adapter/ or model/) and its card."""
    from adaptlab.artifacts import resolve

    art = resolve(run_dir)
    summary = _read_json((art.run_dir or art.path) / "summary.json") or {"base_model": art.base_model}
    return art.path, model_card(summary, library="peft" if art.kind == "adapter" else "transformers")


def push_run(run_dir: str | Path, repo: str) -> str:
    """Upload a run's adapter or model with its card; return the commit URL."""
    folder, card = run_card(run_dir)
    return upload(folder, repo, card)


def comparison_card(out: str | Path) -> tuple[Path, str]:
    """The recommended arm's artifact folder and a card with the comparison's recommendation."""
    out = Path(out)
    results = _read_json(out / "results.json")
    rec = results.get("recommendation") or {}
    pick = rec.get("pick")
    arm = next((a for a in results.get("arms", []) if a.get("name") == pick), None)
    if arm is None or not arm.get("runs"):
        raise UserError(f"{out}: the comparison recommends no arm, so there is nothing to push")
    folder, _ = run_card(out / arm["runs"][0]["dir"])
    summary = _read_json(out / arm["runs"][0]["dir"] / "summary.json")
    return folder, model_card(summary, rec, library="peft" if folder.name == "adapter" else "transformers")


def push_comparison(out: str | Path, repo: str) -> str:
    folder, card = comparison_card(out)
    return upload(folder, repo, card)


def push_export(out: str | Path, repo: str) -> str:
    """Upload an export folder (GGUF files, Modelfile, export.json) with a card naming what it holds."""
    out = Path(out)
    report = _read_json(out / "export.json")
    source = Path(str(report.get("source", "")))
    run_dir = source.parent if source.name in ("adapter", "model") else source
    summary = _read_json(run_dir / "summary.json") or {"method": report.get("kind", "export")}
    extra = [
        f"GGUF ({report.get('quant')}) written by adaptlab export: {Path(str(report.get('gguf'))).name}."
    ]
    card = model_card(summary, library="gguf", extra=extra)
    return upload(out, repo, card, [p for p in sorted(out.iterdir()) if p.is_file()])


def push_merged(adapter: str | Path, out: str | Path, repo: str) -> str:
    """Upload a merged model (`adaptlab merge`) with a card carrying the adapter's run summary."""
    from adaptlab.artifacts import resolve

    art = resolve(adapter)
    summary = _read_json((art.run_dir or art.path) / "summary.json") or {"base_model": art.base_model}
    extra = [f"The adapter was merged into its base with `adaptlab merge` ({summary.get('method', 'LoRA')})."]
    return upload(Path(out), repo, model_card(summary, library="transformers", extra=extra))
