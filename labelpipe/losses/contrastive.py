"""U2PL / U2PL+ pixel contrastive loss with per-class negative queues (U2PL+ Eq. 10, 15-28, Algorithm 1).

All pixel tensors are flattened: features (P, D), teacher probabilities (P, C), labels (P,) long,
flags (P,) bool. The caller resizes labels to the feature resolution and flattens labeled and
unlabeled images into one pixel axis, with ``is_labeled`` telling them apart. ``labels`` holds the
ground truth on labeled pixels and the (denoised) pseudo-label on unlabeled pixels; ``reliable``
(the entropy split, Eq. 12) only matters on unlabeled pixels.

- anchors of class c (student features, with gradient; Eq. 21-23): labeled pixels with ``y = c`` and
  teacher ``p_c > 0.3``; unlabeled reliable pixels with pseudo-label c and ``p_c > 0.3``.
- positive key (Eq. 24): the class prototype, the momentum mean of teacher features (Eq. 15-18).
- negative keys of class c (teacher features, no gradient; Eq. 25-28), with ``rank`` the position of c
  in the pixel's classes sorted by descending probability (0 = most probable):
  labeled pixels with ``y != c`` (and not ignored) and ``rank < r_l``;
  unlabeled *unreliable* pixels with ``r_l <= rank < min(r_h, C)``, whatever their pseudo-label.
  They are pushed into class c's own FIFO queue, from which N keys per anchor are drawn.
- ``loss_c = CE([<a, z+>, <a, z-_1..N>] / tau, target 0)`` with cosine similarities, averaged over
  anchors and classes (Eq. 10).

Authors' forms, as options (paper form the default): ``anchor_source="low_entropy"`` takes the unlabeled
anchors from the pixels in the lowest ``alpha_t`` entropy percentile of the batch (``train_semi.py``'s
``low_entropy_mask``) instead of the reliable ones; ``average="all_valid"`` divides the sum of the
per-class losses by the number of *valid* classes (any anchor-pool pixel of the class, before the
``p_c`` threshold), counting classes skipped for lack of anchors, keys or prototype.

Unlike the authors' code: one-hot labels cover every image of the batch; the labeled-negative rule
only asks ``y != c``; the unlabeled-negative rule does not ask for pseudo-label c; and the negatives of
class c always come from class c's own queue (a class without a queue or prototype is skipped).
"""

from __future__ import annotations

import ctypes
import math
import sys
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch._subclasses.fake_tensor import is_fake


def _rand(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device, dtype=None) -> Tensor:
    """Uniform [0, 1) draws from ``generator`` (on its own device), moved to ``device``."""
    draw_device = generator.device if generator is not None else device
    dtype = dtype or torch.float32
    return torch.rand(shape, generator=generator, device=draw_device, dtype=dtype).to(device)


def _info_nce_from_similarities(positive_sim: Tensor, negative_sim: Tensor, temperature: float) -> Tensor:
    """(..., M) InfoNCE from similarities: positive_sim (..., M, 1), negative_sim (..., M, N)."""
    logits = torch.cat([positive_sim, negative_sim], dim=-1) / temperature
    return torch.logsumexp(logits, dim=-1) - logits[..., 0]


def _info_nce_per_anchor(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """(..., M) InfoNCE of unit vectors.

    anchors (..., M, D), positive broadcastable to anchors, negatives (..., M, N, D).
    """
    positive_sim = (anchors * positive).sum(dim=-1, keepdim=True)
    negative_sim = torch.matmul(negatives, anchors.unsqueeze(-1)).squeeze(-1)
    return _info_nce_from_similarities(positive_sim, negative_sim, temperature)


HUGE_PAGE_BYTES = 2 << 20
MADV_HUGEPAGE = 14  # Linux <sys/mman.h>


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros(shape)``; on Linux CPUs, for buffers of a huge page or more, backed by transparent huge
    pages (2 MB, ``madvise(MADV_HUGEPAGE)`` before the first touch).

    The memory bank is read by random rows: with 4 kB pages nearly every key gathered misses the TLB
    (584 MB of queues span 150,000 pages), and the gather runs ~2x slower. Where the kernel allows THP
    only on request (``/sys/kernel/mm/transparent_hugepage/enabled`` = ``madvise``, a common default)
    this is the request; elsewhere (CUDA, other systems, a refused call) it is plain ``torch.zeros``.
    """
    numel, itemsize = math.prod(shape), torch.empty((), dtype=dtype).element_size()
    nbytes = numel * itemsize
    if device.type != "cpu" or nbytes < HUGE_PAGE_BYTES or not sys.platform.startswith("linux"):
        return torch.zeros(shape, dtype=dtype, device=device)
    raw = torch.empty(numel + HUGE_PAGE_BYTES // itemsize, dtype=dtype)  # room to align to a huge page
    if is_fake(raw):  # traced without memory (the GPU memory estimate): no address to advise
        return torch.zeros(shape, dtype=dtype, device=device)
    offset = (-raw.data_ptr()) % HUGE_PAGE_BYTES // itemsize
    buffer = raw[offset : offset + numel]
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise(ctypes.c_void_p(buffer.data_ptr()), ctypes.c_size_t(nbytes), MADV_HUGEPAGE)
    except (OSError, AttributeError):  # no libc symbol: plain pages
        pass
    return buffer.zero_().view(shape)


KEY_BLOCK_BYTES = 4 << 20  # keys gathered at a time by _GatheredInfoNCE: in cache while they are used twice


NORMALIZE_EPS = 1e-12  # F.normalize's


class _GatheredInfoNCE(torch.autograd.Function):
    """The mean InfoNCE over K x M anchors ``F.normalize(anchor_rows)`` whose N negatives are rows ``index``
    of ``table``, and its gradient with respect to ``anchor_rows``, from one gather of the keys.

    Forward works through the anchors a block at a time: it gathers the block's keys into a reused
    buffer (4 MB, in cache), takes the similarities, the per-anchor log-normaliser and, since the loss
    of an anchor depends on its own similarities only, the keys' part of that anchor's gradient
    ``sum_j softmax_j z_j`` while the keys are still in cache; the positive's part
    ``(softmax_0 - 1) z_+`` and the scale ``1 / (tau K M)`` are added for all anchors at once after, and
    so is the normalisation's Jacobian ``(g - a <a, g>) / |x|`` (``g / eps`` where ``|x| <= eps``, as
    F.normalize's clamp): a few passes over the (K M, D) gradient instead of autograd's graph of
    F.normalize (~8 ops and their temporaries). Backward only scales it. The numbers of gathering the
    (K, M, N, D) keys and letting autograd differentiate (up to float rounding), at the cost of one
    gather of the 249 MB of keys (U2PL+ scale: 19 x 256 x 50 x 256) instead of two: the gather is what
    the loss spends its time on.

    Blocks of 4 MB (81 anchors at N = 50, D = 256): on the 2-core test machine (1 thread) 16 MB blocks
    took ~1.5x longer, their keys no longer staying in cache between the gather and the two products,
    and 1 MB blocks pay torch's per-op overhead 4 times as often (the loop runs 8 ops a block).

    anchor_rows (K, M, D) float32, any norm (the anchors are their unit vectors, F.normalize's numbers);
    positive (K, 1, D) or (K, M, D) unit vectors, no gradient; table (R, D) float32 (the memory bank's
    buffer; saved, so a push before the backward raises autograd's in-place error instead of giving
    wrong gradients); index (K, M, N) long.
    """

    @staticmethod
    def forward(ctx, anchor_rows: Tensor, positive: Tensor, table: Tensor, index: Tensor, temperature: float) -> Tensor:
        k, m, n = index.shape
        d = table.shape[1]
        rows = k * m
        norms = torch.linalg.vector_norm(anchor_rows, dim=-1, keepdim=True)
        denominators = norms.clamp_min(NORMALIZE_EPS)
        anchors = anchor_rows / denominators  # F.normalize(anchor_rows, dim=-1), the same numbers
        flat_anchors = anchors.view(rows, d)
        flat_index = index.reshape(-1)
        # logits[:, 0] the positive's, logits[:, 1:] the negatives' (written block by block below).
        logits = anchors.new_empty(rows, 1 + n)
        if positive.shape[1] == 1:  # one positive a class: K (1, D) x (D, M) products, no (K, M, D) temporary
            positive_sims = torch.bmm(positive, anchors.transpose(1, 2))
        else:
            positive_sims = (anchors * positive).sum(-1)
        torch.div(positive_sims.view(rows), temperature, out=logits[:, 0])
        # Per anchor the log-normaliser is maxes + log(sums) (torch.logsumexp's formula, which would run
        # ~9 ops a block): maxes the largest logit, sums that of exp(logit - maxes).
        maxes, sums = anchors.new_empty(rows, 1), anchors.new_empty(rows)
        grad = anchors.new_empty(rows, d)
        block = min(rows, max(1, KEY_BLOCK_BYTES // max(1, n * d * table.element_size())))
        keys_buffer = anchors.new_empty(block * n, d)
        sims_buffer = anchors.new_empty(block, 1, n)
        exp_buffer = anchors.new_empty(block, 1, 1 + n)
        # Every block's slices made up front by torch.split, and the buffers' views made once for a full
        # block: at U2PL+ scale (61 blocks) slicing them in the loop cost ~2 ms a call.
        blocks = zip(
            flat_index.split(block * n),
            flat_anchors[:, None].split(block),
            logits.split(block),
            logits[:, 1:].split(block),
            maxes.split(block),
            sums.split(block),
            grad[:, None].split(block),
            strict=True,
        )
        full_block = _block_views(keys_buffer, sims_buffer, exp_buffer, block)
        for block_index, block_anchors, block_logits, negative_logits, block_maxes, block_sums, block_grad in blocks:
            size = block_anchors.shape[0]
            views = full_block if size == block else _block_views(keys_buffer, sims_buffer, exp_buffer, size)
            keys, flat_keys, sims, flat_sims, exps, negative_exps = views
            torch.index_select(table, 0, block_index, out=flat_keys)
            # Per anchor a row vector times the keys' transpose, (1, D) x (D, N): on CPU ~1.5x faster than
            # mul + sum, and ~8x faster than the (N, D) x (D, 1) product. Operands contiguous (or one
            # transposed view): bmm's fast path.
            torch.bmm(block_anchors, keys.transpose(1, 2), out=sims)
            torch.div(flat_sims, temperature, out=negative_logits)
            torch.amax(block_logits, dim=1, keepdim=True, out=block_maxes)
            torch.sub(block_logits, block_maxes, out=exps).exp_()
            torch.sum(exps, dim=1, out=block_sums)
            # sum_j exp(logit_j - max) z_j over the negatives, (1, N) x (N, D) per anchor, straight into
            # grad; divided by the row's sum after the loop (softmax weights), with the positive's term.
            torch.bmm(negative_exps, keys, out=block_grad)
        log_norm = sums.log().add_(maxes.view(rows))
        positive_weight = torch.exp(logits[:, 0] - log_norm)  # softmax_0, the positive's
        # d loss / d a = (grad / sums + (softmax_0 - 1) z_+) / (tau K M), and through the normalisation
        # (g - a <a, g>) / |x|: the per-row factors in one pass, then the radial part removed (the
        # clamp at eps passes none).
        row_factor = denominators.view(rows, 1).reciprocal().mul_(1.0 / (temperature * rows))
        grad.mul_(row_factor / sums[:, None])
        positive_factor = (positive_weight[:, None] - 1.0).mul_(row_factor)
        grad.view(k, m, d).addcmul_(positive_factor.view(k, m, 1), positive)
        radial = (grad * flat_anchors).sum(dim=1, keepdim=True).mul_(norms.view(rows, 1) > NORMALIZE_EPS)
        grad.addcmul_(flat_anchors, radial, value=-1.0)
        ctx.save_for_backward(grad, table)
        ctx.anchors_shape = anchors.shape
        return (log_norm - logits[:, 0]).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None, None, None, None]:
        grad, _table = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        return (grad * grad_out).view(ctx.anchors_shape), None, None, None, None


def _block_views(
    keys_buffer: Tensor, sims_buffer: Tensor, exp_buffer: Tensor, size: int
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The first ``size`` anchors' views of _GatheredInfoNCE's buffers: keys (size, N, D) and the same
    (size N, D), similarities (size, 1, N) and (size, N), exp(logit - max) (size, 1 + N) and its
    negatives' part (size, 1, N)."""
    n = sims_buffer.shape[2]
    flat_keys = keys_buffer[: size * n]
    sims = sims_buffer[:size]
    exps = exp_buffer[:size]
    return flat_keys.view(size, n, -1), flat_keys, sims, sims.view(size, n), exps.view(size, 1 + n), exps[:, :, 1:]


def contrastive_loss(anchors: Tensor, positive: Tensor, negatives: Tensor, temperature: float = 0.5) -> Tensor:
    """Scalar InfoNCE (U2PL+ Eq. 10) with cosine similarities, the positive at index 0, mean over anchors.

    anchors (M, D), positive (D,) or (M, D), negatives (M, N, D). Every input is L2-normalised here;
    gradient flows into whichever inputs require it (callers detach the keys). 0 when M = 0.
    """
    if anchors.shape[0] == 0:
        return anchors.sum() * 0.0
    a = F.normalize(anchors.float(), dim=-1)
    pos = F.normalize(positive.float(), dim=-1)
    neg = F.normalize(negatives.float(), dim=-1)
    return _info_nce_per_anchor(a, pos, neg, temperature).mean()


class MemoryBank:
    """Per-class FIFO queues of features in one preallocated ring buffer.

    ``feats`` (C, capacity, D), ``ptr`` (C,) next write slot, ``count`` (C,) filled slots; all on
    ``device``. Slots ``[0, count)`` are always the filled ones, and slots never written are zeros.
    Memory: C * capacity * D * 4 bytes in float32 (19 x 30,000 x 256 = 584 MB); pass
    ``dtype=torch.float16`` to halve it. :func:`u2pl_contrastive` stores unit vectors in it.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        capacity: int = 30000,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.num_classes = num_classes
        self.dim = dim
        self.capacity = capacity
        self.feats = zeros_on_huge_pages((num_classes, capacity, dim), dtype, torch.device(device or "cpu"))
        self.ptr = torch.zeros(num_classes, dtype=torch.long, device=self.feats.device)
        self.count = torch.zeros(num_classes, dtype=torch.long, device=self.feats.device)

    @property
    def device(self) -> torch.device:
        return self.feats.device

    def push(self, class_ids: int | Tensor, feats: Tensor) -> None:
        """Append feats (K, D) to the queue of ``class_ids`` (an int, or (K,) one class per row).

        Rows of one class keep their order; the newest overwrite the oldest, and when a class gets
        more than ``capacity`` rows only its last ``capacity`` are kept. Stored detached.
        """
        rows = torch.arange(feats.shape[0], device=feats.device) if feats.dim() == 2 else None
        self.push_rows(class_ids, feats, rows)

    def push_rows(self, class_ids: int | Tensor, source: Tensor, rows: Tensor | None) -> None:
        """Append ``source[rows]`` to the queues: ``push(class_ids, source[rows])`` without the (K, D) copy.

        source (P, D); rows (K,) long indices into it (None: K = 0); class_ids an int or (K,). Each class's
        new rows are gathered straight into its ring (one or two contiguous runs of slots), so the rows are
        written once and no K x D temporary is allocated: at U2PL+ scale the 45,000 negatives of a batch
        are 46 MB, which the allocator may map fresh each step (the kernel then zero-fills it page by
        page: 11,000 faults, ~30 ms on the test VM).
        """
        source = source.detach().to(device=self.device, dtype=self.feats.dtype)
        if rows is None or source.dim() != 2 or source.shape[1] != self.dim:
            raise ValueError(f"push needs feats (K, {self.dim}) and K class ids; got {tuple(source.shape)}")
        rows = rows.to(device=self.device, dtype=torch.long).reshape(-1)
        n = rows.shape[0]
        if isinstance(class_ids, int):
            class_ids = torch.full((n,), class_ids, dtype=torch.long, device=self.device)
        class_ids = class_ids.to(device=self.device, dtype=torch.long).reshape(-1)
        if class_ids.shape[0] != n:
            raise ValueError(f"push needs feats (K, {self.dim}) and K class ids; got {n} rows, {class_ids.numel()} ids")
        if n == 0:
            return
        if int(class_ids.min()) < 0 or int(class_ids.max()) >= self.num_classes:
            raise ValueError(f"class ids must lie in [0, {self.num_classes})")
        if n > 1 and not bool((class_ids[1:] >= class_ids[:-1]).all()):
            order = torch.argsort(class_ids, stable=True)  # group by class, rows of a class in their order
            class_ids, rows = class_ids[order], rows[order]
        per_class = torch.bincount(class_ids, minlength=self.num_classes)
        start = 0
        for c, (count, ptr) in enumerate(zip(per_class.tolist(), self.ptr.tolist(), strict=True)):
            if count == 0:
                continue
            kept = min(count, self.capacity)  # of more rows than slots, the last `capacity` survive
            group = rows[start + count - kept : start + count]
            start += count
            slot = (ptr + count - kept) % self.capacity
            first = min(kept, self.capacity - slot)  # up to the end of the ring, then from slot 0
            torch.index_select(source, 0, group[:first], out=self.feats[c, slot : slot + first])
            if first < kept:
                torch.index_select(source, 0, group[first:], out=self.feats[c, : kept - first])
        self.ptr = (self.ptr + per_class) % self.capacity
        self.count = torch.clamp(self.count + per_class, max=self.capacity)

    def size(self, class_id: int) -> int:
        return int(self.count[class_id])

    def get(self, class_id: int) -> Tensor:
        """(size, D) the queue of ``class_id`` from oldest to newest."""
        count = self.count[class_id]
        idx = (self.ptr[class_id] - count + torch.arange(int(count), device=self.device)) % self.capacity
        return self.feats[class_id, idx]

    def sample(self, class_id: int, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(n, D) drawn uniformly with replacement from the queue of ``class_id`` (must be non-empty)."""
        count = self.size(class_id)
        if count == 0:
            raise ValueError(f"the queue of class {class_id} is empty")
        return self.sample_many(torch.tensor([class_id], device=self.device), n, generator)[0]

    def sample_rows(self, classes: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(K, n) long rows of :attr:`table`: n draws with replacement from each queue of ``classes`` (K,).

        An empty queue gives its slot 0, which holds zeros (never written; load_state_dict zeroes too).
        """
        classes = classes.to(device=self.device, dtype=torch.long)
        count = self.count[classes]
        # float64 draws: floor(u * count) is uniform on [0, count) up to 2^-53.
        u = _rand((classes.shape[0], n), generator, self.device, torch.float64)
        idx = u.mul_(count[:, None]).long()  # in place: K x n is 243,200 draws at U2PL+ scale
        torch.minimum(idx, (count - 1).clamp_min(0)[:, None], out=idx)
        return idx.add_((classes * self.capacity)[:, None])

    @property
    def table(self) -> Tensor:
        """(C * capacity, D) view of the buffer: row ``c * capacity + slot``."""
        return self.feats.view(-1, self.dim)

    def sample_many(self, classes: Tensor, n: int, generator: torch.Generator | None = None) -> Tensor:
        """(K, n, D): n draws with replacement from each queue of ``classes`` (K,); zeros for empty queues."""
        rows = self.sample_rows(classes, n, generator)
        return self.table.index_select(0, rows.view(-1)).view(rows.shape[0], n, self.dim)

    def state_dict(self) -> dict[str, Tensor]:
        """Only the filled prefix of the buffer is saved (slots past every class's count are zeros)."""
        filled = int(self.count.max()) if self.num_classes else 0
        return {"feats": self.feats[:, :filled].clone(), "ptr": self.ptr.clone(), "count": self.count.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        feats = state["feats"]
        if feats.shape[0] != self.num_classes or feats.shape[2] != self.dim or feats.shape[1] > self.capacity:
            raise ValueError(
                f"memory bank state {tuple(feats.shape)} does not fit ({self.num_classes}, {self.capacity}, {self.dim})"
            )
        self.feats.zero_()
        self.feats[:, : feats.shape[1]] = feats.to(device=self.device, dtype=self.feats.dtype)
        self.ptr.copy_(state["ptr"])
        self.count.copy_(state["count"])


def batch_prototypes(feats: Tensor, labels: Tensor, num_classes: int, ignore_index: int = 255) -> tuple[Tensor, Tensor]:
    """Per-class means of feats (P, D) over labels (P,) (Eq. 15): ((C, D) float32, (C,) bool present)."""
    valid = (labels != ignore_index) & (labels >= 0) & (labels < num_classes)
    # Rows without a class are summed into a spare row C, dropped after: no masked (P, D) copy of feats.
    target = torch.where(valid, labels, torch.full_like(labels, num_classes))
    sums = torch.zeros(num_classes + 1, feats.shape[1], device=feats.device, dtype=torch.float32)
    sums.index_add_(0, target, feats.detach().float())
    counts = torch.bincount(target, minlength=num_classes + 1)[:num_classes].to(torch.float32)
    return sums[:num_classes] / counts.clamp_min(1)[:, None], counts > 0


class PrototypeBank:
    """Class prototypes ``z_c`` (C, D) float32, momentum-updated (U2PL+ Eq. 18), with a ``seen`` flag.

    ``z_c <- m z_c + (1 - m) mean_batch(c)`` for classes in the batch; a class's first batch mean
    initialises it. ``momentum=0`` gives U2PL's batch-mean prototypes.
    """

    def __init__(
        self, num_classes: int, dim: int, momentum: float = 0.999, device: torch.device | str | None = None
    ) -> None:
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum}")
        self.num_classes = num_classes
        self.momentum = momentum
        self.prototypes = torch.zeros(num_classes, dim, device=device, dtype=torch.float32)
        self.seen = torch.zeros(num_classes, dtype=torch.bool, device=self.prototypes.device)

    @torch.no_grad()
    def update(self, feats: Tensor, labels: Tensor, ignore_index: int = 255) -> Tensor:
        """Fold in the batch means of feats (P, D) per label (P,); returns the (C,) classes present."""
        means, present = batch_prototypes(feats, labels.to(feats.device), self.num_classes, ignore_index)
        blended = self.momentum * self.prototypes + (1.0 - self.momentum) * means
        updated = torch.where(self.seen[:, None], blended, means)
        self.prototypes = torch.where(present[:, None], updated, self.prototypes)
        self.seen = self.seen | present
        return present

    def state_dict(self) -> dict[str, Tensor]:
        return {"prototypes": self.prototypes.clone(), "seen": self.seen.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state["prototypes"].shape != self.prototypes.shape:
            raise ValueError(f"prototype state {tuple(state['prototypes'].shape)} != {tuple(self.prototypes.shape)}")
        self.prototypes = state["prototypes"].to(self.prototypes.device, torch.float32).clone()
        self.seen = state["seen"].to(self.seen.device, torch.bool).clone()


def rank_below(probs: Tensor, r: int) -> Tensor:
    """(P, C) bool: ``class_ranks(probs) < r`` (class c among pixel p's r most probable, ties: lower index
    first), without sorting; the transpose of a contiguous (C, P) tensor.

    Sorting 19 classes per pixel costs ~9 ms at U2PL+ scale (16,900 pixels, 1 thread), a top-k ~4 ms;
    this takes the r-th largest probability of every pixel by insertion into r running maxima, in the
    (C, P) layout where each step is one vectorised op over the pixels, and compares with it. Pixels
    where that value is tied between classes (or NaN) go through :func:`class_ranks`, so the result is
    exactly the sort's. For r > C / 2 it takes the C - r smallest instead, which the complement gives.
    """
    num_pixels, num_classes = probs.shape
    if r <= 0 or r >= num_classes:
        return torch.full((num_classes, num_pixels), r > 0, dtype=torch.bool, device=probs.device).T
    values = probs.T.contiguous()  # (C, P)
    top = r <= num_classes - r
    k = r if top else num_classes - r
    extreme, other = (torch.maximum, torch.minimum) if top else (torch.minimum, torch.maximum)
    kept = [values[0].clone()] + [torch.full_like(values[0], -math.inf if top else math.inf)] * (k - 1)
    for row in values[1:]:  # insert the class's probabilities into the k sorted running extremes
        for i in range(k):
            kept[i], row = extreme(kept[i], row), (other(kept[i], row) if i < k - 1 else row)
    kth = kept[-1]  # the k-th largest (top) or smallest of each pixel, with multiplicity
    tied = values == kth
    mask = (values > kth) | tied if top else ~((values < kth) | tied)  # bottom: rank >= r, complemented
    ambiguous = ((tied.sum(0) > 1) | kth.isnan()).nonzero().squeeze(1)
    if ambiguous.numel():  # which of several tied classes are in: the sort's order decides
        mask[:, ambiguous] = (class_ranks(probs[ambiguous]) < r).T
    return mask.T


def class_ranks(probs: Tensor) -> Tensor:
    """(P, C) long: rank[p, c] = position of class c in pixel p's descending probabilities (0 = top).

    Ties keep the lower class index first (stable sort).
    """
    order = torch.argsort(probs, dim=1, descending=True, stable=True)
    positions = torch.arange(probs.shape[1], device=probs.device).expand_as(order)
    return torch.empty_like(order).scatter_(1, order, positions)


def negative_masks(
    probs: Tensor,
    labels: Tensor,
    is_labeled: Tensor,
    reliable: Tensor,
    r_l: int = 3,
    r_h: int = 20,
    ignore_index: int = 255,
    valid: Tensor | None = None,
    negative_source: Literal["unreliable", "reliable"] = "unreliable",
) -> Tensor:
    """(C, P) bool: pixel p is a negative key of class c (U2PL+ Eq. 25-27), ``r_h`` clipped to C.

    probs (P, C) teacher probabilities; labels (P,); is_labeled, reliable, valid (P,) bool
    (``valid`` = False removes a pixel, e.g. crop padding; default all valid). The unlabeled candidates
    are the unreliable pixels (U2PL's point), or with ``negative_source="reliable"`` the reliable ones
    instead (the control of U2PL Table III: the same rank rule, the reliable pixels as the pool).
    Built in the (C, P) layout (contiguous, so the caller's ``nonzero`` lists negatives class by class).
    """
    if negative_source not in ("unreliable", "reliable"):
        raise ValueError(f"negative_source must be 'unreliable' or 'reliable', got {negative_source!r}")
    num_classes = probs.shape[1]
    r_h = min(r_h, num_classes)
    below_l = rank_below(probs, r_l).T  # (C, P): rank < r_l
    below_h = rank_below(probs, r_h).T
    classes = torch.arange(num_classes, device=probs.device)
    annotated = is_labeled & (labels != ignore_index)
    labeled_neg = annotated[None, :] & (labels[None, :] != classes[:, None]) & below_l
    pool = reliable if negative_source == "reliable" else ~reliable
    unlabeled_neg = (~is_labeled & pool)[None, :] & below_h & ~below_l
    negatives = labeled_neg | unlabeled_neg
    if valid is not None:
        negatives = negatives & valid[None, :]
    return negatives


def anchor_masks(
    probs: Tensor,
    labels: Tensor,
    is_labeled: Tensor,
    reliable: Tensor,
    pseudo: Tensor,
    threshold: float = 0.3,
    valid: Tensor | None = None,
) -> Tensor:
    """(C, P) bool: pixel p is an anchor candidate of class c (U2PL+ Eq. 21-23).

    Labeled pixels with ``labels = c`` and ``probs[:, c] > threshold``; unlabeled reliable pixels with
    ``pseudo = c`` and ``probs[:, c] > threshold``. probs (P, C); labels, pseudo (P,); flags (P,) bool.
    """
    target = _anchor_targets(labels, is_labeled, reliable, pseudo, valid)
    classes = torch.arange(probs.shape[1], device=probs.device)
    return (target[None, :] == classes[:, None]) & (probs.T > threshold)  # (C, P), built in that layout


def _anchor_targets(
    labels: Tensor, is_labeled: Tensor, reliable: Tensor, pseudo: Tensor, valid: Tensor | None
) -> Tensor:
    """(P,) the class a pixel can be an anchor of (:func:`anchor_masks`): its label if labeled, its
    pseudo-label if reliable, else -1 (and -1 where not ``valid``)."""
    target = torch.where(is_labeled, labels, torch.where(reliable, pseudo, torch.full_like(pseudo, -1)))
    if valid is not None:
        target = torch.where(valid, target, torch.full_like(target, -1))
    return target


def percentile_linear(values: Tensor, q: float) -> Tensor:
    """``numpy.percentile(values, 100 q)`` (linear interpolation) of a non-empty 1-d tensor, as a 0-d tensor.

    By sorting, not ``torch.quantile``: that one refuses inputs of more than 16 M elements.
    """
    ordered = values.flatten().sort().values
    position = q * (ordered.numel() - 1)
    lo = int(math.floor(position))
    hi = min(lo + 1, ordered.numel() - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (position - lo)


def low_entropy_mask(probs: Tensor, is_labeled: Tensor, alpha: float, valid: Tensor | None = None) -> Tensor:
    """(P,) bool: unlabeled (valid) pixels whose entropy is at most the ``100 alpha``-th percentile of the
    entropies of the batch's unlabeled valid pixels (the authors' ``low_entropy_mask``, U2PL ``train_semi.py``).

    probs (P, C) teacher probabilities; is_labeled, valid (P,) bool; alpha in [0, 1] (alpha_t, a fraction).
    Entropy ``-sum_c p_c log(p_c + 1e-10)`` and ``np.percentile``'s linear interpolation, as theirs; the
    percentile is over this process's batch (theirs is per GPU too). All False without unlabeled pixels.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    pool = ~is_labeled.to(torch.bool)
    if valid is not None:
        pool = pool & valid.to(torch.bool)
    if not bool(pool.any()):
        return pool
    probs = probs.detach().float()
    entropy = -(probs * torch.log(probs + 1e-10)).sum(dim=1)
    return pool & (entropy <= percentile_linear(entropy[pool], alpha))


def sample_anchor_indices(candidates: Tensor, num_anchors: int, generator: torch.Generator | None) -> Tensor:
    """(K, M) pixel indices from candidates (K, P) bool (each row non-empty).

    Without replacement where a row has at least M candidates, with replacement otherwise.
    """
    k_rows, num_pixels = candidates.shape
    device = candidates.device
    keys = _rand((k_rows, num_pixels), generator, device).masked_fill_(~candidates, 2.0)
    # The candidates of a row, in random order, come first; a row with < M candidates has all of them here.
    shuffled = keys.topk(min(num_anchors, num_pixels), dim=1, largest=False).indices
    counts = candidates.sum(dim=1)
    u = _rand((k_rows, num_anchors), generator, device, torch.float64)
    with_replacement = torch.minimum((u * counts[:, None]).long(), (counts - 1)[:, None])
    first_m = torch.arange(num_anchors, device=device).expand(k_rows, num_anchors)
    positions = torch.where(counts[:, None] >= num_anchors, first_m, with_replacement)
    return shuffled.gather(1, positions.clamp_max(shuffled.shape[1] - 1))


def fold_prototypes(
    prototypes: PrototypeBank,
    teacher_feats: Tensor,
    labels: Tensor,
    is_labeled: Tensor,
    reliable: Tensor,
    valid: Tensor | None = None,
    ignore_index: int = 255,
    gather: Callable[[Tensor], Tensor] | None = None,
) -> None:
    """Fold the batch means of the teacher features of labeled and reliable pixels into ``prototypes``
    (U2PL+ Eq. 15-18). Inputs are per pixel, (P, D) and (P,); ``gather`` (DDP) gives every rank the
    same prototypes."""
    feats = teacher_feats.detach()
    keep = is_labeled.to(torch.bool) | reliable.to(torch.bool)
    if valid is not None:
        keep = keep & valid
    labels = torch.where(keep, labels, torch.full_like(labels, ignore_index))
    if gather is not None:
        feats, labels = gather(feats[keep]), gather(labels[keep])
    prototypes.update(feats, labels, ignore_index)


def subsample_per_class(
    class_ids: Tensor, capacity: int, num_classes: int, generator: torch.Generator | None = None
) -> Tensor | None:
    """Indices of a uniform random subset of at most ``capacity`` rows of each class, in row order.

    ``class_ids`` (K,) long. None when no class has more than ``capacity`` rows (keep them all).
    The random keys are drawn on the CPU from ``generator`` (torch's default one when None).
    """
    n = class_ids.numel()
    if n == 0:
        return None
    counts = torch.bincount(class_ids, minlength=num_classes)
    if int(counts.max()) <= capacity:
        return None
    keys = torch.rand(n, generator=generator).to(class_ids.device)
    by_key = torch.argsort(keys)
    order = by_key[torch.argsort(class_ids[by_key], stable=True)]  # by class, random within a class
    group_start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(n, device=class_ids.device) - group_start[class_ids[order]]
    return order[rank < capacity].sort().values


def u2pl_contrastive(
    student_feats: Tensor,
    teacher_feats: Tensor,
    teacher_probs: Tensor,
    labels: Tensor,
    is_labeled: Tensor,
    reliable: Tensor,
    memory: MemoryBank,
    prototypes: PrototypeBank,
    num_anchors: int = 256,
    num_negatives: int = 50,
    temperature: float = 0.5,
    r_l: int = 3,
    r_h: int = 20,
    generator: torch.Generator | None = None,
    anchor_threshold: float = 0.3,
    update_prototypes: bool = True,
    valid: Tensor | None = None,
    ignore_index: int = 255,
    gather: Callable[[Tensor], Tensor] | None = None,
    shared_generator: torch.Generator | None = None,
    anchor_source: Literal["reliable", "low_entropy"] = "reliable",
    low_entropy_alpha: float | None = None,
    average: Literal["qualified", "all_valid"] = "qualified",
    negative_source: Literal["unreliable", "reliable"] = "unreliable",
) -> tuple[Tensor, dict[str, int]]:
    """The U2PL+ contrastive loss of one batch (Algorithm 1); see the module docstring.

    student_feats (P, D) with gradient; teacher_feats (P, D) and teacher_probs (P, C) are detached
    here; labels (P,) long (ground truth on labeled pixels, pseudo-label on unlabeled ones);
    is_labeled, reliable (P,) bool. Steps: (1) with ``update_prototypes``, fold the batch means of the
    teacher features of labeled and reliable pixels into ``prototypes`` (Eq. 15-18); (2) push every
    class's negatives (unit-normalised teacher features) into its own queue of ``memory``; (3) for each
    class with anchors, a non-empty queue and a prototype, sample M anchors, draw N negatives per
    anchor from that class's queue, and take the prototype as the positive; (4) average the InfoNCE
    over anchors and classes. Returns (loss, stats); loss is a grad-safe 0 when no class qualifies.
    stats (ints): ``classes`` (classes in the loss), ``anchor_candidates``, ``negatives_pushed``.
    ``memory`` and ``prototypes`` must live on the features' device.

    ``generator`` draws this process's random subset of negatives to push (a class with more than its
    queue holds), anchors and keys; under DDP ``shared_generator`` (the same state on every rank) draws
    the subset of the gathered negatives, so that every rank's queues stay identical.

    The authors' forms (module docstring): ``anchor_source="low_entropy"`` draws the unlabeled anchors
    from :func:`low_entropy_mask` with ``low_entropy_alpha`` (the scheduled alpha_t, a fraction; required
    then) instead of ``reliable`` (prototypes and negatives keep the reliable split);
    ``average="all_valid"`` returns ``sum_c loss_c / V`` with V the classes having any anchor-pool pixel
    (before the ``anchor_threshold``), instead of the mean over the K classes in the loss. Since every
    class has M anchors, that is the mean times ``K / V``. Their code also returns 0 when V <= 1; not
    adopted (a batch of one class still has a loss). stats adds ``valid_classes`` (V).
    ``negative_source="reliable"`` pushes reliable instead of unreliable unlabeled pixels as negatives
    (:func:`negative_masks`; the control of U2PL Table III).
    """
    _check_options(gather, shared_generator, anchor_source, average, low_entropy_alpha)
    device = student_feats.device
    t_feats = teacher_feats.detach()
    probs = teacher_probs.detach().float()
    labels = labels.to(device=device, dtype=torch.long)
    is_labeled = is_labeled.to(device=device, dtype=torch.bool)
    reliable = reliable.to(device=device, dtype=torch.bool)

    # (1) prototypes, (2) negatives: both from the teacher, before the anchors look at the queues.
    if update_prototypes:
        fold_prototypes(prototypes, t_feats, labels, is_labeled, reliable, valid, ignore_index, gather)
    negatives = negative_masks(probs, labels, is_labeled, reliable, r_l, r_h, ignore_index, valid, negative_source)
    pushed = _push_negatives(negatives, t_feats, memory, generator, gather, shared_generator)

    # (3) the anchor candidates, and the classes with some, a non-empty queue and a prototype.
    anchors, valid_classes = _anchor_candidates(
        probs, labels, is_labeled, reliable, anchor_threshold, valid, anchor_source, low_entropy_alpha
    )
    candidates_per_class = anchors.sum(dim=1)
    usable = (candidates_per_class > 0) & (memory.count > 0) & prototypes.seen.to(device)
    classes = usable.nonzero().squeeze(1)
    stats = {
        "classes": int(classes.numel()),
        "valid_classes": valid_classes,
        "anchor_candidates": int(candidates_per_class.sum()),
        "negatives_pushed": pushed,
    }
    if classes.numel() == 0 or num_anchors == 0:
        return student_feats.sum() * 0.0, stats

    # (4) the InfoNCE of the sampled anchors and keys, averaged over anchors and classes.
    # Every class in the loss is valid (its anchors are pool pixels), so valid_classes >= k here.
    scale = classes.numel() / valid_classes if average == "all_valid" else 1.0
    loss = _sampled_info_nce(
        student_feats, anchors[classes], classes, prototypes, memory, num_anchors, num_negatives, temperature, generator
    )
    return scale * loss, stats


def _check_options(
    gather: Callable[[Tensor], Tensor] | None,
    shared_generator: torch.Generator | None,
    anchor_source: str,
    average: str,
    low_entropy_alpha: float | None,
) -> None:
    """ValueError for a combination of :func:`u2pl_contrastive`'s options that has no meaning."""
    if gather is not None and shared_generator is None:
        raise ValueError("u2pl_contrastive with gather needs shared_generator (the same state on every rank)")
    if anchor_source not in ("reliable", "low_entropy"):
        raise ValueError(f"anchor_source must be 'reliable' or 'low_entropy', got {anchor_source!r}")
    if average not in ("qualified", "all_valid"):
        raise ValueError(f"average must be 'qualified' or 'all_valid', got {average!r}")
    if anchor_source == "low_entropy" and low_entropy_alpha is None:
        raise ValueError("anchor_source='low_entropy' needs low_entropy_alpha (the scheduled alpha_t)")


def _anchor_candidates(
    probs: Tensor,
    labels: Tensor,
    is_labeled: Tensor,
    reliable: Tensor,
    threshold: float,
    valid: Tensor | None,
    anchor_source: str,
    low_entropy_alpha: float | None,
) -> tuple[Tensor, int]:
    """The (C, P) anchor candidates of each class (:func:`anchor_masks`) among the labeled pixels and the
    pool of unlabeled ones (``reliable``, or the low-entropy ones), and the number of valid classes (the
    authors' denominator): those with any pool pixel, whatever its p_c (``probs > -1``)."""
    if anchor_source == "low_entropy":
        pool = low_entropy_mask(probs, is_labeled, float(low_entropy_alpha), valid)
    else:
        pool = reliable
    anchors = anchor_masks(probs, labels, is_labeled, pool, labels, threshold, valid)
    # The classes with any pixel of anchor_masks(..., threshold=-1): a pixel can only be a candidate of
    # its own target class, so a per-pixel test and a histogram of targets do (no second (C, P) mask).
    num_classes = probs.shape[1]
    target = _anchor_targets(labels, is_labeled, pool, labels, valid)
    inside = (target >= 0) & (target < num_classes)
    own_prob = probs.gather(1, target.clamp(0, num_classes - 1)[:, None]).squeeze(1)
    counted = target[inside & (own_prob > -1.0)]
    valid_classes = int((torch.bincount(counted, minlength=num_classes) > 0).sum())
    return anchors, valid_classes


def _push_negatives(
    negatives: Tensor,
    teacher_feats: Tensor,
    memory: MemoryBank,
    generator: torch.Generator | None,
    gather: Callable[[Tensor], Tensor] | None,
    shared_generator: torch.Generator | None,
) -> int:
    """Push the unit-normalised teacher features of the (C, P) ``negatives`` into each class's queue;
    returns how many were pushed.

    A class with more negatives in one batch than its queue holds pushes a uniform random subset of
    ``capacity`` of them (a FIFO would keep the last pixels pushed: the bottom rows of the last
    unlabeled images, never a labeled pixel), drawn from ``generator``; under DDP every rank's negatives
    are gathered and subsampled again with ``shared_generator``, so that every rank's queues stay identical.
    """
    neg_class, neg_pixel = negatives.nonzero(as_tuple=True)
    keep = subsample_per_class(neg_class, memory.capacity, memory.num_classes, generator)
    if keep is not None:
        neg_class, neg_pixel = neg_class[keep], neg_pixel[keep]
    # Normalise the P teacher rows once, then gather (a pixel is a negative of up to C - 1 classes).
    unit_feats = F.normalize(teacher_feats.float(), dim=1)
    if gather is None:  # straight from the unit rows into the queues: no (K, D) temporary
        memory.push_rows(neg_class, unit_feats, neg_pixel)
        return int(neg_class.numel())
    # DDP: every rank's negatives enter every rank's queues, in rank order.
    neg_class, neg_feats = gather(neg_class), gather(unit_feats.index_select(0, neg_pixel))
    keep = subsample_per_class(neg_class, memory.capacity, memory.num_classes, shared_generator)
    if keep is not None:
        neg_class, neg_feats = neg_class[keep], neg_feats[keep]
    memory.push(neg_class, neg_feats)
    return int(neg_class.numel())


def _sampled_info_nce(
    student_feats: Tensor,
    candidates: Tensor,
    classes: Tensor,
    prototypes: PrototypeBank,
    memory: MemoryBank,
    num_anchors: int,
    num_negatives: int,
    temperature: float,
    generator: torch.Generator | None,
) -> Tensor:
    """Mean InfoNCE (Eq. 10) over M anchors per class of ``classes`` (K,), drawn from ``candidates``
    (K, P) bool: the student features as anchors, each class's prototype as the positive key, N negatives
    per anchor drawn from the class's queue (``generator`` draws the anchors, then the negatives)."""
    k = classes.numel()
    device = student_feats.device
    anchor_pixels = sample_anchor_indices(candidates, num_anchors, generator)
    anchor_rows = student_feats.index_select(0, anchor_pixels.reshape(-1)).view(k, num_anchors, -1).float()
    positive = F.normalize(prototypes.prototypes.to(device)[classes], dim=-1)[:, None, :]
    # The queues hold unit vectors (pushed normalised above): no second normalisation of K*M*N keys.
    rows = memory.sample_rows(classes, num_anchors * num_negatives, generator)
    if memory.table.dtype == torch.float32:  # loss and gradient from one gather of the K*M*N keys
        index = rows.view(k, num_anchors, -1)
        return _GatheredInfoNCE.apply(anchor_rows, positive, memory.table, index, temperature)
    anchor_feats = F.normalize(anchor_rows, dim=-1)
    positive_sim = (anchor_feats * positive).sum(dim=-1, keepdim=True)
    negative_keys = memory.table.index_select(0, rows.view(-1)).float()  # a float16 bank: keys in float32
    negative_keys = negative_keys.view(k, num_anchors, num_negatives, -1)
    negative_sim = torch.matmul(negative_keys, anchor_feats.unsqueeze(-1)).squeeze(-1)
    return _info_nce_from_similarities(positive_sim, negative_sim, temperature).mean()


def prototype_weights(feats: Tensor, prototypes: PrototypeBank | Tensor) -> Tensor:
    """U2PL+ Eq. 19: ``w = softmax_c(-||z - z_c||)``; feats (P, D) -> (P, C), (B, D, H, W) -> (B, C, H, W).

    Features and prototypes are L2-normalised first, so distances lie in [0, 2] (weights within a
    factor e^2 of each other). A class without a prototype (``seen`` False) gets the distance sqrt(2)
    of an orthogonal one: neither favoured nor excluded.
    """
    if isinstance(prototypes, PrototypeBank):
        centers, seen = prototypes.prototypes, prototypes.seen
    else:
        centers = prototypes
        seen = torch.ones(centers.shape[0], dtype=torch.bool, device=centers.device)
    spatial = feats.dim() == 4
    if spatial:
        b, d, h, w = feats.shape
        feats = feats.permute(0, 2, 3, 1).reshape(-1, d)
    z = F.normalize(feats.detach().float(), dim=1)
    zc = F.normalize(centers.to(z.device).float(), dim=1)
    distance = (2.0 - 2.0 * z @ zc.T).clamp_min(0.0).sqrt()
    distance = torch.where(seen.to(z.device)[None, :], distance, torch.full_like(distance, 2.0**0.5))
    weights = torch.softmax(-distance, dim=1)
    return weights.view(b, h, w, -1).permute(0, 3, 1, 2) if spatial else weights


def denoise_pseudo_labels(
    probs: Tensor,
    feats: Tensor,
    prototypes: PrototypeBank | Tensor,
    labels: Tensor | None = None,
    ignore_index: int = 255,
) -> Tensor:
    """U2PL+ prototypical denoising (Eq. 19-20): ``argmax_c w_c p_c`` with :func:`prototype_weights`.

    probs (P, C) and feats (P, D), or (B, C, H, W) and (B, D, h, w); returns (P,) or (B, H, W) long.
    Spatial weights computed at the features' resolution (stride 4) are upsampled bilinearly to the
    probabilities' resolution and the argmax is taken there, so a label the prototypes do not change
    keeps its full-resolution boundary (upsampling the 256-d features instead would hold 135 MB at
    2 x 257 x 257). With ``labels``, pixels labelled ``ignore_index`` stay ignored (only kept labels
    are denoised).
    """
    weights = prototype_weights(feats.float(), prototypes)
    if probs.dim() == 4 and weights.shape[-2:] != probs.shape[-2:]:
        weights = F.interpolate(weights, size=probs.shape[-2:], mode="bilinear", align_corners=False)
    denoised = (weights * probs.detach().float()).argmax(dim=1)
    if labels is None:
        return denoised
    return torch.where(labels != ignore_index, denoised, labels)
