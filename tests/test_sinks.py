"""Sinks: wandb offline files hold the logged rows; summary.json is written atomically."""
import json

from effrun.rundir import atomic_write_json
from effrun.sinks.wandb_reader import history
from tests.conftest import TINY


def test_wandb_offline_run_holds_logged_rows(effrun):
    r = effrun("train", *TINY, "data=synthetic", "logger=wandb", "logger.console=false")
    s = r.summary()
    files = list(r.run_dirs()[-1].rglob("*.wandb"))
    assert len(files) == 1 and s["run_id"] in files[0].name
    rows = history(files[0])
    jsonl = r.metrics()
    assert [row["_step"] for row in rows] == [row["step"] for row in jsonl]
    assert [row["loss"] for row in rows] == [row["loss"] for row in jsonl]


def test_atomic_write_replaces_whole_file(tmp_path):
    f = tmp_path / "summary.json"
    atomic_write_json(f, {"a": 1})
    atomic_write_json(f, {"b": 2})
    assert json.loads(f.read_text()) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]
