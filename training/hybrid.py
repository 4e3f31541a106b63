"""The ResNet stem of the paper's Hybrid ViT ("R50+B/16"): its feature map is the patch input.

Dosovitskiy et al. (Sec. 3.1, "Hybrid Architecture") feed the Transformer with the
feature map of a CNN instead of raw image patches, using patch size 1 on that map.
Like the paper (and BiT), the CNN is a ResNet with Group Normalisation and
weight-standardised convolutions; for an effective patch size of 16 it keeps three
stages (stride 4 * 2 * 2 = 16) and moves the blocks of the dropped fourth stage into
the third, e.g. R50 (3, 4, 6, 3) -> (3, 4, 9). With patch size 32 all four stages stay.

Module names follow timm's ResNetV2 (``stem.conv``, ``stages.0.blocks.0.conv1``...).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage, by ResNet depth and number of stages (3 for stride 16, 4 for stride 32).
HYBRID_LAYERS: dict[str, dict[int, tuple[int, ...]]] = {
    "R26": {3: (2, 2, 4), 4: (2, 2, 2, 2)},
    "R50": {3: (3, 4, 9), 4: (3, 4, 6, 3)},
}
# Effective patch size (total stride of the stem) -> number of stages.
HYBRID_STAGES: dict[int, int] = {16: 3, 32: 4}


def hybrid_out_channels(width: int, num_stages: int) -> int:
    """Channels of the stem's feature map: bottleneck expansion 4, doubling per stage."""
    return width * 4 * 2 ** (num_stages - 1)


def _groups(channels: int) -> int:
    # BiT uses 32 groups; tiny test widths have fewer channels than that.
    return math.gcd(32, channels)


class StdConv2d(nn.Conv2d):
    """Conv2d with weight standardisation (Qiao et al.; used by BiT and the ViT hybrids).

    Each output filter is normalised to zero mean and unit variance before the
    convolution, which is what makes GroupNorm work well at large batch sizes.
    """

    def __init__(self, *args, eps: float = 1e-8, **kwargs):
        super().__init__(*args, bias=False, **kwargs)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight  # (C_out, C_in, k, k)
        mean = w.mean(dim=(1, 2, 3), keepdim=True)
        var = w.var(dim=(1, 2, 3), unbiased=False, keepdim=True)
        w = (w - mean) / torch.sqrt(var + self.eps)
        return F.conv2d(x, w, None, self.stride, self.padding, self.dilation, self.groups)


class Bottleneck(nn.Module):
    """ResNet bottleneck (1x1 -> 3x3 with stride -> 1x1, expansion 4), post-activation."""

    def __init__(self, in_chs: int, mid_chs: int, stride: int):
        super().__init__()
        out_chs = mid_chs * 4
        if stride != 1 or in_chs != out_chs:
            self.downsample = nn.Sequential()
            self.downsample.add_module("conv", StdConv2d(in_chs, out_chs, 1, stride=stride))
            self.downsample.add_module("norm", nn.GroupNorm(_groups(out_chs), out_chs))
        else:
            self.downsample = nn.Identity()
        self.conv1 = StdConv2d(in_chs, mid_chs, 1)
        self.norm1 = nn.GroupNorm(_groups(mid_chs), mid_chs)
        self.conv2 = StdConv2d(mid_chs, mid_chs, 3, stride=stride, padding=1)
        self.norm2 = nn.GroupNorm(_groups(mid_chs), mid_chs)
        self.conv3 = StdConv2d(mid_chs, out_chs, 1)
        self.norm3 = nn.GroupNorm(_groups(out_chs), out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = self.downsample(x)  # (B, 4*mid, H/s, W/s)
        x = F.relu(self.norm1(self.conv1(x)))
        x = F.relu(self.norm2(self.conv2(x)))  # stride here (ResNet v1.5)
        x = self.norm3(self.conv3(x))
        return F.relu(x + shortcut)


class Stage(nn.Module):
    def __init__(self, in_chs: int, mid_chs: int, depth: int, stride: int):
        super().__init__()
        self.blocks = nn.Sequential(*[
            Bottleneck(in_chs if i == 0 else mid_chs * 4, mid_chs, stride if i == 0 else 1)
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


class ResNetStem(nn.Module):
    """BiT-style ResNet trunk: (B, C, H, W) -> (B, out_channels, H/s, W/s), s = 4 * 2**(stages-1).

    Root: 7x7/2 conv + GroupNorm + ReLU + 3x3/2 max-pool (stride 4); then one stage per
    entry of ``layers`` with ``width * 2**i`` bottleneck channels, the first at stride 1
    and the others at stride 2.
    """

    def __init__(self, in_chans: int, width: int, layers: tuple[int, ...]):
        super().__init__()
        self.stem = nn.Sequential()
        self.stem.add_module("conv", StdConv2d(in_chans, width, 7, stride=2, padding=3))
        self.stem.add_module("norm", nn.GroupNorm(_groups(width), width))
        self.stem.add_module("act", nn.ReLU())
        self.stem.add_module("pool", nn.MaxPool2d(3, stride=2, padding=1))
        stages = []
        in_chs = width
        for i, depth in enumerate(layers):
            stages.append(Stage(in_chs, width * 2**i, depth, stride=1 if i == 0 else 2))
            in_chs = width * 2**i * 4
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_chs
        self.reduction = 4 * 2 ** (len(layers) - 1)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        # timm ResNetV2: He init for convs; the last norm of each block starts at zero so
        # every residual block begins as the identity (Goyal et al.).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.norm3.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (B, width, H/4, W/4)
        return self.stages(x)  # (B, out_channels, H/s, W/s)


def resnet_stem_flops(in_chans: int, img_size: int, width: int, layers: tuple[int, ...]) -> float:
    """Forward FLOPs (2 x multiply-adds) of the convolutions of one :class:`ResNetStem` image."""

    def conv(c_in: int, c_out: int, k: int, h_out: int) -> float:
        return 2.0 * c_in * c_out * k * k * h_out * h_out

    h = (img_size + 1) // 2  # 7x7/2 conv, padding 3
    flops = conv(in_chans, width, 7, h)
    h = (h + 1) // 2  # 3x3/2 max-pool, padding 1
    in_chs = width
    for i, depth in enumerate(layers):
        mid = width * 2**i
        for j in range(depth):
            stride = 2 if (i > 0 and j == 0) else 1
            h_out = (h + 1) // 2 if stride == 2 else h
            flops += conv(in_chs, mid, 1, h) + conv(mid, mid, 3, h_out) + conv(mid, mid * 4, 1, h_out)
            if stride != 1 or in_chs != mid * 4:
                flops += conv(in_chs, mid * 4, 1, h_out)
            in_chs, h = mid * 4, h_out
    return flops
