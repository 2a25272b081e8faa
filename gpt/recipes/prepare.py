"""The tokenize stage's library side: parse the downloaded inputs, split them, tokenize
the pretraining text into uint16 arrays, and write the splits as small JSON files.

Everything a later stage reads comes from the folder this writes, so stages never
re-parse raw downloads and every split is recorded with its seed and counts.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from gpt.args import PrepareArgs
from gpt.data import parsing
from gpt.data.windows import SlidingWindowDataset, tokenize_to_npy
from gpt.tokenizer import Tokenizer

#: Tokenizer files copied into the output folder (so it is self-contained).
TOKENIZER_FILES = ("encoder.json", "vocab.bpe")


@dataclass
class PrepareResult:
    """What :func:`prepare_datasets` wrote. The path fields are relative to its output
    folder and are the one place the layout is named."""

    corpus_text: str = "text/corpus.txt"
    """The (possibly cut) pretraining text."""
    train_text: str = "text/train.txt"
    """Its training part."""
    val_text: str = "text/val.txt"
    """Its validation part."""
    train_tokens: str = "tokens/train.npy"
    """The training part as a token file (:func:`gpt.data.windows.load_tokens`)."""
    val_tokens: str = "tokens/val.npy"
    """The validation part as a token file."""
    spam_splits: str = "spam/splits.json"
    """The balanced SMS splits (:func:`gpt.eval.baseline.load_spam_splits`)."""
    spam_messages: str = "spam/messages.json"
    """Every parsed SMS message."""
    instruct_splits: str = "instruct/splits.json"
    """The instruction splits (:func:`load_instruct_splits`)."""
    tokenizer: str = "tokenizer"
    """A copy of the GPT-2 tokenizer files."""
    files: list[str] = field(default_factory=list)
    corpus: list[dict[str, Any]] = field(default_factory=list)
    spam_counts: dict[str, int] = field(default_factory=dict)
    instruct_counts: dict[str, int] = field(default_factory=dict)
    manifests: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True), encoding="utf-8")
    os.replace(tmp, path)


def prepare_datasets(
    *,
    text_path: Path,
    sms_path: Path,
    instructions_path: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    args: PrepareArgs,
) -> PrepareResult:
    """Parse, split and tokenize into ``out_dir``: the texts, token files, splits and a
    copy of the tokenizer files, at the paths the returned :class:`PrepareResult` names."""
    out_dir = Path(out_dir)
    result = PrepareResult()
    tok_out = out_dir / result.tokenizer
    tok_out.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        tmp = tok_out / f"{name}.tmp"
        shutil.copyfile(Path(tokenizer_dir) / name, tmp)
        os.replace(tmp, tok_out / name)
        result.files.append(f"{result.tokenizer}/{name}")
    tok = Tokenizer.from_dir(tok_out)

    text = parsing.read_text(text_path)
    if args.text_chars is not None:
        text = text[: args.text_chars]
    corpus = out_dir / result.corpus_text
    corpus.parent.mkdir(parents=True, exist_ok=True)
    tmp = corpus.with_name(corpus.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, corpus)
    result.files.append(result.corpus_text)
    text_split = parsing.split_text(text, args.train_ratio)
    train_text, val_text = text_split
    result.manifests["text"] = text_split.manifest.to_dict()
    parts = (
        ("train", train_text, result.train_text, result.train_tokens),
        ("val", val_text, result.val_text, result.val_tokens),
    )
    for split, part, text_rel, tokens_rel in parts:
        tpath = out_dir / text_rel
        tpath.parent.mkdir(parents=True, exist_ok=True)
        tmp = tpath.with_name(tpath.name + ".tmp")
        tmp.write_text(part, encoding="utf-8")
        os.replace(tmp, tpath)
        npy = out_dir / tokens_rel
        npy.parent.mkdir(parents=True, exist_ok=True)
        info = tokenize_to_npy(part, tok, npy)
        n_tokens = int(info.num_tokens)
        windows = len(SlidingWindowDataset.from_npy(npy, args.max_length, args.stride))
        result.corpus.append(
            {
                "split": split,
                "chars": len(part),
                "tokens": n_tokens,
                "windows": windows,
                "max_length": args.max_length,
                "stride": args.stride,
                "path": tokens_rel,
            }
        )
        result.files += [text_rel, tokens_rel]

    sms = parsing.parse_sms(sms_path)
    spam_splits = parsing.balance_and_split_spam(
        sms, seed=args.spam_seed, ratios=tuple(args.spam_ratios)
    )
    spam_out: dict[str, list[dict[str, Any]]] = {}
    for split, recs in spam_splits.items():
        recs = list(recs)[: args.spam_limit] if args.spam_limit else list(recs)
        spam_out[split] = [
            {"idx": i, "line_no": r.line_no, "label": r.label, "text": r.text}
            for i, r in enumerate(recs)
        ]
        result.spam_counts[split] = len(recs)
    _write_json(out_dir / result.spam_splits, spam_out)
    _write_json(
        out_dir / result.spam_messages,
        [{"line_no": r.line_no, "label": r.label, "text": r.text} for r in sms],
    )
    result.files += [result.spam_splits, result.spam_messages]
    result.manifests["spam"] = spam_splits.manifest.to_dict()

    records = parsing.parse_instructions(instructions_path)
    inst_splits = parsing.split_instructions(
        records,
        train=args.instruct_train,
        test=args.instruct_test,
        shuffle_seed=args.instruct_shuffle_seed,
    )
    inst_out: dict[str, list[dict[str, Any]]] = {}
    for split, recs in inst_splits.items():
        recs = list(recs)[: args.instruct_limit] if args.instruct_limit else list(recs)
        inst_out[split] = [
            {
                "idx": i,
                "instruction": r["instruction"],
                "input": r["input"],
                "output": r["output"],
            }
            for i, r in enumerate(recs)
        ]
        result.instruct_counts[split] = len(recs)
    _write_json(out_dir / result.instruct_splits, inst_out)
    result.files.append(result.instruct_splits)
    result.manifests["instruct"] = inst_splits.manifest.to_dict()
    return result


def load_instruct_splits(path: Path) -> dict[str, list[dict[str, Any]]]:
    """``instruct/splits.json`` as {split: [records]}."""
    return json.loads(Path(path).read_text(encoding="utf-8"))
