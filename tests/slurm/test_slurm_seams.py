"""Real Slurm: the one train loop's preemption/requeue path for the engines and plans ported onto
its seams (ByteScale's HDP plan + ZeRO-1; zeropp3's DeepSpeed engine): a 2-task job gets the
preemption signal after step 1, checkpoints at the step boundary, is requeued, resumes, and ends
with the loss sequence of the same run without Slurm."""
from __future__ import annotations

import json

import pytest

from tests.slurm.conftest import finish, sacct_states, start_effrun, sweep_dir_of

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

BASE = ["train", "model=llama-tiny", "data=synthetic", "data.seq_len=16", "data.batch_size=2", "run.warmup_steps=1",
        "run.threads=1", "run.eval_at_end=false", "logger=quiet", "run.max_steps=3", "run.lr=1e-2",
        "parallelism=env", "parallelism.world_size=2"]
CASES = {
    "bytescale": ["+technique=bytescale", "technique.max_len=96", "technique.min_len=16", "technique.capacity=96",
                  "technique.tokens_per_step=384", "technique.cost_source=flops"],
    "zeropp3-deepspeed": ["+technique=zeropp3", "technique.engine=deepspeed", "technique.quantized_weights=false",
                          "technique.quantized_gradients=false"],
}


def _rows(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_preempted_job_requeues_and_resumes_with_the_reference_losses(slurm_cluster, tmp_path, case):
    args = [*BASE, *CASES[case]]
    cwd, ref_cwd = tmp_path / "job", tmp_path / "ref"
    cwd.mkdir()
    ref_cwd.mkdir()
    job = start_effrun(cwd, "-m", *args, "hydra/launcher=slurm_local", "hydra.launcher.tasks_per_node=2",
                       env={"EFFRUN_TEST_PREEMPT_AT_STEP": "1", "OMP_NUM_THREADS": "1"})
    ref = start_effrun(ref_cwd, *args, "parallelism.launcher=spawn", env={"OMP_NUM_THREADS": "1"})
    try:
        job_proc, ref_proc = finish(job, timeout=600), finish(ref, timeout=600)
    finally:
        for p in (job, ref):
            if p.poll() is None:
                p.kill()
    assert ref_proc.returncode == 0, ref_proc.stderr[-3000:]
    assert job_proc.returncode == 0, job_proc.stderr[-3000:]
    d = sweep_dir_of(job_proc) / "0"
    ref_dir = next((ref_cwd / "out").rglob("summary.json")).parent
    s = json.loads((d / "summary.json").read_text())
    assert s["status"] == "completed" and s["world_size"] == 2 and s["measured/resumed_from_step"] == 1
    assert (d / "checkpoints" / "step_1" / "complete").exists()
    states = sacct_states(s["run_id"].removeprefix("slurm-"))
    assert sum("REQUEUED" in l for l in states) == 1, states
    rows, ref_rows = _rows(d), _rows(ref_dir)
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [0, 1, 2]
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in ref_rows], rel=1e-6, abs=1e-6)
