"""Rectified pseudo-label loss (Zheng & Yang, IJCV, Eq. "Rectified"; seed 000).

The prediction variance of a pixel is the KL divergence between the main and the auxiliary
classifier's class distributions, ``var = KL(p_main || p_aux) = sum_c p_main_c (log p_main_c - log p_aux_c)``.
The loss down-weights the cross-entropy where the heads disagree and penalises the disagreement:

    L = mean(exp(-var) * CE(p_main, y)) + mean(var)

Nothing is detached, so gradients reach both heads through the CE and through ``var``.

Options (the paper's form is the default):

- ``kl_direction``: ``"main||aux"`` (paper) or ``"aux||main"`` (the authors' code). The direction is
  relative to the head whose CE is taken: for the optional aux-head term the roles of the heads swap.
- ``mean_over``: ``"valid"`` (means over non-ignored pixels) or ``"all"`` (the authors' code: means over
  every pixel, ignored ones included with CE = 0, so ``var`` of ignored pixels is penalised too).
- ``aux_weight``: adds ``aux_weight *`` the same loss with CE on the aux head (authors: 0.5).

``kl_direction="aux||main", mean_over="all", aux_weight=0.5`` reproduces the authors' code.
Logits whose spatial size differs from the target's are upsampled bilinearly (align_corners=False)
to the target's size first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

KL_DIRECTIONS = ("main||aux", "aux||main")
MEAN_OVER = ("valid", "all")


def _resize_to(logits: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def _kl_per_pixel(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(B, H, W) ``KL(p || q)`` summed over the class dimension of (B, C, H, W) log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def prediction_variance(main_logits: Tensor, aux_logits: Tensor) -> Tensor:
    """(B, H, W) ``KL(p_main || p_aux)`` from (B, C, H, W) logits; aux is resized to main's size if needed."""
    aux_logits = _resize_to(aux_logits, main_logits.shape[2:])
    return _kl_per_pixel(F.log_softmax(main_logits.float(), 1), F.log_softmax(aux_logits.float(), 1))


def _rectified_term(
    log_p_self: Tensor,
    log_p_other: Tensor,
    target: Tensor,
    ignore_index: int,
    self_first: bool,
    mean_over: str,
) -> Tensor:
    """The rectified loss with CE on the 'self' head; ``self_first`` picks KL(self||other)."""
    var = _kl_per_pixel(log_p_self, log_p_other) if self_first else _kl_per_pixel(log_p_other, log_p_self)
    num_classes = log_p_self.shape[1]
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = -log_p_self.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    zeros = torch.zeros_like(ce)
    weighted_ce = torch.where(valid, torch.exp(-var) * ce, zeros)
    if mean_over == "valid":
        n_valid = valid.sum().clamp_min(1)
        return weighted_ce.sum() / n_valid + torch.where(valid, var, zeros).sum() / n_valid
    return weighted_ce.mean() + var.mean()


def rectified_loss(
    main_logits: Tensor,
    aux_logits: Tensor,
    target: Tensor,
    ignore_index: int = 255,
    kl_direction: str = "main||aux",
    mean_over: str = "valid",
    aux_weight: float = 0.0,
) -> Tensor:
    """Scalar rectified loss; logits (B, C, H, W) (any spatial size), target (B, H, W) long.

    See the module docstring for the formula and the options. A grad-safe 0 when no pixel is valid
    and ``mean_over="valid"``.
    """
    if kl_direction not in KL_DIRECTIONS:
        raise ValueError(f"kl_direction must be one of {KL_DIRECTIONS}, got {kl_direction!r}")
    if mean_over not in MEAN_OVER:
        raise ValueError(f"mean_over must be one of {MEAN_OVER}, got {mean_over!r}")
    size = target.shape[1:]
    log_p_main = F.log_softmax(_resize_to(main_logits, size).float(), dim=1)
    log_p_aux = F.log_softmax(_resize_to(aux_logits, size).float(), dim=1)
    self_first = kl_direction == "main||aux"
    loss = _rectified_term(log_p_main, log_p_aux, target, ignore_index, self_first, mean_over)
    if aux_weight != 0.0:
        loss = loss + aux_weight * _rectified_term(log_p_aux, log_p_main, target, ignore_index, self_first, mean_over)
    return loss
