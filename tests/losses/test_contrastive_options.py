"""The authors' forms of the U2PL contrastive loss, as options (issue 14 item 4), against plain-loop references.

- ``anchor_source="low_entropy"``: unlabeled anchors from the lowest alpha_t entropy percentile of the batch
  (``low_entropy_mask`` in U2PL's ``train_semi.py``) instead of the reliable pixels;
- ``average="all_valid"``: the per-class losses summed and divided by the number of valid classes (any
  anchor-pool pixel), classes skipped for lack of anchors or keys included.
"""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from labelpipe.config import SelftrainConfig
from labelpipe.losses import contrastive
from labelpipe.losses.contrastive import (
    MemoryBank,
    PrototypeBank,
    low_entropy_mask,
    negative_masks,
    percentile_linear,
    u2pl_contrastive,
)

# ---------------------------------------------------------------- plain-loop references


def loop_entropy(row):
    return -sum(float(p) * math.log(float(p) + 1e-10) for p in row)


def loop_low_entropy(probs, is_labeled, valid, alpha):
    """The authors' rule pixel by pixel: unlabeled valid pixels with H <= np.percentile(H_pool, 100 alpha)."""
    pool = [p for p in range(probs.shape[0]) if not is_labeled[p] and valid[p]]
    if not pool:
        return [False] * probs.shape[0]
    threshold = np.percentile([loop_entropy(probs[p]) for p in pool], 100 * alpha)
    return [p in pool and loop_entropy(probs[p]) <= threshold + 1e-6 for p in range(probs.shape[0])]


def loop_infonce(anchor, positive, negatives, tau):
    """Eq. 10 for one anchor: -log(e^{<a,z+>/tau} / (e^{<a,z+>/tau} + sum_j e^{<a,z-_j>/tau})), cosines."""
    a = anchor.detach().double()
    numerator = math.exp(float(F.cosine_similarity(a, positive.double(), dim=0)) / tau)
    denominator = numerator + sum(math.exp(float(F.cosine_similarity(a, n.double(), dim=0)) / tau) for n in negatives)
    return -math.log(numerator / denominator)


def loop_pool_classes(probs, labels, is_labeled, pool, threshold):
    """Per class, the anchor pixels: labeled y = c, or unlabeled in the pool with label c; p_c > threshold."""
    out = {}
    for c in range(probs.shape[1]):
        out[c] = [
            p
            for p in range(probs.shape[0])
            if int(labels[p]) == c and (is_labeled[p] or pool[p]) and float(probs[p, c]) > threshold
        ]
    return out


# ---------------------------------------------------------------- the low-entropy pool


@pytest.mark.parametrize("alpha", [0.0, 0.2, 0.25, 0.5, 1.0])
def test_low_entropy_mask_matches_the_loop(alpha):
    g = torch.Generator().manual_seed(3)
    probs = torch.softmax(torch.randn(40, 5, generator=g) * 2, dim=1)
    is_labeled = torch.arange(40) < 12
    valid = torch.rand(40, generator=g) > 0.2
    got = low_entropy_mask(probs, is_labeled, alpha, valid)
    assert got.tolist() == loop_low_entropy(probs, is_labeled, valid, alpha)
    assert not got[is_labeled].any() and not got[~valid].any()


def test_percentile_is_numpy_linear():
    values = torch.tensor([3.0, 1.0, 4.0, 1.5, 9.0, 2.6])
    for q in (0.0, 0.1, 0.33, 0.5, 0.9, 1.0):
        assert float(percentile_linear(values, q)) == pytest.approx(np.percentile(values.numpy(), 100 * q))


def test_low_entropy_mask_without_unlabeled_pixels_is_empty():
    probs = torch.full((3, 2), 0.5)
    assert not low_entropy_mask(probs, torch.ones(3, dtype=torch.bool), 0.2).any()


# ---------------------------------------------------------------- the loss with each anchor pool


def unlabeled_batch():
    """8 unlabeled pixels, 2 classes. The two lowest-entropy pixels (0: class 0, 1: class 1) are the
    low-entropy pool at alpha = 0.25 (np.percentile position 1.75 of 8); the reliable pixels are 2 and 3
    (class 0 only; 3 fails p_0 > 0.3). One negative key per class in the queues (2 classes: the unlabeled
    rank rule [3, 2) pushes none), prototypes set by hand."""
    probs = torch.tensor(
        [
            [0.99, 0.01],  # H lowest, label 0
            [0.02, 0.98],  # H second lowest, label 1
            [0.80, 0.20],  # reliable, label 0
            [0.25, 0.75],  # reliable, label 0 (stored pseudo-label), p_0 = 0.25: no anchor
            [0.60, 0.40],
            [0.55, 0.45],
            [0.30, 0.70],
            [0.50, 0.50],
        ]
    )
    labels = torch.tensor([0, 1, 0, 0, 0, 0, 1, 0])
    reliable = torch.tensor([False, False, True, True, False, False, False, False])
    g = torch.Generator().manual_seed(0)
    student = torch.randn(8, 3, generator=g).requires_grad_(True)
    teacher = torch.randn(8, 3, generator=g)
    keys = torch.randn(2, 3, generator=g)
    centers = torch.randn(2, 3, generator=g)
    return probs, labels, reliable, student, teacher, keys, centers


def run_unlabeled(anchor_source, average="qualified", alpha=0.25):
    probs, labels, reliable, student, teacher, keys, centers = unlabeled_batch()
    memory = MemoryBank(2, 3, capacity=4)
    memory.push(torch.tensor([0, 1]), F.normalize(keys, dim=1))
    protos = PrototypeBank(2, 3)
    protos.update(centers, torch.tensor([0, 1]))
    loss, stats = u2pl_contrastive(
        student,
        teacher,
        probs,
        labels,
        torch.zeros(8, dtype=torch.bool),
        reliable,
        memory,
        protos,
        num_anchors=5,
        num_negatives=3,
        generator=torch.Generator().manual_seed(1),
        update_prototypes=False,
        anchor_source=anchor_source,
        low_entropy_alpha=alpha,
        average=average,
    )
    return loss, stats, (probs, labels, reliable, student, teacher, keys, centers)


def test_reliable_anchors_by_the_loop():
    loss, stats, (probs, labels, reliable, student, _, keys, centers) = run_unlabeled("reliable")
    anchors = loop_pool_classes(probs, labels, torch.zeros(8, dtype=torch.bool), reliable, 0.3)
    assert anchors == {0: [2], 1: []}
    expected = loop_infonce(student[2], centers[0], [keys[0]] * 3, 0.5)
    assert stats["classes"] == 1 and stats["anchor_candidates"] == 1
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_low_entropy_anchors_by_the_loop():
    loss, stats, (probs, labels, _, student, _, keys, centers) = run_unlabeled("low_entropy")
    is_labeled = torch.zeros(8, dtype=torch.bool)
    pool = loop_low_entropy(probs, is_labeled, torch.ones(8, dtype=torch.bool), 0.25)
    assert [p for p in range(8) if pool[p]] == [0, 1]
    anchors = loop_pool_classes(probs, labels, is_labeled, pool, 0.3)
    assert anchors == {0: [0], 1: [1]}
    # one candidate per class: all M anchors are that pixel; one key per queue: all N negatives are it
    expected = np.mean([loop_infonce(student[anchors[c][0]], centers[c], [keys[c]] * 3, 0.5) for c in (0, 1)])
    assert stats["classes"] == 2 and stats["anchor_candidates"] == 2
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    touched = student.grad.abs().sum(1) > 0
    assert touched.tolist() == [True, True] + [False] * 6  # gradient only through the low-entropy anchors


def test_low_entropy_needs_its_alpha():
    with pytest.raises(ValueError, match="low_entropy_alpha"):
        run_unlabeled("low_entropy", alpha=None)


# ---------------------------------------------------------------- averaging over all valid classes


def mixed_batch():
    """4 classes; labeled pixels only (the pool is the same for either anchor source).

    class 0: anchors, queue, prototype: in the loss;  class 1: anchors, empty queue: valid, skipped;
    class 2: its only pixel has p_2 = 0.2 < 0.3: valid, skipped;  class 3: no pixel: not valid.
    r_l = 0: no new negatives, so the queues are exactly what is pushed here.
    """
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.7, 0.1, 0.1], [0.5, 0.2, 0.2, 0.1], [0.7, 0.1, 0.1, 0.1]])
    labels = torch.tensor([0, 1, 2, 255])
    g = torch.Generator().manual_seed(5)
    student = torch.randn(4, 3, generator=g).requires_grad_(True)
    teacher = torch.randn(4, 3, generator=g)
    key0 = torch.randn(1, 3, generator=g)
    centers = torch.randn(4, 3, generator=g)
    return probs, labels, student, teacher, key0, centers


def run_mixed(average):
    probs, labels, student, teacher, key0, centers = mixed_batch()
    memory = MemoryBank(4, 3, capacity=4)
    memory.push(0, F.normalize(key0, dim=1))
    protos = PrototypeBank(4, 3)
    protos.update(centers, torch.arange(4))
    loss, stats = u2pl_contrastive(
        student,
        teacher,
        probs,
        labels,
        torch.ones(4, dtype=torch.bool),
        torch.zeros(4, dtype=torch.bool),
        memory,
        protos,
        num_anchors=3,
        num_negatives=2,
        r_l=0,
        update_prototypes=False,
        average=average,
    )
    return loss, stats, (probs, labels, student, key0, centers)


def loop_valid_classes(probs, labels, is_labeled, pool):
    """The authors' valid classes: any anchor-pool pixel of the class, before the p_c threshold."""
    return [c for c, pixels in loop_pool_classes(probs, labels, is_labeled, pool, -1.0).items() if pixels]


def test_all_valid_averaging_by_the_loop():
    qualified, q_stats, _ = run_mixed("qualified")
    loss, stats, (probs, labels, student, key0, centers) = run_mixed("all_valid")
    flags = torch.ones(4, dtype=torch.bool)
    valid = loop_valid_classes(probs, labels, flags, ~flags)
    assert valid == [0, 1, 2]
    per_class = {0: loop_infonce(student[0], centers[0], [key0[0]] * 2, 0.5)}  # classes 1, 2 are skipped
    assert stats["classes"] == q_stats["classes"] == 1 and stats["valid_classes"] == 3
    assert qualified.item() == pytest.approx(per_class[0], rel=1e-5)
    assert loss.item() == pytest.approx(sum(per_class.values()) / len(valid), rel=1e-5)


@pytest.mark.parametrize("with_valid", [False, True])
def test_valid_classes_by_the_loop_on_a_random_batch(with_valid):
    """The number of valid classes (counted from a histogram of the pixels' own classes) is the loop's:
    ignored labels, labels outside [0, C), unlabeled pixels outside the pool and invalid pixels count
    for none."""
    g = torch.Generator().manual_seed(7)
    num_pixels, num_classes = 60, 9
    probs = torch.softmax(torch.randn(num_pixels, num_classes, generator=g), dim=1)
    labels = torch.randint(0, 5, (num_pixels,), generator=g)  # classes 5.. never appear
    labels[::7], labels[3] = 255, 11
    is_labeled = torch.rand(num_pixels, generator=g) < 0.3
    pool = torch.rand(num_pixels, generator=g) < 0.3
    valid = torch.rand(num_pixels, generator=g) < 0.5 if with_valid else None
    _, count = contrastive._anchor_candidates(probs, labels, is_labeled, pool, 0.3, valid, "reliable", None)
    keep = valid if with_valid else torch.ones(num_pixels, dtype=torch.bool)
    expected = loop_valid_classes(probs, labels, is_labeled & keep, pool & keep)
    assert count == len(expected) and 0 < count <= 5
    masks = contrastive.anchor_masks(probs, labels, is_labeled, pool, labels, -1.0, valid)  # the definition
    assert count == int(masks.any(dim=1).sum())


def test_all_valid_equals_qualified_when_every_valid_class_qualifies():
    a, _, _ = run_unlabeled("low_entropy", "qualified")
    b, stats, _ = run_unlabeled("low_entropy", "all_valid")
    assert stats["valid_classes"] == stats["classes"] == 2
    assert a.item() == pytest.approx(b.item(), rel=1e-6)


# ---------------------------------------------------------------- settings and wiring


def test_defaults_are_the_paper_and_stay_out_of_the_fingerprint():
    st = SelftrainConfig()
    assert st.contrastive_anchor_source == "reliable" and st.contrastive_average == "qualified"
    fields = st.fingerprint_fields()
    assert "contrastive_anchor_source" not in fields and "contrastive_average" not in fields
    changed = SelftrainConfig(contrastive_anchor_source="low_entropy", contrastive_average="all_valid")
    assert changed.fingerprint_fields()["contrastive_anchor_source"] == "low_entropy"
    assert changed.fingerprint_fields()["contrastive_average"] == "all_valid"


def test_the_contrastive_term_passes_the_options_and_the_scheduled_alpha(monkeypatch):
    import labelpipe.training.terms as terms

    seen = {}

    def fake(**kwargs):
        seen.update(kwargs)
        return torch.zeros(()), {"classes": 0}

    monkeypatch.setattr(terms, "u2pl_contrastive", fake)
    st = SelftrainConfig(contrastive=True, contrastive_anchor_source="low_entropy", contrastive_average="all_valid")
    setup = terms.TermSetup(st=st, num_classes=3, ignore_index=255, rep_dim=4, crop_size=8, device=torch.device("cpu"))
    setup.prototypes = PrototypeBank(3, 4)
    term = terms.LOSS_TERMS["contrastive"](setup)
    out = SimpleNamespace(rep=torch.randn(1, 4, 2, 2), main=torch.randn(1, 3, 2, 2))
    t = terms.StepTensors(
        main_l=None,
        aux_l=None,
        main_u=None,
        aux_u=None,
        y_l=torch.zeros(1, 2, 2, dtype=torch.long),
        y_u=torch.zeros(1, 2, 2, dtype=torch.long),
        w_u=None,
        inside_u=None,
        rep=torch.randn(2, 4, 2, 2),
        t_l=out,
        t_u=out,
        generator=torch.Generator(),
        shared=None,
        step=3,
        alpha_t=0.15,
    )
    term(t)
    assert seen["anchor_source"] == "low_entropy" and seen["average"] == "all_valid"
    assert seen["low_entropy_alpha"] == 0.15
    assert seen["negative_source"] == "unreliable"  # the default reaches the loss too


# ---------------------------------------------------------------- negatives: unreliable (U2PL) vs reliable


def test_negative_source_swaps_the_unlabeled_pool_and_keeps_the_labeled_negatives():
    """Hand-checked masks on 4 pixels, 3 classes: pixel 0 labeled (y=0), pixels 1-3 unlabeled, pixel 1
    reliable. Ranks of every pixel: class 0 first, then 1, then 2 (probs descending). With r_l = 1, r_h = 3:
    the labeled pixel is a negative of no class (rank < 1 is its own class); an unlabeled pool pixel is a
    negative of classes 1 and 2 (ranks 1, 2)."""
    probs = torch.tensor([[0.6, 0.3, 0.1]] * 4)
    labels = torch.tensor([0, 0, 0, 0])
    is_labeled = torch.tensor([True, False, False, False])
    reliable = torch.tensor([False, True, False, False])
    unreliable = negative_masks(probs, labels, is_labeled, reliable, r_l=1, r_h=3)
    only_reliable = negative_masks(probs, labels, is_labeled, reliable, r_l=1, r_h=3, negative_source="reliable")
    expected_unreliable = torch.tensor([[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)
    expected_reliable = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(unreliable, expected_unreliable)
    assert torch.equal(only_reliable, expected_reliable)
    # Labeled negatives are the same under both (r_l = 2: the labeled pixel is a negative of class 1).
    a = negative_masks(probs, labels, is_labeled, reliable, r_l=2, r_h=3)
    b = negative_masks(probs, labels, is_labeled, reliable, r_l=2, r_h=3, negative_source="reliable")
    assert bool(a[1, 0]) and bool(b[1, 0]) and torch.equal(a[:, 0], b[:, 0])
    with pytest.raises(ValueError, match="negative_source"):
        negative_masks(probs, labels, is_labeled, reliable, negative_source="all")


def test_negative_source_changes_what_the_queues_receive_and_is_fingerprinted():
    g = torch.Generator().manual_seed(3)
    num_pixels, num_classes, dim = 64, 4, 8
    probs = torch.softmax(torch.randn(num_pixels, num_classes, generator=g) * 3, dim=1)
    is_labeled = torch.arange(num_pixels) < 16
    reliable = ~is_labeled & (torch.arange(num_pixels) % 2 == 0)
    labels = probs.argmax(1)
    pushed = {}
    for source in ("unreliable", "reliable"):
        memory, prototypes = MemoryBank(num_classes, dim, capacity=128), PrototypeBank(num_classes, dim)
        feats = torch.randn(num_pixels, dim, generator=torch.Generator().manual_seed(0))
        _, stats = u2pl_contrastive(
            feats.clone().requires_grad_(True), feats, probs, labels, is_labeled, reliable, memory, prototypes,
            num_anchors=4, num_negatives=3, r_l=1, r_h=4, generator=torch.Generator().manual_seed(1),
            negative_source=source,
        )  # fmt: skip
        pushed[source] = stats["negatives_pushed"]
    # r_l = 1, r_h = 4: every unlabeled pool pixel is a negative of the 3 classes it does not predict.
    assert pushed["unreliable"] == 3 * int((~is_labeled & ~reliable).sum())
    assert pushed["reliable"] == 3 * int(reliable.sum())
    assert "contrastive_negative_source" not in SelftrainConfig().fingerprint_fields()
    assert (
        SelftrainConfig(contrastive_negative_source="reliable").fingerprint_fields()["contrastive_negative_source"]
        == "reliable"
    )


def test_a_real_step_passes_the_scheduled_alpha_and_trains_with_both_options(monkeypatch):
    """SelftrainStep -> Contrastive term -> u2pl_contrastive: alpha_t on its schedule (0.2 (1 - 4/10) at step
    4 of 10) reaches the loss, which is finite and has a gradient with the authors' anchors and averaging."""
    import labelpipe.training.terms as terms
    from tests.training.test_terms import batch, make_step, tiny_config

    seen = {}
    real = terms.u2pl_contrastive

    def spy(**kwargs):
        seen.update(kwargs)
        loss, stats = real(**kwargs)
        seen["stats"] = stats
        return loss, stats

    monkeypatch.setattr(terms, "u2pl_contrastive", spy)
    config = tiny_config(
        contrastive=True,
        strong_aug=False,
        contrastive_anchor_threshold=0.0,
        contrastive_anchor_source="low_entropy",
        contrastive_average="all_valid",
    )
    step, model = make_step(config)
    model.eval()
    loss, logs = step(batch(), 4)
    assert seen["low_entropy_alpha"] == pytest.approx(0.2 * (1 - 4 / 10))
    assert seen["anchor_source"] == "low_entropy" and seen["average"] == "all_valid"
    assert seen["stats"]["valid_classes"] >= seen["stats"]["classes"] > 0 and logs["loss_contrastive"] > 0
    loss.backward()
    assert sum(float(p.grad.abs().sum()) for p in model.representation.parameters()) > 0
