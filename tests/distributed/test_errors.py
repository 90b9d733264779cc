"""Clear errors for DTensor misuse, and FSDP2 at world size 1, in this process (gloo, one rank)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from conftest import max_rel_diff
from dist_helpers import OPT_KW, OVERRIDES, batches, free_port, make_optimizer, shard, snapshot, tiny_model, train_steps

import blockopt
from blockopt.models import build_model


@pytest.fixture
def world1():
    """A one-rank gloo process group in the test process, destroyed afterwards."""
    assert not dist.is_initialized()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_fsdp2_at_world_size_1_equals_plain_training(world1):
    model = shard(tiny_model())
    opt = make_optimizer(model)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    assert len(opt._dtensors) == len(list(model.parameters()))
    plain = tiny_model()
    plain_opt = make_optimizer(plain)
    train_steps(model, opt, batches()[:3])
    train_steps(plain, plain_opt, batches()[:3])
    got, want = snapshot(model, opt), snapshot(plain, plain_opt)
    for name in want:
        for key in ("param", "exp_avg", "block_exp_avg_sq"):
            assert max_rel_diff(got[name][key], want[name][key]) <= 1e-12, (name, key)


def test_plan_that_does_not_match_the_sharded_model_names_the_parameter(world1):
    model = shard(tiny_model())
    other = build_model("llama-tiny", n_layers=1, n_heads=6, n_kv_heads=1, d_model=24, vocab_size=71)
    with pytest.raises(ValueError, match=r"parameter 'embed\.weight' has shape \[67, 24\] but the plan entry has "
                                         r"\[71, 24\]"):
        blockopt.AdamMini(model.named_parameters(), plan=blockopt.partition(other), **OPT_KW)
    # the plan of the unsharded model is the plan of the sharded one: global shapes
    assert blockopt.partition(tiny_model(), overrides=OVERRIDES) == make_optimizer(model).plan


def test_dtensor_parameters_without_a_process_group_are_explained(world1):
    model = shard(tiny_model())
    opt = make_optimizer(model)
    train_steps(model, opt, batches()[:1])
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    dist.destroy_process_group()
    with pytest.raises(RuntimeError, match=r"is a DTensor .* torch.distributed is not initialised"):
        opt.step()
    with pytest.raises(RuntimeError, match=r"parameter 'embed\.weight' is a DTensor .* not initialised"):
        make_optimizer(model)


def test_unsupported_placement_is_named(world1):
    from torch.distributed.tensor import DTensor, Partial, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    model = torch.nn.Linear(4, 4, bias=False)
    model.weight = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
    with pytest.raises(ValueError, match=r"Invalid placement of parameter 'weight': \(Partial\(sum\),\); "
                                         r"AdamMini supports Shard\(d\) .* not Partial\(\)"):
        blockopt.AdamMini(model, rules="official")


def test_fsdp2_sharding_another_dimension_steps_as_one_process(world1):
    """FSDP2's shard_placement_fn with Shard(1): once refused, now the box layout of tensor parallel."""
    from torch.distributed.tensor import Shard

    model = shard(tiny_model(), shard_placement_fn=lambda p: Shard(1) if p.dim() == 2 else None)
    assert tuple(model.embed.weight.placements) == (Shard(1),)
    opt = make_optimizer(model)
    train_steps(model, opt, batches()[:3])
    plain = tiny_model()
    plain_opt = make_optimizer(plain)
    train_steps(plain, plain_opt, batches()[:3])
    got, want = snapshot(model, opt), snapshot(plain, plain_opt)
    for name in want:
        for key in ("param", "exp_avg", "block_exp_avg_sq"):
            assert max_rel_diff(got[name][key], want[name][key]) <= 1e-12, (name, key)


def test_replicated_dtensor_parameters_use_the_plain_step(world1):
    from torch.distributed.tensor import Replicate, distribute_tensor, init_device_mesh

    mesh = init_device_mesh("cpu", (1,))
    model, plain = tiny_model(), tiny_model()
    replicated = {}  # keep the tied embedding / output head one parameter
    for mod in model.modules():
        for n, p in list(mod.named_parameters(recurse=False)):
            if p not in replicated:
                replicated[p] = torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [Replicate()]))
            mod.register_parameter(n, replicated[p])
    assert all(tuple(p.placements) == (Replicate(),) for p in model.parameters())
    opt, plain_opt = make_optimizer(model), make_optimizer(plain)
    assert opt._dtensors and all(info is None for info in opt._dtensors.values())
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        for p, q in zip(model.parameters(), plain.parameters()):
            g = torch.randn(q.shape, generator=gen, dtype=q.dtype)
            q.grad = g
            p.grad = distribute_tensor(g.clone(), mesh, [Replicate()])
        opt.step()
        plain_opt.step()
    got, want = snapshot(model, opt), snapshot(plain, plain_opt)
    for name in want:
        for key in ("param", "exp_avg", "block_exp_avg_sq"):
            assert max_rel_diff(got[name][key], want[name][key]) <= 1e-12, (name, key)


def test_the_default_plan_factored_matrices_are_refused_on_dtensors_with_the_argument_that_works(world1):
    """AdamMini(model)'s factored matrices have no sharded step yet: a clear error at construction, naming
    rules='blocks', and nothing changes; rules='blocks' then trains."""
    model = shard(tiny_model())
    before = [p.detach().full_tensor().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"Invalid plan for '.+\.weight': its second moment is factored \(the default "
                                         r"for matrices\), which is not supported yet when the parameter is a DTensor "
                                         r"\(FSDP2\); build the optimizer with rules='blocks'"):
        blockopt.AdamMini(model, lr=1e-3)
    assert all(torch.equal(a, p.detach().full_tensor()) for a, p in zip(before, model.parameters()))
    opt = blockopt.AdamMini(model, lr=1e-3, rules="blocks")
    assert not any(e.kind == "factored" for e in opt.plan.entries)
    train_steps(model, opt, batches()[:1])
