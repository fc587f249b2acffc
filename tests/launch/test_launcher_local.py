"""Hydra's own launcher conformance suite (hydra.test_utils.launcher_common_tests), as Hydra's
plugins run it, against effrun's submitit launcher on the local executor (no cluster needed; the
same suite, with Hydra's integration suite, against the local Slurm cluster is
tests/slurm/test_launcher_suite.py)."""
from __future__ import annotations

import pytest
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
from hydra.test_utils.launcher_common_tests import LauncherTestSuite

from hydra_plugins.effrun_launcher.launcher import EffrunLocalLauncher, EffrunSlurmLauncher


@pytest.mark.parametrize("cls", [EffrunLocalLauncher, EffrunSlurmLauncher])
def test_discovered_by_hydra(cls):
    assert cls.__name__ in [x.__name__ for x in Plugins.instance().discover(Launcher)]


@pytest.mark.parametrize("launcher_name, overrides", [("effrun_submitit_local", ["hydra.launcher.timeout_min=2"])])
class TestEffrunLocalLauncher(LauncherTestSuite):
    pass

