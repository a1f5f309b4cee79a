"""Writes the Colab notebooks of this folder from the cell sources below.

  python notebooks/build.py

The notebooks are generated, so they are reviewed here as plain Python strings and rebuilt
identically (fixed cell ids, no outputs). Each has a parameters cell (tag "parameters", as
papermill expects) holding its step counts and sizes; tests/test_notebooks.py executes the
notebooks with tiny values put after that cell, and the set-up cell in a Colab-like
environment (tests/test_colab_install.py).
"""

import os
import textwrap

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

# This project's public git URL; empty until it has one (the set-up cell then says what to fill).
REPO_URL = ""

SETUP = '''
# @title Set-up: find or clone the checkout, add what is missing, show the runtime
# Inside a self_flow checkout (local Jupyter) this only finds it. Elsewhere (Colab) it clones
# repo_url, installs the Debian packages of the embedded datasets and adds the missing Python
# packages, never replacing jax, the Jupyter kernel or TensorFlow. Safe to run again.
import os
import subprocess
import sys


def find_checkout(start):
  path = os.path.abspath(start)
  while True:
    if os.path.isfile(os.path.join(path, "self_flow", "train.py")):
      return path
    if os.path.dirname(path) == path:
      return None
    path = os.path.dirname(path)


repo = find_checkout(os.getcwd())
if repo is None:  # not started inside a checkout: use (or make) ./self_flow_repo
  repo = os.path.abspath("self_flow_repo")
  if not os.path.isdir(repo):
    if not repo_url:
      raise ValueError(
          "repo_url is empty: set it in the parameters cell to the git URL of self_flow, e.g. "
          "https://github.com/OWNER/self_flow.git (the package alone installs with "
          "!pip install 'self-flow @ git+https://github.com/OWNER/self_flow.git', but the "
          "notebooks also need the checkout's configs and data folders).")
    subprocess.run(["git", "clone", "--depth=1", repo_url, repo], check=True)
  missing = [p for p in ("dataset-fashion-mnist", "espeak-ng")
             if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode]
  if missing:  # images and video sprites come from Fashion-MNIST files, speech from espeak-ng
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "-qq", "update"], check=True)
    subprocess.run(sudo + ["apt-get", "-qq", "install", "-y", *missing], check=True)
  subprocess.run([sys.executable, os.path.join(repo, "launch", "install_missing.py"),
                  "--extra=notebooks"], check=True)
os.chdir(repo)  # configs name data and cache folders relative to the checkout
if repo not in sys.path:
  sys.path.insert(0, repo)
print("self_flow checkout:", repo)

import jax

from self_flow import accelerators

backend = jax.default_backend()
print(f"Runtime: JAX {jax.__version__} on {backend.upper()}, {jax.device_count()} x "
      f"{jax.devices()[0].device_kind}.")
warning = accelerators.unused_accelerator_warning(backend)
if warning:
  print("WARNING:", warning)
elif backend == "cpu":
  print("CPU runtime: the default parameters are sized for 2 CPU cores. On Colab, "
        "Runtime > Change runtime type attaches a GPU or TPU.")
'''

SETUP_NOTE = '''
## Set-up

Locally (Jupyter started inside a checkout set up with `pip install -e ".[dev]"`) this only finds
the checkout. On Colab set `repo_url` above: the cell clones it, installs the Debian packages of
the embedded datasets and adds the Python packages Colab lacks (`launch/install_missing.py`: the
installed jax, kernel and TensorFlow are kept as they are, so no restart is needed), then says
which runtime is attached.
'''

METHOD_PARAM = ('# The objective: Self-Flow or one of the baselines it is compared with.\n'
                'method = "self_flow"  # @param ["self_flow", "vanilla", "dual_timestep", '
                '"diffusion_forcing", "full_masking"]')
REPO_URL_PARAM = ('# Colab: the git URL of self_flow to clone (see the set-up cell).\n'
                  f'repo_url = "{REPO_URL}"  # @param {{type:"string"}}')


def train_cell(config_module: str, settings: str) -> str:
  """The configure-and-train cell: `settings` sets the parameters on `config`."""
  return f'''
import time

from configs import {config_module}
from self_flow import reporting, train

# Progress without every library's INFO messages: the progress line (every
# config.train.log_every steps), compilations, evaluation results, and all warnings.
reporting.show_only_own_info_logs()

config = {config_module}.get_config(f"local,method={{method}}")
{textwrap.dedent(settings).strip()}
config.lock()  # so that a misspelt key in config_overrides raises
config.update_from_flattened_dict(config_overrides)

start = time.time()
result = train.train_and_evaluate(config, workdir)
print(f"Trained and evaluated in {{time.time() - start:.0f}} s.")
for name, value in sorted((result["eval"] or {{}}).items()):
  print(f"{{name}}: {{value:.4f}}")
'''


QUICKSTART = [
    ("markdown", '''
# self_flow quickstart: class-conditional Self-Flow on Fashion-MNIST

Trains the CPU-sized class-conditional model (`configs/c2i.py:local`: a 6-block, width-128 DiT
on 28x28 Fashion-MNIST) with Self-Flow, then samples it with its EMA weights. With the default
parameters it takes about 15 minutes on a 2-core CPU runtime (Colab's free CPU runtime).
'''),
    ("parameters", f'''
# @title Parameters
# Optimizer steps (the config's full recipe is 1500).
train_steps = 1000  # @param {{type:"integer"}}
{METHOD_PARAM}
# Checkpoints, TensorBoard logs, samples; a rerun resumes.
workdir = "workdirs/quickstart"  # @param {{type:"string"}}
# Generated images for the Frechet distance and the class accuracy.
eval_samples = 500  # @param {{type:"integer"}}
# Euler steps per sample.
sampling_steps = 50  # @param {{type:"integer"}}
# Rows of the sample grids below (one column per class).
grid_rows = 4  # @param {{type:"integer"}}
# Any other config key, e.g. {{"optim.learning_rate": 5e-4}}.
config_overrides = {{}}  # @param {{type:"raw"}}
{REPO_URL_PARAM}
'''),
    ("markdown", SETUP_NOTE),
    ("setup", SETUP),
    ("markdown", '''
## Configure and train

`train.train_and_evaluate(config, workdir)` is the same loop `python -m self_flow.main` runs: it
checkpoints to `workdir`, logs to TensorBoard there, and evaluates the EMA model at the end
(Fréchet distance and class accuracy in the feature space of a small classifier trained once on
Fashion-MNIST and cached). Run again with the same `workdir` and it resumes.
'''),
    ("code", train_cell("c2i", '''
        config.train.num_steps = train_steps
        config.eval.num_samples = eval_samples
        config.sampling.num_steps = sampling_steps
        ''')),
    ("code", '''
import matplotlib.pyplot as plt

steps = sorted(result["losses"])
plt.figure(figsize=(6, 3))
plt.plot(steps, [result["losses"][s] for s in steps])
plt.xlabel("step")
plt.ylabel("training loss")
plt.yscale("log")
plt.show()
'''),
    ("markdown", '''
## Sample with the EMA weights

The EMA weights of the last checkpoint (only they are read, as host arrays), then sampled with
the same sampler the evaluation uses: one column per class, first without guidance (the setting
of the paper's metrics), then with classifier-free guidance.
'''),
    ("code", '''
import io

import jax
import numpy as np
from IPython.display import Image, display
from PIL import Image as PILImage

from self_flow import config_resolution, sharding, train_state
from self_flow.data import fashion_mnist_local
from self_flow.evaluation import generation
from self_flow.modalities import image
from self_flow.tools import sample_npz

resolved = config_resolution.resolve(config)
mesh = sharding.create_mesh(config.mesh)
graphdef = train_state.model_graphdef(config, resolved)
ema_params, step = sample_npz.restore_ema_params(config, workdir)
print(f"EMA weights of step {step}.")


def show(pixels, scale=3):
  """Displays a uint8 (H, W, C) picture, enlarged."""
  picture = PILImage.fromarray(pixels.squeeze(-1) if pixels.shape[-1] == 1 else pixels)
  picture = picture.resize((picture.width * scale, picture.height * scale), PILImage.NEAREST)
  buffer = io.BytesIO()
  picture.save(buffer, "PNG")
  display(Image(data=buffer.getvalue()))


def sample_grid(cfg_scale):
  """grid_rows x num_classes samples, one column per class."""
  sample_config = config.copy_and_resolve_references()
  sample_config.sampling.cfg_scale = cfg_scale
  labels = np.tile(np.arange(config.data.num_classes), grid_rows)
  devices = jax.device_count()  # one sampler batch for the whole grid, split over devices
  sample_config.eval.batch_size = -(-len(labels) // devices) * devices
  generate = generation.Generator(sample_config, graphdef, mesh, resolved.spec("image"))
  samples = generate(ema_params, labels, seed=0)
  return image.make_grid(image.to_uint8(samples), columns=config.data.num_classes)
'''),
    ("grid", '''
print("Columns:", ", ".join(fashion_mnist_local.CLASS_NAMES[:config.data.num_classes]))
print("No guidance (cfg_scale 1):")
show(sample_grid(cfg_scale=1.0))
print("Classifier-free guidance, cfg_scale 2:")
show(sample_grid(cfg_scale=2.0))
'''),
    ("markdown", '''
## What the evaluation wrote

Every evaluation writes a grid to `workdir/samples/` (and TensorBoard: `tensorboard
--logdir workdirs`). The last one:
'''),
    ("code", '''
import glob

grids = sorted(glob.glob(os.path.join(workdir, "samples", "*.png")))
print(os.path.basename(grids[-1]))
display(Image(filename=grids[-1]))
'''),
]

ABLATION = [
    ("markdown", '''
# Self-Flow vs vanilla flow matching vs dual-timestep only

Runs the ablation harness (`self_flow/ablate/`) on the CPU-sized class-conditional config:
each (variant, seed) is its own training run in its own process; then the logged metrics are
read back and summarised in a table (mean ± std over seeds), plots, and sentences that say which
differences are beyond seed noise and which are not. The same from a shell:

```bash
python -m self_flow.ablate --config=configs/c2i.py:local \\
  --variants=vanilla,dual_timestep,self_flow --seeds=2 --steps=200 --output=workdirs/ablation
```

The default parameters (3 variants x 2 seeds x 200 steps) take about 15 minutes on a 2-core CPU
runtime; so short a run shows how the harness works, not the paper's gains (which need far
longer training; see docs/ablations.md). Rerunning the cell skips finished runs.
'''),
    ("parameters", f'''
# @title Parameters
# Methods; the first is the reference.
variants = ["vanilla", "dual_timestep", "self_flow"]  # @param {{type:"raw"}}
# Runs per variant; 2 is the fewest that gives a seed-noise estimate.
seeds = 2  # @param {{type:"integer"}}
# Optimizer steps per run.
train_steps = 200  # @param {{type:"integer"}}
# Steps between evaluations (curves); 0 = only at the end.
eval_every = 0  # @param {{type:"integer"}}
# Runs and results page.
output = "workdirs/ablation_notebook"  # @param {{type:"string"}}
# Settings of every run: evaluation sizes, the linear probe and the stratified loss.
overrides = {{"eval.num_samples": 400, "eval.batch_size": 128, "eval.probe_examples": 1000, "eval.loss_bins": 10}}  # @param {{type:"raw"}}
{REPO_URL_PARAM}
'''),
    ("markdown", SETUP_NOTE),
    ("setup", SETUP),
    ("markdown", '''
## Run every (variant, seed)

Each run's output goes to `train.log` in its workdir (`output/runs/<variant>_seed<seed>`).
'''),
    ("code", '''
import json
import time

from self_flow.ablate import runner, study

settings = runner.run_overrides(train_steps, eval_every,
                                {key: str(value) for key, value in overrides.items()})
runs = runner.plan_runs(variants, seeds, output)
train_run = runner.subprocess_train_fn("configs/c2i.py", "local", settings)


def train_with_progress(run):
  start = time.time()
  print(f"{run.name}: training ...", flush=True)
  train_run(run)
  print(f"{run.name}: finished in {time.time() - start:.0f} s", flush=True)


results = study.run_ablation(
    runs, train_with_progress, output, fingerprint=json.dumps(settings, sort_keys=True),
    description=f"notebooks/ablation.ipynb: {variants}, {seeds} seeds, {train_steps} steps")
for run in results["runs"]:
  print(run["name"], run["status"])
'''),
    ("markdown", '''
## Results

`output/results.md` up to its plots (each variant's paired differences from the first, seed by
seed, with intervals and what they show; the convergence speed; the final values per variant),
then the plots: metrics against the training step (line: mean over seeds, band: min to max), the
linear-probe accuracy per block, and the held-out flow loss per timestep bin.
'''),
    ("code", '''
from IPython.display import Image, Markdown, display

with open(os.path.join(output, "results.md")) as f:
  page = f.read()
display(Markdown(page.split("## Plots")[0]))
for name in results["plots"]:
  print(name)
  display(Image(filename=os.path.join(output, name)))
'''),
]

MULTIMODAL = [
    ("markdown", '''
# One model for images, video and audio

A short joint run of `configs/multimodal.py:local`: one MMDiT with per-modality input and output
projections, trained on captioned Fashion-MNIST images, moving-sprite clips with motion captions
and spoken words (synthesised with espeak-ng), one modality drawn per step. The evaluation then
writes an image grid, video strips and spectrograms with WAV files, shown below. With the
default parameters it takes about 15 minutes on a 2-core CPU runtime.
'''),
    ("parameters", f'''
# @title Parameters
# Optimizer steps over all modalities (the local config's recipe).
train_steps = 300  # @param {{type:"integer"}}
{METHOD_PARAM}
# Checkpoints, logs, samples; a rerun resumes.
workdir = "workdirs/multimodal_notebook"  # @param {{type:"string"}}
# Generated samples per modality for its Frechet distance and accuracy.
eval_samples = 128  # @param {{type:"integer"}}
# Euler steps per sample.
sampling_steps = 25  # @param {{type:"integer"}}
# Steps of each evaluation classifier (trained once, then cached).
classifier_steps = 300  # @param {{type:"integer"}}
# Any other config key, e.g. {{"mixture.probabilities.audio": 0.3}}.
config_overrides = {{}}  # @param {{type:"raw"}}
{REPO_URL_PARAM}
'''),
    ("markdown", SETUP_NOTE),
    ("setup", SETUP),
    ("markdown", '''
## Train jointly

Per-modality training metrics are logged as `train/<modality>/...`, evaluations as
`eval/<modality>/...`. The first run also builds the video and audio datasets (about a minute)
and trains the evaluation classifiers.
'''),
    ("code", train_cell("multimodal", '''
        config.train.num_steps = train_steps
        config.eval.num_samples = eval_samples
        config.sampling.num_steps = sampling_steps
        config.eval.classifier_steps = classifier_steps
        ''')),
    ("markdown", '''
## Samples of the final evaluation

Images (one column per held-out caption), video strips (one clip per row, frames left to right,
its caption printed above) and spectrograms, then one audio player per spoken word.
'''),
    ("code", '''
import glob
import io

from IPython.display import Audio, Image, display
from PIL import Image as PILImage

samples_dir = os.path.join(workdir, "samples")
final = f"step_{config.train.num_steps:08d}"


def show(path, scale=2):
  picture = PILImage.open(path)
  picture = picture.resize((picture.width * scale, picture.height * scale), PILImage.NEAREST)
  buffer = io.BytesIO()
  picture.save(buffer, "PNG")
  display(Image(data=buffer.getvalue()))


for path in sorted(glob.glob(os.path.join(samples_dir, f"{final}_*.png"))):
  print(os.path.basename(path))
  captions = path[:-len(".png")] + ".txt"
  if os.path.exists(captions):
    with open(captions) as f:
      print(f.read())
  show(path)
'''),
    ("code", '''
from self_flow.data import spoken_words

for word in spoken_words.WORDS:
  path = os.path.join(samples_dir, f"{final}_audio_{word}.wav")
  if os.path.exists(path):
    print(word)
    display(Audio(filename=path))
'''),
]


def _cell(kind: str, source: str, index: int, prefix: str):
  """A notebook cell; "parameters", "setup" and "grid" are code cells tagged "parameters",
  "setup" and "sample-grid" (papermill finds the first, the tests all three)."""
  source = textwrap.dedent(source).strip("\n")
  if kind == "markdown":
    cell = nbformat.v4.new_markdown_cell(source)
  else:
    cell = nbformat.v4.new_code_cell(source)
    tags = {"parameters": "parameters", "setup": "setup", "grid": "sample-grid"}
    if kind in tags:
      cell.metadata["tags"] = [tags[kind]]
  cell.id = f"{prefix}-{index:02d}"  # fixed ids: a rebuild changes nothing
  return cell


def build(cells, name: str) -> nbformat.NotebookNode:
  notebook = nbformat.v4.new_notebook()
  notebook.metadata = {
      "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
      "language_info": {"name": "python"},
      "colab": {"provenance": []},
  }
  notebook.cells = [_cell(kind, source, i, name) for i, (kind, source) in enumerate(cells)]
  nbformat.validate(notebook)
  return notebook


NOTEBOOKS = {"quickstart": QUICKSTART, "ablation": ABLATION, "multimodal": MULTIMODAL}


def main() -> None:
  for name, cells in NOTEBOOKS.items():
    path = os.path.join(HERE, f"{name}.ipynb")
    nbformat.write(build(cells, name), path)
    print("wrote", path)


if __name__ == "__main__":
  main()
