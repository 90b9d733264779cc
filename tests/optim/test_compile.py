"""``torch.compile`` of a function that calls ``opt.step()``: one graph (``fullgraph=True``) holding the
route's operations, equal to the eager step, no recompiles when ``lr`` changes; the fused C++ kernel as
the custom op ``torch.ops.blockopt.adam_mini_step``; the steps that cannot be captured say so once.

Graphs are recorded by a backend that keeps Dynamo's FX graph and runs it through ``aot_eager``
(AOTAutograd's functionalization, no code generation), so the mutating custom op is exercised as
Inductor would receive it, without compiling C++ on the test machine.
"""

from __future__ import annotations

import copy
import logging
import warnings

import pytest
import torch
from conftest import TOL, max_rel_diff

import blockopt
from blockopt.kernels import load_cpu_kernel
from blockopt.kernels import momentum as mom
from blockopt.kernels.adam_mini_cpu import cpu_kernel_error, fused_cpu_tables
from blockopt.kernels.blocks import Geometry
from blockopt.models import build_model
from blockopt.optim import compiled

#: every block kind on the CPU routes: rows, heads, whole tensors, columns, per-element
OVERRIDES = {r"blocks\.0\.mlp\.proj\.weight": "column", r"blocks\.0\.mlp\.fc\.weight": "element"}
ROUTES = {"reference": {"foreach": False}, "foreach": {"fused": False}, "fused": {}}
STEPS = 4
_WORRYING = ("lru_cache", "blockopt", "graph break", "skipp", "recompil", "fall back", "falling back", "eager")
needs_kernel = pytest.mark.skipif(load_cpu_kernel() is None, reason=f"no C++ kernel: {cpu_kernel_error()}")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # every test compiles its own step: no cache entries carried over
    compiled._warned.clear()
    yield
    torch._dynamo.reset()


def _model() -> torch.nn.Module:
    return build_model("llama-tiny", n_layers=1, seed=0, vocab_size=32, d_model=32, n_heads=4, n_kv_heads=2, d_ff=48,
                       max_seq_len=16)


def _pair(overrides=OVERRIDES, **kw):
    """Two identical models with an optimizer each: one to compile, one to step eagerly."""
    model = _model()
    ref = copy.deepcopy(model)
    mk = lambda m: blockopt.AdamMini(m, rules="official", overrides=overrides, weight_decay=0.1,
                                     **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
    return model, mk(model), ref, mk(ref)


def _batches(n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 32, (2, 9), generator=g) for _ in range(n)]


def _backward(model, opt, tokens) -> None:
    opt.zero_grad()
    model(tokens[:, :-1], tokens[:, 1:]).backward()


class Recorder:
    """A ``torch.compile`` backend: keeps each FX graph Dynamo hands over, then runs it through aot_eager."""

    def __init__(self) -> None:
        self.graphs: list[torch.fx.GraphModule] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        self.graphs.append(gm)
        return aot_eager(gm, example_inputs)

    def targets(self) -> list[str]:
        """What the one recorded graph calls: ``torch._foreach_mul_``, ``Tensor.lerp_``, ``blockopt::adam_mini_step``..."""
        assert len(self.graphs) == 1, f"expected one graph, got {len(self.graphs)}"
        return [_name(n) for n in self.graphs[0].graph.nodes if n.op in ("call_function", "call_method")]


def _name(node: torch.fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    if isinstance(node.target, torch._ops.OpOverloadPacket):
        return node.target._qualified_op_name  # namespace::name
    if isinstance(node.target, torch._ops.OpOverload):
        return node.target._schema.name
    return f"torch.{getattr(node.target, '__name__', str(node.target))}"


def _assert_same_state(model, opt, ref, eager, tol: float, momentum_tol: float | None = None) -> None:
    """Parameters and state within ``tol`` (relative to each tensor's largest value), moments within
    ``momentum_tol`` when given. The compiled foreach step folds the step size into the denominators, so
    it rounds differently from the eager one (~1e-7); with compact momentum that noise can flip a
    stochastic rounding, which moves a stored value by a code step and the parameter with it."""
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert max_rel_diff(p, q) <= tol, name
        s, t = opt.state[p], eager.state[q]
        assert torch.equal(s["step"], t["step"]), name
        assert max_rel_diff(mom.decode(s["exp_avg"], s.get("exp_avg_scale")),
                            mom.decode(t["exp_avg"], t.get("exp_avg_scale"))) <= (momentum_tol or tol), name
        assert max_rel_diff(s["block_exp_avg_sq"], t["block_exp_avg_sq"]) <= max(tol, momentum_tol or tol), name


# --- one graph, the route's operations, eager results, no recompile when lr changes ----------------------
CASES = {
    "reference": ({**ROUTES["reference"]}, {"reference"}),
    "foreach": ({**ROUTES["foreach"]}, {"foreach"}),
    "fused": ({}, {"fused_cpu"}),
    "fused-bf16": ({"momentum_dtype": torch.bfloat16}, {"fused_cpu"}),  # the kernel stores bf16 momentum itself
}


@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_is_one_graph_of_the_route_equal_to_eager_without_recompiles(case, caplog):
    kw, routes = CASES[case]
    if "fused_cpu" in routes and load_cpu_kernel() is None:
        pytest.skip(f"no C++ kernel: {cpu_kernel_error()}")
    # a tensor lr, changed after every step as a scheduler does: the compiled step reads it as an input
    model, opt, ref, eager = _pair(lr=torch.tensor(3e-3), **kw)
    rec = Recorder()

    @torch.compile(backend=rec, fullgraph=True)  # any graph break is an error
    def step():
        opt.step()

    with (torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings(record=True) as caught,
          caplog.at_level(logging.WARNING, logger="torch")):
        warnings.simplefilter("always")
        for tokens in _batches(STEPS):
            for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
                _backward(m, o, tokens)
                fn()
                o.param_groups[0]["lr"].mul_(0.7)
    # no warning from Dynamo (lru_cache, skipped frames, recompiles) or from blockopt
    said = [str(w.message) for w in caught] + [r.getMessage() for r in caplog.records]
    assert not [m for m in said if any(k in m.lower() for k in _WORRYING)], said
    targets = rec.targets()
    assert set(opt.routes.values()) == routes
    if case == "foreach":
        assert {"torch._foreach_mul_", "torch._foreach_addcmul_", "torch._foreach_sqrt"} <= set(targets), targets
        assert "Tensor.lerp_" not in targets
    elif case == "reference":  # the plain loop: per-tensor methods, no multi-tensor ops
        assert {"Tensor.lerp_", "Tensor.index_add_", "Tensor.copy_"} <= set(targets), targets
        assert not [t for t in targets if "_foreach_" in t], targets
    else:  # the whole step is the custom op: one node, nothing else computed around it
        assert targets.count("blockopt::adam_mini_step") == 1, targets
        arithmetic = [t for t in targets if t.startswith("Tensor.") or "_foreach_" in t]
        assert not arithmetic, targets
    # the eager fused step sends per-element blocks through torch's fused AdamW, the compiled one
    # through the C++ kernel: the same arithmetic up to float32 rounding
    _assert_same_state(model, opt, ref, eager, tol=1e-5)


@needs_kernel
def test_int8_momentum_on_the_kernel_compiles_to_the_op_and_equals_eager_exactly():
    # no per-element blocks (int8 codes need rows): every tensor takes the kernel, compiled or not
    model, opt, ref, eager = _pair(overrides={r"blocks\.0\.mlp\.proj\.weight": "column"}, lr=torch.tensor(3e-3),
                                   momentum_dtype="int8")
    rec = Recorder()

    @torch.compile(backend=rec, fullgraph=True)
    def step():
        opt.step()

    with torch._dynamo.config.patch(error_on_recompile=True):
        for tokens in _batches(STEPS):
            for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
                _backward(m, o, tokens)
                fn()
    assert set(opt.routes.values()) == {"fused_cpu"}
    assert rec.targets().count("blockopt::adam_mini_step") == 1
    assert any(s["exp_avg"].dtype == torch.int8 for s in opt.state.values())
    for p, q in zip(model.parameters(), ref.parameters()):  # the same kernel on the same inputs
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_scale", "block_exp_avg_sq", "step"):
            if key in opt.state[p]:
                assert torch.equal(opt.state[p][key], eager.state[q][key]), key


def test_compact_momentum_around_foreach_is_captured_with_fullgraph():
    # the codec seeds its stochastic rounding from the step counter (.item()), which fullgraph=True
    # captures; the step still says once that a default compile would break there
    model, opt, ref, eager = _pair(lr=torch.tensor(3e-3), momentum_dtype=torch.bfloat16, **ROUTES["foreach"])
    rec = Recorder()

    @torch.compile(backend=rec, fullgraph=True)
    def step():
        opt.step()

    with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens in _batches(STEPS):
            for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
                _backward(m, o, tokens)
                fn()
    assert set(opt.routes.values()) == {"foreach"}
    assert "torch._foreach_mul_" in rec.targets()
    ours = [str(w.message) for w in caught if str(w.message).startswith("blockopt: torch.compile")]
    assert len(ours) == 1 and "foreach route with momentum_dtype='bf16'" in ours[0], ours
    _assert_same_state(model, opt, ref, eager, tol=2e-3, momentum_tol=TOL[torch.bfloat16])


def test_a_float_lr_that_changes_costs_one_recompile_then_stays_dynamic():
    model, opt, ref, eager = _pair(lr=3e-3, **ROUTES["foreach"])
    rec = Recorder()

    @torch.compile(backend=rec, fullgraph=True)
    def step():
        opt.step()

    for tokens in _batches(STEPS):
        for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
            _backward(m, o, tokens)
            fn()
            o.param_groups[0]["lr"] *= 0.7
    # the first value is a constant of the first graph; the first change makes lr a symbolic input
    # (one recompile), and later changes need none
    assert len(rec.graphs) == 2
    _assert_same_state(model, opt, ref, eager, tol=1e-5)


def test_with_a_torch_lr_scheduler_the_step_is_one_graph():
    # torch's schedulers wrap opt.step in a function that Dynamo never traces (torch's own optimizers
    # too), so the caller's frame breaks there; the step itself is still captured once, whatever lr is
    model, opt, ref, eager = _pair(lr=torch.tensor(3e-3), **ROUTES["foreach"])
    scheds = [torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.7) for o in (opt, eager)]
    rec = Recorder()

    @torch.compile(backend=rec)
    def step():
        opt.step()

    for tokens in _batches(STEPS):
        for m, o, fn, sched in ((model, opt, step, scheds[0]), (ref, eager, eager.step, scheds[1])):
            _backward(m, o, tokens)
            fn()
            sched.step()
    assert "torch._foreach_mul_" in rec.targets()
    assert opt.param_groups[0]["lr"].item() == pytest.approx(3e-3 * 0.7**STEPS)
    _assert_same_state(model, opt, ref, eager, tol=1e-5)


def test_state_changes_between_compiled_steps_are_seen():
    """A parameter without a gradient, a loaded state: the compiled step follows them, as eager does."""
    model, opt, ref, eager = _pair(lr=torch.tensor(3e-3))  # the fused route where there is a kernel: quick to trace

    @torch.compile(backend="eager", fullgraph=True)
    def step():
        opt.step()

    saved = None
    for i, tokens in enumerate(_batches(4)):
        for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
            _backward(m, o, tokens)
            if i == 1:
                m.blocks[0].ln_1.weight.grad = None
            fn()
        if i == 0:
            saved = [copy.deepcopy(x.state_dict()) for x in (opt, eager, model, ref)]
        if i == 2:
            for x, sd in zip((opt, eager, model, ref), saved):
                x.load_state_dict(sd)
    # step 0, none at step 1, step 2; back to the state after step 0, then step 3
    assert opt.state[model.blocks[0].ln_1.weight]["step"].item() == 2
    # the moments follow the gradients of parameters 1e-6 apart over more steps; some nearly cancel
    _assert_same_state(model, opt, ref, eager, tol=1e-5, momentum_tol=1e-4)


# --- the fused kernel as a custom op --------------------------------------------------------------------
@needs_kernel
def test_the_custom_op_declares_what_it_mutates():
    """torch.library.opcheck: the schema's mutations match what the kernel writes (int8 scales too), the
    fake implementation and AOTAutograd's functionalization agree with the real kernel."""
    torch.manual_seed(0)
    shapes = [(4, 8), (8,), (6, 512), (8, 6)]
    geos = [Geometry(0, ((4, 1),)), Geometry(-1, ((8, 1),)), Geometry(0, ((6, 2),)), Geometry(1, ((6, 3),))]
    exp_avgs = [torch.zeros(4, 8), torch.zeros(8, dtype=torch.bfloat16), torch.zeros(6, 512, dtype=torch.int8),
                torch.zeros(8, 6)]
    scales = [None, None, torch.zeros(mom.scale_shape((6, 512))), None]
    tables = fused_cpu_tables(shapes, geos, [True, False, True, True], exp_avgs, scales, [1, 2, 3, 4])
    args = ([torch.randn(s) for s in shapes], [torch.randn(s) for s in shapes], exp_avgs,
            [torch.zeros(g.num_blocks) for g in geos], [torch.zeros(()) for _ in shapes], tables.table, tables.decay,
            torch.tensor(1e-2, dtype=torch.float64), 0.9, 0.999, 1e-8, 0.1, False, tables.kinds,
            [s if s is not None else torch.empty(0) for s in scales], tables.seeds, tables.colmaps)
    result = torch.library.opcheck(torch.ops.blockopt.adam_mini_step.default, args)
    assert set(result.values()) == {"SUCCESS"}, result
    torch.ops.blockopt.adam_mini_step(*args)  # opcheck steps copies; the op itself writes in place
    assert [s.item() for s in args[4]] == [1.0] * 4 and args[14][2].abs().sum() > 0  # counters, int8 scales


@needs_kernel
def test_the_eager_step_calls_the_kernel_directly_and_the_compiled_step_the_op():
    model, opt, _, _ = _pair(lr=torch.tensor(3e-3))
    tokens = _batches(1)[0]

    def ops_in(fn) -> set[str]:
        _backward(model, opt, tokens)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            fn()
        return {e.name for e in prof.events()}

    assert "blockopt::adam_mini_step" not in ops_in(opt.step)  # no dispatcher between Python and the kernel
    assert opt.routes["blocks.0.mlp.fc.weight"] == "fused_cpu"  # per-element, in the group's one launch
    assert "blockopt::adam_mini_step" in ops_in(torch.compile(opt.step, backend="aot_eager", fullgraph=True))
    assert opt.routes["blocks.0.mlp.fc.weight"] == "fused_cpu"  # per-element blocks too: one op per group


# --- what cannot be captured says so once -----------------------------------------------------------------
def test_compact_momentum_around_the_foreach_route_warns_once_and_steps_right():
    model, opt, ref, eager = _pair(lr=3e-3, momentum_dtype=torch.bfloat16, **ROUTES["foreach"])

    @torch.compile(backend="eager")
    def step():
        opt.step()

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for tokens in _batches(2):
            for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
                _backward(m, o, tokens)
                fn()
    ours = [str(w.message) for w in caught if str(w.message).startswith("blockopt: torch.compile")]
    assert len(ours) == 1, ours
    assert "the foreach route with momentum_dtype='bf16'" in ours[0] and "momentum_dtype=None" in ours[0]
    _assert_same_state(model, opt, ref, eager, tol=2e-3, momentum_tol=TOL[torch.bfloat16])


def test_fsdp2_step_warns_once_and_steps_right():
    import socket

    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        model, opt, ref, eager = _pair(lr=3e-3)
        fully_shard(model)
        opt = blockopt.AdamMini(model, rules="official", overrides=OVERRIDES, weight_decay=0.1, lr=3e-3)

        @torch.compile(backend="eager")
        def step():
            opt.step()

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for tokens in _batches(2):
                for m, o, fn in ((model, opt, step), (ref, eager, eager.step)):
                    _backward(m, o, tokens)
                    fn()
        ours = [str(w.message) for w in caught if str(w.message).startswith("blockopt: torch.compile")]
        assert len(ours) == 1 and "FSDP2 (DTensor) step" in ours[0], ours
        for p, q in zip(model.parameters(), ref.parameters()):
            assert max_rel_diff(p.full_tensor(), q) <= 1e-5
    finally:
        dist.destroy_process_group()


def test_the_reasons_name_calibration_and_zero():
    """The reasons the step gives (the DeepSpeed ZeRO step needs deepspeed: its layout stands in)."""
    model = _model()
    opt = blockopt.AdamMini(model, rules="official", calibrate=3)
    assert [k for k, _ in compiled.not_compiled_reasons(opt)] == ["calibrate"]
    assert "calibrate=3" in compiled.not_compiled_reasons(opt)[0][1]
    plain = blockopt.AdamMini(model)
    assert compiled.not_compiled_reasons(plain) == []
    plain._zero = {model.norm.weight: None}
    (key, message), = compiled.not_compiled_reasons(plain)
    assert key == "zero" and "DeepSpeed ZeRO step" in message and "leave opt.step() uncompiled" in message
