"""How much each loss term of a self-training round moves the shared trunk, and how much the choice of
U2PL's negatives changes the contrastive term's push (issue 14: "unreliable vs reliable-only negatives").

It runs the first ``--steps`` steps of a round exactly as ``labelpipe selftrain`` builds it (the run's
pretrained weights, the recipe's step, teacher, CutMix, optimizer and schedule) and, every step, takes the
gradient of each term separately with respect to the parameters every term reaches (backbone, laterals,
fuse: the trunk the predictions are read from). Beside the round's own contrastive term (unreliable
negatives) a probe term runs on the same step tensors with reliable-only negatives: its own memory bank
(filled the same way from the same batches), the same prototypes (read, not folded), its own random draws;
it is weighted 0 in the loss, so the round trains as the recipe does.

Per window of steps the table prints, averaged: each term's loss and the norm of its trunk gradient
(``grad X``), both as the round's loss weighs the term (lambda_c included: divide by it for L_c), its cosine
with the supervised CE's, the contrastive term's share of the trunk gradient (``|g_contrastive| / |g_total|``),
and the two negatives' contrastive gradients against each other: their cosine and ``unrel-rel share`` =
``|g_unreliable - g_reliable| / |g_total|``, the part of the trunk's whole gradient that the choice of
negatives changes.

    OMP_NUM_THREADS=2 python benchmarks/term_gradients.py --run R --config stages/digitscapes_source_only.yaml \\
        --set selftrain.contrastive=true selftrain.contrastive_anchors=64 selftrain.memory_capacity=5000 \\
        --steps 200

``R`` holds a pretrain (``labelpipe pretrain --run R --config ...``); nothing under it is written.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

from labelpipe.config import resolve_config
from labelpipe.context import model_path, open_context
from labelpipe.runtime import Runtime
from labelpipe.stages.selftrain import round_model, round_train_config
from labelpipe.training.loop import build_optimizer, poly_schedule
from labelpipe.training.selftrain_data import round_batches
from labelpipe.training.terms import Contrastive

TRUNK = ("backbone.", "laterals.", "fuse.")


class Recorded:
    """A term whose value each step is kept (``records[name]``); ``weight`` scales what enters the loss."""

    def __init__(self, term, name: str, records: dict, weight: float = 1.0) -> None:
        self.term, self.name, self.records, self.weight = term, name, records, weight

    def __call__(self, t):
        value, logs = self.term(t)
        self.records[self.name] = value
        return value * self.weight, logs

    def __getattr__(self, attr):
        return getattr(self.term, attr)


class ReliableNegativesProbe(Contrastive):
    """The round's contrastive term with reliable-only negatives, beside it: its own queue, the prototypes
    the round's term folds (read only), its own generator."""

    def __init__(self, setup, seed: int) -> None:
        super().__init__(setup)  # its own memory bank
        self.generator = torch.Generator(device="cpu").manual_seed(seed)

    def __call__(self, t):
        value, _ = self.loss(
            t, generator=self.generator, shared_generator=None, update_prototypes=False, negative_source="reliable"
        )
        return self.setup.st.lambda_contrastive * value, {}


def flat(grads, params) -> torch.Tensor:
    pairs = zip(grads, params, strict=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in pairs])


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    denom = float(a.norm() * b.norm())
    return float(a @ b) / denom if denom > 0 else math.nan


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", type=Path, required=True)
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--set", nargs="*", default=[], dest="sets")
    parser.add_argument("--steps", type=int, default=200, help="steps to run (of the round's schedule)")
    parser.add_argument("--window", type=int, default=25, help="steps averaged per table row")
    args = parser.parse_args(argv)

    config = resolve_config(args.run, args.config, None, args.sets)
    if not config.selftrain.contrastive:
        sys.exit("term_gradients.py: the round has no contrastive term; pass --set selftrain.contrastive=true")
    rt = Runtime(device=torch.device("cpu"), rank=0, world=1)
    ctx = open_context(config, args.run, rt)
    config = ctx.config
    cfg, st = round_train_config(config), config.selftrain
    total = st.steps or cfg.steps
    model, net, step = round_model(ctx, 1, model_path(args.run, "pretrain"))
    records: dict[str, torch.Tensor] = {}
    names = [term.name or type(term).__name__ for term in step.terms]
    step.terms = [Recorded(term, name, records) for term, name in zip(step.terms, names, strict=True)]
    probe_setup = step.terms[names.index("contrastive")].setup
    step.terms.append(Recorded(ReliableNegativesProbe(probe_setup, config.seed + 1000), "reliable", records, 0.0))
    trunk = [p for n, p in model.named_parameters() if n.startswith(TRUNK) and p.requires_grad]
    optimizer = build_optimizer(net, cfg)
    scheduler = poly_schedule(optimizer, cfg.schedule_steps or total, cfg.poly_power, cfg.warmup_steps)
    batches = round_batches(ctx, 1, None, cfg, total, weak_view=st.strong_aug)(0)

    rows, window = [], []
    print(f"terms: {names} + reliable-negatives probe (weight 0); trunk params {sum(p.numel() for p in trunk):,}")
    for i in range(args.steps):
        loss, _ = step(next(batches), i)
        grads = {
            name: flat(torch.autograd.grad(value, trunk, retain_graph=True, allow_unused=True), trunk)
            for name, value in records.items()
            if value.requires_grad
        }
        total_grad = sum(grads[n] for n in names if n in grads)
        g_u, g_r = grads.get("contrastive"), grads.get("reliable")
        window.append(
            {
                **{f"loss {n}": float(v.detach()) for n, v in records.items()},
                **{f"grad {n}": float(g.norm()) for n, g in grads.items()},
                **{f"cos({n}, sup)": cosine(g, grads["supervised"]) for n, g in grads.items() if n != "supervised"},
                "cos(unrel, rel)": cosine(g_u, g_r) if g_u is not None and g_r is not None else math.nan,
                "unrel-rel share": float((g_u - g_r).norm() / total_grad.norm())
                if g_u is not None and g_r is not None
                else math.nan,
                "contrastive share": float(g_u.norm() / total_grad.norm()) if g_u is not None else math.nan,
            }
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if step.teacher is not None:
            step.teacher.update(net, i)
        records.clear()
        if len(window) == args.window or i == args.steps - 1:
            keys = list(window[0])
            rows.append((i + 1, {k: sum(r.get(k, math.nan) for r in window) / len(window) for k in keys}))
            window = []
            print(f"  step {i + 1}: " + ", ".join(f"{k} {v:.3g}" for k, v in rows[-1][1].items()), flush=True)

    keys = list(rows[0][1])
    print()
    print("| steps | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for end, row in rows:
        print(f"| {end - args.window + 1}-{end} | " + " | ".join(f"{row[k]:.3g}" for k in keys) + " |")


if __name__ == "__main__":
    main()
