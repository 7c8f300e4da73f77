"""Estimate the peak GPU memory of one training step of the stages/ recipes, without a GPU.

How: the step runs under ``torch._subclasses.fake_tensor.FakeTensorMode`` (tensors carry shapes,
dtypes and storages but no data and no compute) and is measured with
``torch.distributed._tools.mem_tracker.MemTracker``, a TorchDispatchMode that adds up the bytes of
every live tensor storage and records the peak. MemTracker works in fake mode for this model, so the
fallback (own accounting) was not needed. Two adjustments: ``PeakTracker`` skips MemTracker's
per-module peak snapshots (unused here, 4-5x faster, same totals), and frozen parameters (the EMA
teacher's, an unread representation head's) are pre-marked as hooked: MemTracker registers a
gradient hook on every parameter of a module it sees run, which torch refuses without requires_grad.

The fake tensors live on the CPU: fake CUDA tensors build, but autograd's backward asks the (absent)
CUDA driver for a device context and fails. Consequences: MemTracker's 512-byte CUDA rounding is not
applied (negligible), and bf16 runs under ``torch.autocast("cpu", torch.bfloat16)``, not CUDA
autocast as labelpipe does on a GPU (labelpipe/context.py). The two autocast op lists differ
slightly (e.g. CUDA runs softmax in fp32, CPU in bf16); for this model's ops (conv, batch norm, relu,
pooling, interpolate, cat, cross-entropy) the output dtypes agree. channels_last (used on CUDA) is
left out: same bytes.

One step, as labelpipe's training loop runs it (labelpipe/training/loop.py ``train``): the
objective under autocast, then ``zero_grad(set_to_none=True)``, ``backward``, ``optimizer.step``
(and the EMA teacher's update). A warm-up step runs first, untracked, so the measured step is a
steady-state one: the previous step's gradients are still allocated during the forward (zero_grad
comes after the objective) and the optimizer state exists. The optimizer is the recipe's
(labelpipe.training.loop.build_optimizer: SGD with momentum or AdamW, two parameter groups) with
``foreach=True``, the implementation torch picks for CUDA tensors (its list-wide temporaries, e.g. a
full copy of the gradients for SGD's weight decay, count at the optimizer step).

- pretrain (labelpipe/stages/pretrain.py): B images -> CE(main) + aux_weight * CE(aux), ignore 255;
  no representation head (``with_rep=False``, frozen).
- selftrain: labelpipe's own step, :class:`labelpipe.training.selftrain_step.SelftrainStep`, built with
  ``SelftrainStep.build(config, student, ...)`` from the recipe's config as ``labelpipe selftrain`` builds
  it, fed a random batch as the stage's loaders give it (labeled image + mask; unlabeled strong image,
  the weak view for the teacher where the recipe has one and CutMix, stored labels, variance weights for
  the variance method, the crops' padding mask). So everything the step computes is measured: the EMA
  teacher (a second model copy, no grad) where the recipe needs one, its online labels and prototype
  denoising, CutMix, one student forward with the representation head only where a term reads it, the
  recipe's loss terms (CE / SCE / rectified, contrastive), and the state the step allocates (the memory
  bank, C x memory_capacity x rep_dim fp32: 557 MiB for 19 classes, only with the contrastive loss;
  prototypes). What fake tensors cannot run is adapted around the step, not copied into it:
  * ``EMATeacher`` deep-copies the student, which fake tensors cannot: the copy is the architecture
    built again (:class:`Rebuilt`), given the student's weights by the teacher's update at step 0;
  * reading a fake tensor's value gives 1 (:class:`FakeScalarsReadOne`): the step's log values
    (``float(loss)``) and AdamW's step count (its bias correction ``1 - beta ** step`` divides by zero at 0);
  * the online entropy split indexes the valid pixels (a data-dependent shape): the fake batch carries
    no padding mask (a kept copy of <= B x H x W floats, negligible);
  * u2pl_contrastive has data-dependent shapes (nonzero): the contrastive term is replaced by a stand-in
    (:class:`StandInContrastive`) that allocates what it would hold at once: the real contrastive_pixels
    inputs, class ranks, the negatives mask, the gathered negative keys (assumed 2 per labeled pixel and
    min(r_h, C) - r_l = 17 per unreliable unlabeled pixel, alpha_t at its start value) and M anchors for
    every class, with gradient to the representation head;
  * the step calls the teacher twice at the top level, which MemTracker takes for a second iteration:
    :class:`PeakTracker` restarts that module's (unused) per-module statistics.

Per-GPU batch: the recipes give no GPU counts, so there are rows for per-GPU batches 2, 4 and 8 below
the recipe batch (recipe batch / that many GPUs under torchrun + DDP) and for the recipe batch on one
GPU (``labelpipe run`` without torchrun); ``--batch`` picks others. With more than one GPU, DDP's
gradient buckets (one more copy of the gradients) are added as state. Selftrain uses the per-GPU
batch for the labeled and for the unlabeled half: the student sees 2 x per-GPU batch images.

Columns: "params+grads+opt" = student parameters, buffers, gradients and optimizer state;
"other state" = EMA teacher, memory bank and prototypes, DDP buckets; "act+temp peak" = everything
else live at the peak (activations saved for backward, the batch, autocast's cached bf16 weight
copies, loss tensors, backward / optimizer temporaries) = total peak - the two state columns.

MemTracker's module hooks would keep the outputs of a module that no loss reads alive until the step
ends (labelpipe frees them when the objective returns); no such module runs here: the
representation head runs only where a loss reads it (``with_rep``) and is frozen otherwise, as in
labelpipe.training.setup.for_training.

Not included (printed with the table): the CUDA context (~0.5 GiB per process), cuDNN / cuBLAS
workspaces (algorithm-dependent, larger with cudnn.benchmark), the caching allocator's rounding and
fragmentation (+10-20 %), NCCL buffers, torch.compile, validation passes.

``--validate`` checks the estimator on small settings (resnet18 OS16, crop 64 and 128, 19 classes, batch 4)
against the same step on real CPU tensors, measured twice: by MemTracker (shows what fake mode
changes: nothing for pretrain, up to 0.1 MiB; the selftrain stand-in, below) and by the CPU allocator's
own allocation / free events from torch.profiler (independent of MemTracker). Its selftrain row runs the
real u2pl_contrastive on real tensors; with random weights no class has anchors (p > 0.3) there, while
the stand-in assumes all C classes do (C x M x D x 8 bytes: ~9 MiB at that size, negligible at the recipes' sizes).

    python benchmarks/gpu_memory.py [--recipes demo stages/voc_semi_1464.yaml ...] [--batch N ...]
                                    [--precision fp32 bf16]
    python benchmarks/gpu_memory.py --validate
"""

from __future__ import annotations

import argparse
import contextlib
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from torch.utils._python_dispatch import TorchDispatchMode

from labelpipe.config import DataConfig, RunConfig, resolve_config
from labelpipe.context import model_from_config
from labelpipe.losses import MemoryBank, PrototypeBank, class_ranks
from labelpipe.teacher import EMATeacher
from labelpipe.training.loop import build_optimizer
from labelpipe.training.selftrain_step import SelftrainStep, contrastive_pixels
from labelpipe.training.terms import Contrastive, StepTensors, TermSetup

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_RECIPES = ("cityscapes_semi_1_8", "voc_semi_1464", "gta5_to_cityscapes", "synthia_to_cityscapes", "demo")
PER_GPU_BATCHES = (2, 4, 8)
IGNORE = 255
MIB, GIB = 2**20, 2**30
# u2pl_contrastive's rank window (its defaults) and the negatives per labeled pixel assumed for a
# trained teacher: the top r_l = 3 classes minus the label itself.
R_L, R_H, NEGATIVES_PER_LABELED = 3, 20, 2
NOT_INCLUDED = (
    "Not included: CUDA context (~0.5 GiB per process), cuDNN/cuBLAS workspaces, caching-allocator rounding "
    "and fragmentation (add 10-20 %), NCCL buffers. Plan for about total x 1.15 + 0.5 GiB per GPU."
)


# ---------------------------------------------------------------------------------------------------
# Settings


def num_classes_of(data: DataConfig) -> int:
    """Classes of the recipe's data set, from the adapters' class lists (no data needed)."""
    if data.root is None:
        from labelpipe.data.digitscapes import CLASSES
    elif data.kind in ("cityscapes", "gta5"):
        from labelpipe.data.cityscapes import CLASSES
    elif data.kind == "voc":
        from labelpipe.data.voc import CLASSES
    elif data.kind == "synthia":
        from labelpipe.data.synthia import CLASSES
    else:
        raise SystemExit(f"data.kind={data.kind!r}: the class count is in the data set; not supported here")
    return len(CLASSES)


@dataclass(frozen=True)
class Setting:
    name: str
    config: RunConfig
    num_classes: int

    @property
    def crop(self) -> int:
        return self.config.train.crop_size or 512  # labelpipe's default: the image size, at most 512

    @property
    def uses_teacher(self) -> bool:
        return SelftrainStep.needs_teacher(self.config.selftrain)

    @property
    def stages(self) -> list[str]:
        return [s for s in ("pretrain", "selftrain") if s in self.config.pipeline]


def load_setting(recipe: str) -> Setting:
    path = Path(recipe)
    if not path.suffix:
        path = ROOT / "stages" / f"{recipe}.yaml"
    config = resolve_config(None, recipe=path)
    return Setting(path.stem, config, num_classes_of(config.data))


def small_setting(stage: str, crop: int = 64) -> Setting:
    """The validation setting: resnet18 OS16, 19 classes; selftrain with every teacher feature on."""
    raw = {
        "pipeline": ["pretrain", "selftrain"],
        "model": {"backbone": "resnet18", "output_stride": 16, "aspp_rates": [1, 2, 3]},
        "train": {"crop_size": crop, "batch_size": 4, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
        "selftrain": {
            "method": "entropy",
            "loss": "sce",
            "pseudo_source": "teacher",
            "contrastive": True,
            "denoise": True,
            "memory_capacity": 2000,
        },
    }
    return Setting(f"small-{stage}-{crop}", RunConfig.model_validate(raw), 19)


# ---------------------------------------------------------------------------------------------------
# One training step


class PeakTracker(MemTracker):
    """MemTracker keeping only the global peak: its per-module peak snapshots, unused here, are updated
    for every module at every op and cost ~80 % of the time (same totals, 4-5x faster)."""

    def _pre_fw_hook(self, module: nn.Module, inputs) -> None:
        # The step calls the EMA teacher twice (labeled, unlabeled half) at the top level, which MemTracker
        # takes for a second iteration and refuses; its per-module statistics are unused here, so the
        # module's are started afresh (its parameters' storages are known already and count once).
        name = self._mod_tracker.get_known_fqn(module)
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]
        super()._pre_fw_hook(module, inputs)

    def _update_peak_stats(self, peak_state) -> None:
        for dev, snap in self._curr_mem_snap.items():
            if self._peak_mem.get(dev, 0) < snap["Total"]:
                self._peak_mem[dev] = snap["Total"]
                self._peak_mem_snap[dev] = dict(snap)


class NoHook:
    """A hook handle with nothing to remove."""

    def remove(self) -> None:
        pass


class FakeScalarsReadOne(TorchDispatchMode):
    """Reading a fake tensor's value gives 1 instead of failing.

    Fake tensors have no data. The step converts its loss terms and the kept fraction to Python floats for
    the log, which nothing in the step's computation reads back (no data-dependent branch or shape); AdamW
    reads its step count for the bias correction ``1 - beta ** step``, a divisor, hence 1 and not 0 (the
    value moves no byte: the update's tensors have the parameters' shapes whatever the step).
    """

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            dtype = args[0].dtype
            return 1.0 if dtype.is_floating_point else (True if dtype == torch.bool else 1)
        return func(*args, **(kwargs or {}))


class Rebuilt:
    """What the step's EMA teacher is deep-copied from: the student's architecture built again.

    Fake tensors can be neither deep-copied nor moved (``.to`` swaps parameters, which fails for them):
    the copy is built where the student is (``build`` runs under the caller's device), its ``.to`` is a
    no-op, and the teacher's update at step 0 copies the student's weights and buffers.
    """

    def __init__(self, build) -> None:
        self.build = build

    def __deepcopy__(self, memo: dict) -> nn.Module:
        model = self.build()
        model.to = lambda *args, **kwargs: model  # already on the student's device
        return model


class StandInContrastive(Contrastive):
    """The contrastive term with ``u2pl_contrastive`` replaced by a stand-in of its sizes (fake tensors).

    u2pl_contrastive's nonzero / sampling steps have data-dependent shapes, which fake tensors cannot run.
    The stand-in holds, until it returns as the real call's locals are, the real ``contrastive_pixels``
    inputs, class ranks, the negatives mask, the gathered negative keys (``NEGATIVES_PER_LABELED`` per
    labeled pixel, ``min(r_h, C) - r_l`` per unreliable unlabeled pixel at the recipe's starting alpha_t)
    and M anchors for every class; only the anchors carry a gradient (to the representation head).
    """

    def __init__(self, setup: TermSetup, alpha_t: float) -> None:
        super().__init__(setup)
        self.alpha_t = alpha_t

    def __call__(self, t: StepTensors) -> tuple[torch.Tensor, dict[str, float]]:
        st, ignore = self.setup.st, self.setup.ignore_index
        pixels = contrastive_pixels(t.rep, t.t_l, t.t_u, t.y_l, t.y_u, ignore, t.inside_u)
        feats, probs = pixels["student_feats"], pixels["teacher_probs"].float()
        p, c = probs.shape
        rank = class_ranks(probs)
        negatives = ((rank >= R_L) & (rank < min(R_H, c))).T  # (C, P) bool, as negative_masks returns it
        del rank  # negative_masks' own
        n_labeled = p // 2
        n_unreliable = int((p - n_labeled) * self.alpha_t)
        rows = n_labeled * NEGATIVES_PER_LABELED + n_unreliable * (min(R_H, c) - R_L)
        neg_class, neg_pixel = torch.zeros(rows, dtype=torch.long), torch.zeros(rows, dtype=torch.long)
        neg_feats = F.normalize(pixels["teacher_feats"].float(), dim=1).new_empty(rows, feats.shape[1])
        anchors = torch.randint(0, p, (c, st.contrastive_anchors), generator=t.generator)
        anchor_feats = F.normalize(feats[anchors].float(), dim=-1)
        negative_sim = torch.randn(c, st.contrastive_anchors, st.contrastive_negatives)
        loss = (anchor_feats.sum(-1, keepdim=True) + negative_sim).logsumexp(-1).mean()
        del negatives, neg_class, neg_pixel, neg_feats  # (kept alive up to here)
        return st.lambda_contrastive * loss, {}


@dataclass
class Trainee:
    """One training step of a stage on ``setting``'s model, per-GPU ``batch``.

    selftrain runs labelpipe's own step (:class:`SelftrainStep`, built from the recipe's config and the
    student as ``labelpipe selftrain`` builds it); pretrain its objective (CE + aux_weight * CE).
    ``teacher``, ``memory`` and ``prototypes`` are the step's own (None where the recipe has none).
    """

    setting: Setting
    stage: str
    batch: int  # per GPU
    amp: bool
    real_contrastive: bool  # real tensors only: u2pl_contrastive itself instead of the stand-in
    student: nn.Module = field(init=False)
    optimizer: torch.optim.Optimizer = field(init=False)
    objective: SelftrainStep | None = None
    teacher: EMATeacher | None = None
    memory: MemoryBank | None = None
    prototypes: PrototypeBank | None = None

    def __post_init__(self) -> None:
        s = self.setting

        def build() -> nn.Module:  # the recipe's architecture, scale included, as the stages build it
            return model_from_config(s.config, s.num_classes, with_backbone_weights=False)

        self.student = build().train()
        # labelpipe.training.setup.for_training freezes the representation head unless a loss reads it.
        self.student.representation.requires_grad_(self.uses_rep)
        self.optimizer = build_optimizer(self.student, s.config.train)
        for group in self.optimizer.param_groups:
            group["foreach"] = True  # what torch uses for CUDA tensors
        if self.stage != "selftrain":
            return
        st = s.config.selftrain
        self.objective = SelftrainStep.build(
            s.config,
            self.student,
            Rebuilt(build),
            s.num_classes,
            IGNORE,
            self.device,
            total_steps=st.steps or s.config.train.steps,
        )
        self.teacher = self.objective.teacher
        if self.teacher is not None:
            self.teacher.update(self.student, 0)  # the copy: the student's weights and buffers
        if not self.real_contrastive:
            alpha_t = s.config.pseudolabel.alpha_t
            self.objective.terms = [
                StandInContrastive(self.objective.setup, alpha_t) if isinstance(term, Contrastive) else term
                for term in self.objective.terms
            ]
        parts = self.objective.components()
        self.memory, self.prototypes = parts.get("memory"), parts.get("prototypes")

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    @property
    def uses_rep(self) -> bool:
        return self.stage == "selftrain" and SelftrainStep.needs_student_rep(self.setting.config.selftrain)

    def other_state(self) -> list[torch.Tensor]:
        tensors = []
        if self.teacher is not None:
            tensors += [*self.teacher.model.parameters(), *self.teacher.model.buffers()]
        if self.memory is not None:
            tensors += [self.memory.feats, self.memory.ptr, self.memory.count]
        if self.prototypes is not None:
            tensors += [self.prototypes.prototypes, self.prototypes.seen]
        return tensors

    def student_state(self) -> list[torch.Tensor]:
        tensors = [*self.student.parameters(), *self.student.buffers()]
        tensors += [p.grad for p in self.student.parameters() if p.grad is not None]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, torch.Tensor)]
        return tensors

    def grad_bytes(self) -> int:
        return sum(nbytes(p) for p in self.student.parameters() if p.requires_grad)

    # -- objectives: a function of one step, returning the loss; its locals die when it returns,
    #    as in labelpipe (the batch's device copies included).

    def pretrain_loss(self, step: int) -> torch.Tensor:
        s, b = self.setting, self.batch
        x = torch.randn(b, 3, s.crop, s.crop)
        y = torch.randint(0, s.num_classes, (b, s.crop, s.crop))
        out = self.student(x, with_rep=False)
        loss_main = F.cross_entropy(out.main.float(), y, ignore_index=IGNORE)
        loss_aux = F.cross_entropy(out.aux.float(), y, ignore_index=IGNORE)
        return loss_main + s.config.train.aux_weight * loss_aux

    def selftrain_batch(self) -> tuple[dict, dict]:
        """A random batch as selftrain's loaders give it: labeled {image, mask}; unlabeled {image (strong),
        image_weak, mask (stored pseudo-labels), valid (crop padding), weight (variance method only)}."""
        s, b, c = self.setting, self.batch, self.setting.num_classes
        size = (b, s.crop, s.crop)
        labeled = {"image": torch.randn(b, 3, s.crop, s.crop), "mask": torch.randint(0, c, size)}
        unlabeled = {"image": torch.randn(b, 3, s.crop, s.crop), "mask": torch.randint(0, c, size)}
        if self.teacher is not None and s.config.selftrain.strong_aug:  # selftrain's weak view for the teacher
            unlabeled["image_weak"] = torch.randn(b, 3, s.crop, s.crop)
        if not isinstance(next(self.student.parameters()), FakeTensor):
            # The online entropy split indexes the valid pixels (a data-dependent shape fake tensors cannot
            # run): without the mask the fake step holds no copy of <= B x H x W floats (negligible).
            unlabeled["valid"] = torch.ones(size, dtype=torch.bool)
        if s.config.selftrain.method == "variance":  # the stored exp(-variance) weights
            unlabeled["weight"] = torch.rand(size)
        return labeled, unlabeled

    def selftrain_loss(self, step: int) -> torch.Tensor:
        loss, _ = self.objective(self.selftrain_batch(), step)
        return loss

    def autocast(self):
        """The precision context of one step (a subclass on a GPU swaps in CUDA's; the step stays this one)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp)

    def step(self, step: int) -> None:
        objective = self.pretrain_loss if self.stage == "pretrain" else self.selftrain_loss
        with self.autocast():
            loss = objective(step)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.teacher is not None:
            self.teacher.update(self.student, step)


def nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def total_bytes(tensors: list[torch.Tensor]) -> int:
    """Bytes of the distinct storages of ``tensors`` (held in the dict, so their ids stay unique)."""
    storages = {id(st): st for st in (t.untyped_storage() for t in tensors)}
    return sum(st.nbytes() for st in storages.values())


# ---------------------------------------------------------------------------------------------------
# Measuring


@dataclass
class Estimate:
    student_state: int  # bytes
    other_state: int
    peak: int  # total, other_state included
    seconds: float

    @property
    def act(self) -> int:
        return self.peak - self.student_state - self.other_state


def measure(
    setting: Setting, stage: str, batch: int, amp: bool, fake: bool = True, world: int = 1, tracker: bool = True
) -> Estimate:
    """Peak memory of one steady-state step; ``fake=False`` runs it on real CPU tensors.

    ``tracker=False`` (real tensors only) measures with the CPU allocator's events instead of MemTracker.
    """
    t0 = time.perf_counter()
    with (
        FakeTensorMode() if fake else contextlib.nullcontext(),
        FakeScalarsReadOne() if fake else contextlib.nullcontext(),
    ):
        torch.manual_seed(0)
        trainee = Trainee(setting, stage, batch, amp, real_contrastive=not fake)
        if tracker:
            trainee.step(0)  # warm-up: gradients and optimizer state exist from here on
            mt = PeakTracker()
            mt.track_external(trainee.student, trainee.optimizer, *trainee.other_state())
            # MemTracker hooks the gradient of every parameter of a module run inside it, and register_hook
            # refuses frozen ones (the EMA teacher, an unread representation head): mark those as hooked.
            teacher = [] if trainee.teacher is None else list(trainee.teacher.model.parameters())
            for param in [*trainee.student.parameters(), *teacher]:
                if not param.requires_grad:
                    mt._param_to_grad_hook_handles[param] = (NoHook(), NoHook())
            with mt:
                trainee.step(1)
            peak = sum(snap["Total"] for snap in mt.get_tracker_snapshot("peak").values())
        else:
            peak = allocator_peak(trainee)
        student, other = total_bytes(trainee.student_state()), total_bytes(trainee.other_state())
        ddp = trainee.grad_bytes() if world > 1 else 0
    return Estimate(student, other + ddp, peak + ddp, time.perf_counter() - t0)


def allocator_peak(trainee: Trainee) -> int:
    """Peak live bytes of the second of two steps, from torch.profiler's CPU allocation / free events.

    Both steps are profiled, so every block freed in the second step (the first step's gradients) was
    allocated under the profiler and its free carries a size. Tensors from before the profiler (the
    weights, teacher and banks) are added from their sizes.
    """
    from torch.profiler import ProfilerActivity, profile, record_function

    before = total_bytes(trainee.student_state() + trainee.other_state())
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        trainee.step(0)
        with record_function("measured step"):
            trainee.step(1)
    events = prof.profiler.kineto_results.events()
    window = next(e for e in events if e.name() == "measured step")
    current = peak = 0
    for e in sorted((e for e in events if e.name() == "[memory]"), key=lambda e: e.start_ns()):
        if e.start_ns() > window.end_ns():
            break
        current += e.nbytes()
        if e.start_ns() >= window.start_ns():
            peak = max(peak, current)
    return before + peak


# ---------------------------------------------------------------------------------------------------
# Output


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join([*lines, *("| " + " | ".join(r) + " |" for r in rows)])


def run_table(recipes: list[str], batches: list[int] | None, precisions: list[str]) -> None:
    long_rows, pivot, columns = [], {}, set()
    started = time.perf_counter()
    for recipe in recipes:
        setting = load_setting(recipe)
        m, global_batch = setting.config.model, setting.config.train.batch_size
        per_gpu = batches or sorted({b for b in PER_GPU_BATCHES if b < global_batch} | {global_batch})
        for stage in setting.stages:
            for precision in precisions:
                for b in per_gpu:
                    world = max(1, global_batch // b)
                    est = measure(setting, stage, b, amp=precision == "bf16", world=world)
                    teacher = " +teacher" if stage == "selftrain" and setting.uses_teacher else ""
                    long_rows.append(
                        [
                            setting.name,
                            stage + teacher,
                            precision,
                            m.backbone,
                            str(m.output_stride),
                            str(setting.crop),
                            f"{b} (x{world})",
                            f"{est.student_state / MIB:,.0f}",
                            f"{est.other_state / MIB:,.0f}",
                            f"{est.act / MIB:,.0f}",
                            f"{est.peak / GIB:.2f}",
                        ]
                    )
                    pivot.setdefault((setting.name, stage + teacher, precision), {})[b] = est.peak / GIB
                    columns.add(b)
                    print(
                        f"  {setting.name} {stage} {precision} b={b}: {est.peak / GIB:.2f} GiB ({est.seconds:.1f} s)",
                        flush=True,
                    )
    headers = [
        "recipe",
        "stage",
        "precision",
        "backbone",
        "OS",
        "crop",
        "per-GPU batch (GPUs)",
        "params+grads+opt MiB",
        "other state MiB",
        "act+temp peak MiB",
        "total peak GiB",
    ]
    print()
    print(markdown(headers, long_rows))
    print()
    cols = sorted(columns)
    print("Total peak GiB by per-GPU batch:")
    print()
    rows = [[*key, *(f"{v[b]:.2f}" if b in v else "-" for b in cols)] for key, v in pivot.items()]
    print(markdown(["recipe", "stage", "precision", *(f"b={b}" for b in cols)], rows))
    print()
    print(NOT_INCLUDED)
    print(f"(estimated in {time.perf_counter() - started:.0f} s)")


def run_validation() -> None:
    print("Validation: resnet18 OS16, 19 classes, per-GPU batch 4, one steady-state step on the CPU.")
    print("fake = the estimator; real/MemTracker = same step, real tensors; real/allocator = torch.profiler events.")
    print()
    rows = []
    for stage, precision, crop in (
        ("pretrain", "fp32", 64),
        ("pretrain", "bf16", 64),
        ("selftrain", "fp32", 64),
        ("pretrain", "fp32", 128),
    ):
        setting = small_setting(stage, crop)
        amp = precision == "bf16"
        fake = measure(setting, stage, 4, amp)
        real = measure(setting, stage, 4, amp, fake=False)
        alloc = measure(setting, stage, 4, amp, fake=False, tracker=False)
        state = (fake.student_state + fake.other_state) / MIB
        rows.append(
            [
                f"{stage} {precision} crop {crop}",
                f"{state:.1f}",
                f"{fake.peak / MIB:.1f}",
                f"{real.peak / MIB:.1f}",
                f"{alloc.peak / MIB:.1f}",
                f"{100 * (fake.peak / alloc.peak - 1):+.1f} %",
            ]
        )
    headers = ["step", "state MiB", "fake MiB", "real/MemTracker MiB", "real/allocator MiB", "fake vs allocator"]
    print(markdown(headers, rows))
    print()
    print(
        "crop 64 peaks at the optimizer step (foreach temporaries), crop 128 at the end of the forward. "
        "selftrain: real tensors run u2pl_contrastive itself, where random weights give no anchors; the "
        "fake step runs the stand-in with anchors for all 19 classes (~9 MiB here)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), help="names in stages/ or paths")
    parser.add_argument(
        "--batch", type=int, nargs="+", help="per-GPU batch sizes (default: 2, 4, 8 below the recipe batch, and it)"
    )
    parser.add_argument("--precision", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"])
    parser.add_argument("--validate", action="store_true", help="compare with real CPU measurements and exit")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", message="Module is None")  # MemTracker, for the teacher's outputs
    if args.validate:
        run_validation()
    else:
        run_table(args.recipes, args.batch, args.precision)


if __name__ == "__main__":
    main()
