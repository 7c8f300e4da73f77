"""Self-training objectives from registered loss terms: the registry, what a term needs, and a toy term
registered from a test that trains a real round (adding a term is one module and its test)."""

from __future__ import annotations

import pytest
import torch

from labelpipe.config import RunConfig
from labelpipe.errors import LabelpipeError
from labelpipe.training.selftrain_step import SelftrainStep
from labelpipe.training.terms import LOSS_TERMS, LossTerm, StepTensors, register_term, term_names

NUM_CLASSES, IGNORE = 4, 255


class RepNorm(LossTerm):
    """A toy term: the mean squared norm of the student's representation (needs nothing but that)."""

    needs = frozenset({"student_rep"})
    calls = 0

    def __call__(self, t: StepTensors):
        RepNorm.calls += 1
        value = t.rep.float().pow(2).mean()
        return 0.5 * value, {"loss_rep_norm": float(value.detach())}


@pytest.fixture()
def toy_term():
    register_term("rep_norm")(RepNorm)
    RepNorm.calls = 0
    yield "rep_norm"
    LOSS_TERMS.pop("rep_norm", None)


def tiny_config(**selftrain) -> RunConfig:
    return RunConfig.model_validate(
        {
            "model": {"backbone": "resnet18", "output_stride": 16, "aspp_rates": [1, 2, 3], "rep_dim": 16},
            "train": {"crop_size": 32},
            "selftrain": {"memory_capacity": 64, "contrastive_anchors": 8, "contrastive_negatives": 4, **selftrain},
        }
    )


def make_step(config: RunConfig, seed: int = 0) -> tuple[SelftrainStep, torch.nn.Module]:
    from labelpipe.models import build_model

    torch.manual_seed(seed)
    m = config.model
    model = build_model(NUM_CLASSES, m.backbone, m.output_stride, m.aspp_rates, m.rep_dim, None)
    step = SelftrainStep.build(config, model, model, NUM_CLASSES, IGNORE, torch.device("cpu"), total_steps=10)
    return step, model


def batch(seed: int = 0, b: int = 2, size: int = 32):
    g = torch.Generator().manual_seed(seed)
    labeled = {
        "image": torch.randn(b, 3, size, size, generator=g),
        "mask": torch.randint(0, NUM_CLASSES, (b, size, size), generator=g),
    }
    y_u = torch.randint(0, NUM_CLASSES, (b, size, size), generator=g)
    y_u[:, :8] = IGNORE
    unlabeled = {"image": torch.randn(b, 3, size, size, generator=g), "mask": y_u}
    return labeled, unlabeled


def test_terms_default_to_the_flags_and_unknown_names_are_one_line_errors():
    assert term_names(tiny_config().selftrain) == ["supervised", "unsupervised"]
    assert term_names(tiny_config(rectified=True, contrastive=True).selftrain) == [
        "supervised",
        "rectified",
        "contrastive",
    ]
    with pytest.raises(LabelpipeError, match="unknown loss term.*nope.*registered: .*contrastive"):
        term_names(tiny_config(terms=["supervised", "nope"]).selftrain)
    with pytest.raises(ValueError, match="needs unknown inputs"):
        register_term("bad")(type("Bad", (LossTerm,), {"needs": frozenset({"gpu"})}))
    assert "bad" not in LOSS_TERMS


def test_the_step_computes_only_what_its_terms_need():
    plain, _ = make_step(tiny_config())
    assert plain.teacher is None and not plain.student_rep and "memory" not in plain.components()
    contrastive, _ = make_step(tiny_config(contrastive=True))
    assert contrastive.teacher is not None and contrastive.student_rep
    assert {"memory", "prototypes", "teacher"} <= set(contrastive.components())
    balanced, _ = make_step(tiny_config(rectified=True, rectified_class_balance=True, strong_aug=False))
    assert set(balanced.components()) == {"often_balance"}
    assert SelftrainStep.needs_teacher(tiny_config(pseudo_source="teacher").selftrain)
    assert not SelftrainStep.needs_teacher(tiny_config(rectified=True).selftrain)


def test_the_steps_loss_is_the_sum_of_its_terms_computed_by_hand():
    """Supervised + unsupervised CE, recomputed from the model's own outputs on the same batch."""
    import torch.nn.functional as F

    config = tiny_config(strong_aug=False)
    step, model = make_step(config)
    labeled, unlabeled = batch()
    model.eval()  # BatchNorm in eval: the hand forward below sees the same statistics
    loss, logs = step((labeled, unlabeled), 0)
    out = model(torch.cat([labeled["image"], unlabeled["image"]]), with_rep=False)
    y_u = unlabeled["mask"]
    sup = F.cross_entropy(out.main[:2], labeled["mask"]) + 0.4 * F.cross_entropy(out.aux[:2], labeled["mask"])
    kept = (y_u != IGNORE).sum()
    unsup = y_u.numel() / kept * F.cross_entropy(out.main[2:], y_u, ignore_index=IGNORE)
    assert torch.allclose(loss, sup + unsup, atol=1e-5)
    assert logs["kept"] == pytest.approx(float(kept) / y_u.numel())


def test_a_registered_toy_term_changes_the_loss_and_its_gradient(toy_term):
    base = tiny_config(strong_aug=False)
    with_toy = tiny_config(strong_aug=False, terms=["supervised", "unsupervised", toy_term])
    step_a, model_a = make_step(base)
    step_b, model_b = make_step(with_toy)
    assert step_b.student_rep and not step_a.student_rep  # the representation is computed only for it
    model_a.eval(), model_b.eval()  # no dropout draws: the two forwards see the same network
    loss_a, _ = step_a(batch(), 0)
    loss_b, logs_b = step_b(batch(), 0)
    assert RepNorm.calls == 1 and logs_b["loss_rep_norm"] > 0
    assert torch.allclose(loss_b - loss_a, torch.tensor(0.5 * logs_b["loss_rep_norm"]), atol=1e-5)
    loss_b.backward()
    rep_grads = [p.grad for p in model_b.representation.parameters() if p.grad is not None]
    assert rep_grads and any(float(g.abs().sum()) > 0 for g in rep_grads)


@pytest.mark.slow
def test_a_toy_term_trains_a_real_round(toy_term, pretrained_run, tmp_path):
    """The stage runs a round whose objective includes the test's term (in-process: the registry is ours)."""
    import json
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)

    from tests.conftest import TINY_RECIPE, run_cli

    status = run_cli(
        [
            "selftrain",
            "--run",
            str(run),
            "--config",
            str(TINY_RECIPE),
            "--device",
            "cpu",
            "--rounds",
            "1",
            "--steps",
            "2",
            "--set",
            f"selftrain.terms=[supervised, unsupervised, {toy_term}]",
        ]
    )
    assert status == 0
    log = run / "selftrain" / "round-1" / "train" / "log.jsonl"
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert RepNorm.calls == 2
    assert any("loss_rep_norm" in r for r in records)


def test_the_online_split_is_per_batch_by_default_and_per_predicted_class_when_asked(monkeypatch):
    """``online_split: class`` labels the teacher's argmax where its entropy is below its own class's gamma_t."""
    import labelpipe.training.selftrain_step as step_module

    calls = []
    real = step_module.classwise_entropy_split_torch

    def spy(entropy, predicted, alpha_t, valid):
        calls.append(alpha_t)
        reliable = real(entropy, predicted, alpha_t, valid)
        for c in predicted.unique().tolist():  # every predicted class keeps 1 - alpha_t of its pixels, give or take one
            kept = int((reliable & (predicted == c)).sum())
            total = int((predicted == c).sum())
            assert abs(kept - (1 - alpha_t) * total) <= 1, (c, kept, total)
        return reliable

    monkeypatch.setattr(step_module, "classwise_entropy_split_torch", spy)
    labeled, unlabeled = batch()
    for split in ("batch", "class"):
        step, _ = make_step(tiny_config(pseudo_source="teacher", online_split=split, strong_aug=False))
        _, logs = step((labeled, unlabeled), 0)
        assert logs["kept"] == pytest.approx(0.8, abs=0.02)  # alpha_t 0.2 at step 0 either way
        assert len(calls) == (split == "class")
    assert tiny_config(online_split="class").selftrain.fingerprint_fields()["online_split"] == "class"
    assert "online_split" not in tiny_config().selftrain.fingerprint_fields()  # earlier runs stay up to date


def test_the_consistency_term_is_the_heads_kl_on_the_unlabeled_half_computed_by_hand():
    """MRNet's memory regularisation: ``consistency_weight * mean KL(p_main || p_aux)`` over the unlabeled
    images' pixels at the main head's size, added to the step's loss and reaching both heads."""
    base = tiny_config(strong_aug=False)
    with_mr = tiny_config(strong_aug=False, terms=["supervised", "unsupervised", "consistency"], consistency_weight=0.3)
    step_a, model_a = make_step(base)
    step_b, model_b = make_step(with_mr)
    model_a.eval(), model_b.eval()
    loss_a, _ = step_a(batch(), 0)
    loss_b, logs = step_b(batch(), 0)
    out = model_b(torch.cat([batch()[0]["image"], batch()[1]["image"]]), with_rep=False)
    main, aux = out.main[2:].double(), out.aux[2:].double()
    if aux.shape[2:] != main.shape[2:]:
        aux = torch.nn.functional.interpolate(aux, size=main.shape[2:], mode="bilinear", align_corners=False)
    p, log_p, log_q = main.softmax(1), main.log_softmax(1), aux.log_softmax(1)
    kl = float((p * (log_p - log_q)).sum(1).mean().detach())
    assert logs["loss_consistency"] == pytest.approx(kl, rel=1e-4)
    assert torch.allclose(loss_b - loss_a, torch.tensor(0.3 * kl), atol=1e-5)
    model_b.zero_grad()
    (loss_b - loss_a.detach()).backward()
    for head in (model_b.classifier, model_b.aux_classifier):
        assert any(float(q.grad.abs().sum()) > 0 for q in head.parameters() if q.grad is not None)
