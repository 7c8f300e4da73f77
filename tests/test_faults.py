"""The fault-injection suite (issue 12): every bad input or fault ends in one line and exit 2 (130 on
Ctrl-C), and a rejected command changes nothing on disk.

Each case runs a command in-process on a private copy of one tiny run (pretrained, predicted and
pseudo-labeled once per session; large files are hard-linked, which is safe because labelpipe
replaces them atomically and the corruptions below write new files). "Nothing changed" is the
run's listing and the sha256 of every file, before and after.

Disk full is injected into the writers with ``LABELPIPE_INJECT_ENOSPC`` (a file-name pattern whose
writes fail with ENOSPC); ``test_faults_real.py`` repeats the predict case on a real full tmpfs where
the platform allows mounting one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from labelpipe.cli import main
from labelpipe.store.atomic import INJECT_ENOSPC, sha256_file, temp_sibling
from tests.conftest import REPO, TINY_RECIPE

COMMANDS = ("pretrain", "predict", "pseudolabel", "selftrain", "evaluate")
WITH_FORCE = {"pretrain", "predict", "pseudolabel", "selftrain"}


# ----------------------------------------------------------------------------------------------- helpers


def cli(args: list[str], capsys) -> tuple[int, str, str]:
    """``labelpipe ARGS`` in-process: (exit status, stdout, stderr stripped)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main([str(a) for a in args])
        raise SystemExit(0)
    out, err = capsys.readouterr()
    return info.value.code, out, err.strip()


def assert_one_line(code: int, err: str, *needles: str, status: int = 2) -> None:
    assert code == status, (code, err)
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, (needle, err)


_HASHES: dict[tuple[int, int, int, int], str] = {}


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with the sha256 of each file (cached by inode, size and mtime)."""
    out = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_dir():
            out[rel + "/"] = "dir"
            continue
        st = path.stat()
        key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        if key not in _HASHES:
            _HASHES[key] = sha256_file(path)
        out[rel] = _HASHES[key]
    return out


def clone(src: Path, dst: Path) -> Path:
    """A private copy of a run: small files copied, files over 1 MiB hard-linked (labelpipe replaces
    those atomically, never in place)."""

    def copy(a: str, b: str) -> None:
        if os.path.getsize(a) > (1 << 20):
            try:
                os.link(a, b)
                return
            except OSError:
                pass
        shutil.copy2(a, b)

    shutil.copytree(src, dst, copy_function=copy)
    return dst


def replace_bytes(path: Path, data: bytes) -> None:
    """Give ``path`` new content as a new file (never in place: the old inode may be shared)."""
    path.unlink()
    path.write_bytes(data)


def truncate(path: Path) -> None:
    replace_bytes(path, path.read_bytes()[: path.stat().st_size // 2])


def flip_middle(path: Path) -> None:
    """Same size, other bytes: a swapped or bit-rotted file."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(255 - b for b in data[middle : middle + 64])
    replace_bytes(path, bytes(data))


def args_for(command: str, run: Path, *extra: str) -> list[str]:
    return [command, "--run", str(run), "--device", "cpu", *extra]


# ----------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def labeled_run(pretrained_run, tmp_path_factory) -> Path:
    """The session's tiny run after pretrain, predict and pseudolabel (dars)."""
    run = clone(pretrained_run, tmp_path_factory.mktemp("faults") / "labeled")
    for command in ("predict", "pseudolabel"):
        with pytest.raises(SystemExit) as info:
            main(args_for(command, run))
            raise SystemExit(0)
        assert info.value.code == 0
    return run


@pytest.fixture()
def run(labeled_run, tmp_path) -> Path:
    return clone(labeled_run, tmp_path / "run")


@pytest.fixture(autouse=True)
def _no_injection(monkeypatch):
    monkeypatch.delenv(INJECT_ENOSPC, raising=False)


# ------------------------------------------------------------------- A. bad options: rejected, nothing changed


def _bad_options(tmp: Path) -> dict[str, tuple[list[str], str]]:
    (tmp / "a-file").write_text("x")
    (tmp / "corrupt.yaml").write_text("train: {steps: [1\n")
    return {
        "set-malformed-yaml": (["--set", "train.lr=[1"], "not valid YAML"),
        "set-without-equals": (["--set", "train.lr"], "KEY.PATH=VALUE"),
        "set-empty-key": (["--set", "=3"], "empty key"),
        "set-unknown-key": (["--set", "train.nope=1"], "train.nope"),
        "set-wrong-type": (["--set", "train.lr=abc"], "train.lr"),
        "set-steps-zero": (["--set", "train.steps=0"], "train.steps"),
        "data-missing": (["--data", str(tmp / "nowhere")], "does not exist"),
        "data-is-a-file": (["--data", str(tmp / "a-file")], "is a file"),
        "protocol-unknown": (["--protocol", "nope"], "nope"),
        "device-unknown": (["--device", "tpu"], "tpu"),
        "seed-negative": (["--seed", "-1"], "seed"),
        "config-missing": (["--config", str(tmp / "missing.yaml")], "missing.yaml"),
        "config-corrupt-yaml": (["--config", str(tmp / "corrupt.yaml")], "invalid YAML"),
    }


BAD_OPTIONS = [
    "set-malformed-yaml",
    "set-without-equals",
    "set-empty-key",
    "set-unknown-key",
    "set-wrong-type",
    "set-steps-zero",
    "data-missing",
    "data-is-a-file",
    "protocol-unknown",
    "device-unknown",
    "seed-negative",
    "config-missing",
    "config-corrupt-yaml",
]


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", BAD_OPTIONS)
def test_bad_option_is_rejected_and_changes_nothing(run, tmp_path, capsys, command, fault):
    extra, needle = _bad_options(tmp_path)[fault]
    force = ["--force"] if command in WITH_FORCE else []  # --force must not act before the checks either
    before = snapshot(run)
    code, _, err = cli(args_for(command, run, *force, *extra), capsys)
    assert_one_line(code, err, needle)
    assert snapshot(run) == before


# ------------------------------------------------------ B. broken data with --force: validated before acting


def _first(data: Path, split: str) -> str:
    return (data / "splits" / f"{split}.txt").read_text().split()[0]


def _break(data: Path, fault: str) -> str:
    """Break the data copy; returns a text the error must contain."""
    if fault == "labeled-image-missing":
        path = data / "images" / f"{_first(data, 'source_train')}.png"
        path.unlink()
        return str(path)
    if fault == "unlabeled-image-missing":
        path = data / "images" / f"{_first(data, 'target_train')}.png"
        path.unlink()
        return str(path)
    if fault == "mask-value-42":
        path = data / "masks" / f"{_first(data, 'source_train')}.png"
        mask = np.array(Image.open(path))
        mask[0, :2] = [42, 42]
        Image.fromarray(mask).save(path)
        return "42"
    if fault == "absolute-id":
        split = data / "splits" / "target_train.txt"
        split.write_text("/etc/hostname\n" + split.read_text())
        return "outside the data root"
    if fault == "dotdot-id":
        split = data / "splits" / "source_train.txt"
        split.write_text("../../outside\n" + split.read_text())
        return "outside the data root"
    if fault == "labeled-split-empty":
        (data / "splits" / "source_train.txt").write_text("\n")
        return "empty"
    raise AssertionError(fault)


DATA_FAULTS = [
    ("labeled-image-missing", "pretrain"),
    ("labeled-image-missing", "selftrain"),
    ("unlabeled-image-missing", "predict"),
    ("unlabeled-image-missing", "selftrain"),
    ("mask-value-42", "pretrain"),
    ("mask-value-42", "selftrain"),
    ("labeled-split-empty", "pretrain"),
    ("labeled-split-empty", "selftrain"),
    *[("absolute-id", c) for c in COMMANDS],
    *[("dotdot-id", c) for c in COMMANDS],
]


@pytest.mark.parametrize(("fault", "command"), DATA_FAULTS)
@pytest.mark.slow
def test_broken_data_is_rejected_before_force_removes_anything(run, tiny_copy, capsys, fault, command):
    needle = _break(tiny_copy, fault)
    force = ["--force"] if command in WITH_FORCE else []
    before = snapshot(run)
    code, _, err = cli(args_for(command, run, "--data", str(tiny_copy), *force), capsys)
    assert_one_line(code, err, needle)
    assert snapshot(run) == before  # the finished stages, their outputs and config.yaml are all intact


@pytest.mark.parametrize("entry", ["/etc/hostname", "../outside", "images/../../outside"])
def test_data_check_rejects_ids_outside_the_root(tiny_copy, capsys, entry):
    split = tiny_copy / "splits" / "target_val.txt"
    split.write_text(entry + "\n" + split.read_text())
    code, _, err = cli(["data", "check", str(tiny_copy)], capsys)
    assert_one_line(code, err, str(split), "outside the data root")


# ---------------------------------------------- C. stale or corrupt artifacts: rebuilt, or one line naming the fix


@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "swapped"])
@pytest.mark.parametrize("command", ["predict", "evaluate", "selftrain", "export"])
@pytest.mark.slow
def test_damaged_model_is_named_with_the_command_that_rebuilds_it(run, capsys, damage, command):
    model = run / "pretrain" / "model.safetensors"
    damage(model)
    before = snapshot(run)
    args = ["export", str(run)] if command == "export" else args_for(command, run)
    code, _, err = cli(args, capsys)
    assert_one_line(code, err, str(model), "labelpipe pretrain --run")
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "swapped"])
@pytest.mark.slow
def test_pretrain_is_not_up_to_date_with_a_damaged_model(run, capsys, damage):
    model = run / "pretrain" / "model.safetensors"
    good = sha256_file(model)
    damage(model)
    code, out, _ = cli(args_for("pretrain", run), capsys)
    assert code == 0 and "up to date" not in out
    assert sha256_file(model) == good  # rebuilt from the final checkpoint: the same weights


@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "swapped"])
@pytest.mark.slow
def test_damaged_store_is_repredicted_not_up_to_date(run, capsys, damage):
    store = run / "predict" / "predictions.h5"
    damage(store)
    code, out, _ = cli(args_for("predict", run), capsys)
    assert code == 0 and "up to date" not in out
    manifest = json.loads((run / "predict" / "manifest.json").read_text())
    assert manifest["outputs"]["predictions.h5"] == sha256_file(store)


@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "swapped"])
def test_pseudolabel_refuses_a_damaged_store(run, capsys, damage):
    store = run / "predict" / "predictions.h5"
    damage(store)
    before = snapshot(run)
    code, _, err = cli(args_for("pseudolabel", run, "--force"), capsys)
    assert_one_line(code, err, str(store), "labelpipe predict --run")
    assert snapshot(run) == before


@pytest.mark.parametrize("damage", [truncate, flip_middle], ids=["truncated", "swapped"])
@pytest.mark.slow
def test_damaged_labels_are_relabeled_not_up_to_date(run, capsys, damage):
    labels = run / "pseudolabel" / "dars" / "labels.h5"
    damage(labels)
    code, out, _ = cli(args_for("pseudolabel", run), capsys)
    assert code == 0 and "up to date" not in out
    manifest = json.loads((run / "pseudolabel" / "dars" / "manifest.json").read_text())
    assert manifest["outputs"]["labels.h5"] == sha256_file(labels)


def _repretrain(run: Path) -> None:
    """A new pretrained model, recorded as its stage would (what `pretrain --force` leaves, in a second)."""
    from safetensors.torch import load_file, save_file

    from labelpipe.store.checkpoint import read_model_metadata
    from labelpipe.store.manifest import StageDir

    path = run / "pretrain" / "model.safetensors"
    meta, state = read_model_metadata(path), load_file(str(path))
    state = {k: (v + 0.01 if v.is_floating_point() else v).contiguous() for k, v in state.items()}
    path.unlink()
    save_file(state, str(path), metadata={"labelpipe": json.dumps(meta)})
    StageDir(path.parent).finish(["model.safetensors", "checkpoint.pt", "metrics.json", "log.jsonl"])


def test_pseudolabel_refuses_a_store_of_an_earlier_model(run, capsys):
    _repretrain(run)
    before = snapshot(run)
    code, _, err = cli(args_for("pseudolabel", run, "--force"), capsys)
    assert_one_line(code, err, "predictions.h5", "earlier pretrain model", "labelpipe predict --run")
    assert snapshot(run) == before


@pytest.mark.slow
def test_predict_redoes_a_store_of_an_earlier_model(run, capsys):
    _repretrain(run)
    code, out, _ = cli(args_for("predict", run), capsys)
    assert code == 0 and "up to date" not in out
    code, out, _ = cli(args_for("pseudolabel", run), capsys)
    assert code == 0 and "up to date" not in out  # the labels follow the new store


def test_pseudolabel_refuses_an_unfinished_prediction(run, capsys):
    manifest = run / "predict" / "manifest.json"
    data = json.loads(manifest.read_text())
    data["status"] = "running"
    manifest.write_text(json.dumps(data))
    before = snapshot(run)
    code, _, err = cli(args_for("pseudolabel", run, "--force"), capsys)
    assert_one_line(code, err, "predictions.h5", "has not finished", "labelpipe predict")
    assert snapshot(run) == before


def test_pseudolabel_names_a_store_that_is_not_hdf5(run, capsys):
    store = run / "predict" / "predictions.h5"
    (run / "predict" / "manifest.json").unlink()  # a store made elsewhere: read as it is
    replace_bytes(store, b"not an HDF5 file" * 100)
    before = snapshot(run)
    code, _, err = cli(args_for("pseudolabel", run, "--force"), capsys)
    assert_one_line(code, err, str(store), "predict")
    assert snapshot(run) == before


@pytest.mark.parametrize("command", ["predict", "evaluate", "export"])
def test_model_file_that_is_not_safetensors_is_named(run, capsys, command):
    model = run / "pretrain" / "model.safetensors"
    (run / "pretrain" / "manifest.json").unlink()  # no record to compare with: the reader must cope
    replace_bytes(model, b"\x00" * 100)
    args = ["export", str(run)] if command == "export" else args_for(command, run)
    code, _, err = cli(args, capsys)
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "model.safetensors" in err and "labelpipe pretrain" in err, err


@pytest.mark.parametrize("command", ["pretrain", "predict", "evaluate", "selftrain"])
def test_corrupt_run_config_is_named(run, capsys, command):
    config = run / "config.yaml"
    config.write_text("train: {steps: [1\n")
    before = snapshot(run)
    code, _, err = cli(args_for(command, run), capsys)
    assert_one_line(code, err, str(config), "invalid YAML", "delete it")
    assert snapshot(run) == before


def test_corrupt_checkpoint_is_named(run, capsys):
    stage = run / "pretrain"
    data = json.loads((stage / "manifest.json").read_text())
    data["status"] = "running"  # a run that stopped: the next command resumes from checkpoint.pt
    (stage / "manifest.json").write_text(json.dumps(data))
    (stage / "model.safetensors").unlink()
    replace_bytes(stage / "checkpoint.pt", b"PK\x03\x04 torn")
    code, _, err = cli(args_for("pretrain", run), capsys)
    assert_one_line(code, err, str(stage / "checkpoint.pt"), "--force")


class _Payload:
    """Unpickling this runs ``touch MARKER``: what an attacker's checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("stage", ["pretrain", "selftrain/round-1/train"])
@pytest.mark.slow
def test_planted_pickle_in_a_checkpoint_never_runs_on_resume(run, tmp_path, capsys, stage):
    import torch

    marker = tmp_path / "pwned"
    if stage == "pretrain":
        stage_dir = run / "pretrain"
        data = json.loads((stage_dir / "manifest.json").read_text())
        data["status"] = "running"  # a stopped run: the next pretrain resumes from its checkpoint
        (stage_dir / "manifest.json").write_text(json.dumps(data))
        (stage_dir / "model.safetensors").unlink()
        args = args_for("pretrain", run)
    else:
        stage_dir = run / stage
        stage_dir.mkdir(parents=True)
        args = args_for("selftrain", run, "--rounds", "1", "--steps", "2")
    (stage_dir / "checkpoint.pt").unlink(missing_ok=True)
    torch.save({"step": 1, "fingerprint": "x", "evil": _Payload(marker)}, stage_dir / "checkpoint.pt")
    code, _, err = cli(args, capsys)
    assert_one_line(code, err, str(stage_dir / "checkpoint.pt"), "--force")
    assert not marker.exists()


@pytest.mark.slow
def test_corrupt_manifest_means_not_up_to_date(run, capsys):
    (run / "pretrain" / "manifest.json").write_text('{"status": "do')
    code, out, _ = cli(args_for("pretrain", run), capsys)
    assert code == 0 and "up to date" not in out
    assert json.loads((run / "pretrain" / "manifest.json").read_text())["status"] == "done"


@pytest.mark.slow
def test_corrupt_class_prior_cache_is_rebuilt(run, capsys):
    cache = run / "class_prior.json"
    cache.write_text("{not json")
    code, out, _ = cli(args_for("pseudolabel", run, "--force"), capsys)
    assert code == 0 and "rebuilding it" in out
    assert isinstance(json.loads(cache.read_text()), dict)


def test_class_prior_is_not_reused_for_other_data_with_the_same_ids(run, tiny_copy, capsys):
    _break(tiny_copy, "mask-value-42")  # same ids, one mask changed: the cached prior must not hide it
    before = snapshot(run)
    code, _, err = cli(args_for("pseudolabel", run, "--data", str(tiny_copy), "--force"), capsys)
    assert_one_line(code, err, "42")
    assert snapshot(run) == before


def test_class_prior_key_depends_on_root_and_mask_bytes(labeled_run, tiny_root, tiny_copy):
    import torch

    from labelpipe.config import resolve_config
    from labelpipe.context import open_context, prior_cache_key
    from labelpipe.runtime import Runtime

    def key(root: Path) -> str:
        cfg = resolve_config(labeled_run, overrides={"data": {"root": str(root)}})
        return prior_cache_key(open_context(cfg, labeled_run, Runtime(device=torch.device("cpu"))), "source_train")

    same_bytes = key(tiny_copy)
    assert key(tiny_root) != same_bytes  # another root
    path = tiny_copy / "masks" / f"{_first(tiny_copy, 'source_train')}.png"
    mask = np.array(Image.open(path))
    mask[0, 0] = 1 if mask[0, 0] != 1 else 2
    Image.fromarray(mask).save(path)
    assert key(tiny_copy) != same_bytes  # an edited mask


def test_evaluate_never_picks_an_unfinished_round(run, capsys):
    from labelpipe.context import latest_model_name

    round_dir = run / "selftrain" / "round-1" / "train"
    round_dir.mkdir(parents=True)
    shutil.copy(run / "pretrain" / "model.safetensors", round_dir / "model.safetensors")
    (round_dir / "manifest.json").write_text(json.dumps({"status": "failed"}))
    assert latest_model_name(run) == "pretrain"


# ------------------------------------------------------------ D. the run directory: a file, read-only


@pytest.mark.parametrize("command", [*COMMANDS, "status", "export"])
@pytest.mark.parametrize("where", ["file", "under-a-file"])
def test_run_that_is_a_file_is_rejected(tmp_path, data_cache, capsys, command, where):
    target = tmp_path / "not-a-run"
    target.write_text("x")
    run = target if where == "file" else target / "sub"
    args = [command, str(run)] if command in ("status", "export") else args_for(command, run)
    code, _, err = cli(args, capsys)
    assert_one_line(code, err, str(target))
    assert target.read_text() == "x" and sorted(p.name for p in tmp_path.iterdir()) == ["not-a-run"]


def _make_read_only(path: Path):
    """Make ``path`` read-only for this process (chmod; a read-only bind mount when running as root).
    Returns an undo function, or None when the platform allows neither."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [path, *path.rglob("*")]}
        for p in modes:
            p.chmod(modes[p] & ~0o222)

        def undo():
            for p, mode in modes.items():
                p.chmod(mode)

        return undo
    ok = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True).returncode == 0
    if ok and subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True).returncode == 0:
        return lambda: subprocess.run(["umount", str(path)], check=True)
    if ok:
        subprocess.run(["umount", str(path)], check=False)
    return None


@pytest.fixture()
def read_only_run(run):
    undo = _make_read_only(run)
    if undo is None:
        pytest.skip("cannot make a directory read-only here (root without mount)")
    yield run
    undo()


@pytest.mark.parametrize("command", ["pretrain", "predict", "pseudolabel"])
def test_read_only_run_reports_up_to_date_stages(read_only_run, capsys, command):
    code, out, err = cli(args_for(command, read_only_run), capsys)
    assert code == 0 and "up to date" in out, err


@pytest.mark.parametrize(
    "args",
    [["pretrain", "--force"], ["predict", "--force"], ["pseudolabel", "--force"], ["evaluate"]],
    ids=["pretrain", "predict", "pseudolabel", "evaluate"],
)
def test_read_only_run_says_so_when_a_stage_must_write(read_only_run, capsys, args):
    before = snapshot(read_only_run)
    code, _, err = cli(args_for(args[0], read_only_run, *args[1:]), capsys)
    assert_one_line(code, err, "read-only")
    assert snapshot(read_only_run) == before


# ------------------------------------------------------------------------------- E. disk full (ENOSPC)


@pytest.mark.slow
def test_disk_full_in_predict_keeps_complete_parts_and_resumes(run, capsys, monkeypatch):
    from labelpipe.store.prediction_store import PredictionStore

    reference = run / "reference.h5"
    os.link(run / "predict" / "predictions.h5", reference)
    monkeypatch.setenv(INJECT_ENOSPC, "part-000-000002.h5")  # the third part fails, as on a full disk
    code, _, err = cli(args_for("predict", run, "--force", "--set", "predict.images_per_part=32"), capsys)
    assert_one_line(code, err, "disk full", "it needs about", "run the same command again")
    parts = sorted(p.name for p in (run / "predict" / "parts").iterdir())
    assert parts == ["part-000-000000.h5", "part-000-000001.h5"]  # complete parts kept, no temporaries
    monkeypatch.delenv(INJECT_ENOSPC)
    code, out, _ = cli(args_for("predict", run, "--set", "predict.images_per_part=32"), capsys)
    assert code == 0 and "resuming predict: 64 images" in out
    with PredictionStore(reference) as a, PredictionStore(run / "predict" / "predictions.h5") as b:
        assert a.ids == b.ids
        for image_id in a.ids:
            x, y = a[image_id], b[image_id]
            assert all(np.array_equal(x[c], y[c]) for c in x)


@pytest.mark.parametrize(
    ("command", "pattern", "needle"),
    [
        ("predict", "predictions.h5", "predictions.h5"),
        ("pseudolabel", "labels.h5", "labels.h5"),
        ("pseudolabel", "report.json", "report.json"),
        ("pretrain", "checkpoint.pt", "checkpoint.pt"),
        ("pretrain", "model.safetensors", "model.safetensors"),
        ("pretrain", "config.yaml", "config.yaml"),
        ("evaluate", "metrics.json", "metrics.json"),
        ("evaluate", "*.png", ".png"),
    ],
)
@pytest.mark.slow
def test_disk_full_is_one_line_and_keeps_what_was_done(run, capsys, monkeypatch, command, pattern, needle):
    monkeypatch.setenv(INJECT_ENOSPC, pattern)
    force = ["--force"] if command in WITH_FORCE else []
    short = ["--set", "train.steps=2"] if command == "pretrain" else []  # quicker, and the model is still written
    code, _, err = cli(args_for(command, run, *force, *short), capsys)
    assert_one_line(code, err, needle, "disk full")
    assert not list(run.rglob(".*.tmp-*"))  # no half-written file left behind
    if command == "pretrain" and pattern != "config.yaml":
        from labelpipe.store.manifest import StageDir

        assert StageDir(run / "pretrain").status() != "done"


# --------------------------------------------------------------------------------- F. NaN / inf loss


@pytest.mark.parametrize("lr", ["1e10", "inf"])
@pytest.mark.slow
def test_diverging_loss_stops_at_the_step_and_keeps_the_last_good_checkpoint(run, capsys, lr):
    import torch

    code, _, err = cli(
        args_for("pretrain", run, "--force", "--set", f"train.lr={lr}", "--set", "train.steps=40"), capsys
    )
    assert_one_line(code, err, "at step", "lower the learning rate", "train.lr=")
    assert "NaN" in err or "nan" in err or "inf" in err
    ckpt = run / "pretrain" / "checkpoint.pt"
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)
        assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
        assert f"step {state['step']})" in err
    assert not (run / "pretrain" / "model.safetensors").exists()


# ------------------------------------------------------------------------------------- G. --steps < 1


@pytest.mark.parametrize("command", ["pretrain", "selftrain"])
@pytest.mark.parametrize("steps", ["0", "-3"])
def test_steps_below_one_are_rejected(run, capsys, command, steps):
    before = snapshot(run)
    code, _, err = cli(args_for(command, run, "--force", "--steps", steps), capsys)
    assert_one_line(code, err, "steps")
    assert snapshot(run) == before


@pytest.mark.parametrize("key", ["train.steps", "selftrain.steps"])
def test_steps_below_one_are_rejected_in_set(run, capsys, key):
    code, _, err = cli(args_for("selftrain", run, "--set", f"{key}=0"), capsys)
    assert_one_line(code, err, key)


OUT_OF_RANGE = [
    ("train.log_every=0", "pretrain"),
    ("train.checkpoint_every=0", "pretrain"),
    ("train.val_every=0", "selftrain"),
    ("train.batch_size=0", "pretrain"),
    ("train.crop_size=4", "pretrain"),
    ("train.lr=-1", "selftrain"),
    ("predict.batch_size=0", "predict"),
    ("predict.images_per_part=0", "predict"),
    ("evaluate.batch_size=0", "evaluate"),
    ("selftrain.rounds=0", "selftrain"),
    ("pseudolabel.alpha=0", "pseudolabel"),
    ("pseudolabel.tau=2", "pseudolabel"),
]


@pytest.mark.parametrize(("setting", "command"), OUT_OF_RANGE)
def test_out_of_range_settings_are_rejected(run, capsys, setting, command):
    before = snapshot(run)
    code, _, err = cli(args_for(command, run, "--set", setting), capsys)
    assert_one_line(code, err, setting.split("=")[0])
    assert snapshot(run) == before


# -------------------------------------------------------------------------- H. locks and interrupted stages


HOLD = """
import sys, time
from pathlib import Path
from labelpipe.store.lock import run_lock
with run_lock(Path(sys.argv[1]), sys.argv[2]):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_lock(run: Path, stage: str) -> subprocess.Popen:
    """Another process holding the lock of ``stage`` in ``run`` (until killed)."""
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run), stage],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


LOCK_NAMES = {"pretrain": "pretrain", "predict": "predict", "pseudolabel": "pseudolabel/dars"}


@pytest.mark.parametrize("command", COMMANDS)
def test_second_process_on_a_stage_gets_in_use(run, capsys, command):
    proc = hold_lock(run, LOCK_NAMES.get(command, command))
    try:
        force = ["--force"] if command in WITH_FORCE else []
        before = snapshot(run)
        code, _, err = cli(args_for(command, run, *force), capsys)
        assert_one_line(code, err, f"run {run} is in use by PID {proc.pid} on ")
        assert snapshot(run) == before
    finally:
        proc.kill()
        proc.wait()


def test_lock_of_a_dead_process_is_taken_over(run, capsys):
    from labelpipe.store.lock import lock_path

    proc = hold_lock(run, "pretrain")
    proc.kill()  # SIGKILL: its lock file stays, naming a dead process
    proc.wait()
    assert lock_path(run, "pretrain").is_file()
    code, out, _ = cli(args_for("pretrain", run), capsys)
    assert code == 0 and "up to date" in out
    assert not lock_path(run, "pretrain").exists()


@pytest.mark.slow
def test_killed_stage_shows_interrupted_and_its_temporaries_are_swept(run, capsys):
    from labelpipe.store.run_summary import collect

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    manifest = run / "predict" / "manifest.json"
    data = json.loads(manifest.read_text())
    data.update(status="running", pid=proc.pid)
    manifest.write_text(json.dumps(data))
    live_name = temp_sibling(run / "config.yaml").name
    stale = run / f"{live_name.rsplit('-', 1)[0]}-{proc.pid}"  # what a killed writer of config.yaml left
    stale.write_text("half")
    rows = {r["stage"]: r for r in collect(run)}
    assert rows["predict"]["status"] == "interrupted"
    assert rows["pretrain"]["status"] == "done"
    code, _, _ = cli(args_for("predict", run), capsys)
    assert code == 0
    assert not stale.exists()
    assert {r["stage"]: r for r in collect(run)}["predict"]["status"] == "done"


def test_status_of_a_live_stage_stays_running(run):
    from labelpipe.store.run_summary import collect

    manifest = run / "predict" / "manifest.json"
    data = json.loads(manifest.read_text())
    data.update(status="running", pid=os.getpid())
    manifest.write_text(json.dumps(data))
    assert {r["stage"]: r for r in collect(run)}["predict"]["status"] == "running"


# ------------------------------------------------------------------------------------ I. Ctrl-C (SIGINT)


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_says_where_and_exits_130(pretrained_run, tmp_path):
    import signal
    import time

    run = tmp_path / "run"
    args = [
        sys.executable,
        "-m",
        "labelpipe",
        "pretrain",
        "--config",
        str(TINY_RECIPE),
        "--run",
        str(run),
        "--device",
        "cpu",
        "--set",
        "train.steps=400",
        "--set",
        "train.checkpoint_every=1000",
        "--set",
        "train.val_every=1000",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "pretrain" / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "interrupted at step" in lines[0] and "checkpoint.pt" in lines[0], err
    import torch

    step = torch.load(run / "pretrain" / "checkpoint.pt", weights_only=True)["step"]
    assert f"interrupted at step {step} " in lines[0]
    assert 3 <= step < 400
