"""EMA teacher: m = min(1 - 1/(step+1), max), parameters averaged, buffers copied, eval and no grad."""

import pytest
import torch
from torch import nn

from labelpipe.teacher import EMATeacher


class OneParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor([2.0]))
        self.register_buffer("stat", torch.tensor([0.0]))

    def forward(self, x):
        return self.w * x + self.stat


def set_weight(module, value):
    with torch.no_grad():
        module.w.fill_(value)


def test_ema_update_by_hand():
    student = OneParameter()
    teacher = EMATeacher(student)
    set_weight(student, 4.0)
    assert teacher.model.w.item() == 2.0  # a copy, not the student itself
    assert teacher.update(student, step=0) == 0.0  # m = min(1 - 1/1, 0.99) = 0: copy
    assert teacher.model.w.item() == 4.0
    set_weight(student, 6.0)
    assert teacher.update(student, step=1) == 0.5
    assert teacher.model.w.item() == pytest.approx(5.0)
    set_weight(student, 10.0)
    assert teacher.update(student, step=3) == pytest.approx(0.75)
    assert teacher.model.w.item() == pytest.approx(0.75 * 5.0 + 0.25 * 10.0)
    set_weight(student, 0.0)
    assert teacher.update(student, step=10_000) == pytest.approx(0.99)  # capped
    assert teacher.model.w.item() == pytest.approx(0.99 * 6.25)


def test_max_momentum_is_configurable():
    teacher = EMATeacher(OneParameter(), max_momentum=0.9)
    assert teacher.momentum(100) == pytest.approx(0.9)
    assert teacher.momentum(4) == pytest.approx(0.8)


def test_buffers_are_copied_not_averaged():
    student = nn.Sequential(nn.Linear(2, 3), nn.BatchNorm1d(3))
    teacher = EMATeacher(student)
    student.train()
    student(torch.randn(8, 2) * 5 + 3)
    assert not torch.equal(teacher.model[1].running_mean, student[1].running_mean)
    teacher.update(student, step=50)
    assert torch.equal(teacher.model[1].running_mean, student[1].running_mean)
    assert torch.equal(teacher.model[1].running_var, student[1].running_var)
    assert teacher.model[1].num_batches_tracked.item() == 1
    # parameters are averaged (step 49: m = 1 - 1/50 = 0.98), not copied
    with torch.no_grad():
        student[0].weight.add_(1.0)
    before = teacher.model[0].weight.clone()
    teacher.update(student, step=49)
    assert torch.allclose(teacher.model[0].weight, 0.98 * before + 0.02 * student[0].weight)


def test_teacher_is_in_eval_mode_without_grad():
    student = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    student.train()
    teacher = EMATeacher(student)
    teacher.update(student, step=1)
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.model.parameters())
    assert all(p.requires_grad for p in student.parameters())
    out = teacher(torch.randn(4, 2))
    assert not out.requires_grad


def test_state_round_trip():
    student = OneParameter()
    teacher = EMATeacher(student, max_momentum=0.95)
    set_weight(student, 8.0)
    with torch.no_grad():
        student.stat.fill_(3.0)
    teacher.update(student, step=1)
    restored = EMATeacher(OneParameter())
    restored.load_state_dict(teacher.state_dict())
    assert restored.model.w.item() == 5.0 and restored.model.stat.item() == 3.0
    assert restored.max_momentum == 0.95
