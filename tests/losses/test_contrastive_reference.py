"""``u2pl_contrastive`` step by step against a plain reference written here: masks by sorting each pixel's
classes, queues as Python ring buffers, prototypes as loop means, and the loss and gradient by autograd
on the explicitly gathered (K, M, N, D) keys, drawing the same anchors and keys from the same generator.

The fast path (ranks without sorting, negatives gathered straight into the ring, the fused InfoNCE with
its hand-made gradient) must give the same queues and prototypes exactly, and the same loss and
gradient up to float rounding, over batches that wrap the queues around.
"""

import pytest
import torch
import torch.nn.functional as F

from labelpipe.losses.contrastive import MemoryBank, PrototypeBank, sample_anchor_indices, u2pl_contrastive

NUM_CLASSES, DIM, CAPACITY = 6, 8, 48
NUM_ANCHORS, NUM_NEGATIVES, TAU, R_L, R_H, MOMENTUM = 5, 4, 0.5, 2, 5, 0.9


def reference_batch(g, num_pixels=70):
    """Probabilities with ties (rounded to 1/8: the rank rule's tie order matters), ignored labels."""
    probs = torch.softmax(torch.randn(num_pixels, NUM_CLASSES, generator=g) * 2, dim=1)
    probs = (probs * 8).round() / 8
    is_labeled = torch.arange(num_pixels) < num_pixels // 2
    labels = torch.where(is_labeled, torch.randint(0, NUM_CLASSES, (num_pixels,), generator=g), probs.argmax(1))
    labels[::9] = torch.where(is_labeled[::9], 255, labels[::9])
    reliable = ~is_labeled & (torch.rand(num_pixels, generator=g) < 0.5)
    student = torch.randn(num_pixels, DIM, generator=g)
    teacher = torch.randn(num_pixels, DIM, generator=g) * 3
    return student, teacher, probs, labels, is_labeled, reliable


def sorted_rank(row, c):
    """Position of class c among the row's classes by descending probability, ties by class index."""
    order = sorted(range(len(row)), key=lambda k: (-float(row[k]), k))
    return order.index(c)


class ReferenceStep:
    """Prototypes, per-class ring buffers and the loss, pixel by pixel and class by class."""

    def __init__(self):
        self.prototypes = torch.zeros(NUM_CLASSES, DIM)
        self.seen = [False] * NUM_CLASSES
        self.ring = torch.zeros(NUM_CLASSES, CAPACITY, DIM)
        self.ptr = [0] * NUM_CLASSES
        self.count = [0] * NUM_CLASSES

    def fold_prototypes(self, teacher, labels, is_labeled, reliable):
        for c in range(NUM_CLASSES):
            pixels = [p for p in range(len(labels)) if int(labels[p]) == c and (is_labeled[p] or reliable[p])]
            if not pixels:
                continue
            mean = teacher[pixels].sum(0) / len(pixels)
            self.prototypes[c] = MOMENTUM * self.prototypes[c] + (1 - MOMENTUM) * mean if self.seen[c] else mean
            self.seen[c] = True

    def push(self, teacher, probs, labels, is_labeled, reliable):
        """Append each class's negatives in pixel order; returns how many each class got."""
        unit = F.normalize(teacher, dim=1)
        pushed = [0] * NUM_CLASSES
        for c in range(NUM_CLASSES):
            for p in range(len(labels)):
                rank = sorted_rank(probs[p], c)
                if is_labeled[p]:
                    negative = int(labels[p]) not in (255, c) and rank < R_L
                else:
                    negative = not reliable[p] and R_L <= rank < min(R_H, NUM_CLASSES)
                if negative:
                    self.ring[c, self.ptr[c]] = unit[p]
                    self.ptr[c] = (self.ptr[c] + 1) % CAPACITY
                    self.count[c] = min(self.count[c] + 1, CAPACITY)
                    pushed[c] += 1
        return pushed

    def loss(self, student, probs, labels, is_labeled, reliable, generator):
        candidates = torch.zeros(NUM_CLASSES, len(labels), dtype=torch.bool)
        for c in range(NUM_CLASSES):
            for p in range(len(labels)):
                own = int(labels[p]) == c and (is_labeled[p] or reliable[p])
                candidates[c, p] = own and float(probs[p, c]) > 0.3
        classes = [c for c in range(NUM_CLASSES) if candidates[c].any() and self.count[c] > 0 and self.seen[c]]
        pixels = sample_anchor_indices(candidates[classes], NUM_ANCHORS, generator)  # the same draws
        u = torch.rand((len(classes), NUM_ANCHORS * NUM_NEGATIVES), generator=generator, dtype=torch.float64)
        total = 0.0
        for i, c in enumerate(classes):
            slots = torch.minimum((u[i] * self.count[c]).long(), torch.tensor(self.count[c] - 1))
            keys = self.ring[c, slots].view(NUM_ANCHORS, NUM_NEGATIVES, DIM)
            anchors = F.normalize(student[pixels[i]], dim=1)
            positive = F.normalize(self.prototypes[c], dim=0)
            logits = torch.cat([(anchors @ positive)[:, None], (keys @ anchors[:, :, None])[..., 0]], 1) / TAU
            total = total + (torch.logsumexp(logits, 1) - logits[:, 0]).mean()
        return total / len(classes)


@pytest.mark.parametrize("seed", [0, 1])
def test_u2pl_contrastive_equals_the_plain_reference_over_wrapping_batches(seed):
    g = torch.Generator().manual_seed(seed)
    memory = MemoryBank(NUM_CLASSES, DIM, capacity=CAPACITY)
    prototypes = PrototypeBank(NUM_CLASSES, DIM, momentum=MOMENTUM)
    reference = ReferenceStep()
    for step in range(4):
        student, teacher, probs, labels, is_labeled, reliable = reference_batch(g)
        fast_student = student.clone().requires_grad_(True)
        loss, stats = u2pl_contrastive(
            fast_student,
            teacher,
            probs,
            labels,
            is_labeled,
            reliable,
            memory,
            prototypes,
            num_anchors=NUM_ANCHORS,
            num_negatives=NUM_NEGATIVES,
            temperature=TAU,
            r_l=R_L,
            r_h=R_H,
            generator=torch.Generator().manual_seed(100 + step),
        )
        loss.backward()

        reference.fold_prototypes(teacher, labels, is_labeled, reliable)
        pushed = reference.push(teacher, probs, labels, is_labeled, reliable)
        ref_student = student.clone().requires_grad_(True)
        same_draws = torch.Generator().manual_seed(100 + step)
        ref_loss = reference.loss(ref_student, probs, labels, is_labeled, reliable, same_draws)
        ref_loss.backward()

        assert max(reference.count) == CAPACITY or step < 2  # the rings have wrapped by the last steps
        assert stats["negatives_pushed"] == sum(pushed) and max(pushed) <= CAPACITY  # no subsampling draw
        assert torch.equal(memory.feats, reference.ring)
        assert memory.ptr.tolist() == reference.ptr and memory.count.tolist() == reference.count
        assert torch.allclose(prototypes.prototypes, reference.prototypes, rtol=1e-6, atol=1e-6)
        assert torch.allclose(loss, ref_loss, rtol=1e-6, atol=1e-7)
        assert torch.allclose(fast_student.grad, ref_student.grad, rtol=1e-5, atol=1e-8)
        assert ref_student.grad.abs().sum() > 0 and stats["classes"] >= 2


def test_the_gathered_ddp_path_with_one_rank_equals_the_direct_push():
    """With an identity ``gather`` (one rank) the negatives go through the gathered, materialised path and
    push(); without, push_rows gathers them straight into the rings: same queues, loss and gradient."""
    results = []
    for gather in (None, lambda t: t):
        g = torch.Generator().manual_seed(3)
        memory, prototypes = MemoryBank(NUM_CLASSES, DIM, capacity=CAPACITY), PrototypeBank(NUM_CLASSES, DIM)
        for step in range(3):
            student, teacher, probs, labels, is_labeled, reliable = reference_batch(g)
            student.requires_grad_(True)
            loss, _ = u2pl_contrastive(
                student,
                teacher,
                probs,
                labels,
                is_labeled,
                reliable,
                memory,
                prototypes,
                num_anchors=NUM_ANCHORS,
                num_negatives=NUM_NEGATIVES,
                r_l=R_L,
                r_h=R_H,
                generator=torch.Generator().manual_seed(step),
                gather=gather,
                shared_generator=torch.Generator().manual_seed(50 + step),
            )
            loss.backward()
        results.append((memory.feats.clone(), memory.ptr.clone(), loss.detach(), student.grad))
    (feats_a, ptr_a, loss_a, grad_a), (feats_b, ptr_b, loss_b, grad_b) = results
    assert torch.equal(feats_a, feats_b) and torch.equal(ptr_a, ptr_b)
    assert torch.equal(loss_a, loss_b) and torch.equal(grad_a, grad_b)
