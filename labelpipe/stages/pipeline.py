"""``labelpipe run RECIPE``: the recipe's stages in order; each skips itself when up to date."""

from __future__ import annotations

from pathlib import Path

from labelpipe.config import RunConfig
from labelpipe.runtime import Runtime


def run_pipeline(config: RunConfig, run_dir: Path, runtime: Runtime) -> None:
    from labelpipe.stages import evaluate, pretrain

    before = None
    for stage in config.pipeline:
        if stage == "pretrain":
            pretrain.run_pretrain(config, run_dir, runtime)
        elif stage == "evaluate":
            if "selftrain" in config.pipeline and before is None:
                before = evaluate.run_evaluate(
                    config.model_copy(
                        update={"evaluate": config.evaluate.model_copy(update={"model": "pretrain"})}
                    ),
                    run_dir,
                    runtime,
                )
            after = evaluate.run_evaluate(config, run_dir, runtime)
            if before is not None and runtime.is_main:
                evaluate.print_comparison(before, after)
        elif stage == "predict":
            from labelpipe.stages.predict import run_predict

            run_predict(config, run_dir, runtime)
        elif stage == "pseudolabel":
            from labelpipe.stages.pseudolabel import run_pseudolabel

            run_pseudolabel(config, run_dir, runtime)
        elif stage == "selftrain":
            from labelpipe.stages.selftrain import run_selftrain

            run_selftrain(config, run_dir, runtime)
