"""Where the time of one self-training step goes (``labelpipe selftrain`` with everything on).

The step of ``RoundObjective`` (labelpipe/stages/selftrain.py), rebuilt from labelpipe.models,
labelpipe.teacher and labelpipe.losses at the U2PL+ Cityscapes scale: 2 labeled + 2 unlabeled
images of 257 x 257, 19 classes, a 256-d representation head (65 x 65 at stride 4: 257 -> conv1
129 -> maxpool 65), M = 256 anchors, N = 50 negatives, full queues of ``--capacity`` keys per class.
Data loading and CutMix are not timed.

Each loss is computed on detached copies of the student's outputs, so that its forward and its
backward (down to the outputs) are timed on their own; the model's backward is then timed from
the summed output gradients, once without the representation head's gradient (what a step
without the contrastive loss back-propagates) and once with it. Last, the real step is timed end to end
(one ``backward``) without and with the three, as a check on the sum.

Teacher logits are sharpened towards a synthetic ground truth (untimed) so that anchors and
negatives exist as in a trained model: a randomly initialised teacher is near-uniform, which
leaves no anchor above p > 0.3 and makes the contrastive loss free.

Overhead = the teacher's forward on the labeled images (only the contrastive loss and the prototypes
read it; selftrain skips it otherwise) + the representation heads (teacher's and student's forwards,
the student's backward; skipped likewise) + contrastive (fwd + bwd, its labels / probabilities at rep
size, memory push + sample, prototype update) + rectified (fwd + bwd) + denoising, as a % of a step
that already has the teacher forward on the unlabeled images (teacher, online labels, student fwd +
bwd, CE losses, SGD, EMA). With ``--rectified`` the rectified loss *replaces* the unlabeled
CE; both views are printed.

    python benchmarks/selftrain_step.py [--runs 5] [--threads 2] [--backbone resnet18 --output-stride 16]
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

from labelpipe.losses import (
    MemoryBank,
    PrototypeBank,
    masked_ce,
    rectified_loss,
    u2pl_contrastive,
    unsupervised_ce_weight,
)
from labelpipe.models import build_model
from labelpipe.pseudo import entropy_split_torch
from labelpipe.training.selftrain_step import contrastive_pixels, denoise_labels
from labelpipe.teacher import EMATeacher

NUM_CLASSES, REP_DIM, SIZE, BATCH, IGNORE = 19, 256, 257, 2, 255
ANCHORS, NEGATIVES, TEMPERATURE, ALPHA_T, AUX_WEIGHT = 256, 50, 0.5, 0.2, 0.4
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
E2E_BASE_BOTH = "end-to-end: base step, teacher on both halves"
EXTRA = [
    "teacher forward (labeled)",
    "rep head forwards (teacher no-grad, student)",
    "denoising (prototype weights upsampled)",
    "rectified loss fwd+bwd",
    "contrastive fwd+bwd",
    "  of which u2pl_contrastive call",
    "rep head backward (contrastive grad)",
]
TEACHER_L, REP_FWD, DENOISE, RECTIFIED, CONTRASTIVE, CONTRASTIVE_CALL, REP_BWD = EXTRA


def block_labels(generator: torch.Generator, block: int = 32) -> torch.Tensor:
    """(B, SIZE, SIZE) long: one random class per block x block square, like a coarse scene."""
    side = -(-SIZE // block)
    coarse = torch.randint(0, NUM_CLASSES, (BATCH, 1, side, side), generator=generator).float()
    return F.interpolate(coarse, scale_factor=block, mode="nearest")[:, 0, :SIZE, :SIZE].long()


def sharpen(logits: torch.Tensor, truth: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(logits.shape, generator=generator).to(logits.device)
    onehot = F.one_hot(truth, NUM_CLASSES).permute(0, 3, 1, 2).to(logits.device)
    return logits + 1.5 * noise + 3.0 * onehot


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


def contrastive_term(rep, t_l, t_u, y_l, y_u, memory, prototypes, generator):
    """``RoundObjective.contrastive``: labels and teacher probabilities at rep size, then U2PL+."""
    return u2pl_contrastive(
        **contrastive_pixels(rep, t_l, t_u, y_l, y_u, IGNORE),  # exactly what selftrain does
        memory=memory,
        prototypes=prototypes,
        num_anchors=ANCHORS,
        num_negatives=NEGATIVES,
        temperature=TEMPERATURE,
        generator=generator,
        ignore_index=IGNORE,
    )


@dataclass
class Bench:
    """The models, optimizer, banks and the fixed batch of one device."""

    device: torch.device
    student: torch.nn.Module
    teacher: EMATeacher
    optimizer: torch.optim.Optimizer
    memory: MemoryBank
    prototypes: PrototypeBank
    x_l: torch.Tensor
    x_u: torch.Tensor
    y_l: torch.Tensor
    truth_u: torch.Tensor  # synthetic truth of the unlabeled images, only to sharpen the teacher
    teacher_maps: Decoded
    student_maps: Decoded
    noise: torch.Generator


def make_bench(device: torch.device, args: argparse.Namespace) -> Bench:
    torch.manual_seed(0)
    rates = (6, 12, 18) if args.output_stride == 16 else (12, 24, 36)
    student = build_model(NUM_CLASSES, args.backbone, args.output_stride, rates, rep_dim=REP_DIM).to(device)
    student.train()
    backbone_params, head_params = student.parameter_groups()
    optimizer = torch.optim.SGD(
        [{"params": backbone_params, "lr": 0.01}, {"params": head_params, "lr": 0.1}],
        lr=0.01,
        momentum=0.9,
        weight_decay=1e-4,
    )
    memory = MemoryBank(NUM_CLASSES, REP_DIM, capacity=args.capacity, device=device)
    fill = F.normalize(torch.randn(args.capacity, REP_DIM, device=device), dim=1)
    for c in range(NUM_CLASSES):  # steady state: full queues
        memory.push(c, fill)
    data = torch.Generator().manual_seed(0)
    teacher = EMATeacher(student, 0.99).to(device)
    return Bench(
        device=device,
        student=student,
        teacher=teacher,
        optimizer=optimizer,
        memory=memory,
        prototypes=PrototypeBank(NUM_CLASSES, REP_DIM, momentum=0.999, device=device),
        x_l=torch.randn(BATCH, 3, SIZE, SIZE, generator=data).to(device),
        x_u=torch.randn(BATCH, 3, SIZE, SIZE, generator=data).to(device),
        y_l=block_labels(data).to(device),
        truth_u=block_labels(data).to(device),
        noise=data,
        teacher_maps=Decoded(teacher.model),
        student_maps=Decoded(student),
    )


def teacher_labeled(b: Bench, with_rep: bool = True):
    t_l = b.teacher(b.x_l, with_rep=with_rep)
    return t_l._replace(main=sharpen(t_l.main, b.y_l, b.noise))


def teacher_unlabeled(b: Bench, with_rep: bool = True):
    t_u = b.teacher(b.x_u, with_rep=with_rep)
    return t_u._replace(main=sharpen(t_u.main, b.truth_u, b.noise))


def online_labels(b: Bench, t_u) -> tuple[torch.Tensor, torch.Tensor]:
    """U2PL online pseudo-labels: teacher argmax, the ALPHA_T most uncertain pixels ignored."""
    probs = torch.softmax(t_u.main.float(), 1)
    entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
    reliable = entropy_split_torch(entropy, ALPHA_T)
    return probs, torch.where(reliable, probs.argmax(1), torch.full_like(b.truth_u, IGNORE))


def denoise(b: Bench, t_u, probs_u: torch.Tensor, y_u: torch.Tensor) -> torch.Tensor:
    return denoise_labels(probs_u, t_u.rep, b.prototypes, y_u, IGNORE)  # exactly what selftrain does


def fwd_bwd(loss_fn, leaves: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss_fn(), leaves)


class Decoded:
    """Keeps the decoder maps (``fuse`` outputs) a model's forwards produce, for its representation head."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.maps: list[torch.Tensor] = []
        model.fuse.register_forward_hook(lambda _module, _inputs, output: self.maps.append(output))

    def take(self) -> list[torch.Tensor]:
        maps, self.maps = self.maps, []
        return maps


def timed_pieces(b: Bench, step: int, timer: Timer, shapes: dict) -> None:
    """One step, each piece timed on its own (losses on detached copies of the student's outputs).

    The base step runs the models without their representation heads, as selftrain does when neither
    the contrastive loss nor denoising reads them; the heads' forwards are timed as an extra.
    """
    gen = torch.Generator(device=b.device).manual_seed(step)
    b.teacher_maps.take(), b.student_maps.take()
    t_l = timer(TEACHER_L, lambda: teacher_labeled(b, with_rep=False))
    t_u = timer(BASE[0], lambda: teacher_unlabeled(b, with_rep=False))
    probs_u, y_u = timer(BASE[1], lambda: online_labels(b, t_u))
    out = timer(BASE[2], lambda: b.student(torch.cat([b.x_l, b.x_u]), with_rep=False))

    def rep_forwards():
        with torch.no_grad():
            t_reps = [b.teacher.model.representation(d) for d in b.teacher_maps.take()]
        return t_reps, b.student.representation(b.student_maps.take()[0])

    (t_rep_l, t_rep_u), student_rep = timer(REP_FWD, rep_forwards)
    t_l, t_u = t_l._replace(rep=t_rep_l), t_u._replace(rep=t_rep_u)
    out = out._replace(rep=student_rep)
    y_u = timer(DENOISE, lambda: denoise(b, t_u, probs_u, y_u))
    main = out.main.detach().float().requires_grad_(True)
    aux = out.aux.detach().float().requires_grad_(True)
    rep = out.rep.detach().requires_grad_(True)
    shapes.update(main=tuple(out.main.shape), rep=tuple(out.rep.shape))

    def supervised() -> torch.Tensor:
        return F.cross_entropy(main[:BATCH], b.y_l, ignore_index=IGNORE) + AUX_WEIGHT * F.cross_entropy(
            aux[:BATCH], b.y_l, ignore_index=IGNORE
        )

    def unsupervised() -> torch.Tensor:
        return unsupervised_ce_weight(y_u, 1.0, IGNORE) * masked_ce(main[BATCH:], y_u, IGNORE)

    def rectified() -> torch.Tensor:
        return rectified_loss(main[BATCH:], aux[BATCH:], y_u, ignore_index=IGNORE)

    def contrastive() -> tuple[torch.Tensor]:
        loss, stats = timer(
            CONTRASTIVE_CALL, lambda: contrastive_term(rep, t_l, t_u, b.y_l, y_u, b.memory, b.prototypes, gen)
        )
        shapes["contrastive classes"] = stats["classes"]
        return torch.autograd.grad(0.1 * loss, [rep])

    g_sup = timer(BASE[3], lambda: fwd_bwd(supervised, [main, aux]))
    (g_unsup,) = timer(BASE[4], lambda: fwd_bwd(unsupervised, [main]))
    g_rect = timer(RECTIFIED, lambda: fwd_bwd(rectified, [main, aux]))
    (g_rep,) = timer(CONTRASTIVE, contrastive)
    outputs = [out.main, out.aux, out.rep]
    grads = [g_sup[0] + g_unsup + g_rect[0], g_sup[1] + g_rect[1], g_rep]
    timer(BASE[5], lambda: torch.autograd.backward(outputs[:2], grads[:2], retain_graph=True))
    b.optimizer.zero_grad(set_to_none=True)
    timer(FULL_BACKWARD, lambda: torch.autograd.backward(outputs, grads))
    timer(BASE[6], b.optimizer.step)
    timer(BASE[7], lambda: b.teacher.update(b.student, 1000 + step))
    b.optimizer.zero_grad(set_to_none=True)


def whole_step(b: Bench, step: int, extras: bool, teacher_on_labeled: bool = False) -> None:
    """RoundObjective with --pseudo-source teacher (and --denoise --rectified --contrastive), one backward.

    ``teacher_on_labeled`` runs the teacher on the labeled half in the base step too (U2PL's step does;
    selftrain does only where the contrastive loss or the prototypes read it)."""
    gen = torch.Generator(device=b.device).manual_seed(step)
    t_l = teacher_labeled(b, with_rep=extras) if extras or teacher_on_labeled else None
    t_u = teacher_unlabeled(b, with_rep=extras)
    probs_u, y_u = online_labels(b, t_u)
    if extras:
        y_u = denoise(b, t_u, probs_u, y_u)
    out = b.student(torch.cat([b.x_l, b.x_u]), with_rep=extras)
    main_l, main_u = out.main[:BATCH].float(), out.main[BATCH:].float()
    loss = F.cross_entropy(main_l, b.y_l, ignore_index=IGNORE) + AUX_WEIGHT * F.cross_entropy(
        out.aux[:BATCH].float(), b.y_l, ignore_index=IGNORE
    )
    if extras:
        loss = loss + rectified_loss(main_u, out.aux[BATCH:].float(), y_u, ignore_index=IGNORE)
        loss = loss + 0.1 * contrastive_term(out.rep, t_l, t_u, b.y_l, y_u, b.memory, b.prototypes, gen)[0]
    else:
        loss = loss + unsupervised_ce_weight(y_u, 1.0, IGNORE) * masked_ce(main_u, y_u, IGNORE)
    b.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    b.optimizer.step()
    b.teacher.update(b.student, 1000 + step)


def run(device: torch.device, args: argparse.Namespace) -> tuple[Timer, dict]:
    bench, timer, shapes = make_bench(device, args), Timer(device), {}
    for step in range(args.warmup + args.runs):
        timer.record = step >= args.warmup
        timed_pieces(bench, step, timer, shapes)
        timer(E2E_BASE, lambda: whole_step(bench, step, extras=False))  # noqa: B023 - called right here
        timer(E2E_BASE_BOTH, lambda: whole_step(bench, step, extras=False, teacher_on_labeled=True))  # noqa: B023
        timer(E2E_FULL, lambda: whole_step(bench, step, extras=True))  # noqa: B023
    return timer, shapes


def report(timer: Timer, name: str, shapes: dict, args: argparse.Namespace) -> None:
    m = timer.median
    rep_backward = max(0.0, m(FULL_BACKWARD) - m(BASE[5]))
    timer.times[REP_BWD] = [rep_backward]
    base = sum(m(k) for k in BASE)
    extra = m(TEACHER_L) + m(REP_FWD) + m(DENOISE) + m(RECTIFIED) + m(CONTRASTIVE) + rep_backward
    print(
        f"\n{name}: student {args.backbone} OS{args.output_stride}, input {BATCH}+{BATCH} x {SIZE}x{SIZE}, "
        f"main {shapes['main']}, rep {shapes['rep']}, queue {args.capacity}/class, "
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
    e2e_base, e2e_both, e2e_full = m(E2E_BASE), m(E2E_BASE_BOTH), m(E2E_FULL)

    def verdict(x: float) -> str:
        return "within" if x <= 0.15 else "OVER"

    def pct(x: float) -> str:
        return f"{100 * x:.1f}% ({verdict(x)})"

    print(
        "overhead of contrastive + rectified + denoise (goal <= 15%; rectified replacing the unlabeled CE):\n"
        f"  base = teacher on the unlabeled half (selftrain without the three): pieces {pct(replace / base)}, "
        f"end to end {e2e_base * 1e3:.0f} -> {e2e_full * 1e3:.0f} ms {pct((e2e_full - e2e_base) / e2e_base)}\n"
        f"  base = teacher on both halves (U2PL's step):                      pieces {pct(both)}, "
        f"end to end {e2e_both * 1e3:.0f} -> {e2e_full * 1e3:.0f} ms {pct((e2e_full - e2e_both) / e2e_both)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--capacity", type=int, default=30000, help="memory-bank keys per class")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [] if args.no_cpu else [torch.device("cpu")]
    devices += [torch.device("cuda")] if torch.cuda.is_available() else []
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
        f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run"
    )
    for device in devices:
        timer, shapes = run(device, args)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU float32"
        report(timer, name, shapes, args)
    print(
        f"load average {os.getloadavg()[0]:.1f} after the run (above {args.threads}: other processes "
        "shared the cores and the times are inflated)"
    )


if __name__ == "__main__":
    main()
