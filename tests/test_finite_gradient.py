"""nonfinite_gradient (train/finite_check.py) on a real tiny MegatronActor (megatron DistributedDataParallel with its
contiguous gradient buffers, one gloo rank in this process) and on a plain nn.Module: None after a finite backward;
"gradient of <name>" when a NaN / +Inf / -Inf is written into that parameter's main_grad (a view into DDP's buffer);
the first such parameter in named_parameters order; a plain module's .grad. And through MegatronActor.train_step: a
NaN gradient with a finite loss skips the update (weights unchanged) and names the parameter."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_harness import megatron_in_this_process, per_row_microbatches, tiny_case

DAMAGED = "language_model.decoder.layers.1.mlp.linear_fc2.weight"
OTHER = "language_model.decoder.layers.0.self_attention.linear_qkv.weight"  # before DAMAGED in named_parameters


@pytest.fixture(scope="module")
def actor():
    """A tiny float32 actor after one finite training step (its gradients stay in DDP's buffers)."""
    from mssr_megatron.config import ModelConfig, OptimizerConfig
    from mssr_megatron.models.tiny_hf import published_state_dict
    from mssr_megatron.train.actor import MegatronActor

    with megatron_in_this_process():
        cfg, hf, inputs = tiny_case(tied=False)
        actor = MegatronActor(cfg, ModelConfig(params_dtype="float32"), OptimizerConfig(lr=1e-3), 10)
        actor.load_hf_state(published_state_dict(hf))
        actor.micro = per_row_microbatches(inputs)
        metrics = _step(actor)
        assert metrics["actor/update_skipped"] == 0.0 and actor.nonfinite is None
        yield actor


def _step(actor) -> dict:
    def nll(logprobs, entropy, mb):
        return -logprobs.mean() / len(actor.micro), {}

    return actor.train_step(actor.micro, nll)


def _params(actor) -> dict:
    return dict(actor.module.named_parameters())


@pytest.fixture
def grads(actor):
    """Each trained parameter's main_grad, restored after the test."""
    saved = {name: p.main_grad.clone() for name, p in _params(actor).items() if getattr(p, "main_grad", None) is not None}
    yield
    for name, p in _params(actor).items():
        if name in saved:
            p.main_grad.copy_(saved[name])


def test_the_model_is_wrapped_in_megatron_ddp_with_gradient_buffers(actor):
    from megatron.core.distributed import DistributedDataParallel

    assert isinstance(actor.model, DistributedDataParallel) and actor.model.buffers
    param = _params(actor)[DAMAGED]
    grad = param.main_grad
    (buffer,) = [b.grad_data for b in actor.model.buffers if b.grad_data.dtype == grad.dtype]
    start = (grad.data_ptr() - buffer.data_ptr()) // grad.element_size()
    assert 0 <= start and start + grad.numel() <= buffer.numel()  # a view into the buffer
    assert grad.abs().sum() > 0  # the backward wrote it


def test_finite_gradients_give_none(actor, grads):
    from mssr_megatron.train.finite_check import nonfinite_gradient

    assert all(torch.isfinite(b.grad_data).all() for b in actor.model.buffers)
    assert nonfinite_gradient(actor.model) is None


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "minus_inf"])
def test_a_non_finite_main_grad_is_named(actor, grads, value):
    from mssr_megatron.train.finite_check import nonfinite_gradient

    _params(actor)[DAMAGED].main_grad[1, 2] = value
    assert nonfinite_gradient(actor.model) == f"gradient of {DAMAGED}"


def test_the_first_non_finite_parameter_is_named(actor, grads):
    from mssr_megatron.train.finite_check import nonfinite_gradient

    names = list(_params(actor))
    assert names.index(OTHER) < names.index(DAMAGED)
    _params(actor)[DAMAGED].main_grad[0, 0] = math.nan
    _params(actor)[OTHER].main_grad[0, 0] = math.inf
    assert nonfinite_gradient(actor.model) == f"gradient of {OTHER}"


def test_a_plain_module_is_read_through_grad():
    from mssr_megatron.train.finite_check import nonfinite_gradient

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert nonfinite_gradient(model) is None  # no gradients yet
    model(torch.randn(5, 3)).sum().backward()
    assert nonfinite_gradient(model) is None
    model[2].weight.grad[0, 1] = math.inf
    assert nonfinite_gradient(model) == "gradient of 2.weight"
    model[0].bias.grad[3] = math.nan
    assert nonfinite_gradient(model) == "gradient of 0.bias"


def test_a_nan_gradient_with_a_finite_loss_skips_the_update_and_names_the_parameter(actor):
    """The hook makes one element of DAMAGED's gradient NaN before DDP accumulates it into main_grad."""
    param = _params(actor)[DAMAGED]
    before = {name: p.detach().clone() for name, p in _params(actor).items()}

    def poison(grad):
        grad = grad.clone()
        grad[0, 0] = math.nan
        return grad

    handle = param.register_hook(poison)
    try:
        metrics = _step(actor)
    finally:
        handle.remove()
    assert math.isfinite(metrics["actor/loss"])
    assert metrics["actor/update_skipped"] == 1.0 and math.isnan(metrics["actor/grad_norm"])
    assert actor.nonfinite == f"gradient of {DAMAGED}"
    assert all(torch.equal(p, before[name]) for name, p in _params(actor).items())
    metrics = _step(actor)  # the next finite step updates again
    assert metrics["actor/update_skipped"] == 0.0 and actor.nonfinite is None
    assert not torch.equal(param, before[DAMAGED])
