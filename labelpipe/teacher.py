"""Mean-teacher: an exponential moving average of the student's weights (ALGORITHMS.md section 4).

``theta_t <- m theta_t + (1 - m) theta_s`` with ``m = min(1 - 1 / (step + 1), max_momentum)``
(max 0.99): step 0 copies the student, then the teacher slows down until the cap. Buffers (BatchNorm
running statistics and counters) are copied from the student, not averaged. The teacher is always in
eval mode and never requires grad.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from labelpipe.runtime import unwrap


class EMATeacher:
    """Holds ``model``, a deep copy of the student, updated by :meth:`update`."""

    def __init__(self, student: nn.Module, max_momentum: float = 0.99) -> None:
        if not 0.0 <= max_momentum <= 1.0:
            raise ValueError(f"max_momentum must lie in [0, 1], got {max_momentum}")
        self.max_momentum = max_momentum
        self.model = copy.deepcopy(unwrap(student))
        self.model.eval()
        self.model.requires_grad_(False)

    def momentum(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.max_momentum)

    @torch.no_grad()
    def update(self, student: nn.Module, step: int) -> float:
        """EMA the parameters towards ``student`` and copy its buffers; returns the momentum used."""
        m = self.momentum(step)
        student = unwrap(student)
        student_params = dict(student.named_parameters())
        for name, teacher_param in self.model.named_parameters():
            source = student_params[name].detach()
            teacher_param.mul_(m).add_(source.to(teacher_param.dtype), alpha=1.0 - m)
        student_buffers = dict(student.named_buffers())
        for name, teacher_buffer in self.model.named_buffers():
            teacher_buffer.copy_(student_buffers[name])
        self.model.eval()
        return m

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Forward the teacher without autograd."""
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def to(self, device: torch.device | str) -> EMATeacher:
        self.model.to(device)
        return self

    def state_dict(self) -> dict[str, Any]:
        return {"model": self.model.state_dict(), "max_momentum": self.max_momentum}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.max_momentum = float(state.get("max_momentum", self.max_momentum))
        self.model.eval()
