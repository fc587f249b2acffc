"""Hydra habits work on `effrun` as in any Hydra app; resume reads the override's value; the CLI's
re-exec does not import from the working directory; wandb's mode follows WANDB_MODE."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY

EFFRUN = Path(sys.executable).parent / "effrun"  # the console script, as a user runs it


def run(*args, cwd, env=None, timeout=120):
    e = dict(os.environ, **(env or {}))
    return subprocess.run([str(EFFRUN), *args], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)


def test_shell_completion_install_prints_a_bash_script(tmp_path):
    p = run("-sc", "install=bash", cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert "hydra_bash_completion()" in p.stdout
    assert p.stdout.rstrip().endswith("complete -o nospace -o default -F hydra_bash_completion effrun")


@pytest.mark.parametrize("line, present, absent", [
    ("effrun t", ["train", "technique="], ["infer"]),
    ("effrun train model=llama-t", ["model=llama-tiny"], ["train", "model=mixtral-tiny"]),
    ("effrun -m train +technique=p", ["+technique=paca"], ["+technique=paca_schema", "+technique=lora"]),
    ("effrun infer run.max_s", ["run.max_steps=", "run.max_seq_len_search="], ["run.lr="]),
])
def test_completion_query_skips_the_command_word(tmp_path, line, present, absent):
    """What the installed script runs on TAB: `effrun -sc query=bash` with COMP_LINE set."""
    p = run("-sc", "query=bash", cwd=tmp_path, env={"COMP_LINE": line, "COMP_POINT": str(len(line))})
    assert p.returncode == 0, p.stderr
    words = p.stdout.split()
    assert all(w in words for w in present) and not any(w in words for w in absent), words


def test_cfg_and_info_work_without_a_mode(tmp_path):
    import yaml

    job = run("--cfg", "job", "model=llama-tiny", "run.lr=0.5", cwd=tmp_path)
    assert job.returncode == 0, job.stderr
    cfg = yaml.safe_load(job.stdout)
    assert cfg["mode"] == "train" and cfg["model"]["name"] == "llama-tiny" and cfg["run"]["lr"] == 0.5
    hyd = run("--cfg", "hydra", cwd=tmp_path)
    assert hyd.returncode == 0 and "hydra" in yaml.safe_load(hyd.stdout), hyd.stderr
    assert "sweep_summary" in yaml.safe_load(hyd.stdout)["hydra"]["callbacks"]
    both = run("infer", "--cfg", "all", "model=llama-tiny", cwd=tmp_path)
    assert both.returncode == 0 and yaml.safe_load(both.stdout)["mode"] == "infer", both.stderr
    info = run("--info", cwd=tmp_path)
    assert info.returncode == 0 and "Config search path" in info.stdout and "Defaults List" in info.stdout


@pytest.mark.parametrize("args, key", [
    (["--cfg", "jobs"], "--cfg"),
    (["--cfg", "job", "run.nope=1"], "run.nope"),
    (["--info", "nothing"], "--info"),
    (["-m", "--cfg", "job", "run.lr=1,2"], "-m"),
])
def test_bad_hydra_flags_one_line_exit_2(tmp_path, args, key):
    p = run(*args, cwd=tmp_path)
    err = [ln for ln in p.stderr.splitlines() if ln.startswith("error:")]
    assert p.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {key}:"), p.stderr
    assert "Traceback" not in p.stderr


def test_reexec_does_not_import_from_the_working_directory(tmp_path):
    """The allocator re-exec used to run `python -m effrun.cli`, which puts the cwd first on
    sys.path: an omegaconf.py there replaced the real package."""
    (tmp_path / "omegaconf.py").write_text("raise SystemExit('imported omegaconf.py from the working directory')\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "EFFRUN_NO_REEXEC"))}
    p = subprocess.run([str(EFFRUN), "train", "--cfg", "job", "model=llama-tiny"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "working directory" not in p.stderr and "name: llama-tiny" in p.stdout


def test_resume_reads_the_value_not_the_string(effrun, tmp_path):
    """run.resume=True used to start a fresh run: the front matched the string 'run.resume=true'."""
    common = [*TINY, "data=synthetic", "run.max_steps=3", "run.checkpoint_every=1"]
    root = tmp_path / "out"
    killed = effrun("train", *common, "run.crash_after_steps=1", root=root, check=False)
    assert killed.returncode != 0
    run_dir = killed.run_dirs()[-1]
    resumed = effrun("train", *common, "run.resume=True", root=root)
    assert resumed.run_dirs() == [run_dir]
    s = resumed.summary()
    assert s["status"] == "completed" and s["measured/resumed_from_step"] == 1


@pytest.mark.parametrize("spelling, want", [("True", True), ("YES", True), ("on", True), ("1", True),
                                             ("false", False), ("Off", False)])
def test_resume_value_is_the_typed_config_value(spelling, want, tmp_path, monkeypatch):
    """Any YAML-true spelling resumes: the front asks the composed (typed) config, not the string."""
    from effrun.config.compose import compose_checked
    from effrun import frontend

    kv = ["model=llama-tiny", f"run.resume={spelling}"]
    cfg = compose_checked(kv)
    assert cfg.run.resume is want
    looked = []
    monkeypatch.setattr(frontend, "_resume_dir", lambda kv: looked.append(kv) or str(tmp_path))
    assert frontend.run_dir_for(kv, cfg) == (str(tmp_path) if want else None)
    assert bool(looked) is want


@pytest.mark.parametrize("env, want", [
    ({}, "offline"),
    ({"WANDB_API_KEY": "x" * 40}, "online"),
    ({"WANDB_MODE": "disabled"}, "disabled"),
    ({"WANDB_MODE": "offline", "WANDB_API_KEY": "x" * 40}, "offline"),
])
def test_wandb_auto_mode_follows_wandb_mode(monkeypatch, env, want):
    from effrun.sinks.wandb_sink import resolve_mode

    for k in ("WANDB_MODE", "WANDB_API_KEY"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert resolve_mode("auto") == want
    assert resolve_mode("online") == "online"  # an explicit logger.wandb_mode wins


def test_config_name_from_a_user_folder_in_preflight_and_run(tmp_path):
    """--config-dir + --config-name: a primary config of the user's that extends effrun's; the
    pre-flight (validate) and the Hydra app (--cfg job) compose the same thing."""
    import yaml

    conf = tmp_path / "myconf"
    conf.mkdir()
    (conf / "exp.yaml").write_text("defaults:\n  - config\n  - _self_\nrun:\n  lr: 0.25\n")
    v = run("validate", "train", "model=llama-tiny", "--config-dir", "myconf", "--config-name", "exp", cwd=tmp_path)
    assert v.returncode == 0, v.stderr
    assert yaml.safe_load(v.stdout)["run"]["lr"] == 0.25
    c = run("--cfg", "job", "model=llama-tiny", "--config-dir", "myconf", "--config-name", "exp", cwd=tmp_path)
    assert c.returncode == 0 and yaml.safe_load(c.stdout)["run"]["lr"] == 0.25, c.stderr
    bad = run("validate", "train", "--config-dir", "myconf", "--config-name", "nope", cwd=tmp_path)
    err = [ln for ln in bad.stderr.splitlines() if ln.startswith("error:")]
    assert bad.returncode == 2 and len(err) == 1 and err[0].startswith("error: --config-name: no primary config 'nope'")
    assert "(valid: config, exp)" in err[0], err
    missing = run("validate", "train", "--config-dir", "no_such_dir", cwd=tmp_path)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --config-dir:"), missing.stderr
