"""The ablation harness: runs per (variant, seed), resuming, reading metrics back, the results
page and plots, the paired statistics, convergence speed and the evaluation's own noise."""

import json
import math
import os
import subprocess
import sys

import pytest

from self_flow import storage
from self_flow.ablate import events, metric_tags, reevaluate, report, runner, statistics, study
from conftest import tiny_run_config

VARIANTS = ("vanilla", "self_flow")
# The tiny model's student tap is block 1 (round(0.3 x 4)).
PRIMARY = "eval/image/probe_t0.5_layer1"


def _tiny_run_config(data_dir, tmp_path):
  def make(variant: str, seed: int):
    config = tiny_run_config(data_dir, tmp_path, num_steps=4, method=variant)
    config.seed = config.data.shuffle_seed = seed
    config.train.eval_every = 2  # at step 2 (no probe) and at the end
    config.train.checkpoint_every = 4
    config.eval.probe_examples = 48
    config.eval.probe_timesteps = (0.0, 0.5)
    config.eval.loss_bins = 4
    config.sampling.num_steps = 2
    return config

  return make


@pytest.fixture(scope="module")
def ablation(fashion_mnist_dir, tmp_path_factory):
  """2 variants x 2 seeds x 4 steps of the tiny config, trained in this process; vanilla's seed 0
  evaluated again under 3 evaluation draws."""
  tmp_path = tmp_path_factory.mktemp("ablation")
  output = str(tmp_path / "out")
  runs = runner.plan_runs(VARIANTS, 2, output)
  make = _tiny_run_config(fashion_mnist_dir, tmp_path)

  def reevaluate_fn(run, offsets, path):
    storage.write_json(path, reevaluate.reevaluate(make(run.variant, run.seed), run.workdir,
                                                   offsets))

  results = study.run_ablation(runs, runner.in_process_train_fn(make), output,
                               fingerprint="tiny", description="tiny test ablation",
                               primary=PRIMARY, noise_draws=3, reevaluate_fn=reevaluate_fn)
  return runs, output, results


def test_results_page_has_every_metric_per_variant(ablation):
  runs, output, results = ablation
  assert [r["status"] for r in results["runs"]] == ["finished"] * 4
  with open(os.path.join(output, "results.md")) as f:
    page = f.read()
  assert [r["name"] for r in results["runs"]] == [  # seed by seed
      "vanilla_seed0", "self_flow_seed0", "vanilla_seed1", "self_flow_seed1"]
  final_values = page[page.index("## Final values"):]
  assert "| metric | vanilla (n=2) | self_flow (n=2) |" in final_values
  rows = {line.split(" | ")[0].lstrip("| ").rstrip(" ↓↑"): line
          for line in final_values.splitlines()
          if line.startswith("| eval/") or line.startswith("| train/")}
  evaluated = (["fd", "class_accuracy", "loss"]
               + [f"loss_t{a}-{b}" for a, b in
                  (("0.00", "0.25"), ("0.25", "0.50"), ("0.50", "0.75"), ("0.75", "1.00"))]
               + [f"probe_t{t}_layer{k}" for t in ("0", "0.5") for k in (1, 2, 3, 4)]
               + ["reference_cosine_t0", "reference_cosine_t0.5"])
  expected = ([PRIMARY]  # the primary endpoint first, then the EMA's, then the student's
              + [f"eval/image/{name}" for name in evaluated if name != PRIMARY[11:]]
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
  assert page.index("## Primary endpoint (pre-registered)") < page.index("## Paired differences")
  assert f"- **self_flow − vanilla** on `{PRIMARY}`: mean " in page
  assert "## Paired differences from vanilla" in page and "**self_flow vs vanilla**" in page
  paired_rows = [line for line in page[page.index("## Paired"):page.index("## Convergence")]
                 .splitlines() if line.startswith("| eval/")]
  assert paired_rows[0].startswith(f"| {PRIMARY} | ") and "(n=2)" in paired_rows[0]
  # Convergence: at the resolution of the evaluations (steps 2 and 4).
  speed = {(r["variant"], r["metric"]): r for r in results["convergence"]}
  for variant in VARIANTS:
    for metric in ("eval/image/loss", "eval/image/fd"):
      record = speed[(variant, metric)]
      assert record["seeds"] == 2 and record["reached"] + record["unreached"] == 2
      assert set(record["steps"]) <= {2, 4}
      flops = results["runs"][0]["history"]["perf/model_flops_per_step/image"][-1][1]
      if record["reached"] and variant == "vanilla":
        assert record["mean_flops"] == pytest.approx(record["mean_steps"] * flops)
  # The baseline reaches its own final value at the latest at its last evaluation.
  assert speed[("vanilla", "eval/image/loss")]["reached"] == 2
  assert "## Convergence speed" in page and "## Evaluation noise" in page


def test_results_json_and_plots(ablation):
  runs, output, results = ablation
  with open(os.path.join(output, "results.json")) as f:
    saved = json.load(f)
  assert saved["variants"] == list(VARIANTS) and saved["baseline"] == "vanilla"
  assert saved["primary"] == PRIMARY
  fd = saved["summary"]["self_flow"]["eval/image/fd"]
  assert fd["n"] == 2 and fd["min"] <= fd["mean"] <= fd["max"] and len(fd["values"]) == 2
  finals = {r["name"]: r["final"] for r in saved["runs"]}
  assert set(finals) == {r.name for r in runs}
  for accuracy in (v for f in finals.values() for k, v in f.items() if "probe_t" in k):
    assert 0.0 <= accuracy <= 1.0
  for cosine in (v for f in finals.values() for k, v in f.items() if "reference_cosine" in k):
    assert -1.0 <= cosine <= 1.0
  # Each curve point holds one value per seed: the band's range.
  curve = saved["curves"]["train/loss_gen"]["self_flow"]
  assert curve["steps"] == [1, 2, 3, 4] and all(len(v) == 2 for v in curve["values"])
  assert saved["curves"]["eval/image/fd"]["vanilla"]["steps"] == [2, 4]
  # The probe is in the final evaluation only (eval.probe_every_evaluation is False).
  logged = events.read_scalars(runs[0].workdir)
  assert [s for s, _ in logged["eval/image/loss"]] == [2, 4]
  assert [s for s, _ in logged[PRIMARY]] == [4]
  for name in ("curve_eval_image_fd.png", "curve_eval_image_class_accuracy.png",
               "curve_eval_image_loss.png", "curve_train_loss_gen.png",
               "probe_image_t0_by_layer.png", "probe_image_t0.5_by_layer.png",
               "loss_image_by_t.png"):
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
  assert [r["status"] for r in results["runs"]] == [f"imported from {page}"] * 4 + [
      "finished"] * 2
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


def test_a_run_that_stopped_early_is_not_finished(ablation):
  """A trainer that saved after a SIGTERM exits 0; its newest checkpoint is not the last step,
  so the harness must not mark it finished (the next invocation resumes it)."""
  runs, _, _ = ablation
  runner.check_reached(runs[0], 4)  # trained to its 4 steps
  with pytest.raises(runner.RunInterruptedError, match="vanilla_seed0 stopped at step 4 of 6"):
    runner.check_reached(runs[0], 6)
  statuses = runner.execute(runs[:1], lambda run: runner.check_reached(run, 6), "other settings")
  assert statuses[runs[0].name].startswith("failed: RunInterruptedError")


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
  assert not os.path.exists(os.path.join(runs[2].workdir, runner.MARKER))
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
  monkeypatch.setattr(runner, "check_reached", lambda *_: None)  # these children save nothing
  train = runner.subprocess_train_fn("configs/c2i.py", "local", {"train.num_steps": "1"})
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


def test_evaluation_noise_repeats_the_runs_own_evaluation_at_offset_0(ablation):
  """Draw 0 re-evaluates the baseline's seed-0 checkpoint exactly as the run did; other draws
  change the sampling (FD) and the probe's noise."""
  runs, output, results = ablation
  noise = results["evaluation_noise"]
  assert noise["run"] == "vanilla_seed0" and noise["offsets"] == [0, 1, 2] and noise["step"] == 4
  own = results["runs"][0]["final"]
  draws = {int(k): v for k, v in noise["metrics"].items()}
  for metric in ("eval/image/fd", PRIMARY, "eval/image/loss"):
    assert draws[0][metric] == pytest.approx(own[metric], rel=1e-6), metric
  assert len({draws[k]["eval/image/fd"] for k in draws}) == 3
  assert noise["spread"]["eval/image/fd"]["std"] > 0 and noise["spread"]["eval/image/fd"]["n"] == 3
  # Kept beside the page and reused by a rerun with the same settings.
  assert storage.read_json(os.path.join(output, study.NOISE_FILE))["spread"] == noise["spread"]
  assert study.measure_evaluation_noise(
      runs, {r.name: "finished" for r in runs}, "vanilla", 3,
      lambda *_: pytest.fail("measured again"), output, "tiny") == noise


# The paired statistics on fixed numbers.


def test_paired_interval_and_test_on_fixed_numbers():
  """Differences 1, 2, 3, 4: mean 2.5, sd 1.2910, t(3) quantile 3.18245, so the 95% interval is
  2.5 -/+ 2.0543 = [0.4457, 4.5543]; t = 3.873 on 3 degrees of freedom, two-sided p 0.03047."""
  pair = statistics.paired({0: 11.0, 1: 12.0, 2: 13.0, 3: 14.0, 7: 1.0},
                           {0: 10.0, 1: 10.0, 2: 10.0, 3: 10.0})
  assert pair.seeds == (0, 1, 2, 3) and pair.differences == (1.0, 2.0, 3.0, 4.0)
  assert pair.mean == 2.5 and pair.std == pytest.approx(1.290994, abs=1e-6)
  assert pair.interval == pytest.approx((0.445740, 4.554260), abs=1e-6)
  assert pair.p_value == pytest.approx(0.030466, abs=1e-6)
  single = statistics.paired({0: 1.0}, {0: 0.0})
  assert math.isnan(single.p_value) and all(math.isnan(x) for x in single.interval)
  assert statistics.paired({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0}).p_value == 0.0  # all equal, not 0


def test_holm_correction_on_fixed_numbers():
  """Sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1 are 0.02, 0.03, 0.06, 0.04; the running
  maximum makes the last 0.06. A nan (no test) is not counted in the family."""
  assert statistics.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
  adjusted = statistics.holm([0.2, math.nan, 0.6])
  assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1])
  assert adjusted[2] == pytest.approx(0.6)
  assert statistics.holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1


def test_paired_verdicts_primary_alone_others_holm_corrected():
  """The primary endpoint is tested alone; the other metrics share Holm's correction, so a p of
  0.03 that would pass alone does not pass in a family of three."""
  runs = runner.plan_runs(["dual_timestep", "self_flow"], 4, "/out")
  base = {"eval/image/probe_t0.5_layer2": 0.50, "eval/image/fd": 20.0,
          "eval/image/loss": 0.3, "eval/image/class_accuracy": 0.7}
  finals = {}
  for run in runs:
    values = dict(base)
    if run.variant == "self_flow":  # +1..4 percent of probe accuracy, FD +1..4
      values["eval/image/probe_t0.5_layer2"] += 0.01 * (run.seed + 1)
      values["eval/image/fd"] += run.seed + 1
      values["eval/image/loss"] += 0.001 * (-1) ** run.seed
    finals[run] = values
  metrics = ["eval/image/probe_t0.5_layer2", "eval/image/fd", "eval/image/loss",
             "eval/image/class_accuracy"]
  records = statistics.compare_paired(finals, ["dual_timestep", "self_flow"], "dual_timestep",
                                      metrics, primary="eval/image/probe_t0.5_layer2")
  by_metric = {r["metric"]: r for r in records}
  primary = by_metric["eval/image/probe_t0.5_layer2"]
  assert primary["primary"] and "p_adjusted" not in primary
  assert primary["p_value"] == pytest.approx(0.030466, abs=1e-6) and primary["verdict"] == "real"
  fd = by_metric["eval/image/fd"]  # the same t-test, Holm-adjusted over 3 metrics
  assert fd["p_value"] == pytest.approx(0.030466, abs=1e-6)
  assert fd["p_adjusted"] == pytest.approx(3 * 0.030466, abs=1e-5) and fd["verdict"] == "not shown"
  assert by_metric["eval/image/class_accuracy"]["verdict"] == "not shown"  # no difference
  [sentence] = report.sentences(records)
  assert sentence == (
      "**self_flow vs dual_timestep**: shown: eval/image/probe_t0.5_layer2 higher by 0.025 "
      "(95% CI [0.004457, 0.04554], better). 3 other metrics not shown to differ.")
  [line] = report.primary_lines(records, "eval/image/probe_t0.5_layer2")
  assert line.startswith("- **self_flow − dual_timestep** on `eval/image/probe_t0.5_layer2`: "
                         "mean 0.025, 95% CI [0.004457, 0.04554], paired t-test p 0.030 (n = 4;")
  assert line.endswith("Verdict: a difference is shown, better.")
  summary = statistics.summarise(finals, ["dual_timestep", "self_flow"])
  table = report.markdown_table(summary, ["dual_timestep", "self_flow"], metrics,
                                {"dual_timestep": 4, "self_flow": 4})
  assert table[3] == "| eval/image/fd ↓ | 20 ± 0 | 22.5 ± 1.3 |"


def test_convergence_steps_and_flops():
  """Steps to the paired baseline run's final value, read off the evaluation curve."""
  runs = runner.plan_runs(["vanilla", "self_flow"], 2, "/out")
  curves = {("vanilla", 0): [(100, 0.5), (200, 0.4), (300, 0.3)],
            ("vanilla", 1): [(100, 0.6), (200, 0.45), (300, 0.35)],
            ("self_flow", 0): [(100, 0.45), (200, 0.3), (300, 0.25)],
            ("self_flow", 1): [(100, 0.5), (200, 0.4), (300, 0.36)]}  # never reaches 0.35
  flops = {"vanilla": 1e9, "self_flow": 1.2e9}
  histories = {run: {"eval/image/loss": curves[(run.variant, run.seed)],
                     "perf/model_flops_per_step/image": [(0, flops[run.variant])]}
               for run in runs}
  records = statistics.convergence(histories, ["vanilla", "self_flow"], "vanilla",
                                   "eval/image/loss", -1, "perf/model_flops_per_step/image")
  vanilla, self_flow = records
  assert (vanilla["steps"], vanilla["mean_flops"]) == ([300, 300], 3e11)
  assert self_flow["steps"] == [200] and self_flow["unreached"] == 1
  assert self_flow["mean_flops"] == pytest.approx(2.4e11)
  assert statistics.steps_to_reach([(1, 0.5), (2, 0.7)], 0.6, +1) == 2


def test_metric_order_and_directions():
  summary = {"vanilla": {"eval/image/fd": statistics.Spread((20.0, 21.0)),
                         "eval/image/probe_t0.5_layer2": statistics.Spread((0.4, 0.45)),
                         "eval/image/probe_t0_layer10": statistics.Spread((0.4, 0.45)),
                         "eval/image/reference_cosine_t0.5": statistics.Spread((0.8, 0.9)),
                         "train/teacher_cosine": statistics.Spread((0.9, 0.91))}}
  assert metric_tags.table_metrics(summary) == [
      "eval/image/fd", "eval/image/probe_t0_layer10", "eval/image/probe_t0.5_layer2",
      "eval/image/reference_cosine_t0.5", "train/teacher_cosine"]
  assert [metric_tags.better_direction(m) for m in metric_tags.table_metrics(summary)] == [
      -1, 1, 1, 1, 0]


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
      "--config.eval.probe_examples=2000", "--config.eval.loss_bins=5",
      "--config.train.gradient_balance_every=250"]
  with pytest.raises(ValueError, match="names a method"):
    runner.train_command(run, "configs/c2i.py", "local,method=vanilla", overrides)
  # The re-evaluation of a run gets the very config flags of its training.
  again = runner.reevaluate_command(run, "configs/c2i.py", "local", overrides, [0, 1], "n.json",
                                    python="python")
  assert again[:7] == ["python", "-m", "self_flow.ablate.reevaluate", command[3], command[4],
                       "--seed_offsets=0,1", "--output=n.json"]
  assert again[7:] == command[5:]
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
