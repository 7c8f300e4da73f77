"""Online U2PL split of a mini-batch into reliable and unreliable pixels (seed 003, Eq. 12-13), in torch.

The same order statistic as ``entropy.entropy_threshold`` (see that module), taken over the valid pixels
of the batch as in the paper: with n valid pixels and ``k = floor((1 - alpha_t) n)``, gamma is the
``(k + 1)``-th smallest entropy and a pixel is reliable when valid and ``H < gamma``. Runs on the
entropy's device; no gradient flows through the split.
"""

from __future__ import annotations

import torch

from labelpipe.pseudo.entropy import reliable_count


def entropy_threshold_torch(
    entropy: torch.Tensor, alpha_t: float, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """gamma_t of the batch: a 0-d float32 tensor (+inf when every valid pixel is reliable or none is
    valid). entropy: (B, H, W) per-pixel entropy; valid_mask: (B, H, W) bool or None (all valid)."""
    values = entropy.detach().float().clamp_min(0.0)
    if valid_mask is not None:
        if valid_mask.shape != entropy.shape:
            raise ValueError(f"valid_mask shape {tuple(valid_mask.shape)} != entropy {tuple(entropy.shape)}")
        values = values[valid_mask.bool()]
    values = values.reshape(-1)
    k = reliable_count(alpha_t, values.numel())
    if k >= values.numel():
        return torch.tensor(float("inf"), device=entropy.device)
    return torch.kthvalue(values, k + 1).values


def entropy_split_torch(entropy: torch.Tensor, alpha_t: float, valid_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reliable mask of Eq. 12 for a batch: (B, H, W) bool, True where valid and ``H < gamma_t``.
    entropy: (B, H, W); valid_mask: (B, H, W) bool or None. Unreliable = valid & ~reliable."""
    gamma = entropy_threshold_torch(entropy, alpha_t, valid_mask)
    reliable = entropy.detach().float().clamp_min(0.0) < gamma
    if valid_mask is not None:
        reliable &= valid_mask.bool()
    return reliable
