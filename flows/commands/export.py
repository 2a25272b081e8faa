"""``gptflow export CKPT --format hf|peft --out DIR``: a checkpoint as a Hugging Face
folder, or a LoRA checkpoint as a peft adapter folder."""

from __future__ import annotations

import argparse
from typing import Any

FORMATS = ("hf", "peft")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "export",
        help="write a checkpoint in another library's format (hf: transformers, peft)",
        description=(
            "--format hf: a gptflow checkpoint as a Hugging Face transformers folder: a "
            "language model as GPT2LMHeadModel, a spam classifier as "
            "GPT2ForSequenceClassification, with config.json, model.safetensors and the "
            "GPT-2 tokenizer files, so from_pretrained(DIR) and "
            "AutoTokenizer.from_pretrained(DIR) load it as is (a LoRA checkpoint: the "
            "merged model). --format peft: a LoRA checkpoint as a peft adapter folder "
            "(adapter_config.json, adapter_model.safetensors) that "
            "PeftModel.from_pretrained(base, DIR) loads on its base exported with "
            "--format hf (--base-out exports that too)."
        ),
    )
    p.add_argument("checkpoint", help="gptflow checkpoint folder")
    p.add_argument("--format", choices=FORMATS, default="hf", help="target format (hf, peft)")
    p.add_argument(
        "--base-out",
        help="with --format peft: also export the adapter's base checkpoint (hf) here",
    )
    p.add_argument("--out", required=True, help="folder to write (must not exist, see --force)")
    p.add_argument("--force", action="store_true", help="replace an existing --out folder")
    p.add_argument(
        "--tokenizer-dir",
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
    from gpt.errors import ConfigError
    from gpt.weights.hf_export import export_hf

    if args.format == "peft":
        from gpt.weights.peft_export import export_peft

        peft = export_peft(
            args.checkpoint,
            args.out,
            base_out=args.base_out,
            tokenizer_dir=args.tokenizer_dir,
            allow_padded_last=args.padded_last_position,
            overwrite=args.force,
        )
        print(f"wrote {peft.path} (peft LoRA adapter, {peft.task_type})")
        for note in peft.notes:
            print(f"note: {note}")
        return 0
    if args.base_out is not None:
        raise ConfigError("--base-out goes with --format peft; --format hf writes one folder")
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
