"""effrun.launch with real gloo processes: a dead rank is named with its cause, a peer that never
comes fails within the rendezvous timeout with one line, bad input from a rank stays one line."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest

from effrun.errors import UserError
from effrun.launch import RankFailure, free_port, spawn, timeouts
from tests.reliability import _workers


def test_spawn_names_a_rank_killed_by_sigkill(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(RankFailure) as e:
        spawn(_workers.killed_rank, 2, "gloo", args=(1, str(tmp_path)))
    assert str(e.value) == "rank 1 of 2 was killed by SIGKILL"
    assert e.value.rank == 1 and e.value.signal_name == "SIGKILL" and e.value.exit_code == -9
    assert not (tmp_path / "survived0").exists()  # the survivor was stopped, not left waiting
    assert time.monotonic() - t0 < 60


def test_spawn_names_the_exception_of_a_failing_rank():
    with pytest.raises(RankFailure) as e:
        spawn(_workers.raising_rank, 2, "gloo", args=(0,))
    assert str(e.value) == "rank 0 of 2 failed: ValueError: bad shard on rank 0"
    assert e.value.exit_code == 1 and e.value.signal_name is None


def test_spawn_user_error_of_a_rank_is_its_one_line():
    with pytest.raises(UserError) as e:
        spawn(_workers.user_error_rank, 2, "gloo")
    assert e.value.line() == "error: data.batch_size: must be >= 1"


def test_timeouts_resolution(monkeypatch):
    monkeypatch.delenv("EFFRUN_RENDEZVOUS_TIMEOUT_S", raising=False)
    monkeypatch.delenv("EFFRUN_DIST_TIMEOUT_S", raising=False)
    assert timeouts() == (180.0, 1800.0)
    monkeypatch.setenv("EFFRUN_RENDEZVOUS_TIMEOUT_S", "7.5")
    assert timeouts() == (7.5, 1800.0) and timeouts(3, 60) == (3.0, 60.0)
    for bad in ("abc", "-1", "nan", "inf"):
        monkeypatch.setenv("EFFRUN_RENDEZVOUS_TIMEOUT_S", bad)
        with pytest.raises(UserError) as e:
            timeouts()
        assert e.value.line().startswith("error: EFFRUN_RENDEZVOUS_TIMEOUT_S: ")


LONE = textwrap.dedent("""
    import sys
    from effrun.errors import UserError
    from effrun.launch import init_process_group
    try:
        init_process_group(int(sys.argv[1]), 2, "gloo", rendezvous_timeout_s=2)
    except UserError as e:
        print(e.line(), file=sys.stderr)
        sys.exit(2)
""")


@pytest.mark.parametrize("rank,words", [(1, "rank 1 of 2 could not reach rank 0")])  # rank 0 alone: the CLI test
def test_a_peer_that_never_comes_fails_within_the_timeout(rank, words):
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-c", LONE, str(rank)], capture_output=True, text=True, env=env, timeout=120)
    took = time.monotonic() - t0
    assert p.returncode == 2, p.stderr
    assert p.stderr.count("\n") == 1 and words in p.stderr and p.stderr.startswith("error: parallelism.world_size:")
    assert took < 60  # torch's own default would wait 30 minutes


def test_cli_env_launcher_without_peers_is_one_line(effrun):
    r = effrun("train", "model=llama-tiny", "data=synthetic", "parallelism=env", "parallelism.world_size=2",
               "logger=quiet", "run.max_steps=2", check=False, timeout=120,
               env={"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port()),
                    "EFFRUN_RENDEZVOUS_TIMEOUT_S": "2"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "rank(s) 1 of 2 did not join within 2 s" in r.stderr


def test_cli_env_launcher_rank_without_rank0_is_one_line(effrun):
    """A non-zero rank whose rank 0 never starts: one line naming the store and the timeout (no C++
    retry traces), exit 2, within the rendezvous timeout."""
    r = effrun("train", "model=llama-tiny", "data=synthetic", "parallelism=env", "parallelism.world_size=2",
               "logger=quiet", "run.max_steps=2", check=False, timeout=60,
               env={"RANK": "1", "WORLD_SIZE": "2", "MASTER_PORT": str(free_port()),
                    "EFFRUN_RENDEZVOUS_TIMEOUT_S": "2"})
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().count("\n") == 0 and "rank 1 of 2 could not reach rank 0" in r.stderr, r.stderr
