"""``labelpipe selftrain --rounds K``: rounds of predict -> pseudolabel -> retrain.

Round k (``selftrain/round-k/``): ``predict/`` with the current model, ``pseudolabel/`` with the
method and the round's labeling ratio ``alphas[k-1]``, then ``train/``: starting from the previous
round's weights, on equal batches of labeled (or source) images and pseudo-labeled unlabeled images.
An online round (``selftrain.pseudo_source: teacher``, U2PL's regime) labels every batch with its mean
teacher as it trains: it has no stored labels to read, so it is ``train/`` alone.

One training step is :class:`labelpipe.training.selftrain_step.SelftrainStep`: the teacher, the
targets (stored or online pseudo-labels, denoising), CutMix, one student forward and the round's loss
terms (supervised + unsupervised CE/SCE or rectified [+ contrastive]; ``labelpipe.training.terms``).
This verb owns the rounds: each calls ``labelpipe.inference.predictions.predict_store``,
``labelpipe.pseudo.run_store.label_run_store``, then trains on ``labelpipe.training.selftrain_data``'s
batches with ``labelpipe.training.loop.train``.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from labelpipe.config import RunConfig, TrainConfig
from labelpipe.context import (
    StageContext,
    checked_model_path,
    class_prior,
    model_from_config,
    model_path,
    open_context,
    write_config,
)
from labelpipe.data.base import preflight
from labelpipe.errors import Interrupted, LabelpipeError
from labelpipe.inference.predictions import predict_store
from labelpipe.pseudo.labelling import settings_from
from labelpipe.pseudo.run_store import label_run_store
from labelpipe.runtime import Runtime, all_gather_rows, barrier, seed_everything
from labelpipe.store.atomic import atomic_write_json, sha256_file, sha256_json
from labelpipe.store.checkpoint import load_model_weights, save_model
from labelpipe.store.lock import run_lock
from labelpipe.store.manifest import StageDir
from labelpipe.training.curves import round_history
from labelpipe.training.loop import TrainJob, train
from labelpipe.training.selftrain_data import calibrate_representation, round_batches
from labelpipe.training.selftrain_step import SelftrainStep
from labelpipe.training.setup import for_training, make_validator, model_metadata, supervised_class_weights


def train_round(ctx: StageContext, k: int, init_model: Path, labels_path: Path | None, out: StageDir) -> dict:
    """Round ``k``'s training into ``out`` (``model.safetensors``, ``metrics.json``, the log): from the
    weights ``init_model`` on the labeled images and the pseudo-labels ``labels_path`` (None: an online
    round, labelled by its teacher); resumes a killed round, or reports it up to date. Returns the last
    validation's metrics."""
    config, rt = ctx.config, ctx.runtime
    cfg, st = round_train_config(config), config.selftrain
    steps = st.steps or cfg.steps
    if labels_path is not None:
        _check_round_labels(ctx, labels_path)
    inputs = {
        "round": k,
        "init": sha256_file(init_model),
        "labels": sha256_file(labels_path) if labels_path is not None else "online",
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

    model, net, objective = round_model(ctx, k, init_model)
    teacher = objective.teacher

    batches = round_batches(ctx, k, labels_path, cfg, steps, weak_view=teacher is not None and st.strong_aug)

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
                extras=objective.components(),
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


def round_train_config(config: RunConfig) -> TrainConfig:
    """The training settings of a round: ``train`` at ``selftrain.lr`` when set (rounds fine-tune a trained
    model, often at a lower rate than pretraining)."""
    lr = config.selftrain.lr
    return config.train if lr is None else config.train.model_copy(update={"lr": lr})


def round_model(ctx: StageContext, k: int, init_model: Path):
    """Round ``k``'s plain model (from the weights ``init_model``), the module that trains (``for_training``)
    and its step (:class:`SelftrainStep`), seeded as the round is."""
    config, rt = ctx.config, ctx.runtime
    cfg, st = round_train_config(config), config.selftrain
    seed_everything(config.seed + k)
    model = model_from_config(config, ctx.source.num_classes, with_backbone_weights=False)
    load_model_weights(init_model, model)
    if st.head_dropout is not None:
        model.set_head_dropout(st.head_dropout)
    rep = SelftrainStep.needs_student_rep(st)
    net = for_training(model, rt, cfg, uses_rep=rep)
    if rep or st.denoise:
        calibrate_representation(ctx, model, ctx.source.split(ctx.roles["labeled"]), cfg)
    objective = SelftrainStep.build(
        config.model_copy(update={"train": cfg}),
        net,
        model,
        ctx.source.num_classes,
        ctx.source.ignore_index,
        rt.device,
        round_index=k,
        total_steps=st.steps or cfg.steps,
        rank=rt.rank,
        world=rt.world,
        gather=all_gather_rows if rt.distributed else None,
        class_weights=supervised_class_weights(ctx, cfg, rt.device),
    )
    return model, net, objective


def _check_round_labels(ctx: StageContext, labels_path: Path) -> None:
    """What a round reads must be what the earlier steps wrote (never a truncated or swapped file), and
    made from the round's current prediction store (the labels record the store's hash)."""
    labels_stage = StageDir(labels_path.parent)
    labels_stage.check_output(labels_path.name, f"labelpipe selftrain --run {ctx.run_dir}")
    store_stage = StageDir(labels_path.parent.parent / "predict")
    made_from = (labels_stage.manifest() or {}).get("inputs", {}).get("store")
    store_hash = (store_stage.manifest() or {}).get("outputs", {}).get("predictions.h5")
    if made_from and store_hash and made_from != store_hash:
        raise LabelpipeError(
            f"{labels_path}: made from another prediction store than {store_stage.path / 'predictions.h5'}; "
            f"run `labelpipe selftrain --run {ctx.run_dir}` again to relabel"
        )


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
    for k in range(1, st.rounds + 1):
        round_ctx = replace(ctx, config=config.for_round(k))  # selftrain.round_overrides applied
        rst = round_ctx.config.selftrain
        round_dir = run_dir / "selftrain" / f"round-{k}"
        labels = None
        if rst.pseudo_source == "stored":
            alpha = rst.alphas[min(k - 1, len(rst.alphas) - 1)]
            store = predict_store(round_ctx, previous, round_dir / "predict")
            # The rounds label with selftrain's method.
            pl_config = round_ctx.config.model_copy(
                update={"pseudolabel": round_ctx.config.pseudolabel.model_copy(update={"method": rst.method})}
            )
            settings = settings_from(pl_config, alpha)
            labels = label_run_store(
                replace(ctx, config=pl_config), settings, store, round_dir / "pseudolabel", quiet=not runtime.is_main
            )
            barrier()
        elif runtime.is_main:
            print(f"round {k}: online pseudo-labels from the mean teacher (no stored labels to predict)")
        init = checked_model_path(run_dir, previous)
        rounds[f"round-{k}"] = train_round(round_ctx, k, init, labels, StageDir(round_dir / "train"))
        previous = f"round-{k}"
    return rounds
