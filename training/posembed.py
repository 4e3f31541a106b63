"""Resampling learned position embeddings to another patch grid (fine-tuning at higher resolution).

Dosovitskiy et al. (Sec. 3.2): when fine-tuning at a higher resolution the patch size
stays the same, so the sequence gets longer and the pre-trained position embeddings
are interpolated in 2D according to their location in the original image. This is
done once, when a checkpoint is loaded (:func:`vitray.training.vit.load_pretrained`),
never inside ``forward``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_of(num_patch_tokens: int) -> tuple[int, int]:
    """The square (h, w) grid a checkpoint's ``num_patch_tokens`` position embeddings came from."""
    side = math.isqrt(num_patch_tokens)
    if side * side != num_patch_tokens:
        raise ValueError(f"{num_patch_tokens} position embeddings do not form a square grid")
    return side, side


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
    old_grid: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Bicubically interpolate patch position embeddings to ``new_grid``; prefix tokens are kept.

    pos_embed: (1, P + h*w, D) with the P prefix (class) token embeddings first.
    Returns (1, P + new_h*new_w, D) in the dtype of ``pos_embed``; the interpolation runs
    in float32. ``old_grid`` defaults to the square grid of the patch tokens.
    """
    prefix, patches = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_h, old_w = old_grid if old_grid is not None else grid_of(patches.shape[1])
    if (old_h, old_w) == tuple(new_grid):
        return pos_embed
    dim = patches.shape[-1]
    grid = patches.float().reshape(1, old_h, old_w, dim).permute(0, 3, 1, 2)  # (1, D, h, w)
    shrinking = new_grid[0] < old_h or new_grid[1] < old_w
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False,
                         antialias=shrinking)  # (1, D, new_h, new_w)
    patches = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim)  # (1, N', D)
    return torch.cat([prefix.float(), patches], dim=1).to(pos_embed.dtype)
