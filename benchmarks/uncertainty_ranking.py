"""How well each uncertainty of a prediction store ranks its pseudo-labels' errors, and what each way of using
it hands the round: seed 000's rectified loss (every pixel, weighted exp(-variance)) against fixed
confidence thresholds (issue 14: "rectified vs the best fixed threshold of the sweep").

For one store per run (the argmax labels, confidence, entropy and the main / auxiliary heads' variance that
``predict`` wrote for target_train, whose masks DigitScapes has), against the ground truth:

- ranking: the area under the ROC curve of ``1 - conf``, ``entropy`` and ``variance`` as detectors of the
  label's errors (``labelpipe.pseudo.quality.error_auroc``; 0.5 is chance), over every pixel and over the
  pixels labeled foreground (classes 1..C-1: the digits, where the tail's IoU is decided);
- what the round trains on: for the rectified loss the exp(-variance)-weighted precision of the labels and
  the weight's mean (its "kept share"); for each threshold tau the kept share and precision; and the
  variance used as a threshold would be used, keeping the same share as tau ranked by variance instead.
  Precision is given over all pixels and over the pixels labeled foreground.

``labelpipe pseudolabel`` reports the same AUROCs per predicted class (report.json, ``error_auroc_conf`` /
``error_auroc_variance``); this script adds the foreground pooled and what each selection hands the round.
The variance here is the one the stage-1 model gives at predict time (eval mode, no augmentation): the value
the rectified loss starts its round from, before the round's own updates move it.

    python benchmarks/uncertainty_ranking.py --run R1 R2 R3 --store selftrain/round-2/predict/predictions.h5

``R`` is a run directory (its config.yaml names the data); nothing under it is written.

A third table says where the variance sits (its mean per place, in nats): on pixels labeled a digit, right ones
at the stroke's edge (within ``--edge`` // 2 pixels of the ground truth's background) and inside it, wrong ones;
on pixels labeled background, right and wrong. A variance that marks errors is higher on the wrong rows than on
the right ones; one that follows the strokes' geometry is higher at their edges, right or wrong.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from labelpipe.config import resolve_config
from labelpipe.context import open_context
from labelpipe.pseudo.quality import error_auroc
from labelpipe.runtime import Runtime
from labelpipe.store.prediction_store import PredictionStore

IGNORE = 255
SCORES = {
    "1 - conf": lambda c: 1.0 - c["conf"].astype(np.float32),
    "entropy": lambda c: c["entropy"],
    "variance": lambda c: c["variance"],
}


def stroke_interior(gt: np.ndarray, edge: int) -> np.ndarray:
    """(H, W) bool: ground-truth foreground (classes 1.., not ignore) farther than ``edge // 2`` pixels from
    anything else (the foreground eroded by an ``edge`` x ``edge`` square)."""
    foreground = (gt != 0) & (gt != IGNORE)
    return ndimage.binary_erosion(foreground, np.ones((edge, edge), dtype=bool))


def read_store(run: Path, store: Path, recipe: Path | None = None, edge: int = 5) -> dict[str, np.ndarray]:
    """Every pixel of ``run``'s store ``store`` (relative to the run) with its ground truth, flattened:
    label, conf, entropy, variance, gt (255 where the mask has none) and interior (:func:`stroke_interior`)."""
    config = resolve_config(run, recipe)
    ctx = open_context(config, run, Runtime(device=torch.device("cpu"), rank=0, world=1))
    with PredictionStore(run / store, ctx.source.num_classes, require=("label", "conf", "entropy", "variance")) as st:
        by_id = {s.id: s for s in ctx.source.split(st.attrs["split"])}
        names = ("label", "conf", "entropy", "variance", "gt", "interior")
        columns: dict[str, list[np.ndarray]] = {k: [] for k in names}
        for image_id in st.ids:
            image = st.read(image_id, ("label", "conf", "entropy", "variance"))
            for name, values in image.items():
                columns[name].append(values.reshape(-1))
            gt = ctx.source.read_mask(by_id[image_id].mask)
            columns["gt"].append(gt.reshape(-1))
            columns["interior"].append(stroke_interior(gt, edge).reshape(-1))
    return {name: np.concatenate(values) for name, values in columns.items()}


def rate(flags: np.ndarray) -> float:
    """The share of True in ``flags``; NaN when empty (a model that labels no pixel foreground)."""
    return float(flags.mean()) if flags.size else float("nan")


def ranking(columns: dict[str, np.ndarray]) -> dict[str, float]:
    """The error rate and each score's AUROC as an error detector, over every pixel with a ground truth and
    over those labeled foreground (``fg``)."""
    valid = columns["gt"] != IGNORE
    wrong = columns["label"] != columns["gt"]
    foreground = valid & (columns["label"] != 0)
    out = {"error": rate(wrong[valid]), "fg error": rate(wrong[foreground])}
    for name, score in SCORES.items():
        values = np.asarray(score(columns))
        out[f"{name}"] = error_auroc(values[valid], wrong[valid])
        out[f"fg {name}"] = error_auroc(values[foreground], wrong[foreground])
    return out


def selection(columns: dict[str, np.ndarray], taus: list[float]) -> dict[str, dict[str, float]]:
    """Per way of using the labels: its kept share (the mean weight for the rectified loss) and the (weighted)
    precision over every pixel and over pixels labeled foreground."""
    valid = columns["gt"] != IGNORE
    correct = (columns["label"] == columns["gt"])[valid]
    foreground = (columns["label"] != 0)[valid]
    conf = columns["conf"][valid].astype(np.float32)
    variance = columns["variance"][valid].astype(np.float32)

    def row(weight: np.ndarray) -> dict[str, float]:
        fg_weight = weight[foreground]
        return {
            "share": float(weight.mean()),
            "precision": float((weight * correct).sum() / max(weight.sum(), 1e-12)),
            "fg precision": float((fg_weight * correct[foreground]).sum() / max(fg_weight.sum(), 1e-12)),
        }

    out = {"rectified exp(-variance)": row(np.exp(-variance)), "all pixels": row(np.ones_like(conf))}
    order = np.argsort(variance, kind="stable")  # least uncertain first
    for tau in taus:
        kept = (conf > tau).astype(np.float32)
        out[f"tau {tau}"] = row(kept)
        matched = np.zeros_like(conf)
        matched[order[: int(kept.sum())]] = 1.0
        out[f"variance, tau {tau}'s share"] = row(matched)
    return out


def places(columns: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """The variance's mean and the pixels' share per place (see the module docstring); NaN for an empty place."""
    valid = columns["gt"] != IGNORE
    right = valid & (columns["label"] == columns["gt"])
    wrong = valid & ~right
    digit = columns["label"] != 0
    interior = columns["interior"]
    variance = columns["variance"].astype(np.float64)
    masks = {
        "digit, right, stroke edge": right & digit & ~interior,
        "digit, right, stroke inside": right & digit & interior,
        "digit, wrong": wrong & digit,
        "background, right": right & ~digit,
        "background, wrong": wrong & ~digit,
    }
    n = max(int(valid.sum()), 1)
    return {
        place: (float(variance[m].mean()) if m.any() else float("nan"), float(m.sum()) / n)
        for place, m in masks.items()
    }


def mean_std(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return "-"
    mean = scale * float(np.mean(values))
    std = scale * float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, nargs="+", required=True, help="run directories (one per seed)")
    parser.add_argument(
        "--store", type=Path, default=Path("predict/predictions.h5"), help="the store, relative to each run"
    )
    parser.add_argument("--config", type=Path, default=None, help="the recipe, when a run has no config.yaml")
    parser.add_argument("--taus", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    parser.add_argument("--edge", type=int, default=5, help="the stroke-edge band's width: an EDGE x EDGE erosion")
    args = parser.parse_args(argv)

    ranks, selections, where = [], [], []
    for run in args.run:
        columns = read_store(run, args.store, args.config, args.edge)
        ranks.append(ranking(columns))
        selections.append(selection(columns, args.taus))
        where.append(places(columns))
    n = len(args.run)
    print(f"error ranking (AUROC %, mean ± std over {n} run(s); 50 = chance), {args.store}")
    keys = list(ranks[0])
    print("| " + " | ".join(keys) + " |")
    print("|" + "---|" * len(keys))
    print("| " + " | ".join(mean_std([r[k] for r in ranks]) for k in keys) + " |")
    print()
    print(f"what the round trains on (%, mean ± std over {n} run(s))")
    print("| labels | share (mean weight) | precision | fg precision |")
    print("|---|---|---|---|")
    for way in selections[0]:
        cells = [mean_std([s[way][k] for s in selections]) for k in ("share", "precision", "fg precision")]
        print(f"| {way} | " + " | ".join(cells) + " |")
    print()
    band = f"{args.edge}x{args.edge}"
    print(f"where the variance sits (mean KL in nats, mean ± std over {n} run(s); stroke edge: {band})")
    print("| pixels | variance | share of the pixels (%) |")
    print("|---|---|---|")
    for place in where[0]:
        variance = mean_std([w[place][0] for w in where], scale=1.0, digits=3)
        print(f"| {place} | {variance} | {mean_std([w[place][1] for w in where])} |")


if __name__ == "__main__":
    main()
