"""Time ``u2pl_contrastive`` forward + backward at the U2PL+ Cityscapes scale.

2 labeled + 2 unlabeled images, 19 classes, 256-d features at 65 x 65 (P = 4 * 65 * 65 = 16,900
pixels), M = 256 anchors per class, N = 50 negatives per anchor, queues of 30,000 per class.
Queues are filled before timing (steady state). Median of 20 timed runs after 3 warm-up runs,
on CPU and, where available, CUDA.

    python benchmarks/contrastive_loss.py [--runs 20] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

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


def time_device(device: torch.device, runs: int) -> tuple[float, float, dict[str, int]]:
    batch = make_batch(device)
    memory = MemoryBank(NUM_CLASSES, DIM, capacity=30000, device=device)
    prototypes = PrototypeBank(NUM_CLASSES, DIM, device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    # Steady state of a long run: full queues (a fresh buffer would page-fault while it fills).
    fill = F.normalize(torch.randn(memory.capacity, DIM, device=device), dim=1)
    for c in range(NUM_CLASSES):
        memory.push(c, fill)
    times, stats = [], {}
    for run in range(runs + 3):
        student = batch["student_feats"].clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if run >= 3:
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3, stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
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
    print(f"{'device':<8} {'median ms':>10} {'min ms':>8} {'classes':>8} {'negatives pushed':>17}")
    for device in devices:
        median_ms, min_ms, stats = time_device(device, args.runs)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        pushed = stats["negatives_pushed"]
        print(f"{name:<8} {median_ms:>10.1f} {min_ms:>8.1f} {stats['classes']:>8} {pushed:>17}")


if __name__ == "__main__":
    main()
