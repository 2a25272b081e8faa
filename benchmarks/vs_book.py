"""Side by side with the reference implementation: the book's own package
(``llms-from-scratch``, its ``GPTModel``, training recipe, ``generate_text_simple`` and
spam-finetune step) against gptflow, in one process, interleaved, on the same inputs and
the same initial weights (gptflow's weights are copied into the book's model, so both
compute the same function; the rows record that they do).

Install the book's package without its dependencies: its metadata pins ``numpy<2.1`` and
pulls TensorFlow and JupyterLab, none of which these three comparisons use::

    pip install --no-deps llms-from-scratch==1.0.19
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from benchmarks.core import (
    BenchResult,
    BenchSkipped,
    interleaved,
    method_text,
    pick_device,
    seeded_model,
    setup_device,
    spread,
)

__all__ = [
    "bench_vs_book_generate",
    "bench_vs_book_generate_int8",
    "bench_vs_book_spam_epoch",
    "bench_vs_book_train_step",
    "book_state_from_gpt",
]

BOOK_PACKAGE = "llms-from-scratch==1.0.19"


def _book() -> Any:
    try:
        import llms_from_scratch  # noqa: F401
        from llms_from_scratch import ch04
    except ImportError as exc:
        raise BenchSkipped(
            f"--vs-book needs the book's package: pip install --no-deps {BOOK_PACKAGE} "
            "(--no-deps: its metadata pins numpy<2.1 and pulls TensorFlow and JupyterLab, "
            "which these comparisons do not use)"
        ) from exc
    return ch04


def _book_cfg(cfg: Any) -> dict[str, Any]:
    """The book's config dict for a gptflow GPTConfig."""
    return {
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.context_length,
        "emb_dim": cfg.emb_dim,
        "n_heads": cfg.n_heads,
        "n_layers": cfg.n_layers,
        "drop_rate": cfg.drop_rate,
        "qkv_bias": cfg.qkv_bias,
    }


def book_state_from_gpt(model: nn.Module, book_model: nn.Module) -> dict[str, torch.Tensor]:
    """The book ``GPTModel``'s state dict holding ``model``'s weights: the fused QKV
    projection split into W_query / W_key / W_value, LayerNorm weight/bias as
    scale/shift, the (possibly tied) head copied. Every key of the book's state is
    filled (its causal-mask buffers are its own) and every shape checked."""
    ours = model.state_dict()
    d = model.cfg.emb_dim
    out: dict[str, torch.Tensor] = {
        "tok_emb.weight": ours["tok_emb.weight"],
        "pos_emb.weight": ours["pos_emb.weight"],
        "final_norm.scale": ours["final_norm.weight"],
        "final_norm.shift": ours["final_norm.bias"],
        "out_head.weight": model.out_head.weight.detach(),
    }
    if model.out_head.bias is not None:
        out["out_head.bias"] = model.out_head.bias.detach()
    for i in range(model.cfg.n_layers):
        b, t = f"blocks.{i}.", f"trf_blocks.{i}."
        w = ours[b + "att.qkv.weight"]
        for j, name in enumerate(("W_query", "W_key", "W_value")):
            out[f"{t}att.{name}.weight"] = w[j * d : (j + 1) * d]
            if model.cfg.qkv_bias:
                out[f"{t}att.{name}.bias"] = ours[b + "att.qkv.bias"][j * d : (j + 1) * d]
        out |= {
            t + "att.out_proj.weight": ours[b + "att.out_proj.weight"],
            t + "att.out_proj.bias": ours[b + "att.out_proj.bias"],
            t + "ff.layers.0.weight": ours[b + "ff.fc1.weight"],
            t + "ff.layers.0.bias": ours[b + "ff.fc1.bias"],
            t + "ff.layers.2.weight": ours[b + "ff.fc2.weight"],
            t + "ff.layers.2.bias": ours[b + "ff.fc2.bias"],
            t + "norm1.scale": ours[b + "norm1.weight"],
            t + "norm1.shift": ours[b + "norm1.bias"],
            t + "norm2.scale": ours[b + "norm2.weight"],
            t + "norm2.shift": ours[b + "norm2.bias"],
        }
    theirs = book_model.state_dict()
    for k, v in theirs.items():
        if k.endswith("att.mask"):
            out[k] = v
    missing, unexpected = sorted(set(theirs) - set(out)), sorted(set(out) - set(theirs))
    bad = [k for k in out if k in theirs and out[k].shape != theirs[k].shape]
    if missing or unexpected or bad:
        raise RuntimeError(
            f"book weight map: missing {missing}, unexpected {unexpected}, shapes {bad}"
        )
    return {k: v.detach().clone() for k, v in out.items()}


def _book_model(ch04: Any, model: nn.Module, device: torch.device) -> nn.Module:
    book = ch04.GPTModel(_book_cfg(model.cfg))
    if model.out_head.out_features != model.cfg.vocab_size:  # a classifier
        book.out_head = nn.Linear(model.cfg.emb_dim, model.out_head.out_features)
    book.load_state_dict(book_state_from_gpt(model, book), strict=True)
    return book.to(device)


def _same_function(book: nn.Module, model: nn.Module, x: torch.Tensor) -> float:
    """Max |logit difference| of the two models in eval mode on ``x``."""
    wb, wm = book.training, model.training
    book.eval()
    model.eval()
    with torch.no_grad():
        diff = float((book(x) - model(x)).abs().max())
    book.train(wb)
    model.train(wm)
    return diff


# --------------------------------------------------------------------------- training


def bench_vs_book_train_step(quick: bool = False) -> BenchResult:
    """One 124M training step (context 256, batch 2 x 256, dropout 0.1): the book's
    ``GPTModel`` with its recipe (``AdamW(lr=4e-4, weight_decay=0.1)``, its
    ``calc_loss_batch``) vs gptflow's default step (SDPA, fused AdamW). Same batch,
    same initial weights."""
    ch04 = _book()
    from llms_from_scratch.ch05 import calc_loss_batch

    from gpt.architecture import CONFIGS
    from gpt.args import LMTrainArgs
    from gpt.lm_step import make_optimizer, train_step

    device = pick_device()
    setup_device(device)
    cfg = CONFIGS["tiny"] if quick else CONFIGS["gpt2-small-256"]
    batch, seq = (4, 64) if quick else (2, 256)
    ours = seeded_model(cfg, device).train()
    book = _book_model(ch04, ours, device).train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g).to(device)
    inputs, targets = x[:, :-1], x[:, 1:]
    diff = _same_function(book, ours, inputs)
    book_opt = torch.optim.AdamW(book.parameters(), lr=0.0004, weight_decay=0.1)
    our_opt = make_optimizer(ours, LMTrainArgs())

    def book_step() -> None:
        book_opt.zero_grad()
        loss = calc_loss_batch(inputs, targets, book, device)
        loss.backward()
        book_opt.step()

    def our_step() -> None:
        train_step(ours, our_opt, inputs, targets)

    t = interleaved(
        {"baseline": book_step, "optimized": our_step}, repeats=3, warmup=1, device=device
    )
    tokens = batch * seq
    tps, tb, to = t.rates(tokens)
    ratio = to / tb
    return BenchResult(
        name="vs_book_train_step",
        baseline=tb,
        optimized=to,
        ratio=ratio,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M (context 256)'}, {batch}x{seq} tokens, dropout "
        f"{cfg.drop_rate}",
        baseline_label="book: GPTModel + AdamW(lr 4e-4, wd 0.1) + calc_loss_batch",
        optimized_label="gptflow: SDPA + fused AdamW (train_step)",
        method=method_text(t, "same batch, same initial weights"),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "device": device.type,
            "book_package": BOOK_PACKAGE,
            "initial_max_logit_diff": diff,
            "step_s_book": t.seconds["baseline"],
            "step_s_gptflow": t.seconds["optimized"],
            "quick": quick,
        },
        target=">= 1.3x tokens/s",
        met=ratio >= 1.3,
    )


# --------------------------------------------------------------------------- generation


def _vs_book_decode(quick: bool, weights: str) -> BenchResult:
    """The book's ``generate_text_simple`` against gptflow's default greedy decoding
    (exact multi-token drafts, :mod:`gpt.decode`) with ``weights``; the same rounds also
    time gptflow one token per pass (``draft="none"``) and record the acceptance rate."""
    ch04 = _book()
    from gpt.architecture import CONFIGS
    from gpt.decode import DecodeStats
    from gpt.generate import generate
    from gpt.quantize import with_weights

    device = pick_device()
    setup_device(device)
    cfg = CONFIGS["tiny"] if quick else CONFIGS["gpt2-small"]
    new = 40 if quick else 256
    ours = seeded_model(cfg, device).eval()
    book = _book_model(ch04, ours, device).eval()
    decoder = with_weights(ours, weights)
    prompt = torch.randint(0, cfg.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    outs: dict[str, list[int]] = {}
    stats: list[DecodeStats] = []

    def book_gen(n: int = new) -> None:
        out = ch04.generate_text_simple(book, prompt, n, context_size=cfg.context_length)
        outs["baseline"] = out[0, prompt.shape[1] :].tolist()

    def our_gen(n: int = new) -> None:
        st = DecodeStats()
        outs["optimized"] = generate(decoder, prompt, n, stats=st)[0]
        stats.append(st)

    def plain_gen(n: int = new) -> None:
        outs["plain"] = generate(decoder, prompt, n, draft="none")[0]

    for fn in (book_gen, our_gen, plain_gen):  # warm-up (and the row-range probe)
        fn(8)
    stats.clear()
    t = interleaved(
        {"baseline": book_gen, "optimized": our_gen, "plain": plain_gen},
        repeats={"baseline": 3 if quick else 2, "optimized": 3, "plain": 3},
        warmup=0,
        device=device,
    )
    tps, tb, to = t.rates(new)
    tp = new / t.median("plain")
    st = stats[-1]
    fp32 = outs["baseline"]
    same = sum(a == b for a, b in zip(fp32, outs["optimized"], strict=False))
    ratio = to / tb
    int8 = weights == "int8"
    target = 20.0 if int8 else 12.0
    return BenchResult(
        name="vs_book_generate_int8" if int8 else "vs_book_generate",
        baseline=tb,
        optimized=to,
        ratio=ratio,
        unit="tokens/s",
        workload=f"{'tiny' if quick else '124M'}, {new} new tokens after a 16-token prompt, "
        f"random weights (their greedy text repeats: {st.acceptance_rate or 0:.0%} of drafts "
        "accepted, the best case for drafting)",
        baseline_label="book: generate_text_simple",
        optimized_label=f"gptflow: generate, {'int8 weights, ' if int8 else ''}exact "
        "prompt-lookup drafts",
        method=method_text(
            t,
            "the book side gets 2 repeats at full size; same weights; gptflow one token "
            "per pass timed in the same rounds",
            warmup="warm-up: an 8-token generation per side",
        ),
        spread={k: spread(v) for k, v in tps.items()},
        details={
            "device": device.type,
            "book_package": BOOK_PACKAGE,
            "weights": weights,
            "identical_tokens": outs["optimized"] == outs["plain"]
            and (int8 or outs["optimized"] == fp32),
            "drafted_equals_one_token_decoding": outs["optimized"] == outs["plain"],
            "tokens_same_as_book_fp32": same,
            "acceptance_rate": st.acceptance_rate,
            "tokens_per_pass": st.tokens_per_row_pass,
            "passes": st.passes,
            "block_rows": st.block_rows,
            "plain_tokens_per_s": tp,
            "ratio_one_token_per_pass": tp / tb,
            "seconds_book": t.seconds["baseline"],
            "seconds_gptflow": t.seconds["optimized"],
            "seconds_gptflow_one_token_per_pass": t.seconds["plain"],
            "quick": quick,
        },
        target=f">= {target:g}x tokens/s{'' if int8 else ', identical tokens'}",
        met=ratio >= target and outs["optimized"] == outs["plain"],
    )


def bench_vs_book_generate(quick: bool = False) -> BenchResult:
    """Greedy generation of 256 new tokens (124M GPT-2 shape, random weights, a 16-token
    prompt): the book's ``generate_text_simple`` (full recompute, all positions' logits)
    vs gptflow's ``generate`` (KV cache, exact multi-token drafts)."""
    return _vs_book_decode(quick, "fp32")


def bench_vs_book_generate_int8(quick: bool = False) -> BenchResult:
    """:func:`bench_vs_book_generate` with gptflow on its opt-in int8 weights (the share of
    tokens equal to the book's fp32 ones is recorded)."""
    return _vs_book_decode(quick, "int8")


# --------------------------------------------------------------------------- spam epoch


def bench_vs_book_spam_epoch(quick: bool = False, *, tokenizer_dir: Any = None) -> BenchResult:
    """Spam-finetune epochs (124M base, head Linear(768, 2), last block + final norm
    trained, batch 8, AdamW lr 5e-5 wd 0.1, loss on the last position): the book's loop
    (its ``calc_loss_batch``: a full forward per batch) vs gptflow's
    ``finetune_classifier`` (frozen-prefix cache built once, then only the trainable
    suffix runs). Figure: seconds per epoch of the reference's 5-epoch finetune — for
    gptflow (cache build + 5 epochs) / 5, for the book one epoch (all its epochs cost
    the same). Same messages, batch order and initial weights: the first epoch's
    per-step losses are compared."""
    ch04 = _book()
    from llms_from_scratch.ch06 import calc_loss_batch

    from benchmarks.recipes import _need_tokenizer
    from benchmarks.synthetic import synthetic_messages
    from gpt.architecture import CONFIGS
    from gpt.args import SpamArgs
    from gpt.checkpoint import load_checkpoint, save_checkpoint
    from gpt.recipes.classifier import finetune_classifier
    from gpt.recipes.classifier_model import build_classifier, encode_spam
    from gpt.tokenizer import Tokenizer

    tok_dir = _need_tokenizer("vs_book_spam_epoch", tokenizer_dir)
    device = pick_device()
    setup_device(device)
    cfg = CONFIGS["tiny"] if quick else CONFIGS["gpt2-small"]
    n_train, max_words, epochs = (32, 20, 5) if quick else (64, 30, 5)
    texts, labels = synthetic_messages(n_train, 1, max_words)
    args = SpamArgs(epochs=epochs, batch_size=8, eval_per_epoch=False)
    with tempfile.TemporaryDirectory(prefix="gptflow-bench-book-spam-") as tmp:
        base = save_checkpoint(
            Path(tmp) / "base", seeded_model(cfg, torch.device("cpu")), tokenizer_dir=tok_dir
        )
        clf = build_classifier(
            load_checkpoint(base).model,
            2,
            args.trainable_blocks,
            args.train_final_norm,
            seed=args.seed,
        )
        clf.cfg = clf.cfg.replace(drop_rate=args.drop_rate)  # as finetune_classifier does
        book = _book_model(ch04, clf, device)
        for p in book.parameters():
            p.requires_grad_(False)
        for p in [
            *book.trf_blocks[-1].parameters(),
            *book.final_norm.parameters(),
            *book.out_head.parameters(),
        ]:
            p.requires_grad_(True)
        book_opt = torch.optim.AdamW(book.parameters(), lr=args.lr, weight_decay=args.weight_decay)
        tokenizer = Tokenizer.from_dir(tok_dir)
        max_len = min(max(len(tokenizer.encode(s)) for s in texts), cfg.context_length)
        ids, y = encode_spam(texts, tokenizer, max_len), torch.tensor(labels)
        n_batches = n_train // args.batch_size
        book_losses: list[list[float]] = []
        ours_runs: list[dict[str, Any]] = []

        def book_epoch() -> None:
            order = torch.randperm(n_train, generator=torch.Generator().manual_seed(args.seed))
            book.train()
            losses = []
            for b in range(n_batches):
                idx = order[b * args.batch_size : (b + 1) * args.batch_size]
                book_opt.zero_grad()
                loss = calc_loss_batch(ids[idx], y[idx], book, device)
                loss.backward()
                book_opt.step()
                losses.append(loss.item())
            book_losses.append(losses)

        def our_finetune() -> None:
            s = finetune_classifier(
                base,
                {"train": (texts, labels)},
                args,
                out_dir=Path(tmp) / "out",
                tokenizer_dir=tok_dir,
                device=device.type,
                progress=False,
            )
            ours_runs.append(s)

        book_epoch()  # warm-up, from the shared initial weights: the loss check
        our_finetune()
        t = interleaved(
            {"baseline": book_epoch, "optimized": our_finetune}, repeats=3, warmup=0, device=device
        )

    def per_epoch(s: dict[str, Any]) -> float:
        return (s["timings"]["prefix_cache_s"] + s["timings"]["train_s"]) / epochs

    secs = {"baseline": t.seconds["baseline"], "optimized": [per_epoch(s) for s in ours_runs[1:]]}
    tb, to = spread(secs["baseline"])["median"], spread(secs["optimized"])["median"]
    first_ours = ours_runs[0]["step_losses"][:n_batches]
    loss_diff = max(abs(a - b) for a, b in zip(book_losses[0], first_ours, strict=True))
    one_epoch = [
        s["timings"]["prefix_cache_s"] + s["timings"]["train_s"] / epochs for s in ours_runs[1:]
    ]
    ratio = tb / to
    return BenchResult(
        name="vs_book_spam_epoch",
        baseline=tb,
        optimized=to,
        ratio=ratio,
        unit="s/epoch",
        workload=f"{'tiny' if quick else '124M'}, {n_train} synthetic messages padded to "
        f"{max_len} tokens, batch 8, {epochs}-epoch finetune",
        baseline_label="book: full forward per batch (calc_loss_batch)",
        optimized_label="gptflow: frozen-prefix cache (finetune_classifier)",
        method=method_text(
            t,
            "book figure: one epoch per call; gptflow figure: (cache build "
            "+ 5 epochs) / 5 from each finetune, excluding load/tokenize/eval",
            warmup="warm-up: one call per side (also the loss check)",
        ),
        spread={k: spread(v) for k, v in secs.items()},
        details={
            "device": device.type,
            "book_package": BOOK_PACKAGE,
            "first_epoch_max_step_loss_diff": loss_diff,
            "gptflow_prefix_cache_s": [s["timings"]["prefix_cache_s"] for s in ours_runs],
            "gptflow_train_s": [s["timings"]["train_s"] for s in ours_runs],
            "gptflow_single_epoch_s_incl_cache": one_epoch,
            "ratio_single_epoch_incl_cache": tb / spread(one_epoch)["median"],
            "quick": quick,
        },
        target=">= 5x faster per epoch, same losses",
        met=ratio >= 5.0 and loss_diff <= 1e-4,
    )
