"""Real Slurm (scripts/slurm-up.sh's one-node cluster), real jobs through hydra-submitit-launcher."""
from __future__ import annotations

import json
import time

import pytest

from tests.slurm.conftest import TINY, finish, run_effrun, sacct_states, start_effrun, sweep_dir_of

pytestmark = pytest.mark.slurm


def _summary(d):
    return json.loads((d / "summary.json").read_text())


def _losses(d):
    rows = [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    """Submitted together, in the background (the partition lets two jobs share a CPU):
    - a 3-point sweep: #0 runs through, #1 is preempted after step 2 (the USR2 that Slurm sends
      before a time limit) and requeued, #2 is killed after 2 steps (a hard failure);
    - a 2-task job (parallelism=env, tasks_per_node=2), preempted after step 1 and requeued.
    The short tests that take this fixture run while these jobs are in flight."""
    cwd, cwd2 = tmp_path_factory.mktemp("sweep"), tmp_path_factory.mktemp("tasks2")
    p1 = start_effrun(cwd, "-m", "train", *TINY, "run.max_steps=4", "run.crash_after_steps=null,null,2",
                      "logger.wandb=true", env={"EFFRUN_TEST_PREEMPT_AT_STEP": "2@1"})  # wandb offline
    p2 = start_effrun(cwd2, "-m", "train", *TINY, "run.max_steps=3", "parallelism=env",
                      "parallelism.world_size=2", "hydra.launcher.tasks_per_node=2",
                      env={"EFFRUN_TEST_PREEMPT_AT_STEP": "1"})
    yield {"cwd": cwd, "sweep": p1, "tasks2": p2}
    for p in (p1, p2):
        if p.poll() is None:
            p.kill()


@pytest.fixture(scope="module")
def sweep(jobs):
    proc = finish(jobs["sweep"])
    return jobs["cwd"], proc, sweep_dir_of(proc)


@pytest.fixture(scope="module")
def tasks2(jobs):
    return finish(jobs["tasks2"])


def test_request_larger_than_partition_fails_fast(jobs, tmp_path):
    """(memory, GPUs, nodes, time limit: the same check, in test_slurm_units.py)"""
    override, key = "hydra.launcher.cpus_per_task=64", "hydra.launcher.cpus_per_task"
    t0 = time.time()
    proc = run_effrun(tmp_path, "-m", "train", *TINY, "run.lr=1e-4,1e-3", override, timeout=60)
    assert proc.returncode == 2 and time.time() - t0 < 60
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and key in err[0] and "partition 'debug'" in err[0], proc.stderr
    # nothing was submitted: effrun creates the sweep dir (which holds submitit's folder) before sbatch
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_request_sbatch_refuses_is_one_line_exit_2(jobs, tmp_path):
    proc = run_effrun(tmp_path, "-m", "train", *TINY, "run.lr=1e-4,1e-3", "hydra.launcher.constraint=nosuchfeature",
                      timeout=60)
    err = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert len(err) == 1 and "Slurm refused the jobs" in err[0] and "Invalid feature" in err[0], err


def test_sweep_keeps_results_of_good_points_and_lists_the_failed_one(sweep):
    cwd, proc, sdir = sweep
    assert proc.returncode == 1, proc.stderr[-3000:]
    summ = json.loads((sdir / "sweep_summary.json").read_text())
    assert [p["status"] for p in summ["points"]] == ["completed", "completed", "failed"]
    assert summ["counts"] == {"completed": 2, "failed": 1}
    bad = summ["points"][2]
    assert "run.crash_after_steps=2" in bad["overrides"] and "137" in bad["error"]
    assert _summary(sdir / "2")["status"] == "failed"
    assert "1 job(s) failed" in proc.stderr and f"{sdir}/2" in proc.stderr
    for i in (0, 1):  # the good points' results are complete
        assert _summary(sdir / str(i))["measured/loss"] > 0 and len(_losses(sdir / str(i))) == 4
    # `effrun report` on the multirun dir lists the failed point with its status and error
    rep = run_effrun(cwd, "report", str(sdir), "--out", str(cwd / "report"))
    assert rep.returncode == 0, rep.stderr[-2000:]
    rows = [l for l in (cwd / "report" / "report.md").read_text().splitlines() if "| failed |" in l]
    assert len(rows) == 1 and "run.crash_after_steps=2" in rows[0] and "137" in rows[0], rows


def test_requeued_job_resumes_with_same_run_id_and_loss_sequence(sweep):
    _, _, sdir = sweep
    s0, s1 = _summary(sdir / "0"), _summary(sdir / "1")
    job = s1["run_id"].removeprefix("slurm-")
    states = sacct_states(job)
    assert any("REQUEUED" in l for l in states) and any("COMPLETED" in l for l in states), states
    assert s1["measured/resumed_from_step"] == 2 and s1["status"] == "completed"
    assert (sdir / "1" / "run_id").read_text().strip() == s1["run_id"]
    # both incarnations logged to the same wandb run (offline: one run dir each, same id)
    wb = sorted(p.name for p in (sdir / "1" / "wandb").glob("offline-run-*"))
    assert len(wb) == 2 and all(n.endswith("-" + s1["run_id"]) for n in wb), wb
    assert (sdir / "1" / "checkpoints" / "step_2" / "complete").exists()
    # the interrupted run ends with exactly the loss sequence of the uninterrupted one
    assert _losses(sdir / "1") == _losses(sdir / "0")
    assert "measured/resumed_from_step" not in s0


def test_rerun_with_skip_completed_submits_only_the_failed_point(sweep):
    cwd, first, sdir = sweep
    before = {i: (sdir / str(i) / "summary.json").read_bytes() for i in (0, 1)}
    args = ["-m", "train", *TINY, "run.max_steps=4", "run.crash_after_steps=null,null,2", "logger.wandb=true",
            "run.skip_completed=true",
            f"hydra.sweep.dir={sdir}"]
    dry = run_effrun(cwd, "--dry-run", *args)
    assert dry.returncode == 0 and "1 of 3 job(s) to submit; nothing submitted" in dry.stdout, dry.stdout
    assert dry.stdout.count("[skip: completed]") == 2 and "#2:" in dry.stdout
    proc = run_effrun(cwd, *args)
    assert "submitting 1 of 3 job(s) (2 already completed)" in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1  # the crashing point fails again
    assert {i: (sdir / str(i) / "summary.json").read_bytes() for i in (0, 1)} == before
    summ = json.loads((sdir / "sweep_summary.json").read_text())
    assert [p["status"] for p in summ["points"]] == ["completed", "completed", "failed"]


def test_two_task_job_forms_a_gloo_group_and_resumes_after_requeue(tasks2):
    proc = tasks2
    assert proc.returncode == 0, proc.stderr[-3000:]
    sdir = sweep_dir_of(proc)
    s = _summary(sdir / "0")
    assert s["status"] == "completed" and s["world_size"] == 2
    rows = [json.loads(l) for l in (sdir / "0" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["tokens"] == 2 * 2 * 32  # batch x seq x world: DDP over 2 ranks
    job = s["run_id"].removeprefix("slurm-")
    # one submitit task log per Slurm task, and each rank saw the job's 2 tasks
    logs = sorted(p.name for p in (sdir / ".submitit").rglob("*_log.out"))
    assert logs == [f"{job}_0_log.out", f"{job}_1_log.out"], logs
    # both ranks stopped at the same step boundary, rank 0 checkpointed, the job came back once
    states = sacct_states(job)
    assert any("REQUEUED" in l for l in states), states
    assert s["measured/resumed_from_step"] == 1 and [r["step"] for r in rows] == [0, 1, 2]
