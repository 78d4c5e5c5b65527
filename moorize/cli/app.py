"""The ``moorize`` command line: thin click commands over the library.

Each command parses options, calls one library function, prints a summary, and maps
errors to exit codes: ``MoorizeError`` prints one line (exit 2, 3 for a full disk),
an interrupt exits 130, anything else is a bug and prints one line too unless
``--debug`` asks for the traceback.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from ..errors import MoorizeError
from ..process import return_freed_memory
from ..version import __version__

log = logging.getLogger("moorize")


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for any tool whose reader closed the pipe


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not complain a second time."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


# optional packages, by module, and the extra of pyproject.toml that installs each
OPTIONAL_EXTRAS = {"uvicorn": "serve", "starlette": "serve", "matplotlib": "plot", "onnxruntime_genai": "genai",
                   "peft": "examples"}


# `moorize --help` lists the commands by the stage of the pipeline they serve, in this order
COMMAND_STAGES = (
    ("Getting started", ("quickstart", "env")),
    ("Converting", ("convert", "inspect")),
    ("Training and trying", ("data", "train", "generate", "merge")),
    ("Deploying", ("export", "run", "serve")),
)


class MoorizeGroup(click.Group):
    """Turns exceptions into one-line messages and exit codes; lists the commands by stage."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        staged = [name for _, names in COMMAND_STAGES for name in names if name in self.commands]
        return staged + sorted(set(self.commands) - set(staged))

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        listed: set[str] = set()
        for title, names in (*COMMAND_STAGES, ("Other commands", tuple(sorted(self.commands)))):
            rows = [(n, self.commands[n].get_short_help_str(limit=200)) for n in names
                    if n in self.commands and n not in listed and not self.commands[n].hidden]
            listed.update(n for n, _ in rows)
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug")) or os.environ.get("MOORIZE_DEBUG") == "1"
        try:
            return super().invoke(ctx)
        except click.UsageError as e:  # a bad option or argument: one line, like every other user error
            if debug:
                raise
            cmd = f" {e.ctx.command_path}" if e.ctx is not None and e.ctx.command_path else ""
            hint = f" (see{cmd} --help)" if cmd else ""
            click.echo(f"error: {e.format_message()}{hint}", err=True)
            ctx.exit(2)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise
        except MoorizeError as e:
            if debug:
                raise
            click.echo(f"error: {e}", err=True)
            ctx.exit(e.exit_code)
        except KeyboardInterrupt:
            if debug:
                raise
            click.echo("interrupted; nothing was published (partial output removed)", err=True)
            ctx.exit(130)
        except BrokenPipeError:  # the reader went away (`moorize inspect ... | head`): not an error of ours
            _silence_stdout()
            ctx.exit(BROKEN_PIPE_EXIT)
        except Exception as e:  # a bug: keep it short unless asked
            if debug:
                raise
            missing = (e.name or "").split(".")[0] if isinstance(e, ModuleNotFoundError) else ""
            if missing in OPTIONAL_EXTRAS:  # an optional package: name the extra that installs it
                click.echo(f"error: moorize {ctx.invoked_subcommand or ''} needs {missing}, which is not installed: "
                           f"pip install 'moorize[{OPTIONAL_EXTRAS[missing]}]'", err=True)
                ctx.exit(2)
            first = str(e).splitlines()[0] if str(e) else ""
            click.echo(f"error: internal error {type(e).__name__}: {first} (a bug in moorize: please report it "
                       "with the traceback that --debug shows)", err=True)
            ctx.exit(1)


@click.group(cls=MoorizeGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="moorize")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.pass_context
def cli(ctx: click.Context, debug: bool, verbose: int) -> None:
    """Turn a pretrained Hugging Face checkpoint into a Mixture of Orthogonal Rank-one Experts (MoORE).

    The pipeline: convert a checkpoint into its factors, train task routers on them,
    try the adapter, then merge it into a dense checkpoint or export and serve it.
    `moorize COMMAND --help` gives each command's options and examples.
    """
    level = logging.WARNING - 10 * min(verbose, 2)
    if ctx.invoked_subcommand != "train":  # train decides for itself (moorize/process.py says why)
        return_freed_memory()  # this process is ours: let peak memory follow the live tensors
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)


def main() -> None:
    try:
        cli(prog_name="moorize")
    except SystemExit as e:
        _leave_process_group(e.code)
        raise


def _leave_process_group(code) -> None:
    """Under torchrun, a command that ends with its process group still up (``train``: accelerate's) destroys it
    and leaves without interpreter finalization. transformers and accelerate keep references to the group, so
    its gloo threads outlive destroy_process_group; torn down during finalization they now and then aborted a
    rank (SIGABRT) after its work was done. Every output is written and flushed by then."""
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return
    try:
        dist.destroy_process_group()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code if isinstance(code, int) else (0 if code is None else 1))


