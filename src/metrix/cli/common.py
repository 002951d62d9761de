"""The command line's shared parts: the app, its one error boundary, and options several commands share."""

from __future__ import annotations

import functools
import json
import os
import sqlite3
import sys

import typer

# The one error boundary of the command line: the library's own exceptions become one line on stderr and exit
# code 2 (130 for Ctrl-C); anything else is a bug and keeps its traceback. --debug shows it for all of them.
USER_ERRORS = (ValueError, TypeError, KeyError, FileNotFoundError, ImportError, FloatingPointError, OSError,
               sqlite3.Error)
_DEBUG = {"on": False}


def _one_line(exc: BaseException) -> str:
    text = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    return " ".join(str(text).split()) or type(exc).__name__


def _error_boundary(command):
    @functools.wraps(command)
    def run(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except BrokenPipeError:  # the reader went away (`metrix list losses | head`): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(code=0) from None
        except (*USER_ERRORS, KeyboardInterrupt) as exc:
            if _DEBUG["on"]:
                raise
            if os.environ.get("RANK", "0") != "0" and "LOCAL_WORLD_SIZE" in os.environ:
                # a torchrun worker: rank 0 says it, once for all ranks
                raise typer.Exit(code=130 if isinstance(exc, KeyboardInterrupt) else 2) from None
            typer.secho(f"error: {_one_line(exc) if str(exc) else 'interrupted'}", fg=typer.colors.RED, err=True)
            raise typer.Exit(code=130 if isinstance(exc, KeyboardInterrupt) else 2) from None
    return run


class _Commands(typer.Typer):
    """A Typer whose every command runs inside :func:`_error_boundary`."""

    def command(self, *args, **kwargs):
        register = super().command(*args, **kwargs)
        return lambda f: register(_error_boundary(f))


def command_group(**kwargs) -> typer.Typer:
    """A command group whose commands run inside the error boundary."""
    return _Commands(no_args_is_help=True, **kwargs)


app = command_group(
    add_completion=False,
    help="metrix: learn a distance from labelled data, then evaluate, embed and search with it. An error prints one "
    "line and exits with code 2 (130 when interrupted); --debug shows its traceback.",
)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show the full traceback of an error instead of one line.")) -> None:
    _DEBUG["on"] = debug


def registry_names(kind: str) -> list[str]:
    from metrix.registry import REGISTRIES

    return sorted(REGISTRIES[kind]())


def echo_rows(rows: list, as_json: bool, line) -> None:
    """Print ``rows`` as JSON, or one ``line(row)`` each."""
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        typer.echo(line(row))


def resume_option(command: str):
    """``--resume RUN`` of a training command."""
    return typer.Option(None, metavar="RUN", help=f"Continue an interrupted '{command}' run from its last checkpoint, "
                        "with the settings it was started with; it ends with the weights an uninterrupted run has.")


def checkpoint_option(default: int, unit: str):
    return typer.Option(default, min=1, help=f"Write a resumable checkpoint every N {unit} into <run>/checkpoints/; "
                                             "Ctrl-C then says how to resume.")


def refuse_flags_with_resume(ctx: typer.Context, keep: tuple[str, ...] = ("resume", "device")) -> None:
    """A resumed run keeps the settings it was started with: flags given beside ``--resume`` are refused
    instead of silently ignored."""
    if ctx.params.get("resume") is None:
        return
    given = sorted(f"--{name.replace('_', '-')}" for name in ctx.params
                   if name not in keep and getattr(ctx.get_parameter_source(name), "name", "") == "COMMANDLINE")
    if given:
        raise ValueError(f"--resume continues a run with its own settings; drop {', '.join(given)}")


def nproc_option(unit: str):
    """``--nproc N`` of a training command that can run on several processes."""
    return typer.Option(None, "--nproc", help=(
        f"Train on N processes of this machine (torch.distributed through torchrun's launcher: gloo on CPU, nccl "
        f"on GPU). Each process takes its share of every {unit}; the losses compare the whole global batch, and "
        "each step equals one process's on it. A resume needs the same N. Several machines: see the README "
        "(torchrun -m metrix ...)."))


def run_on_processes(nproc: int | None, device: str, work) -> None:
    """Run ``work()`` here; with ``--nproc N`` (N > 1) relaunch this command on N processes with torchrun's
    launcher (each process then joins the process group and runs ``work()``; rank 0 reports)."""
    from metrix import distributed

    if nproc not in (None, 1) and not distributed.launched_by_torchrun():
        code = distributed.launch(nproc, _without_nproc(sys.argv[1:]))  # the settings were checked here, once
        if code:
            raise typer.Exit(code=code)
        return
    if not distributed.launched_by_torchrun():
        work()
        return
    distributed.init_from_env(device)
    try:
        work()
    except BaseException:
        distributed.shutdown(barrier=False)
        raise
    distributed.shutdown()


def rank_echo(message: str = "") -> None:
    """``typer.echo`` on rank 0 only (every rank says the same)."""
    from metrix import distributed

    if distributed.get_rank() == 0:
        typer.echo(message)


def _without_nproc(argv: list[str]) -> list[str]:
    """The command line given to each process: this one without ``--nproc N``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out


ALLOW_OTHER_RUN = typer.Option(False, "--allow-other-run", help="Use it with a run other than the one that built it (refused by default: embeddings of different runs are not comparable).")
DEVICE = typer.Option("cpu", help="Where the model runs: cpu, cuda, cuda:N or mps.")


def open_run(path, device: str):
    """The run at ``path`` opened once on ``device`` (jobs take it instead of a path)."""
    from metrix.runs import Run

    return Run.open(path, device=device)
