"""Data: stable document splits, packing with EOS between documents, loss on responses only."""

from __future__ import annotations

import json

from adaptlab.data.corpus import IGNORE_INDEX, build_examples, split_documents
from adaptlab.data.sources import Document, load_documents


def test_splits_are_disjoint_stable_and_independent_of_other_documents():
    docs = [Document(id=f"doc-{i}", text=f"text {i}") for i in range(400)]
    parts = {s: {d.id for d in split_documents(docs, s)} for s in ("train", "val", "test")}
    assert sum(len(p) for p in parts.values()) == 400
    assert (
        not (parts["train"] & parts["val"])
        and not (parts["train"] & parts["test"])
        and not (parts["val"] & parts["test"])
    )
    assert 5 <= len(parts["test"]) <= 40 and 5 <= len(parts["val"]) <= 40
    more = docs + [Document(id=f"new-{i}", text="x") for i in range(100)]
    assert parts["test"] <= {d.id for d in split_documents(more, "test")}  # adding docs moves none


def test_tiny_corpora_still_get_held_out_documents():
    docs = [Document(id=str(i), text="t") for i in range(3)]
    assert [len(split_documents(docs, s)) for s in ("train", "val", "test")] == [1, 1, 1]


def test_one_or_two_documents_all_train():
    for n in (1, 2):
        docs = [Document(id=f"only-{i}", text="t") for i in range(n)]
        assert [len(split_documents(docs, s)) for s in ("train", "val", "test")] == [n, 0, 0]


def test_splits_do_not_depend_on_where_the_data_folder_lives(tmp_path):
    lines = "".join(json.dumps({"text": f"document {i}"}) + "\n" for i in range(60))
    for where in ("a", "b/c"):
        (tmp_path / where / "legal").mkdir(parents=True)
        (tmp_path / where / "legal" / "train.jsonl").write_text(lines)
    ids = [
        {s: [d.id for d in split_documents(load_documents(str(tmp_path / w / "legal" / "train.jsonl")), s)]
         for s in ("train", "val", "test")}
        for w in ("a", "b/c")
    ]  # fmt: skip
    assert ids[0] == ids[1] and ids[0]["train"][0] == "legal/train.jsonl:1"


def test_packing_puts_eos_between_documents(tiny):
    tok = tiny.tokenizer
    docs = [Document(id="a", text="alpha beta gamma " * 5), Document(id="b", text="delta epsilon " * 5)]
    blocks = build_examples(docs, tok, seq_len=8)
    flat = [t for b in blocks for t in b.input_ids]
    assert tok.eos_token_id in flat
    assert all(len(b.input_ids) == 8 and b.labels == b.input_ids for b in blocks)


def test_instruction_loss_on_response_only(tiny, tmp_path):
    path = tmp_path / "ift.jsonl"
    path.write_text(json.dumps({"prompt": "Define cat.", "response": "a small feline"}) + "\n")
    (example,) = build_examples(load_documents(str(path)), tiny.tokenizer, seq_len=256)
    trained = [t for t, label in zip(example.input_ids, example.labels) if label != IGNORE_INDEX]
    text = tiny.tokenizer.decode(trained)
    assert text.startswith("a small feline") and "Define" not in text
    assert tiny.tokenizer.eos_token_id in trained  # the model learns to stop


def test_messages_records_and_directory_sources(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.md").write_text("# Title\nbody")
    (tmp_path / "d" / "b.txt").write_text("plain")
    (tmp_path / "d" / "c.jsonl").write_text(
        json.dumps(
            {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
        )
        + "\n"
    )
    docs = load_documents(str(tmp_path / "d"))
    assert len(docs) == 3 and sum(d.is_chat for d in docs) == 1
    assert len(load_documents(str(tmp_path / "d" / "*.md"))) == 1


def test_python_stdlib_excludes_tests():
    docs = load_documents("python-stdlib")
    assert len(docs) > 300
    assert not any("/test/" in d.id or "/tests/" in d.id for d in docs)
