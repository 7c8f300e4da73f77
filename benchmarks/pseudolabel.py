"""DARS pseudo-labels as a user runs them: ``labelpipe pseudolabel`` end to end vs the authors' pipeline.

Synthetic softmax maps of 19 classes (an over-confident head: most confidences within a few 1e-3 of 1.0,
so float16 ties them and DARS samples), deterministic in (seed, map index). Per case:

1. the maps are written once to ``WORKDIR`` as float16 (C, H, W) probabilities (``probs-*.npy``, read by
   the authors' pipeline) and reduced by the public writer to a prediction store
   (``PredictionWriter.add_probabilities``: label, conf, entropy, and the writer's pass-1 histograms), and
   copied without those histograms (what a store of ``predict`` or of another writer is);
2. in fresh processes, interleaved (repeat r: authors, labelpipe, authors, labelpipe, ...), with one
   thread each (OMP/MKL/OPENBLAS_NUM_THREADS=1, ``torch.set_num_threads(1)``):
   - ``labelpipe pseudolabel --predictions STORE --out DIR --prior PRIOR.npy --method dars --alpha 0.5``
     (the CLI as installed: imports, pass 1 (from the stored histogram: no read), pass 2, labels.h5,
     report.json, manifest; no plots, the default with --predictions; one run with ``--plots`` for the
     100-map case), and the same on the copy without histograms (pass 1 reads label + conf);
   - the authors' pipeline re-implemented from its description (ALGORITHMS.md section 2; no code copied):
     ``first_forward`` keeps every pixel's confidence (float32) and prediction (int64) of the set in
     memory and sorts each class's confidences for its threshold; ``second_forward`` recomputes each map's
     confidences, and per class drops a fixed count of the candidates at or above the threshold chosen by
     ``randperm``, then saves the labels (``.npy``, cheaper than the authors' PNGs). Its input is the same
     float16 maps, read from the ``.npy`` (the authors run the network twice instead).
   Wall time is the child's, start to exit; peak RSS is the child's ``ru_maxrss`` (``os.wait4``).
3. components, in one more fresh process: import of the stage, pass 1 (read label + conf, histogram),
   the fit, pass 2 (read, label), writing labels.h5.

The authors' thresholds come from float32 maxima of the float16 maps; labelpipe's from the store's float16
conf (the writer renormalises the probabilities, so a confidence can round to the next float16): the table
reports how far the thresholds and sampling ratios are apart and how many labels differ where both keep.

Other processes share this machine's CPUs while it runs: walls are noisy; the repeats are interleaved so
that both pipelines see the same load, and the table gives the median and the spread (min-max).

    python benchmarks/pseudolabel.py            # 100 and 400 maps of 256 x 512, 16 and 64 of 1024 x 2048
    python benchmarks/pseudolabel.py --quick    # 20 maps of 256 x 512, 4 of 1024 x 2048, 1 repeat
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NUM_CLASSES = 19
ALPHA = 0.5
SEED = 0
# Roughly the Cityscapes train pixel distribution (road, sidewalk, building, ...), normalised.
PRIOR = np.array(
    [36.9, 6.1, 22.8, 0.65, 0.87, 1.23, 0.21, 0.55, 15.9, 1.16, 4.0, 1.21, 0.13, 7.0, 0.27, 0.24, 0.23, 0.1, 0.41]
)
PRIOR = PRIOR / PRIOR.sum()
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
TIME = "/usr/bin/time"  # GNU time: peak RSS of the command alone
BASELINE_BYTES_PER_PIXEL = 40  # the authors' in-memory float32 + int64 per pixel, twice (lists + cat), + sort


# ------------------------------------------------------------------------------------------ synthetic
def synthetic_probs(index: int, height: int, width: int) -> np.ndarray:
    """(C, H, W) float16 softmax map: a skewed class per pixel holds conf (mostly within 1e-2 of 1.0, tied
    in float16), the other classes share 1 - conf at random."""
    rng = np.random.default_rng([SEED, index])
    lookup = np.repeat(np.arange(NUM_CLASSES, dtype=np.uint8), np.round(PRIOR * 4096).astype(int))
    label = lookup[rng.integers(0, lookup.size, size=(height, width))]
    scale = np.float32(0.002) + np.float32(0.05) * (label.astype(np.float32) / NUM_CLASSES)
    conf = np.clip(1.0 - rng.standard_exponential((height, width), dtype=np.float32) * scale, 0.35, 1.0)
    rest = rng.random((NUM_CLASSES, height, width), dtype=np.float32)
    np.put_along_axis(rest, label[None].astype(np.intp), 0.0, axis=0)
    rest *= (1.0 - conf) / rest.sum(0)
    np.put_along_axis(rest, label[None].astype(np.intp), conf[None], axis=0)
    return rest.astype(np.float16)


def make_inputs(
    workdir: Path, n_maps: int, height: int, width: int, with_probs: bool, distinct: int = 0
) -> dict[str, Path]:
    """The case's float16 maps (``.npy``, when the authors' pipeline runs on it) and its store; reused.
    ``distinct`` > 0: the store repeats the columns of that many distinct maps (see :func:`write_store`)."""
    name = f"{n_maps}x{height}x{width}"
    paths = {"store": workdir / f"store-{name}.h5", "probs": workdir / f"probs-{name}.npy"}
    if with_probs and not paths["probs"].is_file():
        tmp = paths["probs"].with_suffix(".tmp.npy")
        maps = np.lib.format.open_memmap(tmp, "w+", np.float16, (n_maps, NUM_CLASSES, height, width))
        for i in range(n_maps):
            maps[i] = synthetic_probs(i, height, width)
        maps.flush()
        del maps
        tmp.rename(paths["probs"])
    if not paths["store"].is_file():
        probs = paths["probs"] if with_probs else None
        worker = ["--worker", "write", str(paths["store"]), str(n_maps), str(height), str(width), str(probs or "")]
        worker += [str(distinct)]
        start = time.perf_counter()
        subprocess.run([sys.executable, __file__, *worker], check=True, env={**os.environ, **ONE_THREAD})
        print(f"  wrote {paths['store'].name} in {time.perf_counter() - start:.1f} s", flush=True)
    return paths


def read_map(path: Path, index: int) -> np.ndarray:
    """Map ``index`` of a (N, C, H, W) ``.npy``, read into fresh memory (a memory map would add the file's
    pages to the reader's RSS)."""
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
        count = int(np.prod(shape[1:]))
        f.seek(f.tell() + index * count * dtype.itemsize)
        return np.fromfile(f, dtype=dtype, count=count).reshape(shape[1:])


def count_maps(path: Path) -> int:
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return reader(f)[0][0]


def write_store(store: Path, n_maps: int, height: int, width: int, probs_path: str, distinct: int = 0) -> None:
    """The store of ``n_maps`` maps, reduced by ``PredictionWriter.add_probabilities``. With ``distinct``
    in (0, n_maps), only that many maps are generated and reduced (~15 s each at 19 x 1024 x 2048 on a
    loaded core) and the store repeats their columns under ``n_maps`` ids with ``PredictionWriter.add``:
    what pseudolabel reads is the same amount of data, the content repeats."""
    import torch

    from labelpipe.store import PredictionStore, PredictionWriter

    torch.set_num_threads(1)
    tmp = store.with_suffix(".tmp.h5")
    classes = [f"class{c}" for c in range(NUM_CLASSES)]
    generated = distinct if 0 < distinct < n_maps else n_maps
    with PredictionWriter(tmp, classes) as writer:
        for i in range(generated):
            probs = read_map(Path(probs_path), i) if probs_path else synthetic_probs(i, height, width)
            writer.add_probabilities(f"city{i % 18}/map{i:05d}", probs)
    if generated < n_maps:
        seed = tmp.with_suffix(".distinct.h5")
        tmp.rename(seed)
        with PredictionStore(seed) as source, PredictionWriter(tmp, classes) as writer:
            columns = [source.read(image_id) for image_id in source.ids]
            for i in range(n_maps):
                writer.add(f"city{i % 18}/map{i:05d}", **columns[i % generated])
        seed.unlink()
    tmp.rename(store)


# ------------------------------------------------------------------------------- the authors' pipeline
def authors_pipeline(probs_path: Path, out_dir: Path) -> dict:
    """first_forward + second_forward as described in ALGORITHMS.md (DARS, "Authors' code")."""
    import torch

    torch.set_num_threads(1)
    n_maps = count_maps(probs_path)
    out_dir.mkdir(parents=True, exist_ok=True)

    def network_output(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.from_numpy(read_map(probs_path, i)).float()  # the softmax the network would give
        return probs.max(0)

    # first_forward: every pixel's confidence and prediction of the set, in memory; thresholds by sorting.
    confs, preds = [], []
    for i in range(n_maps):
        conf, pred = network_output(i)
        confs.append(conf.reshape(-1))
        preds.append(pred.reshape(-1))
    conf, pred = torch.cat(confs), torch.cat(preds)
    del confs, preds
    n_pixels = conf.numel()
    thresholds, ratios = [], []
    for c in range(NUM_CLASSES):
        class_conf = conf[pred == c]
        target = int(np.floor(ALPHA * PRIOR[c] * n_pixels))
        if class_conf.numel() == 0 or target == 0:
            thresholds.append(1.0)
            ratios.append(0.0)
            continue
        ordered = torch.sort(class_conf, descending=True).values
        threshold = float(ordered[min(target, ordered.numel()) - 1])
        candidates = int((class_conf >= threshold).sum())
        thresholds.append(threshold)
        ratios.append(min(1.0, target / candidates))
    del conf, pred

    # second_forward: per map and class, drop round((1 - s_c) * m) of the m candidates (randperm).
    generator = torch.Generator().manual_seed(SEED)
    for i in range(n_maps):
        conf, pred = network_output(i)
        label = torch.full_like(pred, 255)
        for c in range(NUM_CLASSES):
            candidates = ((pred == c) & (conf >= thresholds[c])).reshape(-1).nonzero().squeeze(1)
            if candidates.numel() == 0:
                continue
            keep = candidates.numel() - round((1.0 - ratios[c]) * candidates.numel())
            chosen = candidates[torch.randperm(candidates.numel(), generator=generator)[:keep]]
            label.view(-1)[chosen] = c
        np.save(out_dir / f"{i:05d}.npy", label.to(torch.uint8).numpy())
    return {"thresholds": thresholds, "sampling_ratio": ratios}


# ------------------------------------------------------------------------------------------ processes
def timed(command: list[str], env: dict[str, str] | None = None) -> dict:
    """Wall seconds and peak RSS (MB) of one fresh process. The RSS is GNU time's ``%M`` of the command:
    the ``ru_maxrss`` of a child of this process would also count the pages it shared with this (large)
    process between fork and exec."""
    report = Path(os.environ.get("TMPDIR", "/tmp")) / f"labelpipe-bench-time-{os.getpid()}.txt"
    start = time.perf_counter()
    done = subprocess.run(
        [TIME, "-f", "%M", "-o", str(report), *command],
        env={**os.environ, **ONE_THREAD, **(env or {})},
        stdout=subprocess.DEVNULL,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}")
    rss_kb = int(report.read_text().split()[-1])
    report.unlink()
    return {"wall_s": wall, "rss_mb": rss_kb / 1024}


def labelpipe_command(store: Path, out: Path, prior: Path, *extra: str) -> list[str]:
    args = ["pseudolabel", "--predictions", str(store), "--out", str(out), "--prior", str(prior)]
    args += ["--method", "dars", "--alpha", str(ALPHA), "--seed", str(SEED), "--force", *extra]
    return [sys.executable, "-m", "labelpipe", *args]


def components(store: Path, out: Path) -> dict:
    """Seconds of each part of the stage, in this (fresh) process."""
    start = time.perf_counter()
    from labelpipe.pseudo.labelling import Settings, label_store
    from labelpipe.pseudo.streaming import apply, fit_from_histogram, histogram_pass
    from labelpipe.store.prediction_store import PredictionStore

    times = {"import": time.perf_counter() - start}
    out.mkdir(parents=True, exist_ok=True)
    chunk = 4_000_000
    with PredictionStore(store) as predictions:
        start = time.perf_counter()
        hist = histogram_pass("dars", predictions.iter_chunks(("conf", "label"), None, chunk, None, True), NUM_CLASSES)
        times["pass 1: read + histogram"] = time.perf_counter() - start
        start = time.perf_counter()
        params = fit_from_histogram("dars", hist, NUM_CLASSES, prior=PRIOR, alpha=ALPHA)
        times["fit"] = time.perf_counter() - start
        rng = np.random.default_rng(SEED)
        start = time.perf_counter()
        for piece in predictions.iter_chunks(("label", "conf"), None, chunk, None, True):
            apply("dars", params, piece, rng)
        times["pass 2: read + label"] = time.perf_counter() - start
        settings = Settings("dars", ALPHA, 0.9, 0.2, None, SEED, chunk, plots=False)
        start = time.perf_counter()
        label_store(predictions, out, settings, [f"class{c}" for c in range(NUM_CLASSES)], PRIOR)
        times["label_store (both passes + labels.h5 + counts)"] = time.perf_counter() - start
    return times


def agreement(store_out: Path, authors_out: Path, authors: dict) -> dict:
    """Thresholds, sampling ratios, and the labels where both keep a pixel."""
    from labelpipe.store.prediction_store import PredictionStore

    report = json.loads((store_out / "report.json").read_text())
    ours_t = np.array([np.nan if t is None else t for t in report["params"]["thresholds"]])
    ours_s = np.array(report["params"]["sampling_ratio"])
    theirs_t, theirs_s = np.array(authors["thresholds"]), np.array(authors["sampling_ratio"])
    differing, both_kept, kept_ours, kept_theirs = 0, 0, 0, 0
    with PredictionStore(store_out / "labels.h5") as labels:
        for i, image_id in enumerate(labels.ids):
            ours = labels.read(image_id, ("label",))["label"]
            theirs = np.load(authors_out / f"{i:05d}.npy")
            both = (ours != 255) & (theirs != 255)
            both_kept += int(both.sum())
            differing += int((ours[both] != theirs[both]).sum())
            kept_ours += int((ours != 255).sum())
            kept_theirs += int((theirs != 255).sum())
    return {
        "thresholds_equal": int(np.sum(ours_t == theirs_t)),
        "threshold_max_diff": float(np.nanmax(np.abs(ours_t - theirs_t))),
        "ratio_max_diff": float(np.max(np.abs(ours_s - theirs_s))),
        "labels_differing_where_both_keep": differing,
        "both_kept": both_kept,
        "kept_ours": kept_ours,
        "kept_theirs": kept_theirs,
    }


# ---------------------------------------------------------------------------------------------- main
def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def without_histograms(store: Path) -> Path:
    """A copy of ``store`` without the writer's pass-1 histograms (``hist/``): what ``pseudolabel`` reads
    twice, as it does a store ``predict`` or another writer made."""
    import h5py

    bare = store.with_name(store.stem + "-nohist.h5")
    shutil.copy(store, bare)
    with h5py.File(bare, "r+") as fh:
        del fh["hist"]
    return bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="20 maps of 256 x 512 and 4 of 1024 x 2048, 1 repeat")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved runs of each pipeline per case")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/labelpipe-bench-pseudolabel"))
    parser.add_argument("--keep", action="store_true", help="keep the maps and stores in --workdir")
    parser.add_argument("--baseline-max-gb", type=float, default=3.0, help="skip the authors' pipeline above")
    parser.add_argument("--cases", choices=("all", "small", "big"), default="all", help="256 x 512, 1024 x 2048")
    parser.add_argument("--small", type=int, nargs="+", help="numbers of 256 x 512 maps (default 100 400)")
    parser.add_argument("--big", type=int, nargs="+", help="numbers of 1024 x 2048 maps (default 16 64)")
    parser.add_argument(
        "--distinct-maps", type=int, default=4, help="distinct 1024 x 2048 maps, repeated in the store (0: all)"
    )
    parser.add_argument("--baseline-big", action="store_true", help="also run the authors' on 1024 x 2048 maps")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:
        kind, rest = args.worker[0], args.worker[1:]
        if kind == "write":
            distinct = int(rest[5]) if len(rest) > 5 else 0
            write_store(
                Path(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4] if len(rest) > 4 else "", distinct
            )
        elif kind == "authors":
            (Path(rest[1]) / "result.json").write_text(json.dumps(authors_pipeline(Path(rest[0]), Path(rest[1]))))
        elif kind == "components":
            print(json.dumps(components(Path(rest[0]), Path(rest[1]))))
        return

    repeat = 1 if args.quick else args.repeat
    byte_compile()
    small, big = ([20], [4]) if args.quick else (args.small or [100, 400], args.big or [16, 64])
    cases = [(n, 256, 512) for n in small if args.cases != "big"]
    cases += [(n, 1024, 2048) for n in big if args.cases != "small"]
    args.workdir.mkdir(parents=True, exist_ok=True)
    prior = args.workdir / "prior.npy"
    np.save(prior, PRIOR)
    rows = []
    try:
        for n_maps, height, width in cases:
            name = f"{n_maps} x 19x{height}x{width}"
            pixels = n_maps * height * width
            with_baseline = pixels * BASELINE_BYTES_PER_PIXEL / 1e9 <= args.baseline_max_gb
            with_baseline &= height == 256 or args.baseline_big or args.quick
            distinct = args.distinct_maps if height > 256 and not with_baseline else 0
            print(f"{name}: preparing", flush=True)
            paths = make_inputs(args.workdir, n_maps, height, width, with_baseline, distinct)
            out = args.workdir / f"out-{n_maps}x{height}x{width}"
            authors_out = args.workdir / f"authors-{n_maps}x{height}x{width}"
            bare = without_histograms(paths["store"])
            runs: dict[str, list[dict]] = {"labelpipe": [], "authors": [], "labelpipe, no stored histograms": []}
            for _ in range(repeat):
                if with_baseline:
                    command = [sys.executable, __file__, "--worker", "authors", str(paths["probs"]), str(authors_out)]
                    runs["authors"].append(timed(command))
                runs["labelpipe"].append(timed(labelpipe_command(paths["store"], out, prior)))
                bare_run = timed(labelpipe_command(bare, args.workdir / "out-bare", prior))
                runs["labelpipe, no stored histograms"].append(bare_run)
            if n_maps == small[0] and height == 256:
                runs["labelpipe --plots"] = [
                    timed(labelpipe_command(paths["store"], args.workdir / "plots", prior, "--plots"))
                ]
            command = [sys.executable, __file__, "--worker", "components", str(paths["store"]), str(out / "components")]
            done = subprocess.run(command, check=True, capture_output=True, text=True, env={**os.environ, **ONE_THREAD})
            parts = json.loads(done.stdout.strip().splitlines()[-1])
            match = None
            if with_baseline:
                match = agreement(out, authors_out, json.loads((authors_out / "result.json").read_text()))
            rows.append((name, pixels, runs, parts, match))
            print_case(name, pixels, runs, parts, match)
            if not args.keep:
                for path in (paths["store"], paths["probs"], out, authors_out, bare, args.workdir / "out-bare"):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    print_table(rows)


def byte_compile() -> None:
    """Compile labelpipe's modules to ``__pycache__`` as installing does (``pip install`` and ``make install``
    byte-compile): in a checkout run with PYTHONDONTWRITEBYTECODE set, every fresh process would otherwise
    compile each module it imports from source (~30 ms), which no installed copy does."""
    import compileall

    compileall.compile_dir(str(REPO / "labelpipe"), quiet=1)


def print_case(name: str, pixels: int, runs: dict, parts: dict, match: dict | None) -> None:
    for kind, results in runs.items():
        if results:
            walls, rss = [r["wall_s"] for r in results], [r["rss_mb"] for r in results]
            print(f"  {kind:<18} wall {spread(walls)} s   peak RSS {max(rss):.0f} MB", flush=True)
    print("  components: " + ", ".join(f"{k} {v:.2f} s" for k, v in parts.items()), flush=True)
    if match:
        print(f"  agreement: {match}", flush=True)


def print_table(rows: list) -> None:
    header = "| maps | Mpix | authors' wall s | authors' peak RSS MB | labelpipe wall s | labelpipe peak RSS MB |"
    header += " speed-up | RSS ratio | store without histograms: wall s | speed-up |"
    print("\n" + header)
    print("|" + "---|" * 10)
    for name, pixels, runs, _, _ in rows:
        ours = runs["labelpipe"]
        ours_wall, ours_rss = statistics.median(r["wall_s"] for r in ours), max(r["rss_mb"] for r in ours)
        if runs["authors"]:
            theirs = runs["authors"]
            theirs_wall, theirs_rss = statistics.median(r["wall_s"] for r in theirs), max(r["rss_mb"] for r in theirs)
            cells = [spread([r["wall_s"] for r in theirs]), f"{theirs_rss:.0f}"]
            ratio = [f"{theirs_wall / ours_wall:.1f}x", f"{ours_rss / theirs_rss:.2f}x"]
        else:
            cells, ratio = ["skipped", "-"], ["-", "-"]
        ours_cells = [spread([r["wall_s"] for r in ours]), f"{ours_rss:.0f}"]
        bare = runs.get("labelpipe, no stored histograms") or []
        bare_cells = [spread([r["wall_s"] for r in bare]) if bare else "-", "-"]
        if bare and runs["authors"]:
            bare_cells[1] = f"{theirs_wall / statistics.median(r['wall_s'] for r in bare):.1f}x"
        row = [*cells, *ours_cells, *ratio, *bare_cells]
        print(f"| {name} | {pixels / 1e6:.1f} | {' | '.join(row)} |")


if __name__ == "__main__":
    main()
