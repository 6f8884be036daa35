"""pyproject.toml asks for the versions the code needs, and an older torch is a one-line error, not a traceback."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _minimum(package: str) -> tuple[int, ...]:
    tomllib = pytest.importorskip("tomllib")
    requirements = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    (spec,) = [r for r in requirements if re.split(r"[<>=!~ \[]", r, maxsplit=1)[0] == package]
    return _version(re.search(r">=\s*([\d.]+)", spec).group(1))


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.match(r"[\d.]*\d", text).group(0).split("."))


def test_the_declared_torch_has_muon():
    from train.optim.muon import MUON_TORCH

    assert _minimum("torch") >= _version(MUON_TORCH)
    assert _version(torch.__version__) >= _version(MUON_TORCH) and hasattr(torch.optim, "Muon")


def test_the_declared_typer_has_the_exception_the_cli_catches():
    """fastcifar_cli imports typer.exceptions.TyperException, which typer ships from 0.27.2."""
    assert _minimum("typer") >= (0, 27, 2)


def test_a_torch_without_muon_is_a_one_line_error(monkeypatch):
    from beton.errors import UserError

    monkeypatch.delattr(torch.optim, "Muon")
    monkeypatch.delitem(sys.modules, "train.optim.muon")  # restored after the test
    with pytest.raises(UserError) as error:
        import train.optim.muon  # noqa: F401
    message = str(error.value)
    assert "\n" not in message and "torch>=" in message and torch.__version__ in message


def test_every_package_is_installed():
    """A clean clone installs with `pip install -e .` from pyproject's package list: a subpackage left out of
    it (train.models, train.optim) would import here, from the source tree, and fail in CI."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"])
    root = PYPROJECT.parent
    found = {".".join(init.parent.relative_to(root).parts) for top in ("beton", "fastloader", "train", "analysis")
             for init in (root / top).rglob("__init__.py")}
    assert found == listed
