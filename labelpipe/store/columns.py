"""The per-pixel columns of ALGORITHMS.md section 1 from a network's output, in torch.

One definition, used by ``labelpipe predict`` (logits of the main and auxiliary heads) and by the public
:class:`labelpipe.store.writer.PredictionWriter` (logits or probabilities of any network). Every column is
a function of one pixel's C values, so a map may be processed in bands of rows with identical results.
"""

from __future__ import annotations

import numpy as np
import torch


def pixel_columns(
    main: torch.Tensor, aux: torch.Tensor | None, temperature: float, topk: int = 0
) -> dict[str, torch.Tensor]:
    """(C, H, W) main / aux logits -> the per-pixel columns as (H, W) tensors (``topk_*``: (k, H, W)).

    With ``p = softmax(main / T)``: label = argmax p, conf = max p, entropy = -sum p log p, and, when
    ``aux`` is given, variance = KL(p || p_aux).
    """
    logp = torch.log_softmax(main.float() / temperature, 0)
    p = logp.exp()
    conf, label = p.max(0)
    out = {
        "label": label,
        "conf": conf,
        "entropy": (-(p * logp).sum(0)).clamp_min(0),  # not -(...).clamp_min(0): that is -0 everywhere
    }
    if aux is not None:
        logp_aux = torch.log_softmax(aux.float() / temperature, 0)
        out["variance"] = (p * (logp - logp_aux)).sum(0).clamp_min(0)
    if topk:
        prob, cls = p.topk(topk, dim=0)
        out["topk_prob"], out["topk_class"] = prob, cls
    return out


def columns_to_numpy(columns: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The columns in the store's dtypes: class ids uint8 (int32 above 255 classes), the rest float16."""
    out = {}
    for name, t in columns.items():
        if name in ("label", "topk_class"):
            out[name] = t.to(torch.uint8 if int(t.max()) < 256 else torch.int32).cpu().numpy()
        else:
            out[name] = t.to(torch.float16).cpu().numpy()
    return out
