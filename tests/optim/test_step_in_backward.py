"""blockopt.step_in_backward: each tensor stepped inside backward, its gradient freed."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import token_batches

import blockopt
from blockopt.bench.models import build_model

KW = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1}


def _model():
    return build_model("llama-tiny", vocab_size=96, n_layers=2, d_model=64)


def _loss(model, batch):
    logits = model(batch[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))


def _train(model, opt, batches, *, accumulate=1, clip=None, sched=None):
    for i, batch in enumerate(batches):
        (_loss(model, batch) / accumulate).backward()
        if (i + 1) % accumulate == 0:
            if clip is not None:
                clip(model)
            opt.step()
            opt.zero_grad()
            if sched is not None:
                sched.step()


@pytest.mark.parametrize("kw", [{}, {"rules": "official"}, {"momentum_dtype": torch.bfloat16},
                                {"momentum_dtype": "int8"}, {"fused": False}])
def test_step_in_backward_equals_the_normal_step_bit_for_bit(kw):
    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, **KW, **kw)
    ref_opt = blockopt.AdamMini(ref, **KW, **kw)
    handle = blockopt.step_in_backward(opt)
    batches = token_batches(96, 6)
    _train(model, opt, batches)
    _train(ref, ref_opt, batches[:-1])
    _loss(ref, batches[-1]).backward()  # the last step's global norm, measured in backward as well
    norm = torch.nn.utils.get_total_norm([q.grad for q in ref.parameters()])
    assert handle.previous_norm == pytest.approx(float(norm), rel=1e-5)
    ref_opt.step()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
        assert p.grad is None  # freed in backward
    assert opt.routes == ref_opt.routes  # the same kernels ran
    for p, q in zip(model.parameters(), ref.parameters()):
        for key, value in ref_opt.state[q].items():
            assert torch.equal(opt.state[p][key], value), key
    handle.remove()
    assert opt._backward is None


def test_no_gradient_of_the_model_is_held_at_once():
    model = _model()
    opt = blockopt.AdamMini(model, **KW)
    blockopt.step_in_backward(opt)
    params = list(model.parameters())
    most = 0

    def count(_):
        nonlocal most
        most = max(most, sum(p.grad is not None for p in params))

    hooks = [p.register_post_accumulate_grad_hook(count) for p in params]  # run after the step's hook
    _loss(model, token_batches(96, 1)[0]).backward()
    for h in hooks:
        h.remove()
    # the tied embedding's gradient is the last to complete; at most one more tensor is in flight
    assert most <= 1 and all(p.grad is None for p in params)


def test_gradient_accumulation_and_a_scheduler_equal_the_normal_loop():
    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, **KW)
    ref_opt = blockopt.AdamMini(ref, **KW)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lambda s: 1.0 / (1 + s))
    blockopt.step_in_backward(opt, accumulation_steps=3)
    batches = token_batches(96, 9)
    _train(model, opt, batches, accumulate=3, sched=sched)
    _train(ref, ref_opt, batches, accumulate=3, sched=ref_sched)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.equal(p, q), name
    assert int(opt.state[next(model.parameters())]["step"]) == 3


def test_per_tensor_clipping_is_exact_and_previous_norm_clipping_lags_one_step():
    model = _model()
    ref = copy.deepcopy(model)
    opt = blockopt.AdamMini(model, **KW)
    ref_opt = blockopt.AdamMini(ref, **KW)
    blockopt.step_in_backward(opt, clip="per_tensor", max_norm=0.05)

    def per_tensor(m):
        for p in m.parameters():
            torch.nn.utils.clip_grad_norm_([p], 0.05)

    batches = token_batches(96, 4)
    _train(model, opt, batches)
    _train(ref, ref_opt, batches, clip=per_tensor)
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=name)
    # previous: the first step is not clipped, later ones by the norm of the step before
    model2 = _model()
    opt2 = blockopt.AdamMini(model2, **KW)
    h = blockopt.step_in_backward(opt2, clip="previous", max_norm=0.1)
    assert h.previous_norm is None
    _train(model2, opt2, batches[:1])
    first = h.previous_norm
    assert first is not None and first > 0.1  # the model's first gradient norm is well above 0.1
    _train(model2, opt2, batches[1:2])
    assert h.previous_norm is not None and h.previous_norm != first


def test_resume_from_a_state_dict_continues_exactly():
    model = _model()
    opt = blockopt.AdamMini(model, **KW, momentum_dtype="int8")
    blockopt.step_in_backward(opt)
    batches = token_batches(96, 6)
    _train(model, opt, batches[:3])
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, batches[3:])
    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt2 = blockopt.AdamMini(resumed, **KW, momentum_dtype="int8")
    opt2.load_state_dict(saved_opt)
    blockopt.step_in_backward(opt2)
    _train(resumed, opt2, batches[3:])
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("kw, match", [
    ({"clip": "global", "max_norm": 1.0}, (r"Invalid clip: 'global'; clipping by the global gradient norm needs "
                                          r"every gradient.*Allowed: 'per_tensor'")),
    ({"clip": "norm"}, r"Invalid clip: 'norm'; allowed: None, 'per_tensor', 'previous'"),
    ({"clip": "per_tensor"}, r"Invalid max_norm: None; clip='per_tensor' needs a finite number > 0"),
    ({"max_norm": 1.0}, r"Invalid max_norm: 1.0 without clip"),
    ({"accumulation_steps": 0}, r"Invalid accumulation_steps: 0; allowed: an int >= 1"),
])
def test_bad_arguments_are_clear_errors_and_leave_no_hook(kw, match):
    model = _model()
    opt = blockopt.AdamMini(model, **KW)
    with pytest.raises(ValueError, match=match):
        blockopt.step_in_backward(opt, **kw)
    assert opt._backward is None
    before = [p.detach().clone() for p in model.parameters()]
    _loss(model, token_batches(96, 1)[0]).backward()  # no hook: backward steps nothing
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


def test_a_closure_a_second_handle_and_other_optimizers_are_refused():
    model = _model()
    opt = blockopt.AdamMini(model, **KW)
    blockopt.step_in_backward(opt)
    with pytest.raises(ValueError, match=r"a closure cannot be used with step_in_backward"):
        opt.step(lambda: _loss(model, token_batches(96, 1)[0]))
    with pytest.raises(ValueError, match=r"already steps in backward"):
        blockopt.step_in_backward(opt)
    with pytest.raises(TypeError, match=r"opt must be a blockopt.AdamMini, got AdamW"):
        blockopt.step_in_backward(torch.optim.AdamW(model.parameters()))
    with pytest.raises(ValueError, match=r"calibrate=N is not supported"):
        blockopt.step_in_backward(blockopt.AdamMini(_model(), calibrate=4))


def test_the_bench_takes_step_in_backward_as_an_option_and_steps_in_backward():
    from blockopt.bench.errors import BenchInputError
    from blockopt.bench.optimizers import Hyper, parse_optimizer

    choice = parse_optimizer("adam-mini-default:step_in_backward=true")
    assert choice.options == {"step_in_backward": True} and choice.hyper(Hyper()).step_in_backward
    with pytest.raises(BenchInputError, match=r"adam-mini-default:step_in_backward='yes please'; expected true or "
                                              r"false"):
        parse_optimizer("adam-mini-default:step_in_backward=yes please")
    with pytest.raises(BenchInputError, match=r"adamw has no option 'step_in_backward'|step_in_backward"):
        parse_optimizer("adamw:step_in_backward=true")
