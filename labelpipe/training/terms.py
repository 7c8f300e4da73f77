"""Self-training loss terms: one registry, one class per term, each computing its loss from plain tensors.

A round's objective (:class:`labelpipe.training.selftrain_step.SelftrainStep`) is the sum of an explicit
list of terms. Each term declares what it needs from the step (the teacher's outputs, the student's
representation, ...) so the step computes only that, owns whatever state it keeps (memory bank,
prototypes, running class weights; saved in the checkpoint through :meth:`LossTerm.components`), and
returns ``(loss, logs)``; weights such as ``lambda_c`` are applied inside the term.

Adding a term is one module::

    from labelpipe.training.terms import LossTerm, register_term

    @register_term("my_term")
    class MyTerm(LossTerm):
        needs = frozenset({"student_rep"})
        def __call__(self, t): return t.rep.pow(2).mean(), {"loss_my_term": ...}

and ``--set selftrain.terms='[supervised, unsupervised, my_term]'`` uses it
(``tests/training/test_terms.py`` registers a toy term and trains a round with it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from labelpipe.config import SelftrainConfig
from labelpipe.errors import LabelpipeError
from labelpipe.losses import (
    MemoryBank,
    OftenBalance,
    PrototypeBank,
    head_consistency,
    masked_ce,
    rectified_loss,
    symmetric_ce,
    u2pl_contrastive,
    unsupervised_ce_weight,
)

# What a term may need from the step (anything else is a typo, caught when the term is registered).
NEEDS = frozenset({"teacher", "teacher_rep", "student_rep", "prototypes"})


@dataclass
class TermSetup:
    """What a term is built from: the round's settings and the problem's shape, no stage context."""

    st: SelftrainConfig
    num_classes: int
    ignore_index: int
    rep_dim: int
    crop_size: int
    device: torch.device
    aux_weight: float = 0.4  # train.aux_weight: the auxiliary head's share of the supervised CE
    gather: Callable[[Tensor], Tensor] | None = None  # all_gather_rows under DDP, else None
    prototypes: PrototypeBank | None = None  # shared by the step's terms and its denoising
    class_weights: Tensor | None = None  # (C,) of the supervised CE (train.class_balance); None: plain CE


@dataclass
class StepTensors:
    """One step's tensors, as the terms read them.

    ``main_l`` / ``aux_l`` (B_l, C, h, w) and ``main_u`` / ``aux_u`` (B_u, C, h, w) float32 student logits;
    ``y_l`` (B_l, H, W) ground truth, ``y_u`` (B_u, H, W) pseudo-labels (``ignore`` where dropped),
    ``w_u`` optional (B_u, H, W) pixel weights, ``inside_u`` optional (B_u, H, W) bool (False on crop
    padding); ``rep`` (B_l + B_u, D, h', w') the student's representation when a term needs it;
    ``t_l`` / ``t_u`` the teacher's outputs on the labeled / unlabeled images (None when not computed);
    ``generator`` this rank's step randomness, ``shared`` one state on every rank (DDP) or None.
    """

    main_l: Tensor
    aux_l: Tensor
    main_u: Tensor
    aux_u: Tensor
    y_l: Tensor
    y_u: Tensor
    w_u: Tensor | None
    inside_u: Tensor | None
    rep: Tensor | None
    t_l: Any
    t_u: Any
    generator: torch.Generator
    shared: torch.Generator | None
    step: int
    alpha_t: float | None = None  # the entropy split's alpha_t at this step (U2PL Eq. 13), a fraction


class LossTerm:
    """A loss term: ``needs`` declares the step's optional computations it reads."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()
    updates_prototypes: ClassVar[bool] = False  # the term folds the step's prototypes itself

    def __init__(self, setup: TermSetup) -> None:
        self.setup = setup

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        raise NotImplementedError

    def components(self) -> dict[str, Any]:
        """Stateful parts to checkpoint (objects with ``state_dict`` / ``load_state_dict``), by name."""
        return {}


LOSS_TERMS: dict[str, type[LossTerm]] = {}


def register_term(name: str) -> Callable[[type[LossTerm]], type[LossTerm]]:
    """Class decorator: make a :class:`LossTerm` available under ``name`` (``selftrain.terms``)."""

    def add(cls: type[LossTerm]) -> type[LossTerm]:
        if name in LOSS_TERMS and LOSS_TERMS[name] is not cls:
            raise ValueError(f"loss term {name!r} is registered twice ({LOSS_TERMS[name].__name__}, {cls.__name__})")
        unknown = set(cls.needs) - NEEDS
        if unknown:
            raise ValueError(f"loss term {name!r} needs unknown inputs {sorted(unknown)}; known: {sorted(NEEDS)}")
        cls.name = name
        LOSS_TERMS[name] = cls
        return cls

    return add


def term_names(st: SelftrainConfig) -> list[str]:
    """The round's terms: ``selftrain.terms`` when set, else derived from the flags (--rectified, --contrastive)."""
    if st.terms is not None:
        names = list(st.terms)
    else:
        names = ["supervised", "rectified" if st.rectified else "unsupervised"]
        if st.contrastive:
            names.append("contrastive")
    unknown = [n for n in names if n not in LOSS_TERMS]
    if unknown:
        raise LabelpipeError(
            f"selftrain.terms: unknown loss term(s) {unknown}; registered: {', '.join(sorted(LOSS_TERMS))}"
        )
    if len(set(names)) != len(names):
        raise LabelpipeError(f"selftrain.terms: {names} names a term twice")
    return names


@register_term("supervised")
class Supervised(LossTerm):
    """``CE(main_l, y_l) + aux_weight * CE(aux_l, y_l)`` on the labeled (or source) half (class-weighted
    with ``train.class_balance``, as in pretraining)."""

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        ignore, weight = self.setup.ignore_index, self.setup.class_weights
        loss = F.cross_entropy(t.main_l, t.y_l, weight=weight, ignore_index=ignore)
        loss = loss + self.setup.aux_weight * F.cross_entropy(t.aux_l, t.y_l, weight=weight, ignore_index=ignore)
        return loss, {"loss_sup": float(loss.detach())}


@register_term("unsupervised")
class Unsupervised(LossTerm):
    """``lambda_u * CE|SCE(main_u, y_u)`` over the kept pixels, with ``lambda_u = eta * B*H*W / n_kept`` (Eq. 14)
    and the variance method's ``exp(-variance)`` pixel weights when the labels carry them."""

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        st, ignore = self.setup.st, self.setup.ignore_index
        lam = unsupervised_ce_weight(t.y_u, st.unsup_weight, ignore)
        if st.loss == "sce":
            per = symmetric_ce(t.main_u, t.y_u, *st.sce_xi, ignore, log_zero=st.sce_log_zero, weight=t.w_u)
        else:
            per = masked_ce(t.main_u, t.y_u, ignore, weight=t.w_u)
        loss = lam * per
        return loss, {"loss_unsup": float(loss.detach())}


@register_term("rectified")
class Rectified(LossTerm):
    """Seed 000's rectified loss ``mean(exp(-var) CE) + mean(var)`` with its options (paper form by default)."""

    def __init__(self, setup: TermSetup) -> None:
        super().__init__(setup)
        st = setup.st
        # The rectification authors' rare-class weights; their 64 x 64 pixels at 512 x 256 crops scale with the crop.
        self.often_balance = (
            OftenBalance(
                setup.num_classes, st.rectified_max_value, min_pixels=64 * 64 * setup.crop_size**2 / (512 * 256)
            )
            if st.rectified_class_balance
            else None
        )

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        st, ignore = self.setup.st, self.setup.ignore_index
        loss = rectified_loss(
            t.main_u,
            t.aux_u,
            t.y_u,
            ignore_index=ignore,
            kl_direction=st.rectified_kl_direction,
            mean_over=st.rectified_mean_over,
            aux_weight=st.rectified_aux_weight,
            class_weight=self.often_balance(t.y_u, ignore) if self.often_balance is not None else None,
            align_corners=st.rectified_align_corners,
        )
        return loss, {"loss_unsup": float(loss.detach())}

    def components(self) -> dict[str, Any]:
        return {"often_balance": self.often_balance} if self.often_balance is not None else {}


@register_term("consistency")
class Consistency(LossTerm):
    """MRNet's memory regularisation ``lambda_mr * mean KL(p_main || p_aux)`` on the unlabeled images (the crop
    padding left out): the auxiliary head follows the main one where it can (seed 000's stage 1 trains so)."""

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        kl = head_consistency(t.main_u, t.aux_u, t.inside_u)
        return self.setup.st.consistency_weight * kl, {"loss_consistency": float(kl.detach())}


@register_term("contrastive")
class Contrastive(LossTerm):
    """U2PL+ ``lambda_c * L_c``: anchors and positives per class, unreliable pixels as negative keys
    from category-wise memory banks (Eq. 21-28); it folds the prototypes it reads."""

    needs = frozenset({"teacher", "teacher_rep", "student_rep", "prototypes"})
    updates_prototypes = True

    def __init__(self, setup: TermSetup) -> None:
        super().__init__(setup)
        # Only what this round reads: a full memory bank is C x capacity x D floats (Cityscapes: 557 MiB).
        self.memory = MemoryBank(setup.num_classes, setup.rep_dim, setup.st.memory_capacity, device=setup.device)

    def __call__(self, t: StepTensors) -> tuple[Tensor, dict[str, float]]:
        contra, stats = self.loss(t)
        logs = {"loss_contrastive": float(contra.detach()), "contrastive_classes": stats["classes"]}
        return self.setup.st.lambda_contrastive * contra, logs

    def loss(self, t: StepTensors, **options: Any) -> tuple[Tensor, dict[str, int]]:
        """The unweighted ``L_c`` of the step and its stats; ``options`` replace :func:`u2pl_contrastive`'s
        arguments (``benchmarks/term_gradients.py`` runs it with other negatives beside the round's)."""
        from labelpipe.training.selftrain_step import contrastive_pixels

        st, setup = self.setup.st, self.setup
        arguments = {
            "memory": self.memory,
            "prototypes": setup.prototypes,
            "num_anchors": st.contrastive_anchors,
            "num_negatives": st.contrastive_negatives,
            "temperature": st.contrastive_temperature,
            "r_l": st.contrastive_r_l,
            "r_h": st.contrastive_r_h,
            "anchor_threshold": st.contrastive_anchor_threshold,
            "generator": t.generator,
            "ignore_index": setup.ignore_index,
            "gather": setup.gather,
            "shared_generator": t.shared,
            "anchor_source": st.contrastive_anchor_source,
            "low_entropy_alpha": t.alpha_t,
            "average": st.contrastive_average,
            "negative_source": st.contrastive_negative_source,
        }
        pixels = contrastive_pixels(t.rep, t.t_l, t.t_u, t.y_l, t.y_u, setup.ignore_index, t.inside_u)
        return u2pl_contrastive(**pixels, **{**arguments, **options})

    def components(self) -> dict[str, Any]:
        return {"memory": self.memory}
