"""A wheel built from this tree, installed into a fresh venv, works outside the checkout: it finds its
own configs and recipes (shipped inside the wheel, read through pkg://effrun._configs), its Hydra
plugins, and a user's own config folder (--config-dir, hydra.searchpath)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MY_MODEL = """# my own tiny model
defaults:
  - llama-tiny
  - _self_
name: my-tiny
description: my own tiny llama (3 layers)
hf_config:
  num_hidden_layers: 3
"""


def _run(cmd, cwd, env=None, timeout=300):
    e = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "EFFRUN_CONFIG_DIR", "VIRTUAL_ENV")}
    e.update(env or {})
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    return p


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """(venv python, venv effrun, a folder outside the checkout holding myconf/, the wheel)."""
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools in this venv "
                        "(pip install setuptools; Python >= 3.12 venvs come without it)")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # build from a copy: the build writes build/ next to setup.py
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "*.pyc")
    for name in ("src", "configs", "recipes"):
        shutil.copytree(ROOT / name, src / name, symlinks=True, ignore=ignore)
    p = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
              src], cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next((tmp / "dist").glob("effrun-*.whl"))
    # a fresh venv without effrun; the dependencies come from this venv's site-packages (a path in a
    # .pth file: the editable effrun of this venv is not activated from there)
    venv = tmp / "venv"
    p = _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp)
    assert p.returncode == 0, p.stderr
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], cwd=tmp).stdout.strip()
    Path(site, "_deps_from_project_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    p = _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], cwd=tmp)
    assert p.returncode == 0, p.stderr[-3000:]
    away = tmp / "elsewhere"
    (away / "myconf" / "model").mkdir(parents=True)
    (away / "myconf" / "model" / "my-tiny.yaml").write_text(MY_MODEL)
    return py, venv / "bin" / "effrun", away, wheel


def test_wheel_ships_every_config_and_recipe_and_the_plugins(installed):
    *_, wheel = installed
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"effrun/_configs/{p.relative_to(ROOT / 'configs')}" for p in (ROOT / "configs").rglob("*.yaml")
            if "recipe" not in p.relative_to(ROOT / "configs").parts}
    want |= {f"effrun/_configs/recipe/{p.relative_to(ROOT / 'recipes')}" for p in (ROOT / "recipes").rglob("*.yaml")}
    # files techniques read at run time beside their code (an HLS header, a browser page)
    want |= {str(p.relative_to(ROOT / "src")) for ext in ("*.h", "*.html", "*.js") for p in (ROOT / "src").rglob(ext)}
    assert len(want) > 40 and want <= names, sorted(want - names)
    assert "effrun/_configs/__init__.py" in names  # Hydra's pkg:// source needs a package
    assert "hydra_plugins/effrun_launcher/launcher.py" in names and "hydra_plugins/__init__.py" not in names


def test_installed_effrun_runs_outside_the_checkout(installed):
    py, effrun, away, _ = installed
    p = _run([py, "-c", "import effrun, hydra_plugins.effrun_launcher as h; print(effrun.__file__); print(h.__file__)"],
             cwd=away)
    assert p.returncode == 0 and str(ROOT) not in p.stdout and "site-packages" in p.stdout, p.stdout + p.stderr
    # ls: the packaged groups, recipes and the user's own model
    p = _run([effrun, "ls", "model", "--config-dir", "myconf"], cwd=away)
    assert p.returncode == 0, p.stderr
    assert "my-tiny" in p.stdout and "my own tiny llama" in p.stdout and "llama-tiny" in p.stdout
    p = _run([effrun, "ls", "recipe"], cwd=away)
    assert p.returncode == 0 and "paca_vs_lora" in p.stdout and "my-tiny" not in p.stdout, p.stdout + p.stderr
    # validate composes through the same search path as a run: --config-dir and hydra.searchpath
    for extra in (["--config-dir", "myconf"], [f"hydra.searchpath=[file://{away / 'myconf'}]"]):
        p = _run([effrun, "validate", "train", "model=my-tiny", *extra], cwd=away)
        assert p.returncode == 0, p.stderr
        assert "name: my-tiny" in p.stdout and "num_hidden_layers: 3" in p.stdout and "# valid" in p.stderr
    # without the user's folder the option does not exist: one line, exit 2, listing the packaged ones
    p = _run([effrun, "validate", "train", "model=my-tiny"], cwd=away)
    assert p.returncode == 2 and p.stderr.startswith("error: model: unknown option 'my-tiny' (valid: "), p.stderr
    assert "llama-tiny" in p.stderr and "Traceback" not in p.stderr
    # the Hydra app itself reads the packaged tree through pkg:// (and the user's folder on top)
    p = _run([effrun, "--info", "searchpath", "--config-dir", "myconf"], cwd=away)
    assert p.returncode == 0, p.stderr
    assert "pkg://effrun._configs" in p.stdout and f"file://{away / 'myconf'}" in p.stdout
