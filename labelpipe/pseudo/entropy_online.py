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


def classwise_entropy_split_torch(
    entropy: torch.Tensor, predicted: torch.Tensor, alpha_t: float, valid_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """The split of Eq. 12 taken within each predicted class of the batch: (B, H, W) bool, True where valid and
    ``H < gamma_t,c``, gamma_t,c the same order statistic over the valid pixels predicted ``c``. Each class keeps
    its ``1 - alpha_t`` most certain pixels, so the unreliable share is ``alpha_t`` in every class instead of
    falling mostly on the classes the model is least sure of (the rare ones): the class-balanced selection of
    CBST / DARS (seed 002) applied to U2PL's online split. Not in U2PL; an option beside the paper's.
    entropy: (B, H, W); predicted: (B, H, W) int64 argmax; valid_mask: (B, H, W) bool or None."""
    if predicted.shape != entropy.shape:
        raise ValueError(f"predicted shape {tuple(predicted.shape)} != entropy {tuple(entropy.shape)}")
    valid = torch.ones_like(predicted, dtype=torch.bool) if valid_mask is None else valid_mask.bool()
    values = entropy.detach().float().clamp_min(0.0)
    reliable = torch.zeros_like(valid)
    for c in torch.unique(predicted[valid]).tolist():
        in_class = valid & (predicted == c)
        gamma = entropy_threshold_torch(values, alpha_t, in_class)
        reliable |= in_class & (values < gamma)
    return reliable
