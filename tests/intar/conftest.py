import pytest
import yaml
from pathlib import Path

from effrun.techniques.intar import KERNEL_NAMES, IntarConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def u280():
    d = yaml.safe_load((ROOT / "configs" / "hardware" / "alveo-u280.yaml").read_text())
    d.pop("defaults", None)
    return d


@pytest.fixture(scope="session")
def fast_node():
    """Short solves, three core counts (1, a paper-like 3, and the dataflow granularity 16, which
    holds the dataflow baseline), so the full-size schedules of all kernels take seconds."""
    return IntarConfig(cores=[1, 3, 16], solver_time_s=2.0, csim=False)


@pytest.fixture(scope="session")
def plans(u280, fast_node):
    from effrun.techniques.intar.kernels import kernel
    from effrun.techniques.intar.plan import plan_kernel
    return {n: plan_kernel(kernel(n), u280, fast_node, log=lambda *_: None) for n in KERNEL_NAMES}
