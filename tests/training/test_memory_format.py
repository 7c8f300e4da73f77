"""NHWC (channels_last) weights on every device (``train.channels_last``, ``runtime.place``): the layout changes the
kernels, not the model. The same model computes the same outputs and gradients to float rounding in either layout,
trains to the same weights, saves a layout-free file, and the stages that load a trained model honour the option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from labelpipe.config import TrainConfig
from labelpipe.models import build_model
from labelpipe.runtime import Runtime, place
from labelpipe.store.checkpoint import load_model_weights, save_model
from labelpipe.training.setup import for_training

CPU = Runtime(device=torch.device("cpu"))
MODELS = {
    "scale n": lambda: build_model(5, "efficientnet_lite0", 16, rep_dim=16, scale="n"),
    "resnet18 deeplabv3+": lambda: build_model(5, "resnet18", 16, (1, 2, 3), 16),
}


def spatial_conv_weights(model: torch.nn.Module) -> list[torch.Tensor]:
    """The weights whose layout differs between NCHW and NHWC (a 1 x 1 kernel's is the same either way only
    for one input channel, so every 4-d weight with a spatial extent or several input channels counts)."""
    return [m.weight for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.weight[0].numel() > 1]


def fresh(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return MODELS[name]()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("name", list(MODELS))
def test_training_module_is_nhwc_by_default_and_computes_the_same_outputs(name):
    x = torch.randn(2, 3, 48, 48, generator=torch.Generator().manual_seed(1))
    reference = fresh(name).eval()
    model = fresh(name)
    net = for_training(model, CPU, TrainConfig(steps=1, batch_size=2, crop_size=48), uses_rep=True)
    weights = spatial_conv_weights(model)
    assert weights and all(w.is_contiguous(memory_format=torch.channels_last) for w in weights)
    assert not all(w.is_contiguous() for w in weights)  # really NHWC, not a layout both formats share
    model.eval()
    with torch.no_grad():
        got, expected = net(x), reference(x)
    assert got.main.is_contiguous(memory_format=torch.channels_last)  # the activations followed the weights
    for a, b in zip(got, expected, strict=True):
        assert relative(a, b) < 1e-5


def test_channels_last_off_keeps_the_contiguous_layout():
    model = fresh("scale n")
    for_training(model, CPU, TrainConfig(steps=1, batch_size=2, crop_size=48, channels_last=False), uses_rep=False)
    assert all(w.is_contiguous() for w in spatial_conv_weights(model))
    assert "channels_last" in TrainConfig.EXECUTION_ONLY  # a layout is not a new experiment: runs stay up to date


def test_gradients_and_a_few_sgd_steps_agree_in_either_layout():
    """With the auxiliary head's dropout at 0: its mask is drawn in memory order, so the same seed masks other
    pixels in each layout (the same distribution; one reason runs agree in law, not bit for bit)."""
    generator = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 3, 32, 32, generator=generator), torch.randint(0, 5, (4, 32, 32), generator=generator)
    first_grads, losses, updates = {}, {}, {}
    for layout in (True, False):
        model = place(fresh("scale n"), torch.device("cpu"), channels_last=layout)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
        start = torch.cat([p.detach().flatten() for p in model.parameters()])
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        losses[layout] = []
        for step in range(3):
            out = model(x, with_rep=False)
            loss = F.cross_entropy(out.main, y) + 0.4 * F.cross_entropy(out.aux, y)
            optimizer.zero_grad()
            loss.backward()
            if step == 0:
                first_grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
            optimizer.step()
            losses[layout].append(loss.item())
        updates[layout] = torch.cat([p.detach().flatten() for p in model.parameters()]) - start
    assert len(first_grads[True]) > 50 and first_grads[True].keys() == first_grads[False].keys()
    for name, g in first_grads[False].items():
        if g.norm() > 1e-6:  # not the biases a BatchNorm after them cancels (their gradient is rounding noise)
            assert relative(first_grads[True][name], g) < 1e-3, name
    assert losses[True] == pytest.approx(losses[False], rel=1e-5) and losses[True][2] < losses[True][0]
    assert relative(updates[True], updates[False]) < 1e-2  # ~4e-3: rounding, grown by three steps


def test_the_saved_file_does_not_depend_on_the_layout(tmp_path):
    model = place(fresh("scale n"), torch.device("cpu"), channels_last=True)
    with torch.no_grad():  # weights that differ from the fresh model's, so the load below is seen
        for p in model.parameters():
            p.add_(0.01)
    save_model(tmp_path / "model.safetensors", model, {"stage": "test"})
    loaded = fresh("scale n")  # contiguous
    load_model_weights(tmp_path / "model.safetensors", loaded)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    assert all(w.is_contiguous() for w in spatial_conv_weights(loaded))


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_trained_models_loader_honours_the_option(pretrained_run, channels_last):
    from labelpipe.config import resolve_config
    from labelpipe.context import load_trained_model, open_context
    from tests.conftest import TINY_RECIPE

    config = resolve_config(pretrained_run, TINY_RECIPE, sets=[f"train.channels_last={str(channels_last).lower()}"])
    ctx = open_context(config, pretrained_run, CPU)
    _, model, _ = load_trained_model(ctx, None)
    weights = spatial_conv_weights(model)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in weights) == channels_last
    assert all(w.is_contiguous() for w in weights) != channels_last
