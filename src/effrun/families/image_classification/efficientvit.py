"""EfficientViT M0..M5 (Liu et al., "EfficientViT: Memory Efficient Vision Transformer with Cascaded
Group Attention", CVPR 2023), written for effrun from the paper and NOTES section 2.

Layout: every tensor between layers is NHWC ([B, H, W, C], contiguous). Every convolution (1x1,
depthwise, strided) runs through oneDNN on the channels-last view `x.permute(0, 3, 1, 2)` (no copy)
and its channels-last output is viewed back as NHWC; the attention's q/k/v are plain
`[tokens, dim]` views, and a window partition is one reshape. The module tree is our own; `timm_to_ours` / `load_timm_state_dict` map
timm's `efficientvit_msra` key names onto it (timm is never imported by the model).

Inference as users run it: `optimize_for_inference(model)` puts the model in eval mode, folds every
BatchNorm into the preceding convolution / linear (Conv-BN fusion), and stores each attention's
relative-position bias expanded to [heads, N, N] as a buffer (cached attention biases).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from effrun.errors import UserError

PATCH = 16  # the stem's four stride-2 convolutions


@dataclass(frozen=True)
class EfficientViTConfig:
    name: str
    embed_dims: Tuple[int, int, int]
    depths: Tuple[int, int, int]
    num_heads: Tuple[int, int, int]
    kernels: Tuple[int, int, int, int]  # depthwise kernel on q, per head (head i uses kernels[i])
    key_dim: int = 16
    window: int = 7
    # the paper's Table (ImageNet-1k, 224x224): params (M), FLOPs (M; the paper's FLOPs are MACs),
    # top-1 (%), V100 images/s (batch 2048, autocast); CPU/ONNX images/s where NOTES has them
    paper_params_m: float = 0.0
    paper_macs_m: float = 0.0
    paper_top1: float = 0.0
    paper_gpu_ips: float = 0.0
    paper_cpu_ips: Optional[float] = None
    paper_onnx_ips: Optional[float] = None


CONFIGS: Dict[str, EfficientViTConfig] = {c.name: c for c in (
    EfficientViTConfig("efficientvit-m0", (64, 128, 192), (1, 2, 3), (4, 4, 4), (5, 5, 5, 5),
                       paper_params_m=2.3, paper_macs_m=79, paper_top1=63.2, paper_gpu_ips=27644,
                       paper_cpu_ips=228.4, paper_onnx_ips=340.1),
    EfficientViTConfig("efficientvit-m1", (128, 144, 192), (1, 2, 3), (2, 3, 3), (7, 5, 3, 3),
                       paper_params_m=3.0, paper_macs_m=167, paper_top1=68.4, paper_gpu_ips=20093),
    EfficientViTConfig("efficientvit-m2", (128, 192, 224), (1, 2, 3), (4, 3, 2), (7, 5, 3, 3),
                       paper_params_m=4.2, paper_macs_m=201, paper_top1=70.8, paper_gpu_ips=18218),
    EfficientViTConfig("efficientvit-m3", (128, 240, 320), (1, 2, 3), (4, 3, 4), (5, 5, 5, 5),
                       paper_params_m=6.9, paper_macs_m=263, paper_top1=73.4, paper_gpu_ips=16644),
    EfficientViTConfig("efficientvit-m4", (128, 256, 384), (1, 2, 3), (4, 4, 4), (7, 5, 3, 3),
                       paper_params_m=8.8, paper_macs_m=299, paper_top1=74.3, paper_gpu_ips=15914),
    EfficientViTConfig("efficientvit-m5", (192, 288, 384), (1, 3, 4), (3, 3, 4), (7, 5, 3, 3),
                       paper_params_m=12.4, paper_macs_m=522, paper_top1=77.1, paper_gpu_ips=10621),
)}
VARIANTS = tuple(CONFIGS)
# "auto": explicit matmul + softmax on CPU (measured faster than the fused SDPA kernel for 49-token
# windows, 1 thread), scaled_dot_product_attention elsewhere (fused GPU kernels)
ATTN_IMPLS = ("auto", "sdpa", "matmul")


# ----------------------------------------------------------------------------------------------
# layers (NHWC in, NHWC out)

class ConvBN(nn.Module):
    """k x k convolution without bias followed by BatchNorm. `fuse()` folds the BN into the conv."""

    def __init__(self, cin: int, cout: int, k: int = 1, stride: int = 1, groups: int = 1,
                 bn_init: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn: Optional[nn.BatchNorm2d] = nn.BatchNorm2d(cout)
        nn.init.constant_(self.bn.weight, bn_init)
        nn.init.constant_(self.bn.bias, 0.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC tensor -> channels-last NCHW view (no copy) -> oneDNN convolution -> NHWC view. For
        # 1x1 convolutions this measured ~2x faster than F.linear (MKL GEMM) on the same data.
        y = self.conv(x.permute(0, 3, 1, 2))
        if self.bn is not None:
            y = self.bn(y)
        return y.permute(0, 2, 3, 1)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.bn is None:
            return
        bn, conv = self.bn, self.conv
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        conv.weight.mul_(scale.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(bn.bias - bn.running_mean * scale)
        self.bn = None


class FFN(nn.Module):
    """1x1 expand (x2) -> ReLU -> 1x1 project (its BN starts at zero: the residual starts as identity)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.pw1 = ConvBN(dim, hidden)
        self.pw2 = ConvBN(hidden, dim, bn_init=0.0)

    def forward(self, x):
        return self.pw2(torch.relu(self.pw1(x)))


def make_divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


class SqueezeExcite(nn.Module):
    """Global mean -> 1x1 (bias) -> ReLU -> 1x1 (bias) -> sigmoid gate; reduction 0.25 rounded to 8."""

    def __init__(self, dim: int, ratio: float = 0.25):
        super().__init__()
        rd = make_divisible(dim * ratio)
        self.fc1 = nn.Linear(dim, rd)
        self.fc2 = nn.Linear(rd, dim)

    def forward(self, x):
        s = x.mean((1, 2))
        s = torch.sigmoid(self.fc2(torch.relu(self.fc1(s))))
        return x * s[:, None, None, :]


class PatchMerging(nn.Module):
    """1x1 (x4) -> ReLU -> DW 3x3 stride 2 -> ReLU -> SE -> 1x1 to the next width."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        hid = 4 * dim
        self.conv1 = ConvBN(dim, hid)
        self.conv2 = ConvBN(hid, hid, 3, 2, groups=hid)
        self.se = SqueezeExcite(hid)
        self.conv3 = ConvBN(hid, out_dim)

    def forward(self, x):
        x = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return self.conv3(self.se(x))


def relative_position_index(res: int) -> torch.Tensor:
    """LeViT-style bias index of every (query, key) pair in a res x res window: offsets (|dy|, |dx|)
    numbered in order of first appearance when pairs are enumerated row-major, i.e. |dy|*res + |dx|."""
    ys, xs = torch.meshgrid(torch.arange(res), torch.arange(res), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    return (ys[:, None] - ys[None, :]).abs() * res + (xs[:, None] - xs[None, :]).abs()


class CascadedGroupAttention(nn.Module):
    """Cascaded group attention on one window (NHWC, H = W = `resolution`).

    Head i sees chunk i of the channels plus the output of head i-1; its own 1x1 Conv-BN gives q, k
    (key_dim each) and v (dim/heads); q alone goes through a depthwise Conv-BN (kernel kernels[i]);
    softmax(q k^T / sqrt(key_dim) + bias_i) v; the heads are concatenated -> ReLU -> 1x1 Conv-BN."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int,
                 kernels: Sequence[int], attn_impl: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"width {dim} is not divisible by {num_heads} heads", key="model.num_heads")
        self.num_heads, self.key_dim, self.val_dim = num_heads, key_dim, dim // num_heads
        self.resolution = resolution
        self.scale = key_dim ** -0.5
        self.attn_impl = attn_impl
        self.qkv = nn.ModuleList(ConvBN(dim // num_heads, 2 * key_dim + self.val_dim) for _ in range(num_heads))
        self.dw = nn.ModuleList(ConvBN(key_dim, key_dim, kernels[i], groups=key_dim) for i in range(num_heads))
        self.proj = ConvBN(self.val_dim * num_heads, dim, bn_init=0.0)
        self.attention_biases = nn.Parameter(torch.zeros(num_heads, resolution * resolution))
        self.register_buffer("bias_idx", relative_position_index(resolution), persistent=False)
        self.register_buffer("bias_cache", None, persistent=False)  # [heads, N, N], set by cache_bias()
        self._eval_cache: Optional[Tuple[int, torch.Tensor]] = None

    def expanded_bias(self) -> torch.Tensor:
        """[heads, N, N]. Training: gathered every call (autograd). Eval: the frozen buffer once
        `cache_bias()` ran (fused inference), else a copy cached until the parameter changes."""
        if self.bias_cache is not None and not self.training:
            return self.bias_cache
        if self.training or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return self.attention_biases[:, self.bias_idx]
        version = self.attention_biases._version
        if self._eval_cache is None or self._eval_cache[0] != version \
                or self._eval_cache[1].device != self.attention_biases.device:
            self._eval_cache = (version, self.attention_biases[:, self.bias_idx].detach())
        return self._eval_cache[1]

    @torch.no_grad()
    def cache_bias(self) -> None:
        self.bias_cache = self.attention_biases[:, self.bias_idx].detach().clone()

    def train(self, mode: bool = True):
        if mode:
            self.bias_cache = None  # a trained bias must not be shadowed by a stale copy
        self._eval_cache = None
        return super().train(mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        n, kd, d = H * W, self.key_dim, self.val_dim
        bias = self.expanded_bias()
        chunks = x.chunk(self.num_heads, dim=-1)
        outs: List[torch.Tensor] = []
        feat = chunks[0]
        for i in range(self.num_heads):
            if i > 0:
                feat = feat + chunks[i]  # the cascade: previous head's output refines this head's input
            q, k, v = self.qkv[i](feat).split([kd, kd, d], dim=-1)
            q = self.dw[i](q)
            q, k, v = q.reshape(B, n, kd), k.reshape(B, n, kd), v.reshape(B, n, d)
            b = bias[i]
            impl = self.attn_impl if self.attn_impl != "auto" else ("matmul" if x.device.type == "cpu" else "sdpa")
            if impl == "sdpa":
                o = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1),
                                                   attn_mask=b.to(q.dtype), scale=self.scale).squeeze(1)
            else:
                a = torch.baddbmm(b.to(q.dtype).expand(B, n, n), q, k.transpose(1, 2), alpha=self.scale)
                o = torch.bmm(a.softmax(dim=-1), v)
            feat = o.view(B, H, W, d)
            outs.append(feat)
        return self.proj(torch.relu(torch.cat(outs, dim=-1)))


class LocalWindowAttention(nn.Module):
    """CGA inside non-overlapping `window` x `window` windows; a feature map no larger than the
    window is attended as a whole (the paper's last stage: 4x4 map, window 7). Maps that do not
    divide by the window are zero-padded at the bottom/right and cropped after (as the original)."""

    def __init__(self, dim: int, key_dim: int, num_heads: int, resolution: int, window: int,
                 kernels: Sequence[int], attn_impl: str = "auto"):
        super().__init__()
        self.resolution, self.window = resolution, window
        self.attn = CascadedGroupAttention(dim, key_dim, num_heads, min(window, resolution), kernels, attn_impl)

    def forward(self, x):
        B, H, W, C = x.shape
        ws = self.window
        if H <= ws and W <= ws:
            return self.attn(x)
        pad_b, pad_r = (ws - H % ws) % ws, (ws - W % ws) % ws
        if pad_b or pad_r:
            x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
        pH, pW = H + pad_b, W + pad_r
        nh, nw = pH // ws, pW // ws
        x = x.view(B, nh, ws, nw, ws, C).transpose(2, 3).reshape(B * nh * nw, ws, ws, C)
        x = self.attn(x)
        x = x.view(B, nh, nw, ws, ws, C).transpose(2, 3).reshape(B, pH, pW, C)
        if pad_b or pad_r:
            x = x[:, :H, :W].contiguous()
        return x


class SandwichBlock(nn.Module):
    """Res(DW 3x3) -> Res(FFN) -> Res(local-window CGA) -> Res(DW 3x3) -> Res(FFN)."""

    def __init__(self, dim, key_dim, num_heads, resolution, window, kernels, attn_impl="auto"):
        super().__init__()
        self.dw0 = ConvBN(dim, dim, 3, groups=dim, bn_init=0.0)
        self.ffn0 = FFN(dim, 2 * dim)
        self.attn = LocalWindowAttention(dim, key_dim, num_heads, resolution, window, kernels, attn_impl)
        self.dw1 = ConvBN(dim, dim, 3, groups=dim, bn_init=0.0)
        self.ffn1 = FFN(dim, 2 * dim)

    def forward(self, x):
        x = x + self.dw0(x)
        x = x + self.ffn0(x)
        x = x + self.attn(x)
        x = x + self.dw1(x)
        return x + self.ffn1(x)


class Downsample(nn.Module):
    """Res(DW) -> Res(FFN) -> patch merging (stride 2, new width) -> Res(DW) -> Res(FFN)."""

    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dw0 = ConvBN(dim, dim, 3, groups=dim)
        self.ffn0 = FFN(dim, 2 * dim)
        self.merge = PatchMerging(dim, out_dim)
        self.dw1 = ConvBN(out_dim, out_dim, 3, groups=out_dim)
        self.ffn1 = FFN(out_dim, 2 * out_dim)

    def forward(self, x):
        x = x + self.dw0(x)
        x = x + self.ffn0(x)
        x = self.merge(x)
        x = x + self.dw1(x)
        return x + self.ffn1(x)


class Stage(nn.Module):
    def __init__(self, in_dim, dim, depth, key_dim, num_heads, resolution, window, kernels,
                 downsample: bool, attn_impl="auto"):
        super().__init__()
        self.down = Downsample(in_dim, dim) if downsample else None
        self.resolution = (resolution - 1) // 2 + 1 if downsample else resolution
        self.blocks = nn.ModuleList(
            SandwichBlock(dim, key_dim, num_heads, self.resolution, window, kernels, attn_impl)
            for _ in range(depth))

    def forward(self, x):
        if self.down is not None:
            x = self.down(x)
        for blk in self.blocks:
            x = blk(x)
        return x


class ClassifierHead(nn.Module):
    """BatchNorm1d -> Linear on the globally averaged features (BN folds into the linear when fused)."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__()
        self.bn: Optional[nn.BatchNorm1d] = nn.BatchNorm1d(dim)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x):
        if self.bn is not None:
            x = self.bn(x)
        return self.linear(x)

    @torch.no_grad()
    def fuse(self) -> None:
        if self.bn is None:
            return
        bn, lin = self.bn, self.linear
        scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * scale
        lin.bias.add_(lin.weight @ shift)
        lin.weight.mul_(scale[None, :])
        self.bn = None


class EfficientViT(nn.Module):
    def __init__(self, cfg: EfficientViTConfig, num_classes: int = 1000, in_chans: int = 3,
                 img_size: int = 224, window: Optional[int] = None, attn_impl: str = "auto"):
        super().__init__()
        window = cfg.window if window is None else window
        check_geometry(cfg, img_size, window)
        if attn_impl not in ATTN_IMPLS:
            raise UserError(f"unknown attention implementation {attn_impl!r}", key="model.attn_impl",
                            choices=ATTN_IMPLS)
        self.cfg, self.img_size, self.window, self.num_classes = cfg, img_size, window, num_classes
        c0 = cfg.embed_dims[0]
        self.stem = nn.ModuleList([ConvBN(in_chans, c0 // 8, 3, 2), ConvBN(c0 // 8, c0 // 4, 3, 2),
                                   ConvBN(c0 // 4, c0 // 2, 3, 2), ConvBN(c0 // 2, c0, 3, 2)])
        res = img_size // PATCH
        stages = []
        for i, (dim, depth, heads) in enumerate(zip(cfg.embed_dims, cfg.depths, cfg.num_heads)):
            st = Stage(cfg.embed_dims[max(i - 1, 0)], dim, depth, cfg.key_dim, heads, res, window,
                       cfg.kernels, downsample=i > 0, attn_impl=attn_impl)
            res = st.resolution
            stages.append(st)
        self.stages = nn.ModuleList(stages)
        self.head = ClassifierHead(cfg.embed_dims[-1], num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] image -> [B, h, w, C] features (NHWC)."""
        x = x.contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
        for i, conv in enumerate(self.stem):
            x = conv(x)
            if i < 3:
                x = torch.relu(x)
        for st in self.stages:
            x = st(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x).mean((1, 2)))

    def set_attn_impl(self, impl: str) -> "EfficientViT":
        if impl not in ATTN_IMPLS:
            raise UserError(f"unknown attention implementation {impl!r}", key="model.attn_impl", choices=ATTN_IMPLS)
        for m in self.modules():
            if isinstance(m, CascadedGroupAttention):
                m.attn_impl = impl
        return self


def check_geometry(cfg: EfficientViTConfig, img_size: int, window: int) -> None:
    if not isinstance(img_size, int) or img_size < PATCH or img_size % PATCH:
        raise UserError(f"image size {img_size} is not divisible by the stem's patching ({PATCH}: four "
                        f"stride-2 convolutions); use a multiple of {PATCH} such as 224",
                        key="model.img_size")
    res0 = img_size // PATCH
    if window < 1 or window > res0:
        raise UserError(f"window {window} is larger than the first stage's {res0}x{res0} feature map at "
                        f"img_size={img_size}; valid: 1..{res0} (or img_size >= {PATCH * window})",
                        key="model.window_size")


def model_names() -> Tuple[str, ...]:
    return VARIANTS


def get_config(variant: str) -> EfficientViTConfig:
    name = variant.lower().replace("_", "-")
    if not name.startswith("efficientvit-"):
        name = "efficientvit-" + name
    if name not in CONFIGS:
        raise UserError(f"unknown EfficientViT variant {variant!r}", key="model", choices=VARIANTS)
    return CONFIGS[name]


def build_efficientvit(variant: str, num_classes: int = 1000, in_chans: int = 3, img_size: int = 224,
                       window: Optional[int] = None, attn_impl: str = "auto") -> EfficientViT:
    return EfficientViT(get_config(variant), num_classes=num_classes, in_chans=in_chans, img_size=img_size,
                        window=window, attn_impl=attn_impl)


# ----------------------------------------------------------------------------------------------
# inference: Conv-BN fusion, cached attention biases

@torch.no_grad()
def fuse_conv_bn(model: nn.Module) -> nn.Module:
    """Fold every BatchNorm into the conv / linear before it, in place (eval statistics)."""
    for m in model.modules():
        if isinstance(m, (ConvBN, ClassifierHead)):
            m.fuse()
    return model


def optimize_for_inference(model: nn.Module) -> nn.Module:
    """eval() + Conv-BN fusion + each attention's [heads, N, N] bias gathered once into a buffer."""
    model.eval()
    fuse_conv_bn(model)
    for m in model.modules():
        if isinstance(m, CascadedGroupAttention):
            m.cache_bias()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def is_fused(model: nn.Module) -> bool:
    return all(m.bn is None for m in model.modules() if isinstance(m, (ConvBN, ClassifierHead)))


# ----------------------------------------------------------------------------------------------
# parameters and FLOPs

def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, img_size: Optional[int] = None, in_chans: Optional[int] = None) -> int:
    """FLOPs of one image's forward, counted by torch.utils.flop_counter (a multiply-add = 2 FLOPs;
    convolutions, linears and both attention matmuls; element-wise ops are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    img_size = img_size or model.img_size
    in_chans = in_chans or model.stem[0].conv.in_channels
    impls = [(m, m.attn_impl) for m in model.modules() if isinstance(m, CascadedGroupAttention)]
    was_training = model.training
    try:
        for m, _ in impls:  # the flop counter has no rule for the CPU fused-attention kernel
            m.attn_impl = "matmul"
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(torch.zeros(1, in_chans, img_size, img_size))
        return int(fc.get_total_flops())
    finally:
        for m, impl in impls:
            m.attn_impl = impl
        model.train(was_training)


def model_summary(variant: str, img_size: int = 224) -> dict:
    """Params and MACs of the ImageNet model (1000 classes, 3 channels) beside the paper's.
    `params` counts the trainable model (BN affines included); `params_fused` the Conv-BN fused
    inference model. The paper's params column matches the fused count for all six models (M5:
    12.44M fused vs 12.47M unfused; paper 12.4M)."""
    cfg = get_config(variant)
    m = EfficientViT(cfg, img_size=img_size)
    flops = count_flops(m, img_size, 3)
    params = count_params(m)
    fused = count_params(optimize_for_inference(m))
    return {"model": cfg.name, "params": params, "params_fused": fused, "macs": flops // 2, "flops": flops,
            "paper_params_m": cfg.paper_params_m, "paper_macs_m": cfg.paper_macs_m}


# ----------------------------------------------------------------------------------------------
# timm state dicts (key names of timm's `efficientvit_msra.py`; timm itself is never imported here)

_FFN = r"(pw1|pw2)"
_CBN = r"(conv|bn)\.(weight|bias|running_mean|running_var|num_batches_tracked)"
# (timm pattern, our replacement); tried in order, the first that matches wins
_TIMM_RULES: List[Tuple[str, str]] = [
    (rf"^patch_embed\.conv([1-4])\.{_CBN}$", None),  # special-cased below (index shift)
    (rf"^stages\.(\d+)\.downsample\.res1\.0\.m\.{_CBN}$", r"stages.\1.down.dw0.\2.\3"),
    (rf"^stages\.(\d+)\.downsample\.res1\.1\.m\.{_FFN}\.{_CBN}$", r"stages.\1.down.ffn0.\2.\3.\4"),
    (rf"^stages\.(\d+)\.downsample\.patchmerge\.(conv[123])\.{_CBN}$", r"stages.\1.down.merge.\2.\3.\4"),
    (r"^stages\.(\d+)\.downsample\.patchmerge\.se\.(fc[12])\.(weight|bias)$", r"stages.\1.down.merge.se.\2.\3"),
    (rf"^stages\.(\d+)\.downsample\.res2\.0\.m\.{_CBN}$", r"stages.\1.down.dw1.\2.\3"),
    (rf"^stages\.(\d+)\.downsample\.res2\.1\.m\.{_FFN}\.{_CBN}$", r"stages.\1.down.ffn1.\2.\3.\4"),
    (rf"^stages\.(\d+)\.blocks\.(\d+)\.(dw0|dw1)\.m\.{_CBN}$", r"stages.\1.blocks.\2.\3.\4.\5"),
    (rf"^stages\.(\d+)\.blocks\.(\d+)\.(ffn0|ffn1)\.m\.{_FFN}\.{_CBN}$", r"stages.\1.blocks.\2.\3.\4.\5.\6"),
    (rf"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.m\.attn\.qkvs\.(\d+)\.{_CBN}$", r"stages.\1.blocks.\2.attn.attn.qkv.\3.\4.\5"),
    (rf"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.m\.attn\.dws\.(\d+)\.{_CBN}$", r"stages.\1.blocks.\2.attn.attn.dw.\3.\4.\5"),
    (rf"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.m\.attn\.proj\.1\.{_CBN}$", r"stages.\1.blocks.\2.attn.attn.proj.\3.\4"),
    (r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.m\.attn\.attention_biases$", r"stages.\1.blocks.\2.attn.attn.attention_biases"),
    (r"^head\.(bn|linear)\.(weight|bias|running_mean|running_var|num_batches_tracked)$", r"head.\1.\2"),
]
_COMPILED = [(re.compile(p), r) for p, r in _TIMM_RULES]
_IDX_KEY = re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.mixer\.m\.attn\.attention_bias_idxs$")


def timm_to_ours(key: str) -> Optional[str]:
    """Our key for a timm `efficientvit_m*` key, or None if it names nothing in our model."""
    for pat, rep in _COMPILED:
        m = pat.match(key)
        if m is None:
            continue
        if rep is None:  # patch_embed.conv{1..4} -> stem.{0..3}
            return f"stem.{int(m.group(1)) - 1}.{m.group(2)}.{m.group(3)}"
        return m.expand(rep)
    return None


_OURS_RULES: List[Tuple[re.Pattern, str]] = [
    (re.compile(rf"^stem\.([0-3])\.{_CBN}$"), None),
    (re.compile(rf"^stages\.(\d+)\.down\.dw0\.{_CBN}$"), r"stages.\1.downsample.res1.0.m.\2.\3"),
    (re.compile(rf"^stages\.(\d+)\.down\.ffn0\.{_FFN}\.{_CBN}$"), r"stages.\1.downsample.res1.1.m.\2.\3.\4"),
    (re.compile(rf"^stages\.(\d+)\.down\.merge\.(conv[123])\.{_CBN}$"), r"stages.\1.downsample.patchmerge.\2.\3.\4"),
    (re.compile(r"^stages\.(\d+)\.down\.merge\.se\.(fc[12])\.(weight|bias)$"), r"stages.\1.downsample.patchmerge.se.\2.\3"),
    (re.compile(rf"^stages\.(\d+)\.down\.dw1\.{_CBN}$"), r"stages.\1.downsample.res2.0.m.\2.\3"),
    (re.compile(rf"^stages\.(\d+)\.down\.ffn1\.{_FFN}\.{_CBN}$"), r"stages.\1.downsample.res2.1.m.\2.\3.\4"),
    (re.compile(rf"^stages\.(\d+)\.blocks\.(\d+)\.(dw0|dw1)\.{_CBN}$"), r"stages.\1.blocks.\2.\3.m.\4.\5"),
    (re.compile(rf"^stages\.(\d+)\.blocks\.(\d+)\.(ffn0|ffn1)\.{_FFN}\.{_CBN}$"), r"stages.\1.blocks.\2.\3.m.\4.\5.\6"),
    (re.compile(rf"^stages\.(\d+)\.blocks\.(\d+)\.attn\.attn\.qkv\.(\d+)\.{_CBN}$"), r"stages.\1.blocks.\2.mixer.m.attn.qkvs.\3.\4.\5"),
    (re.compile(rf"^stages\.(\d+)\.blocks\.(\d+)\.attn\.attn\.dw\.(\d+)\.{_CBN}$"), r"stages.\1.blocks.\2.mixer.m.attn.dws.\3.\4.\5"),
    (re.compile(rf"^stages\.(\d+)\.blocks\.(\d+)\.attn\.attn\.proj\.{_CBN}$"), r"stages.\1.blocks.\2.mixer.m.attn.proj.1.\3.\4"),
    (re.compile(r"^stages\.(\d+)\.blocks\.(\d+)\.attn\.attn\.attention_biases$"), r"stages.\1.blocks.\2.mixer.m.attn.attention_biases"),
    (re.compile(r"^head\.(bn|linear)\.(weight|bias|running_mean|running_var|num_batches_tracked)$"), r"head.\1.\2"),
]


def ours_to_timm(key: str) -> Optional[str]:
    for pat, rep in _OURS_RULES:
        m = pat.match(key)
        if m is None:
            continue
        if rep is None:
            return f"patch_embed.conv{int(m.group(1)) + 1}.{m.group(2)}.{m.group(3)}"
        return m.expand(rep)
    return None


def _is_se(key: str) -> bool:
    return ".se.fc" in key and key.endswith(".weight")


def to_timm_state_dict(model: EfficientViT) -> Dict[str, torch.Tensor]:
    """Our (unfused) state dict under timm's key names and shapes (SE 1x1 convs are [out, in, 1, 1])."""
    if is_fused(model):
        raise UserError("a fused model has no BatchNorm keys; export before optimize_for_inference",
                        key="model")
    out = {}
    for k, v in model.state_dict().items():
        tk = ours_to_timm(k)
        if tk is None:
            raise KeyError(f"no timm name for {k}")
        out[tk] = v[:, :, None, None] if _is_se(k) else v
    return out


def _preview(keys: Iterable[str], n: int = 3) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:n]) + (f", ... ({len(keys)} in all)" if len(keys) > n else "")


def load_timm_state_dict(model: EfficientViT, state_dict: Dict[str, torch.Tensor],
                         key: str = "model.checkpoint") -> EfficientViT:
    """Load a timm `efficientvit_m*` state dict (timm's key names; older timm also stored the
    derived `attention_bias_idxs`, which must equal ours) into an unfused model. Missing or
    unexpected keys and shape mismatches raise one UserError naming them."""
    if "model" in state_dict and isinstance(state_dict["model"], dict):
        state_dict = state_dict["model"]
    if is_fused(model):
        raise UserError("load weights before optimize_for_inference (the model is already fused)", key=key)
    ours = model.state_dict()
    mapped, unexpected = {}, []
    for k, v in state_dict.items():
        mi = _IDX_KEY.match(k)
        if mi is not None:
            attn = model.stages[int(mi.group(1))].blocks[int(mi.group(2))].attn.attn
            if v.shape != attn.bias_idx.shape or not torch.equal(v.to(attn.bias_idx), attn.bias_idx):
                raise UserError(f"{k} does not match this model's window geometry {tuple(attn.bias_idx.shape)}",
                                key=key)
            continue
        ok = timm_to_ours(k)
        if ok is None or ok not in ours:
            unexpected.append(k)
            continue
        mapped[ok] = v.flatten(1) if _is_se(ok) and v.dim() == 4 else v
    missing = [ours_to_timm(k) or k for k in ours if k not in mapped]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_preview(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_preview(unexpected)}")
        raise UserError(f"state dict does not fit {model.cfg.name} (num_classes={model.num_classes}): "
                        + "; ".join(parts), key=key)
    bad = [k for k, v in mapped.items() if tuple(v.shape) != tuple(ours[k].shape)]
    if bad:
        k = bad[0]
        raise UserError(f"shape mismatch at {ours_to_timm(k)}: checkpoint {tuple(mapped[k].shape)} vs "
                        f"model {tuple(ours[k].shape)} ({len(bad)} tensor(s) differ)", key=key)
    model.load_state_dict(mapped, strict=True)
    return model
