"""``labelpipe run RECIPE``: the recipe's stages in order; each skips itself when up to date.

It sits above ``labelpipe.stages`` (as the CLI does), the one module besides ``labelpipe.cli`` that
calls the verbs: no stage imports another.

``evaluate`` evaluates the model the stages before it produced (``pretrain``'s, then the last round of
``selftrain``), not whatever is newest on disk: a run that already holds rounds of other settings still
compares its baseline with its new rounds (``evaluate.model``, when set, wins; an ``evaluate`` before any
training stage takes the run's latest model). When a later ``evaluate`` sees a different model (e.g.
``[pretrain, evaluate, selftrain, evaluate]``), it also prints a before/after table against the first one.
At the end ``RUN/report.html`` is written (``labelpipe report``). With ``select`` in the recipe, ``pretrain``
trains one model per candidate and the stages after it run the one the validation split chose.
"""

from __future__ import annotations

from pathlib import Path

from labelpipe.config import RunConfig
from labelpipe.runtime import Runtime


def run_pipeline(config: RunConfig, run_dir: Path, runtime: Runtime) -> None:
    from labelpipe.stages.evaluate import print_comparison, run_evaluate
    from labelpipe.stages.predict import run_predict
    from labelpipe.stages.pretrain import run_pretrain
    from labelpipe.stages.pseudolabel import run_pseudolabel
    from labelpipe.stages.selftrain import run_selftrain

    first = produced = None
    for stage in config.pipeline:
        if stage == "pretrain":
            run_pretrain(config, run_dir, runtime)
            config = config.chosen(run_dir)  # after ``select``: the later stages run the chosen candidate
            produced = "pretrain"
        elif stage == "predict":
            run_predict(config, run_dir, runtime)
        elif stage == "pseudolabel":
            run_pseudolabel(config, run_dir, runtime)
        elif stage == "selftrain":
            run_selftrain(config, run_dir, runtime)
            produced = f"round-{config.selftrain.rounds}"
        elif stage == "evaluate":
            metrics = run_evaluate(config, run_dir, runtime, default_model=produced)
            if first is None:
                first = metrics
            elif first["model"] != metrics["model"] and runtime.is_main:
                print_comparison(first, metrics)
    if runtime.is_main:
        from labelpipe.stages.report import write_report

        print(f"report: {write_report(run_dir)}")
