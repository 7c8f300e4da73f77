"""U2PL+ contrastive pieces: InfoNCE, the per-class queue, the rank rules, prototypes, denoising.

Every formula is checked by hand on tiny inputs and against a plain-loop version written here.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from labelpipe.losses.contrastive import (
    MemoryBank,
    PrototypeBank,
    anchor_masks,
    batch_prototypes,
    class_ranks,
    contrastive_loss,
    denoise_pseudo_labels,
    negative_masks,
    rank_below,
    sample_anchor_indices,
    subsample_per_class,
    u2pl_contrastive,
)

# ---------------------------------------------------------------- plain-loop references


def loop_contrastive(anchors, positive, negatives, tau):
    """Eq. 10 one anchor at a time: -log(e^{<a,z+>/tau} / (e^{<a,z+>/tau} + sum_j e^{<a,z-_j>/tau}))."""
    total = 0.0
    for i in range(anchors.shape[0]):
        a = anchors[i].double()
        pos = positive if positive.dim() == 1 else positive[i]
        numerator = math.exp(float(F.cosine_similarity(a, pos.double(), dim=0)) / tau)
        denominator = numerator
        for j in range(negatives.shape[1]):
            denominator += math.exp(float(F.cosine_similarity(a, negatives[i, j].double(), dim=0)) / tau)
        total += -math.log(numerator / denominator)
    return total / anchors.shape[0]


def loop_rank(probs_row, c):
    """Position of class c when classes are sorted by descending probability (ties: lower index first)."""
    order = sorted(range(len(probs_row)), key=lambda k: (-float(probs_row[k]), k))
    return order.index(c)


def loop_negatives(probs, labels, is_labeled, reliable, r_l, r_h):
    """Eq. 26-27 pixel by pixel, class by class; r_h clipped to C."""
    num_pixels, num_classes = probs.shape
    r_h = min(r_h, num_classes)
    out = torch.zeros(num_classes, num_pixels, dtype=torch.bool)
    for p in range(num_pixels):
        for c in range(num_classes):
            rank = loop_rank(probs[p], c)
            if is_labeled[p]:
                y = int(labels[p])
                out[c, p] = y != 255 and y != c and rank < r_l
            else:
                out[c, p] = (not reliable[p]) and r_l <= rank < r_h
    return out


# ---------------------------------------------------------------- contrastive_loss


def test_contrastive_hand_value():
    # cos(a, z+) = 1, cos(a, z-) = 0, tau = 0.5: -log(e^2 / (e^2 + e^0)) = log(1 + e^-2)
    anchors = torch.tensor([[1.0, 0.0]])
    positive = torch.tensor([2.0, 0.0])
    negatives = torch.tensor([[[0.0, 3.0]]])
    assert float(contrastive_loss(anchors, positive, negatives)) == pytest.approx(math.log(1 + math.exp(-2)))
    # two negatives, one opposite: log(1 + e^-2 + e^-4)
    negatives = torch.tensor([[[0.0, 3.0], [-1.0, 0.0]]])
    expected = math.log(1 + math.exp(-2) + math.exp(-4))
    assert float(contrastive_loss(anchors, positive, negatives)) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("per_anchor_positive", [False, True])
def test_contrastive_matches_loop(per_anchor_positive):
    g = torch.Generator().manual_seed(0)
    anchors = torch.randn(6, 8, generator=g)
    positive = torch.randn(6, 8, generator=g) if per_anchor_positive else torch.randn(8, generator=g)
    negatives = torch.randn(6, 5, 8, generator=g)
    for tau in (0.5, 0.1):
        got = float(contrastive_loss(anchors, positive, negatives, temperature=tau))
        assert got == pytest.approx(loop_contrastive(anchors, positive, negatives, tau), rel=1e-5)


def test_contrastive_is_scale_invariant_and_shared_positive_broadcasts():
    g = torch.Generator().manual_seed(1)
    anchors, positive, negatives = (
        torch.randn(4, 3, generator=g),
        torch.randn(3, generator=g),
        torch.randn(4, 2, 3, generator=g),
    )
    base = contrastive_loss(anchors, positive, negatives)
    assert torch.allclose(contrastive_loss(3 * anchors, 0.5 * positive, 7 * negatives), base, atol=1e-6)
    assert torch.allclose(contrastive_loss(anchors, positive.expand(4, 3), negatives), base, atol=1e-6)


def test_contrastive_gradient_reaches_anchors_not_detached_keys():
    g = torch.Generator().manual_seed(2)
    anchors = torch.randn(4, 3, generator=g, requires_grad=True)
    keys = torch.randn(4, 3, 3, generator=g, requires_grad=True)
    positive = torch.randn(3, generator=g, requires_grad=True)
    contrastive_loss(anchors, positive.detach(), keys.detach()).backward()
    assert anchors.grad.abs().sum() > 0
    assert keys.grad is None and positive.grad is None
    # gradient flows into whatever requires it
    anchors.grad = None
    contrastive_loss(anchors, positive, keys).backward()
    assert keys.grad.abs().sum() > 0 and positive.grad.abs().sum() > 0


def test_contrastive_without_anchors_is_zero():
    loss = contrastive_loss(torch.zeros(0, 3, requires_grad=True), torch.ones(3), torch.zeros(0, 2, 3))
    assert loss.item() == 0.0


# ---------------------------------------------------------------- MemoryBank


def numbered(values, dim=2):
    return torch.tensor(values, dtype=torch.float32)[:, None].expand(-1, dim).contiguous()


def first_column(bank, c):
    return bank.get(c)[:, 0].tolist()


def test_memory_wraps_around_keeping_last_capacity_in_fifo_order():
    bank = MemoryBank(num_classes=2, dim=2, capacity=5)
    bank.push(0, numbered(range(7)))
    assert first_column(bank, 0) == [2, 3, 4, 5, 6]
    assert bank.size(0) == 5 and bank.size(1) == 0

    split = MemoryBank(num_classes=2, dim=2, capacity=5)
    split.push(0, numbered([0, 1, 2]))
    assert first_column(split, 0) == [0, 1, 2]
    split.push(0, numbered([3, 4, 5, 6]))
    assert first_column(split, 0) == [2, 3, 4, 5, 6]
    # ring storage: the newest (5, 6) overwrote the oldest slots (0, 1)
    assert split.feats[0, :, 0].tolist() == [5, 6, 2, 3, 4]
    assert int(split.ptr[0]) == 2

    many = MemoryBank(num_classes=1, dim=2, capacity=5)
    many.push(0, numbered([100]))
    many.push(0, numbered(range(12)))
    assert first_column(many, 0) == [7, 8, 9, 10, 11]
    many.push(0, numbered([12]))
    assert first_column(many, 0) == [8, 9, 10, 11, 12]


def test_memory_push_with_interleaved_class_ids():
    bank = MemoryBank(num_classes=3, dim=2, capacity=3)
    classes = torch.tensor([0, 1, 0, 2, 0, 1, 0])
    bank.push(classes, numbered(range(7)))
    assert first_column(bank, 0) == [2, 4, 6]
    assert first_column(bank, 1) == [1, 5]
    assert first_column(bank, 2) == [3]


def test_push_rows_equals_push_of_the_gathered_rows():
    """push_rows(ids, source, rows) leaves the bank as push(ids, source[rows]): interleaved classes,
    a wrap-around, a class given more rows than its capacity, and a float16 bank."""
    g = torch.Generator().manual_seed(4)
    source = torch.randn(30, 3, generator=g)
    for dtype in (torch.float32, torch.float16):
        direct, gathered = MemoryBank(4, 3, capacity=5, dtype=dtype), MemoryBank(4, 3, capacity=5, dtype=dtype)
        for size in (3, 4, 9, 0, 12):  # class 0 overflows at 9 and 12; the rings wrap
            rows = torch.randint(0, 30, (size,), generator=g)
            ids = torch.randint(0, 3, (size,), generator=g)
            direct.push_rows(ids, source, rows)
            gathered.push(ids, source[rows])
            assert torch.equal(direct.feats, gathered.feats)
            assert torch.equal(direct.ptr, gathered.ptr) and torch.equal(direct.count, gathered.count)
        direct.push_rows(2, source, torch.tensor([5, 6]))
        assert torch.equal(direct.get(2)[-2:], source[5:7].to(dtype))
    with pytest.raises(ValueError, match="class ids"):
        MemoryBank(2, 3).push_rows(torch.tensor([0, 2]), source, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="K class ids"):
        MemoryBank(2, 3).push_rows(torch.tensor([0]), source, torch.tensor([0, 1]))


def test_memory_samples_only_the_filled_part_uniformly():
    bank = MemoryBank(num_classes=2, dim=2, capacity=5)
    bank.push(1, numbered([1, 2, 3]))
    draws = bank.sample(1, 600, torch.Generator().manual_seed(0))[:, 0]
    assert draws.shape == (600,)
    counts = torch.bincount(draws.long(), minlength=4)
    assert counts[0] == 0 and (counts[1:] > 150).all()
    with pytest.raises(ValueError):
        bank.sample(0, 3)
    many = bank.sample_many(torch.tensor([1, 0]), 4, torch.Generator().manual_seed(1))
    assert many.shape == (2, 4, 2)
    assert (many[1] == 0).all() and set(many[0, :, 0].tolist()) <= {1.0, 2.0, 3.0}


def test_memory_state_round_trip_is_exact():
    g = torch.Generator().manual_seed(3)
    bank = MemoryBank(num_classes=3, dim=4, capacity=6)
    bank.push(torch.randint(0, 3, (20,), generator=g), torch.randn(20, 4, generator=g))
    restored = MemoryBank(num_classes=3, dim=4, capacity=6)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.feats, bank.feats)
    assert torch.equal(restored.ptr, bank.ptr) and torch.equal(restored.count, bank.count)
    extra = torch.randn(5, 4, generator=g)
    for b in (bank, restored):
        b.push(torch.tensor([0, 1, 2, 0, 1]), extra)
    a = bank.sample_many(torch.tensor([0, 1, 2]), 7, torch.Generator().manual_seed(9))
    b = restored.sample_many(torch.tensor([0, 1, 2]), 7, torch.Generator().manual_seed(9))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        MemoryBank(num_classes=3, dim=5, capacity=6).load_state_dict(bank.state_dict())


# ---------------------------------------------------------------- rank rules


def five_class_example():
    probs = torch.tensor(
        [
            [0.40, 0.30, 0.15, 0.10, 0.05],  # labeled y=1: ranks c0..c4 = 0,1,2,3,4
            [0.05, 0.10, 0.15, 0.30, 0.40],  # labeled y=4: ranks c4=0, c3=1, c2=2, c1=3, c0=4
            [0.40, 0.30, 0.15, 0.10, 0.05],  # labeled, ignored (255)
            [0.10, 0.40, 0.05, 0.30, 0.15],  # unlabeled unreliable: ranks c1=0, c3=1, c4=2, c0=3, c2=4
            [0.10, 0.40, 0.05, 0.30, 0.15],  # unlabeled reliable
            [0.20, 0.20, 0.20, 0.20, 0.20],  # unlabeled unreliable, all tied: rank = class index
        ]
    )
    labels = torch.tensor([1, 4, 255, 1, 1, 0])  # unlabeled rows hold their pseudo-labels
    is_labeled = torch.tensor([True, True, True, False, False, False])
    reliable = torch.tensor([False, False, False, False, True, False])
    return probs, labels, is_labeled, reliable


def test_ranks_by_hand():
    probs, *_ = five_class_example()
    ranks = class_ranks(probs)
    assert ranks[1].tolist() == [4, 3, 2, 1, 0]
    assert ranks[3].tolist() == [3, 0, 4, 1, 2]
    assert ranks[5].tolist() == [0, 1, 2, 3, 4]


def test_negatives_on_five_classes_by_hand():
    probs, labels, is_labeled, reliable = five_class_example()
    # r_h = 20 > C = 5 is clipped to 5: unlabeled unreliable pixels are negatives at ranks 3 and 4.
    got = negative_masks(probs, labels, is_labeled, reliable, r_l=3, r_h=20)
    expected_pixels = {0: [0, 3], 1: [], 2: [0, 1, 3], 3: [1, 5], 4: [5]}
    for c, pixels in expected_pixels.items():
        assert got[c].nonzero().flatten().tolist() == pixels, f"class {c}"
    # pixel 3's pseudo-label is 1, yet it is a negative of classes 0 and 2 (no "pseudo-label = c" rule)
    assert got[0, 3] and got[2, 3]
    narrow = negative_masks(probs, labels, is_labeled, reliable, r_l=3, r_h=4)
    assert narrow[:, 3].nonzero().flatten().tolist() == [0]
    assert narrow[:, 5].nonzero().flatten().tolist() == [3]


@pytest.mark.parametrize("num_classes", [2, 5, 19, 21])
def test_rank_below_equals_the_sort_for_every_r_with_ties_and_non_finite_values(num_classes):
    """rank_below(probs, r) is class_ranks(probs) < r exactly: distinct values, many ties (rounded to
    quarters: the tied pixels take the sort's path), NaN, -inf and inf; r from below 0 to above C."""
    g = torch.Generator().manual_seed(num_classes)
    distinct = torch.rand(60, num_classes, generator=g)
    tied = (torch.rand(60, num_classes, generator=g) * 4).round() / 4
    odd = distinct.clone()
    odd[3, 1], odd[5, :], odd[7, -1] = float("nan"), float("-inf"), float("inf")
    for probs in (distinct, tied, odd):
        ranks = class_ranks(probs)
        for r in range(-1, num_classes + 2):
            assert torch.equal(rank_below(probs, r), ranks < r), r


def test_rank_below_by_hand():
    probs, *_ = five_class_example()
    assert rank_below(probs, 2)[3].tolist() == [False, True, False, True, False]  # c1, c3 lead pixel 3
    assert rank_below(probs, 4)[3].tolist() == [True, True, False, True, True]  # all but the last, c2
    assert rank_below(probs, 2)[5].tolist() == [True, True, False, False, False]  # all tied: class order


@pytest.mark.parametrize("num_classes,r_l,r_h", [(5, 3, 20), (19, 3, 20), (7, 1, 4), (4, 2, 3)])
def test_negatives_match_loop_and_never_include_own_labeled_class(num_classes, r_l, r_h):
    g = torch.Generator().manual_seed(num_classes)
    num_pixels = 40
    probs = torch.softmax(torch.randn(num_pixels, num_classes, generator=g) * 2, dim=1)
    labels = torch.randint(0, num_classes, (num_pixels,), generator=g)
    labels[::7] = 255
    is_labeled = torch.rand(num_pixels, generator=g) < 0.5
    reliable = torch.rand(num_pixels, generator=g) < 0.5
    got = negative_masks(probs, labels, is_labeled, reliable, r_l=r_l, r_h=r_h)
    assert torch.equal(got, loop_negatives(probs, labels, is_labeled, reliable, r_l, r_h))
    own_class = torch.zeros_like(got)
    rows = labels[is_labeled & (labels != 255)]
    own_class[rows, (is_labeled & (labels != 255)).nonzero().flatten()] = True
    assert not (got & own_class).any()
    assert got.any()


def test_anchors_by_hand():
    probs = torch.tensor(
        [
            [0.1, 0.4, 0.5],  # labeled y=2, p_2 = 0.5 > 0.3: anchor of 2
            [0.5, 0.3, 0.2],  # labeled y=2, p_2 = 0.2: no
            [0.2, 0.4, 0.4],  # unlabeled reliable, pseudo 1, p_1 = 0.4: anchor of 1
            [0.2, 0.4, 0.4],  # unlabeled unreliable, pseudo 1: no
            [0.9, 0.05, 0.05],  # labeled, ignored: no
            [0.2, 0.25, 0.55],  # unlabeled reliable, pseudo 1, p_1 = 0.25: no
        ]
    )
    labels = torch.tensor([2, 2, 0, 0, 255, 0])
    pseudo = torch.tensor([0, 0, 1, 1, 0, 1])
    is_labeled = torch.tensor([True, True, False, False, True, False])
    reliable = torch.tensor([False, False, True, False, False, True])
    got = anchor_masks(probs, labels, is_labeled, reliable, pseudo, threshold=0.3)
    assert got.shape == (3, 6)
    assert got.nonzero().tolist() == [[1, 2], [2, 0]]


# ---------------------------------------------------------------- prototypes


def test_prototype_momentum_update_by_hand():
    bank = PrototypeBank(num_classes=3, dim=2, momentum=0.9)
    bank.update(torch.tensor([[1.0, 0.0], [3.0, 0.0], [9.0, 9.0]]), torch.tensor([0, 0, 255]))
    # first sight initialises with the batch mean (not 0.1 * mean)
    assert bank.prototypes[0].tolist() == [2.0, 0.0]
    assert bank.seen.tolist() == [True, False, False]
    assert bank.prototypes[1].tolist() == [0.0, 0.0]
    bank.update(torch.tensor([[0.0, 4.0], [1.0, 1.0]]), torch.tensor([0, 1]))
    assert torch.allclose(bank.prototypes[0], torch.tensor([0.9 * 2.0, 0.1 * 4.0]))
    assert bank.prototypes[1].tolist() == [1.0, 1.0]
    assert bank.seen.tolist() == [True, True, False]

    restored = PrototypeBank(num_classes=3, dim=2, momentum=0.9)
    restored.load_state_dict(bank.state_dict())
    assert torch.equal(restored.prototypes, bank.prototypes) and torch.equal(restored.seen, bank.seen)


def test_zero_momentum_is_the_batch_mean():
    bank = PrototypeBank(num_classes=2, dim=1, momentum=0.0)
    bank.update(torch.tensor([[5.0]]), torch.tensor([1]))
    bank.update(torch.tensor([[1.0], [2.0]]), torch.tensor([1, 1]))
    assert bank.prototypes[1].tolist() == [1.5]
    means, present = batch_prototypes(torch.tensor([[1.0], [2.0]]), torch.tensor([1, 1]), 2)
    assert means[1].tolist() == [1.5] and present.tolist() == [False, True]


# ---------------------------------------------------------------- denoising


def test_denoising_by_hand():
    bank = PrototypeBank(num_classes=2, dim=2, momentum=0.0)
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 5.0]]), torch.tensor([0, 1]))
    probs = torch.tensor([[0.55, 0.45], [0.55, 0.45]])
    feats = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # near prototype 1, near prototype 0
    # pixel 0: w = softmax(-(sqrt 2, 0)) = (0.1956, 0.8044); w * p = (0.108, 0.362) -> class 1
    assert denoise_pseudo_labels(probs, feats, bank).tolist() == [1, 0]
    spatial = denoise_pseudo_labels(probs.T.reshape(1, 2, 1, 2), feats.T.reshape(1, 2, 1, 2), bank)
    assert spatial.tolist() == [[[1, 0]]]


def test_denoising_matches_loop():
    g = torch.Generator().manual_seed(4)
    probs = torch.softmax(torch.randn(30, 4, generator=g), dim=1)
    feats = torch.randn(30, 6, generator=g)
    centers = torch.randn(4, 6, generator=g)
    got = denoise_pseudo_labels(probs, feats, centers)
    for p in range(30):
        z = F.normalize(feats[p], dim=0)
        distances = [float(torch.dist(z, F.normalize(centers[c], dim=0))) for c in range(4)]
        w = torch.softmax(-torch.tensor(distances), dim=0)
        assert int(got[p]) == int(torch.argmax(w * probs[p]))


# ---------------------------------------------------------------- u2pl_contrastive


def test_anchor_sampling_without_replacement_when_enough():
    g = torch.Generator().manual_seed(5)
    candidates = torch.zeros(3, 50, dtype=torch.bool)
    candidates[0, ::2] = True  # 25 candidates >= 10: unique draws
    candidates[1, [3, 7]] = True  # 2 candidates < 10: with replacement
    candidates[2, :10] = True  # exactly 10: a permutation of them
    idx = sample_anchor_indices(candidates, 10, g)
    assert idx.shape == (3, 10)
    assert len(set(idx[0].tolist())) == 10 and all(i % 2 == 0 for i in idx[0].tolist())
    assert set(idx[1].tolist()) == {3, 7}
    assert sorted(idx[2].tolist()) == list(range(10))


def two_class_batch():
    """Labeled pixels only: 4 of class 0, 4 of class 1, constant features per class."""
    s0, s1 = torch.tensor([1.0, 0.2, 0.0]), torch.tensor([0.1, 1.0, 0.3])
    t0, t1 = torch.tensor([0.9, 0.0, 0.1]), torch.tensor([0.0, 0.8, 0.6])
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    student = torch.stack([s0] * 4 + [s1] * 4).requires_grad_(True)
    teacher = torch.stack([t0] * 4 + [t1] * 4)
    probs = torch.tensor([[0.8, 0.2]] * 4 + [[0.3, 0.7]] * 4)
    flags = dict(is_labeled=torch.ones(8, dtype=torch.bool), reliable=torch.zeros(8, dtype=torch.bool))
    return (s0, s1, t0, t1), student, teacher, probs, labels, flags


def test_u2pl_uses_each_class_own_queue_and_prototype():
    (s0, s1, t0, t1), student, teacher, probs, labels, flags = two_class_batch()
    memory, protos = MemoryBank(2, 3, capacity=100), PrototypeBank(2, 3)
    loss, stats = u2pl_contrastive(
        student,
        teacher,
        probs,
        labels,
        memory=memory,
        prototypes=protos,
        num_anchors=4,
        num_negatives=3,
        generator=torch.Generator().manual_seed(0),
        **flags,
    )
    # class 0's negatives are the class-1 pixels (rank of 0 there is 1 < r_l) and vice versa
    assert memory.size(0) == 4 and memory.size(1) == 4
    assert torch.allclose(memory.get(0), F.normalize(t1, dim=0).expand(4, 3))
    n = 3
    expected = (
        loop_contrastive(s0[None], t0, t1.expand(1, n, 3), 0.5)
        + loop_contrastive(s1[None], t1, t0.expand(1, n, 3), 0.5)
    ) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["classes"] == 2 and stats["negatives_pushed"] == 8
    # pairing class 0's anchors with class 1's queue (the authors' defect) would give another value
    swapped = (
        loop_contrastive(s0[None], t0, t0.expand(1, n, 3), 0.5)
        + loop_contrastive(s1[None], t1, t1.expand(1, n, 3), 0.5)
    ) / 2
    assert expected != pytest.approx(swapped, rel=1e-3)


def test_u2pl_gradients_reach_anchors_only():
    _, student, teacher, probs, labels, flags = two_class_batch()
    teacher.requires_grad_(True)
    probs.requires_grad_(True)
    loss, _ = u2pl_contrastive(
        student,
        teacher,
        probs,
        labels,
        memory=MemoryBank(2, 3, capacity=10),
        prototypes=PrototypeBank(2, 3),
        num_anchors=4,
        num_negatives=2,
        **flags,
    )
    loss.backward()
    assert student.grad.abs().sum() > 0
    assert teacher.grad is None and probs.grad is None


def test_u2pl_skips_classes_without_queue_or_anchors():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(3, 4, generator=g)
    t = torch.randn(3, 4, generator=g)
    v = torch.randn(3, 4, generator=g)
    memory = MemoryBank(3, 4, capacity=10)
    memory.push(0, F.normalize(v[0:1], dim=1))
    memory.push(1, F.normalize(v[1:2], dim=1))  # class 1 has a queue but no anchors in the batch
    # labeled pixels of classes 0 and 2; r_l = 0 pushes no new negatives; class 2's queue stays empty
    student = torch.stack([s[0], s[0], s[2]]).requires_grad_(True)
    teacher = torch.stack([t[0], t[0], t[2]])
    probs = torch.tensor([[0.9, 0.05, 0.05], [0.9, 0.05, 0.05], [0.1, 0.1, 0.8]])
    labels = torch.tensor([0, 0, 2])
    loss, stats = u2pl_contrastive(
        student,
        teacher,
        probs,
        labels,
        torch.ones(3, dtype=torch.bool),
        torch.zeros(3, dtype=torch.bool),
        memory,
        PrototypeBank(3, 4),
        num_anchors=5,
        num_negatives=4,
        r_l=0,
    )
    assert stats["classes"] == 1 and stats["negatives_pushed"] == 0
    assert loss.item() == pytest.approx(loop_contrastive(s[0:1], t[0], v[0].expand(1, 4, 4), 0.5), rel=1e-5)


def test_u2pl_with_nothing_valid_is_a_zero_with_gradient():
    student = torch.randn(4, 3, requires_grad=True)
    probs = torch.full((4, 2), 0.5)
    loss, stats = u2pl_contrastive(
        student,
        torch.randn(4, 3),
        probs,
        torch.full((4,), 255),
        torch.ones(4, dtype=torch.bool),
        torch.zeros(4, dtype=torch.bool),
        MemoryBank(2, 3, capacity=5),
        PrototypeBank(2, 3),
    )
    loss.backward()
    assert loss.item() == 0.0 and stats["classes"] == 0
    assert torch.equal(student.grad, torch.zeros_like(student))


def random_batch(seed, num_pixels=300, num_classes=19, dim=16):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(num_pixels, num_classes, generator=g) * 3, dim=1)
    is_labeled = torch.arange(num_pixels) < num_pixels // 2
    labels = torch.where(is_labeled, torch.randint(0, num_classes, (num_pixels,), generator=g), probs.argmax(1))
    labels[::11] = torch.where(is_labeled[::11], 255, labels[::11])
    entropy = -(probs * probs.log()).sum(1)
    reliable = entropy < entropy.quantile(0.8)
    student = torch.randn(num_pixels, dim, generator=g, requires_grad=True)
    teacher = torch.randn(num_pixels, dim, generator=g)
    return student, teacher, probs, labels, is_labeled, reliable


def test_u2pl_pushes_exactly_the_rank_rule_negatives_in_pixel_order():
    student, teacher, probs, labels, is_labeled, reliable = random_batch(seed=2)
    memory = MemoryBank(19, 16, capacity=1000)
    u2pl_contrastive(student, teacher, probs, labels, is_labeled, reliable, memory, PrototypeBank(19, 16))
    expected = loop_negatives(probs, labels, is_labeled, reliable, 3, 20)
    for c in range(19):
        pixels = expected[c].nonzero().flatten()
        assert torch.allclose(memory.get(c), F.normalize(teacher[pixels], dim=1), atol=1e-6)


def test_u2pl_is_reproducible_with_a_seeded_generator():
    results = []
    for _ in range(2):
        student, teacher, probs, labels, is_labeled, reliable = random_batch(seed=3)
        loss, stats = u2pl_contrastive(
            student,
            teacher,
            probs,
            labels,
            is_labeled,
            reliable,
            MemoryBank(19, 16, capacity=200),
            PrototypeBank(19, 16),
            num_anchors=8,
            num_negatives=5,
            generator=torch.Generator().manual_seed(7),
        )
        results.append(loss.item())
        assert math.isfinite(results[-1]) and stats["classes"] > 5
    assert results[0] == results[1]


def test_denoising_treats_a_class_without_prototype_as_orthogonal():
    bank = PrototypeBank(num_classes=3, dim=2, momentum=0.0)
    bank.update(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1]))  # class 2 never seen
    probs = torch.tensor([[0.3, 0.4, 0.3]])
    feats = torch.tensor([[-1.0, 0.0]])  # distances: 2 to class 0, sqrt 2 to class 1
    # class 2 gets the same weight as the orthogonal class 1, so p decides between them: class 1
    assert denoise_pseudo_labels(probs, feats, bank).tolist() == [1]


def test_u2pl_fast_similarities_match_the_materialised_keys_path():
    """The float32 bank computes similarities per class without gathering (K, M, N, D) keys; the float16
    bank still gathers them. On the same (fp16-exact) features both must give the same loss and gradient."""
    g = torch.Generator().manual_seed(3)
    p, c, d = 60, 5, 8
    student = torch.randn(p, d, generator=g).half().float()
    teacher = torch.randn(p, d, generator=g).half().float()
    probs = torch.softmax(3 * torch.randn(p, c, generator=g), 1)
    labels = probs.argmax(1)
    is_labeled = torch.arange(p) < 30
    reliable = ~is_labeled & (torch.rand(p, generator=g) < 0.5)
    results = []
    for dtype in (torch.float32, torch.float16):
        s = student.clone().requires_grad_(True)
        loss, _ = u2pl_contrastive(
            s,
            teacher,
            probs,
            labels,
            is_labeled,
            reliable,
            memory=MemoryBank(c, d, capacity=50, dtype=dtype),
            prototypes=PrototypeBank(c, d),
            num_anchors=7,
            num_negatives=5,
            generator=torch.Generator().manual_seed(11),
            r_l=2,
            r_h=4,
        )
        loss.backward()
        results.append((loss.detach(), s.grad.clone()))
    assert results[0][0] > 0
    assert torch.allclose(results[0][0], results[1][0], rtol=2e-3)
    assert torch.allclose(results[0][1], results[1][1], rtol=2e-2, atol=1e-4)


def test_subsample_per_class_keeps_a_uniform_subset_of_overfull_classes():
    ids = torch.tensor([0] * 40 + [1] * 5 + [2] * 12)
    assert subsample_per_class(ids, 40, 3) is None  # nothing over capacity: keep all
    hits = torch.zeros(ids.numel())
    for seed in range(400):
        keep = subsample_per_class(ids, 10, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(keep, keep.sort().values)  # row order kept
        assert torch.bincount(ids[keep], minlength=3).tolist() == [10, 5, 10]
        hits[keep] += 1
    # every row of an overfull class is kept with probability capacity / count, not just the last ones
    assert torch.allclose(hits[:40] / 400, torch.full((40,), 10 / 40), atol=0.09)
    assert torch.allclose(hits[45:] / 400, torch.full((12,), 10 / 12), atol=0.09)
    assert (hits[40:45] == 400).all()


def test_u2pl_queue_keeps_labeled_negatives_when_a_batch_overflows_it():
    """More negatives of a class than the queue holds: a FIFO would keep only the last pixels pushed
    (the unlabeled ones, after the labeled); the pushed subset is uniform, so labeled ones survive."""
    student, teacher, probs, labels, is_labeled, reliable = random_batch(seed=2)
    expected = loop_negatives(probs, labels, is_labeled, reliable, 3, 20)
    c = int(expected.sum(1).argmax())
    pixels = expected[c].nonzero().flatten()
    capacity = pixels.numel() // 2
    labeled_feats = F.normalize(teacher[pixels[is_labeled[pixels]]], dim=1)
    assert labeled_feats.shape[0] > 0 and capacity < pixels.numel()
    memory = MemoryBank(19, 16, capacity=capacity)
    gen = torch.Generator().manual_seed(0)
    u2pl_contrastive(
        student, teacher, probs, labels, is_labeled, reliable, memory, PrototypeBank(19, 16), generator=gen
    )
    queue = memory.get(c)
    assert queue.shape[0] == capacity
    all_feats = F.normalize(teacher[pixels], dim=1)
    # each queued row is one of the class's negatives, each at most once
    match = (queue[:, None, :] - all_feats[None]).abs().amax(-1) < 1e-6
    assert (match.sum(1) == 1).all() and (match.sum(0) <= 1).all()
    assert ((queue[:, None, :] - labeled_feats[None]).abs().amax(-1) < 1e-6).any()


def test_u2pl_under_ddp_needs_the_shared_generator():
    memory, prototypes = MemoryBank(19, 16), PrototypeBank(19, 16)
    with pytest.raises(ValueError, match="shared_generator"):
        u2pl_contrastive(*random_batch(seed=2), memory, prototypes, gather=lambda t: t)


@pytest.mark.parametrize("block_bytes", [1, 3 * 7 * 4 * 4, 1 << 22])  # one anchor, a few, all in one block
def test_one_gather_loss_and_gradient_equal_autograd_on_the_materialised_keys(monkeypatch, block_bytes):
    """The fused loss gathers each key once and forms the anchors' gradient (through their normalisation)
    in the forward; it must give autograd's loss and gradient of F.normalize and the InfoNCE on the
    explicitly gathered (K, M, N, D) keys, also for a zero anchor and one below F.normalize's eps."""
    from labelpipe.losses import contrastive

    monkeypatch.setattr(contrastive, "KEY_BLOCK_BYTES", block_bytes)
    g = torch.Generator().manual_seed(5)
    k, m, n, d = 3, 7, 4, 6
    table = F.normalize(torch.randn(40, d, generator=g), dim=1)
    index = torch.randint(0, 40, (k, m, n), generator=g)
    positive = F.normalize(torch.randn(k, 1, d, generator=g), dim=-1)
    raw = torch.randn(k, m, d, generator=g) * torch.rand(k, m, 1, generator=g) * 3
    raw[0, 1], raw[2, 3] = 0.0, 1e-14  # |x| = 0 and 0 < |x| < eps: F.normalize divides by eps
    raw.requires_grad_(True)
    loss = contrastive._GatheredInfoNCE.apply(raw, positive, table, index, 0.5)
    (grad,) = torch.autograd.grad(loss * 3.0, raw)

    raw_ref = raw.detach().clone().requires_grad_(True)
    anchors = F.normalize(raw_ref, dim=-1)
    keys = table[index]  # (K, M, N, D)
    logits = torch.cat([(anchors * positive).sum(-1, keepdim=True), (keys @ anchors.unsqueeze(-1)).squeeze(-1)], -1)
    expected = (torch.logsumexp(logits / 0.5, -1) - logits[..., 0] / 0.5).mean()
    (expected * 3.0).backward()
    assert torch.allclose(loss, expected, rtol=1e-6, atol=1e-6)
    assert torch.allclose(grad, raw_ref.grad, rtol=1e-5, atol=1e-7)
    assert grad[2, 3].abs().max() > 1e3  # the eps branch: g / eps, no radial part removed


def test_memory_bank_buffer_is_zeroed_and_huge_page_aligned_on_linux_cpu():
    """The queues' buffer is zeros of the bank's shape; on Linux CPUs a buffer of >= 2 MB starts on a
    2 MB boundary (so madvise(MADV_HUGEPAGE) can back it with huge pages), and push/get still work."""
    import sys

    from labelpipe.losses import contrastive

    bank = contrastive.MemoryBank(num_classes=3, dim=64, capacity=4096)  # 3 MB of float32
    assert bank.feats.shape == (3, 4096, 64) and bank.feats.dtype == torch.float32
    assert bool((bank.feats == 0).all())
    if sys.platform.startswith("linux"):
        assert bank.feats.data_ptr() % contrastive.HUGE_PAGE_BYTES == 0
    rows = F.normalize(torch.randn(5, 64), dim=1)
    bank.push(1, rows)
    assert torch.equal(bank.get(1), rows)
    small = contrastive.zeros_on_huge_pages((2, 3), torch.float16, torch.device("cpu"))
    assert small.shape == (2, 3) and small.dtype == torch.float16 and not small.any()


def test_a_push_between_forward_and_backward_raises_instead_of_a_wrong_gradient():
    """The fused loss keeps the bank's buffer for backward: a push in between (gathered straight into
    the ring by push_rows) must trip autograd's in-place check."""
    from labelpipe.losses import contrastive

    bank = MemoryBank(num_classes=2, dim=4, capacity=8)
    for c in range(2):
        bank.push(c, F.normalize(torch.randn(8, 4), dim=1))
    raw = torch.randn(2, 3, 4, requires_grad=True)
    index = bank.sample_rows(torch.tensor([0, 1]), 6).view(2, 3, 2)
    positive = F.normalize(torch.randn(2, 1, 4), dim=-1)
    loss = contrastive._GatheredInfoNCE.apply(raw, positive, bank.table, index, 0.5)
    bank.push_rows(torch.tensor([0]), torch.randn(5, 4), torch.tensor([1]))
    with pytest.raises(RuntimeError, match="inplace"):
        loss.backward()
