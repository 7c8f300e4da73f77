"""``labelpipe report``: one self-contained ``RUN/report.html`` that tells a run's story.

Everything is read from what the stages left in the run directory (manifests, ``metrics.json``,
pseudo-label ``report.json``, plots, ``curves.png``, ``config.yaml``); nothing is recomputed. Images
are inlined as base64 data URIs and the page loads nothing from the network, so the file can be
mailed or archived on its own. Sections:

- stages: each stage's status, wall time, when it finished and its headline number (``status``);
- metrics: every evaluated model side by side, per split (per-class IoU with the tail classes
  marked, mIoU, tail mIoU, pixel accuracy, ECE) and the gain of the last model over the first;
- evaluation plots and sample overlays of each model;
- pseudo-labels: each round's (and each stand-alone ``pseudolabel``'s) report and plots;
- training curves of every training stage;
- the latest model's overlays on a few test images (drawn as ``segment`` draws them; the one thing
  the report computes), and the resolved config.

A small inline script marks, after load, how many images decoded (``data-images-loaded`` on
``<body>``): the browser test reads it from the rendered DOM.
"""

from __future__ import annotations

import base64
import html
import time
from pathlib import Path
from typing import Any

from labelpipe import __version__
from labelpipe.errors import LabelpipeError
from labelpipe.store.atomic import atomic_write_text
from labelpipe.store.run_summary import collect, evaluations, model_order, read_json
from labelpipe.training.curves import round_history

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 0 auto; max-width: 1200px;
       padding: 1em 2em; color: #222; background: #fff; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { border-bottom: 2px solid #ddd; padding-bottom: 0.2em; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-variant-numeric: tabular-nums; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f0f0f4; } tr.summary td { font-weight: 600; background: #fafafa; }
.done { color: #1a7f37; } .failed { color: #cf222e; } .running { color: #9a6700; }
.up { color: #1a7f37; } .down { color: #cf222e; } .muted { color: #777; }
figure { display: inline-block; margin: 0.4em 1em 0.8em 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid #eee; } figure img:not(.curves) { max-height: 420px; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 12px; }
nav a { margin-right: 1em; }
img.overlay { width: 160px; image-rendering: pixelated; }
.swatch { display: inline-block; width: 0.9em; height: 0.9em; margin: 0 0.2em 0 0.6em; vertical-align: -0.1em; }
"""

# Marks how many images decoded once the page has loaded; the browser test reads these attributes.
SCRIPT = """
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var ok = images.filter(function (im) { return im.complete && im.naturalWidth > 0; });
  document.body.setAttribute("data-images-loaded", String(ok.length));
  document.body.setAttribute("data-images-total", String(images.length));
  var first = document.querySelector("img.curves");
  if (first) {
    var r = first.getBoundingClientRect();
    document.body.setAttribute("data-curves-box", [r.left, r.top + window.scrollY, r.width, r.height].join(","));
  }
});
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _pct(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{100 * value:.{digits}f}"


def _img(path: Path, caption: str, css_class: str = "") -> str:
    """A figure with the PNG/JPEG at ``path`` inlined ('' when the file is missing)."""
    if not path.is_file():
        return ""
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    cls = f' class="{css_class}"' if css_class else ""
    img = f'<img{cls} alt="{_e(caption)}" src="data:{mime};base64,{data}">'
    return f"<figure>{img}<figcaption>{_e(caption)}</figcaption></figure>"


def _stages_section(run_dir: Path) -> str:
    rows = []
    # In the order the stages finished (the run's story); unfinished ones last.
    for r in sorted(collect(run_dir), key=lambda r: (r["finished"] is None, r["finished"] or 0, r["stage"])):
        finished = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["finished"])) if r["finished"] else ""
        wall = f"{r['wall_s']:.0f} s" if r["wall_s"] is not None else ""
        rows.append(
            f'<tr><td>{_e(r["stage"])}</td><td class="{_e(r["status"])}">{_e(r["status"])}</td>'
            f"<td>{wall}</td><td>{finished}</td><td>{_e(r['summary'])}</td><td>{_e(r['note'])}</td></tr>"
        )
    if not rows:
        rows.append('<tr><td colspan="6" class="muted">no stage has run yet</td></tr>')
    head = "<tr><th>stage</th><th>status</th><th>wall</th><th>finished</th><th>summary</th><th>note</th></tr>"
    table = f'<table id="stages-table"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'
    return f'<h2 id="stages">Stages</h2>{table}'


def _gain(before: float | None, after: float | None, lower_is_better: bool = False) -> str:
    """The change in percentage points, green where it is an improvement."""
    if before is None or after is None:
        return "<td></td>"
    delta = 100 * (after - before)
    better = -delta if lower_is_better else delta
    css = "up" if better > 0 else "down" if better < 0 else ""
    return f'<td class="{css}">{delta:+.1f}</td>'


def metrics_table(models: list[dict[str, Any]], table_id: str) -> str:
    """Per-class IoU and the summary numbers of ``models`` (same split) side by side, in percent.

    With two or more models a last column gives the gain of the last model over the first.
    """
    names = [m["model"] for m in models]
    with_gain = len(models) > 1
    tail = set().union(*(m.get("tail_classes") or [] for m in models))
    classes = list(dict.fromkeys(c for m in models for c in m["per_class_iou"]))
    gain_head = f"<th>gain ({_e(names[-1])} - {_e(names[0])})</th>" if with_gain else ""
    head = "<tr><th>class</th>" + "".join(f"<th>{_e(n)}</th>" for n in names) + gain_head + "</tr>"
    rows = []
    for c in classes:
        values = [m["per_class_iou"].get(c) for m in models]
        label = f"{_e(c)} <span class='muted'>(tail)</span>" if c in tail else _e(c)
        cells = "".join(f"<td>{_pct(v)}</td>" for v in values)
        rows.append(
            f'<tr data-class="{_e(c)}"><td>{label}</td>{cells}{_gain(values[0], values[-1]) if with_gain else ""}</tr>'
        )
    for key, label, digits in (
        ("miou", "mIoU", 1),
        ("tail_miou", "tail mIoU", 1),
        ("pixel_accuracy", "pixel accuracy", 1),
        ("ece", "ECE", 2),
    ):
        values = [m.get(key) for m in models]
        if all(v is None for v in values):
            continue
        cells = "".join(f"<td>{_pct(v, digits)}</td>" for v in values)
        gain = _gain(values[0], values[-1], lower_is_better=key == "ece") if with_gain else ""
        rows.append(f'<tr class="summary" data-metric="{key}"><td>{label}</td>{cells}{gain}</tr>')
    images = "".join(f"<td>{_e(m.get('images', ''))}</td>" for m in models)
    rows.append(f'<tr class="muted"><td>images</td>{images}{"<td></td>" if with_gain else ""}</tr>')
    return f'<table id="{table_id}"><thead>{head}</thead><tbody>{"".join(rows)}</tbody></table>'


def _metrics_section(run_dir: Path) -> str:
    models = evaluations(run_dir)
    if not models:
        hint = '<p class="muted">No model was evaluated: run <code>labelpipe evaluate</code>.</p>'
        return f'<h2 id="metrics">Metrics</h2>{hint}'
    by_split: dict[str, list[dict[str, Any]]] = {}
    for m in models:
        by_split.setdefault(m.get("split", "?"), []).append(m)
    parts = ['<h2 id="metrics">Metrics</h2><p>IoU in percent; ECE in percent (15 bins).</p>']
    for split, group in by_split.items():
        parts.append(f"<h3>{_e(split)}</h3>")
        parts.append(metrics_table(group, f"metrics-{_e(split)}"))
    parts.append('<h3 id="evaluation-plots">Evaluation plots and sample predictions</h3>')
    for m in models:
        d = run_dir / "evaluate" / m["model"]
        parts.append(f"<h4>{_e(m['model'])} on {_e(m.get('split', ''))}</h4>")
        parts += [
            _img(d / "samples.png", f"{m['model']}: image, ground truth, prediction", "samples"),
            _img(d / "per_class.png", f"{m['model']}: per-class IoU"),
            _img(d / "reliability.png", f"{m['model']}: reliability"),
            _img(d / "confusion.png", f"{m['model']}: confusion (rows: ground truth)"),
        ]
    return "".join(parts)


def _pseudolabel_block(title: str, stage_dir: Path, history: dict[str, Any] | None) -> str:
    report = read_json(stage_dir / "report.json")
    if report is None:
        return ""
    rows = [
        ("method", report.get("method")),
        ("alpha", report.get("alpha")),
        ("images", report.get("images")),
        ("kept fraction", _pct(report.get("kept_fraction"))),
        (
            "KL(prior || pseudo)",
            f"{report['kl_prior_pseudo']:.3f}" if report.get("kl_prior_pseudo") is not None else "-",
        ),
    ]
    if report.get("has_ground_truth"):
        rows += [
            ("pseudo-label mIoU", _pct(report.get("pseudo_miou"))),
            ("pseudo-label mIoU (kept pixels)", _pct(report.get("pseudo_miou_kept"))),
            ("precision of kept pixels", _pct((history or {}).get("precision"))),
            ("teacher ECE", _pct(report.get("ece"), 2)),
        ]
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    per_class = report.get("per_class", {})
    has_precision = any("precision" in v for v in per_class.values())
    class_head = "<tr><th>class</th><th>kept px</th><th>kept / predicted</th><th>prior</th>"
    class_head += "<th>precision</th><th>IoU</th></tr>" if has_precision else "</tr>"
    class_rows = []
    for name, v in per_class.items():
        cells = (
            f"<td>{v.get('kept', '')}</td><td>{_pct(v.get('kept_of_predicted'))}</td><td>{_pct(v.get('prior'), 2)}</td>"
        )
        if has_precision:
            cells += f"<td>{_pct(v.get('precision'))}</td><td>{_pct(v.get('iou'))}</td>"
        class_rows.append(f"<tr><td>{_e(name)}</td>{cells}</tr>")
    plots = stage_dir / "plots"
    return (
        f"<h3>{_e(title)}</h3>"
        f'<table class="pseudolabel-summary"><tbody>{body}</tbody></table>'
        f"<details><summary>per class</summary><table><thead>{class_head}</thead>"
        f"<tbody>{''.join(class_rows)}</tbody></table></details>"
        + _img(plots / "samples.png", f"{title}: samples", "samples")
        + _img(plots / "class_distribution.png", f"{title}: class distribution")
        + _img(plots / "histograms.png", f"{title}: confidence / entropy / variance")
        + _img(plots / "reliability.png", f"{title}: teacher reliability")
    )


def _pseudolabel_section(run_dir: Path) -> str:
    parts = []
    history = {f"round-{h['round']}": h for h in round_history(run_dir / "selftrain")}
    rounds = sorted(run_dir.glob("selftrain/round-*/pseudolabel"), key=lambda p: model_order(p.parent.name))
    for d in rounds:
        parts.append(_pseudolabel_block(f"{d.parent.name}: pseudo-labels", d, history.get(d.parent.name)))
    for d in sorted(run_dir.glob("pseudolabel/*")):
        parts.append(_pseudolabel_block(f"pseudolabel {d.name}", d, None))
    parts = [p for p in parts if p]
    if not parts:
        return ""
    return '<h2 id="pseudolabels">Pseudo-labels</h2>' + "".join(parts)


def _curves_section(run_dir: Path) -> str:
    stages = [run_dir / "pretrain"] + sorted(
        (p.parent for p in run_dir.glob("selftrain/round-*/train/curves.png")),
        key=lambda p: model_order(p.parent.name),
    )
    figures = [_img(d / "curves.png", str(d.relative_to(run_dir)), "curves") for d in stages]
    figures = [f for f in figures if f]
    if not figures:
        return ""
    return '<h2 id="curves">Training curves</h2>' + "".join(f"<div>{f}</div>" for f in figures)


def _overlays_section(run_dir: Path, n: int = 8) -> str:
    """The run's latest model on the first ``n`` test images, drawn as ``segment`` draws them (on CPU).

    The only thing the report computes: a few forward passes. Skipped, with a note, when the data set
    or the model is not at hand.
    """
    import tempfile

    import torch

    from labelpipe.config import DataConfig, load_yaml
    from labelpipe.data import open_source
    from labelpipe.inference.segmenter import InputImage, load_run_segmenter, segment_images
    from labelpipe.runtime import Runtime

    head = '<h2 id="overlays">Sample overlays</h2>'
    try:
        raw = load_yaml(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
        data = DataConfig.model_validate(raw.get("data", {}))
        if not data.resolved_root().is_dir():
            return f'{head}<p class="muted">data set {_e(data.resolved_root())} not found; no overlays</p>'
        source = open_source(data.resolved_root(), data.kind)
        split = source.protocol(data.protocol)["test"]
        samples = source.split(split)[:n]
        cpu = torch.device("cpu")
        segmenter = load_run_segmenter(run_dir, None, cpu)
        with tempfile.TemporaryDirectory() as tmp:
            items = [InputImage(s.image, f"{i:03d}") for i, s in enumerate(samples)]
            segment_images(segmenter, items, Path(tmp), Runtime(cpu), batch_size=n, progress=False)
            figures = [
                _img(Path(tmp) / f"{item.name}_overlay.jpg", f"{sample.id}", "overlay")
                for item, sample in zip(items, samples, strict=True)
            ]
    except (LabelpipeError, OSError, ValueError) as exc:
        return f'{head}<p class="muted">no overlays: {_e(exc)}</p>'
    legend = "".join(
        f'<span class="swatch" style="background: rgb{tuple(segmenter.palette[c])}"></span>{_e(name)} '
        for c, name in enumerate(segmenter.classes)
    )
    return f"{head}<p>{_e(segmenter.name)} on {_e(split)}: {legend}</p>{''.join(figures)}"


def render(run_dir: Path) -> str:
    """The report page of ``run_dir`` as one HTML string."""
    config = run_dir / "config.yaml"
    config_text = config.read_text() if config.is_file() else "(no config.yaml)"
    sections = [
        _stages_section(run_dir),
        _metrics_section(run_dir),
        _pseudolabel_section(run_dir),
        _curves_section(run_dir),
        _overlays_section(run_dir) if any(run_dir.glob("**/model.safetensors")) else "",
        f'<h2 id="config">Config</h2><pre>{_e(config_text)}</pre>',
    ]
    nav = "".join(
        f'<a href="#{i}">{t}</a>'
        for i, t in (
            ("stages", "stages"),
            ("metrics", "metrics"),
            ("pseudolabels", "pseudo-labels"),
            ("curves", "curves"),
            ("overlays", "overlays"),
            ("config", "config"),
        )
    )
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        f"<title>labelpipe report: {_e(run_dir.name)}</title><style>{STYLE}</style></head>"
        f"<body><h1>labelpipe report: {_e(run_dir)}</h1>"
        f'<p class="muted">generated {generated} by labelpipe {_e(__version__)}</p><nav>{nav}</nav>'
        + "".join(s for s in sections if s)
        + f"<script>{SCRIPT}</script></body></html>\n"
    )


def write_report(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``out`` (default ``RUN/report.html``) atomically; returns its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LabelpipeError(f"{run_dir}: no such run directory; pass the --run of an earlier command")
    if not any(run_dir.rglob("manifest.json")):
        raise LabelpipeError(f"{run_dir}: no stage has run here yet; run `labelpipe pretrain --run {run_dir}` first")
    out = Path(out) if out is not None else run_dir / "report.html"
    atomic_write_text(out, render(run_dir))
    return out
