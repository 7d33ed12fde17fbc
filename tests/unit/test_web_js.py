"""The browser client's JavaScript modules pass shared/vectors under Node
(`node --test tests/js/`); the browser test runs the same checks in Chromium."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_js_modules_pass_the_shared_vectors():
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is needed for the web chat's tests (it comes with npm)")
    proc = subprocess.run([node, "--test", "tests/js/"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# pass 3" in proc.stdout and "# fail 0" in proc.stdout, proc.stdout[-2000:]
