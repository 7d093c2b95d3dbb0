"""Every CLI command is documented in the README and has an example in its help."""

import argparse
from pathlib import Path

import pytest

from llmd.app.cli import build_parser

README = (Path(__file__).parent.parent / "README.md").read_text()


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(commands()))
def test_command_is_in_readme_with_an_example(name):
    assert f"llmd {name}" in README
    assert "Example:" in commands()[name].description
