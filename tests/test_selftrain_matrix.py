"""benchmarks/selftrain_matrix.py, the study of issue 14 item 5, without training anything: the commands its
``--dry-run`` lists (recipes, shared pretrains, evaluations on both splits) and its ``--report`` on a
hand-written results.jsonl (means, paired gains, the oracle share, the threshold chosen on target_val)."""

from __future__ import annotations

import importlib.util
import json
import shlex
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "selftrain_matrix.py"


@pytest.fixture(scope="module")
def sm():
    spec = importlib.util.spec_from_file_location("selftrain_matrix", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["selftrain_matrix"] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("selftrain_matrix", None)


def dry_run(sm, capsys, out: Path, *args: str) -> list[list[str]]:
    """The labelpipe commands ``--dry-run`` prints (as argv lists), in order."""
    sm.main(["--dry-run", "--out", str(out), *args])
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line) for line in lines if line.startswith(("labelpipe ", "python "))]


def opt(argv: list[str], name: str) -> str:
    return argv[argv.index(name) + 1]


def sets(argv: list[str]) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]


# The demo's online round of 1,000 steps, as the dry run spells it (before a row's own learning rate).
ONLINE_ROUND_1000 = [
    "selftrain.pseudo_source=teacher",
    "selftrain.method=entropy",
    "selftrain.rounds=1",
    "selftrain.alphas=[0.2]",
    "selftrain.steps=1000",
]


def test_dry_run_lists_the_study_of_one_protocol_and_seed(sm, capsys, tmp_path):
    out = tmp_path / "m"
    cmds = dry_run(sm, capsys, out, "--protocols", "da", "--seeds", "1")
    assert not out.exists()  # a dry run writes nothing

    pretrains = [c for c in cmds if c[:2] == ["labelpipe", "pretrain"]]
    # One pretrain per recipe (keyed by recipe, protocol and seed) and the oracle: the base recipe on all labels.
    assert [(opt(c, "--run"), opt(c, "--config"), opt(c, "--protocol"), opt(c, "--seed")) for c in pretrains] == [
        (str(out / "pretrains" / "digitscapes_dars-da-s1"), "stages/digitscapes_dars.yaml", "da", "1"),
        (str(out / "pretrains" / "digitscapes_dars-oracle-s1"), "stages/digitscapes_dars.yaml", "oracle", "1"),
        (str(out / "pretrains" / "digitscapes_source_only-da-s1"), "stages/digitscapes_source_only.yaml", "da", "1"),
        (
            str(out / "pretrains" / "digitscapes_source_only-oracle-s1"),
            "stages/digitscapes_source_only.yaml",
            "oracle",
            "1",
        ),
        (
            str(out / "pretrains" / "digitscapes_oracle_long-oracle-s1"),
            "stages/digitscapes_oracle_long.yaml",
            "oracle",
            "1",
        ),
        (str(out / "pretrains" / "digitscapes_oracle_long-da-s1"), "stages/digitscapes_oracle_long.yaml", "da", "1"),
        (
            str(out / "pretrains" / "digitscapes_source_only_c3-da-s1"),
            "stages/digitscapes_source_only_c3.yaml",
            "da",
            "1",
        ),
        (str(out / "pretrains" / "digitscapes_rectify-da-s1"), "stages/digitscapes_rectify.yaml", "da", "1"),
        (str(out / "pretrains" / "digitscapes_rectify_c3-da-s1"), "stages/digitscapes_rectify_c3.yaml", "da", "1"),
        (str(out / "pretrains" / "digitscapes_u2pl-da-s1"), "stages/digitscapes_u2pl.yaml", "da", "1"),
    ]

    selftrains = {Path(opt(c, "--run")).name: c for c in cmds if c[:2] == ["labelpipe", "selftrain"]}
    expected = {
        "control": ("digitscapes_dars", ["selftrain.unsup_weight=0"]),
        "st-0.9": ("digitscapes_dars", ["selftrain.method=threshold", "pseudolabel.tau=0.9"]),
        "cbst": ("digitscapes_dars", ["selftrain.method=cbst"]),
        "dars": ("digitscapes_dars", ["selftrain.method=dars"]),
        "rectified": ("digitscapes_rectify", []),
        "u2pl-unreliable": ("digitscapes_u2pl", []),
        "u2pl-reliable": ("digitscapes_u2pl", ["selftrain.contrastive_negative_source=reliable"]),
        "u2pl-nocontrastive": ("digitscapes_u2pl", ["selftrain.contrastive=false"]),
        "everything": ("digitscapes_u2pl", ["selftrain.rectified=true", "selftrain.denoise=true"]),
        "lc1-u2pl-unreliable": ("digitscapes_u2pl", ["selftrain.lambda_contrastive=1.0"]),
        "lc1-u2pl-reliable": (
            "digitscapes_u2pl",
            ["selftrain.lambda_contrastive=1.0", "selftrain.contrastive_negative_source=reliable"],
        ),
        "c3-rectified": ("digitscapes_rectify_c3", []),
        "plateau-online": (
            "digitscapes_source_only",
            [*ONLINE_ROUND_1000, "selftrain.lr=0.0005"],
        ),
        "plateau-online-lr1e-3": (
            "digitscapes_source_only",
            [*ONLINE_ROUND_1000, "selftrain.lr=0.001"],
        ),
        "dropout-rectified": ("digitscapes_rectify", ["selftrain.head_dropout=0.5"]),
        "dropout-sweep-0.9": (
            "digitscapes_rectify",
            [
                "selftrain.method=threshold",
                "selftrain.rectified=false",
                "pseudolabel.tau=0.9",
                "selftrain.head_dropout=0.5",
            ],
        ),
        "c3-sweep-0.9": (
            "digitscapes_rectify_c3",
            ["selftrain.method=threshold", "selftrain.rectified=false", "pseudolabel.tau=0.9"],
        ),
        **{
            f"sweep-{tau}": (
                "digitscapes_rectify",
                ["selftrain.method=threshold", "selftrain.rectified=false", f"pseudolabel.tau={tau}"],
            )
            for tau in (0.5, 0.7, 0.8, 0.9, 0.95)
        },
    }
    for key, (recipe, options) in expected.items():
        c = selftrains[key]
        assert opt(c, "--run") == str(out / "da-s1" / recipe / key)
        assert (opt(c, "--config"), opt(c, "--protocol"), opt(c, "--seed")) == (f"stages/{recipe}.yaml", "da", "1")
        assert sets(c) == options
        # After its recipe's pretrain, which it copies.
        pretrain = next(
            i for i, p in enumerate(cmds) if p[:2] == ["labelpipe", "pretrain"] and f"/{recipe}-da-" in opt(p, "--run")
        )
        assert pretrain < cmds.index(c)
    assert set(selftrains) == {
        *expected,
        "long-online-lr4e-3-3000",
        "online",
        "online-1200",
        "plateau-online-2r",
        "plateau-online-lr2e-3",
        "plateau-online-lr4e-3",
        "plateau-online-lr4e-3-2000",
        "plateau-online-lr4e-3-3000",
        "plateau-online-lr4e-3-3000-classmix",
        "plateau-control",
        "plateau-control-lr4e-3",
        "plateau-online-lr1e-3-1200",
        "plateau-u2pl",
        "plateau-u2pl-reliable",
        "plateau-u2pl-2000",
        "plateau-u2pl-2000-reliable",
        "plateau-u2pl-lc1",
        "plateau-u2pl-lc1-reliable",
        "plateau-control-2000",
        "plateau-control-3000",
        "plateau-u2pl-3000",
        "plateau-u2pl-3000-denoise",
        "plateau-u2pl-3000-cutmix1",
        "plateau-u2pl-3000-denoise-cutmix1",
        "plateau-u2pl-3000-authors",
        "plateau-u2pl-4000-denoise-cutmix1",
        "plateau-online-lr4e-3-4000",
        "plateau-control-4000",
        "plateau-u2pl-4000-denoise-cutmix1-reliable",
        "plateau-u2pl-4000-denoise-cutmix1-classmix",
        "plateau-control-4000-classmix",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-reliable",
        "plateau-online-4000-denoise-cutmix1-classmix",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable",
        "plateau-rectified",
        "plateau-rectified-authors",
        "plateau-rectified-authors-unbalanced",
        "plateau-dars",
        "plateau-dars-0.8",
        "plateau-dars-0.8-2r",
        "plateau-sweep-0.9-2r",
        "plateau-control-lr4e-3-2r",
        "plateau-rectified-2r",
        "plateau-sweep-0.8-2r",
        *(f"plateau-sweep-{tau}" for tau in (0.5, 0.7, 0.8, 0.9, 0.95)),
        "adapted-rectified",
        *(f"adapted-sweep-{tau}" for tau in (0.5, 0.7, 0.8, 0.9, 0.95)),
        "adapted-control",
        "adapted-dars-0.8",
        "plateau-online-classwise-2000",
        "mr-online",
        "mr-rectified",
        *(f"mr-sweep-{tau}" for tau in (0.5, 0.7, 0.8, 0.9, 0.95)),
        "c3mr-online",
        "c3mr-rectified",
        *(f"c3mr-sweep-{tau}" for tau in (0.5, 0.7, 0.8, 0.9, 0.95)),
    }
    # DACS's ClassMix (session 32): the 3,000-step round with one setting more, read against its control.
    assert sets(selftrains["plateau-online-lr4e-3-3000-classmix"]) == [
        *sets(selftrains["plateau-online-lr4e-3-3000"]),
        "selftrain.labeled_classmix_p=1.0",
    ]
    assert sm.plateau_control("plateau-online-lr4e-3-3000-classmix") == "plateau-control-3000"
    assert sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-classmix"]) == [
        *sets(selftrains["plateau-u2pl-4000-denoise-cutmix1"]),
        "selftrain.labeled_classmix_p=1.0",
    ]
    assert sm.plateau_control("plateau-u2pl-4000-denoise-cutmix1-classmix") == "plateau-control-4000-classmix"
    assert sm.plateau_control("plateau-u2pl-4000-denoise-cutmix1") == "plateau-control-4000"  # no ClassMix, its own
    # Session 33: the ClassMix round's negatives ablation and the same round without the contrastive loss.
    classmix = sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-classmix"])
    assert sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-classmix-reliable"]) == [
        *classmix,
        "selftrain.contrastive_negative_source=reliable",
    ]
    assert sets(selftrains["plateau-online-4000-denoise-cutmix1-classmix"]) == [
        s for s in classmix if s not in sm.U2PL_CONTRASTIVE
    ]
    # Session 34: the same ablation at the authors' lambda_c 1, set after (so over) the paper's 0.1.
    lc1 = sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-classmix-lc1"])
    assert lc1 == [*classmix, "selftrain.lambda_contrastive=1.0"]
    for key in (
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable",
    ):
        assert sm.round_settings(sm.BY_KEY[key]).lambda_contrastive == 1.0
    assert sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable"]) == [
        *lc1,
        "selftrain.contrastive_negative_source=reliable",
    ]
    for key in (
        "plateau-u2pl-4000-denoise-cutmix1-classmix-reliable",
        "plateau-online-4000-denoise-cutmix1-classmix",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable",
    ):
        assert sm.plateau_control(key) == "plateau-control-4000-classmix"
    # The class-wise split (session 25): the 2,000-step round with one setting more.
    assert sets(selftrains["plateau-online-classwise-2000"]) == [
        *sets(selftrains["plateau-online-lr4e-3-2000"]),
        "selftrain.online_split=class",
    ]
    # Seed 000's pair after the plateau's online round (its stage 1 an adapted model): round 1 is the
    # `plateau-online-lr4e-3-2000` round, round 2 the pair's offline round, by round_overrides.
    online_2000 = sets(selftrains["plateau-online-lr4e-3-2000"])
    assert sets(selftrains["adapted-rectified"]) == [
        *online_2000,
        "selftrain.rounds=2",
        "selftrain.round_overrides={2: {pseudo_source: stored, alphas: [1.0], lr: 0.004, steps: 1000, "
        "method: variance, rectified: true}}",
    ]
    assert sets(selftrains["adapted-sweep-0.8"])[-1] == (
        "selftrain.round_overrides={2: {pseudo_source: stored, alphas: [1.0], lr: 0.004, steps: 1000, "
        "method: threshold, rectified: false, pseudolabel: {tau: 0.8}}}"
    )
    from labelpipe.config import resolve_config

    recipe = ROOT / "stages/digitscapes_source_only.yaml"
    config = resolve_config(None, recipe, sets=sets(selftrains["adapted-sweep-0.8"]))
    first, second = config.for_round(1), config.for_round(2)
    assert (first.selftrain.pseudo_source, first.selftrain.steps) == ("teacher", 2000)
    # The same pair after a stage 1 with MRNet's head consistency (session 27): round 1 adds the term, round 2
    # goes without it; the stage 1 alone is its own row.
    mr = resolve_config(None, recipe, sets=sets(selftrains["mr-rectified"]))
    assert mr.for_round(1).selftrain.terms == ["supervised", "unsupervised", "consistency"]
    assert (
        mr.for_round(1).selftrain.fingerprint_fields()
        == resolve_config(None, recipe, sets=sets(selftrains["mr-online"])).for_round(1).selftrain.fingerprint_fields()
    )
    assert (mr.for_round(2).selftrain.terms, mr.for_round(2).selftrain.rectified) == (None, True)
    assert (second.selftrain.pseudo_source, second.selftrain.method, second.pseudolabel.tau) == (
        "stored",
        "threshold",
        0.8,
    )
    # Seed 000's pair from the plateau: one offline round (stored labels of every pixel) at the plateau round's
    # learning rate, the rectified loss on the variance labels or CE above a fixed threshold.
    offline = ["selftrain.pseudo_source=stored", "selftrain.alphas=[1.0]", "selftrain.lr=0.004", "selftrain.steps=1000"]
    assert sets(selftrains["plateau-rectified"]) == [*offline, "selftrain.method=variance", "selftrain.rectified=true"]
    # The same pair in the authors' form of the loss (their published command), and DARS as the same offline
    # round at seed 002's last labeling ratio.
    assert sets(selftrains["plateau-rectified-authors"]) == [
        *offline,
        "selftrain.method=variance",
        "selftrain.rectified=true",
        "selftrain.rectified_class_balance=true",
        "selftrain.rectified_max_value=7",
        "selftrain.rectified_kl_direction=aux||main",
        "selftrain.rectified_mean_over=all",
        "selftrain.rectified_aux_weight=0.5",
        "selftrain.rectified_align_corners=true",
    ]
    # Session 17: the authors' form without its class-balance weights, every other option kept.
    assert sets(selftrains["plateau-rectified-authors-unbalanced"]) == [
        option
        for option in sets(selftrains["plateau-rectified-authors"])
        if not option.startswith(("selftrain.rectified_class_balance", "selftrain.rectified_max_value"))
    ]
    assert sets(selftrains["plateau-dars"]) == [
        "selftrain.pseudo_source=stored",
        "selftrain.alphas=[0.5]",
        "selftrain.lr=0.004",
        "selftrain.steps=1000",
        "selftrain.method=dars",
    ]
    assert sets(selftrains["plateau-sweep-0.7"]) == [
        *offline,
        "selftrain.method=threshold",
        "selftrain.rectified=false",
        "pseudolabel.tau=0.7",
    ]
    # U2PL from the plateau: the lr 4e-3 round with the U2PL recipe's contrastive loss; the pair differs only in
    # where the negatives come from.
    contrastive = [
        "selftrain.contrastive=true",
        "selftrain.lambda_contrastive=0.1",
        "selftrain.contrastive_anchors=64",
        "selftrain.contrastive_negatives=50",
        "selftrain.memory_capacity=5000",
    ]
    assert sets(selftrains["plateau-u2pl"]) == [*sets(selftrains["plateau-online-lr4e-3"]), *contrastive]
    assert sets(selftrains["plateau-u2pl-2000"]) == [*sets(selftrains["plateau-online-lr4e-3-2000"]), *contrastive]
    assert sets(selftrains["plateau-u2pl-reliable"]) == [
        *sets(selftrains["plateau-u2pl"]),
        "selftrain.contrastive_negative_source=reliable",
    ]
    assert sets(selftrains["plateau-u2pl-2000-reliable"]) == [
        *sets(selftrains["plateau-u2pl-2000"]),
        "selftrain.contrastive_negative_source=reliable",
    ]
    # The authors' lambda_c 1 (session 24): the 1,000-step U2PL round with the weight overridden, the same pair.
    lambda_c_1 = "selftrain.lambda_contrastive=1.0"
    assert sets(selftrains["plateau-u2pl-lc1"]) == [*sets(selftrains["plateau-u2pl"]), lambda_c_1]
    assert sets(selftrains["plateau-u2pl-lc1-reliable"]) == [
        *sets(selftrains["plateau-u2pl-lc1"]),
        "selftrain.contrastive_negative_source=reliable",
    ]
    assert sm.round_settings(sm.BY_KEY["plateau-u2pl-lc1"]).lambda_contrastive == 1.0
    assert sets(selftrains["plateau-control-lr4e-3"]) == [
        *sets(selftrains["plateau-online-lr4e-3"]),
        "selftrain.unsup_weight=0",
    ]
    # The 2,000-step round's control: its length and learning rate, the pseudo-label loss weighted 0.
    assert sets(selftrains["plateau-control-2000"]) == [
        *sets(selftrains["plateau-online-lr4e-3-2000"]),
        "selftrain.unsup_weight=0",
    ]
    # Session 28: the round 3,000 steps long, U2PL's and the control the same length.
    online_3000 = sets(selftrains["plateau-online-lr4e-3-3000"])
    assert online_3000 == [
        *sets(selftrains["plateau-online-lr4e-3-2000"])[:4],
        "selftrain.steps=3000",
        "selftrain.lr=0.004",
    ]
    assert sets(selftrains["plateau-u2pl-3000"]) == [*online_3000, *contrastive]
    assert sets(selftrains["plateau-control-3000"]) == [*online_3000, "selftrain.unsup_weight=0"]
    assert sm.plateau_control("plateau-u2pl-3000") == sm.plateau_control("plateau-online-lr4e-3-3000")
    assert sm.plateau_control("plateau-online-lr4e-3-3000") == "plateau-control-3000"
    assert sm.U2PL_WITHOUT_CONTRASTIVE["plateau-u2pl-3000"] == "plateau-online-lr4e-3-3000"
    # Session 29: U2PL+'s denoising and the authors' CutMix on every image, one setting more each, same control.
    u2pl_3000 = sets(selftrains["plateau-u2pl-3000"])
    assert sets(selftrains["plateau-u2pl-3000-denoise"]) == [*u2pl_3000, "selftrain.denoise=true"]
    assert sets(selftrains["plateau-u2pl-3000-cutmix1"]) == [*u2pl_3000, "selftrain.cutmix_p=1.0"]
    assert sets(selftrains["plateau-u2pl-3000-denoise-cutmix1"]) == [
        *u2pl_3000,
        "selftrain.denoise=true",
        "selftrain.cutmix_p=1.0",
    ]
    assert sets(selftrains["plateau-u2pl-3000-authors"]) == [
        *sets(selftrains["plateau-u2pl-3000-cutmix1"]),
        "selftrain.contrastive_anchor_source=low_entropy",
        "selftrain.contrastive_average=all_valid",
    ]
    for key in (
        "plateau-u2pl-3000-denoise",
        "plateau-u2pl-3000-cutmix1",
        "plateau-u2pl-3000-denoise-cutmix1",
        "plateau-u2pl-3000-authors",
    ):
        assert sm.plateau_control(key) == "plateau-control-3000" and key in sm.U2PL_WITHOUT_CONTRASTIVE
    # Session 30: target_val's choice among them a third longer; its control and its no-contrastive round as long.
    online_4000 = sets(selftrains["plateau-online-lr4e-3-4000"])
    assert online_4000 == [*online_3000[:4], "selftrain.steps=4000", "selftrain.lr=0.004"]
    assert sets(selftrains["plateau-u2pl-4000-denoise-cutmix1"]) == [
        *online_4000,
        *sets(selftrains["plateau-u2pl-3000-denoise-cutmix1"])[len(online_3000) :],
    ]
    assert sets(selftrains["plateau-control-4000"]) == [*online_4000, "selftrain.unsup_weight=0"]
    assert sm.plateau_control("plateau-u2pl-4000-denoise-cutmix1") == "plateau-control-4000"
    assert sm.U2PL_WITHOUT_CONTRASTIVE["plateau-u2pl-4000-denoise-cutmix1"] == "plateau-online-lr4e-3-4000"
    assert sets(selftrains["plateau-u2pl-4000-denoise-cutmix1-reliable"]) == [
        *sets(selftrains["plateau-u2pl-4000-denoise-cutmix1"]),
        "selftrain.contrastive_negative_source=reliable",
    ]
    assert sm.plateau_control("plateau-u2pl-4000-denoise-cutmix1-reliable") == "plateau-control-4000"
    assert sets(selftrains["plateau-online-lr1e-3-1200"])[4:] == ["selftrain.steps=1200", "selftrain.lr=0.001"]
    assert sets(selftrains["plateau-online-lr4e-3-2000"])[4:] == ["selftrain.steps=2000", "selftrain.lr=0.004"]
    # Two online rounds: one alpha per round.
    assert sets(selftrains["plateau-online-2r"])[2:] == [
        "selftrain.rounds=2",
        "selftrain.alphas=[0.2,0.2]",
        "selftrain.steps=600",
        "selftrain.lr=0.0005",
    ]
    assert (str(out / "da-s1" / "digitscapes_source_only" / "plateau-online-2r"), "round-2", "target_test") in {
        (opt(c, "--run"), opt(c, "--model"), opt(c, "--split")) for c in cmds if c[1] == "evaluate"
    }

    # Every model evaluated on target_val and target_test, the last round of its configuration.
    evals = {(opt(c, "--run"), opt(c, "--model"), opt(c, "--split")) for c in cmds if c[1] == "evaluate"}
    rounds = {"digitscapes_dars": "round-2", "digitscapes_u2pl": "round-1"}
    rounds |= {
        "digitscapes_rectify": "round-1",
        "digitscapes_rectify_c3": "round-1",
        "digitscapes_source_only": "round-1",
    }
    for key, (recipe, _) in expected.items():
        for split in ("target_val", "target_test"):
            assert (str(out / "da-s1" / recipe / key), rounds[recipe], split) in evals
    for p in pretrains:
        assert {(opt(p, "--run"), "pretrain", s) for s in ("target_val", "target_test")} <= evals
    assert len(evals) == 2 * (len(pretrains) + len(selftrains))
    # AdaBN: the baseline (after its pretrain) with BatchNorm re-estimated, through the script itself; and the
    # baseline at its plateau.
    adabn = [c for c in cmds if c[0] == "python"]
    assert adabn == [
        ["python", "benchmarks/selftrain_matrix.py", "--adabn", str(out / f"pretrains/{name}-da-s1")]
        for name in ("digitscapes_dars", "digitscapes_source_only")
    ]
    assert cmds.index(adabn[0]) > cmds.index(pretrains[0])


def test_dry_run_shares_the_oracle_between_protocols_and_selects_by_prefix(sm, capsys, tmp_path):
    out = tmp_path / "m"
    cmds = dry_run(sm, capsys, out, "--seeds", "0", "--configs", "oracle", "u2pl")
    pretrains = [(opt(c, "--run"), opt(c, "--protocol")) for c in cmds if c[1] == "pretrain"]
    assert pretrains == [
        (str(out / "pretrains" / "digitscapes_dars-oracle-s0"), "oracle"),  # once for both protocols
        (str(out / "pretrains" / "digitscapes_u2pl-da-s0"), "da"),
        (str(out / "pretrains" / "digitscapes_u2pl-semi-1_16-s0"), "semi-1_16"),
    ]
    runs = [opt(c, "--run") for c in cmds if c[1] == "selftrain"]
    assert runs == [
        str(out / f"{p}-s0" / "digitscapes_u2pl" / k)
        for p in ("da", "semi-1_16")
        for k in ("u2pl-unreliable", "u2pl-reliable", "u2pl-nocontrastive")
    ]
    with pytest.raises(SystemExit, match="no such configuration"):
        sm.main(["--dry-run", "--out", str(out), "--configs", "nope"])


def test_another_digitscapes_build_reaches_every_command_and_its_records_are_never_mixed(
    sm, monkeypatch, capsys, tmp_path
):
    """--data-seed / --blend: every command of the study (pretrain, evaluate, selftrain) runs on that build, the
    records name it, the report says which build it reads and refuses a file that pairs two builds' seeds."""
    cmds = dry_run(sm, capsys, tmp_path / "m", "--protocols", "da", "--seeds", "0", "--configs", "baseline-plateau")
    assert cmds and not any("data.digitscapes.seed=1" in c for cmd in cmds for c in cmd)  # the recipes' own build
    args = ["--protocols", "da", "--seeds", "0", "--configs", "baseline-plateau", "plateau-u2pl"]
    cmds = dry_run(sm, capsys, tmp_path / "m", *args, "--data-seed", "1", "--blend", "diff")
    assert {c[1] for c in cmds} == {"pretrain", "evaluate", "selftrain"}
    for c in cmds:
        assert {"data.digitscapes.seed=1", "data.digitscapes.blend=diff"} <= set(sets(c)), c
    for style in ("inked", "blended"):  # another source domain
        cmds = dry_run(sm, capsys, tmp_path / style, *args, "--source-style", style)
        assert cmds and all(f"data.digitscapes.source_style={style}" in sets(c) for c in cmds)
        assert sm.record_variant({"data": sm.DataVariant(0, "diff", style).record()}).source_style == style
    cmds = dry_run(sm, capsys, tmp_path / "q", *args, "--source-style", "blended", "--difference-share", "0.25")
    assert cmds and all(
        {"data.digitscapes.source_style=blended", "data.digitscapes.difference_share=0.25"} <= set(sets(c))
        for c in cmds
    )
    quarter = sm.DataVariant(0, "diff", "blended", 0.25)
    assert sm.record_variant({"data": quarter.record()}) == quarter != sm.DataVariant(0, "diff", "blended")
    cmds = dry_run(sm, capsys, tmp_path / "h", *args, "--source-style", "blended", "--difference-share", "0.5")
    assert cmds and not any("difference_share" in s for c in cmds for s in sets(c))  # blended's own share
    with pytest.raises(SystemExit):
        sm.main(["--dry-run", "--out", str(tmp_path / "x"), *args, "--difference-share", "0.25"])

    fake = FakeLabelpipe()
    monkeypatch.setattr(sm.Matrix, "command", lambda self, argv, shown: fake(self, argv, shown))
    sm.main(["--out", str(tmp_path), *args[:5], "baseline", "--data-seed", "2"])
    rec = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    assert rec["data"] == {"digitscapes_seed": 2, "blend": "alpha"}
    assert sm.record_variant(rec) == sm.DataVariant(2, "alpha", "textured")
    assert "DigitScapes seed 2, alpha blend. mIoU in %" in capsys.readouterr().out

    with (tmp_path / "results.jsonl").open("a") as fh:  # a record of the recipes' own build (no data field)
        fh.write(json.dumps(record("baseline", 1, 0.3, 0.3)) + "\n")
    with pytest.raises(SystemExit, match="seed 0, alpha blend and DigitScapes seed 2"):
        sm.main(["--report", "--out", str(tmp_path)])


def test_configurations_only_set_round_settings_and_resolve(sm):
    with pytest.raises(ValueError, match="not round settings"):
        sm.Config("x", "x", sm.DARS_RECIPE, sets=("train.steps=5",))  # would break the shared pretrain
    from labelpipe.config import resolve_config

    for config in sm.CONFIGS:
        for protocol in ("da", "semi-1_16"):
            cfg = resolve_config(
                None, ROOT / sm.recipe_path(config.recipe), {"data": {"protocol": protocol}}, config.sets
            )
            assert cfg.selftrain == sm.round_settings(config)
    rectified = resolve_config(None, ROOT / "stages/digitscapes_rectify.yaml", None, sm.BY_KEY["sweep-0.8"].sets)
    assert (rectified.selftrain.method, rectified.selftrain.rectified, rectified.pseudolabel.tau) == (
        "threshold",
        False,
        0.8,
    )


def record(config: str, seed: int, test: float, val: float, tail: float | None = None, **extra) -> dict:
    return {
        "protocol": "da",
        "seed": seed,
        "config": config,
        "val_miou": val,
        "test_miou": test,
        "test_tail_miou": tail,
        **extra,
    }


def write_results(path: Path) -> None:
    """Three seeds of DA; the sweep's best on target_val (tau 0.7) is not its best on target_test (0.9)."""
    rows = [record("control", 0, 0.10, 0.10)]  # superseded by the later record of the same run
    tests = {
        "u2pl-unreliable": (0.40, 0.42, 0.41),
        "baseline": (0.30, 0.32, 0.31),
        "oracle": (0.50, 0.52, 0.51),
        "adabn": (0.31, 0.33, 0.32),
        "control": (0.33, 0.34, 0.35),
        "st-0.9": (0.34, 0.35, 0.36),
        "dars": (0.36, 0.36, 0.37),
        "rectified": (0.35, 0.355, 0.36),
        "sweep-0.5": (0.30,) * 3,
        "sweep-0.7": (0.33,) * 3,
        "sweep-0.8": (0.34,) * 3,
        "sweep-0.9": (0.37,) * 3,
        "sweep-0.95": (0.32,) * 3,
        "u2pl-reliable": (0.39, 0.40, 0.41),
    }
    vals = {"sweep-0.5": 0.30, "sweep-0.7": 0.36, "sweep-0.8": 0.34, "sweep-0.9": 0.33, "sweep-0.95": 0.31}
    vals |= {"u2pl-unreliable": 0.40, "oracle": 0.60}  # the oracle is no self-training configuration
    tails = {"st-0.9": (0.22, 0.24, 0.23), "dars": (0.27, 0.28, 0.29)}
    precision = [
        {"background": 1.0, "digit-0": 0.5, "digit-1": 0.6},
        {"background": 0.98, "digit-0": 0.7, "digit-1": None},
        {"background": 0.99, "digit-0": 0.6, "digit-1": 0.8},
    ]
    for key, values in tests.items():
        for seed, test in enumerate(values):
            extra = {}
            if key == "control":
                extra["pseudo_labels"] = {"kept_fraction": 0.2, "per_class": precision[seed]}
            tail = tails.get(key, (None,) * 3)[seed]
            rows.append(record(key, seed, test, vals.get(key, 0.2), tail, stage_wall_s=540.0, **extra))
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_report(sm, capsys, out: Path, rows: list[dict]) -> str:
    """``--report``'s output on ``rows`` written as ``out``/results.jsonl."""
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm.main(["--report", "--out", str(out)])
    return capsys.readouterr().out


def table_row(text: str, key: str) -> list[str]:
    line = next(line for line in text.splitlines() if f"(`{key}`) |" in line)
    return [cell.strip() for cell in line.split("|")[1:-1]]


def test_report_means_paired_gains_and_the_threshold_chosen_on_val(sm, capsys, tmp_path):
    write_results(tmp_path / "results.jsonl")
    sm.main(["--report", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| target_val mIoU | target_test mIoU | target_test tail mIoU |" in text

    # The order, whatever the file's.
    order = [text.index(f"(`{k}`) |") for k in ("baseline", "oracle", "adabn", "control", "dars", "rectified")]
    assert order == sorted(order)
    assert text.index("(`sweep-0.95`) |") < text.index("(`u2pl-unreliable`) |") < text.index("(`u2pl-reliable`) |")

    baseline = table_row(text, "baseline")
    assert baseline[1:5] == ["digitscapes_dars", "3", "20.0 ± 0.0", "31.0 ± 1.0"]  # recipe, seeds, val, test
    assert (baseline[6], baseline[7], baseline[9]) == ("-", "-1.0 ± 0.0 (3)", "-")  # vs AdaBN: -1 each seed
    control = table_row(text, "control")  # its seed-0 record of 10 % was superseded
    assert control[4] == "34.0 ± 1.0"
    assert control[6] == "+3.0 ± 1.0 (3)"  # paired: 3, 2, 4 points over the baseline
    assert control[7] == "+2.0 ± 1.0 (3)"  # over AdaBN: 2, 1, 3
    assert control[8] == "-"
    assert control[9] == "15 ± 5 % (3)"  # 3/20, 2/20, 4/20 of the oracle gap
    assert control[10] == "9.0"  # minutes
    assert control[11] == "99 / 60 70"  # per-class precision, mean over the seeds that kept the class
    dars = table_row(text, "dars")
    assert dars[8] == "+2.3 ± 0.6 (3)"  # over the control: 3, 2, 2
    u2pl = table_row(text, "u2pl-unreliable")
    assert (u2pl[3], u2pl[6], u2pl[9]) == ("40.0 ± 0.0", "+10.0 ± 0.0 (3)", "50 ± 0 % (3)")

    # The fixed threshold is chosen on target_val (0.7), not on target_test (0.9 there).
    assert "**tau 0.7**" in text
    rect = next(line for line in text.splitlines() if line.startswith("| rectified vs the best fixed threshold"))
    assert "`rectified` - `sweep-0.7`" in rect
    assert "| +2.5 ± 0.5 (3) |" in rect  # 35 - 33, 35.5 - 33, 36 - 33
    dars_vs_st = next(line for line in text.splitlines() if line.startswith("| DARS vs threshold-ST"))
    assert dars_vs_st.endswith("| +1.3 ± 0.6 (3) | +5.0 ± 1.0 (3) |")  # mIoU 2, 1, 1; tail 5, 4, 6
    negatives = next(line for line in text.splitlines() if line.startswith("| U2PL: unreliable vs reliable-only"))
    assert "| +1.0 ± 1.0 (3) |" in negatives  # 1, 2, 0
    # The best self-training configuration on target_val (the oracle's higher val does not count).
    assert "(`u2pl-unreliable`)." in text
    vs_adabn = next(line for line in text.splitlines() if line.startswith("| best on target_val vs AdaBN"))
    assert "| +9.0 ± 0.0 (3) |" in vs_adabn


def test_report_without_results_is_a_clean_error(sm, tmp_path):
    with pytest.raises(SystemExit, match="no results; run the matrix first"):
        sm.main(["--report", "--out", str(tmp_path)])


def test_adabn_row_reuses_adabn_control_on_a_run(sm, pretrained_run, tmp_path):
    """``--adabn RUN`` (the AdaBN row) runs adabn_control's functions on a trained run (the suite's 6-step
    model; nothing trained here) and writes both splits' mIoU and per-class IoU to matrix/adabn.json."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    sm.main(["--adabn", str(run)])
    out = json.loads((run / "matrix" / "adabn.json").read_text())
    assert out["unlabeled"] == "target_train"  # the DA protocol's unlabeled split
    for split in ("target_val", "target_test"):
        assert 0.0 <= out[split]["miou"] <= 1.0
        per_class = out[split]["per_class_iou"]  # the per-class table's AdaBN row
        assert list(per_class)[0] == "background" and len(per_class) == 11
        present = [v for v in per_class.values() if v is not None]
        assert np.isclose(np.mean(present), out[split]["miou"])


class FakeLabelpipe:
    """Stands in for the CLI: writes what each stage would (weights, manifests, metrics, the pseudo-label
    report) so that the driver's own logic (copies, skips, records) runs for real without training."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.weights = b"pretrained"
        self.shift = 0.0  # added to every mIoU an evaluation reports

    @staticmethod
    def write(path: Path, content: bytes) -> None:
        """A stage up to date leaves its files alone (their mtimes are what the driver's skips read)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists() or path.read_bytes() != content:
            path.write_bytes(content)

    def __call__(self, matrix, argv: list[str], shown: list[str]) -> None:
        self.calls.append(shown)
        run = Path(opt(shown, "--adabn" if shown[0] == "python" else "--run"))
        if shown[0] == "python":
            (run / "matrix").mkdir(exist_ok=True)
            split = {"miou": 0.33, "tail_miou": 0.2}
            (run / "matrix" / "adabn.json").write_text(json.dumps({"target_val": split, "target_test": split}))
        elif shown[1] == "pretrain":
            for name in ("model.safetensors", "checkpoint.pt"):
                self.write(run / "pretrain" / name, self.weights)
            self.write(run / "pretrain" / "manifest.json", json.dumps({"status": "done", "wall_s": 120.0}).encode())
        elif shown[1] == "selftrain":
            rounds = 1 if "selftrain.rounds=1" in sets(shown) else 2
            for k in range(1, rounds + 1):
                round_dir = run / "selftrain" / f"round-{k}"
                for stage in ("predict", "pseudolabel", "train"):
                    self.write(
                        round_dir / stage / "manifest.json", json.dumps({"status": "done", "wall_s": 60.0}).encode()
                    )
                self.write(round_dir / "train" / "model.safetensors", b"round")
                report = {
                    "kept_fraction": 0.2,
                    "kl_prior_pseudo": 0.03,
                    "error_auroc_conf": 0.9,
                    "error_auroc_variance": 0.6,
                    "per_class": {"background": {"precision": 1.0}, "digit-0": {}},
                }
                self.write(round_dir / "pseudolabel" / "report.json", json.dumps(report).encode())
        elif shown[1] == "evaluate":
            model, split = opt(shown, "--model"), opt(shown, "--split")
            miou = {"target_val": 0.3, "target_test": 0.4}[split] + (0.05 if model != "pretrain" else 0.0) + self.shift
            (run / "evaluate" / model).mkdir(parents=True, exist_ok=True)
            metrics = {"split": split, "model": model, "miou": miou, "tail_miou": 0.1, "per_class_iou": {}}
            (run / "evaluate" / model / "metrics.json").write_text(json.dumps(metrics))


def test_a_matrix_records_both_splits_resumes_and_restarts_configurations_of_a_redone_pretrain(
    sm, monkeypatch, capsys, tmp_path
):
    fake = FakeLabelpipe()
    monkeypatch.setattr(sm.Matrix, "command", lambda self, argv, shown: fake(self, argv, shown))
    args = ["--out", str(tmp_path), "--protocols", "da", "--seeds", "0", "--configs", "baseline", "adabn", "control"]
    args += ["online"]
    sm.main(args)
    records = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    by_key = {r["config"]: r for r in records}
    assert list(by_key) == ["baseline", "adabn", "control", "online"]
    assert (by_key["baseline"]["val_miou"], by_key["baseline"]["test_miou"]) == (0.3, 0.4)
    assert (by_key["control"]["model"], by_key["control"]["val_miou"], by_key["control"]["test_miou"]) == (
        "round-2",
        0.35,
        0.45,
    )
    assert by_key["control"]["stage_wall_s"] == 6 * 60.0  # two rounds of predict, pseudolabel, train
    assert by_key["control"]["pseudo_labels"]["per_class"] == {"background": 1.0, "digit-0": None}
    assert (
        by_key["control"]["pseudo_labels"]["kept_fraction"],
        by_key["control"]["pseudo_labels"]["kl_prior_pseudo"],
    ) == (
        0.2,
        0.03,
    )
    labels = by_key["control"]["pseudo_labels"]
    assert (labels["error_auroc_conf"], labels["error_auroc_variance"]) == (0.9, 0.6)  # the report's error ranking
    assert by_key["online"]["model"] == "round-1" and by_key["online"]["pseudo_labels"] is None  # online labels
    assert by_key["adabn"]["test_miou"] == 0.33
    control = tmp_path / "da-s0" / "digitscapes_dars" / "control"
    assert (control / "pretrain" / "model.safetensors").read_bytes() == b"pretrained"
    text = capsys.readouterr().out
    assert "| control: the rounds without pseudo-label loss (`control`) |" in text
    assert "on **target_val**: **online mean teacher" in text  # the control (as high on val) is no candidate

    # Continued: stages are asked again (each skips itself when up to date), evaluations and AdaBN are not, and
    # the same results are not recorded twice.
    fake.calls.clear()
    sm.main(args)
    assert sorted({c[1] for c in fake.calls}) == ["pretrain", "selftrain"]
    assert (tmp_path / "results.jsonl").read_text().splitlines() == [json.dumps(r) for r in records]

    # The shared pretrain redone (say its recipe changed): the configurations that copied it start again.
    fake.weights = b"pretrained again"
    fake.shift = 0.01  # and its models score otherwise
    fake.calls.clear()
    (control / "stale").write_text("")
    sm.main(args)
    assert not (control / "stale").exists()
    assert (control / "pretrain" / "model.safetensors").read_bytes() == b"pretrained again"
    evaluated = {(Path(opt(c, "--run")).name, opt(c, "--split")) for c in fake.calls if c[1] == "evaluate"}
    assert evaluated == {(n, s) for n in ("digitscapes_dars-da-s0", "control", "online") for s in sm.SPLITS}
    # the changed results are recorded after the first ones (the report reads the last record of each)
    added = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()[len(records) :]]
    assert sorted((r["config"], round(r["test_miou"], 2)) for r in added) == [
        ("baseline", 0.41),
        ("control", 0.46),
        ("online", 0.46),
    ]


def test_threshold_choice_compares_the_sweep_on_the_seeds_every_threshold_ran(sm, capsys, tmp_path):
    """Seed 0 ran the whole sweep, seeds 1-2 only tau 0.9. Over all of each tau's seeds, 0.8 (seed 0 only,
    an easy seed) would win on target_val; over seed 0, the seed every tau ran, 0.9 does."""
    vals = {"sweep-0.5": 0.38, "sweep-0.7": 0.39, "sweep-0.8": 0.393, "sweep-0.9": 0.396, "sweep-0.95": 0.395}
    rows = [record(key, 0, val, val) for key, val in vals.items()]
    rows += [record("sweep-0.9", seed, 0.38, 0.38) for seed in (1, 2)]
    rows += [record("rectified", seed, 0.37, 0.37) for seed in (0, 1, 2)]
    text = run_report(sm, capsys, tmp_path, rows)
    assert "over seeds 0, the ones every threshold ran" in text
    assert "**tau 0.9**" in text
    rect = next(line for line in text.splitlines() if line.startswith("| rectified vs the best fixed threshold"))
    assert "`rectified` - `sweep-0.9`" in rect
    assert "(3) |" in rect  # paired over the three seeds both ran


def test_a_whole_key_selects_only_itself_a_prefix_every_key_it_starts(sm):
    keys = lambda *names: [c.key for c in sm.select(list(names))]  # noqa: E731
    assert keys("sweep-0.9") == ["sweep-0.9"]  # not also sweep-0.95
    assert keys("sweep-0.9", "sweep-0.95") == ["sweep-0.9", "sweep-0.95"]
    assert keys("sweep") == [f"sweep-{tau}" for tau in sm.TAUS]
    assert keys("u2pl") == ["u2pl-unreliable", "u2pl-reliable", "u2pl-nocontrastive"]
    assert keys("lc1") == ["lc1-u2pl-unreliable", "lc1-u2pl-reliable"]
    with pytest.raises(SystemExit, match="sweep-0.6"):
        sm.select(["sweep-0.6"])


def test_semi_reads_the_oracle_recorded_with_da(sm, capsys, tmp_path):
    """One oracle run per seed serves both protocols: a semi table whose records came from a call that ran
    only the semi configurations still has its oracle row and gap shares."""
    rows = [record("oracle", seed, 0.50, 0.50) for seed in (0, 1)]
    for seed in (0, 1):
        rows += [
            {**record("baseline", seed, 0.20, 0.20), "protocol": "semi-1_16"},
            {**record("u2pl-unreliable", seed, 0.23 + 0.01 * seed, 0.23), "protocol": "semi-1_16"},
        ]
    text = run_report(sm, capsys, tmp_path, rows)
    semi = text[text.index("### semi-1_16") :]
    assert table_row(semi, "oracle")[4] == "50.0 ± 0.0"
    assert table_row(semi, "u2pl-unreliable")[9] == "12 ± 2 % (2)"  # 3/30 and 4/30 of the gap


def test_the_best_configuration_is_chosen_among_those_run_on_every_seed(sm, capsys, tmp_path):
    """A configuration run on fewer seeds (here u2pl-unreliable on seed 0 only, the best val there) neither
    wins the choice nor narrows the others' means to its seeds; the line names it."""
    write_results(tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["config"] != "u2pl-unreliable" or r["seed"] == 0]
    for r in rows:
        if r["config"] == "u2pl-unreliable":
            r["val_miou"] = 0.9
        if r["config"] == "dars":  # the best val of the 3-seed configurations
            r["val_miou"] = 0.5
    text = run_report(sm, capsys, tmp_path, rows)
    assert "(among those run on all 3 seeds; not u2pl-unreliable): **DARS + CE** (`dars`)." in text


def test_the_plateau_family_is_read_against_its_own_baseline_adabn_and_oracle(sm, capsys, tmp_path):
    """Rows of the plateau recipe: gains against the plateau baseline and its AdaBN and its control,
    the gap share against the oracle trained as long (shared with semi like the other oracle), their own
    choice on target_val, and item 0's source-only share of the oracle for both families."""
    write_results(tmp_path / "results.jsonl")
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    plateau = {
        "baseline-plateau": (0.36, 0.37, 0.38),
        "oracle-plateau": (0.56, 0.57, 0.58),
        "adabn-plateau": (0.37, 0.37, 0.39),
        "plateau-online": (0.44, 0.46, 0.47),
        "plateau-online-2r": (0.46, 0.47, 0.49),
        "plateau-control": (0.38, 0.40, 0.40),
    }
    vals = {"plateau-online": 0.45, "plateau-online-2r": 0.44}  # 2r is better on test, not on val
    for key, tests in plateau.items():
        rows += [record(key, seed, test, vals.get(key, 0.3)) for seed, test in enumerate(tests)]
    rows += [{**record("baseline-plateau", 0, 0.30, 0.3), "protocol": "semi-1_16"}]
    text = run_report(sm, capsys, tmp_path, rows)
    da = text[: text.index("### semi-1_16")]
    online = table_row(da, "plateau-online")
    assert online[6:10] == ["+8.7 ± 0.6 (3)", "+8.0 ± 1.0 (3)", "+6.3 ± 0.6 (3)", "43 ± 3 % (3)"]  # 8/20, 9/20, 9/20
    assert table_row(da, "plateau-control")[6] == "+2.3 ± 0.6 (3)"  # a row of its own, never the best choice
    assert table_row(da, "u2pl-unreliable")[9] == "50 ± 0 % (3)"  # the 1,000-step family unchanged
    assert "Best self-training from the baseline at its plateau on **target_val**" in da
    assert "(`plateau-online`)." in da  # chosen on val, not 2r (better on test)
    claim = next(
        line for line in da.splitlines() if line.startswith("| best from the plateau on target_val vs the baseline")
    )
    assert "`plateau-online` - `baseline-plateau`" in claim and "| 002, 000: target >= +10 | +8.7 ± 0.6 (3) |" in claim
    vs_adabn = next(
        line for line in da.splitlines() if line.startswith("| best from the plateau on target_val vs AdaBN")
    )
    assert "| target >= +8 | +8.0 ± 1.0 (3) |" in vs_adabn
    vs_control = next(
        line for line in da.splitlines() if line.startswith("| best from the plateau on target_val vs its")
    )
    assert "`plateau-online` - `plateau-control`" in vs_control and "| +6.3 ± 0.6 (3) |" in vs_control
    assert "| `plateau-online-2r` vs the baseline at its plateau (`plateau-online-2r` - `baseline-plateau`) |" in da
    assert "`baseline-plateau` as a share of `oracle-plateau` (target_test; item 0: <= 70 %), per seed: " in da
    assert "64.9 ± 0.6 % (64, 65, 66)" in da  # 36/56, 37/57, 38/58
    assert "`baseline` as a share of `oracle` (target_test; item 0: <= 70 %), per seed: 60.8 ± 0.8 % (60, 62, 61)" in da
    semi = text[text.index("### semi-1_16") :]
    assert "`baseline-plateau` as a share of `oracle-plateau`" in semi and "(54)" in semi  # the DA-run oracle


def test_semi_reads_u2pl_from_the_plateau_against_its_claim_and_its_negatives(sm, capsys, tmp_path):
    """Semi 1/16's claim (001, 003) on U2PL from the plateau: its gain over the plateau baseline, its share of the
    gap to the oracle trained as long, and the unreliable vs reliable-only negatives pair of the same round."""
    tests = {
        "baseline-plateau": (0.24, 0.25, 0.26),
        "oracle-plateau": (0.60, 0.61, 0.62),
        "plateau-online-lr4e-3": (0.33, 0.34, 0.35),
        "plateau-u2pl": (0.35, 0.37, 0.36),
        "plateau-u2pl-reliable": (0.34, 0.35, 0.36),
    }
    rows = [
        {**record(key, seed, test, 0.3), "protocol": "oracle" if key.startswith("oracle") else "semi-1_16"}
        for key, values in tests.items()
        for seed, test in enumerate(values)
    ]
    semi = run_report(sm, capsys, tmp_path, rows)
    claim = next(line for line in semi.splitlines() if line.startswith("| U2PL from the plateau (round length"))
    assert "(`plateau-u2pl` - `baseline-plateau`)" in claim
    assert "| 001, 003: target >= +10, >= 1/3 of the oracle gap | +11.0 ± 1.0 (3) |" in claim
    assert table_row(semi, "plateau-u2pl")[9] == "31 ± 3 % (3)"  # 11/36, 12/36, 10/36
    negatives = next(line for line in semi.splitlines() if line.startswith("| U2PL from the plateau: unreliable"))
    assert "`plateau-u2pl` - `plateau-u2pl-reliable`" in negatives and "| +1.0 ± 1.0 (3) |" in negatives
    without = next(line for line in semi.splitlines() if "without the contrastive loss (`plateau-u2pl`" in line)
    assert "| +2.0 ± 1.0 (3) |" in without


def test_gap_shares_are_also_read_against_the_oracle_trained_twice_as_long(sm, capsys, tmp_path):
    """Session 30: with the 6,000-step oracle recorded, U2PL's chosen round gets its share of the gap to that oracle
    beside the share to the 3,000-step one, per seed, and the long oracle its own plateau check."""
    tests = {
        "baseline-plateau": (0.24, 0.25, 0.26),
        "oracle-plateau": (0.60, 0.61, 0.62),
        "oracle-plateau-6000": (0.64, 0.65, 0.66),
        "plateau-u2pl": (0.36, 0.37, 0.38),
    }
    rows = [
        {**record(key, seed, test, 0.3), "protocol": "oracle" if key.startswith("oracle") else "semi-1_16"}
        for key, values in tests.items()
        for seed, test in enumerate(values)
    ]
    rows[6]["val_curve"] = [[1500, 0.60], [4500, 0.62], [6000, 0.625]]  # the long oracle's seed 0
    semi = run_report(sm, capsys, tmp_path, rows)
    # 12/36 of the gap to the 3,000-step oracle, 12/40 to the one twice as long.
    assert "`plateau-u2pl`'s share of the gap: 30 ± 0 % (3) to `oracle-plateau-6000` (33 ± 0 % (3) to" in semi
    assert "Plateau check of `oracle-plateau-6000` (item 2: < 1 point): " in semi and "per seed: +0.5." in semi
    assert table_row(semi, "plateau-u2pl")[9] == "33 ± 0 % (3)"  # the table keeps the oracle trained as long


def test_the_u2pl_claim_reads_the_round_length_chosen_on_val_not_on_test(sm, capsys, tmp_path):
    """Between U2PL's 1,000- and 2,000-step rounds from the plateau, target_val chooses the claim's row, even
    where target_test would favour the other."""
    tests = {
        "baseline-plateau": 0.30,
        "plateau-u2pl": 0.45,
        "plateau-u2pl-2000": 0.42,
        "plateau-online-lr4e-3-2000": 0.44,
    }
    vals = {
        "baseline-plateau": 0.30,
        "plateau-u2pl": 0.36,
        "plateau-u2pl-2000": 0.40,
        "plateau-online-lr4e-3-2000": 0.41,
    }
    rows = [
        {**record(key, seed, tests[key] + seed / 100, vals[key]), "protocol": "semi-1_16-stratified"}
        for key in tests
        for seed in range(3)
    ]
    text = run_report(sm, capsys, tmp_path, rows)
    assert "U2PL's round (length, lambda_c) from the plateau chosen on **target_val** (`plateau-u2pl`: 36.0, " in text
    assert "`plateau-u2pl-2000`: 40.0): **`plateau-u2pl-2000`**." in text
    claim = next(line for line in text.splitlines() if line.startswith("| U2PL from the plateau (round length"))
    assert "(`plateau-u2pl-2000` - `baseline-plateau`) | 001, 003: target >= +10" in claim
    assert "| +12.0 ± 0.0 (3) |" in claim
    without = next(line for line in text.splitlines() if line.startswith("| U2PL from the plateau, 2,000 steps, vs"))
    assert "(`plateau-u2pl-2000` - `plateau-online-lr4e-3-2000`) |  | -2.0 ± 0.0 (3) |" in without
    # The other length keeps its own row against the baseline.
    assert "| `plateau-u2pl` vs the baseline at its plateau (`plateau-u2pl` - `baseline-plateau`) |" in text


def test_rectified_from_the_plateau_is_read_against_its_own_sweep_chosen_on_val(sm, capsys, tmp_path):
    """The plateau's sweep is chosen on target_val apart from the rectify recipe's sweep; the claim row pairs
    the plateau's rectified round with that choice."""
    val = {0.5: 0.30, 0.7: 0.40, 0.8: 0.45, 0.9: 0.44, 0.95: 0.41}  # 0.8 on val
    test = {0.5: 0.40, 0.7: 0.46, 0.8: 0.47, 0.9: 0.49, 0.95: 0.45}  # 0.9 on test
    rows = [record("sweep-0.5", s, 0.30, 0.50) for s in range(3)]  # the other sweep's choice: 0.5
    rows += [record(f"plateau-sweep-{tau}", s, test[tau] + s / 100, val[tau]) for tau in val for s in range(3)]
    rows += [record("plateau-rectified", s, 0.48 + s / 200, 0.43) for s in range(3)]
    text = run_report(sm, capsys, tmp_path, rows)
    assert "Fixed threshold of the sweep chosen on **target_val** (" in text and "**tau 0.5**." in text
    assert "Fixed threshold of the sweep from the plateau chosen on **target_val** (" in text
    assert "0.7: 40.0, 0.8: 45.0, 0.9: 44.0, 0.95: 41.0): **tau 0.8**." in text
    claim = next(line for line in text.splitlines() if line.startswith("| rectified from the plateau vs"))
    # 48 - 47, 48.5 - 48, 49 - 49
    assert "`plateau-rectified` - `plateau-sweep-0.8`" in claim and "| 000 Table 5: +1.9 | +0.5 ± 0.5 (3) |" in claim


def test_dars_and_the_authors_rectified_loss_from_the_plateau_are_read_against_the_plateau_sweep(sm, capsys, tmp_path):
    """DARS from the plateau, its labeling ratio chosen on target_val, pairs with the plateau's threshold-ST at
    0.9 (mIoU and tail), whatever tau target_val picks; the authors' rectified loss with the tau target_val
    picks, and with the paper's form."""
    val = {0.5: 0.30, 0.7: 0.40, 0.8: 0.45, 0.9: 0.44, 0.95: 0.41}  # 0.8 on val
    rows = [record(f"plateau-sweep-{tau}", s, 0.47, v, tail=0.25) for tau, v in val.items() for s in range(3)]
    rows += [record("plateau-rectified", s, 0.46, 0.40) for s in range(3)]
    rows += [record("plateau-rectified-authors", s, 0.48 + s / 100, 0.40) for s in range(3)]
    rows += [record("plateau-dars", s, 0.40, 0.39, tail=0.40) for s in range(3)]  # the ratio val does not pick
    rows += [record("plateau-dars-0.8", s, 0.47 + s / 100, 0.40, tail=0.30 + s / 100) for s in range(3)]
    lines = run_report(sm, capsys, tmp_path, rows).splitlines()
    dars = next(line for line in lines if line.startswith("| DARS from the plateau (alpha and rounds chosen on"))
    text = "\n".join(lines)
    assert "chosen on **target_val** (`plateau-dars`: 39.0, `plateau-dars-0.8`: 40.0): **`plateau-dars-0.8`**." in text
    assert (
        "`plateau-dars-0.8` - `plateau-sweep-0.9`" in dars and "| 002 Table 4: tail +3.9; target: tail >= +3 |" in dars
    )
    assert "| +1.0 ± 1.0 (3) | +6.0 ± 1.0 (3) |" in dars  # tail: 30 - 25, 31 - 25, 32 - 25
    authors = next(line for line in lines if line.startswith("| rectified in the authors' form from the plateau"))
    assert "`plateau-rectified-authors` - `plateau-sweep-0.8`" in authors and "| +2.0 ± 1.0 (3) |" in authors
    forms = next(line for line in lines if line.startswith("| rectified from the plateau: the authors' form"))
    assert "`plateau-rectified-authors` - `plateau-rectified`" in forms and "| +3.0 ± 1.0 (3) |" in forms


def test_2000_step_rounds_read_their_own_control_and_negatives_and_the_rectified_form_is_chosen_on_val(
    sm, capsys, tmp_path
):
    """Session 17's rows: a 2,000-step round's control column is the control of its own length (never a
    candidate for the best round), U2PL over 2,000 steps pairs with its reliable-only ablation, and the rectified
    loss's form is chosen on target_val even where target_test favours another."""
    tests = {
        "baseline-plateau": 0.30,
        "plateau-control": 0.31,
        "plateau-control-2000": 0.33,
        "plateau-control-lr4e-3": 0.35,
        "plateau-online-lr4e-3-2000": 0.44,
        "plateau-u2pl-2000": 0.42,
        "plateau-u2pl-2000-reliable": 0.41,
        "plateau-rectified": 0.47,
        "plateau-rectified-authors": 0.30,
        "plateau-rectified-authors-unbalanced": 0.45,
        "plateau-sweep-0.9": 0.46,
    }
    vals = {
        **tests,
        "plateau-control-2000": 0.60,
        "plateau-rectified": 0.44,
        "plateau-rectified-authors-unbalanced": 0.46,
    }
    rows = [record(key, seed, tests[key] + seed / 100, vals[key]) for key in tests for seed in range(3)]
    # A protocol without the lr 4e-3 control: its lr 4e-3 round falls back to the lr 2e-3 one.
    semi = {"plateau-u2pl": 0.40, "plateau-control": 0.32}
    rows += [{**record(k, seed, v, v), "protocol": "semi-1_16"} for k, v in semi.items() for seed in range(3)]
    text, semi_text = run_report(sm, capsys, tmp_path, rows).split("### semi-1_16")
    lines = text.splitlines()
    assert table_row(semi_text, "plateau-u2pl")[8] == "+8.0 ± 0.0 (3)"
    assert table_row(text, "plateau-u2pl-2000")[8] == "+9.0 ± 0.0 (3)"  # 42 - 33: its own length's control
    assert table_row(text, "plateau-rectified")[8] == "+12.0 ± 0.0 (3)"  # 47 - 35: the lr 4e-3 round's control
    assert table_row(text, "baseline-plateau")[8] == "-1.0 ± 0.0 (3)"  # no round: the lr 2e-3 control
    assert table_row(text, "plateau-online-lr4e-3-2000")[8] == "+11.0 ± 0.0 (3)"
    # The control is the best on val (60 %) but is a control, not a candidate.
    assert "**`plateau-control-2000`**" not in text and "(`plateau-control-2000` - `baseline-plateau`)" not in text
    best = next(line for line in lines if line.startswith("Best self-training from the baseline at its plateau"))
    assert "(`plateau-rectified-authors-unbalanced`)" in best
    # The best round's control has its schedule: the rectified offline round (1,000 steps, lr 4e-3).
    its_control = next(
        line for line in lines if line.startswith("| best from the plateau on target_val vs its control")
    )
    assert "(`plateau-rectified-authors-unbalanced` - `plateau-control-lr4e-3`) |  | +10.0 ± 0.0 (3) |" in its_control
    negatives = next(line for line in lines if line.startswith("| U2PL from the plateau, 2,000 steps: unreliable"))
    assert "(`plateau-u2pl-2000` - `plateau-u2pl-2000-reliable`) | 003 Table III: +2.0 | +1.0 ± 0.0 (3) |" in negatives
    control = next(line for line in lines if line.startswith("| U2PL from the plateau, 2,000 steps, vs its control"))
    assert "| +9.0 ± 0.0 (3) |" in control
    assert "The rectified loss's form from the plateau chosen on **target_val** (`plateau-rectified`: 44.0, " in text
    assert "`plateau-rectified-authors-unbalanced`: 46.0): **`plateau-rectified-authors-unbalanced`**." in text
    chosen = next(line for line in lines if line.startswith("| rectified from the plateau, form chosen on target_val"))
    assert (
        "(`plateau-rectified-authors-unbalanced` - `plateau-sweep-0.9`) | 000 Table 5: +1.9 | -1.0 ± 0.0 (3) |"
        in chosen
    )
    balance = next(line for line in lines if "without its class balance vs with" in line)
    assert "| +15.0 ± 0.0 (3) |" in balance


def test_plateau_check_reads_the_training_log(sm, tmp_path):
    """The item-2 plateau: target_val at the end minus at the last point within 3/4 of the schedule, from the
    pretrain's log.jsonl (validation lines only)."""
    log = tmp_path / "run" / "pretrain" / "log.jsonl"
    log.parent.mkdir(parents=True)
    lines = [{"step": 10, "loss": 1.0}] + [
        {"step": s, "val_miou": v} for s, v in [(1000, 0.30), (2000, 0.34), (2250, 0.35), (3000, 0.357)]
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in lines))
    curve = sm.val_curve(tmp_path / "run", "pretrain")
    assert curve == [[1000, 0.30], [2000, 0.34], [2250, 0.35], [3000, 0.357]]
    assert sm.last_quarter_gain(curve) == pytest.approx(0.007)
    assert sm.last_quarter_gain(curve[:1]) is None
    assert sm.val_curve(tmp_path / "missing", "pretrain") == []


def test_the_u2pl_plateau_recipe_is_the_matrix_row_it_reports(sm):
    """stages/digitscapes_u2pl_plateau.yaml is the plateau recipe with the `plateau-u2pl-2000` row's round, on
    the stratified split: the numbers BENCHMARKS.md gives for that row are the recipe's."""
    from labelpipe.config import SelftrainConfig, load_yaml

    recipe = load_yaml(ROOT / "stages" / "digitscapes_u2pl_plateau.yaml")
    plateau = load_yaml(ROOT / "stages" / "digitscapes_source_only.yaml")
    assert recipe["data"]["protocol"] == "semi-1_16-stratified"
    for section in ("model", "train", "predict", "pseudolabel", "evaluate"):
        assert recipe[section] == plateau[section], section
    assert SelftrainConfig.model_validate(recipe["selftrain"]) == sm.round_settings(sm.BY_KEY["plateau-u2pl-2000"])
    assert recipe["pipeline"] == ["pretrain", "evaluate", "selftrain", "evaluate"]


def test_the_u2pl_random_recipe_is_the_matrix_row_target_val_chose_on_the_random_split(sm):
    """stages/digitscapes_u2pl_random.yaml is the plateau recipe with the `plateau-u2pl-4000-denoise-cutmix1` row's
    round (U2PL+ over 4,000 steps), on the random 1/16 split the row ran on."""
    from labelpipe.config import SelftrainConfig, load_yaml

    recipe = load_yaml(ROOT / "stages" / "digitscapes_u2pl_random.yaml")
    plateau = load_yaml(ROOT / "stages" / "digitscapes_source_only.yaml")
    assert recipe["data"]["protocol"] == "semi-1_16"
    for section in ("model", "train", "predict", "pseudolabel", "evaluate"):
        assert recipe[section] == plateau[section], section
    chosen = sm.round_settings(sm.BY_KEY["plateau-u2pl-4000-denoise-cutmix1"])
    assert SelftrainConfig.model_validate(recipe["selftrain"]) == chosen
    assert chosen.steps == 4000 and chosen.denoise and chosen.cutmix_p == 1.0 and chosen.contrastive
    assert recipe["pipeline"] == ["pretrain", "evaluate", "selftrain", "evaluate"]


def test_the_u2pl_random_classmix_recipe_is_its_matrix_row(sm):
    """stages/digitscapes_u2pl_random_classmix.yaml is the U2PL+ random-split recipe with ClassMix of the labeled
    images at the authors' lambda_c 1: the `plateau-u2pl-4000-denoise-cutmix1-classmix-lc1` row (session 34's choice
    on target_val; session 32's ClassMix row at the paper's 0.1 before it)."""
    from labelpipe.config import SelftrainConfig, load_yaml

    recipe = load_yaml(ROOT / "stages" / "digitscapes_u2pl_random_classmix.yaml")
    u2pl = load_yaml(ROOT / "stages" / "digitscapes_u2pl_random.yaml")
    for section in ("data", "model", "train", "predict", "pseudolabel", "evaluate", "pipeline"):
        assert recipe[section] == u2pl[section], section
    chosen = sm.round_settings(sm.BY_KEY["plateau-u2pl-4000-denoise-cutmix1-classmix-lc1"])
    assert SelftrainConfig.model_validate(recipe["selftrain"]) == chosen
    assert chosen.labeled_classmix_p == 1.0 and chosen.lambda_contrastive == 1.0
    own = {"labeled_classmix_p", "lambda_contrastive"}
    assert {k: v for k, v in recipe["selftrain"].items() if k not in own} == {
        k: v for k, v in u2pl["selftrain"].items() if k not in own
    }


def test_the_plateau_recipes_round_is_the_row_chosen_on_target_val_and_offline_rows_stay_at_1000(sm):
    """stages/digitscapes_source_only.yaml's own round is the `plateau-online-lr4e-3-3000` row (session 28's
    choice on target_val); the offline rows from the plateau keep the 1,000 steps their records ran."""
    from labelpipe.config import SelftrainConfig, load_yaml

    plateau = load_yaml(ROOT / "stages" / "digitscapes_source_only.yaml")
    recipe_round = SelftrainConfig.model_validate(plateau["selftrain"])
    assert recipe_round == sm.round_settings(sm.BY_KEY["plateau-online-lr4e-3-3000"])
    assert recipe_round.steps == 3000
    offline = [c for c in sm.CONFIGS if c.recipe == sm.PLATEAU_RECIPE and "selftrain.pseudo_source=stored" in c.sets]
    assert len(offline) >= 10
    assert {sm.round_settings(c).steps for c in offline} == {1000}


def test_per_class_table_means_each_class_over_seeds_for_the_configs_asked(sm, capsys, tmp_path):
    """``--report --per-class``: a row per configuration that ran (``--configs`` keys or prefixes narrow it), each
    class's target_test IoU averaged over the seeds that recorded it, and the kept share of offline labels."""
    iou = [
        {"background": 0.90, "digit-0": 0.20, "digit-1": 0.10},
        {"background": 0.92, "digit-0": 0.30, "digit-1": None},  # a class absent from a seed's test split
        {"background": 0.94, "digit-0": 0.40, "digit-1": 0.30},
    ]
    rows = [record("baseline-plateau", s, 0.3, 0.3, test_per_class_iou=iou[s]) for s in range(3)]
    rows += [
        record(
            "plateau-sweep-0.9",
            s,
            0.4,
            0.3,
            test_per_class_iou={c: v + 0.1 for c, v in iou[s].items() if v is not None},
            pseudo_labels={
                "kept_fraction": (0.7, 0.8, 0.9)[s],
                "kl_prior_pseudo": (0.01, 0.02, 0.06)[s],
                "per_class": {},
            },
        )
        for s in range(3)
    ]
    rows += [record("adabn-plateau", s, 0.31, 0.3) for s in range(3)]  # no per-class IoU recorded
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    sm.main(["--report", "--out", str(tmp_path)])
    assert "Per class" not in capsys.readouterr().out  # only when asked

    sm.main(["--report", "--per-class", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "| configuration | seeds | mIoU | background | digit-0 | digit-1 | kept % | KL |" in text
    assert "| `baseline-plateau` | 3 | 30.0 | 92.0 | 30.0 | 20.0 | - | - |" in text  # digit-1 over seeds 0 and 2
    assert "| `plateau-sweep-0.9` | 3 | 40.0 | 102.0 | 40.0 | 30.0 | 80 | 0.0300 |" in text
    assert "| `adabn-plateau` | 3 | 31.0 | - | - | - | - | - |" in text

    sm.main(["--report", "--per-class", "--configs", "plateau-sweep", "--out", str(tmp_path)])
    per_class = capsys.readouterr().out.split("Per class", 1)[1]
    assert "`plateau-sweep-0.9`" in per_class and "`baseline-plateau`" not in per_class

    with pytest.raises(SystemExit):
        sm.main(["--per-class", "--out", str(tmp_path)])  # an option of --report, not of a run


def test_the_preamble_names_only_the_families_the_table_has(sm, capsys, tmp_path):
    plateau_only = [record("baseline-plateau", s, 0.3, 0.3) for s in range(2)]
    text = run_report(sm, capsys, tmp_path, plateau_only)
    assert "stages/digitscapes_source_only.yaml are read against their own family" in text
    assert "stages/digitscapes_dars.yaml" not in text
    both = plateau_only + [record("baseline", s, 0.2, 0.2) for s in range(2)]
    text = run_report(sm, capsys, tmp_path, both)
    assert "Baseline: the pretrain of stages/digitscapes_dars.yaml" in text
    assert "stages/digitscapes_source_only.yaml are read against their own family" in text


def test_two_round_pairs_share_round_one_with_their_one_round_configurations(sm):
    """Seed 002's iterative training from the plateau: the second round labels with the same ratio (DARS) or
    threshold (ST), and round 1's fingerprinted settings are the one-round configuration's, so a copy of that
    run resumes at round 2 instead of training round 1 again."""
    for two, one in (
        ("plateau-dars-0.8-2r", "plateau-dars-0.8"),
        ("plateau-sweep-0.9-2r", "plateau-sweep-0.9"),
        ("plateau-control-lr4e-3-2r", "plateau-control-lr4e-3"),
        ("plateau-rectified-2r", "plateau-rectified"),
        ("plateau-sweep-0.8-2r", "plateau-sweep-0.8"),
    ):
        a, b = sm.round_settings(sm.BY_KEY[two]), sm.round_settings(sm.BY_KEY[one])
        assert (a.rounds, b.rounds) == (2, 1)
        assert a.fingerprint_fields() == b.fingerprint_fields()
    assert sm.round_settings(sm.BY_KEY["plateau-dars-0.8-2r"]).method == "dars"
    assert sm.round_settings(sm.BY_KEY["plateau-sweep-0.9-2r"]).method == "threshold"
    rectified = sm.round_settings(sm.BY_KEY["plateau-rectified-2r"])
    assert (rectified.method, rectified.rectified) == ("variance", True)


def test_dars_rounds_chosen_on_val_pair_with_as_many_threshold_st_rounds_and_their_control(sm, capsys, tmp_path):
    """Where target_val prefers DARS's two rounds, the claim row reads them against threshold-ST's two rounds (not
    its one), and the two-round rows' control column is the control run twice."""
    rows = [record("baseline-plateau", s, 0.30, 0.30) for s in range(3)]
    rows += [record("plateau-sweep-0.9", s, 0.36, 0.35, tail=0.20) for s in range(3)]
    rows += [record("plateau-sweep-0.9-2r", s, 0.34, 0.33, tail=0.21 + s / 100) for s in range(3)]
    rows += [record("plateau-dars-0.8", s, 0.35, 0.34, tail=0.22) for s in range(3)]
    rows += [record("plateau-dars-0.8-2r", s, 0.37 + s / 100, 0.36, tail=0.25) for s in range(3)]  # val's choice
    rows += [record("plateau-control-lr4e-3", s, 0.29, 0.29) for s in range(3)]
    rows += [record("plateau-control-lr4e-3-2r", s, 0.31, 0.29) for s in range(3)]
    text = run_report(sm, capsys, tmp_path, rows)
    assert "**`plateau-dars-0.8-2r`**." in text
    dars = next(line for line in text.splitlines() if line.startswith("| DARS from the plateau (alpha and rounds"))
    assert "`plateau-dars-0.8-2r` - `plateau-sweep-0.9-2r`" in dars
    assert dars.endswith("| +4.0 ± 1.0 (3) | +3.0 ± 1.0 (3) |")  # 37-34, 38-34, 39-34; tail 25-21, 25-22, 25-23
    assert table_row(text, "plateau-dars-0.8-2r")[8] == "+7.0 ± 1.0 (3)"  # over the two-round control
    assert table_row(text, "plateau-sweep-0.9")[8] == "+7.0 ± 0.0 (3)"  # over the one-round control
    assert table_row(text, "plateau-control-lr4e-3-2r")[8] == "-"  # a control is never read against itself
    assert "(`plateau-dars-0.8-2r`)." in text  # the best from the plateau: the control is no candidate


def test_report_protocols_narrow_the_tables(sm, capsys, tmp_path):
    rows = [record("baseline-plateau", s, 0.3, 0.3) for s in range(2)]
    rows += [{**record("baseline-plateau", s, 0.2, 0.2), "protocol": "semi-1_16"} for s in range(2)]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm.main(["--report", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "### da" in text and "### semi-1_16" in text
    sm.main(["--report", "--protocols", "semi-1_16", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "### semi-1_16" in text and "### da" not in text


def test_a_later_rounds_curve_runs_the_rounds_end_to_end(sm, tmp_path):
    """round-K's curve is rounds 1..K, each after the last logged step of the one before; a missing round's log
    gives no curve rather than a curve that silently lacks a round."""
    for k, points in ((1, [(500, 0.3), (1000, 0.4)]), (2, [(500, 0.45), (1000, 0.5)])):
        log = tmp_path / "selftrain" / f"round-{k}" / "train" / "log.jsonl"
        log.parent.mkdir(parents=True)
        rows = [{"step": s, "loss": 1.0} for s, _ in points] + [{"step": s, "val_miou": v} for s, v in points]
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert sm.val_curve(tmp_path, "round-1") == [[500, 0.3], [1000, 0.4]]
    assert sm.val_curve(tmp_path, "round-2") == [[500, 0.3], [1000, 0.4], [1500, 0.45], [2000, 0.5]]
    (tmp_path / "selftrain" / "round-1" / "train" / "log.jsonl").unlink()
    assert sm.val_curve(tmp_path, "round-2") == []


def test_curve_panels_follow_the_claims_choices_on_val_and_start_at_the_plateau_model(sm):
    curve = [[250, 0.40], [500, 0.45]]
    rows = [record("baseline-plateau", s, 0.30, 0.30, val_curve=[[3000, 0.35 + s / 100]]) for s in range(2)]
    for key, val in (
        ("plateau-rectified", 0.44),
        ("plateau-rectified-authors", 0.46),  # target_val's form
        ("plateau-sweep-0.8", 0.45),
        ("plateau-dars-0.8", 0.47),
        ("plateau-dars-0.8-2r", 0.49),  # target_val's DARS, read against tau 0.9's two rounds
        ("plateau-sweep-0.9-2r", 0.48),
        ("plateau-u2pl", 0.43),
        ("plateau-u2pl-reliable", 0.43),
        ("plateau-control-lr4e-3", 0.38),
    ):
        rows += [record(key, s, val, val, val_curve=curve) for s in range(2)]
    rows += [record("plateau-online-lr4e-3", s, 0.5, 0.5) for s in range(2)]  # no curve recorded: not drawn
    latest = {("da", r["seed"], r["config"]): r for r in rows}
    panels = dict(sm.curve_panels(latest, "da"))
    assert "best round on target_val vs its control" not in panels  # target_val's best recorded no curve
    assert panels["000: rectified vs fixed thresholds, one round"] == ["plateau-rectified-authors", "plateau-sweep-0.8"]
    assert "000: rectified vs fixed thresholds, two rounds" not in panels  # its method, rectified 2r, did not run
    assert panels["002: DARS vs threshold-ST (tau 0.9)"] == ["plateau-dars-0.8-2r", "plateau-sweep-0.9-2r"]
    assert panels["003: unreliable vs reliable-only negatives"] == [
        "plateau-u2pl",
        "plateau-u2pl-reliable",
        "plateau-control-lr4e-3",
    ]
    # Each seed's curve starts at its own plateau model's last target_val point.
    assert sm.seed_curves(latest, "da", "plateau-u2pl") == {
        0: [[0, 0.35], [250, 0.40], [500, 0.45]],
        1: [[0, 0.36], [250, 0.40], [500, 0.45]],
    }
    steps, mean, std = sm.mean_curve(sm.seed_curves(latest, "da", "plateau-u2pl"))
    assert steps.tolist() == [0, 250, 500]
    assert np.allclose(mean, [35.5, 40.0, 45.0]) and np.allclose(std, [np.sqrt(0.5), 0.0, 0.0])


def test_report_curves_writes_the_figure_and_links_it(sm, capsys, tmp_path):
    curve = [[250, 0.40], [500, 0.45]]
    rows = [record("baseline-plateau", s, 0.30, 0.30, val_curve=[[3000, 0.35]]) for s in range(2)]
    rows += [
        record(k, s, 0.4, 0.4, val_curve=curve) for s in range(2) for k in ("plateau-sweep-0.9", "plateau-rectified")
    ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm.main(["--report", "--curves", "--out", str(tmp_path)])
    figure = tmp_path / "curves-da.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({figure})" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        sm.main(["--curves", "--out", str(tmp_path)])


def test_stage_2_after_the_online_round_is_read_against_its_own_control_and_pairs(sm):
    """Seed 000's stage 2 after the plateau's online round: every adapted row's control is the same two rounds
    with round 2's pseudo-label loss weighted 0; DARS there is read against the threshold 0.9 there."""
    adapted = [c.key for c in sm.CONFIGS if c.key.startswith("adapted-") and c.key != "adapted-control"]
    assert len(adapted) == 7 and all(sm.plateau_control(k) == "adapted-control" for k in adapted)
    control = sm.round_settings(sm.BY_KEY["adapted-control"])
    assert control.for_round(2).unsup_weight == 0 and control.for_round(1).unsup_weight == 1
    assert sm.DARS_ST_PAIRS["adapted-dars-0.8"] == "adapted-sweep-0.9"
    # The other plateau rounds keep theirs.
    assert sm.plateau_control("plateau-online-lr4e-3-2000") == "plateau-control-2000"
    # Two rounds over 12 minutes: read for seed 000's claim, never the best self-training.
    assert all(sm.over_budget(k) for k in adapted) and not sm.over_budget("plateau-online-lr4e-3-2000")


def test_report_reads_stage_2_against_its_thresholds_and_never_as_the_best_round(sm, capsys, tmp_path):
    """The adapted rows (seed 000's stage 2 after the online round) take longer than 12 minutes: the rectified one
    is read against the adapted sweep's threshold chosen on target_val, and the best self-training from the plateau
    is chosen among the others even where an adapted row has the higher target_val."""
    rows = []
    for seed in range(3):
        rows += [
            record("baseline-plateau", seed, 0.37, 0.37),
            record("plateau-online-lr4e-3-2000", seed, 0.53, 0.52),
            record("adapted-rectified", seed, 0.52 + 0.01 * seed, 0.53),
            record("adapted-sweep-0.5", seed, 0.55, 0.54),  # best on val, worse on test than 0.9
            record("adapted-sweep-0.9", seed, 0.56, 0.535),
        ]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm.main(["--report", "--protocols", "da", "--out", str(tmp_path)])
    text = capsys.readouterr().out
    assert "on **target_val**: **online round from the plateau, round lr 4e-3, 2,000 steps**" in text
    line = next(t for t in text.splitlines() if t.startswith("| rectified vs the best fixed threshold (tau chosen"))
    assert "(`adapted-rectified` - `adapted-sweep-0.5`)" in line
    assert "| -2.0 ± 1.0 (3) |" in line  # 52 - 55, 53 - 55, 54 - 55


def test_the_classmix_rounds_negatives_and_contrastive_weight_are_read_in_pairs(sm, capsys, tmp_path):
    """Sessions 33-34: on the semi claim's ClassMix round, unreliable vs reliable-only negatives at lambda_c 0.1 and
    at the authors' 1, lambda_c 1 vs 0.1, and with vs without the contrastive loss, each paired by seed."""
    tests = {
        "baseline-plateau": 0.24,
        "plateau-u2pl-4000-denoise-cutmix1-classmix": 0.40,
        "plateau-u2pl-4000-denoise-cutmix1-classmix-reliable": 0.39,
        "plateau-online-4000-denoise-cutmix1-classmix": 0.38,
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1": 0.43,
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable": 0.45,
    }
    rows = [
        {**record(key, seed, test + (seed / 100 if key.endswith("lc1") else 0), test), "protocol": "semi-1_16"}
        for key, test in tests.items()
        for seed in range(3)
    ]
    text = run_report(sm, capsys, tmp_path, rows)

    def pair(title: str) -> str:
        return next(line for line in text.splitlines() if line.startswith(f"| {title}"))

    classmix = "U2PL+ with ClassMix of the labeled images, 4,000 steps"
    assert "| 003 Table III: +2.0 | +1.0 ± 0.0 (3) |" in pair(f"{classmix}: unreliable vs reliable-only")
    lc1 = pair(f"{classmix}, lambda_c 1 (the authors' config): unreliable vs reliable-only")
    assert "`plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable`) | 003 Table III: +2.0 | -1.0 ± 1.0 (3) |" in lc1
    assert "| +4.0 ± 1.0 (3) |" in pair(f"{classmix}, unreliable negatives: lambda_c 1 vs 0.1")
    assert "| +6.0 ± 1.0 (3) |" in pair(f"{classmix}, lambda_c 1: with vs without the contrastive loss")
    assert "| +2.0 ± 0.0 (3) |" in pair(f"{classmix}: with vs without the contrastive loss")


def test_report_borrows_missing_oracle_rows_of_the_same_build_from_another_source_style(sm, capsys, tmp_path):
    """--oracles-from: a source style's report reads the oracle (which never sees the source) from the textured
    source's records of the same seed and blend; its own oracle rows win, and another build's are refused."""
    quarter = {"data": sm.DataVariant(1, "diff", "blended", 0.25).record()}
    textured = {"data": sm.DataVariant(1, "diff").record()}
    (tmp_path / "own").mkdir()
    rows = [record("baseline", s, 0.30 + s / 100, 0.3, **quarter) for s in range(3)]
    (tmp_path / "own" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    others = [record("oracle", s, 0.50, 0.5, **textured) for s in range(3)]
    others[0]["protocol"] = "semi-1_16"  # an oracle run recorded by a semi call serves DA too
    (tmp_path / "oracles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in others))
    sm.main(["--report", "--out", str(tmp_path / "own")])
    assert table_row(capsys.readouterr().out, "baseline")[9] == "-"  # no oracle: no share of the gap
    sm.main(["--report", "--out", str(tmp_path / "own"), "--oracles-from", str(tmp_path / "oracles.jsonl")])
    text = capsys.readouterr().out
    assert table_row(text, "oracle")[4] == "50.0 ± 0.0"
    assert f"Oracle rows this build lacks: those of {tmp_path / 'oracles.jsonl'}" in text
    assert "DigitScapes seed 1, diff blend, blended source (0.25 by difference)" in text
    # the build's own oracle runs win over the borrowed ones
    own_oracle = record("oracle", 0, 0.56, 0.5, **quarter)
    with (tmp_path / "own" / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(own_oracle) + "\n")
    sm.main(["--report", "--out", str(tmp_path / "own"), "--oracles-from", str(tmp_path / "oracles.jsonl")])
    assert table_row(capsys.readouterr().out, "oracle")[4] == "52.0 ± 3.5"  # 56, 50, 50
    # an oracle of another build would pair a seed with a different target
    (tmp_path / "alpha.jsonl").write_text(json.dumps(record("oracle", 0, 0.6, 0.6)) + "\n")
    with pytest.raises(SystemExit, match="an oracle of DigitScapes seed 0, alpha blend"):
        sm.main(["--report", "--out", str(tmp_path / "own"), "--oracles-from", str(tmp_path / "alpha.jsonl")])
    with pytest.raises(SystemExit):
        sm.main(["--out", str(tmp_path / "own"), "--oracles-from", str(tmp_path / "alpha.jsonl")])


def test_oracles_from_reads_several_files_and_the_first_wins(sm, capsys, tmp_path):
    """--oracles-from FILE FILE: each file may hold another oracle (3,000 steps in one, 6,000 in the other); where
    both hold the same oracle of a seed, the first file's row is the one read."""
    quarter = {"data": sm.DataVariant(1, "diff", "blended", 0.25).record()}
    textured = {"data": sm.DataVariant(1, "diff").record()}
    (tmp_path / "own").mkdir()
    rows = [record("baseline", s, 0.30, 0.3, **quarter) for s in range(3)]
    (tmp_path / "own" / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    first = [record("oracle", s, 0.50, 0.5, **textured) for s in range(3)]
    second = [record("oracle", s, 0.60, 0.6, **textured) for s in range(3)]
    second += [record("oracle-plateau-6000", s, 0.54, 0.54, **textured) for s in range(3)]
    for name, recs in (("first.jsonl", first), ("second.jsonl", second)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in recs))
    files = [str(tmp_path / "first.jsonl"), str(tmp_path / "second.jsonl")]
    sm.main(["--report", "--out", str(tmp_path / "own"), "--oracles-from", *files])
    text = capsys.readouterr().out
    assert table_row(text, "oracle")[4] == "50.0 ± 0.0"  # the first file's, not the second's 60
    assert table_row(text, "oracle-plateau-6000")[4] == "54.0 ± 0.0"
    assert f"those of {files[0]}, {files[1]}." in text
