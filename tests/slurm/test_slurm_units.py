"""Request-vs-partition checks and time-limit parsing (no cluster needed)."""
from __future__ import annotations

import pytest

from effrun.errors import UserError
from effrun.slurm import _gpus, _minutes, check_parallelism, check_resources

ROWS = [dict(partition="debug*", cpus="2", mem_mb="21736", gres="(null)", timelimit="infinite", avail="up"),
        dict(partition="gpu", cpus="64", mem_mb="515000", gres="gpu:h100:8(S:0-1)", timelimit="2-00:00:00",
             avail="up"),
        dict(partition="gpu", cpus="32", mem_mb="256000", gres="gpu:4", timelimit="2-00:00:00", avail="up")]


def req(**kw):
    base = dict(partition=None, tasks_per_node=1, cpus_per_task=1, mem_gb=2, gpus_per_node=None, nodes=1,
                timeout_min=10)
    base.update(kw)
    return base


def test_time_limits_parse():
    assert _minutes("infinite") is None and _minutes("30") == 30 and _minutes("1:30:00") == 90
    assert _minutes("2-00:00:00") == 2880 and _minutes("10:30") == 10.5
    assert _gpus("gpu:h100:8(S:0-1)") == 8 and _gpus("(null)") == 0


@pytest.mark.parametrize("kw, key, words", [
    (dict(cpus_per_task=3), "hydra.launcher.cpus_per_task", "3 CPUs"),
    (dict(tasks_per_node=2, cpus_per_task=2), "hydra.launcher.cpus_per_task", "4 CPUs"),
    (dict(mem_gb=22), "hydra.launcher.mem_gb", "22 GB"),
    (dict(gpus_per_node=1), "hydra.launcher.gpus_per_node", "1 GPUs"),
    (dict(nodes=2), "hydra.launcher.nodes", "2 nodes"),
    (dict(partition="a100"), "hydra.launcher.partition", "'a100' does not exist"),
    (dict(partition="gpu", gpus_per_node=8, timeout_min=3000), "hydra.launcher.timeout_min", "2880"),
])
def test_oversized_requests_are_refused(kw, key, words):
    with pytest.raises(UserError) as e:
        check_resources(req(**kw), ROWS)
    assert e.value.key == key and words in str(e.value), str(e.value)


def test_fitting_requests_pass_and_pick_the_default_partition():
    assert check_resources(req(tasks_per_node=2), ROWS)["partition"] == "debug"
    got = check_resources(req(partition="gpu", tasks_per_node=8, gpus_per_node=8, cpus_per_task=8, mem_gb=480,
                              nodes=2, timeout_min=2880), ROWS)
    assert got == {"partition": "gpu", "cpus": 64, "mem_mb": 515000, "gpus": 8}


def test_tasks_must_match_the_world_size():
    from omegaconf import OmegaConf

    cfg = lambda launcher, ws: OmegaConf.create({"parallelism": {"launcher": launcher, "world_size": ws}})
    check_parallelism(req(tasks_per_node=2), cfg("env", 2))
    for lc, c in [(req(tasks_per_node=2), cfg("inprocess", 1)), (req(tasks_per_node=2), cfg("env", 4)),
                  (req(), cfg("env", 2))]:
        with pytest.raises(UserError):
            check_parallelism(lc, c)


def test_preemption_signal_is_deferred_to_a_step_boundary_only_inside_the_loop(monkeypatch):
    """Job side, without Slurm: submitit's USR2 handler runs at once outside the train loop, and is
    replaced by a flag the loop polls while it runs. The installed handler is found through the
    process's signal table (no module state)."""
    import os
    import signal
    from types import SimpleNamespace

    from effrun import slurm

    calls = []
    old = signal.signal(signal.SIGUSR2, lambda s, f: calls.append(s))  # stands in for submitit's handler
    monkeypatch.setenv("SUBMITIT_FOLDER", "/nonexistent")
    monkeypatch.setenv("SLURM_JOB_ID", "1")
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    monkeypatch.delenv("SUBMITIT_PREEMPT_SIGNAL", raising=False)
    monkeypatch.setenv(slurm.PREEMPT_ENV, "3@7")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    try:
        assert slurm.JobSignals.installed() is None and slurm.should_stop(SimpleNamespace(world_size=1), 5) is False
        js = slurm.job_setup()
        assert isinstance(js, slurm.JobSignals) and slurm.JobSignals.installed() is js
        assert slurm.job_setup() is js  # idempotent
        exp = SimpleNamespace(world_size=1)
        os.kill(os.getpid(), signal.SIGUSR2)  # before the loop: submitit requeues at once
        assert calls == [signal.SIGUSR2] and not js.flag
        assert slurm.should_stop(exp, 0) is False and slurm.should_stop(exp, 1) is False
        assert slurm.should_stop(exp, 2) is True and calls == [signal.SIGUSR2]  # the hook fired after step 3
        slurm.stop_polling()
        assert not js.flag and not js.polling
        monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # a requeued run resumes and is not signalled again
        assert slurm.requeued() and slurm.should_stop(exp, 2) is False
    finally:
        signal.signal(signal.SIGUSR2, old)


def test_stop_flag_reduces_over_gloo_ranks():
    """_any_rank: one rank signalled -> every rank stops (the control tensor on the CPU for gloo)."""
    from effrun.launch import spawn

    spawn(_flag_worker, 2, "gloo")


def _flag_worker(rank, world_size):
    from effrun.slurm import _any_rank

    assert _any_rank(rank == 1) is True
    assert _any_rank(False) is False
