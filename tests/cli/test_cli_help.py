"""`lightning-kd --help` introduces the library, lists every subcommand, and answers without importing torch."""

from __future__ import annotations

import subprocess
import sys

import pytest

from lightning_kd.cli import SUBCOMMANDS, main

HELP_WITHOUT_TORCH = (
    "import sys; from lightning_kd.cli import main; main(['--help']); "
    "print([m for m in ('torch', 'lightning', 'transformers') if m in sys.modules])"
)


def test_help_names_the_library_and_every_subcommand(capsys: pytest.CaptureFixture) -> None:
    main(["--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: lightning-kd")
    assert "knowledge distillation" in out and "experiments/" in out
    for name in ("fit", "validate", "test", "predict", "prepare", "harness"):
        assert f"\n  {name} " in out
    assert set(SUBCOMMANDS) == {"fit", "validate", "test", "predict", "prepare", "harness"}


@pytest.mark.parametrize("args", [[], ["-h"], ["--help"]])
def test_help_imports_nothing_heavy(args: list[str]) -> None:
    code = HELP_WITHOUT_TORCH.replace("['--help']", repr(args))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.rstrip().endswith("[]"), out


def test_version_and_an_unknown_subcommand(capsys: pytest.CaptureFixture) -> None:
    main(["--version"])
    assert capsys.readouterr().out.startswith("lightning-kd ")
    with pytest.raises(SystemExit, match="unknown subcommand 'fitt'.*fit, validate, test, predict, prepare"):
        main(["fitt"])


def test_a_subcommand_reaches_lightning_cli(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as done:
        main(["fit", "--help"])
    assert done.value.code == 0
    assert "--trainer" in capsys.readouterr().out
