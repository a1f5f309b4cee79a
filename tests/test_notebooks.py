"""The notebooks: generated from notebooks/build.py without outputs, and each runs headlessly
(nbclient) with tiny parameters and shows its results inline."""

import base64
import importlib.util
import io
import os

import nbformat
import numpy as np
import pytest
from nbclient import NotebookClient
from PIL import Image

from configs import multimodal
from conftest import TINY_MODEL, tiny_overrides

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


def _execute(name: str, parameters: str, monkeypatch) -> nbformat.NotebookNode:
  """Runs notebook `name` with `parameters` put after its parameters cell, as papermill does, in
  a clean kernel on one CPU device started in notebooks/ as Jupyter would be."""
  notebook = _load(name)
  position = next(i for i, c in enumerate(notebook.cells)
                  if "parameters" in c.metadata.get("tags", []))
  notebook.cells.insert(position + 1, nbformat.v4.new_code_cell(parameters))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(notebook, timeout=600, kernel_name="python3",
                 resources={"metadata": {"path": NOTEBOOKS}}).execute()
  return notebook


def _pictures(cell) -> list[Image.Image]:
  return [Image.open(io.BytesIO(base64.b64decode(output["data"]["image/png"])))
          for output in cell.outputs if "image/png" in output.get("data", {})]


def _text(notebook) -> str:
  return "".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                 for output in cell.outputs)


def _tiny_c2i(data_dir: str, tmp_path) -> dict:
  """config_overrides that shrink configs/c2i.py:local (as conftest.tiny_config does) and its
  evaluation to seconds."""
  return {**TINY_MODEL, "data.data_dir": data_dir, "data.source": "debian", "train.log_every": 1,
          "eval.batch_size": 16, "eval.grid_rows": 1, "eval.classifier_steps": 5,
          "eval.cache_dir": str(tmp_path / "eval_cache")}


def test_quickstart_trains_and_shows_a_sample_grid(fashion_mnist_dir, tmp_path, monkeypatch):
  tiny = {**_tiny_c2i(fashion_mnist_dir, tmp_path), "train.checkpoint_every": 2}
  notebook = _execute("quickstart", (
      f"train_steps = 2\neval_samples = 16\nsampling_steps = 2\ngrid_rows = 1\n"
      f"workdir = {str(tmp_path / 'quickstart')!r}\nconfig_overrides = {tiny!r}"), monkeypatch)
  assert "Runtime: JAX " in _text(notebook) and " on CPU, 1 x cpu." in _text(notebook)
  [grid_cell] = [c for c in notebook.cells if "sample-grid" in c.metadata.get("tags", [])]
  pictures = _pictures(grid_cell)
  assert len(pictures) == 2  # without and with guidance
  for picture in pictures:  # 1 row x 10 classes of 28-pixel samples with 1-pixel gaps, x3
    assert picture.size == (3 * (10 * 29 - 1), 3 * 28)
  assert os.path.isdir(tmp_path / "quickstart" / "checkpoints" / "2")


def test_ablation_runs_every_variant_and_shows_the_table_and_plots(fashion_mnist_dir, tmp_path,
                                                                    monkeypatch):
  tiny = {**_tiny_c2i(fashion_mnist_dir, tmp_path), "eval.num_samples": 16,
          "eval.probe_examples": 16, "eval.loss_bins": 2,
          "sampling.num_steps": 2}
  output = tmp_path / "ablation"
  notebook = _execute("ablation", (
      f"variants = ['vanilla', 'self_flow']\nseeds = 1\ntrain_steps = 2\n"
      f"output = {str(output)!r}\noverrides = {tiny!r}"), monkeypatch)
  text = _text(notebook)
  assert "vanilla_seed0 finished" in text and "self_flow_seed0 finished" in text
  markdown = [output_["data"]["text/markdown"] for cell in notebook.cells
              if cell.cell_type == "code" for output_ in cell.outputs
              if "text/markdown" in output_.get("data", {})]
  assert len(markdown) == 1 and "| metric | vanilla (n=1) | self_flow (n=1) |" in markdown[0]
  plots = [picture for cell in notebook.cells if cell.cell_type == "code"
           for picture in _pictures(cell)]
  assert plots and all(p.width > 100 and p.height > 100 for p in plots)
  assert (output / "results.md").is_file()


def test_multimodal_trains_jointly_and_shows_every_modality(fashion_mnist_dir, video_data_dir,
                                                            audio_data_dir, tmp_path,
                                                            monkeypatch):
  tiny = {
      **tiny_overrides(multimodal.get_config("local")),
      "text.max_length": 8,  # as test_multimodal.tiny_multimodal_config
      "data.data_dir": fashion_mnist_dir, "data.source": "debian",
      "video.data_dir": video_data_dir, "audio.data_dir": audio_data_dir, "train.log_every": 1,
      "eval.batch_size": 8, "eval.grid_rows": 1, "eval.classifier_batch_size": 8,
      "eval.cache_dir": str(tmp_path / "eval_cache")}
  notebook = _execute("multimodal", (
      f"train_steps = 3\neval_samples = 8\nsampling_steps = 2\nclassifier_steps = 5\n"
      f"workdir = {str(tmp_path / 'multimodal')!r}\nconfig_overrides = {tiny!r}"), monkeypatch)
  text = _text(notebook)
  for name in ("image", "video", "audio"):  # every modality evaluated, with finite metrics
    [fd] = [line for line in text.splitlines() if line.startswith(f"eval/{name}/fd:")]
    assert np.isfinite(float(fd.split(":")[1]))
  samples = {p.name for p in (tmp_path / "multimodal" / "samples").iterdir()}
  assert {"step_00000003_video_strips.png", "step_00000003_audio_spectrograms.png",
          "step_00000003_audio_seven.wav"} <= samples
  assert any(s.startswith(("step_00000003_classes", "step_00000003_prompts")) for s in samples)
  pictures = [picture for cell in notebook.cells if cell.cell_type == "code"
              for picture in _pictures(cell)]
  assert len(pictures) >= 3  # the image grid, the video strips, the spectrograms
  audio = [output for cell in notebook.cells if cell.cell_type == "code"
           for output in cell.outputs if "text/html" in output.get("data", {})
           and "<audio" in output["data"]["text/html"]]
  assert audio
