"""effrun's Hydra plugins, found by Hydra's plugin discovery (the `hydra_plugins` namespace package).

- launchers `hydra/launcher=effrun_slurm` and `hydra/launcher=effrun_submitit_local`: the submitit
  launchers plus what a sweep of long runs needs (see `launcher.EffrunLaunchMixin`);
- the callback `callbacks.SweepSummary` (`on_multirun_end`): one status line per point, written to
  <sweep dir>/sweep_summary.json, whatever launcher ran the sweep.

Importing this package is cheap (no submitit, no torch): Hydra imports it at every start.
"""
