"""Generation engine and the OpenAI-compatible server on tiny-random, with real HTTP clients on loopback."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch

from adaptlab.serve import BASE, Engine, Job, Sampling

PROMPTS = [
    "Hello there",
    "The quick brown fox jumps over",
    "def f(x):",
    "Once upon a time in a land far away",
]


def make_adapter(out: Path, seed: int, targets: list[str] | None = None, r: int = 8) -> Path:
    """Save a peft LoRA adapter for tiny-random with random A and B; its config names the base 'tiny-random'."""
    from peft import LoraConfig, get_peft_model

    from adaptlab.models import load_model

    base = load_model("tiny-random").model
    torch.manual_seed(seed)
    config = LoraConfig(
        r=r, target_modules=targets or ["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    get_peft_model(base, config).save_pretrained(out)
    path = out / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["base_model_name_or_path"] = "tiny-random"
    path.write_text(json.dumps(cfg))
    return out


def make_foreign_adapter(out: Path) -> Path:
    """An adapter for another base (a Llama with hidden size 32)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(
        LlamaConfig(
            vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
        )
    )
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    allowed = root / "allowed"
    return {
        "a": make_adapter(allowed / "a", seed=1),
        "b": make_adapter(allowed / "b", seed=2, targets=["k_proj", "o_proj", "up_proj"], r=4),
        "c": make_adapter(allowed / "c", seed=3),
        "foreign": make_foreign_adapter(allowed / "foreign"),
        "outside": make_adapter(root / "outside", seed=4),
        "allowed": allowed,
    }


@pytest.fixture(scope="module")
def engine(adapters) -> Engine:
    return Engine.load("tiny-random", {"a": adapters["a"], "b": adapters["b"]})


def single(engine: Engine, prompt_ids: list[int], adapter: str, max_new_tokens: int, **kw: object) -> Job:
    job = Job(list(prompt_ids), adapter=adapter, sampling=Sampling(max_new_tokens=max_new_tokens, **kw))
    engine.generate([job])
    return job


# -- engine --------------------------------------------------------------------------------------


def test_mixed_adapter_batch_equals_one_at_a_time(engine):
    rows = [(PROMPTS[i % 4], name, 4 + 3 * i) for i, name in enumerate([BASE, "a", "b", "a", BASE, "b"])]
    jobs = [Job(engine.encode(p), adapter=n, sampling=Sampling(max_new_tokens=m)) for p, n, m in rows]
    engine.generate(jobs)
    for job in jobs:
        alone = single(engine, job.prompt_ids, job.adapter, job.sampling.max_new_tokens)
        assert job.token_ids == alone.token_ids and job.text == alone.text
        assert job.finish_reason == "length" and len(job.token_ids) == job.sampling.max_new_tokens
    # each adapter really changes the output, so equality above is not base == base
    ids = engine.encode(PROMPTS[0])
    outs = {n: tuple(single(engine, ids, n, 6).token_ids) for n in (BASE, "a", "b")}
    assert len(set(outs.values())) == 3


def test_job_for_an_unloaded_adapter_fails_alone(engine):
    ok = Job(engine.encode(PROMPTS[0]), adapter="a", sampling=Sampling(max_new_tokens=3))
    gone = Job(engine.encode(PROMPTS[0]), adapter="gone", sampling=Sampling(max_new_tokens=3))
    engine.generate([gone, ok])
    assert gone.finish_reason == "error" and "loaded: a, b" in (gone.error or "")
    assert ok.finish_reason == "length" and len(ok.token_ids) == 3


def test_streamed_text_and_stop_strings(engine):
    ids = engine.encode(PROMPTS[1])
    pieces: list[str] = []
    job = Job(ids, adapter="a", sampling=Sampling(max_new_tokens=12), on_text=pieces.append)
    engine.generate([job])
    assert "".join(pieces) == job.text and len(pieces) > 1
    stop = job.text[len(job.text) // 2 : len(job.text) // 2 + 3]
    pieces = []
    stopped = Job(ids, adapter="a", sampling=Sampling(max_new_tokens=12, stop=(stop,)), on_text=pieces.append)
    engine.generate([stopped])
    assert stopped.finish_reason == "stop"
    assert stopped.text == job.text[: job.text.find(stop)] == "".join(pieces)


def test_sampling_is_reproducible_with_a_seed_in_any_batch(engine):
    ids = engine.encode(PROMPTS[2])
    s = Sampling(max_new_tokens=8, temperature=1.0, top_p=0.9, seed=123)
    alone = Job(ids, adapter="b", sampling=s)
    engine.generate([alone])
    batch = [Job(ids, adapter="b", sampling=s), Job(engine.encode(PROMPTS[0]), adapter="a", sampling=s)]
    engine.generate(batch)
    assert batch[0].token_ids == alone.token_ids
    other = Job(ids, adapter="b", sampling=Sampling(max_new_tokens=8, temperature=1.0, seed=7))
    engine.generate([other])
    assert other.token_ids != alone.token_ids


# -- the running server --------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app) -> Iterator[str]:
    """Run the app with uvicorn on a free loopback port in a background thread; yields the /v1 base URL."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    for _ in range(200):  # up to 20 s
        if server.started:
            break
        time.sleep(0.1)
    assert server.started, "server did not start"
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(engine, adapters) -> Iterator[tuple[str, object]]:
    from adaptlab.serve.server import ServerLimits, create_app

    limits = ServerLimits(max_prompt_tokens=64, max_new_tokens=32, max_body_bytes=20_000)
    app = create_app(engine, "tiny-random", adapters["allowed"], limits, max_batch_size=8, batch_wait_ms=100)
    with running(app) as url:
        yield url, app


def openai_client(url: str):
    import openai

    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=60)


def test_models_and_completions_with_openai_client(server, engine):
    url, _ = server
    client = openai_client(url)
    assert [m.id for m in client.models.list().data] == ["tiny-random", "a", "b"]
    for name, adapter in (("tiny-random", BASE), ("a", "a"), ("b", "b")):
        got = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=7, temperature=0)
        want = single(engine, engine.encode(PROMPTS[1]), adapter, 7)
        assert got.choices[0].text == want.text and got.choices[0].finish_reason == "length"
        assert got.usage.completion_tokens == 7 and got.usage.prompt_tokens == len(want.prompt_ids)


def test_chat_streaming_matches_non_streaming(server, engine):
    url, _ = server
    client = openai_client(url)
    messages = [{"role": "user", "content": "Name a colour."}]
    whole = client.chat.completions.create(model="a", messages=messages, max_tokens=10, temperature=0)
    want = single(engine, engine.encode_chat(messages), "a", 10)
    assert whole.choices[0].message.content == want.text and whole.object == "chat.completion"
    pieces = []
    finish = None
    for chunk in client.chat.completions.create(
        model="a", messages=messages, max_tokens=10, temperature=0, stream=True
    ):
        assert chunk.object == "chat.completion.chunk"
        pieces.append(chunk.choices[0].delta.content or "")
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == want.text and finish == "length"


def test_raw_sse_framing(server):
    url, _ = server
    body = {"model": "b", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", f"{url}/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["usage"]["completion_tokens"] == 5 and payloads[-1]["choices"] == []
    assert payloads[-2]["choices"][0]["finish_reason"] == "length"


def test_concurrent_requests_for_different_adapters_batch_and_match_single(server, engine):
    url, app = server
    names = {"tiny-random": BASE, "a": "a", "b": "b"}
    requests = [
        (PROMPTS[i % 4], model, 5 + i)
        for i, model in enumerate(["a", "b", "tiny-random", "b", "a", "tiny-random"])
    ]
    want = [single(engine, engine.encode(p), names[m], n).text for p, m, n in requests]
    app.state.batcher.batch_sizes.clear()
    barrier = threading.Barrier(len(requests))

    def call(req: tuple[str, str, int]) -> str:
        prompt, model, n = req
        with httpx.Client(timeout=60) as http:
            barrier.wait(timeout=30)
            r = http.post(
                f"{url}/completions",
                json={"model": model, "prompt": prompt, "max_tokens": n, "temperature": 0},
            )
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]

    with ThreadPoolExecutor(len(requests)) as pool:
        got = list(pool.map(call, requests))
    assert got == want
    assert max(app.state.batcher.batch_sizes) > 1  # at least some requests shared a forward pass


def test_errors_are_openai_json_and_server_keeps_serving(server):
    url, _ = server
    ok = {"model": "a", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    cases = [
        ({**ok, "model": "nope"}, 404, "model_not_found", "tiny-random, a, b"),
        (b'{"model": "a", "prompt": ', 400, "invalid_json", "malformed JSON"),
        ({**ok, "max_tokens": 999}, 400, "max_tokens_too_large", "limit of 32"),
        ({**ok, "prompt": "word " * 100}, 400, "context_length_exceeded", "limit of 64"),
        ({**ok, "prompt": "x" * 30_000}, 413, "request_too_large", "over 20000 bytes"),
        ({"prompt": "Hi"}, 400, "invalid_value", "model"),
        ({**ok, "temperature": -1}, 400, "invalid_value", "temperature"),
    ]
    with httpx.Client(timeout=60) as http:
        for body, status, code, words in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"{url}/completions", content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (body, r.text)
            err = r.json()["error"]
            assert err["code"] == code and words in err["message"], err
            assert set(err) == {"message", "type", "code", "param"}
        assert http.get(f"{url}/nowhere").json()["error"]["type"] == "not_found_error"
        assert http.post(f"{url}/completions", json=ok).status_code == 200


def test_malformed_requests_get_4xx_openai_json(server, adapters):
    url, _ = server
    ok = {"model": "a", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    chat = {"model": "a", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]}
    cases = [
        ("completions", {**ok, "seed": 2**80}, 400, "seed"),
        ("completions", json.dumps(ok).replace('"Hi"', '"\\ud800 Hi"').encode(), 400, "lone surrogate"),
        ("completions", b"\xff\xfe{}", 400, "malformed JSON"),
        ("completions", b"[" * 19_000, 400, "nested too deeply"),
        ("completions", b'{"model": "a", "prompt": "Hi", "temperature": NaN}', 400, "temperature"),
        ("completions", [ok], 400, "body"),
        ("chat/completions", {**chat, "messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
         400, "messages.0.content"),
        ("chat/completions", {**chat, "messages": [{"role": "user", "content": [7]}]}, 400, "messages"),
        ("adapters", {"name": "x", "path": "c\x00/../../etc"}, 400, "NUL"),
        ("adapters", {"name": "x", "path": "d" * 5000}, 400, "name too long"),
        ("adapters", {"name": "x\x00", "path": "c"}, 400, "adapter name"),
    ]  # fmt: skip
    with httpx.Client(timeout=60) as http:
        for route, body, status, words in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"{url}/{route}", content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (route, str(body)[:200], r.text)
            err = r.json()["error"]
            assert words in err["message"] and set(err) == {"message", "type", "code", "param"}, err
        # the widest seeds are valid, and a negative seed is its 64-bit two's complement, as in torch
        sampled = {**ok, "temperature": 1.0, "max_tokens": 6}
        texts = [
            http.post(f"{url}/completions", json={**sampled, "seed": seed}).json()["choices"][0]["text"]
            for seed in (-1, 2**64 - 1)
        ]
        assert texts[0] == texts[1]


def test_chunked_body_over_the_limit_is_refused_while_reading(server):
    """A chunked body that never ends gets 413 once it passes the limit (20,000 bytes here)."""
    url, _ = server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    head = (
        b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n"
    )
    piece = b"x" * 8192
    with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
        conn.sendall(head + b'1a\r\n{"model": "a", "prompt": "\r\n')
        for _ in range(4):  # 32 KiB, then silence: the body's final chunk is never sent
            conn.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        reply = b""
        while b"request_too_large" not in reply and (more := conn.recv(65536)):
            reply += more
    status, _, rest = reply.partition(b"\r\n")
    assert status == b"HTTP/1.1 413 Request Entity Too Large", reply[:300]
    assert b"request_too_large" in rest


def test_openai_client_sees_unknown_model_as_not_found(server):
    import openai

    url, _ = server
    with pytest.raises(openai.NotFoundError, match="loaded models"):
        openai_client(url).completions.create(model="nope", prompt="Hi", max_tokens=2)


def test_load_and_unload_adapters_at_run_time(server, adapters, engine):
    url, _ = server
    allowed = adapters["allowed"]
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{url}/adapters", json={"name": "x", "path": str(adapters["outside"])})
        assert r.status_code == 403 and r.json()["error"]["code"] == "path_not_allowed"
        r = http.post(f"{url}/adapters", json={"name": "x", "path": "../outside"})
        assert r.status_code == 403
        r = http.post(f"{url}/adapters", json={"name": "x", "path": "foreign"})
        assert r.status_code == 400 and "does not fit" in r.json()["error"]["message"]
        r = http.post(f"{url}/adapters", json={"name": "a", "path": "c"})
        assert r.status_code == 409
        r = http.post(f"{url}/adapters", json={"name": "x", "path": "missing"})
        assert r.status_code == 400 and "no such file" in r.json()["error"]["message"]
        assert "x" not in engine.adapters  # failed loads leave nothing behind

        r = http.post(f"{url}/adapters", json={"name": "c", "path": str(allowed / "c")})
        assert r.status_code == 201, r.text
        assert [m["id"] for m in http.get(f"{url}/models").json()["data"]] == ["tiny-random", "a", "b", "c"]
        body = {"model": "c", "prompt": PROMPTS[3], "max_tokens": 6, "temperature": 0}
        got = http.post(f"{url}/completions", json=body).json()["choices"][0]["text"]
        fresh = Engine.load("tiny-random", {"c": allowed / "c"})
        assert got == single(fresh, fresh.encode(PROMPTS[3]), "c", 6).text

        assert http.delete(f"{url}/adapters/c").json() == {"id": "c", "object": "model", "deleted": True}
        r = http.post(f"{url}/completions", json=body)
        assert r.status_code == 404 and "loaded models: tiny-random, a, b" in r.json()["error"]["message"]
        assert http.delete(f"{url}/adapters/c").status_code == 404
        assert http.delete(f"{url}/adapters/tiny-random").status_code == 400
        # the adapters that stayed still give what they gave before
        body["model"] = "a"
        assert (
            http.post(f"{url}/completions", json=body).json()["choices"][0]["text"]
            == single(engine, engine.encode(PROMPTS[3]), "a", 6).text
        )


def test_unloading_an_adapter_waits_for_its_requests_in_flight(engine, adapters):
    """DELETE while ~20 requests for the adapter are queued: those admitted finish (200), later ones get
    404, none a 500; the adapter is gone once DELETE answers."""
    from adaptlab.serve.server import ServerLimits, create_app

    limits = ServerLimits(max_prompt_tokens=64, max_new_tokens=32)
    app = create_app(engine, "tiny-random", adapters["allowed"], limits, max_batch_size=2, batch_wait_ms=1)
    body = {"model": "d", "prompt": PROMPTS[1], "max_tokens": 12, "temperature": 0}
    want = single(Engine.load("tiny-random", {"d": adapters["c"]}), engine.encode(PROMPTS[1]), "d", 12).text
    with running(app) as url, httpx.Client(timeout=120) as http:
        assert http.post(f"{url}/adapters", json={"name": "d", "path": "c"}).status_code == 201
        batches = len(app.state.batcher.batch_sizes)
        with ThreadPoolExecutor(20) as pool:
            replies = [pool.submit(http.post, f"{url}/completions", json=body) for _ in range(20)]
            for _ in range(600):  # the first batch has started: the rest wait in the queue
                if len(app.state.batcher.batch_sizes) > batches:
                    break
                time.sleep(0.01)
            deleted = http.delete(f"{url}/adapters/d")
            late = http.post(f"{url}/completions", json=body)
            results = [r.result() for r in replies]
        assert deleted.status_code == 200, deleted.text
        assert "d" not in engine.adapters
        assert late.status_code == 404 and late.json()["error"]["code"] == "model_not_found"
        statuses = sorted(r.status_code for r in results)
        assert set(statuses) <= {200, 404}, [r.text for r in results if r.status_code not in (200, 404)]
        assert statuses.count(200) >= 1, statuses  # at least the request of the first batch
        assert all(r.json()["choices"][0]["text"] == want for r in results if r.status_code == 200)


def test_counts_must_be_json_integers(server):
    url, _ = server
    ok = {"model": "a", "prompt": "Hi", "max_tokens": 2, "temperature": 0}
    cases = [("max_tokens", "3"), ("max_tokens", True), ("max_tokens", 2.0), ("max_completion_tokens", "3"),
             ("n", True), ("n", "1"), ("seed", True), ("seed", "7")]  # fmt: skip
    with httpx.Client(timeout=60) as http:
        for field, value in cases:
            r = http.post(f"{url}/completions", json={**ok, field: value})
            assert r.status_code == 400, (field, value, r.text)
            err = r.json()["error"]
            assert err["param"] == field and "valid integer" in err["message"], err
        assert http.post(f"{url}/completions", json=ok).status_code == 200


def test_client_dropping_mid_body_logs_one_line_not_a_traceback(server):
    import logging

    url, _ = server
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as conn:
            conn.sendall(
                b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                b'Content-Length: 1000\r\n\r\n{"model": "a", "prompt": '
            )
            time.sleep(0.3)
        for _ in range(100):
            if records:
                break
            time.sleep(0.05)
        time.sleep(0.3)  # anything else it would log
    finally:
        logger.removeHandler(handler)
    assert not [r for r in records if r.exc_info], [r.getMessage() for r in records]
    assert len(records) <= 1 and all("\n" not in r.getMessage() for r in records), records
    assert (
        httpx.post(f"{url}/completions", json={"model": "a", "prompt": "Hi", "max_tokens": 2}).status_code
        == 200
    )


class _Planted:
    """Unpickling this creates a file: the proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_adapter_holding_only_a_pickle_is_refused_without_loading_it(server, adapters, run_cli, tmp_path):
    import pickle
    import shutil

    url, _ = server
    folder = adapters["allowed"] / "pickled"
    folder.mkdir()
    shutil.copy(adapters["a"] / "adapter_config.json", folder)
    marker = tmp_path / "unpickled"
    (folder / "adapter_model.bin").write_bytes(pickle.dumps(_Planted(marker)))
    r = httpx.post(f"{url}/adapters", json={"name": "p", "path": "pickled"}, timeout=60)
    assert r.status_code == 400 and "safetensors only" in r.json()["error"]["message"], r.text
    code, _, err = run_cli("generate", "--model", "tiny-random", "--adapter", f"p={folder}", "--prompt", "x")
    assert code == 2 and "safetensors only" in err and len(err.strip().splitlines()) == 1, err
    assert not marker.exists()


def test_runtime_loading_off_without_adapter_dir(engine, adapters):
    from adaptlab.serve.server import create_app

    with running(create_app(engine, "tiny-random")) as url:
        r = httpx.post(
            f"{url}/adapters", json={"name": "c", "path": str(adapters["allowed"] / "c")}, timeout=60
        )
        assert r.status_code == 403 and "--adapter-dir" in r.json()["error"]["message"]


# -- the CLI -------------------------------------------------------------------------------------


def test_generate_cli_streams_base_and_adapters(run_cli, adapters, engine):
    code, out, err = run_cli(
        "generate", "--model", "tiny-random", "--adapter", f"a={adapters['a']}", "--use", "base", "--use", "a",
        "--prompt", PROMPTS[0], "--max-new-tokens", "6", "--no-chat",
    )  # fmt: skip
    assert code == 0, err
    ids = engine.encode(PROMPTS[0])
    want = f"--- base\n{single(engine, ids, BASE, 6).text}\n--- a\n{single(engine, ids, 'a', 6).text}\n"
    assert out == want
    code, out, err = run_cli("generate", "--model", "tiny-random", "--prompt", "Hi", "--max-new-tokens", "4")
    chat_ids = engine.encode_chat([{"role": "user", "content": "Hi"}])  # chat template by default
    assert code == 0 and out == single(engine, chat_ids, BASE, 4).text + "\n"


def test_cli_bad_input_exit_2_one_line(run_cli, adapters, tmp_path):
    cases = [
        (("generate", "--model", "tiny-random", "--prompt", "x", "--use", "zz"), "--use zz"),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--adapter", "a=/no/such"), "no such file"),
        (
            ("generate", "--model", "tiny-random", "--prompt", "x", "--adapter", f"a={adapters['foreign']}"),
            "does not fit",
        ),
        (("generate", "--model", "tiny-random", "--prompt", "x", "--adapter", "b@d=x"), "NAME=DIR"),
        (("serve", "--model", "tiny-random", "--adapter-dir", tmp_path / "none"), "no such directory"),
        (("serve", "--model", "nowhere/../x"), "no such directory"),
    ]
    for args, words in cases:
        code, _, err = run_cli(*args)
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)


def test_serve_startup_errors_are_one_line_exit_2(run_cli):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        code, _, err = run_cli("serve", "--model", "tiny-random", "--port", port)
    assert code == 2 and f"--port {port}" in err and "already in use" in err, err
    assert len(err.strip().splitlines()) == 1
    code, _, err = run_cli("serve", "--model", "tiny-random", "--host", "192.0.2.1", "--port", "0")
    assert code == 2 and "cannot listen on 192.0.2.1" in err and len(err.strip().splitlines()) == 1, err


def test_generate_refuses_binary_stdin_in_one_line(run_cli, monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"Hi \xff\xfe there")))
    code, out, err = run_cli("generate", "--model", "tiny-random", "--prompt", "-")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1, err
    assert "standard input is not UTF-8" in err and "0xff at offset 3" in err
    code, _, err = run_cli("generate", "--model", "tiny-random", "--prompt", "caf\udce9")
    assert code == 2 and "--prompt: not UTF-8" in err and len(err.strip().splitlines()) == 1, err


def test_serve_command_runs_on_loopback(adapters):
    port = free_port()
    cmd = [sys.executable, "-m", "adaptlab", "serve", "--model", "tiny-random", "--adapter", f"a={adapters['a']}",
           "--port", str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        data = None
        for _ in range(240):  # up to 120 s on a busy machine
            if proc.poll() is not None:
                break
            try:
                data = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                time.sleep(0.5)
        assert data is not None, proc.stdout.read() if proc.poll() is not None else "server did not answer"
        assert [m["id"] for m in data["data"]] == ["tiny-random", "a"]
        r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=60,
                       json={"model": "a", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3})  # fmt: skip
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] <= 3
    finally:
        proc.terminate()
        proc.wait(timeout=30)
