"""``gptflow generate``: continue a prompt (or answer an Alpaca instruction) with a
checkpoint."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from gpt.decode_options import DRAFT_NAMES, WEIGHTS

log = logging.getLogger(__name__)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "generate",
        help="generate text from a language-model checkpoint",
        description=(
            "Print the continuation of --prompt (greedy when --temperature is 0), or, with "
            "--instruction [--input], format the Alpaca prompt and print only the response."
        ),
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--prompt", help="text to continue")
    p.add_argument("--instruction", help="Alpaca instruction (instead of --prompt)")
    p.add_argument("--input", default="", help="Alpaca input for --instruction (optional)")
    p.add_argument("--max-new-tokens", type=int, default=50)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument(
        "--tokenizer-dir",
        help="encoder.json + vocab.bpe when the checkpoint has no tokenizer/ folder",
    )
    p.add_argument("--no-cache", action="store_true", help="disable the KV cache")
    p.add_argument(
        "--draft",
        choices=DRAFT_NAMES,
        default="prompt_lookup",
        help="greedy decoding verifies tokens drafted from n-grams of the prompt and the "
        "text so far, several per forward pass, and returns exactly the tokens of "
        "one-token decoding (none: one token per pass). Sampling (--temperature > 0) "
        "always decodes one token per pass",
    )
    p.add_argument(
        "--draft-tokens", type=int, default=8, help="most tokens drafted per pass (1-15)"
    )
    p.add_argument(
        "--weights",
        choices=WEIGHTS,
        default="fp32",
        help="int8 (opt-in, CPU): int8 weights and per-row int8 inputs, faster decoding that "
        "CHANGES the output: the greedy tokens drift from fp32 ones wherever the model's top "
        "two choices are close (extract_responses.weights=int8 measures the share of "
        "identical tokens and the judge's score change on every run; see the README)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Generate and print."""
    import torch

    from flows.commands import from_argv, write_line
    from gpt.checkpoint import load_checkpoint, read_checkpoint_config
    from gpt.errors import CheckpointError, ConfigError
    from gpt.generate import generate
    from gpt.prompts import extract_response, format_alpaca
    from gpt.quantize import with_weights
    from gpt.tokenizer import Tokenizer

    if (args.prompt is None) == (args.instruction is None):
        raise ConfigError("give exactly one of --prompt TEXT or --instruction TEXT [--input TEXT]")
    if args.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ConfigError(f"--temperature must be >= 0, got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ConfigError(f"--top-k must be >= 1, got {args.top_k}")
    if not 1 <= args.draft_tokens <= 15:
        raise ConfigError(f"--draft-tokens must be between 1 and 15, got {args.draft_tokens}")

    info = read_checkpoint_config(args.checkpoint)
    if info.get("kind", "lm") != "lm":
        raise CheckpointError(
            f"{args.checkpoint} is a {info.get('kind')} checkpoint, not a language model: "
            f"use `gptflow classify --checkpoint {args.checkpoint} --text ...`"
        )
    ck = load_checkpoint(args.checkpoint)
    tok_dir = args.tokenizer_dir or ck.tokenizer_dir
    if tok_dir is None:
        raise CheckpointError(
            f"{args.checkpoint} has no tokenizer/ folder: pass --tokenizer-dir with "
            "encoder.json + vocab.bpe"
        )
    tok = Tokenizer.from_dir(tok_dir)

    if args.instruction is None:
        text = from_argv(args.prompt)
    else:
        text = format_alpaca(from_argv(args.instruction), from_argv(args.input or ""))
    ids = tok.encode(text)
    if not ids:
        raise ConfigError("the prompt is empty after tokenization")
    ctx = ck.config.context_length
    keep = max(1, ctx - args.max_new_tokens)
    if len(ids) > keep:
        log.warning(
            "prompt has %d tokens; keeping the last %d (context %d - %d new tokens)",
            len(ids),
            keep,
            ctx,
            args.max_new_tokens,
        )
        ids = ids[-keep:]

    if args.temperature > 0 and args.draft != "none":
        log.info("sampling decodes one token per pass (drafts are verified for greedy only)")
    model = with_weights(ck.model, args.weights)
    gen = torch.Generator().manual_seed(args.seed)
    new = generate(
        model,
        [ids],
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        eos_id=tok.eot_id,
        use_cache=not args.no_cache,
        generator=gen,
        draft=args.draft,
        draft_tokens=args.draft_tokens,
    )[0]
    out = tok.decode(new)
    if args.instruction is not None:
        out = extract_response(out)
    write_line(out)
    return 0
