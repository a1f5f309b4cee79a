"""Ablation harness: every (variant, seed) as its own training run, then one results page.

  python -m self_flow.ablate --config=configs/c2i.py:local \\
    --variants=vanilla,dual_timestep,self_flow --seeds=3 --steps=1500 --output=ablations/c2i \\
    [--eval_every=500] [--override=eval.num_samples=500 ...]

A variant is a method (base_config.METHODS) or a labelled method with settings of its own,
`LABEL=METHOD+KEY=VALUE+...` (e.g. `one_ema=self_flow+optim.ema_warmup=False`). Each run is
`python -m self_flow.main` in a process of its own (a crash loses only that run), with
`method=<method>` added to the config argument and `--config.seed` and
`--config.data.shuffle_seed` set to the seed, in OUTPUT/runs/<variant>_seed<seed>. A finished
run leaves `ablation_run.json` in its workdir and is skipped when the same command is repeated;
an interrupted one resumes from its checkpoints. The metrics every run logged are then read back
from its TensorBoard event files and summarised:

  OUTPUT/results.md    final metrics per variant (mean ± std over seeds) and, in words, which
                       differences are within seed noise (`statistics.NOISE_RULE`)
  OUTPUT/results.json  the same numbers, each run's final metrics and the plotted curves
  OUTPUT/*.png         metric vs step (mean line, min-max band over seeds), probe accuracy vs
                       layer, held-out loss vs timestep bin

Unless overridden, runs also log the linear probe and the stratified loss
(`runner.DEFAULT_OVERRIDES`). From Python (tests, notebooks): `runner.plan_runs`, then
`study.run_ablation` with `runner.subprocess_train_fn` or `runner.in_process_train_fn`.
"""
