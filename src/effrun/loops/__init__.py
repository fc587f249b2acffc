"""The loops: one per mode (train, infer, plan); techniques plug into their seams."""
from __future__ import annotations


def run_loop(ctx) -> None:
    if ctx.mode == "train":
        if ctx.cfg.run.find_max_seq_len:
            from effrun.loops.maxseq import run_find_max_seq_len

            return run_find_max_seq_len(ctx)
        from effrun.loops.train import train

        return train(ctx)
    if ctx.mode == "infer":
        from effrun.loops.infer import infer

        return infer(ctx)
    from effrun.loops.plan import plan

    return plan(ctx)


# summary keys the loops themselves write, per mode (fnmatch patterns; "?" marks a key that only
# some runs write). Families and techniques declare theirs in their specs; the conformance suites
# fail on a key nobody declared.
CORE_METRICS = {
    "train": ("measured/loss", "measured/loss_first", "measured/step_time_s", "measured/step_time_mean_s",
              "measured/steps_timed", "measured/*_per_s", "measured/peak_mem_mb", "measured/peak_rss_mb",
              "?measured/flops_per_*", "?measured/mfu", "?projected/flops_per_*_formula", "?projected/mfu_formula", "?measured/eval_*", "?measured/resumed_from_step",
              "?measured/saved_bytes", "?measured/saved_tensors", "?info/export_dir",
              "measured/params_total", "measured/params_trainable", "measured/params_trainable_pct",
              "?measured/max_seq_len*", "?measured/stopped_by_time_budget_at_step"),
    "infer": ("measured/*_per_s", "?measured/ttft_s", "?measured/tbt_s", "measured/new_*", "measured/rounds",
              "measured/peak_mem_mb"),
    "plan": (),
}
