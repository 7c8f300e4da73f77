"""The self-training step on a fixed batch: the rectified loss is the paper's formula and changes the gradient
the way the option says; the contrastive loss reaches the representation when classes qualify."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.training.test_terms import IGNORE, batch, make_step, tiny_config


def rectified_by_hand(main: torch.Tensor, aux: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Seed 000's ``mean(exp(-var) CE) + mean(var)`` over the kept pixels, ``var = KL(p_main || p_aux)``,
    in float64 from (B, C, H, W) logits (independent of ``labelpipe.losses.rectified_loss``)."""
    log_p, log_q = F.log_softmax(main.double(), 1), F.log_softmax(aux.double(), 1)
    var = (log_p.exp() * (log_p - log_q)).sum(1)
    kept = target != IGNORE
    ce = -log_p.gather(1, torch.where(kept, target, 0)[:, None])[:, 0]
    n = kept.sum()
    return (torch.exp(-var) * ce)[kept].sum() / n + var[kept].sum() / n


def supervised_by_hand(out, y_l: torch.Tensor, b: int) -> torch.Tensor:
    return F.cross_entropy(out.main[:b], y_l) + 0.4 * F.cross_entropy(out.aux[:b], y_l)


def aux_grad(model: torch.nn.Module) -> torch.Tensor:
    """The auxiliary classifier's last weight gradient (of the heads, only the rectified term ties it to the
    unlabeled half)."""
    return model.aux_classifier[-1].weight.grad.clone()


def test_rectified_step_is_the_formula_by_hand_and_pulls_the_aux_head():
    labeled, unlabeled = batch()
    y_l, y_u = labeled["mask"], unlabeled["mask"]
    rect, model = make_step(tiny_config(rectified=True, strong_aug=False))
    model.eval()  # BatchNorm statistics and dropout fixed: the hand forward below is the step's forward
    loss, logs = rect((labeled, unlabeled), 0)

    out = model(torch.cat([labeled["image"], unlabeled["image"]]), with_rep=False)
    sup = supervised_by_hand(out, y_l, 2)
    expected = sup.double() + rectified_by_hand(out.main[2:], out.aux[2:], y_u)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-5)
    assert logs["loss_unsup"] == pytest.approx(float(expected - sup.double()), rel=1e-4)

    # The same model and batch with the plain CE: another loss, and the CE leaves the aux head to the
    # supervised term, where the rectified loss's variance term pulls it towards the main head.
    plain, model_ce = make_step(tiny_config(strong_aug=False))
    model_ce.eval()
    loss_ce, _ = plain((labeled, unlabeled), 0)
    assert abs(float(loss_ce.detach()) - float(loss.detach())) > 1e-3
    loss_ce.backward()
    g_ce = aux_grad(model_ce)
    model_ce.zero_grad()
    supervised_by_hand(model_ce(torch.cat([labeled["image"], unlabeled["image"]]), with_rep=False), y_l, 2).backward()
    g_sup = aux_grad(model_ce)
    assert torch.allclose(g_ce, g_sup, atol=1e-7)
    loss.backward()
    g_rect = aux_grad(model)
    assert (g_rect - g_sup).abs().max() > 1e-4 * g_sup.abs().max()


def contrastive_step(threshold: float):
    step, model = make_step(tiny_config(contrastive=True, strong_aug=False, contrastive_anchor_threshold=threshold))
    model.eval()
    return step, model


def test_contrastive_gradient_reaches_the_representation_when_classes_qualify():
    """With anchors (threshold 0: every labeled pixel qualifies) the loss is positive and its gradient reaches
    the representation head; a term that returned the constant 0 fails both. With no class qualifying (a
    near-uniform random teacher never reaches p > 0.99) the loss is 0 and the head gets no gradient."""
    step, model = contrastive_step(0.0)
    loss, logs = step(batch(), 0)
    assert logs["contrastive_classes"] > 0 and logs["loss_contrastive"] > 0
    loss.backward()
    grads = [p.grad for p in model.representation.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0

    # lambda_c * L_c is what the term adds to the loss (the same network without the term).
    plain, plain_model = make_step(tiny_config(strong_aug=False))
    plain_model.eval()
    base, _ = plain(batch(), 0)
    lam = tiny_config().selftrain.lambda_contrastive
    assert float((loss - base).detach()) == pytest.approx(lam * logs["loss_contrastive"], rel=1e-4, abs=1e-6)

    none, none_model = contrastive_step(0.99)
    loss0, logs0 = none(batch(), 0)
    assert logs0["contrastive_classes"] == 0 and logs0["loss_contrastive"] == 0
    loss0.backward()
    rep = [p.grad for p in none_model.representation.parameters() if p.grad is not None]
    assert sum(float(g.abs().sum()) for g in rep) == 0
