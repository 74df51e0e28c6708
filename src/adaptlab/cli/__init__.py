"""The `adaptlab` command line: thin commands that parse, call one library function and print.

Each command lives in its own module under adaptlab/cli/ and imports heavy libraries inside the
command, so `adaptlab --help` stays fast. UserError, and an OSError from a failed file or system call
(read-only or full disk, a path through a file), become one line on stderr and exit code 2. A full disk
names the file being written (library code names it through adaptlab.errors.writing); an interrupted
`train` also says how to continue from its last checkpoint.

    adaptlab --help
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import warnings

import click

import adaptlab.healed  # noqa: F401  registers the healed bases' builder (a training run) with the model loader
from adaptlab.errors import UserError

# command name -> module under adaptlab.cli that defines a click command called `command`
COMMANDS = {
    "train": "train",
    "eval": "eval",
    "model": "model",
    "analyze": "analyze",
    "plan": "plan",
    "merge": "adapters",
    "combine": "adapters",
    "generate": "serve",
    "serve": "serve",
    "compare": "compare",
    "demo": "compare",
    "decide": "decide",
    "runs": "runs",
    "export": "export",
    "reproduce": "reproduce",
}


# errnos of a write that found the disk full: one line saying what was being written and what to do
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
# what to check after a failed file or system call, by errno
OS_ERROR_HINTS = {
    errno.EROFS: " (a read-only file system: write elsewhere)",
    errno.EACCES: " (check the permissions, or write elsewhere)",
    errno.EPERM: " (check the permissions, or write elsewhere)",
    errno.ENOTDIR: " (a part of the path is a file, not a directory)",
    errno.EEXIST: " (something is already there: a file where a directory belongs, or a taken path)",
    errno.EISDIR: " (it is a directory; give a file path)",
}


class LazyGroup(click.Group):
    """Loads a command's module only when that command runs (or help lists it)."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        return self._load(name)

    @staticmethod
    def _load(name: str) -> click.Command | None:
        module_name = COMMANDS.get(name)
        if module_name is None:
            return None
        module = importlib.import_module(f"adaptlab.cli.{module_name}")
        return getattr(module, f"{name}_command")


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="adaptlab")
def cli() -> None:
    """LoRA or full fine-tuning for my model, my data and my hardware?"""


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; UserError and a failed file or system call (OSError) become one line, exit 2."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*kernels.*")
    try:
        cli.main(args=argv, prog_name="adaptlab", standalone_mode=False)
    except UserError as err:
        click.echo(f"error: {err}", err=True)
        return 2
    except click.exceptions.Abort:
        click.echo(f"aborted{_resume_hint(argv)}", err=True)
        return 130
    except click.ClickException as err:  # usage errors: one line, exit 2, no usage dump
        click.echo(f"error: {err.format_message()}", err=True)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except KeyboardInterrupt:
        click.echo(f"interrupted{_resume_hint(argv)}", err=True)
        return 130
    except OSError as err:
        if err.errno is None:  # not from the operating system: a bug, keep its traceback
            raise
        hint = _resume_hint(argv) if err.errno in DISK_FULL else ""
        click.echo(f"error: {describe_os_error(err)}{hint}", err=True)
        return 2
    return 0


def _resume_hint(argv: list[str] | None) -> str:
    """For an interrupted `adaptlab train --out RUN`: how to continue it from its last checkpoint."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] != "train":
        return ""
    run = next((a.split("=", 1)[1] for a in args if a.startswith("--out=")), None)
    if "--out" in args[:-1]:
        run = args[args.index("--out") + 1]
    if "--resume" in args[:-1]:
        run = args[args.index("--resume") + 1]
    return f"; continue from the last checkpoint with `adaptlab train --resume {run}`" if run else ""


def describe_os_error(err: OSError) -> str:
    """One line for a failed file or system call: the path(s), the system's reason, what to check."""
    reason = err.strerror or os.strerror(err.errno or 0)
    if err.errno in DISK_FULL:
        where = f" while writing {err.filename}" if err.filename is not None else ""
        return f"{reason[:1].lower()}{reason[1:]}{where}: free space or pass another --out"
    paths = " -> ".join(str(p) for p in (err.filename, err.filename2) if p is not None)
    hint = OS_ERROR_HINTS.get(err.errno or 0, "")
    return f"{paths}: {reason}{hint}" if paths else f"{reason}{hint}"


if __name__ == "__main__":
    sys.exit(main())
