"""Pre-flight checks that consult plugins, the machine and the files a run will read (no torch import):
value ranges of every typed node (effrun.config.ranges), technique checks, hardware presence,
assets, and that text data is text."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from effrun.config.compose import technique_nodes
from effrun.errors import UserError


def cuda_present() -> bool:
    return os.path.exists("/dev/nvidia0") or shutil.which("nvidia-smi") is not None


# headless browsers a `browser` target can drive (Debian's chromium binary first: the /usr/bin wrapper
# sources extension and API-key settings)
BROWSER_CANDIDATES = ("/usr/lib/chromium/chromium", "chromium", "chromium-browser")
BROWSER_SETUP = "install it with `bash scripts/setup/browser.sh` (apt-get install -y chromium wabt)"


def browser_present() -> bool:
    for c in BROWSER_CANDIDATES:
        p = c if os.path.isabs(c) else shutil.which(c)
        if p and os.path.isfile(p) and os.access(p, os.X_OK):
            return True
    return False


def hardware_present(kind: str) -> bool:
    if kind == "cpu":
        return True
    if kind == "cuda":
        return cuda_present()
    if kind == "browser":
        return browser_present()
    return False  # rocm, hpu, fpga: not runnable targets on these machines


TEXT_PROBE_BYTES = 1 << 16


def check_text_file(path: Path, key: str = "data.path") -> None:
    """UserError unless the file's first 64 KiB are UTF-8 text without NUL bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(TEXT_PROBE_BYTES)
    except OSError as e:
        raise UserError(f"cannot read {str(path)!r}: {e.strerror}", key=key) from None
    nul = head.find(b"\0")
    if nul >= 0:
        raise UserError(f"{str(path)!r} is not a text file (a NUL byte at offset {nul}); give a UTF-8 text "
                        "file or a folder of .txt files", key=key)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        if e.start < len(head) - 3 or len(head) < TEXT_PROBE_BYTES:  # not just a character cut at the probe's end
            raise UserError(f"{str(path)!r} is not UTF-8 text (byte {e.start}: {head[e.start:e.start + 1]!r}); "
                            "give a UTF-8 text file or a folder of .txt files", key=key) from None


def check_text_data(cfg: DictConfig) -> None:
    """data.kind=text with data.path: the path exists and every file it names is text."""
    d = cfg.data
    if d.get("kind") != "text":
        return
    if OmegaConf.is_missing(d, "path") or (d.path is None and d.get("name") != "shakespeare"):
        raise UserError("text data needs data.path: a UTF-8 text file or a folder of .txt files", key="data.path")
    if d.path is None:
        return  # the shakespeare corpus: effrun's own asset (data.py checks it is fetched)
    p = Path(str(d.path)).expanduser()
    if not p.exists():
        raise UserError(f"no such file or directory: {p}", key="data.path")
    files = sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if not files:
        raise UserError(f"{p} holds no .txt files", key="data.path")
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is not a regular file", key="data.path")
        check_text_file(f)


def check_resolves(cfg: DictConfig) -> None:
    """Every interpolation resolves (`${run.nope}`, `${oc.env:UNSET}` fail here with one line, not in
    the middle of a run)."""
    from omegaconf.errors import OmegaConfBaseException

    for k in cfg.keys():
        if k == "hydra":
            continue
        try:
            node = cfg._get_node(k)
            if isinstance(node, DictConfig) or OmegaConf.is_list(node):
                OmegaConf.to_container(node, resolve=True)
            else:
                cfg[k]
        except OmegaConfBaseException as e:
            key = getattr(e, "full_key", None) or str(k)
            first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
            raise UserError(f"cannot resolve: {first}", key=key) from None


def validate_plugins(cfg: DictConfig) -> None:
    from effrun import registry
    from effrun.config.ranges import check_ranges

    check_resolves(cfg)
    check_ranges(cfg)
    if cfg.mode != "plan":
        check_text_data(cfg)
    specs = []
    for key, node in technique_nodes(cfg).items():
        spec = registry.get(node.name)
        if spec.check is not None:
            spec.check(cfg, node)
        specs.append(spec)
    projecting = cfg.mode == "plan" or any(s.hardware == "project" for s in specs)
    if not projecting and cfg.hardware.kind == "browser" and not browser_present():
        raise UserError(f"target {cfg.hardware.name!r} needs Chromium, which is not installed; {BROWSER_SETUP}",
                        key="hardware")
    if not projecting and not hardware_present(cfg.hardware.kind):
        from effrun.config.paths import group_options

        raise UserError(f"target {cfg.hardware.name!r} ({cfg.hardware.kind}) is not present on this "
                        "machine; run on a present target or project onto it with mode=plan",
                        key="hardware", choices=[h for h in group_options("hardware")
                                                 if h == "cpu" or (h and cuda_present())])
    model_free = any(not s.families for s in specs)  # a target runner or plan: no torch model is built
    if cfg.model.source == "asset" and not projecting and not model_free:
        from effrun.assets import asset_path

        asset_path(cfg.model.asset)  # raises UserError with the fix if missing
