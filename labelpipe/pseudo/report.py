"""The pseudolabel report: ``report.json`` (counts, KL to the prior, thresholds, quality against ground
truth where there is some), its figures (``plots/``) and the printed table.

numpy only at import: matplotlib is imported by the first figure (only when plots are drawn); the
printed table needs no rich.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import numpy as np

from labelpipe.store.prediction_store import PredictionStore

if TYPE_CHECKING:
    from labelpipe.metrics import CalibrationAccumulator
    from labelpipe.pseudo.labelling import GroundTruth, Settings
    from labelpipe.pseudo.quality import PseudoQualityAccumulator

HIST_BINS = 64
HIST_RANGES = {"conf": (0.0, 1.0), "entropy": None, "variance": (0.0, 2.0)}  # entropy: (0, log C)
SAMPLE_ROWS = 6


def jsonable(value: Any) -> Any:
    """numpy -> JSON types; NaN and +-inf (an empty class's threshold) -> null, since JSON has neither."""
    if isinstance(value, np.ndarray):
        return [jsonable(v) for v in value.tolist()]
    if isinstance(value, (np.floating, float)):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def display_histogram(hist: np.ndarray, value_range: tuple[float, float]) -> np.ndarray:
    """``HIST_BINS`` equal-width bins over ``value_range`` from a (NUM_BINS,) histogram of non-negative
    float16 bit patterns (values outside the range are left out)."""
    values = np.arange(hist.size, dtype=np.uint16).view(np.float16).astype(np.float64)
    lo, hi = value_range
    inside = (values >= lo) & (values <= hi) & (hist > 0)
    bins = np.minimum(((values[inside] - lo) / (hi - lo) * HIST_BINS).astype(np.int64), HIST_BINS - 1)
    return np.bincount(bins, weights=hist[inside], minlength=HIST_BINS).astype(np.int64)


def sample_rows(
    store: PredictionStore, labels_path: Path, truth: GroundTruth, palette: list[tuple[int, int, int]] | None
) -> list[list[np.ndarray]]:
    """Image | ground truth | prediction | pseudo-label rows of the first few sample images."""
    from labelpipe import plots

    rows = []
    with PredictionStore(labels_path) as labels:
        for image_id in [i for i in store.ids if i in truth.sample_ids][:SAMPLE_ROWS]:
            assert truth.read_rgb is not None
            pred = store.read(image_id, ("label",))["label"]
            lab = labels.read(image_id, ("label",))["label"]
            row = [truth.read_rgb(image_id), plots.colorize(pred, palette or []), plots.colorize(lab, palette or [])]
            if truth.read_mask is not None:
                row.insert(1, plots.colorize(truth.read_mask(image_id), palette or []))
            rows.append(row)
    return rows


def build_report(
    *,
    method: str,
    settings: Settings,
    classes: list[str],
    prior: np.ndarray,
    params: dict[str, Any],
    n_images: int,
    n_pixels: int,
    kept_counts: np.ndarray,
    pred_counts: np.ndarray,
    temperature: Any,
    quality: PseudoQualityAccumulator | None,
    gap_variance: PseudoQualityAccumulator | None,
    calib: CalibrationAccumulator | None,
    gt_counts: np.ndarray,
    display: dict[str, tuple[np.ndarray, tuple[float, float]]],
    out: Path,
    samples: list[list[np.ndarray]],
) -> dict[str, Any]:
    """The JSON-able report of one labelling (counts (C,) int64, ``prior`` (C,) fractions); draws its
    figures into ``out/plots`` when ``settings.plots``."""
    pseudo_dist = kept_counts / max(kept_counts.sum(), 1)
    present = prior > 0
    kl = float(np.sum(prior[present] * (np.log(prior[present]) - np.log(pseudo_dist[present] + 1e-8))))
    report: dict[str, Any] = {
        "method": method,
        "alpha": settings.alpha,
        "images": n_images,
        "pixels": n_pixels,
        "kept_fraction": float(kept_counts.sum() / max(n_pixels, 1)),
        "kl_prior_pseudo": kl,
        "params": jsonable({k: v for k, v in params.items() if k != "method" and not k.startswith("_")}),
        "per_class": {
            name: {
                "kept": int(kept_counts[c]),
                "predicted": int(pred_counts[c]),
                "kept_of_predicted": float(kept_counts[c] / pred_counts[c]) if pred_counts[c] else None,
                "prior": float(prior[c]),
            }
            for c, name in enumerate(classes)
        },
        "temperature": temperature,
        "has_ground_truth": quality is not None,
        "histograms": {
            name: {"range": list(value_range), "counts": counts.tolist()}
            for name, (counts, value_range) in display.items()
        },
    }
    dists = {"labeled prior": prior, "pseudo-labels": pseudo_dist}
    if quality is not None:
        q = quality.result()
        v = gap_variance.result() if gap_variance else None
        report.update(
            pseudo_miou=q["miou"],
            pseudo_miou_kept=q["miou_kept"],
            uncertainty_gap_conf=q["uncertainty_gap"],
            uncertainty_gap_variance=v["uncertainty_gap"] if v else None,
            # How well each uncertainty ranks the predictions' errors (AUROC, 0.5 = chance): whether the
            # variance can tell the wrong labels better than the confidence on this data (seed 000's premise).
            error_auroc_conf=q["error_auroc"],
            error_auroc_variance=v["error_auroc"] if v else None,
            ece=calib.ece() if calib is not None else None,
        )
        for c, name in enumerate(classes):
            report["per_class"][name].update(
                precision=jsonable(q["precision"][c]),
                coverage=jsonable(q["coverage"][c]),
                iou=jsonable(q["iou"][c]),
                error_auroc_conf=jsonable(q["error_auroc_per_class"][c]),
                error_auroc_variance=jsonable(v["error_auroc_per_class"][c]) if v else None,
            )
        dists["ground truth"] = gt_counts / max(gt_counts.sum(), 1)
    if settings.plots:
        _draw_plots(report, classes, dists, display, calib, samples, out / "plots")
    return jsonable(report)


def _draw_plots(report, classes, dists, display, calib, samples, plots_dir: Path) -> None:
    from labelpipe import plots  # matplotlib is imported by the first figure, only when plots are drawn

    method = report["method"]
    if calib is not None:
        rel = calib.reliability()
        plots.reliability(
            rel["bin_confidence"],
            rel["bin_accuracy"],
            rel["bin_count"],
            plots_dir / "reliability.png",
            f"teacher on unlabeled: ECE {report['ece']:.3f}",
        )
    plots.class_distributions(
        dists,
        classes,
        plots_dir / "class_distribution.png",
        f"{method}: KL(prior || pseudo) = {report['kl_prior_pseudo']:.3f}",
    )
    plot_histograms(
        {k: v[0] for k, v in display.items()}, {k: v[1] for k, v in display.items()}, plots_dir / "histograms.png"
    )
    if samples:
        has_gt = report["has_ground_truth"]
        titles = ["image"] + (["ground truth"] if has_gt else []) + ["prediction", f"pseudo-label ({method})"]
        plots.image_grid(samples, titles, plots_dir / "samples.png")


def plot_histograms(hists: dict[str, np.ndarray], ranges: dict, path: Path) -> None:
    """One log-scale bar chart per value (``hists``: name -> (HIST_BINS,) counts over ``ranges[name]``)."""
    from labelpipe import plots

    plt = plots.plt
    fig, axes = plt.subplots(1, len(hists), figsize=(3.6 * len(hists), 3), squeeze=False)
    for ax, (name, counts) in zip(axes[0], hists.items(), strict=True):
        lo, hi = ranges[name]
        edges = np.linspace(lo, hi, len(counts) + 1)
        ax.bar(edges[:-1], counts, width=edges[1] - edges[0], align="edge", color="tab:gray")
        ax.set_yscale("log")
        ax.set_title(name)
    plots.save(fig, path)


def summary(report: dict) -> dict:
    """The manifest's headline numbers of a report."""
    return {k: report[k] for k in ("kept_fraction", "kl_prior_pseudo", "pseudo_miou") if report.get(k) is not None}


def print_report(report: dict, classes: list[str], file: TextIO | None = None) -> None:
    """The per-class table of a report (and the quality line where there was ground truth), drawn like
    the other stages' rich tables but without rich: the lean ``--predictions`` path imports neither rich
    nor typer (~70 ms of a command that labels 100 maps in ~0.3 s)."""
    thresholds = report["params"].get("thresholds")
    total_kept = max(sum(v["kept"] for v in report["per_class"].values()), 1)

    def pct(v: float | None) -> str:
        return "-" if v is None else f"{100 * v:.1f}"

    ranked = report.get("error_auroc_conf") is not None
    has_variance = report.get("error_auroc_variance") is not None
    ranked_by = ("error_auroc_conf", "error_auroc_variance") if has_variance else ("error_auroc_conf",)

    def ranking(pc: dict) -> str:  # the error AUROC of conf (/ variance), in % (50: chance)
        return " / ".join(pct(pc.get(k)) for k in ranked_by)

    rows = []
    for c, name in enumerate(classes):
        pc = report["per_class"][name]
        rows.append(
            [
                name,
                f"{100 * pc['prior']:.2f}",
                f"{100 * pc['kept'] / total_kept:.2f}",
                "-" if thresholds is None or thresholds[c] is None else f"{thresholds[c]:.4f}",
                pct(pc.get("precision")),
                pct(pc.get("coverage")),
                *([ranking(pc)] if ranked else []),
            ]
        )
    title = (
        f"pseudo-labels: {report['method']} (kept {100 * report['kept_fraction']:.1f}%, "
        f"KL(prior||pseudo) {report['kl_prior_pseudo']:.3f})"
    )
    headers = ["class", "prior %", "kept %", "threshold", "precision", "coverage"]
    if ranked:
        headers.append("errors ranked, conf" + (" / var" if has_variance else ""))
    lines = box_table(title, headers, rows)
    if report.get("pseudo_miou") is not None:
        lines.append(
            f"pseudo-label mIoU {100 * report['pseudo_miou']:.1f}  "
            f"uncertainty gap (conf) {report['uncertainty_gap_conf']:.3f}"
        )
    if ranked:
        lines.append(
            f"errors ranked (AUROC %, 50 = chance; per class: among the pixels predicted it): {ranking(report)}"
        )
    print("\n".join(lines), file=file or sys.stdout)


def box_table(title: str, headers: list[str], rows: list[list[str]]) -> list[str]:
    """The lines of a table in rich's default box (heavy head): the first column left-aligned, the others
    right-aligned, the title centred above."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: list[str], edge: str, sep: str) -> str:
        padded = [c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return edge + sep.join(f" {c} " for c in padded) + edge

    def rule(left: str, fill: str, mid: str, right: str) -> str:
        return left + mid.join(fill * (w + 2) for w in widths) + right

    top = rule("┏", "━", "┳", "┓")
    return [
        title.center(len(top)).rstrip(),
        top,
        line(headers, "┃", "┃"),
        rule("┡", "━", "╇", "┩"),
        *(line(r, "│", "│") for r in rows),
        rule("└", "─", "┴", "┘"),
    ]
