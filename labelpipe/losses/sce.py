"""Pixel cross-entropy losses for pseudo-labels: plain, weighted and symmetric (U2PL+ Eq. 4, 14).

Shapes: ``logits`` (B, C, H, W), ``target`` (B, H, W) long with ``ignore_index`` for ignored pixels,
an optional per-pixel ``weight`` (B, H, W) float. Every loss is averaged over the valid (non-ignored)
pixels and is a grad-safe 0 when there are none.

Symmetric cross-entropy (Wang et al., ICCV 2019; U2PL+ Eq. 4): ``SCE = xi1 CE(p, y) + xi2 RCE(p, y)``
with the reverse cross-entropy ``RCE = -sum_c p_c log y_c`` of the one-hot label y. ``log 1 = 0`` for
the labelled class and ``log 0`` is clamped to ``A = -4``, so

    RCE = -sum_{c != y} p_c * A = -A * (1 - p_y) = 4 * (1 - p_y).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _pixel_log_prob_of_target(logits: Tensor, target: Tensor, ignore_index: int) -> tuple[Tensor, Tensor]:
    """(B, H, W) ``log p_y`` (0 at ignored pixels) and the (B, H, W) bool valid mask."""
    if logits.dim() != target.dim() + 1 or logits.shape[2:] != target.shape[1:]:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} do not match")
    num_classes = logits.shape[1]
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    log_prob = F.log_softmax(logits.float(), dim=1)
    log_prob_y = log_prob.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    return torch.where(valid, log_prob_y, torch.zeros_like(log_prob_y)), valid


def masked_ce(logits: Tensor, target: Tensor, ignore_index: int = 255, weight: Tensor | None = None) -> Tensor:
    """Scalar ``sum(w * CE) / n_valid`` over valid pixels (``w = 1`` when ``weight`` is None).

    ``weight`` (B, H, W) float is e.g. the variance method's ``exp(-variance)``; it is used as given
    (not detached here). The mean is over the valid pixel count, not over the weight sum.
    """
    log_prob_y, valid = _pixel_log_prob_of_target(logits, target, ignore_index)
    ce = -log_prob_y
    if weight is not None:
        if weight.shape != target.shape:
            raise ValueError(f"weight {tuple(weight.shape)} must have the target's shape {tuple(target.shape)}")
        ce = torch.where(valid, ce * weight.float(), torch.zeros_like(ce))
    return ce.sum() / valid.sum().clamp_min(1)


def symmetric_ce(
    logits: Tensor,
    target: Tensor,
    xi1: float = 1.0,
    xi2: float = 0.1,
    ignore_index: int = 255,
    log_zero: float = -4.0,
    weight: Tensor | None = None,
) -> Tensor:
    """Scalar symmetric cross-entropy ``xi1 CE + xi2 RCE`` averaged over valid pixels (U2PL+ Eq. 4).

    ``RCE = -log_zero * (1 - p_y)`` (``log 0`` clamped to ``log_zero = -4``); see the module docstring.
    ``weight`` (B, H, W), e.g. the variance method's ``exp(-variance)``, multiplies each pixel's term
    as in :func:`masked_ce` (the mean stays over the valid pixel count).
    """
    log_prob_y, valid = _pixel_log_prob_of_target(logits, target, ignore_index)
    ce = -log_prob_y
    rce = -log_zero * (1.0 - log_prob_y.exp())
    per_pixel = xi1 * ce + xi2 * rce
    if weight is not None:
        if weight.shape != target.shape:
            raise ValueError(f"weight {tuple(weight.shape)} must have the target's shape {tuple(target.shape)}")
        per_pixel = per_pixel * weight.float()
    per_pixel = torch.where(valid, per_pixel, torch.zeros_like(ce))
    return per_pixel.sum() / valid.sum().clamp_min(1)


def unsupervised_ce_weight(target: Tensor, eta: float = 1.0, ignore_index: int = 255) -> Tensor:
    """U2PL+ Eq. 14: ``lambda_u = eta * B*H*W / n_kept`` as a float scalar tensor (0 when n_kept = 0).

    ``target`` (B, H, W) holds the unlabeled batch's pseudo-labels, ``ignore_index`` where dropped.
    Convention (the authors' code, followed on purpose): the unsupervised loss is the CE *averaged over
    the kept pixels* multiplied by this factor, i.e. ``unsupervised_ce_weight(t) * symmetric_ce(z, t)``.
    """
    n_kept = (target != ignore_index).sum()
    ratio = float(eta) * target.numel() / n_kept.clamp_min(1).to(torch.float32)
    return torch.where(n_kept > 0, ratio, torch.zeros_like(ratio))
