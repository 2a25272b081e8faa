"""``gptflow export CKPT --format hf --out DIR``: a checkpoint as a Hugging Face folder."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("hf",)


def register(subparsers: Any) -> None:
    """Add the ``export`` sub-command."""
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint in another library's format (hf: transformers)",
        description=(
            "Write a gptflow checkpoint as a Hugging Face transformers folder: a language "
            "model as GPT2LMHeadModel, a spam classifier as GPT2ForSequenceClassification, "
            "with config.json, model.safetensors and the GPT-2 tokenizer files, so "
            "from_pretrained(DIR) and AutoTokenizer.from_pretrained(DIR) load it as is."
        ),
    )
    p.add_argument("checkpoint", help="gptflow checkpoint folder")
    p.add_argument("--format", choices=FORMATS, default="hf", help="target format (hf)")
    p.add_argument("--out", required=True, help="folder to write (must not exist, see --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--tokenizer-dir",
        default=None,
        help="encoder.json + vocab.bpe, when the checkpoint holds no tokenizer",
    )
    p.add_argument(
        "--padded-last-position",
        action="store_true",
        help=(
            "export a pool='last' classifier anyway: HF then matches only on inputs padded "
            "to the classifier's max_length, one message per call"
        ),
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and print what was written and what a user must know."""
    from gpt.weights.hf_export import export_hf

    res = export_hf(
        args.checkpoint,
        args.out,
        tokenizer_dir=args.tokenizer_dir,
        allow_padded_last=args.padded_last_position,
        overwrite=args.force,
    )
    head = "tied" if res.tied else "untied"
    if res.architecture != "GPT2LMHeadModel":
        head = "classifier"
    print(f"wrote {res.path} ({res.architecture}, {head} head)")
    for note in res.notes:
        print(f"note: {note}")
    return 0
