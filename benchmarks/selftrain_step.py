"""Where the time of one self-training step goes (``labelpipe selftrain`` with everything on).

The step of ``RoundObjective`` (labelpipe/stages/selftrain.py), rebuilt from labelpipe.models,
labelpipe.teacher and labelpipe.losses at the U2PL+ Cityscapes scale: 2 labeled + 2 unlabeled
images of 257 x 257, 19 classes, a 256-d representation head (65 x 65 at stride 4: 257 -> conv1
129 -> maxpool 65), M = 256 anchors, N = 50 negatives, full queues of ``--capacity`` keys per class.
Data loading and CutMix are not timed.

Each loss is computed on detached copies of the student's outputs, so that its forward and its
backward (down to the outputs) are timed on their own; the model's backward is then timed from
the summed output gradients, once without the representation head's gradient (what a step
without the contrastive loss back-propagates) and once with it. A last row times the real step
end to end (one ``backward``), as a check on the sum.

Teacher logits are sharpened towards a synthetic ground truth (untimed) so that anchors and
negatives exist as in a trained model: a randomly initialised teacher is near-uniform, which
leaves no anchor above p > 0.3 and makes the contrastive loss free.

Overhead = contrastive (fwd + bwd, its labels / probabilities at rep size, memory push + sample,
prototype update, and the rep head's backward) + rectified (fwd + bwd) + denoising, as a % of a
step that already has the teacher forward (teacher, online labels, student fwd + bwd, CE losses,
SGD, EMA). With ``--rectified`` the rectified loss *replaces* the unlabeled CE; both views are printed.

    python benchmarks/selftrain_step.py [--runs 5] [--threads 2] [--backbone resnet18 --output-stride 16]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections import defaultdict

import torch
import torch.nn.functional as F

from labelpipe.losses import (
    MemoryBank,
    PrototypeBank,
    denoise_pseudo_labels,
    masked_ce,
    rectified_loss,
    u2pl_contrastive,
    unsupervised_ce_weight,
)
from labelpipe.models import build_model
from labelpipe.pseudo import entropy_split_torch
from labelpipe.teacher import EMATeacher

NUM_CLASSES, REP_DIM, SIZE, BATCH, IGNORE = 19, 256, 257, 2, 255
ANCHORS, NEGATIVES, TEMPERATURE, ALPHA_T, AUX_WEIGHT = 256, 50, 0.5, 0.2, 0.4
BASE = ["teacher forward (labeled + unlabeled)", "online pseudo-labels (entropy split)", "student forward",
        "supervised CE (main + 0.4 aux) fwd+bwd", "unsupervised CE fwd+bwd", "model backward (main, aux)",
        "SGD step", "EMA update"]
EXTRA = ["denoising (rep upsample + prototypes)", "rectified loss fwd+bwd", "contrastive fwd+bwd",
         "  of which u2pl_contrastive call", "rep head backward (contrastive grad)"]


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
    size = rep.shape[-2:]
    t_rep = torch.cat([t_l.rep, t_u.rep]).float()
    t_probs = torch.softmax(F.interpolate(torch.cat([t_l.main, t_u.main]).float(), size=size, mode="bilinear",
                                          align_corners=False), 1)
    labels = F.interpolate(torch.cat([y_l, y_u])[:, None].float(), size=size, mode="nearest")[:, 0].long()
    is_labeled = torch.zeros_like(labels, dtype=torch.bool)
    is_labeled[:BATCH] = True
    reliable = (~is_labeled) & (labels != IGNORE)
    labels = torch.where((~is_labeled) & (labels == IGNORE), t_probs.argmax(1), labels)
    valid = is_labeled & (labels != IGNORE) | ~is_labeled
    d = rep.shape[1]
    return u2pl_contrastive(
        rep.permute(0, 2, 3, 1).reshape(-1, d), t_rep.permute(0, 2, 3, 1).reshape(-1, d),
        t_probs.permute(0, 2, 3, 1).reshape(-1, t_probs.shape[1]), labels.reshape(-1),
        is_labeled.reshape(-1), reliable.reshape(-1), memory, prototypes, num_anchors=ANCHORS,
        num_negatives=NEGATIVES, temperature=TEMPERATURE, generator=generator, valid=valid.reshape(-1),
        ignore_index=IGNORE,
    )


def run(device: torch.device, args: argparse.Namespace) -> tuple[Timer, dict]:
    torch.manual_seed(0)
    rates = (6, 12, 18) if args.output_stride == 16 else (12, 24, 36)
    student = build_model(NUM_CLASSES, args.backbone, args.output_stride, rates, rep_dim=REP_DIM).to(device)
    student.train()
    teacher = EMATeacher(student, 0.99).to(device)
    backbone_params, head_params = student.parameter_groups()
    optimizer = torch.optim.SGD([{"params": backbone_params, "lr": 0.01}, {"params": head_params, "lr": 0.1}],
                                lr=0.01, momentum=0.9, weight_decay=1e-4)
    memory = MemoryBank(NUM_CLASSES, REP_DIM, capacity=args.capacity, device=device)
    fill = F.normalize(torch.randn(args.capacity, REP_DIM, device=device), dim=1)
    for c in range(NUM_CLASSES):  # steady state: full queues
        memory.push(c, fill)
    prototypes = PrototypeBank(NUM_CLASSES, REP_DIM, momentum=0.999, device=device)

    data = torch.Generator().manual_seed(0)
    x_l = torch.randn(BATCH, 3, SIZE, SIZE, generator=data).to(device)
    x_u = torch.randn(BATCH, 3, SIZE, SIZE, generator=data).to(device)
    y_l, truth_u = block_labels(data).to(device), block_labels(data).to(device)
    timer, shapes = Timer(device), {}
    for step in range(args.warmup + args.runs):
        timer.record = step >= args.warmup
        gen = torch.Generator(device=device).manual_seed(step)
        t_l, t_u = timer(BASE[0], lambda: (teacher(x_l), teacher(x_u)))
        t_l = t_l._replace(main=sharpen(t_l.main, y_l, data))
        t_u = t_u._replace(main=sharpen(t_u.main, truth_u, data))

        def online_labels():
            probs = torch.softmax(t_u.main.float(), 1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
            reliable = entropy_split_torch(entropy, ALPHA_T)
            return probs, torch.where(reliable, probs.argmax(1), torch.full_like(truth_u, IGNORE))

        probs_u, y_u = timer(BASE[1], online_labels)

        def denoise():
            rep = F.interpolate(t_u.rep.float(), size=y_u.shape[-2:], mode="bilinear", align_corners=False)
            return torch.where(y_u != IGNORE, denoise_pseudo_labels(probs_u, rep, prototypes), y_u)

        y_u = timer(EXTRA[0], denoise)
        out = timer(BASE[2], lambda: student(torch.cat([x_l, x_u])))
        main = out.main.detach().float().requires_grad_(True)
        aux = out.aux.detach().float().requires_grad_(True)
        rep = out.rep.detach().requires_grad_(True)
        shapes = {"main": tuple(out.main.shape), "rep": tuple(out.rep.shape)}

        def fwd_bwd(fn, leaves):
            loss = fn()
            return torch.autograd.grad(loss, leaves)

        grads = {}
        grads["sup"] = timer(BASE[3], lambda: fwd_bwd(lambda: F.cross_entropy(main[:BATCH], y_l, ignore_index=IGNORE)
                             + AUX_WEIGHT * F.cross_entropy(aux[:BATCH], y_l, ignore_index=IGNORE), [main, aux]))
        grads["unsup"] = timer(BASE[4], lambda: fwd_bwd(
            lambda: unsupervised_ce_weight(y_u, 1.0, IGNORE) * masked_ce(main[BATCH:], y_u, IGNORE), [main]))
        grads["rect"] = timer(EXTRA[1], lambda: fwd_bwd(
            lambda: rectified_loss(main[BATCH:], aux[BATCH:], y_u, ignore_index=IGNORE), [main, aux]))

        def contrastive():
            loss, stats = timer(EXTRA[3], lambda: contrastive_term(rep, t_l, t_u, y_l, y_u, memory, prototypes,
                                                                     gen))
            shapes["contrastive classes"] = stats["classes"]
            return torch.autograd.grad(0.1 * loss, [rep])

        grads["contra"] = timer(EXTRA[2], contrastive)
        g_main = grads["sup"][0] + grads["unsup"][0] + grads["rect"][0]
        g_aux = grads["sup"][1] + grads["rect"][1]
        outputs = [out.main, out.aux, out.rep]
        timer(BASE[5], lambda: torch.autograd.backward(outputs[:2], [g_main, g_aux], retain_graph=True))
        optimizer.zero_grad(set_to_none=True)
        timer("model backward (main, aux, rep)", lambda: torch.autograd.backward(
            outputs, [g_main, g_aux, grads["contra"][0]]))
        timer(BASE[6], optimizer.step)
        timer(BASE[7], lambda: teacher.update(student, 1000 + step))
        optimizer.zero_grad(set_to_none=True)

        def whole_step():  # RoundObjective with --pseudo-source teacher --denoise --rectified --contrastive
            tl, tu = teacher(x_l), teacher(x_u)
            tl, tu = tl._replace(main=sharpen(tl.main, y_l, data)), tu._replace(main=sharpen(tu.main, truth_u, data))
            probs = torch.softmax(tu.main.float(), 1)
            entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(1)
            target = torch.where(entropy_split_torch(entropy, ALPHA_T), probs.argmax(1),
                                 torch.full_like(truth_u, IGNORE))
            rep_u = F.interpolate(tu.rep.float(), size=target.shape[-2:], mode="bilinear", align_corners=False)
            target = torch.where(target != IGNORE, denoise_pseudo_labels(probs, rep_u, prototypes), target)
            o = student(torch.cat([x_l, x_u]))
            loss = (F.cross_entropy(o.main[:BATCH].float(), y_l, ignore_index=IGNORE)
                    + AUX_WEIGHT * F.cross_entropy(o.aux[:BATCH].float(), y_l, ignore_index=IGNORE)
                    + rectified_loss(o.main[BATCH:].float(), o.aux[BATCH:].float(), target, ignore_index=IGNORE)
                    + 0.1 * contrastive_term(o.rep, tl, tu, y_l, target, memory, prototypes, gen)[0])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            teacher.update(student, 1000 + step)

        timer("end-to-end step (one backward)", whole_step)
    return timer, shapes


def report(timer: Timer, name: str, shapes: dict, args: argparse.Namespace) -> None:
    m = timer.median
    rep_backward = max(0.0, m("model backward (main, aux, rep)") - m(BASE[5]))
    timer.times[EXTRA[4]] = [rep_backward]
    base = sum(m(k) for k in BASE)
    extra = m(EXTRA[0]) + m(EXTRA[1]) + m(EXTRA[2]) + rep_backward
    print(f"\n{name}: student {args.backbone} OS{args.output_stride}, input {BATCH}+{BATCH} x {SIZE}x{SIZE}, "
          f"main {shapes['main']}, rep {shapes['rep']}, queue {args.capacity}/class, "
          f"{shapes['contrastive classes']} classes in the contrastive loss; median of {args.runs} steps")
    print(f"{'piece':<44} {'ms':>9} {'% of base':>10}")
    for key in BASE:
        print(f"{key:<44} {m(key) * 1e3:>9.1f} {100 * m(key) / base:>9.1f}%")
    print(f"{'= base step (teacher, CE losses, SGD, EMA)':<44} {base * 1e3:>9.1f} {100.0:>9.1f}%")
    for key in EXTRA:
        print(f"{key:<44} {m(key) * 1e3:>9.1f} {100 * m(key) / base:>9.1f}%")
    print(f"{'= total (base + all three)':<44} {(base + extra) * 1e3:>9.1f} {100 * (base + extra) / base:>9.1f}%")
    end_to_end = m("end-to-end step (one backward)")
    print(f"{'end-to-end step (one backward), check':<44} {end_to_end * 1e3:>9.1f} {100 * end_to_end / base:>9.1f}%")
    replace = extra - m(BASE[4])
    verdict = "within" if extra / base <= 0.15 else "OVER"
    print(f"overhead of contrastive + rectified + denoise: {100 * extra / base:.1f}% of the base step "
          f"({verdict} the 15% goal); {100 * replace / base:.1f}% when rectified replaces the unlabeled CE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="timed steps (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    parser.add_argument("--capacity", type=int, default=30000, help="memory-bank keys per class (config default)")
    parser.add_argument("--no-cpu", action="store_true", help="CUDA only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    devices = [] if args.no_cpu else [torch.device("cpu")]
    devices += [torch.device("cuda")] if torch.cuda.is_available() else []
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads, load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores before the run")
    for device in devices:
        timer, shapes = run(device, args)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU float32"
        report(timer, name, shapes, args)
    print(f"load average {os.getloadavg()[0]:.1f} after the run (above {args.threads}: other processes shared "
          "the cores and the times are inflated)")


if __name__ == "__main__":
    main()
