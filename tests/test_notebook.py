"""examples/cross_entropy_by_hand.ipynb runs top to bottom (every cell asserts its hand
computation against PyTorch) in a kernel of this interpreter, and shows its table and plots."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "cross_entropy_by_hand.ipynb"


def test_the_tutorial_notebook_runs(tmp_path, monkeypatch):
    # A kernelspec of this interpreter, so that the kernel imports the xentkit under test
    # whatever "python" is on the PATH.
    spec = tmp_path / "kernels" / "xentkit-test"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "xentkit test", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        kernel_name="xentkit-test",
        timeout=120,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    client.execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    html = [o for o in outputs if "text/html" in o.get("data", {})]
    assert any("xentkit-explain" in o["data"]["text/html"] for o in html)
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 2
    printed = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "probabilities-as-logits" in printed and "uniform ln C" in printed
