"""Generation with a base model and many LoRA adapters at once: the engine under `generate` and `serve`.

One `Engine` holds the base model wrapped in a peft PeftModel with every loaded adapter. A batch of
`Job`s (one prompt each, each naming its own adapter or BASE) runs as one forward pass per step:
rows are left-padded and peft's mixed-adapter inference (`adapter_names=[...]`) routes every row
through its own LoRA matrices, so requests for different adapters share the base's matmuls. The
decode loop is our own (KV cache, per-row sampling, stop strings, finished rows dropped from the
batch) so that each row can stream its text and stop on its own. Greedy decoding (temperature 0)
is deterministic.

`Batcher` collects jobs arriving within a few milliseconds into one batch, on a worker thread.

    python -c "from adaptlab.serve import Engine, Job, Sampling; e = Engine.load('tiny-random'); \
j = Job(e.encode('Hello'), sampling=Sampling(max_new_tokens=8)); e.generate([j]); print(j.text)"
"""

from __future__ import annotations

import queue
import re
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from adaptlab.artifacts import attach_adapter, resolve_adapter
from adaptlab.errors import UserError
from adaptlab.models import LoadedModel, load_model
from adaptlab.sampling import draw, left_pad, next_token_logits, top_p_filter

BASE = "__base__"  # peft's name for rows of a mixed batch that use no adapter
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class Sampling:
    """How one row is decoded. temperature 0 is greedy (argmax) and deterministic."""

    max_new_tokens: int = 128
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None  # fixes a sampled row's output regardless of what else is in its batch
    stop: tuple[str, ...] = ()  # the text ends before the first of these strings
    ignore_eos: bool = False  # run to max_new_tokens (benchmarks: equal work for every row)


@dataclass
class Job:
    """One prompt to complete: its token ids, the adapter it uses and where its text goes as it grows."""

    prompt_ids: list[int]
    adapter: str = BASE
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # called with each new piece of text (engine thread)
    on_finish: Callable[[Job], None] | None = None  # called once, when the job is done or failed
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the engine
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # 'stop' | 'length' | 'cancelled' | 'error'
    error: str | None = None


def parse_adapter_specs(specs: Sequence[str]) -> dict[str, str]:
    """`NAME=DIR` or `DIR` (named after the directory) -> {name: dir}; names must be unique."""
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            path = spec
            name = Path(spec.rstrip("/")).name
        if not ADAPTER_NAME.match(name):
            raise UserError(
                f"--adapter {spec!r}: name {name!r} must be letters, digits, '.', '_' or '-' (write NAME=DIR)"
            )
        if name in out:
            raise UserError(
                f"--adapter {spec!r}: the name {name!r} is given twice; write NAME=DIR with distinct names"
            )
        out[name] = path
    return out


class Engine:
    """A base model plus named LoRA adapters, generating for mixed batches of jobs.

    All model access goes through `lock`, so adapters can be added and removed between batches.
    """

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tokenizer = loaded.tokenizer
        self.model: Any = loaded.model  # becomes a PeftModel when the first adapter is added
        self.adapters: dict[str, Path] = {}
        self.lock = threading.RLock()
        eos = getattr(loaded.model.generation_config, "eos_token_id", None)
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if self.tokenizer.eos_token_id is not None:
            eos_ids.add(self.tokenizer.eos_token_id)
        self.eos_ids = eos_ids
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.max_positions = int(getattr(loaded.model.config, "max_position_embeddings", 0) or 0) or None

    @classmethod
    def load(cls, model: str, adapters: Mapping[str, str | Path] | None = None) -> Engine:
        """Load the base model spec and each adapter {name: dir} (run dir or PEFT adapter dir)."""
        engine = cls(load_model(model, dtype=torch.float32))
        for name, path in (adapters or {}).items():
            engine.add_adapter(name, path)
        return engine

    @property
    def spec(self) -> str:
        return self.loaded.spec

    # -- adapters ---------------------------------------------------------------------------------

    def add_adapter(self, name: str, path: str | Path) -> Path:
        """Load an adapter under `name`; UserError if the name is taken or it does not fit this base."""
        if not ADAPTER_NAME.match(name) or name == BASE:
            raise UserError(f"adapter name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
        ref = resolve_adapter(path, "serve it with --model")
        with self.lock:
            if name in self.adapters:
                raise UserError(f"an adapter named {name!r} is already loaded")
            self.model = attach_adapter(self.model, ref, self.spec, name)
            if self.model.peft_config[name].peft_type.value != "LORA" or getattr(
                self.model.peft_config[name], "use_dora", False
            ):
                self.model.delete_adapter(name)
                raise UserError(
                    f"adapter {ref.path} is not a plain LoRA adapter (DoRA or another method): "
                    "mixed-adapter batches need LoRA; merge it with `adaptlab merge` and serve the merged model"
                )
            self.model.eval()
            self.adapters[name] = ref.path
        return ref.path

    def remove_adapter(self, name: str) -> None:
        with self.lock:
            if name not in self.adapters:
                raise UserError(f"no adapter named {name!r}; loaded: {', '.join(self.adapters) or 'none'}")
            self.model.delete_adapter(name)
            del self.adapters[name]

    # -- prompts ----------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, prompt: str) -> list[int]:
        return list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        if not self.has_chat_template:
            raise UserError(
                f"{self.spec} has no chat template: send a plain prompt (/v1/completions, --no-chat)"
            )
        text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- decoding ---------------------------------------------------------------------------------

    def generate(self, jobs: Sequence[Job]) -> None:
        """Complete every job in one batch (one forward pass per step for all rows), filling each Job.

        A job naming an adapter that is not loaded finishes with finish_reason 'error' and `error` set.
        """
        if not jobs:
            return
        with self.lock, torch.inference_mode():
            runnable = []
            for job in jobs:  # an adapter may have been unloaded while its job waited: fail that job only
                if job.adapter == BASE or job.adapter in self.adapters:
                    runnable.append(job)
                    continue
                job.finish_reason = "error"
                job.error = f"no adapter named {job.adapter!r}; loaded: {', '.join(self.adapters) or 'none'}"
                if job.on_finish is not None:
                    job.on_finish(job)
            if runnable:
                self._decode(runnable)

    def _forward(
        self, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor, cache: Any, names: list[str]
    ) -> Any:
        kwargs: dict[str, Any] = {"adapter_names": names} if hasattr(self.model, "peft_config") else {}
        return next_token_logits(self.model, ids, mask, pos, cache, **kwargs)  # (B, V)

    def _decode(self, jobs: list[Job]) -> None:
        from transformers import DynamicCache

        rows = [_Row(job, self) for job in jobs]
        # left padding: every row's next token is at the last column
        ids, mask = left_pad([j.prompt_ids for j in jobs], self.pad_id)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # (B, T) positions ignore the padding
        cache = DynamicCache()
        logits = self._forward(ids, mask, pos, cache, [j.adapter for j in jobs])
        live = list(range(len(rows)))  # row index of each batch row still decoding
        last_pos = pos[:, -1]
        while True:
            next_ids = torch.stack([rows[r].choose(logits[b]) for b, r in enumerate(live)])  # (B,)
            keep = [b for b, r in enumerate(live) if not rows[r].push(int(next_ids[b]))]
            if not keep:
                return
            if len(keep) < len(live):  # drop finished rows from the batch and the KV cache
                index = torch.tensor(keep)
                cache.batch_select_indices(index)
                mask, last_pos, next_ids = mask[index], last_pos[index], next_ids[index]
                live = [live[b] for b in keep]
            mask = torch.cat([mask, torch.ones((len(live), 1), dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            logits = self._forward(
                next_ids[:, None], mask, last_pos[:, None], cache, [rows[r].job.adapter for r in live]
            )


class _Row:
    """Per-row decoding state: sampling, detokenized text, stop strings and the job's callbacks."""

    def __init__(self, job: Job, engine: Engine) -> None:
        self.job = job
        self.engine = engine
        self.sent = 0  # characters of job.text already given to on_text
        self.generator: torch.Generator | None = None
        if job.sampling.temperature > 0:
            seed = job.sampling.seed if job.sampling.seed is not None else int(torch.seed() % 2**63)
            self.generator = torch.Generator().manual_seed(seed)
        job.token_ids, job.text, job.finish_reason, job.error = [], "", None, None

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """The next token id from this row's logits (V,)."""
        s = self.job.sampling
        if self.generator is None:
            return logits.argmax()
        probs = top_p_filter(torch.softmax(logits / s.temperature, dim=-1), s.top_p)
        return draw(probs[None], self.generator, [0])[0]  # training's sampler: one uniform a token

    def push(self, token: int) -> bool:
        """Take the chosen token; return True when this row is finished."""
        job, s = self.job, self.job.sampling
        if job.cancelled.is_set():
            return self._finish("cancelled", job.text)
        if token in self.engine.eos_ids and not s.ignore_eos:
            return self._finish("stop", job.text)
        job.token_ids.append(token)
        text = self.engine.tokenizer.decode(job.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(x) for x in s.stop if x) if i >= 0), default=-1)
        if cut >= 0:
            return self._finish("stop", text[:cut])
        if len(job.token_ids) >= s.max_new_tokens:
            return self._finish("length", text)
        job.text = text
        safe = len(text.rstrip("\ufffd"))  # an unfinished UTF-8 sequence waits for its next byte
        for x in s.stop:  # hold back a tail that may be the start of a stop string
            for k in range(min(len(x) - 1, safe), 0, -1):
                if text[:safe].endswith(x[:k]):
                    safe -= k
                    break
        self._emit(text[:safe])
        return False

    def _emit(self, text: str) -> None:
        if len(text) > self.sent and self.job.on_text is not None:
            self.job.on_text(text[self.sent :])
        self.sent = max(self.sent, len(text))

    def _finish(self, reason: str, text: str) -> bool:
        self.job.text = text
        self.job.finish_reason = reason
        if reason != "cancelled":
            self._emit(text)
        if self.job.on_finish is not None:
            self.job.on_finish(self.job)
        return True


class Batcher:
    """Runs jobs on one worker thread, batching those that arrive within `wait_ms` of each other.

    Every job it takes ends with one call of its `on_finish`: done, failed or cancelled."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, wait_ms: float = 5.0) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.wait_s = wait_ms / 1000.0
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.batch_sizes: list[int] = []  # size of every batch run, for tests and stats
        self.thread = threading.Thread(target=self._work, name="adaptlab-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: Sequence[Job]) -> None:
        for job in jobs:
            self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=60)

    def _work(self) -> None:
        while True:
            first = self.queue.get()
            if first is None:
                return
            batch, stop = [first], False
            deadline = time.monotonic() + self.wait_s
            while len(batch) < self.max_batch_size:
                try:
                    job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                batch.append(job)
            waiting, batch = batch, []
            for job in waiting:  # a job whose client went away while it waited ends without running
                if not job.cancelled.is_set():
                    batch.append(job)
                    continue
                job.finish_reason = "cancelled"
                if job.on_finish is not None:
                    job.on_finish(job)
            self.batch_sizes.append(len(batch))
            try:
                self.engine.generate(batch)
            except Exception as err:  # the server must keep serving: fail this batch's jobs only
                for job in batch:
                    if job.finish_reason is None:
                        job.finish_reason, job.error = "error", f"{type(err).__name__}: {err}"
                        if job.on_finish is not None:
                            job.on_finish(job)
            if stop:
                return


def generate_text(
    engine: Engine,
    prompt: str,
    adapter: str = BASE,
    sampling: Sampling | None = None,
    chat: bool | None = None,
    on_text: Callable[[str], None] | None = None,
) -> Job:
    """Complete one prompt with the base or one adapter; chat=None applies the chat template when there is one."""
    use_chat = engine.has_chat_template if chat is None else chat
    ids = engine.encode_chat([{"role": "user", "content": prompt}]) if use_chat else engine.encode(prompt)
    job = Job(ids, adapter=adapter, sampling=sampling or Sampling(), on_text=on_text)
    engine.generate([job])
    if job.finish_reason == "error":
        raise UserError(job.error or "generation failed")
    return job
