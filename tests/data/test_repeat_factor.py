"""Repeat-factor sampling (train.repeat_factor): the factors' formula, the seeded stochastic rounding, the step
sampler over the repeated epoch, and its use by pretrain."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest

from labelpipe.config import TrainConfig
from labelpipe.data.dataset import StepBatchSampler
from labelpipe.data.repeat_factor import image_repeat_factors, repeat_indices
from tests.conftest import TINY_RECIPE, run_cli


def test_factors_follow_the_rarest_class_of_each_image():
    # 4 images, 3 classes: class 0 in three (f 0.75), class 1 in half (f 0.5), class 2 in one (f 0.25); the last
    # image has no class (factor 1).
    present = np.array([[1, 0, 0], [1, 1, 0], [1, 1, 1], [0, 0, 0]], bool)
    t = 1.0
    expected_class = np.sqrt(1 / np.array([0.75, 0.5, 0.25]))  # max(1, sqrt(t / f_c))
    np.testing.assert_allclose(
        image_repeat_factors(present, t), [expected_class[0], expected_class[1], expected_class[2], 1.0]
    )
    # A class at or above the threshold's frequency is not repeated; t = 0 switches sampling off.
    np.testing.assert_allclose(image_repeat_factors(present, 0.25), [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(image_repeat_factors(present, 0.0), np.ones(4))
    with pytest.raises(ValueError):
        image_repeat_factors(present[0], 0.5)


def test_stochastic_rounding_is_seeded_and_unbiased():
    factors = np.array([1.0, 1.5, 2.25, 3.0])
    once = repeat_indices(factors, seed=7)
    np.testing.assert_array_equal(once, repeat_indices(factors, seed=7))  # the seed fixes the epoch
    counts = np.bincount(once, minlength=4)
    assert counts[0] == 1 and counts[3] == 3 and counts[1] in (1, 2) and counts[2] in (2, 3)
    mean = np.mean([np.bincount(repeat_indices(factors, s), minlength=4) for s in range(2000)], axis=0)
    np.testing.assert_allclose(mean, factors, atol=0.05)  # E[count_i] = r_i
    with pytest.raises(ValueError):
        repeat_indices(np.array([0.5]), seed=0)


def test_sampler_walks_the_repeated_epoch_and_resumes_identically():
    index_map = np.array([0, 1, 1, 2, 2, 2, 3])  # 4 items, item 2 three times an epoch
    sampler = StepBatchSampler(4, 7, seed=3, start=0, total=4, index_map=index_map)
    batches = list(sampler)
    for epoch in batches:  # batch size = the repeated epoch: each batch is one epoch
        assert Counter(i for i, _ in epoch) == Counter(index_map.tolist())
    assert len({s for _, s in batches[0]}) == 7  # every repeat is augmented with its own seed
    later = list(StepBatchSampler(4, 7, seed=3, start=2, total=4, index_map=index_map))
    assert later == batches[2:]  # a resumed run sees the batches the whole run saw
    with pytest.raises(ValueError):
        StepBatchSampler(4, 2, seed=0, start=0, total=1, index_map=np.array([0, 4]))


def test_setting_is_validated_and_fingerprinted_only_when_set():
    assert "repeat_factor" not in TrainConfig().fingerprint_fields()  # earlier runs stay up to date
    assert TrainConfig(repeat_factor=0.3).fingerprint_fields()["repeat_factor"] == 0.3
    with pytest.raises(ValueError):
        TrainConfig(repeat_factor=-0.1)


def test_pretrain_samples_rare_class_images_more_often(data_cache, tmp_path, capsys):
    """On the tiny DigitScapes pretrain repeats the labeled images of rare digits, caches their class presence
    beside the prior, and fingerprints the setting (switched off, the run is no longer up to date)."""
    run = tmp_path / "rfs"
    args = ["pretrain", "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu"]
    args += ["--set", "train.steps=2", "--set", "train.val_every=100"]
    assert run_cli([*args, "--set", "train.repeat_factor=0.5"]) == 0
    out = capsys.readouterr().out
    line = next(s for s in out.splitlines() if s.startswith("repeat-factor sampling"))
    words = line.split(": ", 1)[1].split()  # "N labeled positions an epoch for M images (...)"
    positions, images = int(words[0]), int(words[6])
    assert positions > images  # some image was repeated
    cache = json.loads((run / "class_prior.json").read_text())
    presence = next(v for k, v in cache.items() if k.startswith("presence|"))
    assert len(presence) == images and all(0 in row for row in presence)  # background in every image
    manifest = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert manifest["inputs"]["train"]["repeat_factor"] == 0.5
    assert run_cli([*args, "--set", "train.repeat_factor=0.5"]) == 0
    assert "up to date" in capsys.readouterr().out
    assert run_cli([*args, "--set", "train.repeat_factor=0"]) == 0
    assert "up to date" not in capsys.readouterr().out  # without it, another run


def test_selftrain_labeled_batches_follow_the_repeated_epoch(data_cache, tmp_path):
    """A round's labeled stream walks the repeated epoch: over one such epoch each labeled image comes as often
    as the index map lists it, and the images of the rarest classes more than once."""
    import torch

    from labelpipe.config import resolve_config
    from labelpipe.context import class_presence, open_context
    from labelpipe.runtime import Runtime
    from labelpipe.training.selftrain_data import round_batches
    from labelpipe.training.setup import labeled_index_map

    config = resolve_config(None, TINY_RECIPE, sets=["train.repeat_factor=0.5", "selftrain.pseudo_source=teacher"])
    ctx = open_context(config, tmp_path / "run", Runtime(device=torch.device("cpu")))
    cfg = config.train
    index_map = labeled_index_map(ctx, cfg, config.seed + 7919)  # round 1's labeled seed
    assert index_map.size > len(ctx.source.split(ctx.roles["labeled"]))
    present = class_presence(ctx, ctx.roles["labeled"])
    rarest = present[:, present.sum(0).argmin()]  # images of the class in the fewest images
    counts = np.bincount(index_map, minlength=present.shape[0])
    assert counts[rarest].min() > 1 >= counts[~rarest].min()
    steps = -(-index_map.size // cfg.batch_size)
    stream = round_batches(ctx, 1, None, cfg, steps, weak_view=False)(0)
    seen = Counter()
    for labeled, _ in stream:
        seen.update(labeled["id"])
    ids = [s.id for s in ctx.source.split(ctx.roles["labeled"])]
    whole_epoch = Counter({ids[i]: int(c) for i, c in enumerate(counts) if c})
    assert sum(seen.values()) >= index_map.size and all(seen[k] >= v for k, v in whole_epoch.items())
