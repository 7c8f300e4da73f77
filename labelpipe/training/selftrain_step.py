"""One self-training step, top to bottom: what U2PL's (and DARS', and seed 000's) step does, in one place.

    labeled batch x_l, y_l; unlabeled batch x_u (strong view), x_u_weak, stored pseudo-labels y_u
    1. teacher   t = EMA teacher(x_l, x_u_weak)          when a term, online labels or denoising need it
    2. targets   y_u = stored | teacher's online labels (entropy split, alpha_t schedule)   (U2PL Eq. 12-13)
                 [denoise: argmax_c w_c p_c with prototype weights w]                       (U2PL+ Eq. 15-18)
    3. CutMix    x_u, y_u, weights, padding and the teacher's outputs mixed with the same boxes
                 [+ DACS ClassMix: half the classes of the labeled (source) image pasted, ground truth kept]
    4. student   one forward of cat(x_l, x_u) (with the representation only when a term reads it)
    5. terms     loss = sum of the round's terms, in order (labelpipe.training.terms):
                 supervised + unsupervised (CE|SCE, Eq. 14) | rectified (seed 000) [+ contrastive (U2PL+)]

Built from settings and a model (:meth:`SelftrainStep.build`), not from a stage, so the benchmarks
(``benchmarks/selftrain_step.py``, ``benchmarks/gpu_memory.py``) measure this very step. The per-step
randomness (CutMix boxes, anchor / negative sampling) is seeded by (seed, round, step) and, under DDP, the
rank, so a killed round resumes on the same trajectory.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from labelpipe.config import RunConfig, SelftrainConfig
from labelpipe.data.dataset import item_seed
from labelpipe.losses import PrototypeBank, denoise_pseudo_labels, fold_prototypes
from labelpipe.pseudo import alpha_schedule, classwise_entropy_split_torch, entropy_split_torch
from labelpipe.teacher import EMATeacher
from labelpipe.training.terms import LOSS_TERMS, StepTensors, TermSetup, term_names


def pixel_entropy(probs: torch.Tensor) -> torch.Tensor:
    """(B, H, W) ``-sum_c p_c log p_c`` of (B, C, H, W) probabilities (log 0 read as log 1e-12)."""
    return -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)


def mask_like(mask: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """A (B, H, W) bool paste mask at ``t``'s resolution (nearest neighbour) and broadcastable against ``t``
    ((B, H', W') or (B, K, H', W'))."""
    if t.shape[-2:] != mask.shape[-2:]:
        mask = F.interpolate(mask[:, None].float(), size=t.shape[-2:], mode="nearest")[:, 0].bool()
    return mask.view(mask.shape[0], *([1] * (t.dim() - 3)), *mask.shape[-2:])


def cutmix(images: torch.Tensor, targets: list[torch.Tensor], generator: torch.Generator, p: float = 0.5):
    """Paste one random box from the next image of the batch into each image (probability ``p``).

    ``targets`` (labels, weights, the teacher's logits and features, ...: (B, H', W') or (B, K, H', W'),
    None passes through) are mixed with the same boxes, scaled to their own resolution by nearest
    neighbour. Returns the mixed images and targets.
    """
    b, _, h, w = images.shape
    if b < 2:
        return images, targets
    apply = torch.rand(b, generator=generator) < p
    area = 0.02 + (0.4 - 0.02) * torch.rand(b, generator=generator)
    ratio = torch.exp((torch.rand(b, generator=generator) - 0.5) * np.log(3.0))
    bh = (torch.sqrt(area * ratio) * h).clamp(1, h).long()
    bw = (torch.sqrt(area / ratio) * w).clamp(1, w).long()
    top = (torch.rand(b, generator=generator) * (h - bh + 1)).long()
    left = (torch.rand(b, generator=generator) * (w - bw + 1)).long()
    rows = torch.arange(h)[None, :, None]
    cols = torch.arange(w)[None, None, :]
    box = (
        (rows >= top[:, None, None])
        & (rows < (top + bh)[:, None, None])
        & (cols >= left[:, None, None])
        & (cols < (left + bw)[:, None, None])
        & apply[:, None, None]
    )
    box = box.to(images.device)
    donor = torch.roll(torch.arange(b), -1).to(images.device)
    images = torch.where(box[:, None], images[donor], images)

    return images, [None if t is None else torch.where(mask_like(box, t), t[donor], t) for t in targets]


def classmix_labeled(
    x_u: torch.Tensor,
    targets_u: list[torch.Tensor | None],
    x_l: torch.Tensor,
    targets_l: list[torch.Tensor | float | None],
    y_l: torch.Tensor,
    generator: torch.Generator,
    p: float,
    ignore: int,
) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """DACS's cross-domain ClassMix: paste half of the classes of labeled image i into unlabeled image i.

    With probability ``p`` per unlabeled image, the classes present in ``y_l[i]`` (``ignore`` excluded) are
    shuffled and the first ``ceil(n / 2)`` kept; the pixels of those classes are copied from the labeled
    image (a source image in DA) over the unlabeled one, and every unlabeled target takes the labeled value
    there: ``targets_l`` pairs each entry of ``targets_u`` with a tensor of the same layout (the ground truth
    for the pseudo-labels, the teacher's outputs on the labeled image for its outputs on the unlabeled one)
    or a constant (1.0 for pixel weights, True for "inside the crop"); a ``None`` on either side leaves that
    target as it is. The mask is taken at the images' resolution and scaled to each target's by nearest
    neighbour. Returns the mixed images and targets; pairs image i with labeled image ``i % B_l``.
    """
    b_u, b_l = x_u.shape[0], x_l.shape[0]
    if b_l == 0 or p <= 0:
        return x_u, targets_u
    apply = torch.rand(b_u, generator=generator) < p
    donor = torch.arange(b_u, device=x_u.device) % b_l
    # Which classes each labeled image holds (B_l, K + 1): one scatter over the batch, column K for ``ignore``.
    valid = y_l != ignore
    k = int(y_l[valid].max()) + 1 if valid.any() else 0
    index = torch.where(valid, y_l, k).flatten(1)
    present = torch.zeros(b_l, k + 1, dtype=torch.bool, device=y_l.device).scatter_(1, index, True)[:, :k].cpu()
    chosen = torch.zeros(b_u, k + 1, dtype=torch.bool)  # the classes pasted into each unlabeled image
    for i in range(b_u):  # tiny CPU tensors; the generator draws as many numbers per image as the class count
        classes = present[i % b_l].nonzero()[:, 0]
        n = len(classes)
        if apply[i] and n:
            chosen[i, classes[torch.randperm(n, generator=generator)[: (n + 1) // 2]]] = True
    mask = torch.gather(chosen.to(y_l.device), 1, index[donor]).view(b_u, *y_l.shape[1:])  # (B_u, H, W)
    images = torch.where(mask[:, None], x_l[donor], x_u)

    def mix(t: torch.Tensor | None, src: torch.Tensor | float | None) -> torch.Tensor | None:
        if t is None or src is None:  # nothing to paste (a teacher output no term reads): left as it was
            return t
        value = src[donor].to(t.dtype) if isinstance(src, torch.Tensor) else torch.as_tensor(src, dtype=t.dtype)
        return torch.where(mask_like(mask, t), value.to(t.device), t)

    return images, [mix(t, src) for t, src in zip(targets_u, targets_l, strict=True)]


def contrastive_pixels(
    rep: torch.Tensor,
    t_l,
    t_u,
    y_l: torch.Tensor,
    y_u: torch.Tensor,
    ignore: int,
    inside_u: torch.Tensor | None = None,
) -> dict:
    """The flattened per-pixel inputs of :func:`u2pl_contrastive` for a labeled + unlabeled batch.

    ``rep`` (B_l + B_u, D, h, w) student representation; ``t_l`` / ``t_u`` the teacher's outputs;
    ``y_l`` ground truth and ``y_u`` pseudo-labels (255 = unreliable), downsampled to (h, w) by nearest.
    Unreliable unlabeled pixels take the teacher's argmax as their "label" (only their rank of each
    class matters for the negatives rule). ``inside_u`` (B_u, H, W) bool is False on the unlabeled
    crops' padding: those pixels are neither anchors nor negatives (None: no padding).
    """
    size, b = rep.shape[-2:], y_l.shape[0]
    t_rep = torch.cat([t_l.rep, t_u.rep]).float()
    logits = F.interpolate(torch.cat([t_l.main, t_u.main]).float(), size=size, mode="bilinear", align_corners=False)
    t_probs = torch.softmax(logits, 1)
    labels = F.interpolate(torch.cat([y_l, y_u])[:, None].float(), size=size, mode="nearest")[:, 0].long()
    is_labeled = torch.zeros_like(labels, dtype=torch.bool)
    is_labeled[:b] = True
    reliable = (~is_labeled) & (labels != ignore)
    labels = torch.where((~is_labeled) & (labels == ignore), t_probs.argmax(1), labels)
    inside = torch.ones_like(is_labeled)
    if inside_u is not None:
        inside[b:] = F.interpolate(inside_u[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    valid = (is_labeled & (labels != ignore)) | (~is_labeled & inside)
    d, c = rep.shape[1], t_probs.shape[1]
    return {
        "student_feats": rep.permute(0, 2, 3, 1).reshape(-1, d),
        "teacher_feats": t_rep.permute(0, 2, 3, 1).reshape(-1, d),
        "teacher_probs": t_probs.permute(0, 2, 3, 1).reshape(-1, c),
        "labels": labels.reshape(-1),
        "is_labeled": is_labeled.reshape(-1),
        "reliable": reliable.reshape(-1),
        "valid": valid.reshape(-1),
    }


class SelftrainStep:
    """The loss of one self-training step: ``step(batch, step_index) -> (loss, logs)``.

    ``net`` is the (possibly DDP- or compile-wrapped) student, ``teacher`` the EMA teacher or None,
    ``terms`` the round's loss terms (see :mod:`labelpipe.training.terms`). :meth:`components` are the
    stateful parts a checkpoint holds (teacher, memory bank, prototypes, running class weights).
    """

    def __init__(
        self,
        net: torch.nn.Module,
        teacher: EMATeacher | None,
        setup: TermSetup,
        names: list[str],
        *,
        alpha_t: float,
        seed: int,
        round_index: int,
        total_steps: int,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        self.net, self.teacher, self.setup = net, teacher, setup
        self.st = setup.st
        self.alpha_t, self.seed, self.round_index, self.total_steps = alpha_t, seed, round_index, total_steps
        self.rank, self.world = rank, world
        self.terms = [LOSS_TERMS[name](setup) for name in names]
        needs = set().union(*(term.needs for term in self.terms))
        self.needs = needs
        self.student_rep = "student_rep" in needs
        self.teacher_rep = "teacher_rep" in needs or self.st.denoise
        self.uses_teacher = teacher is not None and (
            "teacher" in needs or self.st.pseudo_source == "teacher" or self.st.denoise
        )
        # Denoising reads the prototypes; a term that keeps them (contrastive) folds them, else the step does.
        self.fold_own_prototypes = self.st.denoise and not any(term.updates_prototypes for term in self.terms)

    @staticmethod
    def term_needs(st: SelftrainConfig) -> set[str]:
        """What the round's terms read from the step (``labelpipe.training.terms.NEEDS``)."""
        return set().union(*(LOSS_TERMS[name].needs for name in term_names(st)))

    @staticmethod
    def needs_teacher(st: SelftrainConfig) -> bool:
        """Whether a round with these settings trains with an EMA teacher (the one place this rule lives)."""
        return "teacher" in SelftrainStep.term_needs(st) or st.pseudo_source == "teacher" or st.denoise

    @staticmethod
    def needs_student_rep(st: SelftrainConfig) -> bool:
        """Whether the student's representation head trains (is read by a term) in such a round."""
        return "student_rep" in SelftrainStep.term_needs(st)

    @classmethod
    def build(
        cls,
        config: RunConfig,
        net: torch.nn.Module,
        model: torch.nn.Module,
        num_classes: int,
        ignore_index: int,
        device: torch.device,
        *,
        round_index: int = 1,
        total_steps: int,
        rank: int = 0,
        world: int = 1,
        gather=None,
        class_weights: torch.Tensor | None = None,
    ) -> SelftrainStep:
        """The step of ``config``'s self-training round for ``model`` (the plain module ``net`` wraps);
        ``class_weights`` (C,) weight the supervised CE (``train.class_balance``; None: plain CE)."""
        st = config.selftrain
        names = term_names(st)
        needs = cls.term_needs(st)
        prototypes = (
            PrototypeBank(num_classes, config.model.rep_dim, momentum=st.prototype_momentum, device=device)
            if "prototypes" in needs or st.denoise
            else None
        )
        setup = TermSetup(
            st=st,
            num_classes=num_classes,
            ignore_index=ignore_index,
            rep_dim=config.model.rep_dim,
            crop_size=config.train.crop_size or 64,
            device=device,
            aux_weight=config.train.aux_weight,
            gather=gather,
            prototypes=prototypes,
            class_weights=class_weights,
        )
        teacher = EMATeacher(model, st.ema_momentum).to(device) if cls.needs_teacher(st) else None
        return cls(
            net,
            teacher,
            setup,
            names,
            alpha_t=config.pseudolabel.alpha_t,
            seed=config.seed,
            round_index=round_index,
            total_steps=total_steps,
            rank=rank,
            world=world,
        )

    def components(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for term in self.terms:
            out.update(term.components())
        out["prototypes"] = self.setup.prototypes
        out["teacher"] = self.teacher
        return {name: part for name, part in out.items() if part is not None}

    def generators(self, step: int) -> tuple[torch.Generator, torch.Generator | None]:
        """This process's randomness (CutMix boxes, anchors, negatives); under DDP each rank has its own
        and ``shared`` (one state on every rank) subsamples the gathered memory-bank negatives."""
        gen = torch.Generator().manual_seed(item_seed(self.seed + 100_003 * self.rank, 1000 + self.round_index, step))
        shared = (
            torch.Generator().manual_seed(item_seed(self.seed, 3000 + self.round_index, step))
            if self.world > 1
            else None
        )
        return gen, shared

    def __call__(self, batch: tuple[dict, dict], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        labeled, unlabeled = batch
        st, ignore, dev = self.st, self.setup.ignore_index, self.setup.device
        gen, shared = self.generators(step)
        x_l = labeled["image"].to(dev, non_blocking=True)
        y_l = labeled["mask"].to(dev, non_blocking=True)
        x_u = unlabeled["image"].to(dev, non_blocking=True)
        x_u_weak = unlabeled.get("image_weak", unlabeled["image"]).to(dev, non_blocking=True)
        y_u = unlabeled["mask"].to(dev, non_blocking=True)
        w_u = unlabeled["weight"].to(dev) if "weight" in unlabeled else None
        inside_u = unlabeled["valid"].to(dev) if "valid" in unlabeled else None  # False on crop padding

        # 1-2. The teacher and the targets it gives.
        alpha_t = alpha_schedule(self.alpha_t, min(step, self.total_steps), self.total_steps)
        t_l = t_u = None
        if self.uses_teacher:
            # The labeled half only feeds the prototypes and the contrastive loss.
            t_l = self.teacher(x_l, with_rep=True) if self.teacher_rep else None
            t_u = self.teacher(x_u_weak, with_rep=self.teacher_rep)
            probs_u = torch.softmax(t_u.main.float(), 1)
            if st.pseudo_source == "teacher":
                # U2PL online labels: argmax of the teacher; the alpha_t most uncertain pixels of the
                # batch (padding excluded from the percentile and from the labels) unreliable, or of
                # each predicted class of the batch (online_split: class).
                predicted = probs_u.argmax(1)
                if st.online_split == "class":
                    reliable = classwise_entropy_split_torch(pixel_entropy(probs_u), predicted, alpha_t, inside_u)
                else:
                    reliable = entropy_split_torch(pixel_entropy(probs_u), alpha_t, inside_u)
                y_u = torch.where(reliable, predicted, torch.full_like(y_u, ignore))
            if st.denoise:
                y_u = denoise_pseudo_labels(probs_u, t_u.rep, self.setup.prototypes, y_u, ignore)

        if not st.pseudo_labels:  # the control: no pseudo-label reaches the loss, pasted labeled pixels still do
            y_u = torch.full_like(y_u, ignore)

        # 3. CutMix: the teacher's outputs on the unlabeled images are mixed with the same boxes, since the
        # contrastive loss pairs them pixel by pixel with the student's features and the mixed labels.
        if st.strong_aug:
            t_main, t_rep = (t_u.main, t_u.rep) if t_u is not None else (None, None)
            x_u, (y_u, w_u, inside_u, t_main, t_rep) = cutmix(
                x_u, [y_u, w_u, inside_u, t_main, t_rep], gen, st.cutmix_p
            )
            if t_u is not None:
                t_u = t_u._replace(main=t_main, rep=t_rep)

        # 3b. DACS's ClassMix from the labeled (source) batch, on top: the pasted pixels keep their ground truth,
        # and the teacher's outputs there are its outputs on the labeled image (computed when a term reads them).
        if st.labeled_classmix_p > 0:
            if t_u is not None and t_l is None and "teacher" in self.needs:
                t_l = self.teacher(x_l, with_rep=self.teacher_rep)
            t_main, t_rep = (t_u.main, t_u.rep) if t_u is not None else (None, None)
            l_main, l_rep = (t_l.main, t_l.rep) if t_l is not None else (None, None)
            x_u, (y_u, w_u, inside_u, t_main, t_rep) = classmix_labeled(
                x_u,
                [y_u, w_u, inside_u, t_main, t_rep],
                x_l,
                [y_l, 1.0, True, l_main, l_rep],
                y_l,
                gen,
                st.labeled_classmix_p,
                ignore,
            )
            if t_u is not None:
                t_u = t_u._replace(main=t_main, rep=t_rep)

        # 4. One student forward over both halves.
        out = self.net(torch.cat([x_l, x_u]), with_rep=self.student_rep)
        b = x_l.shape[0]
        tensors = StepTensors(
            main_l=out.main[:b].float(),
            aux_l=out.aux[:b].float(),
            main_u=out.main[b:].float(),
            aux_u=out.aux[b:].float(),
            y_l=y_l,
            y_u=y_u,
            w_u=w_u,
            inside_u=inside_u,
            rep=out.rep if self.student_rep else None,
            t_l=t_l,
            t_u=t_u,
            generator=gen,
            shared=shared,
            step=step,
            alpha_t=alpha_t,
        )

        # 5. The terms, summed in order.
        loss, logs = None, {}
        for term in self.terms:
            value, term_logs = term(tensors)
            loss = value if loss is None else loss + value
            logs.update(term_logs)
        logs["kept"] = float((y_u != ignore).float().mean())
        logs["images"] = 2 * b * self.world
        if self.fold_own_prototypes:
            self.fold_prototypes(t_l, t_u, y_l, y_u, inside_u)
        return loss, logs

    def fold_prototypes(self, t_l, t_u, y_l: torch.Tensor, y_u: torch.Tensor, inside_u: torch.Tensor | None) -> None:
        """The prototypes denoising reads, from the teacher's features of labeled and reliable pixels."""
        pixels = contrastive_pixels(
            torch.cat([t_l.rep, t_u.rep]), t_l, t_u, y_l, y_u, self.setup.ignore_index, inside_u
        )
        fold_prototypes(
            self.setup.prototypes,
            pixels["teacher_feats"],
            pixels["labels"],
            pixels["is_labeled"],
            pixels["reliable"],
            pixels["valid"],
            self.setup.ignore_index,
            gather=self.setup.gather,
        )
