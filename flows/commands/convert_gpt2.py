"""``gptflow convert-gpt2``: OpenAI GPT-2 TF checkpoint -> gptflow checkpoint folder."""

from __future__ import annotations

import argparse
from typing import Any


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "convert-gpt2",
        help="convert OpenAI's GPT-2 TensorFlow checkpoint into a gptflow checkpoint",
        description=(
            "Read hparams.json + model.ckpt.* from an OpenAI GPT-2 release folder (needs "
            "TensorFlow) and write a gptflow checkpoint folder (safetensors)."
        ),
    )
    p.add_argument("--openai-dir", required=True, help="folder with OpenAI's GPT-2 files")
    p.add_argument("--out", required=True, help="checkpoint folder to write (replaced atomically)")
    p.add_argument(
        "--drop-rate", type=float, default=0.0, help="dropout stored in the config (default 0.0)"
    )
    p.add_argument(
        "--tokenizer-dir",
        help="encoder.json + vocab.bpe to bundle when the OpenAI folder lacks them",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Convert and print the checkpoint path."""
    from gpt.model import count_parameters
    from gpt.weights.openai import convert_openai_checkpoint

    out = convert_openai_checkpoint(
        args.openai_dir, args.out, tokenizer_dir=args.tokenizer_dir, drop_rate=args.drop_rate
    )
    from gpt.checkpoint import load_checkpoint

    ck = load_checkpoint(out)
    print(f"wrote {out} ({count_parameters(ck.model):,} parameters)")
    return 0
