"""The ablation harness: runs per (variant, seed), resuming, reading metrics back, the results
page and plots, and the within-noise rule."""

import json
import os
import subprocess
import sys

import pytest

from self_flow.ablate import metric_tags, report, runner, statistics, study
from conftest import tiny_config

VARIANTS = ("vanilla", "self_flow")


def _tiny_run_config(make_config, data_dir, tmp_path):
  def make(variant: str, seed: int):
    config = make_config(variant)
    config.seed = config.data.shuffle_seed = seed
    config.data.data_dir = data_dir
    config.data.source = "debian"
    config.train.num_steps = 3
    config.train.log_every = 1
    config.train.eval_every = 0  # one evaluation, at the end
    config.train.checkpoint_every = 3
    config.eval.num_samples = 24
    config.eval.batch_size = 24  # divisible by the 8-device batch axes
    config.eval.grid_rows = 1
    config.eval.classifier_steps = 30
    config.eval.cache_dir = str(tmp_path / "eval_cache")  # shared: trained once
    config.eval.probe_steps = 20
    config.eval.probe_examples = 48
    config.eval.loss_bins = 4
    config.sampling.num_steps = 2
    return config

  return make


@pytest.fixture(scope="module")
def ablation(fashion_mnist_dir, tmp_path_factory):
  """2 variants x 2 seeds x 3 steps of the tiny config, trained in this process."""
  tmp_path = tmp_path_factory.mktemp("ablation")
  output = str(tmp_path / "out")
  runs = runner.plan_runs(VARIANTS, 2, output)
  make = _tiny_run_config(tiny_config, fashion_mnist_dir, tmp_path)
  results = study.run_ablation(runs, runner.in_process_train_fn(make), output,
                               fingerprint="tiny", description="tiny test ablation")
  return runs, output, results


def test_results_page_has_every_metric_per_variant(ablation):
  runs, output, results = ablation
  assert [r["status"] for r in results["runs"]] == ["finished"] * 4
  with open(os.path.join(output, "results.md")) as f:
    page = f.read()
  assert "| metric | vanilla (n=2) | self_flow (n=2) |" in page
  rows = {line.split(" | ")[0].lstrip("| ").rstrip(" ↓↑"): line for line in page.splitlines()
          if line.startswith("| eval/") or line.startswith("| train/")}
  evaluated = (["fd", "class_accuracy", "loss"]
               + [f"loss_t{a}-{b}" for a, b in
                  (("0.00", "0.25"), ("0.25", "0.50"), ("0.50", "0.75"), ("0.75", "1.00"))]
               + [f"probe_layer{k}" for k in (1, 2, 3, 4)])
  expected = ([f"eval/image/{name}" for name in evaluated]  # the EMA's, then the student's
              + [f"eval/image/student/{name}" for name in evaluated]
              + ["train/teacher_cosine", "train/teacher_cosine_trivial", "train/loss_gen"])
  assert list(rows) == expected  # in the table's order
  for name, row in rows.items():
    vanilla, self_flow = row.strip(" |").split(" | ")[1:]
    assert " ± " in self_flow, row  # mean ± std over 2 seeds
    if name.startswith("train/teacher_cosine"):
      assert vanilla == "—"  # vanilla has no teacher
    else:
      assert " ± " in vanilla, row
  assert "eval/image/classifier_heldout_accuracy" not in rows  # the same for every run
  assert "## Differences from vanilla" in page and "**self_flow vs vanilla**" in page


def test_results_json_and_plots(ablation):
  runs, output, results = ablation
  with open(os.path.join(output, "results.json")) as f:
    saved = json.load(f)
  assert saved["variants"] == list(VARIANTS) and saved["reference"] == "vanilla"
  fd = saved["summary"]["self_flow"]["eval/image/fd"]
  assert fd["n"] == 2 and fd["min"] <= fd["mean"] <= fd["max"] and len(fd["values"]) == 2
  finals = {r["name"]: r["final"] for r in saved["runs"]}
  assert set(finals) == {r.name for r in runs}
  for accuracy in (v for f in finals.values() for k, v in f.items() if "probe_layer" in k):
    assert 0.0 <= accuracy <= 1.0
  # Each curve point holds one value per seed: the band's range.
  curve = saved["curves"]["train/loss_gen"]["self_flow"]
  assert curve["steps"] == [1, 2, 3] and all(len(v) == 2 for v in curve["values"])
  assert saved["curves"]["eval/image/fd"]["vanilla"]["steps"] == [3]
  for name in ("curve_eval_image_fd.png", "curve_eval_image_class_accuracy.png",
               "curve_eval_image_loss.png", "curve_train_loss_gen.png",
               "probe_image_by_layer.png", "loss_image_by_t.png"):
    path = os.path.join(output, name)
    assert name in saved["plots"]
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_a_repeated_invocation_skips_finished_runs(ablation):
  runs, output, _ = ablation

  def must_not_train(run):
    raise AssertionError(f"{run.name} finished already")

  results = study.run_ablation(runs, must_not_train, output, fingerprint="tiny")
  assert [r["status"] for r in results["runs"]] == ["finished earlier"] * 4
  assert results["summary"]["vanilla"]["eval/image/fd"]["n"] == 2  # still read back
  # Other settings (a different fingerprint, e.g. more steps) train again.
  statuses = runner.execute(runs[:1], lambda run: None, fingerprint="more steps")
  assert statuses == {runs[0].name: "finished"}


def test_an_earlier_page_supplies_the_runs_it_finished(ablation, tmp_path):
  """Adding seeds to a study whose workdirs are gone: the earlier results.json stands in for
  the runs it finished, and only the others are trained."""
  runs, output, original = ablation
  page = os.path.join(output, "results.json")
  more = runner.plan_runs(VARIANTS, 3, str(tmp_path / "more"))
  trained = []
  results = study.run_ablation(more, lambda run: trained.append(run.name),
                               str(tmp_path / "more"), fingerprint="tiny", import_results=page)
  assert trained == ["vanilla_seed2", "self_flow_seed2"]  # nothing logged: not in the summary
  assert [r["status"] for r in results["runs"]] == (
      [f"imported from {page}"] * 2 + ["finished"]) * 2
  assert results["summary"] == original["summary"]
  assert results["curves"] == original["curves"]
  with open(tmp_path / "more" / "results.md") as f:
    assert f"| vanilla_seed1 | imported from {page} |" in f.read()

  # A page written before runs kept their own history: with one seed per variant, the variant's
  # curves are that run's.
  with open(page) as f:
    old = json.load(f)
  old["runs"] = [{key: value for key, value in r.items() if key != "history"}
                 for r in old["runs"] if r["seed"] == 0]
  for curve in old["curves"].values():
    for data in curve.values():
      data["values"] = [values[:1] for values in data["values"]]
  old_page = str(tmp_path / "old.json")
  with open(old_page, "w") as f:
    json.dump(old, f)
  histories = report.import_histories(old_page, more)
  assert set(histories) == {"vanilla_seed0", "self_flow_seed0"}
  [seed0] = [r for r in original["runs"] if r["name"] == "self_flow_seed0"]
  imported = histories["self_flow_seed0"]
  for tag, series in seed0["history"].items():
    assert imported[tag] == [tuple(point) for point in series], tag
  assert {tag: s[-1][1] for tag, s in imported.items()} == seed0["final"]

  with pytest.raises(ValueError, match="lists no finished run among the planned ones"):
    report.import_histories(page, runner.plan_runs(["dual_timestep"], 1, str(tmp_path)))


def test_a_failing_run_does_not_stop_the_others(tmp_path):
  runs = runner.plan_runs(["vanilla", "dual_timestep"], 2, str(tmp_path))
  trained = []

  def train(run):
    if run.name == "vanilla_seed1":
      raise RuntimeError("out of memory")
    trained.append(run.name)

  statuses = runner.execute(runs, train)
  assert trained == ["vanilla_seed0", "dual_timestep_seed0", "dual_timestep_seed1"]
  assert statuses["vanilla_seed1"] == "failed: RuntimeError: out of memory"
  assert not os.path.exists(os.path.join(runs[1].workdir, runner.MARKER))
  # The failed run is retried next time; the others are not.
  assert runner.execute(runs, lambda run: trained.append(run.name)) == {
      "vanilla_seed0": "finished earlier", "vanilla_seed1": "finished",
      "dual_timestep_seed0": "finished earlier", "dual_timestep_seed1": "finished earlier"}


@pytest.mark.parametrize("upload", [False, True], ids=["local", "uploaded"])
def test_a_run_log_keeps_every_attempt(tmp_path, monkeypatch, upload):
  """train.log gets each attempt's command and output appended, also where it cannot be appended
  to (Cloud Storage: a local copy, uploaded even when the child fails), and a failure names it."""
  if upload:  # the URL route (copy, append, upload) on local files
    monkeypatch.setattr(runner.storage, "is_url", lambda path: True)
  [run] = runner.plan_runs(["vanilla"], 1, str(tmp_path))
  outputs = iter(["print('first attempt')", "print('second attempt'); raise SystemExit(3)"])
  monkeypatch.setattr(runner, "train_command", lambda *_: [sys.executable, "-c", next(outputs)])
  train = runner.subprocess_train_fn("configs/c2i.py", "local", {})
  os.makedirs(run.workdir)  # Cloud Storage has no directories: the upload route makes none
  train(run)
  with pytest.raises(RuntimeError, match="(?s)exit status 3; log .*train.log ends with:\n"
                                         ".*first attempt\n.*second attempt\n$"):
    train(run)
  with open(os.path.join(run.workdir, "train.log")) as f:
    lines = f.read().splitlines()
  assert [line for line in lines if not line.startswith("$ ")] == ["first attempt",
                                                                    "second attempt"]
  assert len(lines) == 4 and lines[2].startswith(f"$ {sys.executable} -c")


# The within-noise rule on synthetic numbers.


def test_within_noise_rule():
  spread = statistics.Spread
  assert statistics.verdict(spread((10.0, 10.2, 9.9)), spread((12.0, 12.3, 11.8))) == "beyond noise"
  # Overlapping ranges: within noise even though the means differ by more than either std.
  assert statistics.verdict(spread((10.0, 11.0, 12.5)),
                            spread((12.4, 13.0, 14.0))) == "within noise"
  # Separate ranges, but the difference (5.55) is below the larger std (7.07): within noise.
  assert statistics.verdict(spread((0.0, 10.0)), spread((10.5, 10.6))) == "within noise"
  assert statistics.verdict(spread((1.0,)), spread((5.0, 5.1))) == "undetermined"


def test_sentences_say_what_is_beyond_noise():
  spread = statistics.Spread
  summary = {
      "vanilla": {"eval/image/fd": spread((20.0, 21.0, 20.5)),
                  "eval/image/probe_layer2": spread((0.40, 0.45, 0.42))},
      "self_flow": {"eval/image/fd": spread((15.0, 15.5, 15.2)),
                    "eval/image/probe_layer2": spread((0.41, 0.47, 0.44)),
                    "train/teacher_cosine": spread((0.9, 0.91, 0.92))},
  }
  metrics = metric_tags.table_metrics(summary)
  assert metrics == ["eval/image/fd", "eval/image/probe_layer2", "train/teacher_cosine"]
  records = statistics.compare(summary, metrics, "vanilla")
  assert [r["metric"] for r in records] == ["eval/image/fd", "eval/image/probe_layer2"]
  [sentence] = report.sentences(records, summary)
  assert sentence == (
      "**self_flow vs vanilla**: beyond seed noise: eval/image/fd lower by 5.267 (15.23 vs 20.5, "
      "better). Within seed noise: eval/image/probe_layer2.")
  table = report.markdown_table(summary, ["vanilla", "self_flow"], metrics,
                                {"vanilla": 3, "self_flow": 3})
  assert table[2] == "| eval/image/fd ↓ | 20.5 ± 0.5 | 15.23 ± 0.25 |"
  assert table[4] == "| train/teacher_cosine | — | 0.91 ± 0.01 |"


# Planning and the command line.


def test_train_command_and_settings(tmp_path):
  [run] = runner.plan_runs(["dual_timestep"], 1, str(tmp_path))
  assert run.workdir == os.path.join(str(tmp_path), "runs", "dual_timestep_seed0")
  overrides = runner.run_overrides(200, 100, runner.parse_overrides(["eval.loss_bins=5"]))
  command = runner.train_command(run, "configs/c2i.py", "local", overrides, python="python")
  assert command == [
      "python", "-m", "self_flow.main", "--config=configs/c2i.py:local,method=dual_timestep",
      f"--workdir={run.workdir}", "--config.seed=0", "--config.data.shuffle_seed=0",
      "--config.train.num_steps=200", "--config.train.eval_every=100",
      "--config.eval.probe_steps=500", "--config.eval.loss_bins=5",
      "--config.train.gradient_balance_every=250"]
  with pytest.raises(ValueError, match="names a method"):
    runner.train_command(run, "configs/c2i.py", "local,method=vanilla", overrides)
  with pytest.raises(ValueError, match="'eval.loss_bins' .* <key>=<value>"):
    runner.parse_overrides(["eval.loss_bins"])
  # A labelled variant: a method with settings of its own, after the shared overrides.
  [one_ema] = runner.plan_runs(
      ["one_ema=self_flow+optim.ema_warmup=False+optim.teacher_ema_decay=-1"], 1, str(tmp_path))
  assert (one_ema.name, one_ema.method_name) == ("one_ema_seed0", "self_flow")
  command = runner.train_command(one_ema, "configs/c2i.py", "local", overrides, python="python")
  assert command[3] == "--config=configs/c2i.py:local,method=self_flow"
  assert command[-2:] == ["--config.optim.ema_warmup=False",
                          "--config.optim.teacher_ema_decay=-1"]
  assert runner._run_fingerprint(one_ema, "f") != runner._run_fingerprint(
      runner.plan_runs(["one_ema=self_flow"], 1, str(tmp_path))[0], "f")
  with pytest.raises(ValueError, match="must be METHOD or LABEL=METHOD"):
    runner.plan_runs(["one_ema=self_flow+optim.ema_warmup"], 1, str(tmp_path))
  with pytest.raises(ValueError, match="must be distinct names"):
    runner.plan_runs(["a=self_flow", "a=vanilla"], 1, str(tmp_path))
  with pytest.raises(ValueError, match=r"variants=\['vanila'\] must be distinct names"):
    runner.plan_runs(["vanila"], 1, str(tmp_path))
  with pytest.raises(ValueError, match="seeds=0"):
    runner.plan_runs(["vanilla"], 0, str(tmp_path))


def test_cli_rejects_an_unknown_variant(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "self_flow.ablate", "--config=configs/c2i.py:local",
       "--variants=vanilla,selfflow", "--steps=10", f"--output={tmp_path}"],
      capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode != 0
  assert "variants=['vanilla', 'selfflow'] must be distinct names" in proc.stderr
  assert not os.path.exists(tmp_path / "runs")
