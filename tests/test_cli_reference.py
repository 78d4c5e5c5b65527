"""docs/CLI.md is what the commands say (scripts/cli_reference.py makes it from them), and every option of the
options dataclasses reaches the CLI with its help, default and choices: an option is written once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def test_the_cli_reference_is_current():
    res = subprocess.run([sys.executable, str(REPO / "scripts" / "cli_reference.py"), "--check"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("command, classes", [("convert", ["ConvertOptions"]), ("export", ["ExportOptions"]),
                                              ("train", ["MoOREConfig", "TrainOptions"]), ("run", ["RunOptions"]),
                                              ("generate", ["GenerateOptions"]), ("serve", ["ServeOptions"])])
def test_every_field_is_a_flag_with_its_default_help_and_choices(command, classes):
    import click

    from moorize.cli import cli
    from moorize.cli.generate import GenerateOptions
    from moorize.cli.run import RunOptions
    from moorize.conversion.options import ConvertOptions
    from moorize.exporters.options import ExportOptions
    from moorize.model.config import MoOREConfig
    from moorize.options import field_default, options_of
    from moorize.serving.options import ServeOptions
    from moorize.training.options import TrainOptions

    known = {"ConvertOptions": ConvertOptions, "ExportOptions": ExportOptions, "MoOREConfig": MoOREConfig,
             "TrainOptions": TrainOptions, "RunOptions": RunOptions, "ServeOptions": ServeOptions,
             "GenerateOptions": GenerateOptions}
    params = {p.name: p for p in cli.commands[command].params if isinstance(p, click.Option)}
    for cls in (known[c] for c in classes):
        for f, opt in options_of(cls):
            if not opt.cli:
                assert f.name not in params or cls is MoOREConfig, f.name  # API only (seed: the run's own)
                continue
            param = params[f.name]
            assert param.help == opt.help and param.opts == ["--" + opt.flag_name(f.name)], f.name
            if not param.multiple:
                assert param.default == field_default(f), f.name
            if opt.choices is not None:  # as they were when the CLI was built (routers may register later)
                assert list(param.type.choices) == list(opt.choices)[:len(param.type.choices)], f.name
                assert len(param.type.choices) >= 2, f.name


def test_a_bad_value_names_the_flag_and_the_field():
    from moorize.errors import MoorizeError
    from moorize.training.options import TrainOptions

    with pytest.raises(MoorizeError, match=r"^grad-accum must be at least 1, got 0 \(TrainOptions.grad_accum\)$"):
        TrainOptions(grad_accum=0)
    with pytest.raises(MoorizeError, match=r"unknown router mode 'x'"):
        TrainOptions(router="x")
    opts = TrainOptions(router="task", householder=4)  # the MoORE fields by their names, held in .moore
    assert opts.moore.router == "task" and opts.router == "task" and opts.householder == 4
    assert TrainOptions.build(opts, {"lr": 0.5}).moore == opts.moore
