"""Fuzzing with hypothesis: random JSON and bytes at every server route, random files at train, eval, plan.

The server must answer every request with 2xx or an OpenAI-style 4xx, never 500. The CLI must end
every run with exit 0 or 2 and, on 2, one line on stderr: no traceback, whatever the data file or
config file holds. Example counts are small so the file runs in about a minute on tiny-random.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FUZZ = settings(
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

# any code point, lone surrogates included (JSON escapes them as \ud800; a client can send them)
ANY_CHAR = st.characters(codec=None, exclude_categories=())
INTS = st.integers(-3, 6) | st.sampled_from([0, 2**31, 2**63, 2**64, 2**80, -(2**80)])
FLOATS = st.floats(allow_nan=True, allow_infinity=True) | st.sampled_from([0.0, 0.5, 1.0, 2.0])


def _text(chars: st.SearchStrategy[str], odd: list[str]) -> st.SearchStrategy[str]:
    return st.text(chars, max_size=20) | st.sampled_from(["", "Hi", "tiny-random", "\x00", *odd])


def _json(text: st.SearchStrategy[str]) -> st.SearchStrategy[Any]:
    scalars = st.none() | st.booleans() | INTS | FLOATS | text
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
        max_leaves=8,
    )


TEXT = _text(ANY_CHAR, ["\ud800"])
JSON = _json(TEXT)


def _shaped(required: dict[str, Any], optional: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Bodies with every field of the right JSON type (hostile values included), or one field replaced."""
    typed = st.fixed_dictionaries(required, optional=optional)
    keys = st.sampled_from(sorted({*required, *optional})) | TEXT
    return typed | st.tuples(typed, keys, JSON).map(lambda t: {**t[0], t[1]: t[2]})


MODELS = st.sampled_from(["tiny-random", "__base__"]) | TEXT
PART = st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url"]) | TEXT}, optional={"text": JSON})
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "user", "assistant", "developer", "tool"]),
        "content": st.none() | TEXT | st.lists(PART | JSON, max_size=2),
    }
)
COMMON = {
    "max_tokens": st.integers(1, 4) | INTS,
    "temperature": st.floats(0, 2) | FLOATS,
    "top_p": st.floats(0.1, 1) | FLOATS,
    "n": st.integers(1, 2) | INTS,
    "seed": INTS,
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": JSON}),
    "stop": TEXT | st.lists(TEXT, max_size=5),
    "logprobs": JSON,
}
# bodies shaped like the real ones, so that most of them get past the schema to the model
COMPLETION = _shaped({"model": MODELS, "prompt": TEXT | st.lists(TEXT, max_size=3)}, COMMON)
CHAT = _shaped({"model": MODELS, "messages": st.lists(MESSAGE, min_size=1, max_size=3)}, COMMON)
ADAPTER = _shaped({"name": TEXT, "path": TEXT | st.sampled_from(["empty", "notes.txt", "../x", "/etc"])}, {})
ROUTES = {"completions": COMPLETION, "chat/completions": CHAT, "adapters": ADAPTER}


# -- the server ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    from fastapi.testclient import TestClient

    from adaptlab.serve import Engine
    from adaptlab.serve.server import ServerLimits, create_app

    allowed = tmp_path_factory.mktemp("adapters")
    (allowed / "empty").mkdir()
    (allowed / "notes.txt").write_text("not an adapter")
    limits = ServerLimits(max_prompt_tokens=32, max_new_tokens=4, max_body_bytes=4000, max_choices=2)
    app = create_app(Engine.load("tiny-random"), "tiny-random", allowed, limits, batch_wait_ms=0)
    with TestClient(app, raise_server_exceptions=False) as http:
        yield http


def _assert_answered(response: Any, request: object) -> None:
    assert response.status_code < 500, (request, response.text)
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "code", "param"}, (request, error)


@settings(FUZZ, max_examples=60)
@given(route=st.sampled_from(sorted(ROUTES)), data=st.data())
def test_shaped_json_at_post_routes_never_500(client, route, data):
    body = data.draw(ROUTES[route] | JSON)
    content = json.dumps(body, allow_nan=True).encode()
    response = client.post(f"/v1/{route}", content=content, headers={"content-type": "application/json"})
    _assert_answered(response, body)


@settings(FUZZ, max_examples=30)
@given(route=st.sampled_from(sorted(ROUTES)), content=st.binary(max_size=200))
def test_random_bytes_at_post_routes_never_500(client, route, content):
    response = client.post(f"/v1/{route}", content=content, headers={"content-type": "application/json"})
    _assert_answered(response, content)


@settings(FUZZ, max_examples=30)
@given(method=st.sampled_from(["GET", "POST", "DELETE", "PUT"]), path=st.sampled_from(
    ["/health", "/v1/models", "/v1/adapters", "/v1/adapters/{}", "/v1/{}", "/{}"]
), name=TEXT, body=JSON)  # fmt: skip
def test_any_method_and_path_never_500(client, method, path, name, body):
    url = path.format(quote(name.encode("utf-8", "surrogatepass"), safe=""))
    response = client.request(method, url, content=json.dumps(body).encode())
    _assert_answered(response, (method, url, body))


# -- the CLI ---------------------------------------------------------------------------------------


# File contents: any character, lone surrogates included (JSON escapes such as "\\udcbe" decode to them).
FILE_CHAR = ANY_CHAR
FILE_JSON = _json(_text(FILE_CHAR, []))
LINE = (
    st.builds(
        json.dumps,
        st.fixed_dictionaries({"text": FILE_JSON}, optional={"prompt": FILE_JSON, "messages": FILE_JSON}),
    )
    | st.builds(json.dumps, FILE_JSON)
    | st.text(FILE_CHAR.filter(lambda c: c not in "\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=40)
)
JSONL = st.lists(LINE, max_size=6).map(lambda lines: "\n".join(lines).encode())
YAML = st.builds(lambda v: yaml.safe_dump(v, allow_unicode=True).encode(), FILE_JSON)
# documents of any text: these get past reading, to tokenizing and training
DOCS = st.lists(st.text(FILE_CHAR, min_size=80, max_size=300), min_size=6, max_size=12).map(
    lambda texts: "\n".join(json.dumps({"text": t}) for t in texts).encode()
)
BYTES = st.binary(max_size=300)
FILE_BYTES = BYTES | JSONL | YAML | DOCS


def _run(run_cli, *args: object) -> None:
    code, _, err = run_cli(*args)
    assert code in (0, 2), (args, code, err)
    if code == 2:
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (args, err)


def _data_file(folder: str, content: bytes, suffix: str = ".jsonl") -> Path:
    path = Path(folder) / f"data{suffix}"
    path.write_bytes(content)
    return path


@settings(FUZZ, max_examples=6)
@given(content=FILE_BYTES)
def test_train_on_a_random_data_file_exits_0_or_2(run_cli, content):
    with tempfile.TemporaryDirectory() as folder:
        data = _data_file(folder, content)
        _run(run_cli, "train", "--model", "tiny-random", "--data", data, "--steps", 1, "--seq-len", 16,
             "--batch", 1, "--quiet", "--out", Path(folder) / "run")  # fmt: skip


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A small valid text file, so that a config that validates trains one quick step."""
    words = [
        "the",
        "licence",
        "grants",
        "permission",
        "to",
        "copy",
        "modify",
        "and",
        "distribute",
        "this",
        "software",
    ]
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    lines = [
        json.dumps({"text": " ".join(words[(i + j) % len(words)] for j in range(40))}) for i in range(30)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@settings(FUZZ, max_examples=4)
@given(
    content=YAML
    | BYTES
    | st.fixed_dictionaries(
        {},
        optional={
            "model": FILE_JSON,
            "method": FILE_JSON,
            "data": FILE_JSON,
            "train": FILE_JSON,
            "out": FILE_JSON,
        },
    ).map(lambda v: yaml.safe_dump(v).encode())
)
def test_train_with_a_random_config_file_exits_0_or_2(run_cli, corpus, content):
    with tempfile.TemporaryDirectory() as folder:
        config = _data_file(folder, content, ".yaml")
        _run(run_cli, "train", "--config", config, "--model", "tiny-random", "--data", corpus, "--steps", 1,
             "--seq-len", 16, "--batch", 1, "--quiet", "--out", Path(folder) / "run")  # fmt: skip


@settings(FUZZ, max_examples=6)
@given(content=FILE_BYTES)
def test_eval_on_a_random_data_file_exits_0_or_2(run_cli, content):
    with tempfile.TemporaryDirectory() as folder:
        data = _data_file(folder, content)
        _run(run_cli, "eval", "--model", "tiny-random", "--data", data, "--seq-len", 16, "--max-docs", 4,
             "--no-cache")  # fmt: skip


@settings(FUZZ, max_examples=6)
@given(content=FILE_BYTES)
def test_plan_on_a_random_data_file_exits_0_or_2(run_cli, content):
    with tempfile.TemporaryDirectory() as folder:
        data = _data_file(folder, content)
        _run(run_cli, "plan", "--model", "tiny-random", "--data", data, "--seq-len", 16, "--no-benchmark")
