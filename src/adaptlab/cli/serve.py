"""`adaptlab generate` (stream one completion to the terminal) and `adaptlab serve` (OpenAI-compatible HTTP)."""

from __future__ import annotations

import importlib
import sys

import click

from adaptlab.errors import UserError


def _read_prompt(prompt: str) -> str:
    """--prompt's text ('-': standard input), refused in one line unless it is valid UTF-8."""
    if prompt == "-":
        raw = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise UserError(
                f"--prompt -: standard input is not UTF-8 text (byte {raw[err.start]:#04x} at offset "
                f"{err.start}); pipe a text file"
            ) from None
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as err:  # bytes the terminal could not decode arrive as lone surrogates
        raise UserError(f"--prompt: not UTF-8 text (at character {err.start}); pass text") from None
    return prompt


# what `adaptlab serve` imports beyond the core install: the extra `adaptlab[serve]`
SERVE_EXTRA = ("fastapi", "uvicorn")


def _require_serve_extra() -> None:
    """Refuse in one line, naming the extra, when the HTTP server's packages are not installed."""
    missing: list[str] = []
    for name in SERVE_EXTRA:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise UserError(
            f"adaptlab serve needs {' and '.join(missing)}, not installed: run `pip install 'adaptlab[serve]'`"
        )


@click.command("generate")
@click.option("--model", required=True, help="Base model (embedded name, local dir, hub id).")
@click.option("--adapter", "adapters", multiple=True, help="NAME=DIR (run dir or PEFT adapter dir); repeat.")
@click.option(
    "--use",
    "use",
    multiple=True,
    help="Adapter NAME to generate with, or 'base'; repeat to compare. "
    "Default: each adapter given, else the base.",
)
@click.option("--prompt", required=True, help="The prompt ('-' reads standard input).")
@click.option("--max-new-tokens", default=128, show_default=True, type=click.IntRange(1, 8192))
@click.option(
    "--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0, 2.0), help="0 = greedy."
)
@click.option("--top-p", default=1.0, show_default=True, type=click.FloatRange(0.0, 1.0, min_open=True))
@click.option("--seed", default=None, type=int, help="Seed for sampling (temperature > 0).")
@click.option(
    "--chat/--no-chat", default=None, help="Apply the chat template (default: when the model has one)."
)
def generate_command(
    model: str,
    adapters: tuple[str, ...],
    use: tuple[str, ...],
    prompt: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int | None,
    chat: bool | None,
) -> None:
    """Generate with the base model or any adapter, streaming to the terminal."""
    from adaptlab.serve import BASE, Engine, Sampling, generate_text, parse_adapter_specs

    specs = parse_adapter_specs(adapters)
    if "base" in specs:
        raise UserError(
            f"--adapter {specs['base']}: the name 'base' is the base model's; write NAME=DIR with another NAME"
        )
    for name in use:
        if name != "base" and name not in specs:
            raise UserError(
                f"--use {name}: not loaded; choose from: base, {', '.join(specs) or '(no --adapter given)'}"
            )
    prompt = _read_prompt(prompt)
    engine = Engine.load(model, specs)
    targets = list(use) or list(specs) or ["base"]
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
    for name in targets:
        if len(targets) > 1:
            click.secho(f"--- {name}", bold=True)
        job = generate_text(
            engine,
            prompt,
            adapter=BASE if name == "base" else name,
            sampling=sampling,
            chat=chat,
            on_text=lambda text: click.echo(text, nl=False),
        )
        click.echo()
        if job.finish_reason == "length":
            click.secho(f"[stopped at --max-new-tokens {max_new_tokens}]", dim=True, err=True)


@click.command("serve")
@click.option("--model", required=True, help="Base model; requests name it by this value.")
@click.option("--adapter", "adapters", multiple=True, help="NAME=DIR to serve under NAME; repeat.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (loopback by default).")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option(
    "--adapter-dir", default=None, type=click.Path(), help="Directory POST /v1/adapters may load from."
)
@click.option("--max-batch-size", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("--batch-wait-ms", default=5.0, show_default=True, type=click.FloatRange(0.0, 1000.0))
@click.option(
    "--max-tokens-limit", default=1024, show_default=True, type=click.IntRange(1), help="Largest max_tokens."
)
@click.option("--max-prompt-tokens", default=2048, show_default=True, type=click.IntRange(1))
def serve_command(
    model: str,
    adapters: tuple[str, ...],
    host: str,
    port: int,
    adapter_dir: str | None,
    max_batch_size: int,
    batch_wait_ms: float,
    max_tokens_limit: int,
    max_prompt_tokens: int,
) -> None:
    """Serve the base and its adapters over an OpenAI-compatible HTTP API, batching across adapters."""
    _require_serve_extra()  # before the model loads: a missing extra is one line at once
    from pathlib import Path

    from adaptlab.serve import Engine, parse_adapter_specs
    from adaptlab.serve.server import ServerLimits, bind_socket, is_loopback, serve

    specs = parse_adapter_specs(adapters)
    if model in specs:
        raise UserError(f"--adapter {model}: that name is the base model's; choose another NAME")
    if adapter_dir is not None and not Path(adapter_dir).expanduser().is_dir():
        raise UserError(f"--adapter-dir {adapter_dir}: no such directory")
    sock = bind_socket(host, port)  # before loading: a taken port fails in a second, in one line
    port = sock.getsockname()[1]
    try:
        engine = Engine.load(model, specs)
    except BaseException:
        sock.close()
        raise
    if not is_loopback(host):
        click.secho(
            f"warning: binding {host}: the server has no authentication; anyone who can reach it can use it",
            fg="yellow",
            err=True,
        )
    click.echo(
        f"serving {model} (base) and adapters: {', '.join(specs) or 'none'} at http://{host}:{port}/v1"
    )
    limits = ServerLimits(max_prompt_tokens=max_prompt_tokens, max_new_tokens=max_tokens_limit)
    serve(
        engine,
        host,
        port,
        served_name=model,
        adapter_dir=adapter_dir,
        limits=limits,
        max_batch_size=max_batch_size,
        batch_wait_ms=batch_wait_ms,
        sock=sock,
    )
