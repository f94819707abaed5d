"""Every `$ wsi-amr ...` example in the README and docs/ runs and succeeds: the docs cannot rot."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, SLIDES

pytestmark = pytest.mark.slow  # runs the CLI or trains: not in `make test-fast`

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SAMPLE = "CMU-1-Small-Region.svs"


def examples() -> list[tuple[str, str]]:
    found = []
    for doc in DOCS:
        in_console = False
        for line in doc.read_text().splitlines():
            if line.startswith("```"):
                in_console = line.strip() == "```console"
                continue
            if in_console and line.startswith("$ ") and "wsi-amr" in line:
                found.append((doc.name, line[2:]))
    return found


def test_docs_have_examples():
    assert len(examples()) >= 8


@pytest.mark.parametrize("doc,command", examples(), ids=[f"{d}:{c[:60]}" for d, c in examples()])
def test_doc_example_runs(doc, command, tmp_path):
    sample = REPO / "sample_data" / SAMPLE
    if not sample.exists():
        sample = SLIDES / "aperio" / SAMPLE
    if not sample.exists():
        pytest.skip(f"sample slide missing: run `make demo` or provide ../shared/data ({sample})")
    (tmp_path / "sample_data").mkdir()
    os.symlink(sample, tmp_path / "sample_data" / SAMPLE)
    bindir = Path(sys.executable).parent
    if not (bindir / "wsi-amr").exists():
        pytest.skip("the wsi-amr console script is not installed beside this Python")
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{doc}: `{command}` exited {res.returncode}\n{res.stderr}"
    assert "Traceback" not in res.stderr
