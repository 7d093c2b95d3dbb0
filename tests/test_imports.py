"""Every module of llmd imports on its own, whichever is imported first: a circular import shows
only when a script or a tool imports the module that starts the cycle."""

import importlib
import pkgutil
import subprocess
import sys

# One interpreter for all: torch, gradio and the rest load once; llmd's own modules are
# forgotten before each import, so each one runs as the first import of a fresh process would.
IMPORT_EACH_FIRST = """
import importlib, sys
failed = []
for name in sys.argv[1:]:
    for loaded in [m for m in sys.modules if m == "llmd" or m.startswith("llmd.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as e:
        failed.append(f"{name}: {type(e).__name__}: {e}")
print("\\n".join(failed))
"""


def llmd_modules() -> list[str]:
    names = []
    for sub in ("engine", "app", "ui"):
        package = f"llmd.{sub}"
        path = importlib.import_module(package).__path__
        names += [f"{package}.{m.name}" for m in pkgutil.iter_modules(path) if m.name != "__main__"]
    return names


def test_every_module_imports_first():
    names = llmd_modules()
    assert "llmd.app.evaluate" in names and "llmd.engine.model" in names  # the walk found the packages
    run = subprocess.run([sys.executable, "-c", IMPORT_EACH_FIRST, *names], capture_output=True, text=True,
                         timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "", run.stdout
