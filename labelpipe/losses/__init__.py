"""Training losses: pure torch, tensors in, scalar tensors out (ALGORITHMS.md section 3)."""

from labelpipe.losses.contrastive import (
    MemoryBank,
    PrototypeBank,
    anchor_masks,
    batch_prototypes,
    class_ranks,
    contrastive_loss,
    denoise_pseudo_labels,
    fold_prototypes,
    negative_masks,
    prototype_weights,
    rank_below,
    u2pl_contrastive,
)
from labelpipe.losses.rectified import OftenBalance, head_consistency, prediction_variance, rectified_loss
from labelpipe.losses.sce import masked_ce, symmetric_ce, unsupervised_ce_weight

__all__ = [
    "MemoryBank",
    "PrototypeBank",
    "anchor_masks",
    "batch_prototypes",
    "class_ranks",
    "contrastive_loss",
    "denoise_pseudo_labels",
    "fold_prototypes",
    "head_consistency",
    "masked_ce",
    "negative_masks",
    "prediction_variance",
    "prototype_weights",
    "OftenBalance",
    "rank_below",
    "rectified_loss",
    "symmetric_ce",
    "u2pl_contrastive",
    "unsupervised_ce_weight",
]
