"""The notebooks: generated from notebooks/build.py without outputs, and the quickstart runs
headlessly (nbclient) with tiny parameters and shows a sample grid."""

import base64
import importlib.util
import io
import os

import nbformat
import pytest
from nbclient import NotebookClient
from PIL import Image

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(REPO, "notebooks")


def _load(name: str) -> nbformat.NotebookNode:
  return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


@pytest.mark.parametrize("name", ["quickstart", "ablation", "multimodal"])
def test_committed_notebooks_are_the_generated_ones_without_outputs(name):
  spec = importlib.util.spec_from_file_location("notebooks_build",
                                                os.path.join(NOTEBOOKS, "build.py"))
  build = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(build)
  committed = _load(name)
  assert committed == build.build(build.NOTEBOOKS[name], name), (
      "notebooks/*.ipynb are stale: run python notebooks/build.py")
  nbformat.validate(committed)
  assert all(not cell.get("outputs") and cell.get("execution_count") is None
             for cell in committed.cells if cell.cell_type == "code")
  parameters = [c for c in committed.cells if "parameters" in c.metadata.get("tags", [])]
  assert len(parameters) == 1 and "steps" in parameters[0].source


def test_quickstart_trains_and_shows_a_sample_grid(fashion_mnist_dir, tmp_path, monkeypatch):
  notebook = _load("quickstart")
  tiny = {
      "data.data_dir": fashion_mnist_dir, "data.source": "debian",
      "data.global_batch_size": 8, "model.hidden_size": 32, "model.depth": 4,
      "model.num_heads": 2, "model.patch_size": 7, "optim.warmup_steps": 0,
      "train.log_every": 1, "train.checkpoint_every": 2, "eval.batch_size": 16,
      "eval.grid_rows": 1, "eval.classifier_steps": 5,
      "eval.cache_dir": str(tmp_path / "eval_cache")}
  injected = nbformat.v4.new_code_cell(
      f"train_steps = 2\neval_samples = 16\nsampling_steps = 2\ngrid_rows = 1\n"
      f"workdir = {str(tmp_path / 'quickstart')!r}\nconfig_overrides = {tiny!r}")
  position = next(i for i, c in enumerate(notebook.cells)
                  if "parameters" in c.metadata.get("tags", []))
  notebook.cells.insert(position + 1, injected)  # as papermill injects parameters
  # A clean kernel: one CPU device, started in notebooks/ as Jupyter would be.
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()

  [grid_cell] = [c for c in notebook.cells if "sample-grid" in c.metadata.get("tags", [])]
  pictures = [Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
              for output in grid_cell.outputs if "image/png" in output.get("data", {})]
  assert len(pictures) == 2  # without and with guidance
  for picture in pictures:  # 1 row x 10 classes of 28-pixel samples with 1-pixel gaps, x3
    assert picture.size == (3 * (10 * 29 - 1), 3 * 28)
  assert os.path.isdir(tmp_path / "quickstart" / "checkpoints" / "2")
