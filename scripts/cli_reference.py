"""Write docs/CLI.md, the CLI reference, from the commands themselves: each option's flag, type, default and help
are what click was given, which for every command but inspect, merge and quickstart are the options'
dataclass fields. ``--check``
exits 1 when the file differs from what the code says (a test runs it), so the reference cannot drift.

    python scripts/cli_reference.py            # rewrite docs/CLI.md
    python scripts/cli_reference.py --check    # is it current?
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

import click

REPO = Path(__file__).resolve().parent.parent
DEST = REPO / "docs" / "CLI.md"
sys.path.insert(0, str(REPO))


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _kind(param: click.Parameter) -> str:
    if isinstance(param, click.Option) and param.is_flag:
        return "flag"
    if param.metavar:
        return f"`{param.metavar}`"
    if isinstance(param.type, click.Choice):
        return " \\| ".join(f"`{c}`" for c in param.type.choices)
    return param.type.name.lower()


def _default(param: click.Option) -> str:
    if param.is_flag and not param.secondary_opts:
        return ""
    if param.multiple or param.default is None or param.show_default is False:
        return ""
    default = param.default
    if param.secondary_opts and isinstance(default, bool):
        return f"`{(param.opts if default else param.secondary_opts)[0]}`"
    return f"`{default}`"


def command_section(name: str, command: click.Command) -> list[str]:
    ctx = click.Context(command, info_name=f"moorize {name}")
    usage = " ".join(command.collect_usage_pieces(ctx))
    lines = [f"## `moorize {name} {usage}`", ""]
    doc = inspect.cleandoc(command.help or "")
    paragraphs = [p for p in doc.split("\n\n") if p.strip()]
    for p in paragraphs:
        if p.startswith("\b"):  # an example block: verbatim
            body = p.lstrip("\b").strip("\n")
            lines += ["```", *[line.strip() for line in body.splitlines() if line.strip()
                               and not line.strip().endswith(":")], "```", ""]
        else:
            lines += [" ".join(p.split()), ""]
    lines += ["| option | takes | default | meaning |", "| --- | --- | --- | --- |"]
    for param in command.params:
        if not isinstance(param, click.Option):
            continue
        flags = ", ".join(f"`{o}`" for o in [*param.opts, *param.secondary_opts])
        more = " (repeatable)" if param.multiple and "epeatable" not in (param.help or "") else ""
        more += " (required)" if param.required else ""
        lines.append(f"| {flags} | {_kind(param)} | {_default(param)} | {_cell(param.help or '')}{more} |")
    return lines + [""]


def reference() -> str:
    from moorize.cli import cli

    out = ["# CLI reference", "",
           "Made by `python scripts/cli_reference.py` from the commands themselves (each option of `convert`, "
           "`train`, `export`, `generate`, `run` and `serve` is a field of `ConvertOptions`, `MoOREConfig` + "
           "`TrainOptions`, `ExportOptions`, `GenerateOptions`, `RunOptions` or `ServeOptions`, written once); `tests/test_cli_reference.py` fails "
           "when this file is out of date.",
           "", "Every command prints a one-line `error: …` and exits non-zero on bad input (2; 3 for a full disk; "
           "130 when interrupted); `moorize --debug COMMAND` shows the traceback instead, `-v` / `-vv` raise the "
           "log level.", ""]
    for name in cli.list_commands(None):  # in the order `moorize --help` gives: by stage
        command = cli.commands[name]
        if isinstance(command, click.Group):  # `moorize data check`: each subcommand its own section
            for sub in command.list_commands(None):
                out += command_section(f"{name} {sub}", command.commands[sub])
        else:
            out += command_section(name, command)
    return "\n".join(out).rstrip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/CLI.md is not current")
    args = parser.parse_args()
    text = reference()
    if args.check:
        if not DEST.is_file() or DEST.read_text() != text:
            print(f"{DEST.relative_to(REPO)} is out of date: run python scripts/cli_reference.py", file=sys.stderr)
            return 1
        return 0
    DEST.write_text(text)
    print(f"wrote {DEST.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
