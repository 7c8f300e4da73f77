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

- ``class_weight``: (C,) per-class weights of the CE (``weight[y] * CE``, as torch's ``weight=`` with
  reduction none); the authors' published command re-estimates them every step with
  :class:`OftenBalance` (``--class-balance --often-balance --max-value 7``).
- ``align_corners``: how lower-resolution logits are upsampled to the target's size (bilinear);
  ``False`` by default, ``True`` in the authors' code.

``kl_direction="aux||main", mean_over="all", aux_weight=0.5, align_corners=True`` with
:class:`OftenBalance` weights reproduces the authors' code.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

KL_DIRECTIONS = ("main||aux", "aux||main")
MEAN_OVER = ("valid", "all")


def _resize_to(logits: Tensor, size: torch.Size | tuple[int, int], align_corners: bool = False) -> Tensor:
    if tuple(logits.shape[2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=align_corners)


def _kl_per_pixel(log_p: Tensor, log_q: Tensor) -> Tensor:
    """(B, H, W) ``KL(p || q)`` summed over the class dimension of (B, C, H, W) log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(dim=1)


def prediction_variance(main_logits: Tensor, aux_logits: Tensor) -> Tensor:
    """(B, H, W) ``KL(p_main || p_aux)`` from (B, C, H, W) logits; aux is resized to main's size if needed."""
    aux_logits = _resize_to(aux_logits, main_logits.shape[2:])
    return _kl_per_pixel(F.log_softmax(main_logits.float(), 1), F.log_softmax(aux_logits.float(), 1))


def head_consistency(main_logits: Tensor, aux_logits: Tensor, inside: Tensor | None = None) -> Tensor:
    """Scalar mean of ``KL(p_main || p_aux)`` over the pixels of (B, C, h, w) logits, at the main head's size.

    MRNet's memory regularisation (Zheng & Yang 2020; the stage 1 of seed 000): trained on unlabeled images it
    makes the two heads agree wherever they can, so the variance that remains marks ambiguous pixels. ``inside``
    (B, H, W) bool at the image's size leaves crop padding out (nearest-resized to the logits). Nothing is
    detached: gradients reach both heads.
    """
    var = prediction_variance(main_logits, aux_logits)
    if inside is None:
        return var.mean()
    keep = F.interpolate(inside[:, None].float(), size=var.shape[1:], mode="nearest")[:, 0] > 0.5
    return torch.where(keep, var, torch.zeros_like(var)).sum() / keep.sum().clamp_min(1)


def _rectified_term(
    log_p_self: Tensor,
    log_p_other: Tensor,
    target: Tensor,
    ignore_index: int,
    self_first: bool,
    mean_over: str,
    class_weight: Tensor | None = None,
) -> Tensor:
    """The rectified loss with CE on the 'self' head; ``self_first`` picks KL(self||other)."""
    var = _kl_per_pixel(log_p_self, log_p_other) if self_first else _kl_per_pixel(log_p_other, log_p_self)
    num_classes = log_p_self.shape[1]
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    safe_target = torch.where(valid, target, torch.zeros_like(target))
    ce = -log_p_self.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    if class_weight is not None:
        ce = class_weight.to(ce)[safe_target] * ce
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
    class_weight: Tensor | None = None,
    align_corners: bool = False,
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
    log_p_main = F.log_softmax(_resize_to(main_logits, size, align_corners).float(), dim=1)
    log_p_aux = F.log_softmax(_resize_to(aux_logits, size, align_corners).float(), dim=1)
    self_first = kl_direction == "main||aux"
    term = (target, ignore_index, self_first, mean_over, class_weight)
    loss = _rectified_term(log_p_main, log_p_aux, *term)
    if aux_weight != 0.0:
        loss = loss + aux_weight * _rectified_term(log_p_aux, log_p_main, *term)
    return loss


class OftenBalance:
    """Per-class CE weights re-estimated every step from the batch's pseudo-labels (the authors' form).

    The rectification authors' ``--class-balance --often-balance --max-value M`` (ALGORITHMS.md section 3):
    from the pseudo-labels of a batch of ``n`` images, with ``count_c`` the pixels of class c,

        w_c     = M if count_c < min_pixels * n else 1        (rare in this batch)
        o_c     = M if count_c == 0 else 1                     (absent from this batch)
        often_c <- 0.9 often_c + 0.1 o_c                       (starts at 1)
        weight_c = w_c * often_c

    ``min_pixels`` is 64 * 64 at the authors' 512x256 crops; scale it with the crop area. The state
    (``often``) is part of a training checkpoint, so a resumed run weights the same.
    """

    def __init__(self, num_classes: int, max_value: float = 7.0, min_pixels: float = 64 * 64, momentum: float = 0.9):
        self.max_value, self.min_pixels, self.momentum = float(max_value), float(min_pixels), float(momentum)
        self.often = torch.ones(num_classes, dtype=torch.float64)

    def __call__(self, labels: Tensor, ignore_index: int = 255) -> Tensor:
        """(C,) float32 weights from (B, H, W) pseudo-labels; updates the running ``often`` state."""
        num_classes = self.often.numel()
        flat = labels.reshape(-1)
        flat = flat[(flat != ignore_index) & (flat >= 0) & (flat < num_classes)]
        count = torch.bincount(flat.cpu(), minlength=num_classes).to(torch.float64)
        n_images = labels.shape[0]
        rare = torch.where(count < self.min_pixels * n_images, self.max_value, 1.0)
        absent = torch.where(count == 0, self.max_value, 1.0)
        self.often = self.momentum * self.often + (1 - self.momentum) * absent
        return (rare * self.often).to(device=labels.device, dtype=torch.float32)

    def state_dict(self) -> dict[str, Any]:
        return {"often": self.often.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.often = state["often"].to(torch.float64).clone()
