"""Time ``u2pl_contrastive`` forward + backward at the U2PL+ Cityscapes scale, next to the authors' loss.

2 labeled + 2 unlabeled images, 19 classes, 256-d features at 65 x 65 (P = 4 * 65 * 65 = 16,900
pixels), M = 256 anchors per class, N = 50 negatives per anchor, queues of 30,000 per class.
Queues are filled before timing (steady state). Median of 20 timed runs after 3 warm-up runs,
on CPU and, where available, CUDA; the two losses alternate run by run (other processes on the
machine slow both alike), and the CPU time of this process is reported next to the wall time (on a
shared machine it is the steadier figure).

"authors" is the U2PL authors' ``compute_contra_memobank_loss`` re-implemented from its description
(ALGORITHMS.md section 3; no code copied) on the same flattened batch: per class a loop that builds
the masks from a full sort of every pixel's probabilities, appends the negatives to a list-of-tensors
queue with ``torch.cat`` (and keeps its last 30,000 rows), clones the whole queue to draw N keys per
anchor, and materialises the (M, 1 + N, D) keys for ``cosine_similarity``. Its rules differ (the
defects ALGORITHMS.md lists), so its loss is a different number; it is timed, not compared.
``--profile`` prints where labelpipe's time goes (torch.profiler, self CPU time per op).

    python benchmarks/contrastive_loss.py [--runs 20] [--threads N] [--profile]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
from torch import Tensor

from labelpipe.losses.contrastive import MemoryBank, PrototypeBank, u2pl_contrastive

NUM_CLASSES, DIM, SIDE, IMAGES = 19, 256, 65, 4


def make_batch(device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """Synthetic flattened batch: teacher probabilities peaked on a per-pixel 'true' class."""
    g = torch.Generator().manual_seed(seed)
    pixels_per_image = SIDE * SIDE
    num_pixels = IMAGES * pixels_per_image
    truth = torch.randint(0, NUM_CLASSES, (num_pixels,), generator=g)
    logits = torch.randn(num_pixels, NUM_CLASSES, generator=g) * 1.5 + 3.0 * F.one_hot(truth, NUM_CLASSES)
    probs = logits.softmax(dim=1)
    is_labeled = torch.arange(num_pixels) < 2 * pixels_per_image
    labels = torch.where(is_labeled, truth, probs.argmax(dim=1))
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(dim=1)
    unlabeled_entropy = entropy[~is_labeled]
    reliable = entropy < unlabeled_entropy.quantile(0.8)  # alpha_0 = 20% unreliable
    batch = {
        "student_feats": torch.randn(num_pixels, DIM, generator=g),
        "teacher_feats": torch.randn(num_pixels, DIM, generator=g),
        "teacher_probs": probs,
        "labels": labels,
        "is_labeled": is_labeled,
        "reliable": reliable,
    }
    return {name: tensor.to(device) for name, tensor in batch.items()}


def authors_loss(batch: dict[str, torch.Tensor], queues: list[torch.Tensor], generator: torch.Generator) -> Tensor:
    """The authors' contrastive loss, step by step as their code does it (see the module docstring)."""
    rep, rep_teacher = batch["student_feats"], batch["teacher_feats"]
    prob, labels, is_labeled = batch["teacher_probs"], batch["labels"], batch["is_labeled"]
    low_mask = is_labeled | batch["reliable"]  # labeled pixels, and the reliable (low-entropy) unlabeled ones
    high_mask = is_labeled | ~batch["reliable"]
    one_hot = F.one_hot(labels, NUM_CLASSES).bool()
    order = torch.sort(prob, 1, True).indices  # every pixel's classes by probability
    seg_feat_low_entropy, prototypes, valid_classes = [], [], []
    for c in range(NUM_CLASSES):
        low_valid, high_valid = one_hot[:, c] & low_mask, one_hot[:, c] & high_mask
        anchors = (prob[:, c] > 0.3) & low_valid
        seg_feat_low_entropy.append(rep[anchors])
        prototypes.append(rep_teacher[low_valid].detach().mean(0, keepdim=True))
        class_mask = torch.where(
            is_labeled, order[:, :3].eq(c).any(1) & ~one_hot[:, c], order[:, 3:20].eq(c).any(1)
        )  # labeled: rank < 3 and y != c; unlabeled: 3 <= rank < 20
        keys = rep_teacher[(prob[:, c] < 1.0) & high_valid & class_mask].detach()
        queues[c] = torch.cat((queues[c], keys.clone()), 0)[-30000:]  # the list-of-tensors FIFO
        if low_valid.any():
            valid_classes.append(c)
    loss = rep.sum() * 0.0
    for c in valid_classes:
        if len(seg_feat_low_entropy[c]) == 0 or queues[c].shape[0] == 0:
            continue
        anchor = seg_feat_low_entropy[c][torch.randint(len(seg_feat_low_entropy[c]), (256,), generator=generator)]
        with torch.no_grad():
            negatives = queues[c].clone()
            negatives = negatives[torch.randint(len(negatives), (256 * 50,), generator=generator)].reshape(256, 50, DIM)
            positive = prototypes[c].unsqueeze(0).repeat(256, 1, 1)
            keys = torch.cat((positive, negatives), dim=1)
        logits = torch.cosine_similarity(anchor.unsqueeze(1), keys, dim=2)
        loss = loss + F.cross_entropy(logits / 0.5, torch.zeros(256, dtype=torch.long))
    return loss / max(len(valid_classes), 1)


def time_device(device: torch.device, runs: int, profile: bool = False) -> dict:
    """Median and min ms of labelpipe's and the authors' loss fwd + bwd, alternating run by run."""
    batch = make_batch(device)
    memory = MemoryBank(NUM_CLASSES, DIM, capacity=30000, device=device)
    prototypes = PrototypeBank(NUM_CLASSES, DIM, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    # Steady state of a long run: full queues (a fresh buffer would page-fault while it fills).
    fill = F.normalize(torch.randn(memory.capacity, DIM, device=device), dim=1)
    for c in range(NUM_CLASSES):
        memory.push(c, fill)
    queues = [fill.clone() for _ in range(NUM_CLASSES)]
    authors_generator = torch.Generator(device=device).manual_seed(0)
    stats: dict[str, int] = {}

    def ours() -> None:
        nonlocal stats
        student = batch["student_feats"].clone().requires_grad_(True)
        loss, stats = u2pl_contrastive(
            student,
            batch["teacher_feats"],
            batch["teacher_probs"],
            batch["labels"],
            batch["is_labeled"],
            batch["reliable"],
            memory,
            prototypes,
            num_anchors=256,
            num_negatives=50,
            generator=generator,
        )
        loss.backward()

    def theirs() -> None:
        student = batch["student_feats"].clone().requires_grad_(True)
        authors_loss({**batch, "student_feats": student}, queues, authors_generator).backward()

    times: dict[str, list[float]] = {"labelpipe": [], "authors": []}
    cpu_times: dict[str, list[float]] = {"labelpipe": [], "authors": []}
    for run in range(runs + 3):
        for name, step in (("labelpipe", ours), ("authors", theirs)):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if run >= 3:
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(3):
                ours()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    out = {name: (statistics.median(t) * 1e3, min(t) * 1e3) for name, t in times.items()}
    cpu = {name: statistics.median(t) * 1e3 for name, t in cpu_times.items()}
    return {"times": out, "cpu_ms": cpu, "stats": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print labelpipe's time per op (CPU)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [torch.device("cpu")]
    if torch.cuda.is_available():
        devices.append(torch.device("cuda"))
    print(
        f"u2pl_contrastive fwd+bwd: P={IMAGES}x{SIDE}x{SIDE}={IMAGES * SIDE * SIDE}, C={NUM_CLASSES}, "
        f"D={DIM}, M=256, N=50, queue 30000/class, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads, median of {args.runs}"
    )
    header = f"{'device':<8} {'labelpipe ms':>13} {'(min)':>7} {'authors ms':>11} {'(min)':>7} {'speed-up':>9}"
    print(header + "  CPU ms labelpipe / authors (speed-up)  negatives pushed")
    for device in devices:
        result = time_device(device, args.runs, args.profile and device.type == "cpu")
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        (ours, ours_min), (theirs, theirs_min) = result["times"]["labelpipe"], result["times"]["authors"]
        cpu = result["cpu_ms"]
        print(
            f"{name:<8} {ours:>13.1f} {ours_min:>7.1f} {theirs:>11.1f} {theirs_min:>7.1f} {theirs / ours:>8.1f}x"
            f"  {cpu['labelpipe']:.0f} / {cpu['authors']:.0f} ({cpu['authors'] / cpu['labelpipe']:.1f}x)"
            f"  {result['stats']['negatives_pushed']}"
        )


if __name__ == "__main__":
    main()
