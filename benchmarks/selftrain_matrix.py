"""Pretrain vs. self-training rounds on DigitScapes, for the configurations of issues 4 and 14.

The base recipe is `stages/digitscapes_dars.yaml` (scale n from ImageNet, class-balanced source CE,
rounds of 500 steps; session 4's tables used the then demo recipe, ResNet-18 from scratch). The offline
configurations run two rounds with stored pseudo-labels; ``f`` runs the demo's single online
mean-teacher round (``selftrain.pseudo_source=teacher``, entropy split, CutMix) of 1,000 steps.

For each (protocol, seed): one pretrain run, then one copy of it per configuration that runs
selftrain and evaluates the last round on target_test. Prints a markdown table of mean and std
over seeds (mIoU and tail mIoU, in %), and appends every single result to a JSON lines file.
Everything goes through the CLI, and every stage skips itself when up to date, so an interrupted
matrix continues where it stopped.

    python benchmarks/selftrain_matrix.py --protocols da semi-1_16 --seeds 0 1 2
    python benchmarks/selftrain_matrix.py --quick          # 1 seed, DA only, shorter rounds
    python benchmarks/selftrain_matrix.py --configs 0      # only the control (keys' first letters)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    # The control: the same rounds (labeled batches, unlabeled images through the model and its BatchNorm
    # statistics, schedule, augmentation) with the pseudo-label loss weighted 0. A configuration that does
    # not beat it learns nothing from its pseudo-labels, whatever it gains over pretrain.
    "0: rounds without pseudo-label loss (control)": [
        "--method",
        "dars",
        "--loss",
        "ce",
        "--set",
        "selftrain.unsup_weight=0",
    ],
    "a: threshold 0.9 + CE": ["--method", "threshold", "--loss", "ce", "--set", "pseudolabel.tau=0.9"],
    "b: DARS + CE": ["--method", "dars", "--loss", "ce"],
    "c: DARS + SCE + contrastive": ["--method", "dars", "--loss", "sce", "--contrastive"],
    "d: variance + rectified": ["--method", "variance", "--rectified"],
    "e: everything": ["--method", "dars", "--loss", "sce", "--contrastive", "--rectified", "--denoise"],
    "f: online mean teacher + entropy split + CutMix": [
        "--rounds",
        "1",
        "--method",
        "entropy",
        "--loss",
        "ce",
        "--set",
        "selftrain.pseudo_source=teacher",
        "--set",
        "selftrain.alphas=[0.2]",
        "--set",
        "selftrain.steps=1000",
    ],
}
DEFAULT_ROUNDS = 2


def labelpipe(*args: str) -> None:
    cmd = [sys.executable, "-m", "labelpipe", *args]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{result.stderr[-2000:]}")


def share_round1_predict(run: Path) -> None:
    """Round 1 predicts with the pretrained model in every configuration: copy a sibling's finished store.

    The predict stage's fingerprint covers the weights, split and options, not the run directory, so the copy
    is taken as up to date and skipped; a copy from a different model would simply be recomputed.
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


def metrics(run: Path, model: str) -> dict:
    return json.loads((run / "evaluate" / model / "metrics.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--protocols", nargs="+", default=["da", "semi-1_16"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), help="keys of CONFIGS (prefix letters ok)")
    parser.add_argument("--recipe", default=str(REPO / "stages" / "digitscapes_dars.yaml"))
    parser.add_argument("--round-steps", type=int, default=None, help="selftrain steps per round")
    parser.add_argument("--out", default=str(REPO / "runs" / "matrix"))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report", action="store_true", help="only print the table of what --out holds")
    args = parser.parse_args()
    if args.report:
        report(Path(args.out))
        return
    if args.quick:
        args.protocols, args.seeds = ["da"], [0]
    chosen = [k for k in CONFIGS if any(k.startswith(c) for c in args.configs)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.jsonl"
    for protocol in args.protocols:
        for seed in args.seeds:
            base = out / f"{protocol}-s{seed}" / "pretrain-only"
            common = ["--config", args.recipe, "--seed", str(seed), "--protocol", protocol]
            t0 = time.time()
            labelpipe("pretrain", "--run", str(base), *common)
            labelpipe("evaluate", "--run", str(base), "--model", "pretrain", *common)
            m = metrics(base, "pretrain")
            print(
                f"{protocol} seed {seed} pretrain: mIoU {100 * m['miou']:.1f} ({time.time() - t0:.0f}s)",
                flush=True,
            )
            for name in chosen:
                run = out / f"{protocol}-s{seed}" / name.split(":")[0]
                if not run.exists():
                    shutil.copytree(base, run, ignore=shutil.ignore_patterns("evaluate", "checkpoint.pt"))
                    shutil.copy2(base / "pretrain" / "checkpoint.pt", run / "pretrain" / "checkpoint.pt")
                share_round1_predict(run)
                extra = ["--steps", str(args.round_steps)] if args.round_steps else []
                t0 = time.time()
                options = CONFIGS[name]
                rounds = int(options[options.index("--rounds") + 1]) if "--rounds" in options else DEFAULT_ROUNDS
                default_rounds = [] if "--rounds" in options else ["--rounds", str(DEFAULT_ROUNDS)]
                labelpipe("selftrain", "--run", str(run), *default_rounds, *common, *options, *extra)
                labelpipe("evaluate", "--run", str(run), *common)
                m = metrics(run, f"round-{rounds}")
                with results_file.open("a") as fh:
                    fh.write(
                        json.dumps(
                            {
                                "protocol": protocol,
                                "seed": seed,
                                "config": name,
                                "miou": m["miou"],
                                "tail_miou": m["tail_miou"],
                                "wall_s": time.time() - t0,
                            }
                        )
                        + "\n"
                    )
                print(
                    f"{protocol} seed {seed} {name}: mIoU {100 * m['miou']:.1f} ({time.time() - t0:.0f}s)",
                    flush=True,
                )

    print()
    report(out)


def paired_gain(latest: dict, protocol: str, seeds: list[int], name: str, reference: str) -> str:
    """Mean ± std over seeds of (name - reference) within each seed: the seeds' own spread cancels."""
    paired = [s for s in seeds if (protocol, s, reference) in latest]
    if name in ("pretrain", reference) or not paired:
        return "-"
    d = 100 * np.asarray([latest[(protocol, s, name)][0] - latest[(protocol, s, reference)][0] for s in paired])
    return f"{d.mean():+.1f} ± {d.std(ddof=1) if len(d) > 1 else 0:.1f} ({len(d)})"


def report(out: Path) -> None:
    """Mean and std over seeds of every finished run under ``out`` (the last result of each run counts)."""
    latest: dict[tuple[str, int, str], tuple[float, float]] = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        r = json.loads(line)
        latest[(r["protocol"], r["seed"], r["config"])] = (r["miou"], r["tail_miou"])
    for metrics_file in sorted(out.glob("*-s*/pretrain-only/evaluate/pretrain/metrics.json")):
        protocol, seed = metrics_file.parents[3].name.rsplit("-s", 1)
        m = json.loads(metrics_file.read_text())
        latest[(protocol, int(seed), "pretrain")] = (m["miou"], m["tail_miou"])
    order = ["pretrain", *CONFIGS]
    control = next(iter(CONFIGS))
    print(
        "| protocol | model | seeds | mIoU % (mean ± std) | tail mIoU % (mean ± std) | "
        "mIoU gain over the seed's pretrain | over the seed's control | per seed (mIoU) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for protocol in sorted({k[0] for k in latest}):
        for name in order:
            seeds = sorted(s for (p, s, n) in latest if p == protocol and n == name)
            if not seeds:
                continue
            arr = 100 * np.asarray([latest[(protocol, s, name)] for s in seeds])
            std = arr.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(2)  # sample std over seeds
            per_seed = ", ".join(f"s{s} {v:.1f}" for s, v in zip(seeds, arr[:, 0], strict=True))

            print(
                f"| {protocol} | {name} | {len(seeds)} | {arr[:, 0].mean():.1f} ± {std[0]:.1f} | "
                f"{arr[:, 1].mean():.1f} ± {std[1]:.1f} | {paired_gain(latest, protocol, seeds, name, 'pretrain')} | "
                f"{paired_gain(latest, protocol, seeds, name, control)} | "
                f"{per_seed} |"
            )


if __name__ == "__main__":
    main()
