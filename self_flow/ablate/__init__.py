"""Ablation harness: every (variant, seed) as its own training run, then one results page.

  python -m self_flow.ablate --config=configs/c2i.py:local \\
    --variants=vanilla,dual_timestep,self_flow --seeds=5 --steps=1500 --output=ablations/c2i \\
    [--baseline=dual_timestep] [--primary=eval/image/probe_t0.5_layer2] [--eval_noise_draws=5] \\
    [--eval_every=300] [--override=eval.num_samples=500 ...]

A variant is a method (base_config.METHODS) or a labelled method with settings of its own,
`LABEL=METHOD+KEY=VALUE+...` (e.g. `one_ema=self_flow+optim.ema_warmup=False`). Each run is
`python -m self_flow.main` in a process of its own (a crash loses only that run), with
`method=<method>` added to the config argument and `--config.seed` and
`--config.data.shuffle_seed` set to the seed, in OUTPUT/runs/<variant>_seed<seed>. A finished
run leaves `ablation_run.json` in its workdir and is skipped when the same command is repeated;
an interrupted one resumes from its checkpoints. Runs go seed by seed, so a study stopped
part-way holds complete pairs. The metrics every run logged are then read back from its
TensorBoard event files and compared, seed by seed, with the baseline (`statistics.PAIRED_RULE`):

  OUTPUT/results.md    the pre-registered primary endpoint; every metric's paired difference
                       from the baseline (mean, 95% t-interval, Holm-corrected p) and, in words,
                       what is shown; steps and FLOPs to reach the baseline's final held-out
                       loss and FD; the evaluation's own noise (--eval_noise_draws); final
                       values per variant (mean ± std over seeds)
  OUTPUT/results.json  the same numbers, each run's final metrics and the plotted curves
  OUTPUT/*.png         metric vs step (mean line, min-max band over seeds), probe accuracy vs
                       layer per noise level, held-out loss vs timestep bin

Unless overridden, runs also log the linear probe and the stratified loss
(`runner.DEFAULT_OVERRIDES`). From Python (tests, notebooks): `runner.plan_runs`, then
`study.run_ablation` with `runner.subprocess_train_fn` or `runner.in_process_train_fn`.
"""
