"""Pseudo-label quality on DigitScapes: every generator on the predictions of a run's model.

Runs `predict` twice on the unlabeled split (T = 1 and T fitted on the val pixels), then
`pseudolabel` for each setting below into RUN/pseudolabel-quality/<name>/ (each with its full
report and plots), and prints a markdown table: pseudo-label mIoU (pixels without a label count
as misses), the mIoU over kept pixels, the kept fraction, the mean per-class coverage,
KL(prior || pseudo-label distribution) and the uncertainty gap.

    python benchmarks/pseudolabel_quality.py --run runs/demo          # the demo's pretrained model
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from labelpipe.config import resolve_config
from labelpipe.runtime import setup
from labelpipe.stages.predict import run_predict
from labelpipe.stages.pseudolabel import run_pseudolabel

SETTINGS = [
    ("threshold 0.9", "T=1", {"method": "threshold", "tau": 0.9}),
    ("threshold 0.95", "T=1", {"method": "threshold", "tau": 0.95}),
    ("threshold 0.99", "T=1", {"method": "threshold", "tau": 0.99}),
    ("cbst alpha 0.2", "T=1", {"method": "cbst", "alpha": 0.2}),
    ("dars alpha 0.2", "T=1", {"method": "dars", "alpha": 0.2}),
    ("dars alpha 0.5", "T=1", {"method": "dars", "alpha": 0.5}),
    ("dars alpha 0.2 + TS", "T=auto", {"method": "dars", "alpha": 0.2}),
    ("dars alpha 0.5 + TS", "T=auto", {"method": "dars", "alpha": 0.5}),
    ("entropy alpha_t 0.2", "T=1", {"method": "entropy", "alpha_t": 0.2}),
    ("variance", "T=1", {"method": "variance"}),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, default=Path("runs/demo"))
    parser.add_argument("--model", default="pretrain")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    base = resolve_config(args.run, sets=[f"device={args.device}"])
    runtime = setup(base.device)
    out = args.run / "pseudolabel-quality"
    stores = {}
    for tag, temperature in (("T=1", 1.0), ("T=auto", "auto")):
        cfg = base.model_copy(update={"predict": base.predict.model_copy(update={"temperature": temperature})})
        stores[tag] = run_predict(cfg, args.run, runtime, model_name=args.model, out_dir=out / f"predict-{tag}")
    rows = []
    for name, tag, options in SETTINGS:
        cfg = base.model_copy(update={"pseudolabel": base.pseudolabel.model_copy(update=options)})
        dest = out / name.replace(" ", "-").replace("+", "ts")
        run_pseudolabel(cfg, args.run, runtime, store_path=stores[tag], out_dir=dest, quiet=True)
        report = json.loads((dest / "report.json").read_text())
        coverage = [v.get("coverage") for v in report["per_class"].values() if v.get("coverage") is not None]
        rows.append((name, report, float(np.mean(coverage)) if coverage else float("nan")))
    temps = {
        t: json.loads((p.parent / "manifest.json").read_text())["summary"].get("temperature") for t, p in stores.items()
    }
    print(f"model {args.model} of {args.run}; fitted temperature {temps['T=auto']:.3f}")
    print(
        "\n| setting | pseudo mIoU % | mIoU kept % | kept % | mean class coverage % | KL(prior‖pseudo) | gap (conf) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r, cov in rows:

        def pct(v):
            return "-" if v is None else f"{100 * v:.1f}"

        print(
            f"| {name} | {pct(r.get('pseudo_miou'))} | {pct(r.get('pseudo_miou_kept'))} | "
            f"{pct(r['kept_fraction'])} | {100 * cov:.1f} | {r['kl_prior_pseudo']:.3f} | "
            f"{r.get('uncertainty_gap_conf') or float('nan'):.3f} |"
        )


if __name__ == "__main__":
    main()
