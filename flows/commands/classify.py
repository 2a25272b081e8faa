"""``gptflow classify --checkpoint CKPT_DIR "text" ...``: spam or ham, with probability."""

from __future__ import annotations

import argparse
import json

from flows.commands import from_argv, write_line


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "classify",
        help="classify texts as spam/ham with a finetuned classifier checkpoint",
        description=(
            "Load a spam-classifier checkpoint folder (written by the finetune_spam stage) "
            "and print, for each text, the predicted label and the probability of spam."
        ),
    )
    parser.add_argument(
        "--checkpoint", required=True, help="classifier checkpoint folder (artifacts/.../spam)"
    )
    parser.add_argument("texts", nargs="+", metavar="TEXT", help="message(s) to classify")
    parser.add_argument("--json", action="store_true", help="print one JSON object per text")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Classify every text and print ``LABEL<TAB>p(spam)=P<TAB>TEXT`` lines."""
    from pathlib import Path

    from gpt.checkpoint import recover_checkpoint
    from gpt.errors import CheckpointError
    from gpt.recipes.classifier_model import classify

    ckpt = Path(args.checkpoint)
    if recover_checkpoint(ckpt) is None:
        raise CheckpointError(f"checkpoint folder {ckpt} does not exist")
    texts = [from_argv(t) for t in args.texts]
    results = classify(ckpt, texts)
    for text, (label, prob) in zip(texts, results, strict=True):
        if args.json:
            line = json.dumps({"text": text, "label": label, "prob_spam": round(prob, 6)})
        else:
            line = f"{label}\tp(spam)={prob:.4f}\t{text}"
        write_line(line)
    return 0
