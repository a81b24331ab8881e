"""The package's stages import only downwards (import-linter contract in pyproject.toml), and the
documentation site builds with every warning an error."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import REPO


def _tool(name: str) -> str:
    path = Path(sys.executable).parent / name
    assert path.exists(), f"{name} is part of the test install (pip install -e '.[test]')"
    return str(path)


def test_import_layers_contract():
    r = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0 and "1 kept, 0 broken" in r.stdout, r.stdout[-3000:] + r.stderr[-2000:]


def test_docs_build_strict(tmp_path):
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    r = subprocess.run([_tool("mkdocs"), "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO,
                       capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = (tmp_path / "site" / "reference" / "index.html").read_text()
    for name in ("maxdnn.api.evaluate", "maxdnn.api.approximate", "MaxdnnError"):
        assert name in ref, name  # the API reference is generated from the docstrings
    tutorial = re.sub(r"<[^>]+>", "", (tmp_path / "site" / "tutorial" / "index.html").read_text())
    assert "import maxdnn" in tutorial and "maxdnn.approximate(graph, layer)" in tutorial  # the script, included
