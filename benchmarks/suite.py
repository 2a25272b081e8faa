"""Benchmarks of gptflow's optimisations, each a same-process A/B comparison.

Every benchmark runs its baseline and its optimized side in this process, interleaved
(A, B, B, A, ...) after a warm-up, and reports the median of the repeats as a
:class:`BenchResult`. ``quick=True`` shrinks every workload (tiny models, few steps) so
the whole suite runs in a minute or two on a 2-core CPU; the targets are meant for the
full sizes. The device is chosen automatically (CUDA when present: TF32 matmuls and, on
the optimized training side, bf16 autocast). No Prefect or DuckDB here: the
``gptflow bench`` command stores the results.

Ratios are "times better": optimized / baseline for throughputs (tokens/s, examples/s),
baseline / optimized for wall times and memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from gpt.errors import GPTFlowError

__all__ = [
    "BENCHMARKS",
    "BenchResult",
    "BenchSkipped",
    "bench_generate",
    "bench_generate_batched",
    "bench_judge",
    "bench_spam_finetune",
    "bench_train_step",
    "bench_windowing",
    "hardware",
    "matmul_gflops",
    "pick_device",
]

log = logging.getLogger(__name__)


class BenchSkipped(GPTFlowError):
    """A benchmark cannot run here (missing input); the message says what to provide."""


@dataclass
class BenchResult:
    """One benchmark row."""

    name: str
    """Benchmark name (``train_step``, ``generate``, ...)."""
    baseline: float
    """The baseline side's figure, in :attr:`unit`."""
    optimized: float
    """The optimized side's figure, in :attr:`unit`."""
    ratio: float
    """How many times better the optimized side is (see the module docstring)."""
    unit: str
    """Unit of ``baseline`` / ``optimized``."""
    details: dict[str, Any] = field(default_factory=dict)
    """Everything else measured: sizes, repeats, raw timings, secondary figures."""
    target: str = ""
    """The target, in words."""
    met: bool | None = None
    """Whether the target was met (None: no target / not applicable)."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------- helpers


def pick_device() -> torch.device:
    """CUDA when available, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _setup_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, enabled: bool = True) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (never on CPU: these CPUs have no bf16 units)."""
    if enabled and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware() -> dict[str, Any]:
    """What the numbers were measured on: CPU model, cores, torch, threads, device."""
    device = pick_device()
    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "affinity_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": device.type,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if device.type == "cuda":
        info["cuda_name"] = torch.cuda.get_device_name(0)
        info["cuda_version"] = torch.version.cuda
    with contextlib.suppress(OSError):
        info["loadavg_1m"] = round(os.getloadavg()[0], 2)
    return info


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _interleaved(
    sides: dict[str, Callable[[], Any]],
    *,
    repeats: int | dict[str, int],
    warmup: int | dict[str, int] = 1,
    device: torch.device,
) -> dict[str, list[float]]:
    """Wall seconds of each side's call, run interleaved: warm-up calls first, then
    rounds alternating the order (A,B / B,A / ...) so drift hits both sides alike.
    ``repeats``/``warmup`` may differ per side (a side runs in the rounds it has left)."""
    names = list(sides)
    reps = repeats if isinstance(repeats, dict) else dict.fromkeys(names, repeats)
    warm = warmup if isinstance(warmup, dict) else dict.fromkeys(names, warmup)
    for r in range(max(warm.values(), default=0)):
        for k in names:
            if r < warm[k]:
                sides[k]()
    times: dict[str, list[float]] = {k: [] for k in names}
    for r in range(max(reps.values())):
        for k in names if r % 2 == 0 else names[::-1]:
            if len(times[k]) < reps[k]:
                times[k].append(_timed(sides[k], device))
    return times


def _median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs))


def _seeded_model(cfg: Any, device: torch.device, seed: int = 123) -> nn.Module:
    from gpt.model import GPT

    torch.manual_seed(seed)
    return GPT(cfg).to(device)


def _linear_params(model: nn.Module) -> int:
    """Weights that take part in matmuls (every Linear, the tied head once)."""
    seen: set[int] = set()
    n = 0
    for m in model.modules():
        if isinstance(m, nn.Linear) and id(m.weight) not in seen:
            seen.add(id(m.weight))
            n += m.weight.numel()
    return n


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
    """Plain ``torch.matmul`` GFLOP/s on a GPT forward's shapes: per layer
    [tokens, D] x [D, 3D], [D, D], [D, 4D] and [tokens, 4D] x [4D, D], and the head
    [tokens, D] x [D, V], weighted like one forward (``n_layers`` blocks + one head).
    Returns ``{"gflops": weighted, "block_gflops", "head_gflops"}`` (best of repeats)."""
    device = device or pick_device()
    d = emb_dim
    g = torch.Generator(device="cpu").manual_seed(0)

    def mk(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    block = [
        (mk(tokens, d), mk(d, 3 * d)),
        (mk(tokens, d), mk(d, d)),
        (mk(tokens, d), mk(d, 4 * d)),
    ]
    block.append((mk(tokens, 4 * d), mk(4 * d, d)))
    head = (mk(tokens, d), mk(d, vocab_size))

    def flops(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        return float(sum(2 * a.shape[0] * a.shape[1] * b.shape[1] for a, b in pairs))

    def run(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for a, b in pairs:
            torch.matmul(a, b)

    run(block)
    run([head])
    t_block = min(_timed(lambda: run(block), device) for _ in range(repeats))
    t_head = min(_timed(lambda: run([head]), device) for _ in range(repeats))
    f_block, f_head = flops(block), flops([head])
    total = (n_layers * f_block + f_head) / (n_layers * t_block + t_head)
    return {
        "gflops": total / 1e9,
        "block_gflops": f_block / t_block / 1e9,
        "head_gflops": f_head / t_head / 1e9,
    }


# --------------------------------------------------------------------------- train_step


def bench_train_step(quick: bool = False, *, threads: int | None = None) -> BenchResult:
    """Training throughput: explicit attention + a plain for-loop AdamW (baseline) vs the
    default path (SDPA + :func:`gpt.train.make_optimizer`'s fused AdamW, bf16 autocast
    on CUDA). Also the model-FLOPs utilisation against plain matmul GFLOP/s measured in
    the same rounds."""
    from gpt.model import CONFIGS
    from gpt.train import LMTrainArgs, make_optimizer, train_step

    device = pick_device()
    _setup_device(device)
    if threads:
        torch.set_num_threads(threads)
    cfg = CONFIGS["tiny"] if quick else CONFIGS["gpt2-small-256"]
    batch, seq = (4, 64) if quick else (2, 256)
    if device.type == "cuda" and not quick:
        batch = 16
    repeats = 3 if quick else 4

    base_model = _seeded_model(cfg.replace(attention="explicit"), device)
    opt_model = _seeded_model(cfg.replace(attention="sdpa"), device)
    opt_model.load_state_dict(base_model.state_dict())
    base_model.train()
    opt_model.train()
    base_opt = torch.optim.AdamW(
        base_model.parameters(), lr=4e-4, weight_decay=0.1, foreach=False, fused=False
    )
    opt_opt = make_optimizer(opt_model, LMTrainArgs())
    fused = bool(opt_opt.defaults.get("fused"))

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    tokens = batch * seq
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    mm: list[dict[str, float]] = []

    def base() -> None:
        train_step(base_model, base_opt, inputs, targets)

    def opt() -> None:
        with _autocast(device):
            train_step(opt_model, opt_opt, inputs, targets)

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

    times = _interleaved(
        {"baseline": base, "optimized": opt, "matmul": matmul},
        repeats=repeats,
        warmup={"baseline": 1, "optimized": 1, "matmul": 0},
        device=device,
    )
    tps_base = tokens / _median(times["baseline"])
    tps_opt = tokens / _median(times["optimized"])
    n_mm = _linear_params(opt_model)
    flops_per_token = 6 * n_mm + 12 * cfg.n_layers * cfg.emb_dim * seq
    achieved = flops_per_token * tps_opt / 1e9
    mm_gflops = _median([m["gflops"] for m in mm])
    mfu = achieved / mm_gflops
    ratio = tps_opt / tps_base
    return BenchResult(
        name="train_step",
        baseline=tps_base,
        optimized=tps_opt,
        ratio=ratio,
        unit="tokens/s",
        details={
            "model": "tiny" if quick else "gpt2-small-256",
            "device": device.type,
            "batch": batch,
            "seq_len": seq,
            "drop_rate": cfg.drop_rate,
            "fused_adamw": fused,
            "autocast_bf16": device.type == "cuda",
            "matmul_params": n_mm,
            "flops_per_token": flops_per_token,
            "achieved_gflops": achieved,
            "achieved_gflops_baseline": flops_per_token * tps_base / 1e9,
            "matmul_gflops": mm_gflops,
            "matmul_gflops_runs": [m["gflops"] for m in mm],
            "matmul_block_gflops": _median([m["block_gflops"] for m in mm]),
            "matmul_head_gflops": _median([m["head_gflops"] for m in mm]),
            "mfu": mfu,
            "step_s_baseline": times["baseline"],
            "step_s_optimized": times["optimized"],
            "threads": torch.get_num_threads(),
            "quick": quick,
        },
        target=">= 1.0x tokens/s and MFU >= 0.6 of measured matmul GFLOP/s",
        met=ratio >= 1.0 and mfu >= 0.6,
    )


# --------------------------------------------------------------------------- generation


def _gen_model(quick: bool, device: torch.device) -> tuple[nn.Module, Any, str]:
    from gpt.model import CONFIGS

    name = "tiny" if quick else "gpt2-small"
    cfg = CONFIGS[name]
    model = _seeded_model(cfg, device)
    model.eval()
    return model, cfg, name


def bench_generate(quick: bool = False) -> BenchResult:
    """Greedy decoding of one prompt: full recompute each token (baseline) vs the KV
    cache; 256 new tokens with a 124M-shaped model (random weights)."""
    from gpt.generate import generate

    device = pick_device()
    _setup_device(device)
    model, cfg, name = _gen_model(quick, device)
    new = 40 if quick else 256
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, cfg.vocab_size, (16,), generator=g).tolist()
    outs: dict[str, list[int]] = {}

    def base() -> None:
        outs["baseline"] = generate(model, [prompt], new, use_cache=False)[0]

    def opt() -> None:
        outs["optimized"] = generate(model, [prompt], new, use_cache=True)[0]

    # warm up on a short run; the baseline's long run is costly, so it gets fewer repeats
    generate(model, [prompt], 4, use_cache=False)
    generate(model, [prompt], 4, use_cache=True)
    reps = {"optimized": 3, "baseline": 3 if quick else 1}
    times = _interleaved(
        {"optimized": opt, "baseline": base}, repeats=reps, warmup=0, device=device
    )
    tb = new / _median(times["baseline"])
    to = new / _median(times["optimized"])
    same = sum(a == b for a, b in zip(outs["baseline"], outs["optimized"], strict=False))
    return BenchResult(
        name="generate",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        details={
            "model": name,
            "device": device.type,
            "prompt_tokens": len(prompt),
            "new_tokens": new,
            "seconds_baseline": times["baseline"],
            "seconds_optimized": times["optimized"],
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
    _setup_device(device)
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

    generate(model, prompts[:2], 4)
    times = _interleaved(
        {"baseline": base, "optimized": opt}, repeats=3 if quick else 2, warmup=0, device=device
    )
    total = new * len(prompts)
    tb = total / _median(times["baseline"])
    to = total / _median(times["optimized"])
    rows_equal = sum(a == b for a, b in zip(outs["baseline"], outs["optimized"], strict=True))
    return BenchResult(
        name="generate_batched",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="tokens/s",
        details={
            "model": name,
            "device": device.type,
            "batch": len(prompts),
            "prompt_lengths": lengths,
            "new_tokens_per_prompt": new,
            "seconds_baseline": times["baseline"],
            "seconds_optimized": times["optimized"],
            "rows_identical": rows_equal,
            "quick": quick,
        },
        target=">= 2x tokens/s at batch 8",
        met=to / tb >= 2.0,
    )


# --------------------------------------------------------------------------- spam finetune

_WORDS = [
    "the",
    "a",
    "to",
    "you",
    "and",
    "is",
    "in",
    "it",
    "for",
    "of",
    "on",
    "call",
    "now",
    "free",
    "win",
    "prize",
    "cash",
    "text",
    "reply",
    "stop",
    "claim",
    "your",
    "we",
    "are",
    "me",
    "will",
    "be",
    "at",
    "home",
    "later",
    "ok",
    "see",
    "tonight",
    "love",
    "good",
    "day",
    "just",
    "got",
    "can",
    "not",
    "what",
    "when",
    "how",
    "do",
    "dont",
    "know",
    "going",
    "work",
    "tomorrow",
    "mobile",
    "offer",
    "urgent",
    "week",
    "send",
    "msg",
    "txt",
    "please",
    "thanks",
    "sorry",
    "happy",
    "lunch",
    "dinner",
    "meet",
    "sure",
    "yes",
    "no",
    "maybe",
    "new",
]


def _synthetic_messages(n: int, seed: int, max_words: int) -> tuple[list[str], list[int]]:
    rng = np.random.default_rng(seed)
    words = np.array(_WORDS)
    spam_words = {"free", "win", "prize", "cash", "claim", "urgent", "offer"}
    texts, labels = [], []
    for _ in range(n):
        k = int(rng.integers(3, max_words + 1))
        text = " ".join(words[rng.integers(0, len(words), k)])
        texts.append(text)
        labels.append(int(any(w in spam_words for w in text.split())))
    return texts, labels


def bench_spam_finetune(quick: bool = False, *, tokenizer_dir: Path | None = None) -> BenchResult:
    """Spam-classifier finetune (last block + final norm trained, 5 epochs, eval after
    each): full forward every step (baseline) vs frozen-prefix activation caching.
    Figure: finetune wall seconds without the checkpoint load/save (the same on both
    sides; in ``details``). Per-step losses and final metrics must match."""
    from gpt.checkpoint import save_checkpoint
    from gpt.model import CONFIGS
    from gpt.recipes.classifier import SpamArgs, finetune_classifier

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "encoder.json").is_file():
        raise BenchSkipped(
            f"spam_finetune needs the GPT-2 tokenizer files (encoder.json, vocab.bpe); "
            f"none found in {tokenizer_dir!s}: pass --mirror or set GPTFLOW_MIRROR"
        )
    device = pick_device()
    _setup_device(device)
    name = "tiny" if quick else "gpt2-small"
    n_train, n_eval, max_words = (32, 8, 20) if quick else (48, 16, 30)
    epochs = 5
    splits = {
        "train": _synthetic_messages(n_train, 1, max_words),
        "validation": _synthetic_messages(n_eval, 2, max_words),
        "test": _synthetic_messages(n_eval, 3, max_words),
    }
    results: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-spam-") as tmp:
        base_dir = Path(tmp) / "base"
        model = _seeded_model(CONFIGS[name], torch.device("cpu"))
        save_checkpoint(base_dir, model, tokenizer_dir=tokenizer_dir)
        del model

        def side(prefix_cache: bool) -> Callable[[], None]:
            key = "optimized" if prefix_cache else "baseline"

            def fn() -> None:
                args = SpamArgs(epochs=epochs, batch_size=8, prefix_cache=prefix_cache)
                t0 = time.perf_counter()
                summary = finetune_classifier(
                    base_dir,
                    splits,
                    args,
                    out_dir=Path(tmp) / f"out-{key}",
                    tokenizer_dir=tokenizer_dir,
                    device=device.type,
                    progress=False,
                )
                summary["wall_s"] = time.perf_counter() - t0
                results.setdefault(key, {"runs": []})["runs"].append(summary)

            return fn

        times = _interleaved(
            {"baseline": side(False), "optimized": side(True)},
            repeats=2 if quick else 1,
            warmup=0,
            device=device,
        )

    def compute_s(s: dict[str, Any]) -> float:
        t = s["timings"]
        return float(s["wall_s"] - t.get("load_s", 0.0) - t.get("save_s", 0.0))

    b_runs, o_runs = results["baseline"]["runs"], results["optimized"]["runs"]
    tb = _median([compute_s(s) for s in b_runs])
    to = _median([compute_s(s) for s in o_runs])
    lb, lo = b_runs[-1]["step_losses"], o_runs[-1]["step_losses"]
    max_diff = max((abs(a - b) for a, b in zip(lb, lo, strict=True)), default=0.0)
    final_equal = b_runs[-1]["final"] == o_runs[-1]["final"]
    ratio = tb / to
    return BenchResult(
        name="spam_finetune",
        baseline=tb,
        optimized=to,
        ratio=ratio,
        unit="s",
        details={
            "model": name,
            "device": device.type,
            "epochs": epochs,
            "messages": {"train": n_train, "validation": n_eval, "test": n_eval},
            "max_length": b_runs[-1]["max_length"],
            "wall_s_baseline": times["baseline"],
            "wall_s_optimized": times["optimized"],
            "timings_baseline": b_runs[-1]["timings"],
            "timings_optimized": o_runs[-1]["timings"],
            "final_loss_baseline": lb[-1],
            "final_loss_optimized": lo[-1],
            "max_step_loss_diff": max_diff,
            "final_metrics_equal": final_equal,
            "final_metrics": o_runs[-1]["final"],
            "quick": quick,
        },
        target=">= 3x faster (wall time), identical metrics",
        met=ratio >= 3.0 and max_diff <= 1e-4 and final_equal,
    )


# --------------------------------------------------------------------------- judge


def _load_ollama_stub() -> Any:
    """The loopback Ollama stand-in (:class:`benchmarks.ollama_stub.OllamaStub`)."""
    from benchmarks.ollama_stub import OllamaStub

    return OllamaStub


def bench_judge(quick: bool = False, *, latency_s: float = 0.2) -> BenchResult:
    """LLM-judge throughput against a loopback Ollama stand-in with a fixed latency per
    request: concurrency 1 (baseline) vs 8."""
    from gpt.eval.judge import JudgeConfig, score_examples

    stub_cls = _load_ollama_stub()
    n = 16 if quick else 40
    examples = [
        {
            "example_id": i,
            "instruction": f"Rewrite sentence {i} in passive voice.",
            "input": "The cat chased the mouse.",
            "output": "The mouse was chased by the cat.",
            "response": "The mouse was chased by the cat.",
        }
        for i in range(n)
    ]
    stub = stub_cls(models=["llama3"], reply=lambda req: "Score: 85", latency_s=latency_s)
    stub.start()
    scored: dict[str, int] = {}
    try:

        def side(concurrency: int, key: str) -> Callable[[], None]:
            cfg = JudgeConfig(
                hosts=[stub.host],
                models=["llama3"],
                concurrency=concurrency,
                retries=0,
                timeout_s=30,
            )

            def fn() -> None:
                res = score_examples(examples, cfg, progress=False)
                scored[key] = sum(j.score is not None for j in res)

            return fn

        cpu = torch.device("cpu")
        warm = JudgeConfig(hosts=[stub.host], models=["llama3"], concurrency=8, retries=0)
        score_examples(examples[:8], warm, progress=False)
        times = _interleaved(
            {"baseline": side(1, "baseline"), "optimized": side(8, "optimized")},
            repeats=2,
            warmup=0,
            device=cpu,
        )
    finally:
        stub.stop()
    tb = n / _median(times["baseline"])
    to = n / _median(times["optimized"])
    return BenchResult(
        name="judge",
        baseline=tb,
        optimized=to,
        ratio=to / tb,
        unit="examples/s",
        details={
            "examples": n,
            "latency_s": latency_s,
            "concurrency": [1, 8],
            "ideal_ratio": 8.0,
            "seconds_baseline": times["baseline"],
            "seconds_optimized": times["optimized"],
            "scored": scored,
            "quick": quick,
        },
        target=">= 5x examples/s",
        met=to / tb >= 5.0 and scored.get("baseline") == n and scored.get("optimized") == n,
    )


# --------------------------------------------------------------------------- windowing


def _rss_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _peak_rss_bytes() -> int:
    """This process's peak RSS: ``VmHWM`` (per address space, so fresh after exec,
    unlike ``ru_maxrss`` which Linux carries over from the forking parent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _synthetic_corpus(n_bytes: int, seed: int = 0) -> str:
    """Random prose-like text of about ``n_bytes`` ASCII characters."""
    rng = np.random.default_rng(seed)
    vocab = np.array(
        _WORDS
        + [w.capitalize() for w in _WORDS[:40]]
        + ["said.", "again,", "Gisburn", "picture", "portrait", "1887", "studio", "he", "she"]
    )
    parts: list[str] = []
    size = 0
    while size < n_bytes:
        k = 200_000
        chunk = " ".join(vocab[rng.integers(0, len(vocab), k)]) + "\n"
        parts.append(chunk)
        size += len(chunk)
    return "".join(parts)[:n_bytes]


def _windowing_child(
    n_bytes: int, tokenizer_dir: str, workdir: str, max_length: int, stride: int
) -> dict[str, Any]:
    """Runs in a fresh process so its peak RSS belongs to this workload alone."""

    from gpt.data.windows import SlidingWindowDataset, tokenize_to_npy
    from gpt.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tokenizer_dir)
    text = _synthetic_corpus(n_bytes)
    rss_start = _rss_bytes()
    t0 = time.perf_counter()
    info = tokenize_to_npy(text, tok, Path(workdir) / "corpus.npy")
    t_tok = time.perf_counter() - t0
    peak_tok = _peak_rss_bytes()
    del text
    rss0 = _rss_bytes()
    t0 = time.perf_counter()
    ds = SlidingWindowDataset.from_npy(info.path, max_length, stride)
    n = len(ds)
    idx = np.random.default_rng(0).integers(0, n, 2000)
    checksum = 0
    for i in idx:
        x, y = ds[int(i)]
        checksum += int(x[0]) + int(y[-1])
    rss_ds = _rss_bytes() - rss0
    inputs, targets = ds.as_tensors()
    checksum += int(inputs[:: max(1, n // 1000)].sum()) + int(targets[-1, -1])
    t_win = time.perf_counter() - t0
    rss_tensors = _rss_bytes() - rss0
    return {
        "num_tokens": info.num_tokens,
        "windows": n,
        "tokenize_s": t_tok,
        "window_s": t_win,
        "rss_start": rss_start,
        "peak_rss_tokenize": peak_tok,
        "peak_rss": _peak_rss_bytes(),
        "rss_growth_dataset": rss_ds,
        "rss_growth_as_tensors": rss_tensors,
        "token_file_bytes": info.path.stat().st_size,
        "checksum": checksum,
    }


def bench_windowing(quick: bool = False, *, tokenizer_dir: Path | None = None) -> BenchResult:
    """Tokenize a synthetic corpus (>= 50 MB; 4 MB when quick) to a uint16 token file and
    build next-token windows (context 256, stride 1: one window per token) over it, in a
    fresh process. Reports MB/s and peak RSS; the row compares the bytes a naive
    windows x length materialisation would take (baseline) with the memory the window
    dataset really added (optimized). Two corpus sizes show memory grows with tokens."""
    import json
    import subprocess
    import sys

    from gpt.paths import project_root

    if tokenizer_dir is None or not (Path(tokenizer_dir) / "encoder.json").is_file():
        raise BenchSkipped(
            f"windowing needs the GPT-2 tokenizer files (encoder.json, vocab.bpe); none "
            f"found in {tokenizer_dir!s}: pass --mirror or set GPTFLOW_MIRROR"
        )
    mb = 1_000_000
    sizes = [2 * mb, 4 * mb] if quick else [25 * mb, 50 * mb]
    max_length, stride = 256, 1
    code = (
        "import json, sys; from benchmarks.suite import _windowing_child; "
        "print(json.dumps(_windowing_child(*json.loads(sys.argv[1]))))"
    )
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(project_root()), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    runs = []
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-win-") as tmp:
        for size in sizes:
            argv = json.dumps([size, str(tokenizer_dir), tmp, max_length, stride])
            proc = subprocess.run(
                [sys.executable, "-c", code, argv], capture_output=True, text=True, env=env
            )
            if proc.returncode != 0:
                raise RuntimeError(f"windowing child failed: {proc.stderr.strip()[-2000:]}")
            runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
            (Path(tmp) / "corpus.npy").unlink(missing_ok=True)
    big = runs[-1]
    mbps = sizes[-1] / mb / (big["tokenize_s"] + big["window_s"])
    naive = big["windows"] * max_length * 2 * 8  # inputs + targets, int64
    used = max(big["rss_growth_as_tensors"], 1)
    per_token = [r["rss_growth_as_tensors"] / r["num_tokens"] for r in runs]
    peak_per_token = [(r["peak_rss"] - r["rss_start"]) / r["num_tokens"] for r in runs]
    # linear in tokens: bytes per token about the same at both sizes, far below length*16
    linear = max(per_token) <= 1.5 * max(min(per_token), 1.0) + 4
    return BenchResult(
        name="windowing",
        baseline=naive / mb,
        optimized=used / mb,
        ratio=naive / used,
        unit="MB",
        details={
            "corpus_mb": [s / mb for s in sizes],
            "mb_per_s": mbps,
            "tokenize_mb_per_s": sizes[-1] / mb / big["tokenize_s"],
            "window_s": big["window_s"],
            "num_tokens": [r["num_tokens"] for r in runs],
            "windows": [r["windows"] for r in runs],
            "max_length": max_length,
            "stride": stride,
            "peak_rss_mb": big["peak_rss"] / mb,
            "peak_rss_tokenize_mb": big["peak_rss_tokenize"] / mb,
            "rss_before_tokenize_mb": big["rss_start"] / mb,
            "peak_rss_growth_bytes_per_token": peak_per_token,
            "dataset_rss_growth_mb": big["rss_growth_dataset"] / mb,
            "as_tensors_rss_growth_mb": big["rss_growth_as_tensors"] / mb,
            "window_bytes_per_token": per_token,
            "token_file_mb": big["token_file_bytes"] / mb,
            "naive_windows_x_length_mb": naive / mb,
            "quick": quick,
        },
        target="report MB/s and peak RSS; memory grows with tokens, not windows x length",
        met=bool(linear and used < naive / 10),
    )


# --------------------------------------------------------------------------- registry

#: name -> (function, needs the tokenizer folder)
BENCHMARKS: dict[str, tuple[Callable[..., BenchResult], bool]] = {
    "train_step": (bench_train_step, False),
    "generate": (bench_generate, False),
    "generate_batched": (bench_generate_batched, False),
    "spam_finetune": (bench_spam_finetune, True),
    "judge": (bench_judge, False),
    "windowing": (bench_windowing, True),
}


@contextlib.contextmanager
def _no_grad_leak() -> Iterator[None]:
    prev = torch.is_grad_enabled()
    try:
        yield
    finally:
        torch.set_grad_enabled(prev)


def run_benchmark(
    name: str, quick: bool = False, *, tokenizer_dir: Path | None = None
) -> BenchResult:
    """Run one registered benchmark by name (``tokenizer_dir`` for those needing it)."""
    if name not in BENCHMARKS:
        raise GPTFlowError(f"unknown benchmark {name!r}; choose from {sorted(BENCHMARKS)}")
    fn, needs_tok = BENCHMARKS[name]
    with _no_grad_leak():
        if needs_tok:
            return fn(quick, tokenizer_dir=tokenizer_dir)
        return fn(quick)
