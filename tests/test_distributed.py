"""torchrun with 2 CPU processes (gloo): evaluate gives the one-process confusion matrix; pretrain runs, ends
with the same weights on every rank and resumes after a SIGKILL; predict joins its shards into the
one-process store; ``all_gather_rows`` concatenates uneven shares.

The tests launch ``torchrun --standalone --nproc_per_node 2 -m labelpipe -- ARGS``. This file is also the
worker of the in-process checks: ``torchrun ... -m tests.test_distributed OUT_DIR RUN_DIR``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from tests.conftest import REPO, TINY_RECIPE

TORCHRUN = Path(sys.executable).with_name("torchrun")
pytestmark = pytest.mark.skipif(not TORCHRUN.is_file(), reason="torchrun is not installed next to python")


def launch(args: list[str], data_cache: Path, module: str = "labelpipe", **popen) -> subprocess.Popen:
    """2 processes on CPU. The ``--`` stops torchrun's own option parsing: Python 3.11's argparse reads
    ``--run`` as an ambiguous abbreviation of torchrun's ``--run-path``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "LABELPIPE_DATA": str(data_cache)}
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", "-m", module, "--", *args]
    return subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def torchrun(args: list[str], data_cache: Path, module: str = "labelpipe", timeout: float = 120) -> str:
    proc = launch(args, data_cache, module)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"torchrun {' '.join(args)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def labelpipe(args: list[str]) -> None:
    from labelpipe.cli import main

    try:
        main(args)
    except SystemExit as exc:
        assert exc.code in (0, None), f"labelpipe {' '.join(args)} exited {exc.code}"


def tiny(command: str, run: Path, *extra: str) -> list[str]:
    return [command, "--config", str(TINY_RECIPE), "--run", str(run), "--device", "cpu", *extra]


def kill_tree(pid: int) -> None:
    """SIGKILL torchrun and its workers: torchrun starts each worker in a session of its own, so killing
    torchrun's process group alone would leave them training."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    for p in tree:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


# -- the worker (runs under torchrun) ---------------------------------------------------------------------


def worker(out_dir: Path, run_dir: Path) -> None:
    """On each rank: all_gather_rows cases, one DDP step against a one-process step on the whole batch,
    and ``run_pretrain`` with the weights each rank ends with. Writes ``OUT_DIR/rank-R.pt``."""
    import torch.nn.functional as F

    import labelpipe.stages.pretrain as pretrain
    import labelpipe.training.setup as training_setup
    from labelpipe.config import resolve_config
    from labelpipe.models import build_model
    from labelpipe.runtime import all_gather_rows, setup

    rt = setup("cpu")
    r = rt.rank
    result: dict = {
        "gather": {
            "uneven": all_gather_rows(torch.full((3 * r + 1, 2, 3), float(r))),  # 1 and 4 rows
            "empty_on_rank0": all_gather_rows(torch.arange(5 * r, dtype=torch.int64)),  # 0 and 5 rows
            "bool": all_gather_rows(torch.tensor([True, False, True][: r + 1])),
            "all_empty": all_gather_rows(torch.zeros(0, 4)),
        }
    }

    # One SGD step through DDP, each rank on its half of a batch, in eval mode (BatchNorm uses its running
    # statistics, no dropout): averaged gradients give the step of one process on the whole batch.
    def batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(100 + rank)
        return torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 5, (2, 32, 32), generator=g)

    def sgd_step(net: torch.nn.Module, params, x: torch.Tensor, y: torch.Tensor) -> None:
        out = net(x, with_rep=False)  # as pretrain: the representation head is frozen and skipped
        loss = F.cross_entropy(out.main, y) + 0.4 * F.cross_entropy(out.aux, y)
        loss.backward()
        torch.optim.SGD(params, lr=0.5).step()

    torch.manual_seed(0)
    model = build_model(5, "resnet18", 16, (1, 2, 3), 16).eval()
    reference = build_model(5, "resnet18", 16, (1, 2, 3), 16).eval()
    reference.load_state_dict(model.state_dict())
    model.representation.requires_grad_(False)
    sgd_step(training_setup.wrap_ddp(model, rt, sync_bn=False), model.parameters(), *batch(r))
    (x0, y0), (x1, y1) = batch(0), batch(1)
    sgd_step(reference, reference.parameters(), torch.cat([x0, x1]), torch.cat([y0, y1]))
    result["ddp_step_error"] = max(
        float((a - b).abs().max()) for a, b in zip(model.parameters(), reference.parameters(), strict=True)
    )

    # run_pretrain, keeping the weights this rank ends with (rank 0 alone saves them).
    real_train = pretrain.train

    def keep_weights(job):
        metrics = real_train(job)
        result["state"] = {k: v.detach().clone() for k, v in job.model.module.state_dict().items()}
        return metrics

    pretrain.train = keep_weights
    config = resolve_config(None, TINY_RECIPE, {"device": "cpu"})
    result["val"] = pretrain.run_pretrain(config, run_dir, rt)
    torch.save(result, out_dir / f"rank-{r}.pt")


# -- the tests ----------------------------------------------------------------------------------------------


def test_rank_shares_partition_every_global_batch_across_epochs():
    from labelpipe.data.dataset import StepBatchSampler

    n, batch, world = 10, 6, 4  # 6 does not divide by 4, and batches straddle epochs (10 images)
    whole = list(StepBatchSampler(n, batch, seed=3, start=0, total=7))
    shares = [list(StepBatchSampler(n, batch, seed=3, start=0, total=7, rank=r, world=world)) for r in range(world)]
    for step, items in enumerate(whole):
        assert sorted(item for share in shares for item in share[step]) == sorted(items)
    later = list(StepBatchSampler(n, batch, seed=3, start=4, total=7, rank=1, world=world))
    assert later == shares[1][4:]  # a resumed rank takes up the same batches
    order = [index for items in whole for index, _ in items]
    first, second = order[:n], order[n : 2 * n]
    assert sorted(first) == sorted(second) == list(range(n))  # each epoch a permutation...
    assert first != second  # ...of its own seed


@pytest.mark.slow
def test_ddp_ranks_gather_uneven_rows_average_gradients_and_end_with_the_same_weights(data_cache, tmp_path):
    from safetensors.torch import load_file

    out_dir, run = tmp_path / "out", tmp_path / "run"
    out_dir.mkdir()
    log = torchrun([str(out_dir), str(run)], data_cache, module="tests.test_distributed")
    ranks = [torch.load(out_dir / f"rank-{r}.pt", weights_only=True) for r in range(2)]

    for res in ranks:  # every rank gets every rank's rows, in rank order
        g = res["gather"]
        assert torch.equal(g["uneven"], torch.cat([torch.zeros(1, 2, 3), torch.ones(4, 2, 3)]))
        assert torch.equal(g["empty_on_rank0"], torch.arange(5))
        assert g["bool"].dtype == torch.bool and g["bool"].tolist() == [True, True, False]
        assert g["all_empty"].shape == (0, 4)
        assert res["ddp_step_error"] < 1e-5, "DDP's step differs from one process's step on the whole batch"

    assert "sync_bn needs CUDA" in log  # the CPU fallback says so, once
    assert log.count("sync_bn needs CUDA") == 1
    assert ranks[0]["val"] == ranks[1]["val"]  # validation all-reduced: the same numbers on every rank
    saved = load_file(str(run / "pretrain" / "model.safetensors"))
    for name, value in saved.items():  # parameters and BatchNorm statistics alike
        assert torch.equal(ranks[0]["state"][name], value), name
        assert torch.equal(ranks[1]["state"][name], value), name
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_evaluate_on_two_ranks_gives_the_one_process_confusion_matrix(pretrained_run, data_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    metrics_path = run / "evaluate" / "pretrain" / "metrics.json"
    labelpipe(tiny("evaluate", run))
    single = json.loads(metrics_path.read_text())
    metrics_path.unlink()
    torchrun(tiny("evaluate", run), data_cache)
    double = json.loads(metrics_path.read_text())

    assert double["confusion"] == single["confusion"]
    assert double["pixels"] == single["pixels"] == np.sum(single["confusion"])
    assert double["per_class_iou"] == single["per_class_iou"]
    assert double["images"] == single["images"]
    assert double["reliability"]["bin_count"] == single["reliability"]["bin_count"]
    assert double["ece"] == pytest.approx(single["ece"], abs=1e-9)  # float sums in another order


@pytest.mark.slow
def test_pretrain_on_two_ranks_resumes_after_sigkill(data_cache, tmp_path):
    run = tmp_path / "run"
    args = tiny("pretrain", run, "--steps", "20", "--set", "train.val_every=1000")
    log_path, ckpt = run / "pretrain" / "log.jsonl", run / "pretrain" / "checkpoint.pt"

    def last_step() -> int:
        try:
            return max((json.loads(line)["step"] for line in log_path.read_text().splitlines()), default=0)
        except (OSError, json.JSONDecodeError):
            return 0

    proc = launch(args, data_cache, start_new_session=True)
    try:
        deadline = time.time() + 90
        while not (ckpt.is_file() and last_step() >= 5) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
    finally:
        kill_tree(proc.pid)
        out, _ = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"pretrain ended before the kill:\n{out[-3000:]}"
    killed_at = last_step()
    assert 5 <= killed_at < 20
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["status"] == "running"

    resumed = torchrun(args, data_cache)
    assert "resuming pretrain from step" in resumed
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["status"] == "done"
    steps = [json.loads(line)["step"] for line in log_path.read_text().splitlines() if "loss" in line]
    assert steps == list(range(1, 21))  # unique: the records past the checkpoint were dropped
    rngs = torch.load(ckpt, weights_only=True)["rng"]  # every rank's own stream (dropout), kept for resume
    assert isinstance(rngs, list) and len(rngs) == 2
    assert not torch.equal(rngs[0]["torch"], rngs[1]["torch"])


@pytest.mark.slow
def test_predict_on_two_ranks_joins_shards_into_the_one_process_store(pretrained_run, data_cache, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    small_parts = ["--set", "predict.batch_size=4", "--set", "predict.images_per_part=4"]
    labelpipe(tiny("predict", run, *small_parts))
    single = run / "predictions-1.h5"
    (run / "predict" / "predictions.h5").rename(single)
    torchrun(tiny("predict", run, "--force", *small_parts), data_cache)

    def contents(path: Path) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {}
        with h5py.File(path, "r") as fh:
            fh.visititems(lambda name, obj: arrays.update({name: obj[()]}) if isinstance(obj, h5py.Dataset) else None)
            attrs = dict(fh.attrs)
        return arrays, attrs

    (a, attrs_a), (b, attrs_b) = contents(single), contents(run / "predict" / "predictions.h5")
    assert sorted(a) == sorted(b) and len(a) > 10
    # Each rank batches other neighbours (every other image), yet eval-mode inference is per image here:
    # every array equals the one-process array to the last bit, not just at float16 tolerance.
    unequal = [name for name in a if not np.array_equal(a[name], b[name])]
    assert not unequal, f"{len(unequal)} arrays differ, e.g. {unequal[:3]}"
    assert attrs_a.keys() == attrs_b.keys()
    assert not (run / "predict" / "parts").exists()


if __name__ == "__main__":
    worker(*(Path(a) for a in sys.argv[1:] if a != "--"))


@pytest.mark.slow
def test_selftrain_on_two_ranks_with_every_loss(pretrained_run, data_cache, tmp_path):
    """A round under DDP with the contrastive (memory bank fed from both ranks), rectified and denoising
    terms, and one without the representation head (frozen): DDP runs without searching for unused
    parameters, so a head that took no part in the loss would stop it here."""
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    log = torchrun(
        # A queue smaller than one step's negatives: each rank subsamples its own, then the gathered
        # rows are subsampled again with the generator every rank shares.
        tiny(
            "selftrain",
            run,
            "--rounds",
            "1",
            "--contrastive",
            "--rectified",
            "--denoise",
            "--loss",
            "sce",
            "--set",
            "selftrain.memory_capacity=64",
        ),
        data_cache,
        timeout=240,
    )
    assert "find_unused_parameters" not in log
    records = [json.loads(line) for line in (run / "selftrain" / "round-1" / "train" / "log.jsonl").open()]
    assert any("loss_contrastive" in r for r in records), records[:2]
    assert (run / "selftrain" / "round-1" / "train" / "model.safetensors").is_file()
    torchrun(tiny("selftrain", run, "--rounds", "1", "--no-contrastive", "--force"), data_cache, timeout=240)
    assert (run / "selftrain" / "round-1" / "train" / "model.safetensors").is_file()


@pytest.mark.slow
def test_temperature_fit_on_two_ranks_equals_one_process(pretrained_run, data_cache, tmp_path):
    """--temperature auto: each rank infers half of the val images, the sampled pixels are gathered in image
    order, and both ranks fit the T of one process."""
    run = tmp_path / "run"
    shutil.copytree(pretrained_run, run)
    manifest = run / "predict" / "manifest.json"
    labelpipe(tiny("predict", run, "--temperature", "auto"))
    single = json.loads(manifest.read_text())["summary"]
    torchrun(tiny("predict", run, "--temperature", "auto", "--force"), data_cache)
    double = json.loads(manifest.read_text())["summary"]
    assert double["temperature"] == pytest.approx(single["temperature"], rel=1e-5)
    assert double["nll_before"] == pytest.approx(single["nll_before"], rel=1e-5)


@pytest.mark.slow
def test_select_on_two_ranks_trains_each_candidate_and_installs_the_chosen(data_cache, tmp_path):
    run = tmp_path / "run"
    # Chosen at step 3 of 6 (decide_at 0.5): the other candidate pauses there on both ranks.
    candidates = "select={decide_at: 0.5, candidates: {low: {train: {lr: 0.0001}}, high: {train: {lr: 0.01}}}}"
    out = torchrun(tiny("pretrain", run, "--steps", "6", "--set", candidates), data_cache)
    record = json.loads((run / "select" / "selection.json").read_text())
    assert set(record["scores"]) == {"low", "high"} and f"chosen: {record['chosen']}" in out
    other = ({"low", "high"} - {record["chosen"]}).pop()
    paused = json.loads((run / "select" / other / "pretrain" / "manifest.json").read_text())
    assert (paused["status"], paused["paused_at"], record["step"][other]) == ("paused", 3, 3)
    fingerprint = json.loads((run / "select" / record["chosen"] / "pretrain" / "manifest.json").read_text())[
        "fingerprint"
    ]
    installed = json.loads((run / "pretrain" / "manifest.json").read_text())
    assert (installed["status"], installed["fingerprint"]) == ("done", fingerprint)
