"""smollm2-135m: merge within tolerance, and the server's mixed-adapter batches equal one-at-a-time generation.

python -m pytest -q -m integration tests/integration/test_serve_smollm2.py
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

pytestmark = pytest.mark.integration

MODEL = "smollm2-135m"
TARGETS = ["q_proj", "v_proj", "down_proj"]


def make_adapter(out: Path, seed: int) -> Path:
    """A random LoRA for smollm2 with small B, so the model still writes text but each adapter differs."""
    from peft import LoraConfig, get_peft_model

    from adaptlab.models import load_model

    model = load_model(MODEL).model
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=8, target_modules=TARGETS, init_lora_weights=False))
    for name, param in peft_model.named_parameters():
        if "lora_B" in name:
            param.data.mul_(0.02)
    peft_model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = MODEL
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("smollm2-adapters")
    return {"legal": make_adapter(root / "legal", 1), "systems": make_adapter(root / "systems", 2)}


def test_merge_smollm2_within_tolerance(adapters, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaptlab.adapters import merge_adapter

    report = merge_adapter(adapters["legal"], tmp_path / "merged")
    # fp32 over 30 layers lands near 1e-4 (1.1e-4 seen); the fp64 recomputation must be well inside it
    assert report.max_abs_diff < 1e-3 and report.base == MODEL
    assert report.max_abs_diff < 1e-4 or report.max_abs_diff_fp64 < 1e-4
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert model.config.num_hidden_layers == 30


def test_server_batches_adapters_on_smollm2(adapters):
    import uvicorn

    from adaptlab.serve import BASE, Engine, Job, Sampling
    from adaptlab.serve.server import create_app

    engine = Engine.load(MODEL, adapters)
    questions = ["What is a licence?", "What does ls do?", "Name a fruit.", "What is 2+2?"]
    models = ["legal", "systems", MODEL, "legal"]
    want = []
    for q, m in zip(questions, models, strict=True):
        job = Job(
            engine.encode_chat([{"role": "user", "content": q}]), BASE if m == MODEL else m, Sampling(12)
        )
        engine.generate([job])
        want.append(job.text)
    assert len(set(want)) == len(want)

    app = create_app(engine, MODEL, batch_wait_ms=200)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(300):
        if server.started:
            break
        threading.Event().wait(0.1)
    port = server.servers[0].sockets[0].getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1/chat/completions"
    barrier = threading.Barrier(len(questions))

    def ask(i: int) -> str:
        body = {"model": models[i], "messages": [{"role": "user", "content": questions[i]}], "max_tokens": 12,
                "temperature": 0}  # fmt: skip
        barrier.wait(timeout=60)
        r = httpx.post(url, json=body, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    try:
        with ThreadPoolExecutor(len(questions)) as pool:
            got = list(pool.map(ask, range(len(questions))))
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    assert got == want
    assert max(app.state.batcher.batch_sizes) > 1
