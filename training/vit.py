"""Vision Transformer (Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021).

An image (B, 3, H, W) is cut into N = (H/p)*(W/p) patches, each linearly embedded
(a conv with kernel = stride = p), a learnable class token is prepended and learned
1D position embeddings are added; a stack of pre-norm Transformer blocks follows and
a final LayerNorm. The forward pass is split as in timm so every use takes its cut:

    forward_features(x) -> (B, N+1, D) tokens   (pretraining, dense features)
    forward_head(t, pre_logits=True) -> (B, R)  (linear probes, few-shot)
    forward_head(t) -> (B, num_classes)         (pretraining / fine-tuning logits)

Variants (Table 1 of the paper): Ti/S/B/L/H with patch size 14, 16 or 32, named like
"B/16"; the Hybrid variant "R50+B/16" feeds the Transformer with a ResNet feature map
(:mod:`vitray.training.hybrid`). The model is single-device; parallel wrapping lives
with the trainer.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections import OrderedDict
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from vitray.config import check
from vitray.training.hybrid import (HYBRID_LAYERS, HYBRID_STAGES, ResNetStem, hybrid_out_channels,
                                    resnet_stem_flops)
from vitray.training.posembed import grid_of, resample_pos_embed

log = logging.getLogger(__name__)

# name -> (embed_dim, depth, num_heads); mlp_dim = 4 * embed_dim (Table 1; Ti and S from DeiT).
VARIANTS: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
PATCH_SIZES = (14, 16, 32)
_VARIANT_RE = re.compile(r"^(?:(?P<hybrid>R\d+)\+)?(?P<size>[A-Za-z]+)/(?P<patch>\d+)$")


@dataclasses.dataclass
class ViTConfig:
    """Architecture of a :class:`VisionTransformer`. ``None`` sizes come from ``variant``.

    ``ViTConfig(variant="Ti/16", depth=2, img_size=32)`` is a tiny Ti/16 for tests: any
    explicit size overrides the variant table.
    """

    variant: str = "B/16"
    """"<size>/<patch>" with size in Ti/S/B/L/H and patch in 14/16/32, or "R26+B/16",
    "R50+B/16", "R50+L/32" for the Hybrid (patch = total stride of the ResNet stem)."""
    img_size: int = 224
    """Side of the (square) input image in pixels; must be a multiple of ``patch_size``."""
    in_chans: int = 3
    num_classes: int = 1000
    """Classifier outputs; 0 = no classifier (``forward`` returns the pre-logits)."""
    patch_size: int | None = None
    """Patch side in pixels (the conv stride). None = from ``variant``."""
    embed_dim: int | None = None
    """Token width D. None = from ``variant``."""
    depth: int | None = None
    """Number of Transformer blocks. None = from ``variant``."""
    num_heads: int | None = None
    """Attention heads; must divide ``embed_dim``. None = from ``variant``."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of ``embed_dim``."""
    qkv_bias: bool = True
    class_token: bool = True
    """Prepend a learnable class token. False requires ``global_pool="avg"``."""
    global_pool: str = "token"
    """"token": classify the class token; "avg": mean of the patch tokens (after the final norm)."""
    head: str = "pretrain"
    """"pretrain": the paper's MLP head (Linear + tanh hidden layer, then a classifier);
    "finetune": a single zero-initialised Linear layer."""
    representation_size: int | None = None
    """Hidden width of the pretraining head; None = ``embed_dim``. Unused by "finetune"."""
    layer_norm_eps: float = 1e-6
    """LayerNorm epsilon (1e-6 as in the paper's JAX code; HF's default 1e-12 differs)."""
    dropout: float = 0.0
    """Dropout after the position embeddings, the MLP activation and both residual branches."""
    attn_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    drop_path_rate: float = 0.0
    """Stochastic depth, increasing linearly to this rate at the last block."""
    hybrid: str | None = None
    """ResNet stem for the Hybrid ("R26" or "R50"); None = plain patches. From ``variant``."""
    hybrid_layers: tuple[int, ...] | None = None
    """Bottleneck blocks per stem stage; None = from ``hybrid`` and the patch size."""
    hybrid_width: int = 64
    """Channels of the stem's root conv (bottleneck widths are 1x, 2x, 4x, 8x this)."""

    def __post_init__(self) -> None:
        m = _VARIANT_RE.match(self.variant) if isinstance(self.variant, str) else None
        check(m is not None and m["size"] in VARIANTS, "variant",
              f"unknown variant {self.variant!r} (expected e.g. 'B/16' or 'R50+B/16'; sizes "
              f"{', '.join(VARIANTS)})")
        embed_dim, depth, num_heads = VARIANTS[m["size"]]
        variant_patch = int(m["patch"])
        if m["hybrid"] is not None:
            check(m["hybrid"] in HYBRID_LAYERS, "variant",
                  f"unknown hybrid stem {m['hybrid']!r} (known: {', '.join(HYBRID_LAYERS)})")
            check(self.hybrid in (None, m["hybrid"]), "hybrid",
                  f"{self.hybrid!r} contradicts variant {self.variant!r}")
            self.hybrid = m["hybrid"]
            check(variant_patch in HYBRID_STAGES, "variant",
                  f"hybrid patch size must be one of {tuple(HYBRID_STAGES)}, got {variant_patch}")
        else:
            check(variant_patch in PATCH_SIZES, "variant",
                  f"patch size must be one of {PATCH_SIZES}, got {variant_patch}")
        self.embed_dim = embed_dim if self.embed_dim is None else self.embed_dim
        self.depth = depth if self.depth is None else self.depth
        self.num_heads = num_heads if self.num_heads is None else self.num_heads
        self.patch_size = variant_patch if self.patch_size is None else self.patch_size

        for name in ("img_size", "in_chans", "patch_size", "embed_dim", "depth", "num_heads"):
            check(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        check(self.num_classes >= 0, "num_classes", f"must be >= 0, got {self.num_classes}")
        check(self.img_size % self.patch_size == 0, "patch_size",
              f"{self.patch_size} does not divide img_size {self.img_size}")
        check(self.embed_dim % self.num_heads == 0, "num_heads",
              f"{self.num_heads} heads do not divide embed_dim {self.embed_dim}")
        check(self.mlp_ratio > 0 and self.mlp_dim > 0, "mlp_ratio", f"must be positive, got {self.mlp_ratio}")
        check(self.global_pool in ("token", "avg"), "global_pool",
              f"must be 'token' or 'avg', got {self.global_pool!r}")
        check(self.class_token or self.global_pool == "avg", "global_pool",
              "'token' pooling needs class_token=True; use 'avg' without a class token")
        check(self.head in ("pretrain", "finetune"), "head",
              f"must be 'pretrain' or 'finetune', got {self.head!r}")
        check(self.representation_size is None or self.representation_size > 0,
              "representation_size", f"must be positive, got {self.representation_size}")
        check(self.layer_norm_eps > 0, "layer_norm_eps", "must be positive")
        for name in ("dropout", "attn_dropout", "drop_path_rate"):
            check(0.0 <= getattr(self, name) < 1.0, name, f"must be in [0, 1), got {getattr(self, name)}")
        if self.hybrid is not None:
            check(self.hybrid in HYBRID_LAYERS, "hybrid",
                  f"unknown hybrid stem {self.hybrid!r} (known: {', '.join(HYBRID_LAYERS)})")
            check(self.patch_size in HYBRID_STAGES, "patch_size",
                  f"the hybrid stem's stride must be one of {tuple(HYBRID_STAGES)}, got {self.patch_size}")
            stages = HYBRID_STAGES[self.patch_size]
            if self.hybrid_layers is None:
                self.hybrid_layers = HYBRID_LAYERS[self.hybrid][stages]
            self.hybrid_layers = tuple(self.hybrid_layers)
            check(len(self.hybrid_layers) == stages and all(n > 0 for n in self.hybrid_layers),
                  "hybrid_layers", f"need {stages} positive stage depths for stride {self.patch_size}, "
                  f"got {self.hybrid_layers}")
            check(self.hybrid_width > 0, "hybrid_width", "must be positive")
        else:
            check(self.hybrid_layers is None, "hybrid_layers", "only used with a hybrid stem")

    @property
    def grid_size(self) -> int:
        """Patches per image side (H / p)."""
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        return 1 if self.class_token else 0

    @property
    def num_tokens(self) -> int:
        """Sequence length T = N patches + prefix tokens."""
        return self.num_patches + self.num_prefix_tokens

    @property
    def mlp_dim(self) -> int:
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def pre_logits_dim(self) -> int:
        """Width of ``forward_head(..., pre_logits=True)``."""
        if self.head == "pretrain":
            return self.representation_size or self.embed_dim
        return self.embed_dim


# --------------------------------------------------------------------------- modules


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): a conv with kernel = stride = patch size.

    For the Hybrid, a ResNet stem first maps the image to (B, C', H/p, W/p) and the
    projection is a 1x1 conv ("patch size 1 on the feature map").
    """

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        if cfg.hybrid is not None:
            self.backbone = ResNetStem(cfg.in_chans, cfg.hybrid_width, cfg.hybrid_layers)
            in_chs, kernel = self.backbone.out_channels, 1
        else:
            self.backbone = None
            in_chs, kernel = cfg.in_chans, cfg.patch_size
        self.proj = nn.Conv2d(in_chs, cfg.embed_dim, kernel_size=kernel, stride=kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.backbone is not None:
            x = self.backbone(x)  # (B, C', H/p, W/p)
        x = self.proj(x)  # (B, D, H/p, W/p)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection and SDPA (flash/efficient kernels)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)
        self.attn_dropout = cfg.attn_dropout
        self.proj_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.num_heads, D // self.num_heads)  # (B, T, 3, nh, hs)
        # unbind(2) rather than permute(2, 0, 3, 1, 4).unbind(0): its backward stacks the
        # three gradients straight into qkv's (B, T, 3, nh, hs) layout, saving a copy.
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # 3 x (B, nh, T, hs), views
        x = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)  # (B, nh, T, hs)
        x = x.transpose(1, 2).reshape(B, T, D)  # (B, T, D)
        return self.proj_drop(self.proj(x))


class Mlp(nn.Module):
    """Linear -> GELU (exact) -> Linear, dropout after each as in the paper's MlpBlock."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_dim)
        self.fc2 = nn.Linear(cfg.mlp_dim, cfg.embed_dim)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(F.gelu(self.fc1(x)))  # (B, T, mlp_dim)
        return self.drop(self.fc2(x))  # (B, T, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, rescaling the kept ones."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(1.0 - self.p)  # (B, 1, 1)
        return x * keep / (1.0 - self.p)


class Block(nn.Module):
    """Pre-norm Transformer encoder block."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.layer_norm_eps)
        self.mlp = Mlp(cfg)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))  # (B, T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x


class VisionTransformer(nn.Module):
    """ViT of :class:`ViTConfig`: images (B, C, img_size, img_size) -> logits (B, num_classes)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = cfg.num_prefix_tokens
        self.patch_embed = PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.class_token else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, D))
        self.pos_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        rates = [cfg.drop_path_rate * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList([Block(cfg, rate) for rate in rates])
        self.norm = nn.LayerNorm(D, eps=cfg.layer_norm_eps)
        if cfg.head == "pretrain":
            # The paper's pre-training head: an MLP with one tanh hidden layer.
            self.pre_logits = nn.Sequential(OrderedDict(
                fc=nn.Linear(D, cfg.pre_logits_dim), act=nn.Tanh()))
        else:
            self.pre_logits = nn.Identity()
        self.head = nn.Linear(cfg.pre_logits_dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """big_vision / timm "jax" initialisation; deterministic given the torch seed."""
        w = self.patch_embed.proj.weight
        _lecun_normal_(w, fan_in=w[0].numel())
        nn.init.zeros_(self.patch_embed.proj.bias)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.04, b=0.04)
        for blk in self.blocks:
            # xavier per q, k, v matrix (as if they were separate (D, D) layers, like the paper)
            for chunk in blk.attn.qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(chunk)
            nn.init.xavier_uniform_(blk.attn.proj.weight)
            for lin in (blk.attn.qkv, blk.attn.proj):
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            for lin in (blk.mlp.fc1, blk.mlp.fc2):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.normal_(lin.bias, std=1e-6)
        if isinstance(self.pre_logits, nn.Sequential):
            _lecun_normal_(self.pre_logits.fc.weight, fan_in=self.pre_logits.fc.in_features)
            nn.init.zeros_(self.pre_logits.fc.bias)
        if isinstance(self.head, nn.Linear):
            # Zero head (big_vision default): initial logits are 0, loss = log(num_classes).
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names conventionally excluded from weight decay."""
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) images -> (B, T, D) tokens after the final LayerNorm (class token first)."""
        if x.shape[-2:] != (self.cfg.img_size, self.cfg.img_size):
            raise ValueError(f"expected {self.cfg.img_size}x{self.cfg.img_size} images, got "
                             f"{tuple(x.shape[-2:])}; load_pretrained() resamples position embeddings")
        x = self.patch_embed(x)  # (B, N, D)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, T, D)
        x = self.pos_drop(x + self.pos_embed)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, D) -> (B, D): the class token, or the mean of the patch tokens."""
        if self.cfg.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x[:, 0]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, T, D) tokens -> (B, num_classes) logits, or with ``pre_logits`` the
        (B, pre_logits_dim) representation the classifier sees (after the tanh layer of
        the pretraining head; the pooled token for the fine-tuning head)."""
        x = self.pre_logits(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))


def _lecun_normal_(w: torch.Tensor, fan_in: int) -> None:
    # Truncated normal with variance 1/fan_in (flax's default for Dense/Conv); the
    # constant undoes the variance lost to truncation at two standard deviations.
    std = math.sqrt(1.0 / fan_in) / 0.87962566103423978
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)


def create_model(cfg: ViTConfig) -> VisionTransformer:
    """A freshly initialised :class:`VisionTransformer` (uses the global torch RNG)."""
    return VisionTransformer(cfg)


# --------------------------------------------------------------------------- loading


class LoadReport(NamedTuple):
    """What :func:`load_pretrained` did not take over one to one."""

    resampled: list[str]
    """Position embeddings interpolated to the model's grid."""
    skipped: list[str]
    """Checkpoint tensors left out (head of another shape or kind, class token unused)."""
    missing: list[str]
    """Model tensors the checkpoint lacks, kept at their initialisation (head only)."""


_HEAD_PREFIXES = ("head.", "pre_logits.")


def load_pretrained(model: VisionTransformer, state_dict: Mapping[str, torch.Tensor]) -> LoadReport:
    """Load a ViT checkpoint into ``model``, adapting it once to the model's shape.

    - position embeddings from another grid are resampled (bicubic, class token kept);
    - head tensors (``head.*``, ``pre_logits.*``) whose shape or presence differ are
      skipped / left initialised (pretrain -> fine-tune, another ``num_classes``);
    - a checkpoint class token is dropped for a model without one.
    Any other missing, unexpected or mismatched tensor raises ``ValueError``. Returns a
    :class:`LoadReport`; nothing left out goes unreported.
    """
    own = model.state_dict()
    sd = dict(state_dict)
    resampled, skipped = [], []

    if "cls_token" in sd and model.cls_token is None:
        del sd["cls_token"]
        skipped.append("cls_token")
    pos = sd.get("pos_embed")
    if pos is not None and pos.shape != own["pos_embed"].shape:
        sd["pos_embed"] = _adapt_pos_embed(pos, model.cfg)
        resampled.append("pos_embed")

    for key in list(sd):
        if key.startswith(_HEAD_PREFIXES) and (key not in own or own[key].shape != sd[key].shape):
            del sd[key]
            skipped.append(key)
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    bad_missing = [k for k in missing if not k.startswith(_HEAD_PREFIXES)]
    mismatched = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
                  for k in sd if k in own and sd[k].shape != own[k].shape]
    if bad_missing or unexpected or mismatched:
        raise ValueError(f"checkpoint does not fit {model.cfg.variant}: missing {bad_missing}, "
                         f"unexpected {unexpected}, shape mismatch {mismatched}")
    model.load_state_dict(sd, strict=False)
    report = LoadReport(resampled, skipped, missing)
    if resampled or skipped or missing:
        log.info("load_pretrained: resampled %s, skipped %s, left initialised %s", *report)
    return report


def _adapt_pos_embed(pos: torch.Tensor, cfg: ViTConfig) -> torch.Tensor:
    """(1, P + h*w, D) checkpoint embeddings -> (1, num_tokens, D) for ``cfg``."""
    length = pos.shape[1]
    # The checkpoint had a class token iff its patch count is a square only with it removed.
    src_prefix = 0 if math.isqrt(length) ** 2 == length else 1
    if src_prefix and not cfg.class_token:
        pos, src_prefix = pos[:, 1:], 0  # its class-token embedding has no token to go with
    grid = grid_of(pos.shape[1] - src_prefix)
    pos = resample_pos_embed(pos, (cfg.grid_size, cfg.grid_size), src_prefix, grid)
    if cfg.class_token and not src_prefix:
        raise ValueError("checkpoint has no class-token position embedding but the model has a class token")
    return pos


# --------------------------------------------------------------------------- FLOPs


def model_flops_per_image(cfg: ViTConfig, training: bool = True) -> float:
    """Matmul/conv FLOPs (2 per multiply-add) for one image, attention included.

    ``training=True`` counts forward + backward as 3x the forward pass (the backward
    computes gradients w.r.t. both inputs and weights), the usual MFU convention.
    Element-wise ops (norms, GELU, softmax) are left out.
    """
    T, D, M, p = cfg.num_tokens, cfg.embed_dim, cfg.mlp_dim, cfg.patch_size
    if cfg.hybrid is not None:
        patch = resnet_stem_flops(cfg.in_chans, cfg.img_size, cfg.hybrid_width, cfg.hybrid_layers)
        patch += 2.0 * cfg.num_patches * hybrid_out_channels(cfg.hybrid_width, len(cfg.hybrid_layers)) * D
    else:
        patch = 2.0 * cfg.num_patches * cfg.in_chans * p * p * D
    block = (2.0 * T * D * 3 * D  # qkv
             + 2.0 * 2 * T * T * D  # q @ k^T and attn @ v
             + 2.0 * T * D * D  # out projection
             + 2.0 * 2 * T * D * M)  # fc1, fc2
    head = 2.0 * D * cfg.pre_logits_dim if cfg.head == "pretrain" else 0.0
    head += 2.0 * cfg.pre_logits_dim * cfg.num_classes
    forward = patch + cfg.depth * block + head
    return 3.0 * forward if training else forward
