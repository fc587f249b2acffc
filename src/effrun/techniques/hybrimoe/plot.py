"""Per-layer CPU / GPU / PCIe timeline of the prefill and first decode forward (PNG)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

COLORS = {"gpu": "#4c72b0", "cpu": "#dd8452", "link": "#55a868"}


def timeline_png(sims: Dict[str, "object"], path, title: str = "",
                 policies=("hybrimoe", "ktransformers")) -> Optional[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pols = [p for p in policies if p in sims]
    if not pols:
        return None
    fig, axes = plt.subplots(len(pols), 2, figsize=(13, 2.2 + 1.3 * len(pols)), squeeze=False)
    for r, pol in enumerate(pols):
        ev = sims[pol].stats.events
        for cidx, (fwd, name) in enumerate(((0, "prefill"), (1, "first decode token"))):
            ax = axes[r][cidx]
            rows = ev.get(fwd, [])
            if not rows:
                ax.set_axis_off()
                continue
            t_min = min(a for _, _, _, a, _ in rows)
            lanes = {"gpu": 2, "cpu": 1, "link": 0}
            for layer, res, label, a, b in rows:
                color = COLORS[res] if label not in ("attn", "dense") else "#999999"
                ax.barh(lanes[res], (b - a) * 1e3, left=(a - t_min) * 1e3, height=0.6, color=color,
                        edgecolor="white", linewidth=0.3)
            ax.set_yticks([0, 1, 2], ["PCIe", "CPU", "GPU"])
            ax.set_xlabel("ms")
            ax.set_title(f"{pol}: {name}", fontsize=9)
    fig.suptitle(title + "  (grey: attention/dense on GPU; projected timings)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return str(path)
