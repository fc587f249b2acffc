"""The FPGA target (from `hardware=alveo-u280`: `hardware.extra`) and the resource budget that every
design of a kernel gets: MAC lanes, on-chip bytes, HBM bytes per cycle, stream widths.

All designs of one kernel (InTAR, dataflow, sequential) run at the same clock on the same budget,
so a ratio between them isolates the schedule.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from effrun.errors import UserError

BRAM36_BYTES = 36 * 1024 // 8     # one 36 Kb block RAM
URAM_BYTES = 288 * 1024 // 8      # one 288 Kb UltraRAM
LANE_MULTIPLE = 48                # lanes are a multiple of lcm(1..4, 8, 16, 3): every core count splits evenly

# U280 fallbacks, used only for keys that hardware.extra lacks (configs/hardware/alveo-u280.yaml
# carries them with their sources)
U280 = {"dsp": 9024, "bram36": 2016, "uram": 960, "lut": 1303680, "ff": 2607360, "hbm_pcs": 32,
        "hbm_pc_GBps": 14.375, "axi_bits": 512, "clock_mhz": 250, "slr": 3}


@dataclass(frozen=True)
class FpgaTarget:
    name: str
    clock_mhz: float
    dsp: int
    bram36: int
    uram: int
    lut: int
    ff: int
    hbm_gb: float
    hbm_GBps: float
    hbm_pcs: int
    hbm_pc_GBps: float
    axi_bits: int

    @property
    def onchip_bytes(self) -> int:
        return self.bram36 * BRAM36_BYTES + self.uram * URAM_BYTES

    @classmethod
    def from_hardware(cls, hw: Any) -> "FpgaTarget":
        def get(node, k, default=None):
            if node is None:
                return default
            if isinstance(node, Mapping):
                return node.get(k, default)
            return getattr(node, k, default)

        kind = get(hw, "kind", "fpga")
        if kind != "fpga":
            raise UserError(f"InTAR targets an FPGA; hardware={get(hw, 'name', '?')} is a {kind}", key="hardware",
                            choices=["alveo-u280"])
        extra = get(hw, "extra", {}) or {}
        x = {k: get(extra, k, v) for k, v in U280.items()}
        mem_gb = get(hw, "memory_gb", None) or 8
        bw = get(hw, "memory_bw_GBps", None) or x["hbm_pcs"] * x["hbm_pc_GBps"]
        t = cls(str(get(hw, "name", "alveo-u280")), float(x["clock_mhz"]), int(x["dsp"]), int(x["bram36"]),
                int(x["uram"]), int(x["lut"]), int(x["ff"]), float(mem_gb), float(bw), int(x["hbm_pcs"]),
                float(x["hbm_pc_GBps"]), int(x["axi_bits"]))
        for k in ("clock_mhz", "dsp", "bram36", "hbm_pcs", "hbm_pc_GBps"):
            if not getattr(t, k) > 0:
                raise UserError(f"hardware.extra.{k}={getattr(t, k)} must be > 0", key=f"hardware.extra.{k}")
        return t

    @classmethod
    def u280(cls) -> "FpgaTarget":
        return cls.from_hardware({"name": "alveo-u280", "kind": "fpga", "memory_gb": 8, "memory_bw_GBps": 460,
                                  "extra": dict(U280)})


def dsp_per_mac(act_bits: int, weight_bits: int) -> float:
    """DSP48E2 slices per MAC lane: one 27x18 multiplier per int16 MAC; two int8 (or int8 x int4)
    MACs share one DSP by packing two products on a shared operand (Xilinx WP486)."""
    return 1.0 if max(act_bits, weight_bits) > 8 else 0.5


@dataclass(frozen=True)
class Budget:
    """What every design of one kernel may use, in cycles at the target clock."""
    target: FpgaTarget
    act_bits: int
    weight_bits: int
    lanes: int                 # P: MAC lanes (II=1)
    dsp_per_mac: float
    onchip_bytes: int          # M_on: scratchpads + resident buffers
    hbm_bytes_per_cycle: int   # B
    stream_elems: int          # W_s: on-chip stream elements per cycle of all MAC arrays together
    sfu_elems: int             # elements per cycle of one special-function unit
    stage_overhead: int        # cycles per stage (pipeline fill + reconfiguration)
    granularity: int           # dataflow lane steps
    hbm_ports: int
    # bandwidth left to intermediates spilled to HBM (None: the whole pool); the artifact-style
    # sequential baseline moves every intermediate through one AXI port
    spill_bytes_per_cycle: Optional[int] = None

    @property
    def clock_hz(self) -> float:
        return self.target.clock_mhz * 1e6

    def us(self, cycles: float) -> float:
        return cycles / self.clock_hz * 1e6


def budget(target: FpgaTarget, node: Any, act_bits: int, weight_bits: int) -> Budget:
    dpm = dsp_per_mac(act_bits, weight_bits)
    lanes = int(target.dsp * node.dsp_fraction / dpm) // LANE_MULTIPLE * LANE_MULTIPLE
    if lanes < LANE_MULTIPLE:
        raise UserError(f"dsp_fraction={node.dsp_fraction} of {target.dsp} DSPs leaves fewer than "
                        f"{LANE_MULTIPLE} MAC lanes", key="technique.dsp_fraction")
    ports = min(int(node.hbm_ports), target.hbm_pcs)
    port_Bps = min(target.hbm_pc_GBps * 1e9, target.axi_bits / 8 * target.clock_mhz * 1e6)
    bpc = int(ports * port_Bps / (target.clock_mhz * 1e6))
    return Budget(target, act_bits, weight_bits, lanes, dpm, int(target.onchip_bytes * node.onchip_fraction),
                  max(1, bpc), int(node.stream_ports) * 512 // act_bits, max(1, int(node.sfu_bits) // act_bits),
                  int(node.stage_overhead_cycles), int(node.dataflow_granularity), ports)


def graph_bits(g) -> tuple:
    acts = {t.bits for t in g.tensors.values() if t.kind != "weight"}
    ws = {t.bits for t in g.tensors.values() if t.kind == "weight"} or {max(acts)}
    return max(acts), max(ws)


def make_budget(g, hardware: Optional[Any], node: Any) -> Budget:
    target = FpgaTarget.from_hardware(hardware) if hardware is not None else FpgaTarget.u280()
    a, w = graph_bits(g)
    return budget(target, node, a, w)
