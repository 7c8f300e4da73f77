"""``labelpipe selftrain --rounds K``: rounds of predict -> pseudolabel -> retrain.

Round k (``selftrain/round-k/``): ``predict/`` with the current model, ``pseudolabel/`` with the
method and the round's labeling ratio ``alphas[k-1]``, then ``train/``: starting from the previous
round's weights, on equal batches of labeled (or source) images and pseudo-labeled unlabeled images.

One training step (all losses from ``labelpipe.losses``; ALGORITHMS.md sections 3-4):

    sup     = CE(main, y) + aux_weight * CE(aux, y)                      labeled batch
    target  = stored pseudo-labels | teacher's online labels (entropy split, alpha_t schedule)
              [--denoise: argmax(w * p) with prototype weights w]
    unsup   = lambda_u * CE|SCE(main_u, target) [* exp(-variance) weights]  (Eq. 14)
              or, with --rectified, rectified_loss(main_u, aux_u, target)   (seed 000)
    contra  = lambda_c * u2pl_contrastive(student rep, teacher rep, ...)    (U2PL+ Eq. 21-28)
    loss    = sup + unsup + contra

The EMA teacher, memory bank and prototypes are in the checkpoint; the per-step randomness
(CutMix boxes, anchor / negative sampling) is seeded by (seed, round, step) and, under DDP, the
rank, so a killed round resumes on the same trajectory.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from labelpipe.config import RunConfig
from labelpipe.data.base import preflight
from labelpipe.data.dataset import SegmentationDataset, collate, item_seed
from labelpipe.data.transforms import strong_photometric, weak_transform
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.losses import (
    MemoryBank,
    OftenBalance,
    PrototypeBank,
    fold_prototypes,
    masked_ce,
    prototype_weights,
    rectified_loss,
    symmetric_ce,
    u2pl_contrastive,
    unsupervised_ce_weight,
)
from labelpipe.pseudo import alpha_schedule, entropy_split_torch
from labelpipe.runtime import Runtime, all_gather_rows, barrier, seed_everything
from labelpipe.stages.common import (
    StageContext,
    checked_model_path,
    class_prior,
    model_path,
    open_context,
    write_config,
)
from labelpipe.stages.curves import round_history
from labelpipe.stages.predict import run_predict
from labelpipe.stages.pretrain import for_training, make_validator, model_metadata, step_loader
from labelpipe.stages.pseudolabel import run_pseudolabel
from labelpipe.stages.training import TrainJob, train
from labelpipe.store.atomic import atomic_write_json, sha256_file, sha256_json
from labelpipe.store.checkpoint import load_model_weights, save_model
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir
from labelpipe.store.prediction_store import escape_id
from labelpipe.teacher import EMATeacher


class LabelStoreReader:
    """Pseudo-labels (and weights) of ``labels.h5`` by dataset index; opens lazily per process."""

    def __init__(self, path: Path, ids: list[str]) -> None:
        self.path, self.ids = path, ids
        self._file: h5py.File | None = None
        self._pid = -1

    def _images(self) -> h5py.Group:
        if self._file is None or self._pid != os.getpid():
            self._file, self._pid = h5py.File(self.path, "r"), os.getpid()
        return self._file["images"]

    def label(self, index: int) -> np.ndarray:
        return self._images()[escape_id(self.ids[index])]["label"][()]

    def weight(self, index: int) -> np.ndarray:
        return self._images()[escape_id(self.ids[index])]["weight"][()].astype(np.float32)

    def has_weights(self) -> bool:
        return len(self.ids) > 0 and "weight" in self._images()[escape_id(self.ids[0])]


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

    def mix(t: torch.Tensor) -> torch.Tensor:
        m = box
        if t.shape[-2:] != m.shape[-2:]:
            m = F.interpolate(m[:, None].float(), size=t.shape[-2:], mode="nearest")[:, 0].bool()
        m = m.view(b, *([1] * (t.dim() - 3)), *m.shape[-2:])
        return torch.where(m, t[donor], t)

    return images, [None if t is None else mix(t) for t in targets]


def denoise_labels(
    probs: torch.Tensor, rep: torch.Tensor, prototypes: PrototypeBank, labels: torch.Tensor, ignore: int
) -> torch.Tensor:
    """U2PL+ prototypical denoising of the kept pseudo-labels (B, H, W): ``argmax_c w_c p_c``.

    The prototype weights ``w`` (B, C, h, w) are computed on the representation (stride 4) and
    upsampled bilinearly to the probabilities' resolution; the argmax is taken there, so a label the
    prototypes do not change keeps its full-resolution boundary. (Upsampling the 256-d features
    instead would hold 135 MB at 2 x 257 x 257 and cost ~10 % of a step.)
    """
    weights = prototype_weights(rep.float(), prototypes)
    weights = F.interpolate(weights, size=probs.shape[-2:], mode="bilinear", align_corners=False)
    denoised = (weights * probs.float()).argmax(1)
    return torch.where(labels != ignore, denoised, labels)


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


class RoundObjective:
    """The loss of one self-training step; the stateful parts are exposed for checkpoints."""

    def __init__(
        self,
        ctx: StageContext,
        net: torch.nn.Module,
        teacher: EMATeacher | None,
        round_index: int,
        total_steps: int,
    ) -> None:
        self.ctx, self.net, self.teacher = ctx, net, teacher
        self.cfg, self.st = ctx.config.train, ctx.config.selftrain
        self.round_index, self.total_steps = round_index, total_steps
        self.ignore = ctx.source.ignore_index
        c, d = ctx.source.num_classes, ctx.config.model.rep_dim
        device = ctx.runtime.device
        # Only what this round reads: a full memory bank is C x capacity x D floats (Cityscapes: 557 MiB).
        self.memory = MemoryBank(c, d, capacity=self.st.memory_capacity, device=device) if self.st.contrastive else None
        self.prototypes = (
            PrototypeBank(c, d, momentum=self.st.prototype_momentum, device=device)
            if self.st.contrastive or self.st.denoise
            else None
        )
        # The rectification authors' rare-class weights; their 64 x 64 pixels at 512 x 256 crops scale with the crop.
        crop = ctx.config.train.crop_size or 64
        self.often_balance = (
            OftenBalance(c, self.st.rectified_max_value, min_pixels=64 * 64 * crop * crop / (512 * 256))
            if self.st.rectified and self.st.rectified_class_balance
            else None
        )

    def extras(self) -> dict[str, Any]:
        out = {
            "memory": self.memory,
            "prototypes": self.prototypes,
            "teacher": self.teacher,
            "often_balance": self.often_balance,
        }
        return {name: part for name, part in out.items() if part is not None}

    def __call__(self, batch: tuple[dict, dict], step: int) -> tuple[torch.Tensor, dict[str, float]]:
        labeled, unlabeled = batch
        rt = self.ctx.runtime
        dev = rt.device
        st, ignore = self.st, self.ignore
        seed = self.ctx.config.seed
        # This process's randomness (CutMix boxes, anchors, negatives); under DDP each rank has its own
        # and `shared` (one state on every rank) subsamples the gathered memory-bank negatives.
        gen = torch.Generator().manual_seed(item_seed(seed + 100_003 * rt.rank, 1000 + self.round_index, step))
        shared = (
            torch.Generator().manual_seed(item_seed(seed, 3000 + self.round_index, step)) if rt.distributed else None
        )
        x_l = labeled["image"].to(dev, non_blocking=True)
        y_l = labeled["mask"].to(dev, non_blocking=True)
        x_u = unlabeled["image"].to(dev, non_blocking=True)
        x_u_weak = unlabeled.get("image_weak", unlabeled["image"]).to(dev, non_blocking=True)
        y_u = unlabeled["mask"].to(dev, non_blocking=True)
        w_u = unlabeled["weight"].to(dev) if "weight" in unlabeled else None
        inside_u = unlabeled["valid"].to(dev) if "valid" in unlabeled else None  # False on crop padding

        need_teacher = self.teacher is not None and (st.pseudo_source == "teacher" or st.contrastive or st.denoise)
        t_out = None
        if need_teacher:
            t_rep = st.contrastive or st.denoise
            # The labeled half only feeds the prototypes and the contrastive loss.
            t_l = self.teacher(x_l, with_rep=t_rep) if t_rep else None
            t_u = self.teacher(x_u_weak, with_rep=t_rep)
            t_out = (t_l, t_u)
            probs_u = torch.softmax(t_u.main.float(), 1)
            if st.pseudo_source == "teacher":
                # U2PL online labels: argmax of the teacher; the alpha_t most uncertain pixels of the
                # batch (padding excluded from the percentile and from the labels) unreliable.
                alpha_t = alpha_schedule(self.ctx.config.pseudolabel.alpha_t, step, self.total_steps)
                entropy = -(probs_u * torch.log(probs_u.clamp_min(1e-12))).sum(1)
                reliable = entropy_split_torch(entropy, alpha_t, inside_u)
                y_u = torch.where(reliable, probs_u.argmax(1), torch.full_like(y_u, ignore))
            if st.denoise:
                y_u = denoise_labels(probs_u, t_u.rep, self.prototypes, y_u, ignore)

        if st.strong_aug:
            # The teacher's outputs on the unlabeled images are mixed with the same boxes: the contrastive
            # loss pairs them pixel by pixel with the student's features and the mixed labels.
            t_main, t_rep = (t_out[1].main, t_out[1].rep) if t_out is not None else (None, None)
            mixed = cutmix(x_u, [y_u, w_u, inside_u, t_main, t_rep], gen, st.cutmix_p)
            x_u, (y_u, w_u, inside_u, t_main, t_rep) = mixed
            if t_out is not None:
                t_out = (t_out[0], t_out[1]._replace(main=t_main, rep=t_rep))

        out = self.net(torch.cat([x_l, x_u]), with_rep=st.contrastive)
        b = x_l.shape[0]
        main_l, main_u = out.main[:b].float(), out.main[b:].float()
        aux_l, aux_u = out.aux[:b].float(), out.aux[b:].float()
        sup = F.cross_entropy(main_l, y_l, ignore_index=ignore) + self.cfg.aux_weight * F.cross_entropy(
            aux_l, y_l, ignore_index=ignore
        )
        if st.rectified:
            unsup = rectified_loss(
                main_u,
                aux_u,
                y_u,
                ignore_index=ignore,
                kl_direction=st.rectified_kl_direction,
                mean_over=st.rectified_mean_over,
                aux_weight=st.rectified_aux_weight,
                class_weight=self.often_balance(y_u, ignore) if self.often_balance is not None else None,
                align_corners=st.rectified_align_corners,
            )
        else:
            lam = unsupervised_ce_weight(y_u, st.unsup_weight, ignore)
            if st.loss == "sce":
                unsup = lam * symmetric_ce(main_u, y_u, *st.sce_xi, ignore, log_zero=st.sce_log_zero, weight=w_u)
            else:
                unsup = lam * masked_ce(main_u, y_u, ignore, weight=w_u)
        loss = sup + unsup
        logs = {
            "loss_sup": float(sup.detach()),
            "loss_unsup": float(unsup.detach()),
            "kept": float((y_u != ignore).float().mean()),
            "images": 2 * b * self.ctx.runtime.world,
        }
        if st.denoise and not st.contrastive:  # the contrastive loss keeps the prototypes otherwise
            self.fold_prototypes(t_out, y_l, y_u, inside_u)
        if st.contrastive and t_out is not None:
            contra, stats = self.contrastive(out.rep, t_out, y_l, y_u, inside_u, gen, shared)
            loss = loss + st.lambda_contrastive * contra
            logs["loss_contrastive"] = float(contra.detach())
            logs["contrastive_classes"] = stats["classes"]
        return loss, logs

    def fold_prototypes(self, t_out, y_l: torch.Tensor, y_u: torch.Tensor, inside_u: torch.Tensor | None) -> None:
        """The prototypes denoising reads, from the teacher's features of labeled and reliable pixels."""
        t_l, t_u = t_out
        pixels = contrastive_pixels(torch.cat([t_l.rep, t_u.rep]), t_l, t_u, y_l, y_u, self.ignore, inside_u)
        fold_prototypes(
            self.prototypes,
            pixels["teacher_feats"],
            pixels["labels"],
            pixels["is_labeled"],
            pixels["reliable"],
            pixels["valid"],
            self.ignore,
            gather=all_gather_rows if self.ctx.runtime.distributed else None,
        )

    def contrastive(self, rep: torch.Tensor, t_out, y_l, y_u, inside_u, gen: torch.Generator, shared):
        """U2PL+ contrastive term on the representation map (labels downsampled by nearest)."""
        t_l, t_u = t_out
        st = self.st
        return u2pl_contrastive(
            **contrastive_pixels(rep, t_l, t_u, y_l, y_u, self.ignore, inside_u),
            memory=self.memory,
            prototypes=self.prototypes,
            num_anchors=st.contrastive_anchors,
            num_negatives=st.contrastive_negatives,
            temperature=st.contrastive_temperature,
            r_l=st.contrastive_r_l,
            r_h=st.contrastive_r_h,
            anchor_threshold=st.contrastive_anchor_threshold,
            generator=gen,
            ignore_index=self.ignore,
            gather=all_gather_rows if self.ctx.runtime.distributed else None,
            shared_generator=shared,
        )


def _zip_batches(a, b):
    def batches(start: int):
        return zip(a(start), b(start), strict=False)

    return batches


def calibrate_representation(ctx: StageContext, model, labeled: list, cfg, images: int = 64) -> None:
    """BatchNorm statistics of a representation head that pretraining never ran (see the model's method):
    from weakly augmented crops of the first labeled images, deterministic in the seed."""
    dataset = SegmentationDataset(ctx.source, labeled, weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip))
    n = min(images, len(dataset))
    keys = [(i, item_seed(ctx.config.seed, -1, i)) for i in range(n)]
    device = ctx.runtime.device

    def batches():
        for start in range(0, n, cfg.batch_size):
            yield collate([dataset[key] for key in keys[start : start + cfg.batch_size]])["image"].to(device)

    if model.calibrate_representation(batches()) and ctx.runtime.is_main:
        print(f"calibrated the representation head's BatchNorm statistics on {n} labeled images")


def train_round(ctx: StageContext, k: int, init_model: Path, labels_path: Path, out: StageDir) -> dict:
    config, rt = ctx.config, ctx.runtime
    cfg, st = config.train, config.selftrain
    if st.lr is not None:  # rounds fine-tune a trained model: often at a lower rate than pretraining
        cfg = cfg.model_copy(update={"lr": st.lr})
    steps = st.steps or cfg.steps
    # What this round reads must be what the earlier steps wrote (never a truncated or swapped file).
    labels_stage = StageDir(labels_path.parent)
    labels_stage.check_output(labels_path.name, f"labelpipe selftrain --run {ctx.run_dir}")
    # ... and made from the round's current prediction store (the labels record the store's hash).
    store_stage = StageDir(labels_path.parent.parent / "predict")
    made_from = (labels_stage.manifest() or {}).get("inputs", {}).get("store")
    store_hash = (store_stage.manifest() or {}).get("outputs", {}).get("predictions.h5")
    if made_from and store_hash and made_from != store_hash:
        raise LabelpipeError(
            f"{labels_path}: made from another prediction store than {store_stage.path / 'predictions.h5'}; "
            f"run `labelpipe selftrain --run {ctx.run_dir}` again to relabel"
        )
    labeled = ctx.source.split(ctx.roles["labeled"])
    unlabeled = ctx.source.split(config.predict.split or ctx.roles["unlabeled"])
    inputs = {
        "round": k,
        "init": sha256_file(init_model),
        "labels": sha256_file(labels_path),
        "selftrain": st.fingerprint_fields(),
        "seed": config.seed,
        "train": cfg.fingerprint_fields(),
    }
    fingerprint = sha256_json(inputs)
    if out.is_up_to_date(fingerprint):
        if rt.is_main:
            print(f"round {k} train: up to date ({out.path})")
        return out.manifest().get("summary", {})
    if rt.is_main:
        out.begin("selftrain-train", fingerprint, inputs)

    seed_everything(config.seed + k)
    from labelpipe.stages.common import model_from_config

    model = model_from_config(config, ctx.source.num_classes, with_backbone_weights=False)
    load_model_weights(init_model, model)
    net = for_training(model, rt, cfg, uses_rep=st.contrastive)
    if st.contrastive or st.denoise:
        calibrate_representation(ctx, model, labeled, cfg)
    teacher = (
        EMATeacher(model, st.ema_momentum).to(rt.device)
        if (st.pseudo_source == "teacher" or st.contrastive or st.denoise)
        else None
    )

    strength = 1.0 + 0.5 * (k - 1)  # DARS IT: stronger augmentation in later rounds
    weak = weak_transform(cfg.crop_size, cfg.scale_range, cfg.hflip)
    reader = LabelStoreReader(labels_path, [s.id for s in unlabeled])
    labeled_ds = SegmentationDataset(ctx.source, labeled, weak)
    unlabeled_ds = SegmentationDataset(
        ctx.source,
        unlabeled,
        weak,
        photometric=strong_photometric(strength) if st.strong_aug else None,
        require_masks=False,
        masks=reader.label,
        weights=reader.weight if reader.has_weights() else None,
        pad_mask=True,
    )
    # The teacher sees the weak view: the same geometry without the photometric part.
    unlabeled_weak_ds = SegmentationDataset(ctx.source, unlabeled, weak, require_masks=False, masks=reader.label)
    objective = RoundObjective(ctx, net, teacher, k, steps)

    lab_batches = step_loader(ctx, labeled_ds, cfg.batch_size, config.seed + 7919 * k, steps)
    unl_batches = step_loader(ctx, unlabeled_ds, cfg.batch_size, config.seed + 104729 * k, steps)
    if teacher is not None and st.strong_aug:
        weak_batches = step_loader(ctx, unlabeled_weak_ds, cfg.batch_size, config.seed + 104729 * k, steps)

        def unl_with_weak(start: int):
            for strong, weak_batch in zip(unl_batches(start), weak_batches(start), strict=False):
                strong["image_weak"] = weak_batch["image"]
                yield strong

        batches = _zip_batches(lab_batches, unl_with_weak)
    else:
        batches = _zip_batches(lab_batches, unl_batches)

    def after_step(step: int) -> None:
        if teacher is not None:
            teacher.update(net, step)

    try:
        last_val = train(
            TrainJob(
                stage_dir=out.path,
                model=net,
                total_steps=steps,
                batches=batches,
                objective=objective,
                cfg=cfg,
                runtime=rt,
                fingerprint=fingerprint,
                validate=make_validator(ctx),
                extras=objective.extras(),
                after_step=after_step,
                description=f"round {k}",
                curve_rounds=lambda: round_history(ctx.run_dir / "selftrain", k),
            )
        )
    except BaseException as exc:
        if rt.is_main and not isinstance(exc, KeyboardInterrupt | Interrupted):
            out.fail(f"{type(exc).__name__}: {exc}")
        raise
    if rt.is_main:
        save_model(out.path / "model.safetensors", model, model_metadata(config, ctx, f"round-{k}"))
        atomic_write_json(out.path / "metrics.json", last_val)
        out.finish(["model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl"], last_val)
    barrier()
    return last_val


def run_selftrain(config: RunConfig, run_dir: Path, runtime: Runtime, force: bool = False) -> dict:
    ctx = open_context(config, run_dir, runtime)
    with run_lock(run_dir, "selftrain", enabled=runtime.is_main):
        return _run_selftrain(ctx, run_dir, runtime, force)


def _run_selftrain(ctx: StageContext, run_dir: Path, runtime: Runtime, force: bool) -> dict:
    config = ctx.config  # with defaults that depend on the data resolved
    st = config.selftrain
    if not model_path(run_dir, "pretrain").is_file():
        raise LabelpipeError(f"{run_dir}: no pretrained model; run `labelpipe pretrain --run {run_dir}` first")
    # Validate, then act: the model, the data and the masks are checked before --force removes the rounds.
    checked_model_path(run_dir, "pretrain")
    preflight(ctx.source.split(ctx.roles["labeled"]))
    preflight(ctx.source.split(config.predict.split or ctx.roles["unlabeled"]), with_masks=False)
    class_prior(ctx, ctx.roles["labeled"])
    if force and runtime.is_main and (run_dir / "selftrain").exists():
        shutil.rmtree(run_dir / "selftrain")
    barrier()
    write_config(ctx)
    rounds: dict[str, Any] = {}
    previous = "pretrain"
    pl_config = config.model_copy(update={"pseudolabel": config.pseudolabel.model_copy(update={"method": st.method})})
    for k in range(1, st.rounds + 1):
        round_dir = run_dir / "selftrain" / f"round-{k}"
        alpha = st.alphas[min(k - 1, len(st.alphas) - 1)]
        store = run_predict(config, run_dir, runtime, model_name=previous, out_dir=round_dir / "predict")
        labels = run_pseudolabel(
            pl_config,
            run_dir,
            runtime,
            store_path=store,
            out_dir=round_dir / "pseudolabel",
            alpha=alpha,
            quiet=not runtime.is_main,
        )
        barrier()
        init = checked_model_path(run_dir, previous)
        rounds[f"round-{k}"] = train_round(ctx, k, init, labels, StageDir(round_dir / "train"))
        previous = f"round-{k}"
    return rounds
