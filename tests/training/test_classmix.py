"""DACS's cross-domain ClassMix (``selftrain.labeled_classmix_p``): half of a labeled (source) image's classes
pasted over an unlabeled image with their ground truth, checked by hand and through the self-training step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelpipe.training.selftrain_step import classmix_labeled

IGNORE = 255


def scene(b: int = 3, h: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Labeled images whose pixels hold 100 + their class, labels with three classes and an ignored border;
    unlabeled images whose pixels hold -(1 + image index), pseudo-labels 9."""
    y_l = torch.zeros(b, h, h, dtype=torch.long)
    y_l[:, 2:8, 2:8] = 3
    y_l[:, 9:14, 9:14] = 7
    y_l[:, :, -2:] = IGNORE  # crop padding
    x_l = (100 + y_l.float())[:, None].expand(b, 3, h, h).clone()
    x_u = -(1 + torch.arange(b, dtype=torch.float32)).view(b, 1, 1, 1).expand(b, 3, h, h).clone()
    y_u = torch.full((b, h, h), 9, dtype=torch.long)
    return x_l, y_l, x_u, y_u


def test_half_the_classes_are_pasted_with_their_labels_and_nothing_else_moves():
    x_l, y_l, x_u, y_u = scene()
    w_u = torch.full(y_u.shape, 0.25)
    inside = torch.ones(y_u.shape, dtype=torch.bool)
    inside[:, -3:] = False  # the unlabeled crop's own padding
    gen = torch.Generator().manual_seed(0)
    images, (labels, weights, inside_m) = classmix_labeled(
        x_u, [y_u, w_u, inside], x_l, [y_l, 1.0, True], y_l, gen, p=1.0, ignore=IGNORE
    )
    for i in range(3):
        pasted = labels[i] != 9
        classes = set(labels[i][pasted].unique().tolist())
        assert len(classes) == 2 and classes <= {0, 3, 7}  # ceil(3 / 2) of the three present, never the ignore
        assert torch.equal(pasted, torch.isin(y_l[i], torch.tensor(sorted(classes))))  # whole classes
        assert torch.equal(images[i, :, pasted], x_l[i, :, pasted])  # the labeled pixels under their labels
        assert torch.equal(labels[i][pasted], y_l[i][pasted])
        assert (images[i, :, ~pasted] == -(1 + i)).all()  # elsewhere the unlabeled image, untouched
        assert (weights[i][pasted] == 1).all() and (weights[i][~pasted] == 0.25).all()
        assert inside_m[i][pasted].all() and torch.equal(inside_m[i][~pasted], inside[i][~pasted])
        assert (labels[i][:, -2:] == 9).all()  # the labeled padding is never pasted


def test_probability_zero_or_no_labeled_pixel_pastes_nothing():
    x_l, y_l, x_u, y_u = scene()
    gen = torch.Generator().manual_seed(0)
    images, (labels,) = classmix_labeled(x_u, [y_u], x_l, [y_l], y_l, gen, p=0.0, ignore=IGNORE)
    assert torch.equal(images, x_u) and torch.equal(labels, y_u)
    empty = torch.full_like(y_l, IGNORE)
    images, (labels,) = classmix_labeled(x_u, [y_u], x_l, [empty], empty, gen, p=1.0, ignore=IGNORE)
    assert torch.equal(images, x_u) and torch.equal(labels, y_u)
    share = []
    for seed in range(40):  # p = 0.5: about half of the images mixed
        g = torch.Generator().manual_seed(seed)
        _, (labels,) = classmix_labeled(x_u, [y_u], x_l, [y_l], y_l, g, p=0.5, ignore=IGNORE)
        share += [bool((labels[i] != 9).any()) for i in range(3)]
    assert 0.3 < sum(share) / len(share) < 0.7


def test_the_teachers_outputs_follow_the_mask_at_their_own_stride():
    x_l, y_l, x_u, y_u = scene(b=2, h=16)
    t_u = torch.zeros(2, 4, 4, 4)  # stride-4 teacher features on the unlabeled images
    t_l = torch.ones(2, 4, 4, 4)  # and on the labeled ones
    gen = torch.Generator().manual_seed(1)
    _, (labels, feats, untouched) = classmix_labeled(
        x_u, [y_u, t_u, t_u.clone()], x_l, [y_l, t_l, None], y_l, gen, p=1.0, ignore=IGNORE
    )
    small = F.interpolate((labels != 9)[:, None].float(), size=(4, 4), mode="nearest")[:, 0]
    for k in range(4):
        assert torch.equal(feats[:, k], small)
    assert torch.equal(untouched, t_u)  # no labeled counterpart: left as it was


def test_the_step_trains_on_the_pasted_ground_truth_and_the_setting_is_hashed_only_when_set():
    from tests.training.test_terms import batch, make_step, tiny_config

    labeled, unlabeled = batch(b=2)
    unlabeled["mask"][:] = IGNORE  # no pseudo-label kept: only pasted pixels can carry a label
    plain, _ = make_step(tiny_config(strong_aug=True, cutmix_p=0.0))
    _, logs = plain((labeled, unlabeled), 0)
    assert logs["kept"] == 0
    mixed, _ = make_step(tiny_config(strong_aug=True, cutmix_p=0.0, labeled_classmix_p=1.0))
    loss, logs = mixed((labeled, unlabeled), 0)
    assert logs["kept"] == pytest.approx(0.5, abs=0.2)  # half of four classes, about half the pixels
    assert logs["loss_unsup"] > 0 and torch.isfinite(loss)
    # With a teacher read by the contrastive term, the teacher's outputs are mixed too (t_l computed).
    u2pl, _ = make_step(tiny_config(strong_aug=True, contrastive=True, pseudo_source="teacher", labeled_classmix_p=1.0))
    loss, _ = u2pl((labeled, unlabeled), 0)
    assert torch.isfinite(loss)
    assert tiny_config(labeled_classmix_p=1.0).selftrain.fingerprint_fields()["labeled_classmix_p"] == 1.0
    assert "labeled_classmix_p" not in tiny_config().selftrain.fingerprint_fields()  # earlier runs stay up to date


def test_without_pseudo_labels_only_the_pasted_pixels_are_trained():
    from tests.training.test_terms import batch, make_step, tiny_config

    labeled, unlabeled = batch(b=2)  # three quarters of the pseudo-labels kept
    control, _ = make_step(tiny_config(strong_aug=True, cutmix_p=0.0, pseudo_labels=False))
    _, logs = control((labeled, unlabeled), 0)
    assert logs["kept"] == 0 and logs["loss_unsup"] == 0
    mixed, _ = make_step(tiny_config(strong_aug=True, cutmix_p=0.0, labeled_classmix_p=1.0, pseudo_labels=False))
    _, logs = mixed((labeled, unlabeled), 0)
    assert logs["kept"] == pytest.approx(0.5, abs=0.2) and logs["loss_unsup"] > 0  # the pasted half only
    assert tiny_config(pseudo_labels=False).selftrain.fingerprint_fields()["pseudo_labels"] is False
    assert "pseudo_labels" not in tiny_config().selftrain.fingerprint_fields()


def reference_classmix(x_u, targets_u, x_l, targets_l, y_l, generator, p, ignore):
    """The per-image form (session 32's): torch.unique of each labeled image's classes, torch.isin for the mask."""
    b_u, b_l = x_u.shape[0], x_l.shape[0]
    apply = torch.rand(b_u, generator=generator) < p
    masks = []
    for i in range(b_u):
        y = y_l[i % b_l]
        classes = torch.unique(y[y != ignore])
        n = len(classes)
        if not apply[i] or n == 0:
            masks.append(torch.zeros_like(y, dtype=torch.bool))
            continue
        masks.append(torch.isin(y, classes[torch.randperm(n, generator=generator)[: (n + 1) // 2]]))
    mask = torch.stack(masks)
    donor = torch.arange(b_u) % b_l
    mixed = []
    for t, src in zip(targets_u, targets_l, strict=True):
        m = F.interpolate(mask[:, None].float(), size=t.shape[-2:], mode="nearest")[:, 0].bool()
        m = m.view(b_u, *([1] * (t.dim() - 3)), *m.shape[-2:])
        value = src[donor].to(t.dtype) if isinstance(src, torch.Tensor) else torch.as_tensor(src, dtype=t.dtype)
        mixed.append(torch.where(m, value, t))
    return torch.where(mask[:, None], x_l[donor], x_u), mixed


@pytest.mark.parametrize("b_u, b_l, p", [(6, 3, 1.0), (5, 5, 0.5), (4, 6, 0.7)])
def test_the_batched_class_sets_equal_the_per_image_form_draw_for_draw(b_u, b_l, p):
    """One scatter of the classes present replaces unique / isin per image; the generator's draws (and so every
    mixed batch of a seeded round) stay those of the per-image form, for any class count, batch pairing and p."""
    data = torch.Generator().manual_seed(b_u * 10 + b_l)
    h = 12
    y_l = torch.randint(0, 11, (b_l, h, h), generator=data)
    y_l[y_l % 3 == 1] = 0  # unequal class counts per image
    y_l[:, :, -3:] = IGNORE
    y_l[-1] = IGNORE  # one labeled image with nothing to paste
    x_l, x_u = torch.randn(b_l, 3, h, h, generator=data), torch.randn(b_u, 3, h, h, generator=data)
    y_u = torch.randint(0, 11, (b_u, h, h), generator=data)
    t_u, t_l = torch.randn(b_u, 4, 3, 3, generator=data), torch.randn(b_l, 4, 3, 3, generator=data)
    for seed in range(5):
        got = classmix_labeled(
            x_u, [y_u, t_u], x_l, [y_l, t_l], y_l, torch.Generator().manual_seed(seed), p=p, ignore=IGNORE
        )
        want = reference_classmix(
            x_u, [y_u, t_u], x_l, [y_l, t_l], y_l, torch.Generator().manual_seed(seed), p=p, ignore=IGNORE
        )
        assert torch.equal(got[0], want[0])
        for a, b in zip(got[1], want[1], strict=True):
            assert torch.equal(a, b)
