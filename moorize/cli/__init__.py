"""The ``moorize`` command line: one module per command, each thin over the library.

``app`` holds the group and the error-to-exit-code mapping; the commands import the
library inside their bodies, so ``moorize --help`` starts without importing torch.
"""

from .app import BROKEN_PIPE_EXIT, MoorizeGroup, cli, main
from .convert import convert
from .data import data
from .env import env
from .export import export
from .generate import generate
from .inspect import inspect
from .merge import merge
from .quickstart import quickstart
from .run import run
from .serve import serve
from .train import train

for _command in (convert, data, env, export, generate, inspect, merge, quickstart, run, serve, train):
    cli.add_command(_command)

__all__ = ["BROKEN_PIPE_EXIT", "MoorizeGroup", "cli", "main"]
