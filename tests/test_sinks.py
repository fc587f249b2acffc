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


def test_wandb_runs_carry_group_job_type_name_and_tags(effrun):
    """A sweep is not a flat list of ids: one group per sweep, the mode as job_type, a name made of
    technique, model and the overrides the sweep varies, and tags."""
    from effrun.sinks.wandb_reader import run_info

    r = effrun("-m", "train", *TINY, "data=synthetic", "logger=wandb", "logger.console=false", "run.max_steps=1",
               "+technique=lora", "run.lr=0.001,0.003")
    infos = []
    for d in r.run_dirs():
        files = list(d.rglob("*.wandb"))
        assert len(files) == 1
        infos.append(run_info(files[0]))
    sweep_dir = r.run_dirs()[0].parent
    assert {i["group"] for i in infos} == {"/".join(sweep_dir.parts[-2:])}
    assert all(i["job_type"] == "train" for i in infos)
    assert sorted(i["name"] for i in infos) == ["lora llama-tiny lr=0.001", "lora llama-tiny lr=0.003"]
    assert all(set(i["tags"]) == {"train", "lora", "llama-tiny", "cpu", "sweep"} for i in infos)


def test_single_run_identity_names_the_overrides_that_differ(tmp_path, monkeypatch):
    """Outside a sweep: no group, no sweep tag; the name lists the task overrides (a key given twice
    once, with its last value), without logger/hydra/resume noise; WANDB_* variables win."""
    import yaml

    from effrun.sinks.wandb_sink import run_identity

    task = ["mode=train", "model=llama-tiny", "data.seq_len=32", "run.max_steps=3", "logger=wandb",
            "+technique=paca", "run.max_steps=1", "run.resume=true"]
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": {"mode": "RUN",
                                                                          "overrides": {"task": task}}}))
    config = {"mode": "train", "model": {"name": "llama-tiny"}, "hardware": {"name": "cpu"},
              "technique": {"name": "paca"}, "technique2": None}
    for k in ("WANDB_RUN_GROUP", "WANDB_JOB_TYPE", "WANDB_NAME", "WANDB_TAGS"):
        monkeypatch.delenv(k, raising=False)
    got = run_identity(tmp_path, config)
    assert got == {"group": None, "job_type": "train", "name": "paca llama-tiny data.seq_len=32 max_steps=1",
                   "tags": ["train", "paca", "llama-tiny", "cpu"]}
    config["run"] = {"name": "my run"}  # run.name, when set, is the name
    assert run_identity(tmp_path, config)["name"] == "my run"
    monkeypatch.setenv("WANDB_NAME", "mine")
    assert run_identity(tmp_path, config)["name"] is None  # wandb takes its own variable
