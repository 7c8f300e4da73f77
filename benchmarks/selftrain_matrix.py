"""The self-training study of issue 14, item 5, on DigitScapes: every configuration, 3 seeds, DA and semi 1/16.

For each protocol (``da``, ``semi-1_16``) and seed, in the issue's order:

- **baseline**: the pretrain of ``stages/digitscapes_dars.yaml`` (scale n from ImageNet, class-balanced CE,
  1,000 steps) on the protocol's labeled split (source_train; the 250 labeled target images);
- **oracle**: the same recipe on protocol ``oracle`` (all 4,000 target_train images with their masks). The
  data set defines one ``oracle`` protocol, "the upper bound of both protocols" (its labeled split is
  target_train for DA and semi alike), so one oracle run per seed serves both tables;
- **AdaBN**: the baseline with its BatchNorm statistics re-estimated on the protocol's unlabeled split
  (``benchmarks/adabn_control.py``'s ``adapt_batchnorm``, run as ``selftrain_matrix.py --adabn RUN``);
- on ``digitscapes_dars.yaml`` (two offline rounds of 500 steps, alphas 0.2 / 0.5, strong augmentation):
  the **control** (the same rounds, pseudo-label loss weighted 0), **threshold-ST** (tau 0.9), **CBST**,
  **DARS**, and the demo's **online** mean-teacher round on this pretrain (not in the issue's list);
- item 2's **plateau family** on ``digitscapes_source_only.yaml`` (the baseline's model trained 3,000 steps, to
  its target_val plateau): that baseline, its **oracle** and **AdaBN** trained and adapted the same way, the
  demo's online round from it and the candidates of its round (learning rate, steps, two rounds), chosen on
  target_val, their **control** (the round without the pseudo-label loss), and **U2PL from the plateau** (the
  chosen lr 4e-3 round with U2PL's contrastive loss, unreliable or reliable-only negatives; both rounds also
  over 2,000 steps, the length chosen on target_val), and seed 000's pair
  as an offline round from it (the **rectified** loss, in the paper's form and in the authors' published one,
  against the **sweep** of fixed thresholds, its tau chosen on target_val apart from the rectify recipe's
  sweep), and **DARS** as the same offline round (alpha 0.5 or 0.8, chosen on target_val) against the
  sweep's tau 0.9. The report reads
  these rows against their own family, the DA claims (>= +10, >= +8 over AdaBN) on the choice among them, and
  semi 1/16's U2PL claim (>= +10, >= 1/3 of the gap) on U2PL from the plateau;
- on ``digitscapes_rectify.yaml`` (its own pretrain, with auxiliary weight 0.5; one round of 1,000
  steps, no strong augmentation): the **rectified** loss (variance, no threshold) and the **sweep** of
  fixed thresholds {0.5, 0.7, 0.8, 0.9, 0.95} (threshold method + CE, the same round);
- on ``digitscapes_u2pl.yaml`` (its own pretrain, a 300-step warm-up; one online round of 1,500 steps: EMA
  teacher pseudo-labels, entropy split, CutMix, contrastive loss), for DA too with ``--protocol da``:
  **U2PL** with unreliable negatives, with reliable-only negatives, without the contrastive loss, and
  **everything on** (+ the rectified loss, which replaces the unlabeled CE, and U2PL+ denoising); the
  negatives pair again at the authors' contrastive weight lambda_c = 1 (``lc1-*``; the paper's 0.1 above).

A pretrain is shared only by the configurations of one recipe (``RUN/pretrains/<recipe>-<protocol>-s<seed>``;
the configurations only set ``selftrain.*`` / ``pseudolabel.*`` / ``predict.*``, never what a pretrain reads);
each configuration runs in a copy of it (``RUN/<protocol>-s<seed>/<recipe>/<key>``), round 1's predictions are
copied from a sibling of the same recipe. Every model is evaluated on target_val (500 images: the only split
any choice is made on) and target_test (1,000 images: every number reported). Each result is appended to
``RUN/results.jsonl`` (val and test mIoU, tail mIoU, per-class test IoU, the stages' wall time, the last
round's pseudo-label precision per class). Everything goes through the CLI and every stage skips itself when
up to date (an evaluation when its copy ``RUN/.../matrix/<model>.<split>.json`` is newer than the weights),
so an interrupted matrix continues where it stopped.

    python benchmarks/selftrain_matrix.py --dry-run              # every command, in order; runs nothing
    python benchmarks/selftrain_matrix.py                        # the whole study (~16 h on 2 quiet cores)
    python benchmarks/selftrain_matrix.py --protocols da --seeds 0 --configs baseline control dars
    python benchmarks/selftrain_matrix.py --configs sweep rectified   # keys by prefix
    python benchmarks/selftrain_matrix.py --report               # the tables of what results.jsonl holds
    python benchmarks/selftrain_matrix.py --data-seed 1 --blend diff --out OUT   # on a build nothing was tuned on
    python benchmarks/selftrain_matrix.py --source-style inked --out OUT          # another source domain

``--report`` prints, per protocol and in the issue's order, mean ± std over seeds (sample std) and paired
gains (mean ± std of the per-seed differences) against the baseline, AdaBN and the control, the share of
the baseline-to-oracle gap closed, then the comparisons of the claims table: rectified against the fixed
threshold chosen on target_val, DARS against threshold-ST, unreliable against reliable-only negatives,
and the configuration chosen on target_val against the baseline and AdaBN.

Expected wall time on the 2-core machine, nothing else running (BENCHMARKS.md, issue 14: pretrain 1,000
steps ~165 s; the online round ~65 img/s at 32 images a step; predict 19 s and pseudolabel 14 s per offline round;
evaluate ~4 s per 1,000 images): a pretrain ~3 min (the U2PL warm-up of 300 steps ~1 min; the oracle once
per seed); an offline round of 500 steps ~4.7 min (~250 s of training at ~65 img/s + 33 s), so control,
threshold-ST, CBST and DARS ~9.5 min each; the online round of 1,000 steps on the baseline ~9 min; the
rectified round and each threshold of the sweep (1,000 steps) ~9 min; each U2PL configuration (1,500 steps)
~13 min before the contrastive loss's own cost: over the issue's 12 minutes per configuration
(``--round-steps`` shortens every configuration's rounds alike: for smoke runs, ``--quick``). Per protocol
and seed ~2.7 h, the whole study (2 protocols x 3 seeds) ~16 h. Timed alone on a quiet machine in session 14
(2 threads, fresh processes), the online round of 1,000 steps ran at ~139 img/s, 243 s, and the plateau
recipe's 3,000-step pretrain took 5 min 35 s with its evaluation: the figures above are upper bounds.
"""

from __future__ import annotations

import argparse
import functools
import json
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DARS_RECIPE, RECTIFY_RECIPE, U2PL_RECIPE = "digitscapes_dars", "digitscapes_rectify", "digitscapes_u2pl"
BASE_RECIPE = DARS_RECIPE  # the baseline, its AdaBN and its oracle
RECTIFY_C3_RECIPE = "digitscapes_rectify_c3"  # the rectify recipe, its auxiliary head on c3
PLATEAU_RECIPE = "digitscapes_source_only"  # the baseline's model trained 3x longer, to its target_val plateau
PLATEAU_C3_RECIPE = "digitscapes_source_only_c3"  # the plateau recipe, its auxiliary head on c3
ORACLE_LONG_RECIPE = "digitscapes_oracle_long"  # the plateau recipe twice as long, for the oracle only
TAUS = (0.5, 0.7, 0.8, 0.9, 0.95)
SPLITS = ("target_val", "target_test")  # every protocol's val and test roles
# What a configuration may set: the round's sections only, so configurations of one recipe share its pretrain.
ROUND_SECTIONS = ("selftrain", "pseudolabel", "predict")


@dataclass(frozen=True)
class Config:
    """One row of the study: ``kind`` pretrain (a recipe's pretrain, evaluated), oracle, adabn or selftrain
    (``sets``: ``--set`` options of ``labelpipe selftrain`` on top of ``recipe``)."""

    key: str
    label: str
    recipe: str
    kind: str = "selftrain"
    sets: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        outside = [s for s in self.sets if s.split(".", 1)[0] not in ROUND_SECTIONS]
        if outside:  # a pretrain setting would make the shared pretrain the wrong one
            raise ValueError(f"{self.key}: {outside} are not round settings ({', '.join(ROUND_SECTIONS)})")


ONLINE = ("selftrain.pseudo_source=teacher", "selftrain.method=entropy")
# The demo round's learning rate (stages/demo.yaml), pinned where the plateau recipe's own (chosen on target_val
# in session 14) would otherwise apply.
DEMO_ROUND_LR = 0.0005


def online_round(steps: int, rounds: int = 1) -> tuple[str, ...]:
    """The demo's online mean-teacher round (stages/demo.yaml) of ``steps`` steps, on a recipe's pretrain;
    ``rounds`` > 1 repeats it, each round's teacher starting from the previous round's student."""
    alphas = ",".join(["0.2"] * rounds)
    return (*ONLINE, f"selftrain.rounds={rounds}", f"selftrain.alphas=[{alphas}]", f"selftrain.steps={steps}")


# The plateau recipe's round learning rate (chosen on target_val in session 14), pinned in its rows.
PLATEAU_ROUND_LR = 0.004


def plateau_round(steps: int, *extra: str) -> tuple[str, ...]:
    """The demo's online round of ``steps`` steps at the plateau round's learning rate, then ``extra``."""
    return (*online_round(steps), f"selftrain.lr={PLATEAU_ROUND_LR}", *extra)


# U2PL's contrastive loss as stages/digitscapes_u2pl.yaml sets it (lambda_c the paper's 0.1).
U2PL_CONTRASTIVE = (
    "selftrain.contrastive=true",
    "selftrain.lambda_contrastive=0.1",
    "selftrain.contrastive_anchors=64",
    "selftrain.contrastive_negatives=50",
    "selftrain.memory_capacity=5000",
)


# U2PL+'s round with ClassMix of the labeled images (session 32's semi choice; at lambda_c 1, session 34's), after the
# contrastive settings.
CLASSMIX_ROUND = ("selftrain.denoise=true", "selftrain.cutmix_p=1.0", "selftrain.labeled_classmix_p=1.0")


# The authors' contrastive weight (their config), over the paper's 0.1 above.
LAMBDA_C_1 = ("selftrain.lambda_contrastive=1.0",)


# The offline rounds from the plateau (sessions 15-21) ran 1,000 steps, the plateau recipe's round length then.
PLATEAU_OFFLINE_STEPS = 1000


# An offline round from the plateau model: stored pseudo-labels (every pixel considered: alpha 1), otherwise the
# plateau recipe's round (strong augmentation and CutMix) at its chosen learning rate, over 1,000 steps.
def plateau_offline(alpha: float = 1.0) -> tuple[str, ...]:
    """The plateau's offline round on stored pseudo-labels at labeling ratio ``alpha``: 1,000 steps, pinned (the
    recipe's own round is the online one, 2,000 steps since session 22)."""
    return (
        "selftrain.pseudo_source=stored",
        f"selftrain.alphas=[{alpha}]",
        f"selftrain.lr={PLATEAU_ROUND_LR}",
        f"selftrain.steps={PLATEAU_OFFLINE_STEPS}",
    )


PLATEAU_OFFLINE = plateau_offline()
# Seed 000's pair as the plateau's offline round: the rectified loss on the variance labels of every pixel. The
# authors' published command adds per-step class-balance weights (capped at 7) and the options after them.
PLATEAU_RECTIFIED = (*PLATEAU_OFFLINE, "selftrain.method=variance", "selftrain.rectified=true")
AUTHORS_CLASS_BALANCE = ("selftrain.rectified_class_balance=true", "selftrain.rectified_max_value=7")
AUTHORS_RECTIFIED = (
    "selftrain.rectified_kl_direction=aux||main",
    "selftrain.rectified_mean_over=all",
    "selftrain.rectified_aux_weight=0.5",
    "selftrain.rectified_align_corners=true",
)
# The rectified loss's forms from the plateau, one of them chosen on target_val for the claim row.
RECTIFIED_FORMS = ["plateau-rectified", "plateau-rectified-authors", "plateau-rectified-authors-unbalanced"]


def fixed_threshold_round(tau: float) -> tuple[str, ...]:
    """The rectify recipe's round with a fixed confidence threshold and plain CE instead."""
    return ("selftrain.method=threshold", "selftrain.rectified=false", f"pseudolabel.tau={tau}")


def second_round(*sets: str) -> tuple[str, ...]:
    """``--set`` options that run round 2 with ``sets`` (``selftrain.X=v`` / ``pseudolabel.X=v``) on top of round
    1's settings (``selftrain.round_overrides``), and two rounds."""
    own = [item.split("=", 1) for item in sets]
    selftrain = [f"{key.removeprefix('selftrain.')}: {v}" for key, v in own if key.startswith("selftrain.")]
    pseudolabel = [f"{key.removeprefix('pseudolabel.')}: {v}" for key, v in own if key.startswith("pseudolabel.")]
    if len(selftrain) + len(pseudolabel) != len(own):
        raise ValueError(f"second_round: only selftrain and pseudolabel settings, got {sets}")
    entries = selftrain + ([f"pseudolabel: {{{', '.join(pseudolabel)}}}"] if pseudolabel else [])
    return ("selftrain.rounds=2", f"selftrain.round_overrides={{2: {{{', '.join(entries)}}}}}")


# Seed 000's two stages from an adapted model (session 23): its stage 1 is a domain-adapted model (AdaptSegNet
# with the auxiliary head), not a source-only one. Here stage 1 is the plateau recipe's round as sessions 22-27 ran
# it (the online round over 2,000 steps, `plateau-online-lr4e-3-2000`, whose copy resumes at round 2; the recipe's
# round is 3,000 steps since session 28, and these rows keep the 2,000 their records ran), stage 2 the pair's
# offline round on stage 1's pseudo-labels: the rectified loss against the fixed thresholds.
ADAPTED = plateau_round(2000)
# The same stage 1 with MRNet's memory regularisation (session 27): seed 000's stage 1 is MRNet, whose heads are
# trained to agree on target images, so that the variance left marks ambiguous pixels; stage 2 as above (its
# round without the term: the rectified loss holds its own mean(var), the thresholds are plain CE).
MR_STAGE_1 = (*ADAPTED, "selftrain.terms=[supervised, unsupervised, consistency]")


def consistency_pair(prefix: str, recipe: str, where: str) -> list[Config]:
    """Seed 000's two stages after a stage 1 with MRNet's head consistency (``MR_STAGE_1``) on ``recipe``'s
    pretrain: stage 1 alone (``PREFIX-online``), then stage 2 with the rectified loss or a fixed threshold (round 2
    without the term); ``where`` ends each label."""
    stage_2 = ("selftrain.terms=null",)
    return [
        Config(
            f"{prefix}-online",
            f"the online round with head consistency (seed 000's stage 1){where}",
            recipe,
            sets=MR_STAGE_1,
        ),
        Config(
            f"{prefix}-rectified",
            f"variance + rectified loss after the online round with head consistency{where}",
            recipe,
            sets=(*MR_STAGE_1, *second_round(*PLATEAU_RECTIFIED, *stage_2)),
        ),
        *(
            Config(
                f"{prefix}-sweep-{tau}",
                f"fixed threshold {tau} + CE after the online round with head consistency{where}",
                recipe,
                sets=(*MR_STAGE_1, *second_round(*PLATEAU_OFFLINE, *fixed_threshold_round(tau), *stage_2)),
            )
            for tau in TAUS
        ),
    ]


CONFIGS: list[Config] = [
    Config("baseline", "baseline (pretrain)", BASE_RECIPE, "pretrain"),
    Config("oracle", "oracle (all target_train labeled)", BASE_RECIPE, "oracle"),
    Config("adabn", "AdaBN (baseline, BatchNorm on the unlabeled split)", BASE_RECIPE, "adabn"),
    # Item 2's baseline: the same model trained until target_val gains < 1 point over the last quarter.
    Config("baseline-plateau", "baseline trained to its plateau (3,000 steps)", PLATEAU_RECIPE, "pretrain"),
    # Its upper bound and its AdaBN: the same 3,000-step recipe on all target_train labels, and the plateau
    # model with BatchNorm re-estimated on the unlabeled split (the controls of the plateau family below).
    Config("oracle-plateau", "oracle trained like the plateau baseline (3,000 steps)", PLATEAU_RECIPE, "oracle"),
    # Session 30: that oracle twice as long (its target_val still rose over its last quarter), the gap shares read
    # against it as well.
    Config("oracle-plateau-6000", "oracle trained twice as long (6,000 steps)", ORACLE_LONG_RECIPE, "oracle"),
    # Session 41: the source-only model twice as long, where the 3,000-step one still rose over its last quarter
    # (the blended source): is 3,000 its plateau, and how much of a round's gain is the baseline's short schedule?
    Config("baseline-plateau-6000", "baseline trained twice as long (6,000 steps)", ORACLE_LONG_RECIPE, "pretrain"),
    # ... and the recipe's online round from it (3,000 steps at lr 4e-3, as from the 3,000-step model).
    Config(
        "long-online-lr4e-3-3000",
        "online round from the baseline trained twice as long, round lr 4e-3, 3,000 steps",
        ORACLE_LONG_RECIPE,
        sets=plateau_round(3000),
    ),
    Config("adabn-plateau", "AdaBN of the baseline at its plateau", PLATEAU_RECIPE, "adabn"),
    # The control: the same rounds (labeled batches, unlabeled images through the model and its BatchNorm
    # statistics, schedule, augmentation) with the pseudo-label loss weighted 0. A configuration that does
    # not beat it learns nothing from its pseudo-labels, whatever it gains over the baseline.
    Config("control", "control: the rounds without pseudo-label loss", DARS_RECIPE, sets=("selftrain.unsup_weight=0",)),
    Config(
        "st-0.9",
        "threshold-ST (tau 0.9) + CE",
        DARS_RECIPE,
        sets=("selftrain.method=threshold", "pseudolabel.tau=0.9"),
    ),
    Config("cbst", "CBST + CE", DARS_RECIPE, sets=("selftrain.method=cbst",)),
    Config("dars", "DARS + CE", DARS_RECIPE, sets=("selftrain.method=dars",)),
    # The demo's round (stages/demo.yaml, 1,000 steps) from the baseline: U2PL's online regime on DA.
    Config(
        "online",
        "online mean teacher + entropy split + CutMix (demo round)",
        DARS_RECIPE,
        sets=online_round(1000),
    ),
    # The same round, longer: 1,200 steps still fit the issue's 12 minutes a configuration (1 thread).
    Config(
        "online-1200",
        "online mean teacher + entropy split + CutMix (demo round, 1,200 steps)",
        DARS_RECIPE,
        sets=online_round(1200),
    ),
    # Self-training from item 2's baseline: the demo's online round (1,000 steps) from the plateau model.
    Config(
        "plateau-online",
        "online mean teacher + entropy split + CutMix (demo round) from the baseline at its plateau",
        PLATEAU_RECIPE,
        sets=(*online_round(1000), f"selftrain.lr={DEMO_ROUND_LR}"),
    ),
    # The plateau round's candidates, chosen on target_val: the round's learning rate at the pretrain's (the
    # plateau model moves little at half of it), and the same 1,200 steps the 12 minutes hold as two rounds,
    # the second's teacher starting from the first's student (the round's gain comes in its first few hundred
    # steps: session 13's target_val curves).
    Config(
        "plateau-online-lr1e-3",
        "online round from the plateau, round lr 1e-3 (the pretrain's)",
        PLATEAU_RECIPE,
        sets=(*online_round(1000), "selftrain.lr=0.001"),
    ),
    # Session 14's second pass on the two axes the first one moved (lr 1e-3 beat 5e-4 on target_val): twice
    # that learning rate, and the 1,200 steps the 12 minutes hold at it; then 4e-3, as 2e-3 led the grid.
    Config(
        "plateau-online-lr2e-3",
        "online round from the plateau, round lr 2e-3",
        PLATEAU_RECIPE,
        sets=(*online_round(1000), "selftrain.lr=0.002"),
    ),
    Config(
        "plateau-online-lr4e-3",
        "online round from the plateau, round lr 4e-3",
        PLATEAU_RECIPE,
        sets=plateau_round(1000),
    ),
    # Session 16: the chosen round twice as long (alone on 2 threads ~8 min, inside the 12 minutes), for semi
    # 1/16, whose 3,750 unlabeled images the 1,000 steps (16 unlabeled a step) see about four times.
    Config(
        "plateau-online-lr4e-3-2000",
        "online round from the plateau, round lr 4e-3, 2,000 steps",
        PLATEAU_RECIPE,
        sets=plateau_round(2000),
    ),
    # Session 25: that round with the entropy split taken per class the teacher predicts (the alpha_t most uncertain
    # of each class unreliable, not of the batch): DARS's class-balanced selection in U2PL's online regime.
    Config(
        "plateau-online-classwise-2000",
        "online round from the plateau, 2,000 steps, class-wise entropy split",
        PLATEAU_RECIPE,
        sets=plateau_round(2000, "selftrain.online_split=class"),
    ),
    # Session 28: the round half as long again. Every 2,000-step round's target_val was still rising over its last
    # quarter (DA +1 to +3 on both builds, semi 1/16 random +1 to +3); 3,000 steps is the longest that fits the
    # 12 minutes a configuration (U2PL's round ~11 min alone on 2 threads, NHWC), target_val choosing the length.
    Config(
        "plateau-online-lr4e-3-3000",
        "online round from the plateau, round lr 4e-3, 3,000 steps",
        PLATEAU_RECIPE,
        sets=plateau_round(3000),
    ),
    # Session 32: that round with DACS's cross-domain ClassMix on every unlabeled image (half of the classes of the
    # paired source image pasted with their ground truth): the augmentation modern DA self-training rests on, for
    # the unseen build, whose source-only model paints photo texture as digits.
    Config(
        "plateau-online-lr4e-3-3000-classmix",
        "online round from the plateau, round lr 4e-3, 3,000 steps, DACS ClassMix of the labeled images",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, "selftrain.labeled_classmix_p=1.0"),
    ),
    # The control of the plateau family: the lr 2e-3 round (labeled source batches, the unlabeled images through
    # the student and its BatchNorm, CutMix, the EMA teacher) with the pseudo-label loss weighted 0.
    Config(
        "plateau-control",
        "control: the lr 2e-3 round from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=(*online_round(1000), "selftrain.lr=0.002", "selftrain.unsup_weight=0"),
    ),
    # Session 17: the control at the chosen round's own learning rate (4e-3), the one the DA claim's rows ran at.
    Config(
        "plateau-control-lr4e-3",
        "control: the lr 4e-3 round from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=plateau_round(1000, "selftrain.unsup_weight=0"),
    ),
    Config(
        "plateau-online-lr1e-3-1200",
        "online round from the plateau, round lr 1e-3, 1,200 steps",
        PLATEAU_RECIPE,
        sets=(*online_round(1200), "selftrain.lr=0.001"),
    ),
    Config(
        "plateau-online-2r",
        "two online rounds from the plateau (2 x 600 steps)",
        PLATEAU_RECIPE,
        sets=(*online_round(600, rounds=2), f"selftrain.lr={DEMO_ROUND_LR}"),
    ),
    # U2PL from the plateau (session 15): the chosen plateau round (lr 4e-3) with U2PL's contrastive loss
    # (stages/digitscapes_u2pl.yaml's settings), its negatives unreliable or reliable-only; the round without
    # it is `plateau-online-lr4e-3`. Semi 1/16's claim (001, 003) is read on these rows.
    Config(
        "plateau-u2pl",
        "U2PL from the plateau (lr 4e-3 round + contrastive loss, unreliable negatives)",
        PLATEAU_RECIPE,
        sets=plateau_round(1000, *U2PL_CONTRASTIVE),
    ),
    Config(
        "plateau-u2pl-reliable",
        "U2PL from the plateau, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(1000, *U2PL_CONTRASTIVE, "selftrain.contrastive_negative_source=reliable"),
    ),
    # Session 16: U2PL from the plateau over the longer round (2,000 steps), which target_val chose over the
    # 1,000 steps on semi 1/16's stratified split; the claim row reads the U2PL round length target_val picks.
    Config(
        "plateau-u2pl-2000",
        "U2PL from the plateau, 2,000 steps (lr 4e-3 round + contrastive loss, unreliable negatives)",
        PLATEAU_RECIPE,
        sets=plateau_round(2000, *U2PL_CONTRASTIVE),
    ),
    Config(
        "plateau-u2pl-3000",
        "U2PL from the plateau, 3,000 steps (lr 4e-3 round + contrastive loss, unreliable negatives)",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, *U2PL_CONTRASTIVE),
    ),
    # Session 29: the 3,000-step U2PL round with U2PL+'s pseudo-label denoising (prototype-weighted teacher
    # probabilities, the journal version's Eq. 15-18), and with CutMix on every unlabeled image (the authors' code
    # mixes the whole unlabeled batch; ALGORITHMS.md's p = 0.5 the default). Same schedule: the 3,000-step control.
    Config(
        "plateau-u2pl-3000-denoise",
        "U2PL+ from the plateau, 3,000 steps: U2PL's round + prototype denoising of the pseudo-labels",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, *U2PL_CONTRASTIVE, "selftrain.denoise=true"),
    ),
    Config(
        "plateau-u2pl-3000-cutmix1",
        "U2PL from the plateau, 3,000 steps, CutMix on every unlabeled image (the authors' code)",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, *U2PL_CONTRASTIVE, "selftrain.cutmix_p=1.0"),
    ),
    Config(
        "plateau-u2pl-3000-denoise-cutmix1",
        "U2PL+ from the plateau, 3,000 steps: prototype denoising and CutMix on every unlabeled image",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, *U2PL_CONTRASTIVE, "selftrain.denoise=true", "selftrain.cutmix_p=1.0"),
    ),
    # The contrastive loss in the authors' form as well (ALGORITHMS.md: unlabeled anchors from the lowest alpha_t
    # entropy percentile, the mean over every valid class), with their CutMix on every unlabeled image; lambda_c
    # stays the paper's 0.1 (the authors' 1.0 was below it from the plateau, session 24).
    Config(
        "plateau-u2pl-3000-authors",
        "U2PL from the plateau, 3,000 steps, the authors' code: low-entropy anchors, all-valid mean, CutMix on all",
        PLATEAU_RECIPE,
        sets=plateau_round(
            3000,
            *U2PL_CONTRASTIVE,
            "selftrain.cutmix_p=1.0",
            "selftrain.contrastive_anchor_source=low_entropy",
            "selftrain.contrastive_average=all_valid",
        ),
    ),
    # Session 30: target_val's choice among the 3,000-step U2PL rows (U2PL+ denoising, CutMix on every image) a third
    # longer. Every 3,000-step U2PL curve on semi 1/16's random split still gained 1.6-4.6 points of target_val over its
    # last quarter; 4,000 steps ran 10 min 33 s alone on 2 threads (BENCHMARKS.md, session 30). Its control and
    # its round without the contrastive loss are the same 4,000 steps.
    Config(
        "plateau-u2pl-4000-denoise-cutmix1",
        "U2PL+ from the plateau, 4,000 steps: prototype denoising and CutMix on every unlabeled image",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, *U2PL_CONTRASTIVE, "selftrain.denoise=true", "selftrain.cutmix_p=1.0"),
    ),
    # Seed 003's Table III ablation on that round: its negatives from reliable pixels only.
    Config(
        "plateau-u2pl-4000-denoise-cutmix1-reliable",
        "U2PL+ from the plateau, 4,000 steps, denoising and CutMix on every image, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(
            4000,
            *U2PL_CONTRASTIVE,
            "selftrain.denoise=true",
            "selftrain.cutmix_p=1.0",
            "selftrain.contrastive_negative_source=reliable",
        ),
    ),
    # Session 32: that round with DACS's ClassMix of the labeled images on every unlabeled one: the 250 labeled scenes'
    # digits (the rarest in 2-6 of them) pasted with their ground truth into unlabeled photographs.
    Config(
        "plateau-u2pl-4000-denoise-cutmix1-classmix",
        "U2PL+ from the plateau, 4,000 steps, denoising and CutMix on every image, DACS ClassMix of the labeled images",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, *U2PL_CONTRASTIVE, *CLASSMIX_ROUND),
    ),
    # Session 33: seed 003's Table III ablation and the round without the contrastive loss, on that round (the semi
    # claim's choice): its negatives from reliable pixels only; no contrastive term (denoising, CutMix, ClassMix kept).
    Config(
        "plateau-u2pl-4000-denoise-cutmix1-classmix-reliable",
        "U2PL+ from the plateau, 4,000 steps, denoising, CutMix and ClassMix, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, *U2PL_CONTRASTIVE, *CLASSMIX_ROUND, "selftrain.contrastive_negative_source=reliable"),
    ),
    Config(
        "plateau-online-4000-denoise-cutmix1-classmix",
        "online round from the plateau, 4,000 steps, denoising, CutMix and ClassMix, no contrastive loss",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, *CLASSMIX_ROUND),
    ),
    # Session 34: that ablation again at the authors' contrastive weight (lambda_c 1, their config); on DA's round the
    # choice of negatives changed 10-15 % of the trunk's gradient there against 1-1.6 % at 0.1 (term_gradients.py).
    Config(
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
        "U2PL+ from the plateau, 4,000 steps, denoising, CutMix and ClassMix, lambda_c 1, unreliable negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, *U2PL_CONTRASTIVE, *CLASSMIX_ROUND, *LAMBDA_C_1),
    ),
    Config(
        "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable",
        "U2PL+ from the plateau, 4,000 steps, denoising, CutMix and ClassMix, lambda_c 1, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(
            4000, *U2PL_CONTRASTIVE, *CLASSMIX_ROUND, *LAMBDA_C_1, "selftrain.contrastive_negative_source=reliable"
        ),
    ),
    # Its control: the same 4,000 steps, CutMix and ClassMix without pseudo-labels (the pasted labeled pixels the only
    # labels of the unlabeled batch), so that what the pseudo-labels add and what pasting labeled digits adds separate.
    Config(
        "plateau-control-4000-classmix",
        "control: the 4,000-step round with CutMix and ClassMix of the labeled images, without pseudo-labels",
        PLATEAU_RECIPE,
        sets=plateau_round(
            4000, "selftrain.cutmix_p=1.0", "selftrain.labeled_classmix_p=1.0", "selftrain.pseudo_labels=false"
        ),
    ),
    Config(
        "plateau-online-lr4e-3-4000",
        "online round from the plateau, round lr 4e-3, 4,000 steps",
        PLATEAU_RECIPE,
        sets=plateau_round(4000),
    ),
    # Session 17: the 2,000-step U2PL round's reliable-only ablation (seed 003's Table III on the regime where
    # U2PL reaches its claim), and that round's own control: the same lr and length without pseudo-label loss.
    Config(
        "plateau-u2pl-2000-reliable",
        "U2PL from the plateau, 2,000 steps, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(2000, *U2PL_CONTRASTIVE, "selftrain.contrastive_negative_source=reliable"),
    ),
    # Session 24: the 1,000-step U2PL round at the authors' lambda_c 1 (their config; the paper's 0.1 above). At
    # 0.1 the contrastive term is 3 % of the trunk's gradient and the choice of negatives changes 1-1.6 % of it;
    # at 1, 24-28 % and 10-15 % (benchmarks/term_gradients.py, session 23): Table III's ablation where the
    # negatives can move the model.
    Config(
        "plateau-u2pl-lc1",
        "U2PL from the plateau, lambda_c 1 (the authors' config), unreliable negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(1000, *U2PL_CONTRASTIVE, *LAMBDA_C_1),
    ),
    Config(
        "plateau-u2pl-lc1-reliable",
        "U2PL from the plateau, lambda_c 1, reliable-only negatives",
        PLATEAU_RECIPE,
        sets=plateau_round(1000, *U2PL_CONTRASTIVE, *LAMBDA_C_1, "selftrain.contrastive_negative_source=reliable"),
    ),
    Config(
        "plateau-control-2000",
        "control: the lr 4e-3 2,000-step round from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=plateau_round(2000, "selftrain.unsup_weight=0"),
    ),
    Config(
        "plateau-control-3000",
        "control: the lr 4e-3 3,000-step round from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=plateau_round(3000, "selftrain.unsup_weight=0"),
    ),
    Config(
        "plateau-control-4000",
        "control: the lr 4e-3 4,000-step round from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=plateau_round(4000, "selftrain.unsup_weight=0"),
    ),
    # Seed 000's claim from the plateau (session 15): one offline round on stored pseudo-labels of the plateau
    # model (its auxiliary head trained at weight 0.4), the plateau round's 1,000 steps at lr 4e-3 with its
    # augmentation, with the rectified loss on every pixel (variance) or plain CE above a fixed threshold.
    Config(
        "plateau-rectified",
        "variance + rectified loss, offline round from the plateau",
        PLATEAU_RECIPE,
        sets=PLATEAU_RECTIFIED,
    ),
    # Session 16: the same pair in the authors' form of the rectified loss (seed 000's published command:
    # per-class CE weights re-estimated every step from the batch's pseudo-labels, capped at 7, KL aux||main
    # averaged over every pixel, the auxiliary head's CE at 0.5, align_corners upsampling), aimed at the tail
    # that the paper's form loses against the fixed thresholds; and DARS from the plateau (seed 002's claim)
    # as the same offline round at seed 002's last labeling ratio (0.5), read against `plateau-sweep-0.9`.
    Config(
        "plateau-rectified-authors",
        "variance + rectified loss in the authors' form (class balance, max 7), offline round from the plateau",
        PLATEAU_RECIPE,
        sets=(*PLATEAU_RECTIFIED, *AUTHORS_CLASS_BALANCE, *AUTHORS_RECTIFIED),
    ),
    # Session 17: the authors' form without its class-balance weights (every other option kept), which isolates
    # the one option that paints digits over background and is the rectified loss's other candidate form.
    Config(
        "plateau-rectified-authors-unbalanced",
        "variance + rectified loss in the authors' form without class balance, offline round from the plateau",
        PLATEAU_RECIPE,
        sets=(*PLATEAU_RECTIFIED, *AUTHORS_RECTIFIED),
    ),
    Config(
        "plateau-dars",
        "DARS (alpha 0.5) + CE, offline round from the plateau",
        PLATEAU_RECIPE,
        sets=(*plateau_offline(0.5), "selftrain.method=dars"),
    ),
    # At 0.5 the plateau model's labels keep half of the pixels (the background's least confident ones go, the
    # sweep keeps 78 % at tau 0.9): the labeling ratio is DARS's one knob, chosen on target_val.
    Config(
        "plateau-dars-0.8",
        "DARS (alpha 0.8) + CE, offline round from the plateau",
        PLATEAU_RECIPE,
        sets=(*plateau_offline(0.8), "selftrain.method=dars"),
    ),
    # Session 20: seed 002's iterative training from the plateau, the pair above run for a second round (each
    # round's labels from the previous round's model, the same ratio or threshold). Round 1 is the one-round
    # configuration's own (rounds is not part of a round's fingerprint), so a copy of that run resumes at round 2.
    # Threshold-ST's head-class bias compounds when its own labels teach the next round; DARS aligns each
    # round's labels with the labeled class prior (002 Table 4's "+ IT" rows).
    Config(
        "plateau-dars-0.8-2r",
        "DARS (alpha 0.8) + CE, two offline rounds from the plateau",
        PLATEAU_RECIPE,
        sets=(*plateau_offline(0.8), "selftrain.method=dars", "selftrain.rounds=2"),
    ),
    Config(
        "plateau-sweep-0.9-2r",
        "fixed threshold 0.9 + CE, two offline rounds from the plateau",
        PLATEAU_RECIPE,
        sets=(*PLATEAU_OFFLINE, *fixed_threshold_round(0.9), "selftrain.rounds=2"),
    ),
    # Session 21: seed 000's pair iterated the same way, the rectified round and the threshold target_val chose
    # for one round (tau 0.8) run for a second round; read with tau 0.9's two rounds as the threshold candidates.
    Config(
        "plateau-rectified-2r",
        "variance + rectified loss, two offline rounds from the plateau",
        PLATEAU_RECIPE,
        sets=(*PLATEAU_RECTIFIED, "selftrain.rounds=2"),
    ),
    Config(
        "plateau-sweep-0.8-2r",
        "fixed threshold 0.8 + CE, two offline rounds from the plateau",
        PLATEAU_RECIPE,
        sets=(*PLATEAU_OFFLINE, *fixed_threshold_round(0.8), "selftrain.rounds=2"),
    ),
    # The pair's control: the lr 4e-3 control round twice (round 1 is `plateau-control-lr4e-3`'s own, so a copy of
    # that run resumes at round 2), the same 2 x 1,000 steps without pseudo-label loss.
    Config(
        "plateau-control-lr4e-3-2r",
        "control: two lr 4e-3 rounds from the plateau without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=(*plateau_round(1000, "selftrain.unsup_weight=0"), "selftrain.rounds=2"),
    ),
    *(
        Config(
            f"plateau-sweep-{tau}",
            f"fixed threshold {tau} + CE, offline round from the plateau",
            PLATEAU_RECIPE,
            sets=(*PLATEAU_OFFLINE, *fixed_threshold_round(tau)),
        )
        for tau in TAUS
    ),
    Config(
        "adapted-rectified",
        "variance + rectified loss, offline round after the plateau's online round (seed 000's stage 2)",
        PLATEAU_RECIPE,
        sets=(*ADAPTED, *second_round(*PLATEAU_RECTIFIED)),
    ),
    *(
        Config(
            f"adapted-sweep-{tau}",
            f"fixed threshold {tau} + CE, offline round after the plateau's online round",
            PLATEAU_RECIPE,
            sets=(*ADAPTED, *second_round(*PLATEAU_OFFLINE, *fixed_threshold_round(tau))),
        )
        for tau in TAUS
    ),
    # Stage 2's control (round 2 = `adapted-sweep-0.9` with its pseudo-label loss weighted 0: what 1,000 more
    # steps on the source with the unlabeled images through BatchNorm give) and DARS as stage 2 (seed 002's
    # claim after the online round, read against `adapted-sweep-0.9`).
    Config(
        "adapted-control",
        "control: stage 2 after the plateau's online round without pseudo-label loss",
        PLATEAU_RECIPE,
        sets=(*ADAPTED, *second_round(*PLATEAU_OFFLINE, *fixed_threshold_round(0.9), "selftrain.unsup_weight=0")),
    ),
    Config(
        "adapted-dars-0.8",
        "DARS (alpha 0.8) + CE, offline round after the plateau's online round",
        PLATEAU_RECIPE,
        sets=(*ADAPTED, *second_round(*plateau_offline(0.8), "selftrain.method=dars")),
    ),
    *consistency_pair("mr", PLATEAU_RECIPE, ""),
    # The same two stages with the auxiliary head on c3 (stride 8; session 27): its own plateau pretrain.
    Config("c3mr-pretrain", "the plateau recipe's pretrain, aux head on c3", PLATEAU_C3_RECIPE, "pretrain"),
    *consistency_pair("c3mr", PLATEAU_C3_RECIPE, ", aux head on c3"),
    Config("pretrain-rectify", "pretrain of the rectify recipe (aux 0.5)", RECTIFY_RECIPE, "pretrain"),
    Config("rectified", "variance + rectified loss", RECTIFY_RECIPE),
    *(
        Config(
            f"sweep-{tau}",
            f"fixed threshold {tau} + CE (rectify's round)",
            RECTIFY_RECIPE,
            sets=fixed_threshold_round(tau),
        )
        for tau in TAUS
    ),
    # Ablation: the rectify recipe with the auxiliary classifier one level shallower (model.aux_level c3),
    # so that the main and auxiliary heads do not share every layer (stages/digitscapes_rectify_c3.yaml).
    Config("c3-pretrain", "pretrain of the rectify recipe, aux head on c3", RECTIFY_C3_RECIPE, "pretrain"),
    Config("c3-rectified", "variance + rectified loss, aux head on c3", RECTIFY_C3_RECIPE),
    Config(
        "c3-sweep-0.9",
        "fixed threshold 0.9 + CE (rectify's round), aux head on c3",
        RECTIFY_C3_RECIPE,
        sets=fixed_threshold_round(0.9),
    ),
    # Seed 000's "Ours + dropout 0.5" (its uncertainty table): dropout 0.5 before both classifiers during the
    # round, so the heads disagree more where the pseudo-label is wrong (selftrain.head_dropout). Its control is
    # the fixed threshold with the same dropout: the comparison is then the loss, not the dropout.
    Config(
        "dropout-rectified",
        "variance + rectified loss, head dropout 0.5",
        RECTIFY_RECIPE,
        sets=("selftrain.head_dropout=0.5",),
    ),
    Config(
        "dropout-sweep-0.9",
        "fixed threshold 0.9 + CE (rectify's round), head dropout 0.5",
        RECTIFY_RECIPE,
        sets=(*fixed_threshold_round(0.9), "selftrain.head_dropout=0.5"),
    ),
    Config("pretrain-u2pl", "pretrain of the U2PL recipe (its warm-up)", U2PL_RECIPE, "pretrain"),
    Config("u2pl-unreliable", "U2PL, unreliable negatives", U2PL_RECIPE),
    Config(
        "u2pl-reliable",
        "U2PL, reliable-only negatives",
        U2PL_RECIPE,
        sets=("selftrain.contrastive_negative_source=reliable",),
    ),
    Config(
        "u2pl-nocontrastive", "U2PL without the contrastive loss", U2PL_RECIPE, sets=("selftrain.contrastive=false",)
    ),
    Config(
        "everything",
        "everything on: U2PL + rectified + denoising",
        U2PL_RECIPE,
        sets=("selftrain.rectified=true", "selftrain.denoise=true"),
    ),
    # The contrastive weight of the authors' config (lambda_c 1; the paper's 0.1 above, ALGORITHMS.md: both
    # reported): Table III's negatives ablation where the contrastive loss weighs ten times more.
    Config(
        "lc1-u2pl-unreliable",
        "U2PL, unreliable negatives, lambda_c 1 (the authors' config)",
        U2PL_RECIPE,
        sets=("selftrain.lambda_contrastive=1.0",),
    ),
    Config(
        "lc1-u2pl-reliable",
        "U2PL, reliable-only negatives, lambda_c 1",
        U2PL_RECIPE,
        sets=("selftrain.lambda_contrastive=1.0", "selftrain.contrastive_negative_source=reliable"),
    ),
]
BY_KEY = {c.key: c for c in CONFIGS}
PRETRAIN_ROW = {c.recipe: c.key for c in CONFIGS if c.kind == "pretrain"}  # the row each recipe's pretrain fills


def recipe_path(recipe: str) -> str:
    """Relative to the repository, where every command runs."""
    return f"stages/{recipe}.yaml"


def select(prefixes: list[str]) -> list[Config]:
    """The configurations named by ``prefixes``, in the study's order: a whole key selects only itself
    (``sweep-0.9`` is not also ``sweep-0.95``), anything else every key it starts (``sweep``, ``u2pl``)."""

    def named(key: str, p: str) -> bool:
        return key == p if p in BY_KEY else key.startswith(p)

    unknown = [p for p in prefixes if not any(named(c.key, p) for c in CONFIGS)]
    if unknown:
        raise SystemExit(f"--configs {' '.join(unknown)}: no such configuration; keys: {', '.join(BY_KEY)}")
    return [c for c in CONFIGS if any(named(c.key, p) for p in prefixes)]


def round_settings(config: Config, extra: tuple[str, ...] = ()):
    """The ``selftrain`` section ``labelpipe selftrain`` resolves for this configuration: the recipe's, then
    ``sets`` and ``extra``, validated (labelpipe.config's own merge; the driver never imports torch, which
    resolving the model section would)."""
    from labelpipe.config import SelftrainConfig, deep_merge, load_yaml, parse_set_option

    raw = load_yaml(REPO / recipe_path(config.recipe))
    for item in (*config.sets, *extra):
        raw = deep_merge(raw, parse_set_option(item))
    return SelftrainConfig.model_validate(raw.get("selftrain", {}))


def training_dir(run: Path, model: str) -> Path:
    """The stage directory that trained ``model`` (pretrain or round-K): its weights, log and manifest."""
    return run / "pretrain" if model == "pretrain" else run / "selftrain" / model / "train"


def weights_path(run: Path, model: str) -> Path:
    """The weights ``labelpipe evaluate --model MODEL`` reads (pretrain or round-K)."""
    return training_dir(run, model) / "model.safetensors"


def manifest_wall(path: Path) -> float:
    try:
        return float(json.loads(path.read_text()).get("wall_s") or 0.0)
    except (OSError, ValueError):
        return 0.0


def stage_wall_s(run: Path, model: str) -> float:
    """Seconds the stages that made ``model`` took when they ran (a later skip does not reset it)."""
    if model == "pretrain":
        return manifest_wall(run / "pretrain" / "manifest.json")
    rounds = int(model.split("-")[1])
    return sum(
        manifest_wall(run / "selftrain" / f"round-{k}" / stage / "manifest.json")
        for k in range(1, rounds + 1)
        for stage in ("predict", "pseudolabel", "train")
    )


def pseudo_label_precision(run: Path, model: str) -> dict | None:
    """Per-class precision (of the kept pixels, against target_train's masks), the kept share and the KL to the
    labeled prior of the labels the last round trained on: ``selftrain/round-K/pseudolabel/report.json``."""
    try:
        report = json.loads((run / "selftrain" / model / "pseudolabel" / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return {
        "kept_fraction": report.get("kept_fraction"),
        # Seed 002's measure of the labels' head-class bias: KL(labeled prior || the kept labels' distribution).
        "kl_prior_pseudo": report.get("kl_prior_pseudo"),
        # How well the confidence and the heads' variance rank the predictions' errors (AUROC; session 24).
        "error_auroc_conf": report.get("error_auroc_conf"),
        "error_auroc_variance": report.get("error_auroc_variance"),
        "per_class": {name: c.get("precision") for name, c in report.get("per_class", {}).items()},
    }


def same_pretrain(base: Path, run: Path) -> bool:
    """Whether ``run`` holds the pretrained weights of ``base`` (by content: copies keep no identity)."""
    from labelpipe.store.atomic import sha256_file

    a, b = base / "pretrain" / "model.safetensors", run / "pretrain" / "model.safetensors"
    return b.exists() and a.stat().st_size == b.stat().st_size and sha256_file(a) == sha256_file(b)


def share_round1_predict(run: Path) -> None:
    """Round 1 predicts with the pretrained model in every configuration of a recipe: copy a sibling's store.

    The predict stage's fingerprint covers the weights, split and options, not the run directory, so the copy
    is taken as up to date and skipped; a copy made with other settings is simply recomputed.
    """
    target = run / "selftrain" / "round-1" / "predict"
    if (target / "manifest.json").exists():
        return
    for sibling in sorted(run.parent.iterdir()):
        source = sibling / "selftrain" / "round-1" / "predict"
        manifest = source / "manifest.json"
        if sibling != run and manifest.exists() and json.loads(manifest.read_text()).get("status") == "done":
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name("predict.copying")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(source, tmp)
            tmp.rename(target)
            return


@dataclass(frozen=True)
class DataVariant:
    """The DigitScapes build the study runs on: the recipes' own (seed 0, alpha blend) unless ``--data-seed`` /
    ``--blend`` name another, one the settings were never chosen on (issue 14: "tune for the method")."""

    seed: int = 0
    blend: str = "alpha"
    source_style: str = "textured"
    difference_share: float | None = None  # ``blended`` only; None: its own share (0.5)

    def sets(self) -> list[str]:
        """``--set`` options of every command: none for the recipes' own build."""
        sets = [] if self.seed == 0 else [f"data.digitscapes.seed={self.seed}"]
        sets += [] if self.blend == "alpha" else [f"data.digitscapes.blend={self.blend}"]
        sets += [] if self.source_style == "textured" else [f"data.digitscapes.source_style={self.source_style}"]
        sets += [] if self.difference_share is None else [f"data.digitscapes.difference_share={self.difference_share}"]
        return [a for s in sets for a in ("--set", s)]

    def record(self) -> dict[str, object]:
        style = {} if self.source_style == "textured" else {"source_style": self.source_style}
        share = {} if self.difference_share is None else {"difference_share": self.difference_share}
        return {"digitscapes_seed": self.seed, "blend": self.blend, **style, **share}

    def describe(self) -> str:
        style = "" if self.source_style == "textured" else f", {self.source_style} source"
        share = "" if self.difference_share is None else f" ({self.difference_share:g} by difference)"
        return f"DigitScapes seed {self.seed}, {self.blend} blend{style}{share}"


class Matrix:
    """Runs (or, with ``dry_run``, prints) the study's commands; each pretrain and evaluation once per call."""

    def __init__(
        self,
        out: Path,
        dry_run: bool,
        round_steps: int | None,
        echo: TextIO | None = None,
        data: DataVariant | None = None,
    ) -> None:
        self.out, self.dry_run, self.echo = out, dry_run, echo or sys.stdout
        self.extra = (f"selftrain.steps={round_steps}",) if round_steps else ()
        self.data = data or DataVariant()
        self.done: set[tuple] = set()
        self.recorded: dict[tuple[str, int, str], dict] = {}

    def command(self, argv: list[str], shown: list[str]) -> None:
        print(shlex.join(shown), file=self.echo, flush=True)
        if self.dry_run:
            return
        result = subprocess.run(argv, cwd=REPO, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(f"failed: {shlex.join(shown)}\n{result.stderr[-2000:]}")

    def labelpipe(self, *args: str) -> None:
        self.command([sys.executable, "-m", "labelpipe", *args], ["labelpipe", *args])

    def common(self, recipe: str, protocol: str, seed: int) -> list[str]:
        return ["--config", recipe_path(recipe), "--seed", str(seed), "--protocol", protocol, *self.data.sets()]

    def pretrain(self, recipe: str, protocol: str, seed: int) -> Path:
        """``RUN/pretrains/<recipe>-<protocol>-s<seed>``, trained and evaluated on both splits; its row (the
        recipe's pretrain row: ``baseline`` for the base recipe) recorded once per call, whichever
        configuration needed it first, and not again when its last record in results.jsonl is the same result."""
        run = self.out / "pretrains" / f"{recipe}-{protocol}-s{seed}"
        if ("pretrain", run) in self.done:
            return run
        self.done.add(("pretrain", run))
        t0 = time.time()
        self.labelpipe("pretrain", "--run", str(run), *self.common(recipe, protocol, seed))
        self.evaluate(run, recipe, protocol, seed, "pretrain")
        if protocol != "oracle" and recipe in PRETRAIN_ROW and not self.dry_run:
            self.recorded[(protocol, seed, PRETRAIN_ROW[recipe])] = self.record(
                BY_KEY[PRETRAIN_ROW[recipe]], protocol, seed, run, "pretrain", time.time() - t0, online=False
            )
        return run

    def evaluate(self, run: Path, recipe: str, protocol: str, seed: int, model: str) -> None:
        """``labelpipe evaluate`` of ``model`` on each split, its metrics kept as ``matrix/<model>.<split>.json``
        (the stage writes ``evaluate/<model>/metrics.json`` whatever the split); skipped when that copy is
        newer than the weights."""
        for split in SPLITS:
            kept = run / "matrix" / f"{model}.{split}.json"
            if ("evaluate", kept) in self.done:
                continue
            self.done.add(("evaluate", kept))
            weights = weights_path(run, model)
            if kept.exists() and weights.exists() and kept.stat().st_mtime_ns >= weights.stat().st_mtime_ns:
                continue
            self.labelpipe(
                "evaluate", "--run", str(run), *self.common(recipe, protocol, seed), "--model", model, "--split", split
            )
            if not self.dry_run:
                written = run / "evaluate" / model / "metrics.json"
                if json.loads(written.read_text()).get("split") != split:
                    raise SystemExit(f"{written}: not the evaluation of {model} on {split}")
                kept.parent.mkdir(exist_ok=True)
                shutil.copy2(written, kept)

    def adabn(self, run: Path) -> None:
        """The baseline with AdaBN, in a subprocess (the driver never imports torch): ``matrix/adabn.json``."""
        kept = run / "matrix" / "adabn.json"
        weights = weights_path(run, "pretrain")
        if kept.exists() and weights.exists() and kept.stat().st_mtime_ns >= weights.stat().st_mtime_ns:
            return
        script = str(Path(__file__).resolve().relative_to(REPO))
        self.command([sys.executable, script, "--adabn", str(run)], ["python", script, "--adabn", str(run)])

    def selftrain(self, config: Config, protocol: str, seed: int) -> tuple[Path, str]:
        base = self.pretrain(config.recipe, protocol, seed)
        run = self.out / f"{protocol}-s{seed}" / config.recipe / config.key
        if self.dry_run:
            print(f"# copy {base} -> {run} (pretrain only; round 1's predictions from a sibling)", file=self.echo)
        else:
            if run.exists() and not same_pretrain(base, run):
                # The shared pretrain was redone (its recipe changed): this configuration's rounds started
                # from the old one and would be skipped as up to date, so they go.
                print(f"# {run}: its pretrain is not {base}'s any more; starting it again", file=self.echo)
                shutil.rmtree(run)
            if not run.exists():
                shutil.copytree(base, run, ignore=shutil.ignore_patterns("evaluate", "matrix", "checkpoint.pt"))
                shutil.copy2(base / "pretrain" / "checkpoint.pt", run / "pretrain" / "checkpoint.pt")
            if round_settings(config, self.extra).pseudo_source == "stored":  # an online round predicts nothing
                share_round1_predict(run)
        sets = [a for s in (*config.sets, *self.extra) for a in ("--set", s)]
        self.labelpipe("selftrain", "--run", str(run), *self.common(config.recipe, protocol, seed), *sets)
        model = f"round-{round_settings(config, self.extra).rounds}"
        self.evaluate(run, config.recipe, protocol, seed, model)
        return run, model

    def run_config(self, config: Config, protocol: str, seed: int) -> dict | None:
        """Run one row for (protocol, seed); its results.jsonl record (None on a dry run)."""
        t0 = time.time()
        online = False
        if config.kind == "pretrain":
            self.pretrain(config.recipe, protocol, seed)
            return self.recorded.get((protocol, seed, config.key))
        if config.kind == "oracle":
            run, model = self.pretrain(config.recipe, "oracle", seed), "pretrain"
        elif config.kind == "adabn":
            run, model = self.pretrain(config.recipe, protocol, seed), "pretrain"
            self.adabn(run)
        else:
            run, model = self.selftrain(config, protocol, seed)
            settings = round_settings(config, self.extra)
            online = settings.for_round(settings.rounds).pseudo_source == "teacher"  # the last round's
        if self.dry_run:
            return None
        return self.record(config, protocol, seed, run, model, time.time() - t0, online)

    def record(self, config: Config, protocol: str, seed: int, run: Path, model: str, wall: float, online: bool):
        if config.kind == "adabn":
            adabn = json.loads((run / "matrix" / "adabn.json").read_text())
            evals = {split: adabn[split] for split in SPLITS}
        else:
            evals = {split: json.loads((run / "matrix" / f"{model}.{split}.json").read_text()) for split in SPLITS}
        val, test = evals["target_val"], evals["target_test"]
        rec = {
            "protocol": protocol,
            "seed": seed,
            "data": self.data.record(),
            "config": config.key,
            "recipe": config.recipe,
            "run": str(run),
            "model": model,
            "val_miou": val["miou"],
            "val_tail_miou": val.get("tail_miou"),
            "test_miou": test["miou"],
            "test_tail_miou": test.get("tail_miou"),
            "test_per_class_iou": test.get("per_class_iou"),
            "stage_wall_s": 0.0 if config.kind == "adabn" else stage_wall_s(run, model),
            "wall_s": wall,
            # The stored labels of an online round are not what it trained on (the teacher's are).
            "pseudo_labels": None if model == "pretrain" or online else pseudo_label_precision(run, model),
            "val_curve": val_curve(run, model),
        }
        path = self.out / "results.jsonl"
        previous = latest_record(path, rec)
        if previous is not None and all(previous.get(k) == rec[k] for k in SAME_RESULT):
            return previous  # the same weights evaluated again (a resumed call): recorded once, with its first wall
        with path.open("a") as fh:
            fh.write(json.dumps(rec) + "\n")
        return rec


# What makes two records of one (protocol, seed, build, configuration) the same result; the wall times differ
# when a call resumes a finished run.
SAME_RESULT = ("run", "model", "val_miou", "val_tail_miou", "test_miou", "test_tail_miou", "test_per_class_iou")


def latest_record(path: Path, rec: dict) -> dict | None:
    """The last record in ``path`` of ``rec``'s (protocol, seed, build, configuration): the one the report reads."""
    if not path.exists():
        return None
    key = (rec["protocol"], rec["seed"], record_variant(rec), rec["config"])
    for old in reversed(read_records(path)):
        if (old.get("protocol"), old.get("seed"), record_variant(old), old.get("config")) == key:
            return old
    return None


def val_curve(run: Path, model: str) -> list[list[float]]:
    """[[step, target_val mIoU on the first val_limit images], ...] of the training that wrote ``model``; for
    round K of several, rounds 1..K end to end (each round's steps after the last logged step of the one before)."""
    models = [model] if model == "pretrain" else [f"round-{k}" for k in range(1, int(model.split("-")[1]) + 1)]
    curve: list[list[float]] = []
    for name in models:
        log = training_dir(run, name) / "log.jsonl"
        if not log.is_file():
            return []  # a round without its log: no curve rather than one missing a round
        offset = curve[-1][0] if curve else 0
        rows = (json.loads(line) for line in log.read_text().splitlines() if '"val_miou"' in line)
        curve += [[offset + r["step"], r["val_miou"]] for r in rows]
    return curve


def last_quarter_gain(curve: list[list[float]]) -> float | None:
    """target_val mIoU at the end minus at the last point at or before 3/4 of the schedule (issue 14's
    plateau: < 1 point)."""
    if len(curve) < 2:
        return None
    end_step, end = curve[-1]
    before = [v for step, v in curve if step <= 0.75 * end_step]
    return end - before[-1] if before else None


def adabn_main(run: Path) -> None:
    """``--adabn RUN``: RUN's pretrained model, BatchNorm re-estimated on the protocol's unlabeled split
    (adabn_control.adapt_batchnorm), evaluated on target_val and target_test -> RUN/matrix/adabn.json."""
    import importlib.util

    from torch.utils.data import DataLoader

    from labelpipe.config import resolve_config
    from labelpipe.context import load_trained_model, open_context
    from labelpipe.data.dataset import SegmentationDataset, collate
    from labelpipe.runtime import setup
    from labelpipe.store.atomic import atomic_write_json

    spec = importlib.util.spec_from_file_location("adabn_control", Path(__file__).with_name("adabn_control.py"))
    adabn_control = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(adabn_control)
    rt = setup("cpu")
    ctx = open_context(resolve_config(run), run, rt)
    _, model, _ = load_trained_model(ctx, "pretrain")
    unlabeled = SegmentationDataset(ctx.source, ctx.source.split(ctx.roles["unlabeled"]), require_masks=False)
    adabn_control.adapt_batchnorm(model, DataLoader(unlabeled, batch_size=64, collate_fn=collate), rt.device)
    out = {"unlabeled": ctx.roles["unlabeled"]}
    for split in SPLITS:
        m = adabn_control.metrics(ctx, model, split)
        out[split] = {key: m[key] for key in ("miou", "tail_miou", "per_class_iou")}
    (run / "matrix").mkdir(exist_ok=True)
    atomic_write_json(run / "matrix" / "adabn.json", out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", default=None, help="default: da semi-1_16 (--report: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--configs", nargs="+", default=None, help=f"keys or key prefixes (default all): {', '.join(BY_KEY)}"
    )
    parser.add_argument("--round-steps", type=int, default=None, help="selftrain steps per round (smoke runs)")
    parser.add_argument("--out", default=str(REPO / "runs" / "matrix"))
    parser.add_argument("--data-seed", type=int, default=0, help="the DigitScapes build's seed (the recipes': 0)")
    parser.add_argument("--blend", choices=["alpha", "diff"], default="alpha", help="the DigitScapes target blend")
    parser.add_argument(
        "--source-style",
        choices=["textured", "inked", "blended", "smooth"],
        default="textured",
        help="the DigitScapes source",
    )
    parser.add_argument(
        "--difference-share",
        type=float,
        default=None,
        help="with --source-style blended: the share of its strokes composited by difference (default 0.5)",
    )
    parser.add_argument("--quick", action="store_true", help="DA, seed 0, rounds of 100 steps, into OUT-quick")
    parser.add_argument("--dry-run", action="store_true", help="print every command in order; run nothing")
    parser.add_argument("--report", action="store_true", help="only print the tables of what --out holds")
    parser.add_argument(
        "--per-class",
        action="store_true",
        help="with --report: each protocol's per-class target_test IoU too, for the --configs given (default all)",
    )
    parser.add_argument(
        "--curves",
        action="store_true",
        help="with --report: the claims' target_val curves from the plateau, OUT/curves-PROTOCOL.png",
    )
    parser.add_argument(
        "--oracles-from",
        type=Path,
        nargs="+",
        default=None,
        help="with --report: results.jsonl files whose oracle rows of the same DigitScapes seed and blend (any "
        "source style: the oracle never reads the source) fill the oracle rows OUT lacks (the first file's win)",
    )
    parser.add_argument("--adabn", type=Path, default=None, help=argparse.SUPPRESS)  # one AdaBN evaluation
    args = parser.parse_args(argv)
    if args.adabn is not None:
        adabn_main(args.adabn)
        return
    out = Path(args.out).resolve()
    if args.report:
        only = [c.key for c in select(args.configs)] if args.configs else None
        report(
            out,
            per_class=args.per_class,
            only=only,
            protocols=args.protocols,
            curves=args.curves,
            oracles_from=args.oracles_from,
        )
        return
    if args.per_class or args.curves or args.oracles_from:
        parser.error("--per-class, --curves and --oracles-from are options of --report")
    if args.quick:
        args.protocols, args.seeds = ["da"], [0]
        args.round_steps = args.round_steps or 100
        out = out.with_name(out.name + "-quick")
    chosen = select(args.configs or list(BY_KEY))
    if not args.dry_run:
        out.mkdir(parents=True, exist_ok=True)
    if args.difference_share is not None and args.source_style != "blended":
        parser.error("--difference-share needs --source-style blended")
    share = None if args.difference_share in (None, 0.5) else args.difference_share
    data = DataVariant(args.data_seed, args.blend, args.source_style, share)
    matrix = Matrix(out, args.dry_run, args.round_steps, data=data)
    for protocol in args.protocols or ["da", "semi-1_16"]:
        for seed in args.seeds:
            for config in chosen:
                rec = matrix.run_config(config, protocol, seed)
                if rec is not None:
                    print(
                        f"# {protocol} seed {seed} {config.key}: target_val {100 * rec['val_miou']:.1f}, "
                        f"target_test {100 * rec['test_miou']:.1f} mIoU ({rec['wall_s']:.0f} s)",
                        flush=True,
                    )
    if not args.dry_run:
        print()
        report(out)


# ---------------------------------------------------------------------------------------------------------------
# The report: everything from results.jsonl (the last record of each (protocol, seed, configuration) counts).

Latest = dict[tuple[str, int, str], dict]


def read_records(path: Path) -> list[dict]:
    """Every record of a results.jsonl, in the order written (blank lines skipped)."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def read_results(out: Path, oracles_from: list[Path] | None = None) -> Latest:
    """The last record of each (protocol, seed, configuration) in ``out``/results.jsonl; with ``oracles_from``,
    results.jsonl files whose oracle rows of the same DigitScapes seed and blend stand in for missing ones (the oracle
    trains on the target alone, so another source style's records of it are the same experiment)."""
    path = out / "results.jsonl"
    if not path.exists():
        raise SystemExit(f"{path}: no results; run the matrix first (python benchmarks/selftrain_matrix.py)")
    latest: Latest = {}
    records = read_records(path)
    for r in records:
        latest[(r["protocol"], int(r["seed"]), r["config"])] = r
    builds = sorted({record_variant(r).describe() for r in records})  # every record, superseded ones too
    if len(builds) > 1:  # a seed of one build paired with another's would be a meaningless gain
        raise SystemExit(f"{path}: records of {' and '.join(builds)}; report each build from its own --out")
    # The oracle is one run per seed for both protocols (protocol ``oracle``): a protocol whose seed has no
    # oracle record of its own (recorded by a call that ran only the other protocol) reads the other's.
    oracle_keys = [c.key for c in CONFIGS if c.kind == "oracle"]
    oracles = {(s, k): r for (_, s, k), r in sorted(latest.items()) if k in oracle_keys}
    target = record_variant(records[0]) if records else None
    for source in oracles_from or []:
        if not source.is_file():
            raise SystemExit(f"{source}: no such results file (--oracles-from)")
        for r in read_records(source):
            if r["config"] not in oracle_keys:
                continue
            other = record_variant(r)
            if target is None or (other.seed, other.blend) != (target.seed, target.blend):
                ours = target.describe() if target else "no build"
                raise SystemExit(f"{source}: an oracle of {other.describe()}; the records are of {ours}")
            oracles.setdefault((int(r["seed"]), r["config"]), r)  # this build's own oracle runs win
    for protocol, seed in {(p, s) for (p, s, _) in latest}:
        for key in oracle_keys:
            if (seed, key) in oracles:
                latest.setdefault((protocol, seed, key), oracles[seed, key])
    return latest


def record_variant(rec: dict) -> DataVariant:
    """The build a record ran on (records before the ``data`` field: the recipes' own)."""
    data = rec.get("data") or {}
    share = data.get("difference_share")
    return DataVariant(
        int(data.get("digitscapes_seed", 0)),
        str(data.get("blend", "alpha")),
        str(data.get("source_style", "textured")),
        None if share is None else float(share),
    )


def family(key: str) -> tuple[str, str, str, str]:
    """The baseline, oracle, AdaBN and control rows ``key`` is read against: those of the plateau recipe for its rows
    (item 2: self-training from the baseline at its plateau is measured against that baseline and the oracle
    trained as long), the 1,000-step ones for everything else."""
    if key.startswith("c3mr-"):  # their own pretrain (the auxiliary head on c3) is their baseline
        return "c3mr-pretrain", "oracle-plateau", "adabn-plateau", plateau_control(key)
    if is_plateau(key):
        return "baseline-plateau", "oracle-plateau", "adabn-plateau", plateau_control(key)
    return "baseline", "oracle", "adabn", "control"


# The plateau family's controls: its rounds without pseudo-label loss, at the learning rates and lengths its rounds
# ran (session 14's lr 2e-3 one first, what a round with no control of its own is read against).
PLATEAU_CONTROLS = (
    "plateau-control",
    "plateau-control-lr4e-3",
    "plateau-control-2000",
    "plateau-control-3000",
    "plateau-control-4000",
    "plateau-control-lr4e-3-2r",
    "adapted-control",
    "plateau-control-4000-classmix",
)


@functools.cache
def plateau_control(key: str) -> str:
    """The control of a plateau round: the one with the round's own learning rate, length and number of rounds
    (session 17: a control at another schedule misreads what the pseudo-labels add), else ``plateau-control``
    (also for the baseline, oracle and AdaBN rows, which have no round)."""
    if BY_KEY[key].kind != "selftrain":
        return PLATEAU_CONTROLS[0]
    if key.startswith("adapted-"):  # stage 2 after the online round: the same two rounds, round 2 without them
        return "adapted-control"
    # Rows with ClassMix have a control with it (session 32) where one ran at their schedule.
    schedule = {
        c: (s.lr, s.steps, s.rounds, s.labeled_classmix_p)
        for c in (key, *PLATEAU_CONTROLS)
        for s in [round_settings(BY_KEY[c])]
    }
    exact = (c for c in PLATEAU_CONTROLS if schedule[c] == schedule[key])
    same_length = (c for c in PLATEAU_CONTROLS if schedule[c][:3] == schedule[key][:3])
    return next(exact, next(same_length, PLATEAU_CONTROLS[0]))


def control_of(latest: Latest, protocol: str, key: str) -> str:
    """The control ``key`` is read against in ``protocol``: its family's, or where that one was not run in this
    protocol, the family's first (the lr 2e-3 round, the only plateau control before session 17)."""
    control = family(key)[3]
    if values(latest, protocol, control, "test_miou"):
        return control
    return PLATEAU_CONTROLS[0] if is_plateau(key) else control


def over_budget(key: str) -> bool:
    """Rows read for a paper's claim that are not candidates for the best self-training, since they take longer
    than the 12 minutes a configuration (issue 14, item 5): seed 000's stage 2 after the 2,000-step online round
    (9 min 45 s + 4 min 17 s on 2 threads, session 23); and session 27's ablations of seed 000's pair (a stage 1
    with the heads' consistency term, `mr-`, and the same with the auxiliary head on c3, `c3mr-`, whose own
    pretrain is not the plateau baseline the DA claim is read against); and session 41's round from the baseline
    trained twice as long (`long-`: a 6,000-step pretrain, ~8 min, before the round's ~9.5)."""
    return key.startswith(("adapted-", "mr-", "c3mr-", "long-"))


def is_plateau(key: str) -> bool:
    """A row of the plateau family: the plateau recipe's, its variant with the auxiliary head on c3, or the oracle
    trained twice as long."""
    return key in BY_KEY and BY_KEY[key].recipe in (PLATEAU_RECIPE, PLATEAU_C3_RECIPE, ORACLE_LONG_RECIPE)


def choose_best(latest: Latest, protocol: str, keys: list[str]) -> tuple[str | None, list[str], int]:
    """The best of ``keys`` on target_val among those run on the most seeds (one run on fewer, an ablation
    started late, would otherwise narrow every candidate's mean to its seeds), those left out, that count."""
    seed_counts = {k: len(values(latest, protocol, k, "val_miou")) for k in keys}
    most = max(seed_counts.values(), default=0)
    best, _, _ = best_on_val(latest, protocol, [k for k, n in seed_counts.items() if n == most])
    return best, sorted(k for k, n in seed_counts.items() if 0 < n < most), most


def oracle_share(latest: Latest, protocol: str, key: str, oracle: str) -> str:
    """Per seed key / oracle of target_test mIoU, in % (item 0: the source-only model <= 70 % of the oracle)."""
    x, o = values(latest, protocol, key, "test_miou"), values(latest, protocol, oracle, "test_miou")
    shares = [100 * x[s] / o[s] for s in sorted(x) if s in o and o[s] > 0]
    if not shares:
        return ""
    return f"{mean_std(shares, ' %')} ({', '.join(f'{v:.0f}' for v in shares)})"


def values(latest: Latest, protocol: str, key: str, field: str) -> dict[int, float]:
    """Seed -> 100 * field of ``key``'s records (seeds without the field left out)."""
    return {
        s: 100 * r[field] for (p, s, k), r in latest.items() if p == protocol and k == key and r.get(field) is not None
    }


def mean_std(v: list[float] | np.ndarray, unit: str = "") -> str:
    """``mean ± std`` over seeds, the sample standard deviation (0 for one seed)."""
    if len(v) == 0:
        return "-"
    a = np.asarray(v, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}{unit}"


def paired(latest: Latest, protocol: str, key: str, reference: str, field: str = "test_miou") -> np.ndarray:
    """Per-seed differences ``key - reference`` of ``field`` (in points), over the seeds both have: the seeds'
    shared spread cancels."""
    a, b = values(latest, protocol, key, field), values(latest, protocol, reference, field)
    return np.asarray([a[s] - b[s] for s in sorted(a) if s in b], dtype=float)


def gain(latest: Latest, protocol: str, key: str, reference: str | None, field: str = "test_miou") -> str:
    if reference is None or key == reference:
        return "-"
    d = paired(latest, protocol, key, reference, field)
    if len(d) == 0:
        return "-"
    return f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0.0:.1f} ({len(d)})"


def gap_share(latest: Latest, protocol: str, key: str, oracle: str | None = None) -> str:
    """Per seed (x - baseline) / (oracle - baseline) of target_test mIoU, in %, mean ± std (``key``'s
    family's baseline and oracle, or ``oracle``)."""
    baseline, family_oracle, _, _ = family(key)
    oracle = oracle or family_oracle
    x, b, o = (values(latest, protocol, k, "test_miou") for k in (key, baseline, oracle))
    shares = [100 * (x[s] - b[s]) / (o[s] - b[s]) for s in sorted(x) if s in b and s in o and o[s] > b[s]]
    if key == baseline or not shares:
        return "-"
    a = np.asarray(shares)
    return f"{a.mean():.0f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.0f} % ({len(a)})"


def precision_column(latest: Latest, protocol: str, key: str) -> str:
    """Mean over seeds of each class's pseudo-label precision (%), background first: ``bg / digits``."""
    per_seed = [
        r["pseudo_labels"]["per_class"]
        for (p, _, k), r in sorted(latest.items())
        if p == protocol and k == key and r.get("pseudo_labels")
    ]
    classes = list(dict.fromkeys(name for c in per_seed for name in c))  # a record without classes adds none
    if not classes:
        return "-"
    means = []
    for name in classes:
        v = [c[name] for c in per_seed if c.get(name) is not None]
        means.append(f"{100 * np.mean(v):.0f}" if v else "-")
    return f"{means[0]} / {' '.join(means[1:])}" if len(means) > 1 else means[0]


def best_on_val(latest: Latest, protocol: str, keys: list[str]) -> tuple[str | None, dict[str, float], set[int]]:
    """The key of ``keys`` with the highest mean target_val mIoU, every key's mean, and the seeds the means
    are over: the only choice the study makes, on target_val, never on target_test. The means are over the
    seeds every candidate ran (a candidate run on one easy seed must not beat one run on three); with no
    seed in common (an empty set), over each candidate's own seeds."""
    per_key = {k: v for k in keys if (v := values(latest, protocol, k, "val_miou"))}
    common = set.intersection(*(set(v) for v in per_key.values())) if per_key else set()
    means = {
        k: float(np.mean([x for seed, x in v.items() if not common or seed in common])) for k, v in per_key.items()
    }
    return (max(means, key=means.__getitem__) if means else None), means, common


def report(
    out: Path,
    file: TextIO | None = None,
    per_class: bool = False,
    only: list[str] | None = None,
    protocols: list[str] | None = None,
    curves: bool = False,
    oracles_from: list[Path] | None = None,
) -> None:
    """Per protocol (those of ``protocols`` when given): the study's table in the issue's order, then the claims'
    comparisons; with ``per_class``, the per-class table of the configurations that ran (of ``only``'s keys); with
    ``curves``, the claims' target_val curves as ``out``/curves-PROTOCOL.png."""
    file = file or sys.stdout
    latest = read_results(out, oracles_from)
    known = [c.key for c in CONFIGS]
    extra = sorted({k for (_, _, k) in latest if k not in BY_KEY})
    recorded = {p for (p, _, _) in latest if protocols is None or p in protocols}
    protocols = sorted(recorded, key=lambda p: (p not in ("da", "semi-1_16"), p))

    def emit(line: str = "") -> None:
        print(line, file=file)

    for protocol in protocols:
        present = [k for k in [*known, *extra] if values(latest, protocol, k, "test_miou")]
        emit(f"### {protocol}")
        emit()
        borrowed = (
            f" Oracle rows this build lacks: those of {', '.join(map(str, oracles_from))}." if oracles_from else ""
        )
        emit(f"{record_variant(next(iter(latest.values()))).describe()}. {preamble(present)}{borrowed}")
        emit()
        emit(
            "| configuration | recipe | seeds | target_val mIoU | target_test mIoU | target_test tail mIoU | "
            "test gain vs baseline | vs AdaBN | vs control | share of the oracle gap | stages' wall, min | "
            "pseudo-label precision % (last round; bg / digits) |"
        )
        emit("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for key in present:
            test = values(latest, protocol, key, "test_miou")
            val = list(values(latest, protocol, key, "val_miou").values())
            tail = list(values(latest, protocol, key, "test_tail_miou").values())
            walls = [
                r["stage_wall_s"] / 60
                for (p, _, k), r in latest.items()
                if p == protocol and k == key and r.get("stage_wall_s")
            ]
            config = BY_KEY.get(key)
            recipe = (
                config.recipe if config else next(r.get("recipe", "?") for (p, _, k), r in latest.items() if k == key)
            )
            baseline, _, adabn, _ = family(key)
            control = control_of(latest, protocol, key)
            emit(
                f"| {config.label if config else key} (`{key}`) | {recipe} | {len(test)} | {mean_std(val)} | "
                f"{mean_std(list(test.values()))} | {mean_std(tail)} | {gain(latest, protocol, key, baseline)} | "
                f"{gain(latest, protocol, key, adabn)} | {gain(latest, protocol, key, control)} | "
                f"{gap_share(latest, protocol, key)} | {f'{np.mean(walls):.1f}' if walls else '-'} | "
                f"{precision_column(latest, protocol, key)} |"
            )
        emit()
        comparisons(latest, protocol, emit)
        emit()
        if per_class:
            per_class_table(latest, protocol, [k for k in present if only is None or k in only], emit)
        if curves and (figure := curves_figure(latest, protocol, out / f"curves-{protocol}.png")):
            emit(f"![{protocol}: target_val curves of the claims' rounds]({figure})")
            emit()


def curve_panels(latest: Latest, protocol: str) -> list[tuple[str, list[str]]]:
    """The claims read from the plateau as (title, configurations) whose target_val curves go in one panel each,
    the method first; each choice made on target_val the way the comparisons make it. Panels without a recorded
    curve for their method (the first configuration) are left out."""
    controls = set(PLATEAU_CONTROLS)
    rounds = [c.key for c in CONFIGS if c.kind == "selftrain" and is_plateau(c.key) and c.key not in controls]
    best, _, _ = choose_best(latest, protocol, [k for k in rounds if not over_budget(k)])
    rectified = best_on_val(latest, protocol, RECTIFIED_FORMS)[0]
    dars = best_on_val(latest, protocol, list(DARS_ST_PAIRS))[0]
    u2pl = best_on_val(latest, protocol, list(U2PL_WITHOUT_CONTRASTIVE))[0]
    panels = [
        ("best round on target_val vs its control", [best, control_of(latest, protocol, best) if best else None]),
        ("000: rectified vs fixed thresholds, one round", [rectified, *(f"plateau-sweep-{tau}" for tau in TAUS)]),
        ("000: rectified vs fixed thresholds, two rounds", ["plateau-rectified-2r", *THRESHOLDS_2R]),
        ("000 after the online round: rectified vs fixed thresholds", ["adapted-rectified", *THRESHOLDS_ADAPTED]),
        ("000 after the online round with head consistency", ["mr-rectified", *THRESHOLDS_MR]),
        ("000 after the online round with head consistency, aux on c3", ["c3mr-rectified", *THRESHOLDS_C3MR]),
        ("002: DARS vs threshold-ST (tau 0.9)", [dars, DARS_ST_PAIRS.get(dars)]),
        (
            "003: unreliable vs reliable-only negatives",
            [
                u2pl,
                f"{u2pl}-reliable" if u2pl else None,
                U2PL_WITHOUT_CONTRASTIVE.get(u2pl),
                control_of(latest, protocol, u2pl) if u2pl else None,
            ],
        ),
    ]
    shown = []
    for title, keys in panels:
        if keys[0] and seed_curves(latest, protocol, keys[0]):
            shown.append((title, list(dict.fromkeys(k for k in keys if k and seed_curves(latest, protocol, k)))))
    return shown


def seed_curves(latest: Latest, protocol: str, key: str) -> dict[int, list[list[float]]]:
    """Seed -> ``key``'s target_val curve, from step 0: a plateau round starts at the plateau model, whose last
    curve point (the same first val images) is prepended where the seed's baseline recorded its curve."""
    out = {}
    for (p, seed, k), r in sorted(latest.items()):
        if p != protocol or k != key or not r.get("val_curve"):
            continue
        start = (latest.get((protocol, seed, "baseline-plateau")) or {}).get("val_curve") or []
        out[seed] = ([[0, start[-1][1]]] if start and is_plateau(key) else []) + r["val_curve"]
    return out


def mean_curve(curves: dict[int, list[list[float]]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(steps every seed logged, mean, sample std over seeds) of target_val mIoU in %."""
    per_seed = [dict((int(step), 100 * v) for step, v in c) for c in curves.values()]
    steps = sorted(set.intersection(*(set(c) for c in per_seed)))
    a = np.asarray([[c[s] for s in steps] for c in per_seed])
    std = a.std(axis=0, ddof=1) if len(a) > 1 else np.zeros(len(steps))
    return np.asarray(steps), a.mean(axis=0), std


def curves_figure(latest: Latest, protocol: str, path: Path) -> Path | None:
    """One panel per claim of :func:`curve_panels`: each configuration's target_val mIoU over its round(s), mean
    over seeds with a ± std band; None when no claim has a curve."""
    from labelpipe.plots import plt, save

    panels = curve_panels(latest, protocol)
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(panels) :]:
        ax.set_visible(False)
    for ax, (title, keys) in zip(axes.flat, panels, strict=False):
        for i, key in enumerate(keys):
            curves = seed_curves(latest, protocol, key)
            steps, mean, std = mean_curve(curves)
            line = ax.plot(steps, mean, marker="o", ms=2.5, lw=2.0 if i == 0 else 1.0, label=f"{key} ({len(curves)})")
            ax.fill_between(steps, mean - std, mean + std, color=line[0].get_color(), alpha=0.15, lw=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step (rounds end to end)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    for ax in axes[:, 0]:
        ax.set_ylabel("target_val mIoU % (first 200 images)", fontsize=8)
    fig.suptitle(f"{protocol}: target_val during the rounds from the plateau (mean ± std over seeds)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return save(fig, path)


def preamble(present: list[str]) -> str:
    """How to read a protocol's table, naming only the families whose rows it has (a report of the plateau
    rows alone has no 1,000-step baseline to describe)."""
    text = (
        "mIoU in %, mean ± std over seeds (sample std). **target_val** (500 images) is the only split a choice is "
        "made on (the sweep's threshold, the best configuration); **every other number is target_test** (1,000 "
        "images). Gains are paired (mean ± std of the per-seed differences, number of seeds)."
    )
    oracle = "(protocol oracle, shared by DA and semi)"
    if any(not is_plateau(k) for k in present):
        text += (
            f" Baseline: the pretrain of stages/{BASE_RECIPE}.yaml; oracle: the same recipe on all target_train "
            f"labels {oracle}; AdaBN: the baseline with BatchNorm re-estimated on the protocol's unlabeled split; "
            "control: the same rounds without the pseudo-label loss."
        )
    if any(is_plateau(k) for k in present):
        text += (
            f" Rows of stages/{PLATEAU_RECIPE}.yaml are read against their own family: the baseline at its "
            "plateau (`baseline-plateau`), the oracle trained as long on all target_train labels "
            f"(`oracle-plateau`, {oracle[1:-1]}), the baseline with BatchNorm re-estimated on the protocol's "
            "unlabeled split (`adabn-plateau`), and the control with the round's own learning rate and length, "
            f"without pseudo-label loss ({', '.join(f'`{c}`' for c in PLATEAU_CONTROLS)})."
        )
    return text


def per_class_table(latest: Latest, protocol: str, keys: list[str], emit) -> None:
    """Rows ``keys``: target_test mIoU and each class's IoU (%, mean over the seeds that recorded it), and the
    share of the unlabeled pixels the last round's stored pseudo-labels kept (offline rounds only)."""
    records = {k: [r for (p, _, key), r in sorted(latest.items()) if p == protocol and key == k] for k in keys}
    classes = list(dict.fromkeys(c for rs in records.values() for r in rs for c in r.get("test_per_class_iou") or {}))
    if not classes:
        return
    emit(
        f"Per class ({protocol}; target_test IoU in %, mean over seeds; kept: the share of unlabeled pixels the "
        "last round's stored pseudo-labels kept; KL: KL(labeled prior || their class distribution), seed 002's "
        "head-class bias; both means over seeds):"
    )
    emit()
    emit(f"| configuration | seeds | mIoU | {' | '.join(classes)} | kept % | KL |")
    emit(f"|---|---|---|{'---|' * len(classes)}---|---|")

    def mean(v: list[float | None], scale: float = 100.0, digits: int = 1) -> str:
        v = [x for x in v if x is not None]
        return f"{scale * np.mean(v):.{digits}f}" if v else "-"

    for key, rs in records.items():
        cells = [mean([(r.get("test_per_class_iou") or {}).get(c) for r in rs]) for c in classes]
        labels = [r.get("pseudo_labels") or {} for r in rs]
        kept = mean([pl.get("kept_fraction") for pl in labels], digits=0)
        # KL >= 0; DARS's aligned labels give a rounding residue of either sign around 0, shown as 0.
        kl = mean([max(x, 0.0) for pl in labels if (x := pl.get("kl_prior_pseudo")) is not None], 1.0, 4)
        emit(
            f"| `{key}` | {len(rs)} | {mean([r.get('test_miou') for r in rs])} | {' | '.join(cells)} | {kept} | {kl} |"
        )
    emit()


# DARS from the plateau and the threshold-ST it is read against (seed 002's baseline, tau 0.9, the same rounds).
DARS_ST_PAIRS = {
    "plateau-dars": "plateau-sweep-0.9",
    "plateau-dars-0.8": "plateau-sweep-0.9",
    "plateau-dars-0.8-2r": "plateau-sweep-0.9-2r",
    "adapted-dars-0.8": "adapted-sweep-0.9",
}


# The oracle trained twice as long as the plateau family's (session 30); its gap shares are reported beside.
LONG_ORACLE = "oracle-plateau-6000"


# U2PL's rounds from the plateau and the same rounds without the contrastive loss (its "no contrastive" ablation).
U2PL_WITHOUT_CONTRASTIVE = {
    "plateau-u2pl": "plateau-online-lr4e-3",
    "plateau-u2pl-2000": "plateau-online-lr4e-3-2000",
    "plateau-u2pl-3000": "plateau-online-lr4e-3-3000",
    "plateau-u2pl-3000-denoise": "plateau-online-lr4e-3-3000",
    "plateau-u2pl-3000-cutmix1": "plateau-online-lr4e-3-3000",
    "plateau-u2pl-3000-denoise-cutmix1": "plateau-online-lr4e-3-3000",
    "plateau-u2pl-3000-authors": "plateau-online-lr4e-3-3000",
    "plateau-u2pl-4000-denoise-cutmix1": "plateau-online-lr4e-3-4000",
    "plateau-u2pl-lc1": "plateau-online-lr4e-3",
}


# The fixed thresholds run for two offline rounds from the plateau, the rectified loss's two rounds read against them.
THRESHOLDS_2R = ["plateau-sweep-0.8-2r", "plateau-sweep-0.9-2r"]
# Seed 000's stage 2 after the plateau's online round: the thresholds it is read against, and stage 1 itself.
THRESHOLDS_ADAPTED = [f"adapted-sweep-{tau}" for tau in TAUS]
THRESHOLDS_MR = [f"mr-sweep-{tau}" for tau in TAUS]
THRESHOLDS_C3MR = [f"c3mr-sweep-{tau}" for tau in TAUS]
ADAPTED_STAGE_1 = "plateau-online-lr4e-3-2000"


def comparisons(latest: Latest, protocol: str, emit) -> None:
    """The claims of issue 14 as paired target_test differences; every choice made on target_val."""
    # The fixed threshold of each sweep (the rectify recipe's; the plateau's offline round) chosen on target_val.
    tau_key, tau_val, seeds = best_on_val(latest, protocol, [f"sweep-{tau}" for tau in TAUS])
    plateau_tau_key, plateau_tau_val, plateau_seeds = best_on_val(
        latest, protocol, [f"plateau-sweep-{tau}" for tau in TAUS]
    )
    # DARS's labeling ratio and number of rounds and U2PL's round (length, lambda_c) from the plateau, each chosen on
    # target_val; DARS is then read against threshold-ST (tau 0.9) over as many rounds.
    dars_key, dars_val, _ = best_on_val(latest, protocol, list(DARS_ST_PAIRS))
    u2pl_key, u2pl_val, _ = best_on_val(latest, protocol, list(U2PL_WITHOUT_CONTRASTIVE))
    # The rectified loss's form from the plateau (the paper's, the authors', the authors' without class balance).
    rectified_key, rectified_val, _ = best_on_val(latest, protocol, RECTIFIED_FORMS)
    # The fixed threshold of the two-round sweep (the thresholds run for two rounds), chosen on target_val.
    tau_2r_key, tau_2r_val, _ = best_on_val(latest, protocol, THRESHOLDS_2R)
    # The fixed threshold of seed 000's stage 2 after the online round, chosen on target_val.
    adapted_tau_key, adapted_tau_val, _ = best_on_val(latest, protocol, THRESHOLDS_ADAPTED)
    mr_tau_key, mr_tau_val, _ = best_on_val(latest, protocol, THRESHOLDS_MR)
    c3mr_tau_key, c3mr_tau_val, _ = best_on_val(latest, protocol, THRESHOLDS_C3MR)
    controls = {family(k)[3] for k in BY_KEY}  # each family's control is a row of its own, never a choice
    selftrain_keys = [c.key for c in CONFIGS if c.kind == "selftrain" and c.key not in controls]
    # Two choices on target_val: among the rounds from the 1,000-step baseline, and among those from the
    # baseline at its plateau (item 2's baseline, which the DA >= +10 claim is read against).
    best_key, fewer, most = choose_best(latest, protocol, [k for k in selftrain_keys if not is_plateau(k)])
    plateau_key, plateau_fewer, plateau_most = choose_best(
        latest, protocol, [k for k in selftrain_keys if is_plateau(k) and not over_budget(k)]
    )
    for which, key, val in (
        ("DARS's labeling ratio and rounds", dars_key, dars_val),
        ("U2PL's round (length, lambda_c)", u2pl_key, u2pl_val),
        ("The rectified loss's form", rectified_key, rectified_val),
        ("The fixed threshold over two rounds", tau_2r_key, tau_2r_val),
        ("The fixed threshold of stage 2 after the online round", adapted_tau_key, adapted_tau_val),
        ("The fixed threshold of stage 2 after the online round with head consistency", mr_tau_key, mr_tau_val),
        ("The same, the auxiliary head on c3", c3mr_tau_key, c3mr_tau_val),
    ):
        if len(val) > 1:
            chosen = ", ".join(f"`{k}`: {v:.1f}" for k, v in val.items())
            emit(f"{which} from the plateau chosen on **target_val** ({chosen}): **`{key}`**.")
    for which, key, val, over_seeds in (
        ("the sweep", tau_key, tau_val, seeds),
        ("the sweep from the plateau", plateau_tau_key, plateau_tau_val, plateau_seeds),
    ):
        if not val:
            continue
        chosen = ", ".join(f"{k.rsplit('-', 1)[1]}: {v:.1f}" for k, v in val.items())
        over = (
            f"seeds {', '.join(map(str, sorted(over_seeds)))}, the ones every threshold ran"
            if over_seeds
            else "each tau's seeds"
        )
        emit(
            f"Fixed threshold of {which} chosen on **target_val** (mean mIoU per tau over {over}: {chosen}): "
            f"**tau {key.rsplit('-', 1)[1]}**."
        )
    for key, left_out, n, start in (
        (best_key, fewer, most, "the 1,000-step baseline"),
        (plateau_key, plateau_fewer, plateau_most, "the baseline at its plateau"),
    ):
        if key:
            among = f" (among those run on all {n} seeds; not {', '.join(left_out)})" if left_out else ""
            emit(f"Best self-training from {start} on **target_val**{among}: **{BY_KEY[key].label}** (`{key}`).")
    for key, oracle in (("baseline", "oracle"), ("baseline-plateau", "oracle-plateau")):
        if share := oracle_share(latest, protocol, key, oracle):
            emit(f"`{key}` as a share of `{oracle}` (target_test; item 0: <= 70 %), per seed: {share}.")
    # The gap to the oracle trained twice as long, for the best round from the plateau and U2PL's round.
    if values(latest, protocol, LONG_ORACLE, "test_miou"):
        for key in dict.fromkeys(k for k in (plateau_key, u2pl_key) if k):
            short, long = gap_share(latest, protocol, key), gap_share(latest, protocol, key, LONG_ORACLE)
            emit(f"`{key}`'s share of the gap: {long} to `{LONG_ORACLE}` ({short} to `oracle-plateau`).")
    for key in ("baseline", "baseline-plateau", "oracle-plateau", LONG_ORACLE):
        gains = {
            seed: last_quarter_gain(r.get("val_curve") or [])
            for (p, seed, k), r in sorted(latest.items())
            if p == protocol and k == key
        }
        shown = ", ".join(f"{100 * g:+.1f}" for g in gains.values() if g is not None)
        if shown:
            emit(
                f"Plateau check of `{key}` (item 2: < 1 point): target_val (first 200 images) over the last quarter "
                f"of its schedule, per seed: {shown}."
            )
    emit()
    emit("| comparison (target_test, paired) | the seed's claim | mIoU gain | tail mIoU gain |")
    emit("|---|---|---|---|")
    da, semi = protocol == "da", protocol.startswith("semi")
    rows = [
        ("rectified vs the best fixed threshold (tau chosen on target_val)", "000 Table 5: +1.9", "rectified", tau_key),
        ("aux head on c3: rectified vs fixed threshold 0.9", "000 Table 5: +1.9", "c3-rectified", "c3-sweep-0.9"),
        ("rectified: aux head on c3 vs on mid", "", "c3-rectified", "rectified"),
        (
            "head dropout 0.5: rectified vs fixed threshold 0.9",
            "000 Table 5: +1.9",
            "dropout-rectified",
            "dropout-sweep-0.9",
        ),
        (
            "rectified with head dropout 0.5 vs the best fixed threshold (no dropout)",
            "000 Table 5: +1.9",
            "dropout-rectified",
            tau_key,
        ),
        ("rectified: head dropout 0.5 vs none", "", "dropout-rectified", "rectified"),
        (
            "rectified from the plateau vs its best fixed threshold (tau chosen on target_val)",
            "000 Table 5: +1.9",
            "plateau-rectified",
            plateau_tau_key,
        ),
        (
            "rectified in the authors' form from the plateau vs its best fixed threshold",
            "000 Table 5: +1.9",
            "plateau-rectified-authors",
            plateau_tau_key,
        ),
        (
            "rectified from the plateau: the authors' form vs the paper's",
            "",
            "plateau-rectified-authors",
            "plateau-rectified",
        ),
        (
            "rectified from the plateau, form chosen on target_val, vs its best fixed threshold",
            "000 Table 5: +1.9",
            rectified_key,
            plateau_tau_key,
        ),
        (
            "rectified in the authors' form from the plateau: without its class balance vs with",
            "",
            "plateau-rectified-authors-unbalanced",
            "plateau-rectified-authors",
        ),
        ("fixed threshold 0.9: head dropout 0.5 vs none", "", "dropout-sweep-0.9", "sweep-0.9"),
        ("DARS vs threshold-ST (tau 0.9)", "002 Table 4: tail +3.9; target: tail >= +3", "dars", "st-0.9"),
        (
            "DARS from the plateau (alpha and rounds chosen on target_val) vs threshold-ST (tau 0.9) from the "
            "plateau, as many rounds",
            "002 Table 4: tail +3.9; target: tail >= +3",
            dars_key,
            DARS_ST_PAIRS.get(dars_key),
        ),
        (
            "DARS (alpha 0.8) vs threshold-ST (tau 0.9), two offline rounds from the plateau each",
            "002 Table 4: tail +3.9; target: tail >= +3",
            "plateau-dars-0.8-2r",
            "plateau-sweep-0.9-2r",
        ),
        (
            "rectified vs the best fixed threshold, two offline rounds from the plateau each (tau chosen on "
            "target_val)",
            "000 Table 5: +1.9",
            "plateau-rectified-2r",
            tau_2r_key,
        ),
        ("rectified from the plateau: two rounds vs one", "", "plateau-rectified-2r", "plateau-rectified"),
        (
            "rectified vs the best fixed threshold (tau chosen on target_val), seed 000's stage 2 after the "
            "plateau's online round (stage 1 an adapted model)",
            "000 Table 5: +1.9",
            "adapted-rectified",
            adapted_tau_key,
        ),
        ("stage 2 with the rectified loss vs stage 1 (the online round)", "", "adapted-rectified", ADAPTED_STAGE_1),
        ("stage 2 with the chosen fixed threshold vs stage 1 (the online round)", "", adapted_tau_key, ADAPTED_STAGE_1),
        (
            "rectified vs the best fixed threshold (tau chosen on target_val), seed 000's stage 2 after the "
            "online round with MRNet's head consistency (stage 1 as the paper's: adapted, heads made to agree)",
            "000 Table 5: +1.9",
            "mr-rectified",
            mr_tau_key,
        ),
        ("stage 1: the online round with head consistency vs without", "", "mr-online", ADAPTED_STAGE_1),
        ("stage 2 with the rectified loss vs its stage 1 (with head consistency)", "", "mr-rectified", "mr-online"),
        (
            "rectified vs the best fixed threshold (tau chosen on target_val), stage 2 after the online round with "
            "head consistency, the auxiliary head on c3",
            "000 Table 5: +1.9",
            "c3mr-rectified",
            c3mr_tau_key,
        ),
        ("stage 2, rectified vs its stage 1, the auxiliary head on c3", "", "c3mr-rectified", "c3mr-online"),
        ("the plateau pretrain: aux head on c3 vs on mid", "", "c3mr-pretrain", "baseline-plateau"),
        ("stage 1 with head consistency: aux head on c3 vs on mid", "", "c3mr-online", "mr-online"),
        ("DARS from the plateau (alpha 0.8): two rounds vs one", "", "plateau-dars-0.8-2r", "plateau-dars-0.8"),
        ("threshold-ST from the plateau (tau 0.9): two rounds vs one", "", "plateau-sweep-0.9-2r", "plateau-sweep-0.9"),
        ("U2PL: unreliable vs reliable-only negatives", "003 Table III: +2.0", "u2pl-unreliable", "u2pl-reliable"),
        ("U2PL: unreliable negatives vs no contrastive loss", "", "u2pl-unreliable", "u2pl-nocontrastive"),
        (
            "U2PL, lambda_c 1 (the authors' config): unreliable vs reliable-only negatives",
            "003 Table III: +2.0",
            "lc1-u2pl-unreliable",
            "lc1-u2pl-reliable",
        ),
        ("U2PL, unreliable negatives: lambda_c 1 vs 0.1", "", "lc1-u2pl-unreliable", "u2pl-unreliable"),
        (
            "U2PL (unreliable) vs the baseline (supervised-only)",
            "001, 003: target >= +10, >= 1/3 of the oracle gap" if semi else "",
            "u2pl-unreliable",
            "baseline",
        ),
        ("best on target_val vs the baseline", "", best_key, "baseline"),
        ("best on target_val vs AdaBN", "", best_key, "adabn"),
        ("best on target_val vs the control", "", best_key, "control"),
        ("the baseline: at its plateau (3,000 steps) vs 1,000 steps", "", "baseline-plateau", "baseline"),
        ("the oracle: 3,000 vs 1,000 steps", "", "oracle-plateau", "oracle"),
        # Item 2: the DA claims are read against the baseline at its plateau and its AdaBN.
        (
            "best from the plateau on target_val vs the baseline at its plateau",
            "002, 000: target >= +10" if da else "",
            plateau_key,
            "baseline-plateau",
        ),
        (
            "best from the plateau on target_val vs AdaBN of the plateau baseline",
            "target >= +8" if da else "",
            plateau_key,
            "adabn-plateau",
        ),
        (
            "best from the plateau on target_val vs its control",
            "",
            plateau_key,
            control_of(latest, protocol, plateau_key) if plateau_key else None,
        ),
        (
            "U2PL from the plateau (round length and lambda_c chosen on target_val) vs the baseline at its plateau "
            "(supervised-only)",
            "001, 003: target >= +10, >= 1/3 of the oracle gap" if semi else "",
            u2pl_key,
            "baseline-plateau",
        ),
        (
            "U2PL from the plateau: unreliable vs reliable-only negatives",
            "003 Table III: +2.0",
            "plateau-u2pl",
            "plateau-u2pl-reliable",
        ),
        (
            "U2PL from the plateau, lambda_c 1 (the authors' config): unreliable vs reliable-only negatives",
            "003 Table III: +2.0",
            "plateau-u2pl-lc1",
            "plateau-u2pl-lc1-reliable",
        ),
        (
            "U2PL from the plateau, unreliable negatives: lambda_c 1 vs 0.1",
            "",
            "plateau-u2pl-lc1",
            "plateau-u2pl",
        ),
        (
            "U2PL from the plateau, 2,000 steps: unreliable vs reliable-only negatives",
            "003 Table III: +2.0",
            "plateau-u2pl-2000",
            "plateau-u2pl-2000-reliable",
        ),
        (
            "U2PL+ from the plateau, 4,000 steps (denoising, CutMix on every image): unreliable vs reliable-only "
            "negatives",
            "003 Table III: +2.0",
            "plateau-u2pl-4000-denoise-cutmix1",
            "plateau-u2pl-4000-denoise-cutmix1-reliable",
        ),
        (
            "U2PL+ with ClassMix of the labeled images, 4,000 steps: unreliable vs reliable-only negatives",
            "003 Table III: +2.0",
            "plateau-u2pl-4000-denoise-cutmix1-classmix",
            "plateau-u2pl-4000-denoise-cutmix1-classmix-reliable",
        ),
        (
            "U2PL+ with ClassMix of the labeled images, 4,000 steps: with vs without the contrastive loss",
            "",
            "plateau-u2pl-4000-denoise-cutmix1-classmix",
            "plateau-online-4000-denoise-cutmix1-classmix",
        ),
        (
            "U2PL+ with ClassMix of the labeled images, 4,000 steps, lambda_c 1 (the authors' config): unreliable vs "
            "reliable-only negatives",
            "003 Table III: +2.0",
            "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
            "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1-reliable",
        ),
        (
            "U2PL+ with ClassMix of the labeled images, 4,000 steps, unreliable negatives: lambda_c 1 vs 0.1",
            "",
            "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
            "plateau-u2pl-4000-denoise-cutmix1-classmix",
        ),
        (
            "U2PL+ with ClassMix of the labeled images, 4,000 steps, lambda_c 1: with vs without the contrastive loss",
            "",
            "plateau-u2pl-4000-denoise-cutmix1-classmix-lc1",
            "plateau-online-4000-denoise-cutmix1-classmix",
        ),
        (
            "U2PL from the plateau, 2,000 steps, vs its control (the same round without pseudo-label loss)",
            "",
            "plateau-u2pl-2000",
            "plateau-control-2000",
        ),
        (
            "the 2,000-step round from the plateau (no contrastive loss) vs its control",
            "",
            "plateau-online-lr4e-3-2000",
            "plateau-control-2000",
        ),
        (
            "the 2,000-step round from the plateau: the entropy split per predicted class vs per batch",
            "002 (class-balanced selection)",
            "plateau-online-classwise-2000",
            "plateau-online-lr4e-3-2000",
        ),
        (
            "U2PL from the plateau vs the same round without the contrastive loss",
            "",
            "plateau-u2pl",
            "plateau-online-lr4e-3",
        ),
        (
            "U2PL from the plateau, 2,000 steps, vs the same round without the contrastive loss",
            "",
            "plateau-u2pl-2000",
            "plateau-online-lr4e-3-2000",
        ),
        (
            "U2PL+ from the plateau, 4,000 steps (denoising, CutMix on every image), vs the round without them and "
            "without the contrastive loss",
            "",
            "plateau-u2pl-4000-denoise-cutmix1",
            "plateau-online-lr4e-3-4000",
        ),
        *(
            (f"`{key}` vs the baseline at its plateau", "", key, "baseline-plateau")
            for key in selftrain_keys
            if is_plateau(key) and key not in (plateau_key, u2pl_key, rectified_key)  # rows of their own above
        ),
    ]
    for label, claim, key, reference in rows:
        if key is None or reference is None:
            continue
        mi, tail = gain(latest, protocol, key, reference), gain(latest, protocol, key, reference, "test_tail_miou")
        if mi == "-":
            continue
        emit(f"| {label} (`{key}` - `{reference}`) | {claim} | {mi} | {tail} |")


if __name__ == "__main__":
    main()
