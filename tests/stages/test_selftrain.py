"""selftrain: two rounds end to end on the tiny data set, every loss on, and resume after SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from labelpipe.store.atomic import sha256_file
from tests.conftest import REPO, TINY_RECIPE, run_cli

EVERYTHING = ["--loss", "sce", "--contrastive", "--denoise", "--strong-aug"]


@pytest.fixture()
def run(pretrained_run, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(pretrained_run, dst)
    return dst


@pytest.mark.slow
def test_two_rounds_end_to_end(run, capsys):
    assert (
        run_cli(
            [
                "selftrain",
                "--run",
                str(run),
                "--config",
                str(TINY_RECIPE),
                "--device",
                "cpu",
                *EVERYTHING,
            ]
        )
        == 0
    )
    for k in (1, 2):
        round_dir = run / "selftrain" / f"round-{k}"
        for stage, artifact in (
            ("predict", "predictions.h5"),
            ("pseudolabel", "labels.h5"),
            ("train", "model.safetensors"),
        ):
            manifest = json.loads((round_dir / stage / "manifest.json").read_text())
            assert manifest["status"] == "done", (k, stage)
            assert (round_dir / stage / artifact).is_file()
        report = json.loads((round_dir / "pseudolabel" / "report.json").read_text())
        assert report["alpha"] == (0.2, 0.5)[k - 1]  # the round's labeling ratio
        log = [json.loads(line) for line in (round_dir / "train" / "log.jsonl").read_text().splitlines()]
        losses = [r for r in log if "loss" in r]
        assert len(losses) == 4
        assert all(r["loss_contrastive"] >= 0 and "loss_unsup" in r for r in losses)
        # Not the constant 0 of a step where no class qualifies: anchors were found and the loss is positive.
        assert any(r["contrastive_classes"] > 0 and r["loss_contrastive"] > 0 for r in losses), losses
    # round 2 starts from round 1: its predictions come from round 1's model
    r2 = json.loads((run / "selftrain/round-2/predict/manifest.json").read_text())
    assert r2["inputs"]["model"] == "round-1"
    capsys.readouterr()
    # evaluate takes any round; the default is the last one
    assert run_cli(["evaluate", "--run", str(run), "--model", "round-1", "--device", "cpu"]) == 0
    assert run_cli(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    assert (run / "evaluate/round-1/metrics.json").is_file() and (run / "evaluate/round-2/metrics.json").is_file()
    assert run_cli(["status", str(run)]) == 0
    assert "selftrain/round-2/train" in capsys.readouterr().out
    # a second call is a no-op
    assert (
        run_cli(
            [
                "selftrain",
                "--run",
                str(run),
                "--config",
                str(TINY_RECIPE),
                "--device",
                "cpu",
                *EVERYTHING,
            ]
        )
        == 0
    )
    assert "up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_online_rounds_train_without_stored_labels(run, capsys):
    """U2PL's regime (--pseudo-source teacher): the mean teacher labels each batch as the round trains, so a
    round predicts and labels nothing up front; round 2 starts from round 1's weights, and a rerun is a no-op."""
    args = ["selftrain", "--run", str(run), "--config", str(TINY_RECIPE), "--device", "cpu"]
    args += [*EVERYTHING, "--pseudo-source", "teacher", "--steps", "3"]
    assert run_cli(args) == 0
    assert "online pseudo-labels from the mean teacher" in capsys.readouterr().out
    for k in (1, 2):
        round_dir = run / "selftrain" / f"round-{k}"
        assert sorted(p.name for p in round_dir.iterdir()) == ["train"], k
        manifest = json.loads((round_dir / "train" / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["inputs"]["labels"] == "online"
        log = [json.loads(line) for line in (round_dir / "train" / "log.jsonl").read_text().splitlines()]
        kept = [r["kept"] for r in log if "loss" in r]
        assert len(kept) == 3 and all(0 < f < 1 for f in kept), kept  # the entropy split drops the uncertain
    r2 = json.loads((run / "selftrain/round-2/train/manifest.json").read_text())
    assert r2["inputs"]["init"] == sha256_file(run / "selftrain/round-1/train/model.safetensors")
    assert run_cli(args) == 0
    assert "round 2 train: up to date" in capsys.readouterr().out


@pytest.mark.slow
def test_rectified_changes_the_round(run, tmp_path):
    """The same round (variance labels and their weights) with and without --rectified: the flag reaches the
    objective (the step's loss by hand is in tests/training/test_selftrain_step.py), so the logged
    unlabeled loss and the trained weights differ."""
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    args = ["--config", str(TINY_RECIPE), "--device", "cpu", "--rounds", "1", "--steps", "2", "--method", "variance"]
    assert run_cli(["selftrain", "--run", str(run), *args, "--rectified"]) == 0
    assert run_cli(["selftrain", "--run", str(plain), *args]) == 0
    train = "selftrain/round-1/train"
    rect_log, plain_log = (
        [json.loads(line) for line in (r / train / "log.jsonl").read_text().splitlines() if '"loss"' in line]
        for r in (run, plain)
    )
    assert rect_log[0]["loss_unsup"] != pytest.approx(plain_log[0]["loss_unsup"], rel=1e-3)
    a, b = load_file(str(run / train / "model.safetensors")), load_file(str(plain / train / "model.safetensors"))
    assert any(not torch.equal(a[key], b[key]) for key in a)
    manifests = [json.loads((r / train / "manifest.json").read_text()) for r in (run, plain)]
    assert manifests[0]["inputs"]["selftrain"]["rectified"] and not manifests[1]["inputs"]["selftrain"]["rectified"]


def test_selftrain_before_pretrain_is_a_clear_error(data_cache, tmp_path, capsys):
    assert run_cli(["selftrain", "--run", str(tmp_path / "r"), "--config", str(TINY_RECIPE)]) == 2
    assert "labelpipe pretrain" in capsys.readouterr().err


def _cli(run, *extra):
    return [
        sys.executable,
        "-m",
        "labelpipe",
        "selftrain",
        "--run",
        str(run),
        "--config",
        str(TINY_RECIPE),
        "--device",
        "cpu",
        "--rounds",
        "1",
        "--contrastive",
        "--loss",
        "sce",
        *extra,
    ]


@pytest.mark.slow
def test_killed_round_resumes_to_the_same_weights(pretrained_run, tmp_path, capsys):
    """SIGKILL right after step 3 (the test hook LABELPIPE_TEST_KILL_AFTER_STEP; checkpoints every 2 steps):
    the rerun resumes from step 2, the last checkpoint, not from 0, and ends with the uninterrupted weights.
    Only the killed run is a subprocess; the reference and the resume run in-process (one torch thread)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LABELPIPE_TEST_KILL")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), LABELPIPE_TEST_KILL_AFTER_STEP="3")
    longer = ["--steps", "6", "--set", "train.checkpoint_every=2", "--set", "train.val_every=100"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    shutil.copytree(pretrained_run, reference)
    shutil.copytree(pretrained_run, killed)
    proc = subprocess.Popen(
        _cli(killed, *longer), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    assert run_cli(_cli(reference, *longer)[3:]) == 0  # while the subprocess runs
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == -signal.SIGKILL, stderr[-2000:]
    train_dir = killed / "selftrain/round-1/train"
    assert json.loads((train_dir / "manifest.json").read_text())["status"] == "running"
    assert not (train_dir / "model.safetensors").exists()
    state = torch.load(train_dir / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2
    assert {"teacher", "memory", "prototypes"} <= set(state["extras"])

    capsys.readouterr()
    assert run_cli(_cli(killed, *longer)[3:]) == 0
    assert "resuming round 1 from step 2 " in capsys.readouterr().out
    a = load_file(str(reference / "selftrain/round-1/train/model.safetensors"))
    b = load_file(str(train_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    lines = (train_dir / "log.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in lines if '"loss"' in line]
    assert steps == list(range(1, 7)), "log.jsonl must hold each step once after a resume"


def test_cutmix_mixes_every_target_at_its_own_resolution():
    from labelpipe.training.selftrain_step import cutmix

    b, h = 4, 32
    ident = torch.arange(b, dtype=torch.float32)
    images = ident.view(b, 1, 1, 1).expand(b, 3, h, h).clone()
    labels = ident.view(b, 1, 1).expand(b, h, h).long()
    rep = ident.view(b, 1, 1, 1).expand(b, 5, h // 4, h // 4).clone()  # the teacher's stride-4 features
    gen = torch.Generator().manual_seed(3)
    mixed_images, (mixed_labels, none, mixed_rep) = cutmix(images, [labels, None, rep], gen, p=1.0)
    assert none is None
    assert torch.equal(mixed_images[:, 0].long(), mixed_labels)  # the same box in images and labels
    assert (mixed_labels != labels).any()  # something was pasted
    small = torch.nn.functional.interpolate(mixed_labels[:, None].float(), size=(h // 4, h // 4), mode="nearest")
    for k in range(5):  # features follow the labels at their stride
        assert torch.equal(mixed_rep[:, k], small[:, 0])


@pytest.mark.slow
def test_denoising_alone_keeps_its_prototypes(run):
    """Without the contrastive loss (which otherwise updates them) denoising still folds the teacher's
    features into the prototypes, rather than comparing against prototypes never seen."""
    args = ["selftrain", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu", "--rounds", "1"]
    assert run_cli([*args, "--denoise", "--no-contrastive"]) == 0
    state = torch.load(run / "selftrain" / "round-1" / "train" / "checkpoint.pt", weights_only=True)
    assert "memory" not in state["extras"]  # no memory bank without the contrastive loss
    assert state["extras"]["prototypes"]["seen"].any()


def test_denoising_keeps_full_resolution_labels_the_prototypes_do_not_change():
    """Prototype weights are upsampled, not the labels: with no prototype seen (uniform weights) the
    denoised labels are exactly the argmax at full resolution, not a blocky stride-4 copy."""
    from labelpipe.losses import PrototypeBank
    from labelpipe.losses import denoise_pseudo_labels as denoise_labels

    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(3 * torch.randn(2, 5, 16, 16, generator=g), 1)
    labels = probs.argmax(1)
    labels[:, :3] = 255
    rep = torch.randn(2, 8, 4, 4, generator=g)
    out = denoise_labels(probs, rep, PrototypeBank(5, 8), labels, 255)
    assert torch.equal(out, labels)
    # a seen prototype close to every pixel's feature pulls the labels to its class
    bank = PrototypeBank(5, 8, momentum=0.0)
    bank.update(rep.permute(0, 2, 3, 1).reshape(-1, 8).mean(0, keepdim=True), torch.tensor([1]))
    pulled = denoise_labels(probs, rep, bank, labels, 255)
    assert (pulled == 255).equal(labels == 255) and (pulled == 1).sum() >= (labels == 1).sum()


def test_padding_is_neither_anchor_nor_negative(tiny_root):
    """Crops smaller than the crop size are padded with 0 / 255; the unlabeled dataset says where, and
    the padded pixels drop out of the contrastive pixels (the mask alone cannot tell them from
    unreliable ones)."""
    from types import SimpleNamespace

    from labelpipe.data import open_source
    from labelpipe.data.dataset import SegmentationDataset, collate
    from labelpipe.data.transforms import weak_transform
    from labelpipe.training.selftrain_step import contrastive_pixels

    source = open_source(tiny_root)
    samples = source.split(sorted(source.splits)[0])[:2]
    ds = SegmentationDataset(source, samples, weak_transform(32, (0.4, 0.5), False), require_masks=False, pad_mask=True)
    batch = collate([ds[(0, 1)], ds[(1, 2)]])
    inside = batch["valid"]
    assert inside.dtype == torch.bool and 0 < inside.sum() < inside.numel()
    assert (batch["mask"][~inside] == 255).all()

    b, c, d = 2, 4, 3
    y_l = torch.zeros(b, 32, 32, dtype=torch.long)
    y_u = torch.full((b, 32, 32), 255)
    outputs = lambda: SimpleNamespace(main=torch.randn(b, c, 8, 8), rep=torch.randn(b, d, 8, 8))  # noqa: E731
    t_l, t_u = outputs(), outputs()
    rep = torch.randn(2 * b, d, 8, 8)
    every = contrastive_pixels(rep, t_l, t_u, y_l, y_u, 255)
    padded = contrastive_pixels(rep, t_l, t_u, y_l, y_u, 255, inside)
    small = torch.nn.functional.interpolate(inside[:, None].float(), size=(8, 8), mode="nearest")[:, 0].bool()
    assert every["valid"].all()
    assert torch.equal(padded["valid"][b * 64 :], small.reshape(-1))
    assert padded["valid"][: b * 64].all()


def test_weak_view_is_the_weak_datasets_crop(tiny_root):
    """The teacher's view rides on the strong item (one read of the image): it is exactly what a separate
    weakly augmented dataset gives for the same (index, seed), and the strong image differs from it."""
    from labelpipe.data import open_source
    from labelpipe.data.dataset import SegmentationDataset, collate
    from labelpipe.data.transforms import strong_photometric, weak_transform

    source = open_source(tiny_root)
    samples = source.split(sorted(source.splits)[0])[:3]
    weak = weak_transform(24, (0.5, 1.5), True)
    strong = SegmentationDataset(
        source, samples, weak, photometric=strong_photometric(1.5), require_masks=False, pad_mask=True, weak_view=True
    )
    alone = SegmentationDataset(source, samples, weak, require_masks=False)
    keys = [(i % len(samples), 1000 + i) for i in range(8)]
    shared = collate([strong[k] for k in keys])
    separate = collate([alone[k] for k in keys])
    assert torch.equal(shared["image_weak"], separate["image"])
    assert torch.equal(shared["mask"], separate["mask"])
    assert not torch.equal(shared["image"], shared["image_weak"])
    assert "image_weak" not in SegmentationDataset(source, samples, weak, require_masks=False)[keys[0]]


def test_head_dropout_reaches_the_round(run, tmp_path):
    """``selftrain.head_dropout`` changes the round's forward (the model's side is in
    tests/models/test_deeplab.py): the first step's loss and the manifest's inputs differ from the same round
    without it."""
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    args = ["--config", str(TINY_RECIPE), "--device", "cpu", "--rounds", "1", "--steps", "1", "--method", "variance"]
    assert run_cli(["selftrain", "--run", str(run), *args, "--rectified", "--set", "selftrain.head_dropout=0.5"]) == 0
    assert run_cli(["selftrain", "--run", str(plain), *args, "--rectified"]) == 0
    train = "selftrain/round-1/train"
    first = [
        next(json.loads(line) for line in (r / train / "log.jsonl").read_text().splitlines() if '"loss"' in line)
        for r in (run, plain)
    ]
    assert first[0]["loss"] != pytest.approx(first[1]["loss"], rel=1e-4)
    manifests = [json.loads((r / train / "manifest.json").read_text()) for r in (run, plain)]
    assert manifests[0]["inputs"]["selftrain"]["head_dropout"] == 0.5
    assert "head_dropout" not in manifests[1]["inputs"]["selftrain"]


def test_round_overrides_run_an_online_round_then_a_rectified_offline_one(run, tmp_path, capsys):
    """``selftrain.round_overrides`` (seed 000's two stages in one run): round 1 online, round 2 on stored
    variance labels with the rectified loss and its own threshold setting. Round 1 is the same round as the
    run without the overrides (same fingerprint), so a copy of a plain one-round run resumes at round 2."""
    base = ["--config", str(TINY_RECIPE), "--device", "cpu", "--steps", "2", "--pseudo-source", "teacher"]
    plain = tmp_path / "plain"
    shutil.copytree(run, plain)
    assert run_cli(["selftrain", "--run", str(plain), *base, "--rounds", "1"]) == 0
    overrides = (
        "selftrain.round_overrides="
        "{2: {pseudo_source: stored, method: threshold, rectified: true, pseudolabel: {tau: 0.6}}}"
    )
    shutil.rmtree(run)
    shutil.copytree(plain, run)
    capsys.readouterr()
    assert run_cli(["selftrain", "--run", str(run), *base, "--rounds", "2", "--set", overrides]) == 0
    out = capsys.readouterr().out
    assert "round 1 train: up to date" in out  # the plain run's round 1, resumed at round 2
    r1, r2 = (run / "selftrain" / f"round-{k}" for k in (1, 2))
    assert sorted(p.name for p in r1.iterdir()) == ["train"]
    assert sorted(p.name for p in r2.iterdir()) == ["predict", "pseudolabel", "train"]
    inputs = json.loads((r2 / "train" / "manifest.json").read_text())["inputs"]
    assert inputs["selftrain"]["rectified"] and inputs["selftrain"]["pseudo_source"] == "stored"
    assert "round_overrides" not in inputs["selftrain"]
    assert inputs["init"] == sha256_file(r1 / "train" / "model.safetensors")
    report = json.loads((r2 / "pseudolabel" / "report.json").read_text())
    assert report["method"] == "threshold"
    pl_inputs = json.loads((r2 / "pseudolabel" / "manifest.json").read_text())["inputs"]
    assert "0.6" in json.dumps(pl_inputs)  # the round's own pseudolabel settings were the ones labelled with
    log = [json.loads(line) for line in (r2 / "train" / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(log) == 2 and all("loss_unsup" in r for r in log)
