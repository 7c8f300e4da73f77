"""Where the time of one self-training step goes (``labelpipe selftrain`` with everything on).

The step measured is labelpipe's own :class:`labelpipe.training.selftrain_step.SelftrainStep`, built with
``SelftrainStep.build(config, model, ...)`` as ``labelpipe selftrain`` builds it, at the U2PL+ Cityscapes
scale: 2 labeled + 2 unlabeled images of 257 x 257, 19 classes, a 256-d representation head (65 x 65 at
stride 4: 257 -> conv1 129 -> maxpool 65), M = 256 anchors, N = 50 negatives, full queues of
``--capacity`` keys per class, online pseudo-labels from the EMA teacher (``pseudo_source: teacher``).
Data loading and CutMix (``strong_aug``) are not timed.

End to end, the real step is timed (one ``backward``, SGD, EMA) as the base round (online labels,
supervised + unsupervised CE) and as the full round (``--denoise --rectified --contrastive``; the rectified
loss *replaces* the unlabeled CE). The pieces are then timed one by one with the same library functions
and loss terms the step calls (``labelpipe.training.terms``; imported, not copied): each loss on detached
copies of the student's outputs, so that its forward and its backward (down to the outputs) are timed on
their own; the model's backward from the summed output gradients, once without the representation
head's gradient (a step without the contrastive loss) and once with it.

Teacher logits are sharpened towards a synthetic ground truth so that anchors and negatives exist as in a
trained model (a randomly initialised teacher is near-uniform, which leaves no anchor above p > 0.3 and
makes the contrastive loss free): the step's teacher is wrapped so that its logits on the labeled /
unlabeled images are pulled towards their truth (inside the timed step, as before).

Overhead = the teacher's forward on the labeled images (only the contrastive loss and the prototypes
read it; the step skips it otherwise) + the representation heads (teacher's and student's forwards, the
student's backward; skipped likewise) + contrastive (fwd + bwd, its labels / probabilities at rep size,
memory push + sample, prototype update) + rectified (fwd + bwd) + denoising, as a % of the base step. The
"teacher on both halves" view (U2PL's own step runs the teacher on the labeled half too) adds the timed
labeled teacher forward to the base step.

    python benchmarks/selftrain_step.py [--runs 5] [--threads 2] [--backbone resnet18 --output-stride 16]
    python benchmarks/selftrain_step.py --quick     # small sizes, one step: a CPU smoke run (seconds)
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from labelpipe.config import RunConfig
from labelpipe.losses import denoise_pseudo_labels
from labelpipe.models import build_model
from labelpipe.pseudo import entropy_split_torch
from labelpipe.training.loop import build_optimizer
from labelpipe.training.selftrain_step import SelftrainStep, contrastive_pixels, pixel_entropy
from labelpipe.training.terms import LOSS_TERMS, Contrastive, StepTensors

IGNORE, ALPHA_T = 255, 0.2
BASE = [
    "teacher forward (unlabeled)",
    "online pseudo-labels (entropy split)",
    "student forward",
    "supervised CE (main + 0.4 aux) fwd+bwd",
    "unsupervised CE fwd+bwd",
    "model backward (main, aux)",
    "SGD step",
    "EMA update",
]
FULL_BACKWARD = "model backward (main, aux, rep)"
E2E_BASE, E2E_FULL = "end-to-end: base step (CE)", "end-to-end: + all three (rectified for CE)"
EXTRA = [
    "teacher forward (labeled)",
    "rep head forwards (teacher no-grad, student)",
    "denoising (prototype weights upsampled)",
    "rectified loss fwd+bwd",
    "contrastive fwd+bwd",
    "  of which contrastive_pixels (rep size)",
    "rep head backward (contrastive grad)",
]
TEACHER_L, REP_FWD, DENOISE, RECTIFIED, CONTRASTIVE, CONTRASTIVE_PIXELS, REP_BWD = EXTRA


@dataclass(frozen=True)
class Shape:
    """The problem size: per-half batch, crop, classes, representation, contrastive sampling, queue length."""

    batch: int = 2
    size: int = 257
    classes: int = 19
    rep_dim: int = 256
    anchors: int = 256
    negatives: int = 50
    capacity: int = 30000


QUICK = Shape(batch=2, size=65, classes=19, rep_dim=32, anchors=16, negatives=8, capacity=256)


def step_config(args: argparse.Namespace, shape: Shape, full: bool) -> RunConfig:
    """The round's settings: online labels from the teacher; ``full`` adds denoise, rectified, contrastive."""
    rates = (6, 12, 18) if args.output_stride == 16 else (12, 24, 36)
    selftrain = {
        "pseudo_source": "teacher",
        "strong_aug": False,  # CutMix is not timed
        "loss": "ce",
        "memory_capacity": shape.capacity,
        "contrastive_anchors": shape.anchors,
        "contrastive_negatives": shape.negatives,
        "contrastive_temperature": 0.5,
        "lambda_contrastive": 0.1,
        "ema_momentum": 0.99,
    }
    if full:
        selftrain.update(denoise=True, rectified=True, contrastive=True)
    return RunConfig.model_validate(
        {
            "model": {
                "backbone": args.backbone,
                "output_stride": args.output_stride,
                "aspp_rates": list(rates),
                "rep_dim": shape.rep_dim,
            },
            "train": {"crop_size": shape.size, "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "aux_weight": 0.4},
            "pseudolabel": {"alpha_t": ALPHA_T},
            "selftrain": selftrain,
        }
    )


def block_labels(shape: Shape, generator: torch.Generator, block: int = 32) -> torch.Tensor:
    """(B, H, W) long: one random class per block x block square, like a coarse scene."""
    side = -(-shape.size // block)
    coarse = torch.randint(0, shape.classes, (shape.batch, 1, side, side), generator=generator).float()
    return F.interpolate(coarse, scale_factor=block, mode="nearest")[:, 0, : shape.size, : shape.size].long()


class SharpenedTeacher:
    """The step's EMA teacher, its logits on a known batch image pulled towards that image's synthetic truth
    (``truths``: input tensor -> (B, H, W) labels, matched by storage); everything else is the teacher's."""

    def __init__(self, teacher, truths: list[tuple[torch.Tensor, torch.Tensor]], noise: torch.Generator) -> None:
        self.teacher, self.truths, self.noise = teacher, truths, noise

    def __call__(self, x: torch.Tensor, **kwargs):
        out = self.teacher(x, **kwargs)
        truth = next(t for image, t in self.truths if image.data_ptr() == x.data_ptr())
        noise = torch.randn(out.main.shape, generator=self.noise).to(out.main.device)
        onehot = F.one_hot(truth, out.main.shape[1]).permute(0, 3, 1, 2).to(out.main.device)
        return out._replace(main=out.main + 1.5 * noise + 3.0 * onehot)

    def __getattr__(self, name: str):
        return getattr(self.teacher, name)


@dataclass
class Bench:
    """One real step (base or full), its student and optimizer, and the fixed batch."""

    device: torch.device
    shape: Shape
    step: SelftrainStep
    student: torch.nn.Module
    optimizer: torch.optim.Optimizer
    labeled: dict
    unlabeled: dict

    def run(self, index: int) -> None:
        """The training loop's step: objective, zero_grad, backward, SGD, EMA (labelpipe.training.loop)."""
        loss, _ = self.step((self.labeled, self.unlabeled), index)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.step.teacher.update(self.student, 1000 + index)


def make_bench(device: torch.device, args: argparse.Namespace, shape: Shape, full: bool) -> Bench:
    torch.manual_seed(0)
    config = step_config(args, shape, full)
    m = config.model
    student = build_model(shape.classes, m.backbone, m.output_stride, m.aspp_rates, rep_dim=m.rep_dim).to(device)
    student.train()
    student.representation.requires_grad_(SelftrainStep.needs_student_rep(config.selftrain))  # as for_training
    step = SelftrainStep.build(config, student, student, shape.classes, IGNORE, device, total_steps=100_000)
    memory = step.components().get("memory")
    if memory is not None:  # steady state: full queues
        fill = F.normalize(torch.randn(shape.capacity, shape.rep_dim, device=device), dim=1)
        for c in range(shape.classes):
            memory.push(c, fill)
    data = torch.Generator().manual_seed(0)
    s = (shape.batch, 3, shape.size, shape.size)
    labeled = {"image": torch.randn(s, generator=data).to(device), "mask": block_labels(shape, data).to(device)}
    x_u, truth_u = torch.randn(s, generator=data).to(device), block_labels(shape, data).to(device)
    # The stored labels are unused (online labels replace them); padding: none (every pixel inside the crop).
    unlabeled = {
        "image": x_u,
        "image_weak": x_u,
        "mask": torch.full_like(truth_u, IGNORE),
        "valid": torch.ones_like(truth_u, dtype=torch.bool),
    }
    step.teacher = SharpenedTeacher(step.teacher, [(labeled["image"], labeled["mask"]), (x_u, truth_u)], data)
    return Bench(device, shape, step, student, build_optimizer(student, config.train), labeled, unlabeled)


class Timer:
    """Accumulates perf_counter durations by name (with CUDA synchronisation around each piece)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, defaultdict(list)
        self.record = True

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __call__(self, name: str, fn):
        self.sync()
        start = time.perf_counter()
        result = fn()
        self.sync()
        if self.record:
            self.times[name].append(time.perf_counter() - start)
        return result

    def median(self, name: str) -> float:
        return statistics.median(self.times[name]) if self.times[name] else 0.0


class Decoded:
    """Keeps the decoder maps (``fuse`` outputs) a model's forwards produce, for its representation head."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        model.fuse.register_forward_hook(lambda _module, _inputs, output: self.maps.append(output))

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


def fwd_bwd(loss_fn, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss_fn(), leaves)


def timed_pieces(b: Bench, index: int, timer: Timer, shapes: dict, maps: tuple[Decoded, Decoded]) -> None:
    """The full step's pieces, each timed on its own, with the step's own functions and loss terms.

    The models run without their representation heads first, as the base step does; the heads' forwards
    are timed as an extra (on the decoder maps the forwards kept).
    """
    step, n = b.step, b.shape.batch
    teacher_maps, student_maps = maps
    setup = step.setup
    gen, _ = step.generators(index)
    x_l, y_l, x_u = b.labeled["image"], b.labeled["mask"], b.unlabeled["image"]
    teacher_maps.take(), student_maps.take()
    t_l = timer(TEACHER_L, lambda: step.teacher(x_l, with_rep=False))
    t_u = timer(BASE[0], lambda: step.teacher(x_u, with_rep=False))

    def online_labels():
        probs = torch.softmax(t_u.main.float(), 1)
        reliable = entropy_split_torch(pixel_entropy(probs), ALPHA_T, b.unlabeled["valid"])
        return probs, torch.where(reliable, probs.argmax(1), torch.full_like(reliable, IGNORE, dtype=torch.long))

    probs_u, y_u = timer(BASE[1], online_labels)
    out = timer(BASE[2], lambda: b.student(torch.cat([x_l, x_u]), with_rep=False))

    def rep_forwards():
        with torch.no_grad():
            t_reps = [step.teacher.model.representation(d) for d in teacher_maps.take()]
        return t_reps, b.student.representation(student_maps.take()[0])

    (t_rep_l, t_rep_u), student_rep = timer(REP_FWD, rep_forwards)
    t_l, t_u = t_l._replace(rep=t_rep_l), t_u._replace(rep=t_rep_u)
    y_u = timer(DENOISE, lambda: denoise_pseudo_labels(probs_u, t_u.rep, setup.prototypes, y_u, IGNORE))
    main = out.main.detach().float().requires_grad_(True)
    aux = out.aux.detach().float().requires_grad_(True)
    rep = student_rep.detach().requires_grad_(True)
    shapes.update(main=tuple(out.main.shape), rep=tuple(student_rep.shape))
    tensors = StepTensors(
        main_l=main[:n],
        aux_l=aux[:n],
        main_u=main[n:],
        aux_u=aux[n:],
        y_l=y_l,
        y_u=y_u,
        w_u=None,
        inside_u=b.unlabeled["valid"],
        rep=rep,
        t_l=t_l,
        t_u=t_u,
        generator=gen,
        shared=None,
        step=index,
    )
    supervised, unsupervised, rectified = (
        LOSS_TERMS[name](setup) for name in ("supervised", "unsupervised", "rectified")
    )
    contrastive = next(term for term in step.terms if isinstance(term, Contrastive))  # its memory bank

    def contrastive_grad() -> tuple[torch.Tensor]:
        timer(CONTRASTIVE_PIXELS, lambda: contrastive_pixels(rep, t_l, t_u, y_l, y_u, IGNORE, tensors.inside_u))
        loss, logs = contrastive(tensors)
        shapes["contrastive classes"] = logs["contrastive_classes"]
        return torch.autograd.grad(loss, [rep])

    g_sup = timer(BASE[3], lambda: fwd_bwd(lambda: supervised(tensors)[0], [main, aux]))
    (g_unsup,) = timer(BASE[4], lambda: fwd_bwd(lambda: unsupervised(tensors)[0], [main]))
    g_rect = timer(RECTIFIED, lambda: fwd_bwd(lambda: rectified(tensors)[0], [main, aux]))
    (g_rep,) = timer(CONTRASTIVE, contrastive_grad)
    outputs = [out.main, out.aux, student_rep]
    grads = [g_sup[0] + g_unsup + g_rect[0], g_sup[1] + g_rect[1], g_rep]
    timer(BASE[5], lambda: torch.autograd.backward(outputs[:2], grads[:2], retain_graph=True))
    b.optimizer.zero_grad(set_to_none=True)
    timer(FULL_BACKWARD, lambda: torch.autograd.backward(outputs, grads))
    timer(BASE[6], b.optimizer.step)
    timer(BASE[7], lambda: step.teacher.update(b.student, 1000 + index))
    b.optimizer.zero_grad(set_to_none=True)


def run(device: torch.device, args: argparse.Namespace, shape: Shape) -> tuple[Timer, dict]:
    base, full = make_bench(device, args, shape, full=False), make_bench(device, args, shape, full=True)
    maps = (Decoded(full.step.teacher.model), Decoded(full.student))
    timer, shapes = Timer(device), {}
    for index in range(args.warmup + args.runs):
        timer.record = index >= args.warmup
        timed_pieces(full, index, timer, shapes, maps)
        timer(E2E_BASE, lambda: base.run(index))  # noqa: B023 - called right here
        timer(E2E_FULL, lambda: full.run(index))  # noqa: B023
    return timer, shapes


def report(timer: Timer, name: str, shapes: dict, args: argparse.Namespace, shape: Shape) -> None:
    m = timer.median
    rep_backward = max(0.0, m(FULL_BACKWARD) - m(BASE[5]))
    timer.times[REP_BWD] = [rep_backward]
    base = sum(m(k) for k in BASE)
    extra = m(TEACHER_L) + m(REP_FWD) + m(DENOISE) + m(RECTIFIED) + m(CONTRASTIVE) + rep_backward
    print(
        f"\n{name}: student {args.backbone} OS{args.output_stride}, input {shape.batch}+{shape.batch} x "
        f"{shape.size}x{shape.size}, main {shapes['main']}, rep {shapes['rep']}, queue {shape.capacity}/class, "
        f"{shapes['contrastive classes']} classes in the contrastive loss; median of {args.runs} steps"
    )
    print(f"{'piece':<44} {'ms':>9} {'% of base':>10}")
    for key in BASE:
        print(f"{key:<44} {m(key) * 1e3:>9.1f} {100 * m(key) / base:>9.1f}%")
    print(f"{'= base step (teacher, CE losses, SGD, EMA)':<44} {base * 1e3:>9.1f} {100.0:>9.1f}%")
    for key in EXTRA:
        print(f"{key:<44} {m(key) * 1e3:>9.1f} {100 * m(key) / base:>9.1f}%")
    total = base + extra
    print(f"{'= total (base + all three)':<44} {total * 1e3:>9.1f} {100 * total / base:>9.1f}%")
    replace = extra - m(BASE[4])  # --rectified replaces the unlabeled CE
    # The other reading of "a step that already has the teacher forward": the teacher on both halves.
    both = (replace - m(TEACHER_L)) / (base + m(TEACHER_L))
    e2e_base, e2e_full = m(E2E_BASE), m(E2E_FULL)
    e2e_both = e2e_base + m(TEACHER_L)  # the real step runs the labeled teacher forward only where it is read

    def verdict(x: float) -> str:
        return "within" if x <= 0.15 else "OVER"

    def pct(x: float) -> str:
        return f"{100 * x:.1f}% ({verdict(x)})"

    print(
        "overhead of contrastive + rectified + denoise (goal <= 15%; rectified replacing the unlabeled CE):\n"
        f"  base = teacher on the unlabeled half (selftrain without the three): pieces {pct(replace / base)}, "
        f"end to end {e2e_base * 1e3:.0f} -> {e2e_full * 1e3:.0f} ms {pct((e2e_full - e2e_base) / e2e_base)}\n"
        f"  base = teacher on both halves (U2PL's step; + the labeled forward): pieces {pct(both)}, "
        f"end to end {e2e_both * 1e3:.0f} -> {e2e_full * 1e3:.0f} ms {pct((e2e_full - e2e_both) / e2e_both)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--capacity", type=int, default=Shape.capacity, help="memory-bank keys per class")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA only")
    parser.add_argument(
        "--quick", action="store_true", help="65 x 65 crops, 32-d rep, small queues, one step, no warm-up: a smoke run"
    )
    args = parser.parse_args()
    shape = Shape(capacity=args.capacity)
    if args.quick:
        shape, args.runs, args.warmup = QUICK, 1, 0
    torch.set_num_threads(args.threads)
    devices = [] if args.no_cpu else [torch.device("cpu")]
    devices += [torch.device("cuda")] if torch.cuda.is_available() else []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run"
    )
    for device in devices:
        timer, shapes = run(device, args, shape)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU float32"
        report(timer, name, shapes, args, shape)
    print(
        f"load average {os.getloadavg()[0]:.1f} after the run (above {args.threads}: other processes "
        "shared the cores and the times are inflated)"
    )


if __name__ == "__main__":
    main()
