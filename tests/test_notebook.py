"""notebooks/inspect_checkpoint.ipynb runs top to bottom against a tiny run and draws its figures."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

from configs import tiny  # pylint: disable=g-import-not-at-top,wrong-import-position
from training import train as train_lib  # pylint: disable=g-import-not-at-top,wrong-import-position

NOTEBOOK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks",
                        "inspect_checkpoint.ipynb")


def test_inspect_checkpoint_notebook_runs(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  config = tiny.get_config()
  config.training.num_steps = 2
  train_lib.train(config, workdir)

  monkeypatch.setenv("WORKDIR", workdir)  # The kernel inherits the environment (and conftest's CPU flags).
  notebook = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                                   resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # Raises CellExecutionError, with the cell and traceback, if a cell fails.

  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  images = [o for o in outputs if "image/png" in o.get("data", {})]
  assert len(images) >= 3  # Samples, schedule, loss.
  text = "".join(o.get("text", "") for o in outputs)
  assert f"{workdir}: step 2" in text and "total" in text
