"""Helpers for the distributed tests: spawn gloo process groups on CPU, tiny models, worker bodies.

Imported by name (``from dist_helpers import ...``): a ``conftest.py`` here would
shadow ``tests/conftest.py``. Workers run in processes started with the
``spawn`` method, which re-import this module; each one writes what the tests
check into files under ``out`` (rank 0 only where all ranks hold the same
thing), and the tests compare those with a single-process run.
"""

from __future__ import annotations

import os
import socket
import traceback
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
import torch.nn.functional as F

import blockopt
from blockopt.models import build_model

#: 6 query heads of 4 rows (24 rows: heads split across 4 ranks), one KV head of 4 rows (an empty shard
#: at 3 ranks), an odd vocabulary (67 rows), one column-blocked and one per-element weight
MODEL_KW = {"n_heads": 6, "n_kv_heads": 1, "d_model": 24, "vocab_size": 67, "max_seq_len": 32}
OVERRIDES = {r"blocks\.\d+\.mlp\.proj\.weight": "column", r"blocks\.\d+\.mlp\.fc\.weight": "element"}
# the official rules: these tests check the sharded step's exactness on blocks they choose (OVERRIDES);
# AdamMini's default plan runs under FSDP2 in worker_snr's in-budget window
OPT_KW = {"lr": 3e-3, "betas": (0.9, 0.95), "weight_decay": 0.1, "rules": "official"}
GLOBAL_BATCH, SEQ, STEPS = 12, 16, 10


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_model(n_layers: int = 1, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.nn.Module:
    """float64 by default: one process and N processes then differ by ~1e-13, so a 1e-6 tolerance
    separates rounding from mistakes (in float32 the order of the gradient reduction alone moves
    per-element Adam parameters by ~1e-6 relative after 10 steps, with DDP as with FSDP2)."""
    return build_model("llama-tiny", n_layers=n_layers, seed=seed, **MODEL_KW).to(dtype)


def make_optimizer(model: torch.nn.Module, **kw: Any) -> blockopt.AdamMini:
    return blockopt.AdamMini(model, overrides=OVERRIDES, **{**OPT_KW, **kw})


def batches(n: int = STEPS) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, MODEL_KW["vocab_size"], (GLOBAL_BATCH, SEQ), generator=g) for _ in range(n)]


def local_batch(x: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    per = x.shape[0] // world
    return x[rank * per:(rank + 1) * per]


def train_steps(model, opt, xs, rank: int = 0, world: int = 1, on_step=None) -> None:
    """Data parallel: rank ``r`` of ``world`` takes its share of each global batch. The loss is computed
    in the model's dtype (the built-in model's own loss up-casts logits to float32 only)."""
    for i, x in enumerate(xs):
        xb = local_batch(x, rank, world)
        opt.zero_grad()
        logits = model(xb)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb.reshape(-1)).backward()
        if on_step is None:
            opt.step()
        else:
            on_step(i, opt.step)


def snapshot(model, opt) -> dict[str, dict[str, torch.Tensor]]:
    """Full (gathered) parameters and every state tensor (step, exp_avg in its stored form,
    block_exp_avg_sq, exp_avg_scale for int8 momentum) by parameter name. Collective for sharded models."""
    sd = opt.state_dict()
    names = [n for g in sd["param_groups"] for n in g["param_names"]]
    params = dict(model.named_parameters())
    full = lambda t: t.full_tensor() if hasattr(t, "full_tensor") else t
    return {name: {"param": full(params[name].detach()).clone(),
                   **{k: full(v).clone() for k, v in sd["state"][i].items()}}
            for i, name in enumerate(names)}


def single_process_run(n_steps: int = STEPS, n_layers: int = 1,
                       dtype: torch.dtype = torch.float64) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_model(n_layers, dtype=dtype)
    opt = make_optimizer(model)
    train_steps(model, opt, batches()[:n_steps])
    return snapshot(model, opt)


def save_single_process_checkpoint(path: Path, n_steps: int = 5) -> None:
    """torch.save of a plain (one-process) model and optimizer after ``n_steps``."""
    model = tiny_model()
    opt = make_optimizer(model)
    train_steps(model, opt, batches()[:n_steps])
    torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, path)


def shard(model, **kw):
    from torch.distributed.fsdp import fully_shard

    for block in model.blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
    return model


# --- spawning ---------------------------------------------------------------------------------

def _entry(rank: int, fn_name: str, world: int, port: int, args: tuple) -> None:
    import faulthandler

    faulthandler.enable()  # a C++ abort in a worker still shows where Python was
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from blockopt.distributed import launch

    launch.init_distributed(device="cpu")
    try:
        globals()[fn_name](rank, world, *args)
    except BaseException:
        Path(args[0], f"error-{fn_name}-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        launch.cleanup()
    launch.exit_process(0)  # no interpreter teardown with gloo threads alive (see exit_process)


def spawn(fn_name: str, world: int, out: Path, *args: Any) -> None:
    """Run worker ``fn_name(rank, world, out, *args)`` in ``world`` processes joined by gloo.

    A worker that raises fails the call with its traceback. A finished worker leaves
    through ``launch.exit_process``, which avoids the known abort at interpreter
    teardown ("terminate called without an active exception"). A worker still killed
    by a signal before any Python error gets one retry on a fresh port, with a
    warning; a second crash fails.
    """
    out.mkdir(parents=True, exist_ok=True)
    for attempt in (1, 2):
        try:
            mp.start_processes(_entry, args=(fn_name, world, free_port(), (str(out), *args)), nprocs=world,
                               start_method="spawn")
            return
        except Exception as e:
            errors = "\n".join(p.read_text() for p in sorted(out.glob(f"error-{fn_name}-*.txt")))
            crashed = isinstance(e, mp.ProcessExitedException) and e.signal_name is not None and not errors
            if crashed and attempt == 1:
                warnings.warn(f"worker {fn_name} at world size {world} crashed ({e}); retrying once", stacklevel=2)
                continue
            raise AssertionError(f"worker {fn_name} at world size {world} failed:\n{errors or e}") from e


# --- workers ----------------------------------------------------------------------------------

def _comm_counts(fn) -> dict[str, int]:
    from torch.distributed.tensor.debug import CommDebugMode

    with CommDebugMode() as mode:
        fn()
    return {str(k): v for k, v in mode.get_comm_counts().items()}


def worker_world2(rank: int, world: int, out: str) -> None:
    """FSDP2 (with a DCP checkpoint after 5 steps and collective counts), DDP, FSDP2 + CPU offload."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict
    from torch.distributed.fsdp import CPUOffloadPolicy
    from torch.nn.parallel import DistributedDataParallel as DDP

    out = Path(out)
    xs = batches()
    results: dict[str, Any] = {}

    # FSDP2, 1 layer: count collectives in every step, checkpoint after step 5
    model = shard(tiny_model(1))
    opt = make_optimizer(model)
    counts = []

    def on_step(i, step):
        counts.append(_comm_counts(step))
        if i == 4:
            dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                     checkpoint_id=str(out / "ckpt"))

    train_steps(model, opt, xs, rank, world, on_step)
    results["fsdp"] = snapshot(model, opt)
    results["counts_1_layer"] = counts
    results["params_1_layer"] = sum(1 for _ in model.parameters())
    results["counts_state_dict"] = _comm_counts(opt.state_dict)

    # FSDP2, 3 layers in two parameter groups: the same number of collectives per step
    model3 = shard(tiny_model(3))
    named = list(model3.named_parameters())
    opt3 = blockopt.AdamMini([{"params": [(n, p) for n, p in named if ".attn." in n], "lr": 1e-3},
                              {"params": [(n, p) for n, p in named if ".attn." not in n]}],
                             plan=blockopt.partition(model3, overrides=OVERRIDES), **OPT_KW)
    results["groups_3_layers"] = len(opt3.param_groups)
    counts3 = []
    train_steps(model3, opt3, xs[:2], rank, world, lambda i, step: counts3.append(_comm_counts(step)))
    results["counts_3_layers"] = counts3
    results["params_3_layers"] = sum(1 for _ in model3.parameters())
    results["shared_3_layers"] = sum(i.layout.num_shared for i in opt3._dtensors.values() if i is not None)
    results["shared_1_layer"] = sum(i.layout.num_shared for i in opt._dtensors.values() if i is not None)

    # DDP: plain tensors, gradients averaged by DDP; AdamMini unchanged
    ddp = DDP(tiny_model(1))
    opt_ddp = make_optimizer(ddp.module)
    train_steps(ddp, opt_ddp, xs, rank, world)
    results["ddp"] = snapshot(ddp.module, opt_ddp)

    # FSDP2 with CPUOffloadPolicy (pin_memory needs an accelerator: off on a CPU-only machine)
    off = shard(tiny_model(1, dtype=torch.float32), offload_policy=CPUOffloadPolicy(pin_memory=False))
    opt_off = make_optimizer(off)
    train_steps(off, opt_off, xs, rank, world)
    results["offload"] = snapshot(off, opt_off)

    if rank == 0:
        torch.save(results, out / "world2.pt")


def worker_fsdp(rank: int, world: int, out: str, resume_from: str | None = None,
                plain_checkpoint: str | None = None) -> None:
    """FSDP2 for 10 steps; with ``resume_from``: also load that DCP checkpoint (step 5) and train 5 more,
    and try loading it into an optimizer with a different plan; with ``plain_checkpoint``: the same from
    a single-process ``torch.save`` checkpoint (step 5) through ``load_state_dict``."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = Path(out)
    xs = batches()
    results: dict[str, Any] = {}
    model = shard(tiny_model(1))
    opt = make_optimizer(model)
    train_steps(model, opt, xs, rank, world)
    results["fsdp"] = snapshot(model, opt)

    if resume_from is not None:
        model = shard(tiny_model(1, seed=123))  # other weights: the checkpoint must supply them
        opt = make_optimizer(model)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=resume_from)
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        results["resumed_step"] = max(s["step"].item() for s in opt.state.values())
        train_steps(model, opt, xs[5:], rank, world)
        results["resumed"] = snapshot(model, opt)

        # a checkpoint from a different plan: fewer blocks for v_proj (blockopt's loader checks the plan
        # before DCP reads tensors), and the same blocks with another weight-decay flag (plain DCP recipe)
        from blockopt.distributed import checkpoint

        other = shard(tiny_model(1))
        try:
            checkpoint.load(resume_from, other, make_optimizer(other, value_single_block=True))
            results["different_blocks_error"] = None
        except ValueError as e:
            results["different_blocks_error"] = str(e)
        no_decay = {**OVERRIDES, r"blocks\.0\.attn\.v_proj\.weight": {"kind": "row", "weight_decay": False}}
        opt_other = blockopt.AdamMini(other, overrides=no_decay, **OPT_KW)
        osd = get_optimizer_state_dict(other, opt_other)
        dcp.load({"optim": osd}, checkpoint_id=resume_from)
        try:
            set_optimizer_state_dict(other, opt_other, osd)
            results["different_decay_error"] = None
        except ValueError as e:
            results["different_decay_error"] = str(e)
    if plain_checkpoint is not None:
        ckpt = torch.load(plain_checkpoint, weights_only=True)
        model = tiny_model(1, seed=123)
        model.load_state_dict(ckpt["model"])
        model = shard(model)
        opt = make_optimizer(model)
        opt.load_state_dict(ckpt["optim"])
        train_steps(model, opt, xs[5:], rank, world)
        results["from_plain"] = snapshot(model, opt)
    if rank == 0:
        torch.save(results, out / f"world{world}.pt")


# --- compact momentum (AdamMini(momentum_dtype=...)) under FSDP2 ------------------------------------

COMPACT = {"bf16": torch.bfloat16, "int8": "int8"}


def single_process_compact_run(fmt: str, n_steps: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    model = tiny_model(dtype=torch.float32)
    opt = make_optimizer(model, momentum_dtype=COMPACT[fmt])
    train_steps(model, opt, batches()[:n_steps])
    return snapshot(model, opt)


def worker_compact(rank: int, world: int, out: str) -> None:
    """FSDP2 with bf16 and int8 momentum (float32 model): 10 steps; and a DCP checkpoint at step 5
    loaded into a fresh sharded model + optimizer, trained to step 10."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    out = Path(out)
    xs = batches()
    results: dict[str, Any] = {}
    for fmt, md in COMPACT.items():
        model = shard(tiny_model(1, dtype=torch.float32))
        opt = make_optimizer(model, momentum_dtype=md)

        def on_step(i, step, model=model, opt=opt, fmt=fmt):
            step()
            if i == 4:
                state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
                dcp.save(state, checkpoint_id=str(out / f"ckpt-{fmt}"))

        train_steps(model, opt, xs, rank, world, on_step=on_step)
        results[fmt] = snapshot(model, opt)
        model = shard(tiny_model(1, seed=123, dtype=torch.float32))
        opt = make_optimizer(model, momentum_dtype=md)
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(state, checkpoint_id=str(out / f"ckpt-{fmt}"))
        set_model_state_dict(model, state["model"])
        set_optimizer_state_dict(model, opt, state["optim"])
        train_steps(model, opt, xs[5:], rank, world)
        results[f"{fmt}-resumed"] = snapshot(model, opt)
    if rank == 0:
        torch.save(results, out / f"compact{world}.pt")


# --- in-run SNR calibration under FSDP2 -------------------------------------------------------------
SNR_KW = {"calibrate": 4, "calibrate_points": 2}
#: the two ways of spending the window: AdamW's state (the official rules' structure), or inside the budget
SNR_MODES = {"adamw": {"calibrate_state": "adamw", "rules": "official"},
             "budget": {"calibrate_state": "budget", "rules": "builtin"}}


def single_process_snr_run(mode: str = "adamw", n_steps: int = STEPS) -> dict[str, Any]:
    model = tiny_model(2)
    opt = make_optimizer(model, **SNR_KW, **SNR_MODES[mode])
    train_steps(model, opt, batches()[:n_steps])
    return {"snapshot": snapshot(model, opt), "plan": opt.plan.to_json(),
            "calibration": opt.calibration.meter.calibration.to_json()}


def worker_snr(rank: int, world: int, out: str) -> None:
    """FSDP2 with AdamMini(calibrate=4), both calibrate_state modes: 10 steps (the switch after step 4),
    DCP checkpoints at step 2 (calibrating) and step 6 (switched), each resumed in a fresh sharded model +
    optimizer to step 10 through blockopt.distributed.checkpoint (which takes the saved phase before DCP
    builds its template)."""
    from blockopt.distributed import checkpoint as ckpt

    out = Path(out)
    xs = batches()
    results: dict[str, Any] = {}
    for mode, kw in SNR_MODES.items():
        model = shard(tiny_model(2))
        opt = make_optimizer(model, **SNR_KW, **kw)

        def on_step(i, step, model=model, opt=opt, mode=mode):
            step()
            if i in (1, 5):
                ckpt.save(out / f"snr-{mode}-ckpt-{i + 1}", model, opt)

        train_steps(model, opt, xs, rank, world, on_step=on_step)
        results[mode] = {"run": {"snapshot": snapshot(model, opt), "plan": opt.plan.to_json(),
                                 "calibration": opt.calibration.meter.calibration.to_json()}}
        for at in (2, 6):
            model = shard(tiny_model(2, seed=123))
            opt = make_optimizer(model, **SNR_KW, **kw)
            ckpt.load(out / f"snr-{mode}-ckpt-{at}", model, opt)
            train_steps(model, opt, xs[at:], rank, world)
            results[mode][f"resumed-{at}"] = {"snapshot": snapshot(model, opt), "plan": opt.plan.to_json()}
    if rank == 0:
        torch.save(results, out / f"snr{world}.pt")


# --- stacked experts (both layouts) under FSDP2 ------------------------------------------------------
def _moe(seed: int = 0) -> torch.nn.Module:
    from conftest import TinyMoE

    return TinyMoE(seed=seed).double()


def single_process_moe_run(n_steps: int = STEPS) -> dict[str, dict[str, torch.Tensor]]:
    model = _moe()
    opt = blockopt.AdamMini(model, **OPT_KW)
    _train_moe(model, opt, batches()[:n_steps])
    return snapshot(model, opt)


def _train_moe(model, opt, xs, rank: int = 0, world: int = 1) -> None:
    for x in xs:
        xb = local_batch(x % 11, rank, world)
        opt.zero_grad()
        model(xb, xb.roll(1, dims=1)).backward()
        opt.step()


def worker_moe(rank: int, world: int, out: str) -> None:
    """FSDP2 over a model with stacked experts ([E, out, in] and [E, in, out], 5 experts: ranks hold
    2, 2 and 1 of them at world 3), 10 steps."""
    from torch.distributed.fsdp import fully_shard

    model = _moe()
    fully_shard(model.experts)
    fully_shard(model.experts_t)
    fully_shard(model)
    opt = blockopt.AdamMini(model, **OPT_KW)
    _train_moe(model, opt, batches(), rank, world)
    result = snapshot(model, opt)
    if rank == 0:
        torch.save(result, Path(out) / f"moe{world}.pt")
        (Path(out) / f"moe{world}-routes.json").write_text(__import__("json").dumps(opt.routes))


# --- DeepSpeed ZeRO (AdamMini as the client optimizer) --------------------------------------------
DS_KW = {"lr": 1e-3, "eps": 1e-5, "weight_decay": 0.1}


def _ds_model(seed: int = 0) -> torch.nn.Module:
    return tiny_model(1, seed=seed, dtype=torch.float32)


def _ds_train(engine, xs, rank: int, world: int) -> None:
    per = GLOBAL_BATCH // world
    for x in xs:
        xb = x[rank * per:(rank + 1) * per]
        logits = engine(xb)
        engine.backward(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), xb.reshape(-1)))
        engine.step()


def single_process_ds_run(n_steps: int = STEPS, adamw: bool = False) -> dict[str, torch.Tensor]:
    model = _ds_model()
    opt = torch.optim.AdamW(model.parameters(), **DS_KW) if adamw else blockopt.AdamMini(model, rules="official", **DS_KW)
    for x in batches()[:n_steps]:
        opt.zero_grad()
        logits = model(x)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), x.reshape(-1)).backward()
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _count_step_all_reduce(engine, opt, xs, rank: int, world: int) -> int:
    """Train on ``xs``, counting the all_reduce calls made inside AdamMini's own ZeRO step."""
    import torch.distributed as dist

    calls = {"n": 0}
    real_step, real_reduce = opt._zero_step, dist.all_reduce

    def counting(*a, **k):
        calls["n"] += 1
        return real_reduce(*a, **k)

    def step_counting():
        dist.all_reduce = counting
        try:
            real_step()
        finally:
            dist.all_reduce = real_reduce

    opt._zero_step = step_counting
    try:
        _ds_train(engine, xs, rank, world)
    finally:
        opt._zero_step = real_step
    return calls["n"]


def import_deepspeed():
    """DeepSpeed on the CPU accelerator, without its shared-memory allreduce extension.

    On first use DeepSpeed probes every op builder (compiler subprocesses) and compiles that C++ op,
    about a minute of CPU on a cold cache and again in every fresh venv (the build is keyed by its
    source path). These tests check AdamMini under ZeRO, not DeepSpeed's transport: with no op
    marked compatible its collectives go through gloo (``deepspeed.comm.torch.build_shm_op``)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__ = {}
    return deepspeed


def worker_deepspeed(rank: int, world: int, out: str, stages: tuple[int, ...], then: str = "") -> None:
    """:func:`_deepspeed_stage` for each of ``stages``, in one set of processes (one start, one import of
    DeepSpeed per rank, whatever the number of stages); then, in the same processes, ``"errors"``
    (:func:`worker_deepspeed_errors`) or ``"reshard:<world>"`` (:func:`worker_deepspeed_reshard` of the
    ZeRO-2 checkpoint that stage 2 saved at that world size)."""
    for stage in stages:
        _deepspeed_stage(rank, world, out, stage)
    if then == "errors":
        worker_deepspeed_errors(rank, world, out)
    elif then.startswith("reshard:"):
        worker_deepspeed_reshard(rank, world, out, checkpoint=f"ckpt{then.split(':')[1]}-2", tag="step5")


def _deepspeed_stage(rank: int, world: int, out: str, stage: int) -> None:
    """ZeRO stage ``stage``: AdamMini and torch's AdamW for 10 steps; with AdamMini also a checkpoint at
    step 5 through engine.save_checkpoint, loaded into a fresh engine and trained to step 10; and the
    collectives AdamMini adds per step."""
    deepspeed = import_deepspeed()

    from blockopt.integrations.deepspeed import attach

    out = Path(out)
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True}
    xs = batches()
    results: dict[str, Any] = {}
    for which in ("adamw", "adam-mini"):
        model = _ds_model()
        opt = torch.optim.AdamW(model.parameters(), **DS_KW) if which == "adamw" else blockopt.AdamMini(model, rules="official", **DS_KW)
        engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
        if which == "adam-mini":
            attach(engine)
            _ds_train(engine, xs[:5], rank, world)
            engine.save_checkpoint(str(out / f"ckpt{world}-{stage}"), tag="step5")
            results["all_reduce_in_one_step"] = _count_step_all_reduce(engine, opt, xs[5:6], rank, world)
            results["shared_blocks"] = sum(layout.buffer_len for layout in opt._zero.values())
            _ds_train(engine, xs[6:], rank, world)
        else:
            _ds_train(engine, xs, rank, world)
        results[which] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    # resume: a fresh engine from other weights, the checkpoint, 5 more steps
    model = _ds_model(seed=123)
    opt = blockopt.AdamMini(model, rules="official", **DS_KW)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach(engine)
    engine.load_checkpoint(str(out / f"ckpt{world}-{stage}"), tag="step5")
    _ds_train(engine, xs[5:], rank, world)
    results["resumed"] = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    results["routes"] = dict(opt.routes)
    if rank == 0:
        torch.save(results, out / f"ds{world}-{stage}.pt")


def worker_deepspeed_errors(rank: int, world: int, out: str) -> None:
    """What a user reads: ZeRO-2 without attach (a clear error at the first step, not a KeyError),
    and attach with optimizer offload (refused, naming it)."""
    deepspeed = import_deepspeed()

    from blockopt.integrations.deepspeed import attach

    messages = {}
    for case in ("no attach", "offload"):
        zero = {"stage": 2, **({"offload_optimizer": {"device": "cpu"}} if case == "offload" else {})}
        cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
               "zero_optimization": zero, "zero_allow_untested_optimizer": True,
               "zero_force_ds_cpu_optimizer": False}  # else DeepSpeed itself refuses a client optimizer
        model = _ds_model()
        engine, *_ = deepspeed.initialize(model=model, optimizer=blockopt.AdamMini(model, rules="official", **DS_KW), config=cfg)
        try:
            if case == "offload":
                attach(engine)
            else:
                _ds_train(engine, batches()[:1], rank, world)
            messages[case] = None
        except Exception as e:  # noqa: BLE001 - the test reads its type and text
            messages[case] = f"{type(e).__name__}: {e}"
    if rank == 0:
        torch.save(messages, Path(out) / "ds-errors.pt")


def worker_deepspeed_reshard(rank: int, world: int, out: str, checkpoint: str, tag: str) -> None:
    """Load a ZeRO-2 checkpoint saved at another world size at this world size."""
    deepspeed = import_deepspeed()

    from blockopt.integrations.deepspeed import attach

    model = _ds_model()
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    opt = blockopt.AdamMini(model, rules="official", **DS_KW)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach(engine)
    before = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    try:
        engine.load_checkpoint(str(Path(out) / checkpoint), tag=tag)
        message = None
    except Exception as e:  # noqa: BLE001 - the test reads its type and text
        message = f"{type(e).__name__}: {e}"
    unchanged = not opt.state and all(torch.equal(a, b) for a, b in zip(before, opt.param_groups[0]["params"]))
    if rank == 0:
        torch.save({"message": message, "optimizer_untouched": unchanged}, Path(out) / "ds-reshard.pt")


def worker_deepspeed_saved_state(rank: int, world: int, out: str, fixture: str) -> None:
    """Load the client state that main saved before the optimizer was reshaped (ZeRO-2, this world
    size; tests/fixtures/make_main_states.py) into a freshly attached AdamMini, then take a step."""
    import copy

    deepspeed = import_deepspeed()

    from blockopt.integrations.deepspeed import attach

    saved = torch.load(fixture, weights_only=True)
    assert saved["world"] == world and saved["stage"] == 2
    cfg = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // world, "gradient_accumulation_steps": 1,
           "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True}
    model = _ds_model()
    opt = blockopt.AdamMini(model, rules="official", **DS_KW)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=cfg)
    attach(engine)
    opt.load_state_dict(saved["ranks"][rank])
    loaded = copy.deepcopy(opt.state_dict())  # a state_dict shares the live state's tensors
    _ds_train(engine, batches()[3:4], rank, world)
    stepped = [s["step"].item() for s in opt.state_dict()["state"].values()]
    torch.save({"saved": saved["ranks"][rank], "loaded": loaded, "stepped": stepped},
               Path(out) / f"ds-saved-{rank}.pt")


# --- tensor parallel (ColwiseParallel / RowwiseParallel), alone and with FSDP2 on a 2-D mesh ----------

#: GQA with heads that divide 2 and 4 ranks; d_ff 64. The official rules with one column-blocked
#: (row-wise split: column blocks across TP ranks) and one per-element weight.
TP_MODEL_KW = {"n_heads": 8, "n_kv_heads": 4, "d_model": 32, "d_ff": 64, "vocab_size": 67, "max_seq_len": 32}


def tp_model(seed: int = 0, dtype: torch.dtype = torch.float64, **kw: Any) -> torch.nn.Module:
    return build_model("llama-tiny", n_layers=1, seed=seed, **{**TP_MODEL_KW, **kw}).to(dtype)


def tensor_parallel(model: torch.nn.Module, tp_mesh, sequence_parallel: bool = False,
                    attention: bool = True) -> torch.nn.Module:
    """torchtitan's plan on the blocks: ColwiseParallel on q/k/v/gate/up, RowwiseParallel on o/down
    (with SequenceParallel on the norms, the residual stream split along the sequence);
    ``attention=False``: the MLP only."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    for block in model.blocks:
        plan: dict[str, Any] = {f"attn.{n}": ColwiseParallel() for n in ("q_proj", "k_proj", "v_proj")}
        plan.update({"mlp.gate_proj": ColwiseParallel(), "mlp.fc": ColwiseParallel(),
                     "attn.o_proj": RowwiseParallel(), "mlp.proj": RowwiseParallel()})
        if sequence_parallel:  # the residual stream split along the sequence inside the block
            seq, full = (Shard(1),), (Replicate(),)
            plan.update({"ln_1": SequenceParallel(), "ln_2": SequenceParallel(),
                         "attn": PrepareModuleInput(input_layouts=seq, desired_input_layouts=full,
                                                    use_local_output=True),
                         "mlp": PrepareModuleInput(input_layouts=seq, desired_input_layouts=full,
                                                   use_local_output=True),
                         "attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
                         "mlp.proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False)})
        if not attention:
            plan = {k: v for k, v in plan.items() if k.startswith("mlp")}
        parallelize_module(block, tp_mesh, plan)
        if sequence_parallel:
            parallelize_module(block, tp_mesh, PrepareModuleInput(input_layouts=full, desired_input_layouts=seq))
            parallelize_module(block, tp_mesh, PrepareModuleOutput(output_layouts=seq, desired_output_layouts=full,
                                                                   use_local_output=True))
    return model


#: OVERRIDES, plus a whole-tensor block on the row-wise split o_proj and blocks of 8 rows on k_proj (two
#: "heads" of 8 rows: each spans two ranks at TP 4, as a KV head does when there are fewer than TP ranks)
TP_OVERRIDES = {**OVERRIDES, r"blocks\.\d+\.attn\.o_proj\.weight": "tensor", r"blocks\.\d+\.attn\.k_proj\.weight": "head:8"}


def make_tp_optimizer(model: torch.nn.Module, **kw: Any) -> blockopt.AdamMini:
    return blockopt.AdamMini(model, overrides=TP_OVERRIDES, **{**OPT_KW, **kw})


def single_process_tp_run(n_steps: int = STEPS, dtype: torch.dtype = torch.float64, model_kw: dict | None = None,
                          **kw: Any) -> dict[str, dict[str, torch.Tensor]]:
    model = tp_model(dtype=dtype, **(model_kw or {}))
    opt = make_tp_optimizer(model, **kw)
    train_steps(model, opt, batches()[:n_steps])
    return snapshot(model, opt)


def _mesh(dp: int, tp: int):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))


def _build_2d(mesh, seed: int = 0, **kw: Any):
    from torch.distributed.fsdp import fully_shard

    model = tensor_parallel(tp_model(seed=seed), mesh["tp"])
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    return model, make_tp_optimizer(model, **kw)


def _train_2d(model, opt, xs, mesh, on_step=None) -> None:
    """Data parallel over mesh dim "dp" (each dp rank its share of the batch); TP ranks see the same."""
    train_steps(model, opt, xs, mesh["dp"].get_local_rank(), mesh["dp"].size(), on_step)


def worker_tp(rank: int, world: int, out: str) -> None:
    """TP alone at ``world`` ranks: 10 steps with fp32 and bf16 momentum, the collectives of a step,
    SequenceParallel norms; at world 2 also int8 momentum (MLP columns on int8's 256-column groups)."""
    from torch.distributed.device_mesh import init_device_mesh

    out_dir = Path(out)
    mesh = init_device_mesh("cpu", (world,))
    xs = batches()
    results: dict[str, Any] = {}
    model = tensor_parallel(tp_model(), mesh)
    opt = make_tp_optimizer(model)
    counts = []
    train_steps(model, opt, xs, on_step=lambda i, step: counts.append(_comm_counts(step)))
    results["tp"] = snapshot(model, opt)
    results["counts"] = counts
    results["placements"] = {n: str(tuple(p.placements)) for n, p in model.named_parameters() if hasattr(p, "placements")}
    results["routes"] = dict(opt.routes)
    model = tensor_parallel(tp_model(dtype=torch.float32), mesh)
    opt = make_tp_optimizer(model, momentum_dtype=torch.bfloat16)
    train_steps(model, opt, xs)
    results["bf16"] = snapshot(model, opt)
    try:
        model = tensor_parallel(tp_model(), mesh, sequence_parallel=True)
        opt = make_tp_optimizer(model)
        train_steps(model, opt, xs)
        results["sp"] = snapshot(model, opt)
        results["sp_placements"] = {n: str(tuple(p.placements)) for n, p in model.named_parameters()
                                    if hasattr(p, "placements")}
    except Exception as e:  # noqa: BLE001 - SequenceParallel where torch cannot run it on CPU: say so
        results["sp_error"] = f"{type(e).__name__}: {e}"
    if world == 2:  # int8: the MLP split (512 columns: 256 a rank); o_proj's 32 columns cannot split so
        model = tensor_parallel(tp_model(dtype=torch.float32, d_ff=512), mesh, attention=False)
        opt = make_tp_optimizer(model, momentum_dtype="int8")
        train_steps(model, opt, xs)
        results["int8"] = snapshot(model, opt)
        try:
            make_tp_optimizer(tensor_parallel(tp_model(dtype=torch.float32), mesh), momentum_dtype="int8")
            results["int8_error"] = None
        except ValueError as e:
            results["int8_error"] = str(e)
    if rank == 0:
        torch.save(results, out_dir / f"tp{world}.pt")


def worker_fsdp_tp(rank: int, world: int, out: str) -> None:
    """FSDP2 + TP on 2-D meshes at world 4: 2x2 (dp x tp) and 4x1 for 10 steps each, with a DCP checkpoint
    after step 5; each checkpoint then resumed on the other layout for the last 5 steps."""
    from blockopt.distributed import checkpoint

    out_dir = Path(out)
    xs = batches()
    results: dict[str, Any] = {}
    for dp, tp in ((2, 2), (4, 1)):
        mesh = _mesh(dp, tp)
        model, opt = _build_2d(mesh)
        counts = []

        def on_step(i, step, model=model, opt=opt, dp=dp, tp=tp, counts=counts):
            counts.append(_comm_counts(step))
            if i == 4:
                checkpoint.save(out_dir / f"ckpt{dp}x{tp}", model, opt)

        _train_2d(model, opt, xs, mesh, on_step)
        results[f"{dp}x{tp}"] = snapshot(model, opt)
        results[f"counts{dp}x{tp}"] = counts
        results[f"placements{dp}x{tp}"] = {n: str(tuple(p.placements)) for n, p in model.named_parameters()}
    for (dp, tp), (sdp, stp) in (((4, 1), (2, 2)), ((2, 2), (4, 1))):
        mesh = _mesh(dp, tp)
        model, opt = _build_2d(mesh, seed=123)  # other weights: the checkpoint must supply them
        checkpoint.load(out_dir / f"ckpt{sdp}x{stp}", model, opt)
        results[f"resumed_step{sdp}x{stp}->{dp}x{tp}"] = max(s["step"].item() for s in opt.state.values())
        _train_2d(model, opt, xs[5:], mesh)
        results[f"{sdp}x{stp}->{dp}x{tp}"] = snapshot(model, opt)
    if rank == 0:
        torch.save(results, out_dir / "fsdp_tp.pt")


def worker_tp_errors(rank: int, world: int, out: str) -> None:
    """What AdamMini refuses under tensor parallel, each with the message (rank 0 writes them)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial

    mesh = init_device_mesh("cpu", (world,))
    errors: dict[str, str | None] = {}

    def attempt(key: str, fn) -> None:
        try:
            fn()
            errors[key] = None
        except ValueError as e:
            errors[key] = str(e)

    attempt("calibrate", lambda: blockopt.AdamMini(tensor_parallel(tp_model(), mesh), calibrate=4, **OPT_KW))
    attempt("factored", lambda: blockopt.AdamMini(tensor_parallel(tp_model(), mesh), lr=1e-3))
    partial = torch.nn.Linear(4, 4, bias=False)
    partial.weight = torch.nn.Parameter(DTensor.from_local(torch.ones(4, 4), mesh, [Partial()]))
    attempt("partial", lambda: blockopt.AdamMini(partial, rules="official"))
    if rank == 0:
        torch.save(errors, Path(out) / "tp_errors.pt")
