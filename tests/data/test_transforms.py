"""train.photometric: the labeled images' photometric augmentation (image only, seeded, off at 0)."""

from __future__ import annotations

import torch

from tests.conftest import TINY_RECIPE, run_cli


def test_labeled_photometric_changes_the_image_not_the_mask(tiny_root):
    from labelpipe.data import open_source
    from labelpipe.data.dataset import SegmentationDataset
    from labelpipe.data.transforms import labeled_photometric, weak_transform

    assert labeled_photometric(0.0) is None  # off: the datasets stay as they were
    source = open_source(tiny_root)
    samples = source.split("source_train")[:4]
    weak = weak_transform(32, (0.75, 1.25), False)
    plain = SegmentationDataset(source, samples, weak)
    jittered = SegmentationDataset(source, samples, weak, photometric=labeled_photometric(1.0))
    changed = 0
    for i in range(len(samples)):
        a, b = plain[(i, 100 + i)], jittered[(i, 100 + i)]
        assert torch.equal(a["mask"], b["mask"])  # the same crop: the geometry is drawn first, then the colour
        changed += not torch.allclose(a["image"], b["image"])
        c = jittered[(i, 100 + i)]
        assert torch.equal(b["image"], c["image"])  # seeded per sample: a resumed run sees the same batch
    assert changed >= 3  # p = 0.8 jitter, 0.2 grayscale, 0.5 blur: at most a rare image passes untouched


def test_photometric_is_hashed_only_when_set_and_reaches_pretrain(data_cache, tmp_path):
    import json

    from labelpipe.config import TrainConfig

    assert "photometric" not in TrainConfig().fingerprint_fields()  # earlier runs stay up to date
    assert TrainConfig(photometric=1.0).fingerprint_fields()["photometric"] == 1.0
    run = tmp_path / "run"
    args = ["pretrain", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]
    assert run_cli([*args, "--set", "train.steps=2", "--set", "train.photometric=1.0"]) == 0
    manifest = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["inputs"]["train"]["photometric"] == 1.0
