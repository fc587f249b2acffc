"""Hydra's own launcher conformance suite (hydra.test_utils.launcher_common_tests) against effrun's
Slurm launcher plugin on the local cluster (scripts/slurm-up.sh), as Hydra's plugins run it."""
from __future__ import annotations

import pytest
from hydra.test_utils.launcher_common_tests import IntegrationTestSuite, LauncherTestSuite

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]

# the one-node debug partition: 1 CPU and 1 GB per job, short limits
QUEUE = {"partition": "debug", "cpus_per_task": 1, "mem_gb": 1, "timeout_min": 5, "signal_delay_s": 10,
         "gpus_per_node": None}


@pytest.mark.parametrize("launcher_name, overrides",
                         [("effrun_slurm", [f"hydra.launcher.{k}={'null' if v is None else v}"
                                            for k, v in QUEUE.items()])])
class TestEffrunSlurmLauncher(LauncherTestSuite):
    pass


@pytest.mark.parametrize("task_launcher_cfg, extra_flags", [(
    {"defaults": [{"override hydra/launcher": "effrun_slurm"}, {"override hydra/hydra_logging": "disabled"},
                  {"override hydra/job_logging": "disabled"}],
     "hydra": {"launcher": QUEUE}},
    ["-m"])])
class TestEffrunSlurmLauncherIntegration(IntegrationTestSuite):
    pass
