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


def test_a_scale_recipe_with_adamw_is_estimated_for_its_own_architecture(gm):
    """The demo recipe (model scale n, AdamW): the estimate builds the scale's FPN model, not a DeepLabv3+
    on its backbone, and AdamW's step runs on fake tensors (its bias correction reads the step count)."""
    from labelpipe.context import model_from_config

    setting = gm.load_setting("demo")
    assert (setting.config.model.scale, setting.config.train.optimizer) == ("n", "adamw")
    model = model_from_config(setting.config, setting.num_classes, with_backbone_weights=False)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    est = gm.measure(setting, "pretrain", 2, amp=False)
    # weights, gradients and AdamW's two moments (the representation head, frozen in pretraining, has none)
    rep = sum(p.numel() * p.element_size() for p in model.representation.parameters())
    assert est.student_state == pytest.approx(params + buffers + 3 * (params - rep), rel=0.01)
    assert est.act > 0
