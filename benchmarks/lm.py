"""Language-model benchmarks: the training step (with model-FLOPs utilisation), KV-cache
generation, batched generation, and ``torch.compile`` for training and generation.

``quick=True`` shrinks every workload to tiny shapes (a smoke check; the targets are
meant for the full sizes). CUDA, when present: TF32 matmuls and, on the optimized
training side, bf16 autocast.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from benchmarks.core import (
    BenchResult,
    autocast,
    interleaved,
    linear_params,
    method_text,
    pick_device,
    seeded_model,
    setup_device,
    spread,
    timed,
    train_flops_per_token,
)

__all__ = [
    "bench_generate",
    "bench_generate_batched",
    "bench_generate_compile",
    "bench_train_step",
    "bench_train_step_compile",
    "matmul_gflops",
]


_Layers = Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per linear layer: its input x [tokens, in], weight W [out, in], output gradient g."""


def matmul_gflops(
    tokens: int,
    emb_dim: int,
    vocab_size: int,
    n_layers: int,
    *,
    device: torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    repeats: int = 3,
) -> dict[str, float]:
    """Plain matmul GFLOP/s on the matmuls of a GPT training step: for each linear layer
    of a block (weights [3D, D], [D, D], [4D, D], [D, 4D]) and the head ([V, D]), with
    ``x`` its [tokens, in] input and ``g`` the [tokens, out] gradient of its output, the
    forward product x·Wᵀ and the two backward products g·W (input gradient) and gᵀ·x
    (weight gradient), in the layouts autograd hands to the BLAS; weighted like one step
    (``n_layers`` blocks + one head). The attention's batched matmuls (under 4 % of the
    FLOPs at context 256) are not included.

    Returns ``{"gflops": weighted, "block_gflops", "head_gflops", "forward_gflops"}``
    (best of ``repeats``; ``forward_gflops``: the forward products alone, weighted the
    same way)."""
    device = device or pick_device()
    d = emb_dim
    g = torch.Generator(device="cpu").manual_seed(0)

    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def layer(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return mk(tokens, n_in), mk(n_out, n_in), mk(tokens, n_out)  # x, W, g

    block = [layer(d, 3 * d), layer(d, d), layer(d, 4 * d), layer(4 * d, d)]
    head = [layer(d, vocab_size)]

    def flops(layers: _Layers) -> float:  # one product per layer
        return float(sum(2 * x.shape[0] * w.shape[0] * w.shape[1] for x, w, _ in layers))

    def forward(layers: _Layers) -> None:
        for x, w, _ in layers:
            torch.matmul(x, w.t())

    def training(layers: _Layers) -> None:
        for x, w, gout in layers:
            torch.matmul(x, w.t())
            torch.matmul(gout, w)
            torch.matmul(gout.t(), x)

    def best(fn: Callable[[_Layers], None], layers: _Layers) -> float:
        fn(layers)  # warm-up
        return min(timed(lambda: fn(layers), device) for _ in range(repeats))

    f_block, f_head = flops(block), flops(head)
    t_block, t_head = best(training, block), best(training, head)
    tf_block, tf_head = best(forward, block), best(forward, head)
    return {
        "gflops": 3 * (n_layers * f_block + f_head) / (n_layers * t_block + t_head) / 1e9,
        "block_gflops": 3 * f_block / t_block / 1e9,
        "head_gflops": 3 * f_head / t_head / 1e9,
        "forward_gflops": (n_layers * f_block + f_head) / (n_layers * tf_block + tf_head) / 1e9,
    }


def _minor_faults() -> int:
    """Minor page faults of this process so far (0 where getrusage is missing)."""
    try:
        import resource
    except ImportError:  # pragma: no cover - not on Linux/macOS
        return 0
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _train_setup(quick: bool, device: torch.device) -> tuple[Any, int, int]:
    from gpt.architecture import CONFIGS

    cfg = CONFIGS["tiny"] if quick else CONFIGS["gpt2-small-256"]
    batch, seq = (4, 64) if quick else (2, 256)
    if device.type == "cuda" and not quick:
        batch = 16
    return cfg, batch, seq


def _batch(cfg: Any, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    return x[:, :-1], x[:, 1:]


def bench_train_step(quick: bool = False, *, threads: int | None = None) -> BenchResult:
    """Training throughput: explicit attention + a plain for-loop AdamW (baseline) vs the
    default path (SDPA + :func:`gpt.lm_step.make_optimizer`'s fused AdamW, bf16 autocast
    on CUDA). Model-FLOPs utilisation two ways: against the hardware's nominal peak
    (:mod:`benchmarks.peak`) and against plain-matmul GFLOP/s measured in the same rounds."""
    from benchmarks.peak import nominal_peak
    from gpt.args import LMTrainArgs
    from gpt.lm_step import make_optimizer, train_step

    device = pick_device()
    setup_device(device)
    if threads:
        torch.set_num_threads(threads)
    cfg, batch, seq = _train_setup(quick, device)
    repeats = 3 if quick else 5
    base_model = seeded_model(cfg.replace(attention="explicit"), device)
    opt_model = seeded_model(cfg.replace(attention="sdpa"), device)
    opt_model.load_state_dict(base_model.state_dict())
    base_model.train()
    opt_model.train()
    base_opt = torch.optim.AdamW(
        base_model.parameters(), lr=4e-4, weight_decay=0.1, foreach=False, fused=False
    )
    opt_opt = make_optimizer(opt_model, LMTrainArgs())
    inputs, targets = _batch(cfg, batch, seq, device)
    tokens = batch * seq
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mm: list[dict[str, float]] = []

    def base() -> None:
        train_step(base_model, base_opt, inputs, targets)

    faults: list[int] = []

    def opt() -> None:
        before = _minor_faults()
        with autocast(device):
            train_step(opt_model, opt_opt, inputs, targets)
        faults.append(_minor_faults() - before)

    def matmul() -> None:
        mm.append(
            matmul_gflops(
                tokens,
                cfg.emb_dim,
                cfg.vocab_size,
                cfg.n_layers,
                device=device,
                dtype=mm_dtype,
                repeats=2,
            )
        )

    t = interleaved(
        {"baseline": base, "optimized": opt, "matmul": matmul},
        repeats=repeats,
        warmup={"baseline": 1, "optimized": 1, "matmul": 0},
        device=device,
    )
    tps = {k: [tokens / s for s in t.seconds[k]] for k in ("baseline", "optimized")}
    tps_base, tps_opt = tokens / t.median("baseline"), tokens / t.median("optimized")
    flops_per_token = train_flops_per_token(opt_model, cfg.n_layers, cfg.emb_dim, seq)
    achieved = flops_per_token * tps_opt / 1e9
    mm_gflops = float(torch.tensor([m["gflops"] for m in mm]).median())
    peak = nominal_peak(device, "bf16" if device.type == "cuda" else "fp32")
    mfu_peak = achieved / peak["gflops"] if peak["gflops"] else None
    mfu_mm = achieved / mm_gflops
    ratio = tps_opt / tps_base
    return BenchResult(
        name="train_step",
        baseline=tps_base,
        optimized=tps_opt,
        ratio=ratio,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M (context 256)'}, {batch}x{seq} tokens, "
        f"dropout {cfg.drop_rate}",
        baseline_label="explicit attention, plain for-loop AdamW",
        optimized_label="SDPA, fused AdamW" + (", bf16 autocast" if device.type == "cuda" else ""),
        method=method_text(t, "plain-matmul GFLOP/s measured in the same rounds"),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "device": device.type,
            "batch": batch,
            "seq_len": seq,
            "fused_adamw": bool(opt_opt.defaults.get("fused")),
            "autocast_bf16": device.type == "cuda",
            "matmul_params": linear_params(opt_model),
            "flops_per_token": flops_per_token,
            "achieved_gflops": achieved,
            "achieved_gflops_baseline": flops_per_token * tps_base / 1e9,
            "nominal_peak_gflops": peak["gflops"],
            "nominal_peak_formula": peak["formula"],
            "mfu_vs_nominal_peak": mfu_peak,
            "matmul_gflops_measured": mm_gflops,
            "matmul_gflops_runs": [m["gflops"] for m in mm],
            "matmul_gflops_forward_only": float(
                torch.tensor([m["forward_gflops"] for m in mm]).median()
            ),
            "mfu_vs_measured_matmul": mfu_mm,
            "minor_page_faults_per_step": faults,
            "step_s_baseline": t.seconds["baseline"],
            "step_s_optimized": t.seconds["optimized"],
            "threads": torch.get_num_threads(),
            "quick": quick,
        },
        target=">= 1.0x tokens/s and >= 0.8 of measured matmul GFLOP/s",
        met=ratio >= 1.0 and mfu_mm >= 0.8,
    )


def _gen_model(quick: bool, device: torch.device) -> tuple[nn.Module, Any, str]:
    from gpt.architecture import CONFIGS

    name = "tiny" if quick else "gpt2-small"
    model = seeded_model(CONFIGS[name], device)
    model.eval()
    return model, CONFIGS[name], name


def _prompt(cfg: Any, n: int = 16, seed: int = 1) -> list[int]:
    return torch.randint(
        0, cfg.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)
    ).tolist()


def bench_generate(quick: bool = False) -> BenchResult:
    """Greedy decoding of one prompt, one token per pass: a full forward over the text for
    each token (baseline) vs the KV cache; 256 new tokens with a 124M-shaped model (random
    weights). Drafting (several tokens per pass) is measured by the ``vs_book`` rows."""
    from gpt.generate import generate, generate_padded

    device = pick_device()
    setup_device(device)
    model, cfg, name = _gen_model(quick, device)
    new = 40 if quick else 256
    prompt = _prompt(cfg)
    outs: dict[str, list[int]] = {}

    def cached() -> None:
        outs["optimized"] = generate(model, [prompt], new, draft="none")[0]

    def recompute() -> None:
        outs["baseline"] = generate_padded(model, [prompt], new, use_cache=False)[0]

    generate(model, [prompt], 8, draft="none")  # warm-up: a short generation per side
    generate_padded(model, [prompt], 8, use_cache=False)
    reps = {"optimized": 3, "baseline": 3 if quick else 2}
    t = interleaved(
        {"optimized": cached, "baseline": recompute},
        repeats=reps,
        warmup=0,
        device=device,
    )
    tps, tb, to = t.rates(new)
    same = sum(a == b for a, b in zip(outs["baseline"], outs["optimized"], strict=False))
    return BenchResult(
        name="generate",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M'}, {new} new tokens after a 16-token prompt",
        baseline_label="no KV cache (full recompute per token)",
        optimized_label="KV cache (one token per pass)",
        method=method_text(
            t,
            "the slow baseline gets 2 repeats at full size",
            warmup="warm-up: an 8-token generation per side",
        ),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "model": name,
            "device": device.type,
            "prompt_tokens": len(prompt),
            "new_tokens": new,
            "seconds_baseline": t.seconds["baseline"],
            "seconds_optimized": t.seconds["optimized"],
            "identical_tokens": same,
            "quick": quick,
        },
        target=">= 4x tokens/s",
        met=to / tb >= 4.0,
    )


def bench_generate_batched(quick: bool = False) -> BenchResult:
    """Eight prompts of different lengths: one at a time (baseline) vs one left-padded
    batch of 8 (both with the KV cache)."""
    from gpt.generate import generate

    device = pick_device()
    setup_device(device)
    model, cfg, name = _gen_model(quick, device)
    new = 16 if quick else 64
    lengths = [3, 5, 7, 9, 11, 13, 15, 17] if quick else [5, 9, 14, 20, 27, 33, 40, 48]
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, cfg.vocab_size, (n,), generator=g).tolist() for n in lengths]
    outs: dict[str, list[list[int]]] = {}

    def base() -> None:
        outs["baseline"] = [generate(model, [p], new)[0] for p in prompts]

    def opt() -> None:
        outs["optimized"] = generate(model, prompts, new)

    t = interleaved({"baseline": base, "optimized": opt}, repeats=3, warmup=1, device=device)
    total = new * len(prompts)
    tps, tb, to = t.rates(total)
    rows_equal = sum(a == b for a, b in zip(outs["baseline"], outs["optimized"], strict=True))
    return BenchResult(
        name="generate_batched",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M'}, 8 prompts of {lengths[0]}-{lengths[-1]} "
        f"tokens, {new} new tokens each",
        baseline_label="one prompt at a time",
        optimized_label="one left-padded batch of 8",
        method=method_text(t),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "model": name,
            "device": device.type,
            "batch": len(prompts),
            "prompt_lengths": lengths,
            "new_tokens_per_prompt": new,
            "seconds_baseline": t.seconds["baseline"],
            "seconds_optimized": t.seconds["optimized"],
            "rows_identical": rows_equal,
            "quick": quick,
        },
        target=">= 2x tokens/s at batch 8",
        met=to / tb >= 2.0,
    )


# --------------------------------------------------------------------------- compile


def bench_train_step_compile(quick: bool = False) -> BenchResult:
    """The default training step eager (baseline) vs through ``torch.compile`` (the
    ``compile = true`` option). The first compiled calls (compilation) are warm-up and
    reported separately."""
    from gpt.args import LMTrainArgs
    from gpt.lm_step import make_optimizer, train_step

    device = pick_device()
    setup_device(device)
    cfg, batch, seq = _train_setup(quick, device)
    eager = seeded_model(cfg, device).train()
    comp_model = seeded_model(cfg, device).train()
    comp_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(comp_model)
    opts = {k: make_optimizer(m, LMTrainArgs()) for k, m in (("e", eager), ("c", comp_model))}
    inputs, targets = _batch(cfg, batch, seq, device)
    tokens = batch * seq
    first: dict[str, float] = {}

    def base() -> None:
        with autocast(device):
            train_step(eager, opts["e"], inputs, targets)

    def comp() -> None:
        with autocast(device):
            train_step(compiled, opts["c"], inputs, targets)

    first["compiled"] = timed(comp, device)  # compilation (forward + backward graphs)
    first["eager"] = timed(base, device)
    t = interleaved(
        {"baseline": base, "optimized": comp}, repeats=3 if quick else 5, warmup=1, device=device
    )
    tps, tb, to = t.rates(tokens)
    return BenchResult(
        name="train_step_compile",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M (context 256)'}, {batch}x{seq} tokens",
        baseline_label="eager (SDPA, fused AdamW)",
        optimized_label="torch.compile (LMTrainArgs.compile = true)",
        method=method_text(t, "the first compiled call (compilation) is timed separately"),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "device": device.type,
            "first_call_s_compiled": first["compiled"],
            "first_call_s_eager": first["eager"],
            "step_s_baseline": t.seconds["baseline"],
            "step_s_optimized": t.seconds["optimized"],
            "quick": quick,
        },
        target="recorded (no target): whether compile pays off here",
        met=None,
    )


def bench_generate_compile(quick: bool = False) -> BenchResult:
    """KV-cache greedy generation, one token per pass, eager (baseline) vs
    ``generate(..., compile=True)`` (the same loop compiled); compilation (the first call)
    is reported separately."""
    from gpt.generate import generate, generate_padded

    device = pick_device()
    setup_device(device)
    model, cfg, name = _gen_model(quick, device)
    new = 40 if quick else 256
    prompt = _prompt(cfg)
    outs: dict[str, list[int]] = {}

    def side(key: str, comp: bool) -> Callable[[], None]:
        def fn() -> None:
            if comp:
                outs[key] = generate(model, [prompt], new, compile=True)[0]
            else:
                outs[key] = generate_padded(model, [prompt], new)[0]

        return fn

    t0 = time.perf_counter()
    side("optimized", True)()  # compilation
    first = time.perf_counter() - t0
    t = interleaved(
        {"baseline": side("baseline", False), "optimized": side("optimized", True)},
        repeats=3,
        warmup=1,
        device=device,
    )
    tps, tb, to = t.rates(new)
    return BenchResult(
        name="generate_compile",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M'}, {new} new tokens, KV cache",
        baseline_label="eager",
        optimized_label="torch.compile (generate(compile=True))",
        method=method_text(t, "the first compiled call (compilation) is timed separately"),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "model": name,
            "device": device.type,
            "first_call_s_compiled": first,
            "identical_tokens": outs["baseline"] == outs["optimized"],
            "quick": quick,
        },
        target="recorded (no target): whether compile pays off here",
        met=None,
    )
