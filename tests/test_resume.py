"""Kill a run after N steps, resume it, and get the loss sequence of an uninterrupted run."""
from tests.conftest import TINY


def test_resume_after_kill_matches_uninterrupted(effrun, tmp_path):
    common = [*TINY, "data=synthetic", "run.max_steps=5", "run.checkpoint_every=1"]
    killed = effrun("train", *common, "run.crash_after_steps=2", root=tmp_path / "a", check=False)
    assert killed.returncode != 0
    run_dir = killed.run_dirs()[-1]
    assert killed.summary()["status"] == "running"  # killed: never finished
    resumed = effrun("train", *common, "run.resume=true", root=tmp_path / "a")
    assert resumed.run_dirs() == [run_dir]  # same run dir, same run id
    s = resumed.summary()
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 2
    full = effrun("train", *common, root=tmp_path / "b")
    got = [r["loss"] for r in resumed.metrics()]
    want = [r["loss"] for r in full.metrics()]
    assert [r["step"] for r in resumed.metrics()] == [0, 1, 2, 3, 4]
    assert got == want
