"""Every CLI command is documented in the README and has an example in its help."""

import argparse
from pathlib import Path

import pytest

from conftest import llmd_here
from llmd.app.cli import build_parser
from llmd.ui.commands import add_up_commands

README = (Path(__file__).parent.parent / "README.md").read_text()


def commands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser([add_up_commands])._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


@pytest.mark.parametrize("name", sorted(commands()))
def test_command_is_in_readme_with_an_example(name):
    assert f"llmd {name}" in README
    assert "Example:" in commands()[name].description


def test_plan_command_prints_a_table_and_json(tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "llmd", "plan", "--model", "llama-3.1-70b", "--weights", "int4",
            *[a for _ in range(4) for a in ("--device", "ws1:rtx4090")]]
    table = subprocess.run(base, capture_output=True, text=True, timeout=120)
    assert table.returncode == 0 and "tokens/s" in table.stdout and "rtx4090" in table.stdout
    out = llmd_here(*base[3:], "--json").json  # the same command's code, in this process
    assert out["fits"] and {"tokens_per_s", "ttft_s", "bytes_per_token"} <= out["predicted"].keys()
    assert len(out["ranks"]) == 4 and len(out["memory_per_device"]) == 4 and out["stages"]
    bad = llmd_here("plan", "--model", "nope", "--device", "a:cpu")
    assert bad.returncode == 1 and "llama-3.1-8b" in bad.stderr and "Traceback" not in bad.stderr


def test_app_never_imports_ui():
    """DESIGN.md's layering: ui -> app -> engine. The web UI's commands join them in __main__.py."""
    root = Path(__file__).parent.parent
    for folder, forbidden in (("engine", ("llmd.app", "llmd.ui", "from ..app", "from ..ui")),
                              ("app", ("llmd.ui", "from ..ui"))):
        for path in (root / folder).glob("*.py"):
            text = path.read_text()
            assert not any(f in text for f in forbidden), f"{path.name} imports a layer above {folder}/"
