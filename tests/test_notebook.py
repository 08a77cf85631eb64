"""notebooks/explore_run.ipynb runs top to bottom (nbclient) against a tiny run."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"


def test_first_cell_holds_the_run_parameter():
    import nbformat

    nb = nbformat.read(NOTEBOOK, as_version=4)
    first = nb.cells[0]
    # the default is the README's example run, which `bif run bif/examples/digits.yaml` writes
    import yaml

    example_output = yaml.safe_load((NOTEBOOK.parents[1] / "bif" / "examples" / "digits.yaml").read_text())["output"]
    assert example_output == "runs/example/digits"
    readme = (NOTEBOOK.parents[1] / "README.md").read_text()
    assert f"bif show {example_output}" in readme
    assert first.cell_type == "code" and f'RUN = os.environ.get("BIF_RUN", "{example_output}")' in first.source
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code")  # committed without outputs


def test_notebook_runs_on_a_tiny_run(tmp_path, monkeypatch):
    pytest.importorskip("ipykernel")
    import nbformat
    from nbclient import NotebookClient
    from run_fixtures import make_run

    run = make_run(tmp_path / "run", n_train=50, n_query=6, num_draws=20, draws_per_block=10, train_epochs=20)
    monkeypatch.setenv("BIF_RUN", run.uri)  # the kernel inherits the environment
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=240, resources={"metadata": {"path": str(tmp_path)}}).execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs
                     if o.output_type == "stream")
    # the notebook opened the run it was pointed at (not its default): it prints that run's config hash
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert f"run: {run.uri}  config hash: {manifest['config_hash']}" in text
    assert "status: complete" in text
    assert "topk.parquet agrees: True" in text
    assert "mean top-" in text and "overlap of the two rankings over 6 queries" in text
    images = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if "image/png" in o.get("data", {})]
    assert len(images) == 4  # query traces, health, digit images, bif vs bif_corr
