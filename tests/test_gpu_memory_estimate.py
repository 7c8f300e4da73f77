"""benchmarks/gpu_memory.py: the fake-tensor estimate against the same step on real CPU tensors."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.filterwarnings("ignore:Module is None")  # MemTracker, on the EMA teacher


@pytest.fixture(scope="module")
def gm():
    spec = importlib.util.spec_from_file_location("gpu_memory", ROOT / "benchmarks" / "gpu_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_memory"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_memory", None)


@pytest.mark.slow
def test_fake_estimate_equals_the_real_step(gm):
    setting = gm.small_setting("pretrain")
    fake = gm.measure(setting, "pretrain", 2, amp=False)
    real = gm.measure(setting, "pretrain", 2, amp=False, fake=False)
    assert fake.student_state == real.student_state
    assert fake.peak == pytest.approx(real.peak, rel=0.01)
    allocator = gm.measure(setting, "pretrain", 2, amp=False, fake=False, tracker=False)
    assert abs(fake.peak / allocator.peak - 1) < 0.05


@pytest.mark.slow
def test_selftrain_state_holds_teacher_bank_and_ddp_buckets(gm):
    setting = gm.small_setting("selftrain")
    one = gm.measure(setting, "selftrain", 2, amp=True)
    two = gm.measure(setting, "selftrain", 2, amp=True, world=2)
    st, c, d = setting.config.selftrain, setting.num_classes, setting.config.model.rep_dim
    bank = c * st.memory_capacity * d * 4
    params = one.student_state / 3  # SGD with momentum: weights, gradients, momentum (+ small buffers)
    assert one.other_state == pytest.approx(bank + params, rel=0.02)  # memory bank + EMA teacher
    assert two.other_state - one.other_state == pytest.approx(params, rel=0.02)  # DDP buckets
    assert one.act > 0 and two.peak - one.peak == two.other_state - one.other_state


def test_recipes_resolve(gm):
    classes = {
        "cityscapes_semi_1_8": 19,
        "voc_semi_1464": 21,
        "gta5_to_cityscapes": 19,
        "synthia_to_cityscapes": 16,
        "demo": 11,
    }
    for name, num_classes in classes.items():
        setting = gm.load_setting(name)
        assert setting.num_classes == num_classes
        assert setting.stages == ["pretrain", "selftrain"]
    assert gm.load_setting("voc_semi_1464").uses_teacher
    assert not gm.load_setting("cityscapes_semi_1_8").uses_teacher
