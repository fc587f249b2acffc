"""Real Slurm: the zeropp3 engine in the train loop (effrun engine, 2 tasks) preempted and requeued."""
from __future__ import annotations

import json

import pytest

from tests.slurm.conftest import finish, sacct_states, start_effrun, sweep_dir_of

pytestmark = pytest.mark.slurm

# 2 gloo ranks as one node of 2 devices (hierarchy 1x2x1), quantized hier3 (the defaults), 3 steps
ZPP = ["train", "+technique=zeropp3", "model=llama-tiny", "data=synthetic", "data.seq_len=16", "data.batch_size=2",
       "run.warmup_steps=1", "run.threads=1", "run.eval_at_end=false", "logger=quiet", "run.max_steps=3",
       "run.lr=1e-2", "parallelism=env", "parallelism.world_size=2"]


def _rows(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.fixture(scope="module")
def runs(slurm_cluster, tmp_path_factory):
    """Started together: a 2-task Slurm job whose ranks get the preemption signal after step 1
    (first incarnation only), and the same run without Slurm (2 spawned ranks) as the reference."""
    cwd, ref_cwd = tmp_path_factory.mktemp("zpp_slurm"), tmp_path_factory.mktemp("zpp_ref")
    job = start_effrun(cwd, "-m", *ZPP, "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2",
                       env={"EFFRUN_TEST_PREEMPT_AT_STEP": "1"})
    ref = start_effrun(ref_cwd, *ZPP, "parallelism.launcher=spawn")
    try:
        job_proc, ref_proc = finish(job), finish(ref)
    finally:
        for p in (job, ref):
            if p.poll() is None:
                p.kill()
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    assert job_proc.returncode == 0, job_proc.stderr[-3000:]
    ref_dir = next((ref_cwd / "out").rglob("summary.json")).parent
    return sweep_dir_of(job_proc) / "0", ref_dir


def test_preempted_zeropp3_job_checkpoints_shards_requeues_and_resumes(runs):
    d, ref = runs
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["info/hierarchy"] == "1x2x1"
    # the signal was polled at the step boundary: both ranks saved their shard of step 1 ...
    ck = d / "checkpoints" / "step_1"
    assert sorted(p.name for p in ck.iterdir()) == ["complete", "rank_0.pt", "rank_1.pt"]
    # ... Slurm requeued the job once and the second incarnation continued from there
    states = sacct_states(s["run_id"].removeprefix("slurm-"))
    assert sum("REQUEUED" in l for l in states) == 1, states  # (sacct may still say RUNNING: rank 1 exiting)
    assert s["measured/resumed_from_step"] == 1
    rows, ref_rows = _rows(d), _rows(ref)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2]
    # the interrupted run ends with the loss sequence of the uninterrupted one
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6, abs=1e-6)
    assert "measured/resumed_from_step" not in json.loads((ref / "summary.json").read_text())
