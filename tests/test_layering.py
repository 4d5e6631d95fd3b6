"""The floors of the code import only downwards: the command line starts without Gradio or the server, and the
analysis and the model know nothing of either."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts the app, a browser or a fresh process, or runs the default model
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("module, absent", [
    ("explorer.cli", ("gradio", "server")),
    ("explorer.atlas", ("gradio", "server")),
    ("analysis", ("gradio", "server", "explorer")),
    ("model", ("gradio", "server", "explorer", "analysis")),
])
def test_imports_only_point_down(module, absent):
    code = (f"import sys; import {module}; "
            f"print(','.join(name for name in {absent!r} if name in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "", f"{module} imports {done.stdout.strip()}"
