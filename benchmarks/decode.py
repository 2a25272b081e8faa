"""Decoding on a trained checkpoint, where drafted tokens are accepted at the rate real
text gives (random weights repeat one token: every draft is accepted, a best case).

The checkpoint is the cpu profile's instruction-finetuned model: ``GPTFLOW_BENCH_CHECKPOINT``
names its folder, else the newest committed ``finetune_instruct`` stage result under the
artifacts root is used (``gptflow run --profile cpu --set load_gpt2.base_model=scratch``
makes one). The prompts are the cpu profile's instruction test split (110 records) from
the inputs' mirror. Rows:

- ``extract_responses``: the stage's decoding as it was (one token per pass, left-padded
  batches of 8, :func:`gpt.generate.generate_padded`) against now (exact drafts, a
  finished prompt's place refilled); the responses are compared token for token.
- ``vs_book_generate_trained``: batch-1 greedy, the book's ``generate_text_simple`` against
  gptflow (fp32 drafted, and in the same rounds fp32 one token per pass and int8 drafted).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from benchmarks.core import (
    BenchResult,
    BenchSkipped,
    interleaved,
    method_text,
    pick_device,
    setup_device,
    spread,
)

__all__ = ["bench_extract_responses", "bench_vs_book_generate_trained", "find_instruct_checkpoint"]

_HOW = (
    "run `gptflow run --profile cpu --set load_gpt2.base_model=scratch --mirror FOLDER` "
    "first, or set GPTFLOW_BENCH_CHECKPOINT to an instruction-finetuned checkpoint folder"
)


def find_instruct_checkpoint() -> Path:
    """``GPTFLOW_BENCH_CHECKPOINT``, else the newest committed finetune_instruct result."""
    from gpt.paths import artifacts_root

    env = os.environ.get("GPTFLOW_BENCH_CHECKPOINT")
    if env:
        path = Path(env).expanduser()
        if not (path / "config.json").is_file():
            raise BenchSkipped(f"GPTFLOW_BENCH_CHECKPOINT={env} is no checkpoint folder")
        return path
    root = artifacts_root()
    found = []
    if isinstance(root, Path):
        for manifest in (root / "stages" / "finetune_instruct").glob("*/manifest.json"):
            data = json.loads(manifest.read_text(encoding="utf-8"))
            rel = (data.get("out") or {}).get("checkpoint")
            if rel and (manifest.parent / rel / "config.json").is_file():
                found.append((manifest.stat().st_mtime, manifest.parent / rel))
    if not found:
        raise BenchSkipped(f"no instruction-finetuned checkpoint under {root}: {_HOW}")
    return max(found)[1]


def _cpu_profile() -> tuple[Any, Any]:
    """The cpu profile's tokenize and extract_responses settings, read from its TOML file
    (benchmarks import nothing from flows/; a profile holds only what it changes)."""
    import tomllib

    from gpt.args import ExtractArgs, PrepareArgs

    # the source tree's profile (GPTFLOW_HOME moves the data, not the code)
    path = Path(__file__).resolve().parents[1] / "flows" / "profiles" / "cpu.toml"
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    return PrepareArgs(**data.get("tokenize", {})), ExtractArgs(**data.get("extract_responses", {}))


def _test_prompts(mirror: str | None, quick: bool) -> tuple[list[dict[str, Any]], list[list[int]]]:
    """The cpu profile's instruction test records and their Alpaca prompts' tokens."""
    from gpt.data import parsing
    from gpt.prompts import format_alpaca
    from gpt.tokenizer import Tokenizer

    mirror = mirror or os.environ.get("GPTFLOW_MIRROR")
    if not mirror or not (Path(mirror) / "instruction-data.json").is_file():
        raise BenchSkipped("needs the inputs' mirror with instruction-data.json: --mirror FOLDER")
    prep, _ = _cpu_profile()
    recs = parsing.parse_instructions(Path(mirror) / "instruction-data.json")
    test = list(
        parsing.split_instructions(
            recs,
            train=prep.instruct_train,
            test=prep.instruct_test,
            shuffle_seed=prep.instruct_shuffle_seed,
        )["test"]
    )[: prep.instruct_limit]
    if quick:
        test = test[:12]
    tok = Tokenizer.from_dir(Path(mirror) / "gpt2")
    return test, [tok.encode(format_alpaca(r["instruction"], r["input"])) for r in test]


def bench_extract_responses(mirror: str | None, quick: bool = False) -> BenchResult:
    """The extract_responses stage's decoding on the cpu profile's 110 test prompts (batch
    8, at most 128 new tokens, stop at end-of-text): before (one token per pass,
    left-padded batches) against now (exact drafts, refilled batches)."""
    from gpt.checkpoint import load_checkpoint
    from gpt.decode import DecodeStats, greedy_decode
    from gpt.generate import DRAFTS, generate_padded

    ckpt = find_instruct_checkpoint()
    device = pick_device()
    setup_device(device)
    _, args = _cpu_profile()
    new = 24 if quick else args.max_new_tokens
    _, prompts = _test_prompts(mirror, quick)
    model = load_checkpoint(ckpt).model.to(device).eval()
    outs: dict[str, list[list[int]]] = {}
    stats: list[DecodeStats] = []
    b = args.batch_size

    def before() -> None:
        got: list[list[int]] = []
        for s in range(0, len(prompts), b):
            got += generate_padded(model, prompts[s : s + b], new, eos_id=50256)
        outs["baseline"] = got

    def now() -> None:
        done = greedy_decode(
            model, prompts, new, eos_id=50256, draft=DRAFTS[args.draft],
            draft_tokens=args.draft_tokens, batch_size=b,
        )  # fmt: skip
        outs["optimized"] = done.tokens
        stats.append(done.stats)

    greedy_decode(model, prompts[:2], 4)  # warm-up: the row-range probe, kernels
    generate_padded(model, prompts[:2], 4)
    t = interleaved({"baseline": before, "optimized": now}, repeats=2, warmup=0, device=device)
    st = stats[-1]
    same = sum(a == o for a, o in zip(outs["baseline"], outs["optimized"], strict=True))
    tb, to = t.median("baseline"), t.median("optimized")
    return BenchResult(
        name="extract_responses",
        baseline=tb,
        optimized=to,
        ratio=tb / to,
        unit="s",
        workload=f"{len(prompts)} instruction test prompts (cpu profile), batch {b}, "
        f"<= {new} new tokens, checkpoint {ckpt.name}; "
        f"{st.acceptance_rate or 0:.0%} of drafted tokens accepted",
        baseline_label="one token per pass, left-padded batches (before)",
        optimized_label="exact prompt-lookup drafts, refilled batches",
        method=method_text(
            t,
            "decoding only (checkpoint loaded and prompts tokenized once)",
            warmup="warm-up: a 4-token decode per side",
        ),
        spread={k: spread(v) for k, v in t.seconds.items()},
        details={
            "device": device.type,
            "checkpoint": str(ckpt),
            "prompts": len(prompts),
            "responses_identical": same,
            "new_tokens": st.new_tokens,
            "acceptance_rate": st.acceptance_rate,
            "tokens_per_pass": st.tokens_per_row_pass,
            "passes": st.passes,
            "window_passes": st.window_passes,
            "block_rows": st.block_rows,
            "seconds_before": t.seconds["baseline"],
            "seconds_now": t.seconds["optimized"],
            "quick": quick,
        },
        target="<= 0.5x the time (128 s -> 64 s), identical responses",
        met=to <= 0.5 * tb and same == len(prompts),
    )


def bench_vs_book_generate_trained(mirror: str | None, quick: bool = False) -> BenchResult:
    """Batch-1 greedy on a trained checkpoint (the cpu profile's instruction model) for
    two instruction test prompts, up to 256 new tokens (fewer where the context ends): the
    book's ``generate_text_simple`` vs gptflow's exact drafted decoding; the same rounds
    time gptflow one token per pass and with int8 weights."""
    from benchmarks.vs_book import BOOK_PACKAGE, _book, _book_model
    from gpt.checkpoint import load_checkpoint
    from gpt.decode import DecodeStats
    from gpt.generate import generate
    from gpt.quantize import quantize_int8

    ch04 = _book()
    ckpt = find_instruct_checkpoint()
    device = pick_device()
    setup_device(device)
    _, prompts = _test_prompts(mirror, quick)
    ours = load_checkpoint(ckpt).model.to(device).eval()
    int8 = quantize_int8(ours)
    book = _book_model(ch04, ours, device).eval()
    ctx = ours.cfg.context_length
    chosen = [p for p in prompts if len(p) < ctx // 4][:2]
    new = 24 if quick else min(256, ctx - max(len(p) for p in chosen))
    total = new * len(chosen)
    outs: dict[str, list[list[int]]] = {}
    stats: dict[str, list[DecodeStats]] = {"optimized": [], "int8": []}

    def book_gen() -> None:
        got = []
        for p in chosen:
            x = torch.tensor([p], device=device)
            got.append(ch04.generate_text_simple(book, x, new, context_size=ctx)[0, len(p) :])
        outs["baseline"] = [g.tolist() for g in got]

    def ours_gen(key: str, model: Any, draft: str) -> Any:
        def fn() -> None:
            st = DecodeStats()
            outs[key] = [generate(model, [p], new, draft=draft, stats=st)[0] for p in chosen]
            stats.setdefault(key, []).append(st)

        return fn

    sides = {
        "baseline": book_gen,
        "optimized": ours_gen("optimized", ours, "prompt_lookup"),
        "plain": ours_gen("plain", ours, "none"),
        "int8": ours_gen("int8", int8, "prompt_lookup"),
    }
    for key in ("optimized", "plain", "int8"):  # warm-up: probes and kernels
        generate(ours if key != "int8" else int8, [chosen[0]], 4)
    reps = {"baseline": 3 if quick else 2, "optimized": 3, "plain": 3, "int8": 3}
    t = interleaved(sides, repeats=reps,
                    warmup=0, device=device)  # fmt: skip
    tps, tb, to = t.rates(total)
    tp, t8 = total / t.median("plain"), total / t.median("int8")
    st, s8 = stats["optimized"][-1], stats["int8"][-1]
    flat = [x for row in outs["optimized"] for x in row]
    from gpt.eval.int8_cost import token_agreement

    same8 = token_agreement(outs["optimized"], outs["int8"])
    exact = outs["optimized"] == outs["plain"]
    ratio = to / tb
    return BenchResult(
        name="vs_book_generate_trained",
        baseline=tb,
        optimized=to,
        ratio=ratio,
        unit="tokens/s",
        workload=f"checkpoint {ckpt.name} (context {ctx}), {len(chosen)} instruction test "
        f"prompts, {new} new tokens each; {st.acceptance_rate or 0:.0%} of drafted tokens "
        "accepted",
        baseline_label="book: generate_text_simple",
        optimized_label="gptflow: generate, exact prompt-lookup drafts",
        method=method_text(
            t,
            "same weights; gptflow one token per pass and with int8 weights timed in the "
            "same rounds",
            warmup="warm-up: a 4-token generation per gptflow side",
        ),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "device": device.type,
            "book_package": BOOK_PACKAGE,
            "checkpoint": str(ckpt),
            "identical_tokens": exact,
            "tokens_same_as_book": sum(
                a == b for a, b in zip(flat, [x for r in outs["baseline"] for x in r], strict=False)
            ),
            "acceptance_rate": st.acceptance_rate,
            "tokens_per_pass": st.tokens_per_row_pass,
            "window_passes": st.window_passes,
            "plain_tokens_per_s": tp,
            "ratio_one_token_per_pass": tp / tb,
            "int8_tokens_per_s": t8,
            "ratio_int8": t8 / tb,
            "int8_acceptance_rate": s8.acceptance_rate,
            "int8_identical_token_share": same8 / max(1, len(flat)),
            "seconds": t.seconds,
            "quick": quick,
        },
        target=">= 12x tokens/s exact (>= 20x with int8)",
        met=ratio >= 12.0 and exact,
    )
