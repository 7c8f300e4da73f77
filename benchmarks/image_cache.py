"""What the in-memory cache of decoded training images (``train.image_cache_mb``) saves, as a user meets it.

End to end (the default): ``labelpipe selftrain`` of U2PL's chosen round on semi 1/16 (the plateau recipe,
``plateau-u2pl-4000-denoise-cutmix1``'s settings) over ``--steps`` steps, each run in a fresh process from a copy
of the same pretrained run, the cache off (``train.image_cache_mb=0``) and on (the default), interleaved
``--repeats`` times so that a drifting machine slows both alike. Wall time of the whole command (start-up,
the round's own evaluation every 250 steps included) and its peak RSS (``os.wait4``'s usage of that child).

``--component``: the round's two datasets alone (labeled and unlabeled, as ``round_batches`` builds them),
``--items`` items each, milliseconds per item with and without the cache (after one pass that fills it).

    python benchmarks/image_cache.py --pretrained RUN [--steps 500] [--repeats 2] [--threads 2]
    python benchmarks/image_cache.py --component [--items 2000]

RUN: a run directory whose ``pretrain`` stage is done on semi 1/16 with ``stages/digitscapes_source_only.yaml``
(``benchmarks/selftrain_matrix.py``'s ``OUT/pretrains/digitscapes_source_only-semi-1_16-s0``).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "stages" / "digitscapes_source_only.yaml"
# plateau-u2pl-4000-denoise-cutmix1 (benchmarks/selftrain_matrix.py) without its step count
ROUND = (
    "selftrain.pseudo_source=teacher",
    "selftrain.method=entropy",
    "selftrain.rounds=1",
    "selftrain.alphas=[0.2]",
    "selftrain.lr=0.004",
    "selftrain.contrastive=true",
    "selftrain.lambda_contrastive=0.1",
    "selftrain.contrastive_anchors=64",
    "selftrain.contrastive_negatives=50",
    "selftrain.memory_capacity=5000",
    "selftrain.denoise=true",
    "selftrain.cutmix_p=1.0",
)
SETTINGS = {"off": 0, "on": 512}  # label -> train.image_cache_mb


def one_round(pretrained: Path, steps: int, cache_mb: int, threads: int) -> tuple[float, float]:
    """Wall seconds and peak RSS (MiB) of one ``labelpipe selftrain`` in a fresh process."""
    with tempfile.TemporaryDirectory(prefix="image_cache-") as tmp:
        run = Path(tmp) / "run"
        shutil.copytree(pretrained, run, ignore=shutil.ignore_patterns("evaluate", "matrix", "round-*", "selftrain"))
        sets = [f"--set={s}" for s in (*ROUND, f"selftrain.steps={steps}", f"train.image_cache_mb={cache_mb}")]
        cmd = [sys.executable, "-m", "labelpipe", "selftrain", "--run", str(run), "--config", str(RECIPE)]
        cmd += ["--protocol", "semi-1_16", *sets]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        t0 = time.perf_counter()
        child = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        _, status, usage = os.wait4(child.pid, 0)  # this child's own resource usage
        wall = time.perf_counter() - t0
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)}: exit {child.returncode}")
    return wall, usage.ru_maxrss / 1024  # Linux: kB


def end_to_end(args: argparse.Namespace) -> None:
    walls: dict[str, list[float]] = {k: [] for k in SETTINGS}
    rss: dict[str, float] = {}
    for r in range(args.repeats):
        for label, mb in SETTINGS.items():
            wall, peak = one_round(args.pretrained, args.steps, mb, args.threads)
            walls[label].append(wall)
            rss[label] = peak
            print(f"repeat {r + 1}, cache {label}: {wall:.1f} s", flush=True)
    off = statistics.median(walls["off"])
    print(f"\n`labelpipe selftrain`, U2PL's chosen round, {args.steps} steps, {args.threads} threads, fresh processes")
    print("\n| train.image_cache_mb | wall, median (runs) | vs off | peak RSS (last run) |")
    print("|---|---|---|---|")
    for label, mb in SETTINGS.items():
        med = statistics.median(walls[label])
        runs = ", ".join(f"{w:.1f}" for w in walls[label])
        print(f"| {mb} ({label}) | {med:.1f} s ({runs}) | {off / med:.3f}x | {rss[label]:.0f} MiB |")


def component(args: argparse.Namespace) -> None:
    import torch

    from labelpipe.config import DataConfig
    from labelpipe.data import open_source
    from labelpipe.data.dataset import DecodedCache, SegmentationDataset
    from labelpipe.data.transforms import labeled_photometric, strong_photometric, weak_transform

    torch.set_num_threads(1)
    source = open_source(DataConfig(protocol="semi-1_16").resolved_root())
    roles = source.protocol("semi-1_16")
    labeled, unlabeled = source.split(roles["labeled"]), source.split(roles["unlabeled"])
    weak = weak_transform(64, (0.75, 1.25), False)

    def datasets(cache):
        return {
            "labeled": SegmentationDataset(source, labeled, weak, photometric=labeled_photometric(0.0), cache=cache),
            "unlabeled": SegmentationDataset(
                source,
                unlabeled,
                weak,
                photometric=strong_photometric(1.0),
                require_masks=False,
                masks=lambda i: None,
                pad_mask=True,
                weak_view=True,
                cache=cache,
            ),
        }

    print(f"\nthe round's datasets alone, {args.items} items each, 1 thread (a component, not the command)")
    print("\n| dataset | images | cache off, ms/item | cache on, ms/item | saved |")
    print("|---|---|---|---|---|")
    plain, cached = datasets(None), datasets(DecodedCache.of_mib(512))
    for name in plain:
        n = len(plain[name])
        keys = [(i % n, 17 + i) for i in range(args.items)]
        for i in range(n):  # fill the cache: what a round has after its first epoch
            cached[name].load(i)
        times = {}
        for label, ds in (("off", plain[name]), ("on", cached[name])):
            t0 = time.perf_counter()
            for key in keys:
                ds[key]
            times[label] = 1000 * (time.perf_counter() - t0) / len(keys)
        saved = 100 * (1 - times["on"] / times["off"])
        print(f"| {name} | {n} | {times['off']:.2f} | {times['on']:.2f} | {saved:.0f} % |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pretrained", type=Path, help="a run directory with its semi 1/16 plateau pretrain done")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--component", action="store_true", help="the datasets alone, not the command")
    parser.add_argument("--items", type=int, default=2000)
    args = parser.parse_args()
    if args.component:
        component(args)
    elif args.pretrained is None or not (args.pretrained / "pretrain" / "model.safetensors").is_file():
        parser.error(f"--pretrained {args.pretrained}: not a run with a finished pretrain; see --help")
    else:
        end_to_end(args)


if __name__ == "__main__":
    main()
