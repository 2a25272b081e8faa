"""Instruction finetuning (Alpaca prompt format) and response extraction.

The collate follows the reference rule: append one end-of-text token (50256) to every
sequence, pad with 50256 to the batch maximum, take inputs = seq[:-1] and
targets = seq[1:], and turn every 50256 target but the first into -100 (ignored by the
loss); optionally the prompt part of the targets is masked too.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from pydantic import Field
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from gpt.adapter import adapt, model_size
from gpt.device import resolve_device
from gpt.distributed.launch import launchable
from gpt.errors import ConfigError, DataError
from gpt.lora import LoraSetting
from gpt.train import DistributedLMArgs

log = logging.getLogger(__name__)

EOT_ID = 50256
EOT_TEXT = "<|endoftext|>"
IGNORE_INDEX = -100
MetricsCallback = Callable[[list[dict[str, Any]]], None]
SampleCallback = Callable[[dict[str, Any]], None]
ProgressCallback = Callable[[int, int], None]


class InstructArgs(DistributedLMArgs):
    """Settings of the instruction finetune: every :class:`~gpt.train.LMTrainArgs` field
    (defaults here: the reference recipe — AdamW 5e-5, batch 8, 2 epochs), plus the
    data and sample settings below."""

    epochs: int = Field(2, ge=1)
    """Passes over the training records."""
    lr: float = Field(5e-5, ge=0)
    """Peak learning rate of AdamW."""
    batch_size: int = Field(8, ge=1)
    """Sequences per optimizer step."""
    mask_prompt: bool = False
    """Also ignore the prompt (instruction + input + response header) in the loss (the
    reference does not)."""
    max_length: int | None = Field(1024, ge=2)
    """Truncate inputs/targets to this many tokens (None: the model's context length);
    never more than the context length."""
    length_bucketing: bool = False
    """Group sequences of similar length into batches (seeded; less padding)."""
    bucket_factor: int = Field(50, ge=1)
    """With bucketing: how many batches' worth of shuffled sequences are sorted together."""
    drop_rate: float = Field(0.0, ge=0, lt=1)
    """Dropout while finetuning."""
    drop_last: bool = True
    """Drop the last incomplete training batch (as the reference's loader does)."""
    sample_tokens: int = Field(35, ge=0)
    """Length of the greedy sample (the response to the first validation record)
    generated after each epoch (0 = no samples)."""
    lora: LoraSetting = None
    """Low-rank adaptation instead of training every weight (None = off): the base is
    frozen, adapters train (:class:`~gpt.lora.LoraArgs`; ``true`` = rank 16, alpha 16,
    every linear layer); the checkpoint holds the adapter alone and names its base."""


# --------------------------------------------------------------------------- prompts


def format_prompt(instruction: str, input: str, output: str | None = None) -> str:
    from gpt.prompts import format_alpaca

    return format_alpaca(instruction, input, output)


def check_record(rec: dict[str, Any], i: int) -> None:
    for key in ("instruction", "input", "output"):
        if not isinstance(rec.get(key, ""), str):
            raise DataError(f"instruction record {i}: field {key!r} must be a string")
    if not rec.get("instruction"):
        raise DataError(f"instruction record {i}: field 'instruction' is missing or empty")


def prompt_and_full(rec: dict[str, Any]) -> tuple[str, str]:
    """(prompt text up to and including the response header, full training text)."""
    output = rec.get("output", "") or ""
    full = format_prompt(rec["instruction"], rec.get("input", "") or "", output)
    if output and not full.endswith(output):
        raise DataError("format_alpaca must end the text with the output")
    return full[: len(full) - len(output)], full


class InstructionDataset:
    """Pre-tokenised Alpaca texts (prompt + response) with each prompt's token length."""

    def __init__(self, records: Sequence[dict[str, Any]], tokenizer: Any) -> None:
        self.ids: list[list[int]] = []
        self.prompt_lengths: list[int] = []
        for i, rec in enumerate(records):
            check_record(rec, i)
            prompt, full = prompt_and_full(rec)
            ids = tokenizer.encode(full)
            p_ids = tokenizer.encode(prompt)
            n = 0  # longest common prefix (BPE may merge across the boundary)
            while n < min(len(ids), len(p_ids)) and ids[n] == p_ids[n]:
                n += 1
            self.ids.append(ids)
            self.prompt_lengths.append(n)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> list[int]:
        return self.ids[i]


def collate_instruct(
    batch: Sequence[Sequence[int]],
    pad_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    max_length: int | None = None,
    mask_prompt_lengths: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) [B, T] long for a batch of token-id lists (the reference rule;
    see the module docstring). ``mask_prompt_lengths[i]``: prompt tokens of item ``i``
    whose next-token targets become ``ignore_index``."""
    if not batch:
        raise ValueError("collate_instruct got an empty batch")
    width = max(len(item) + 1 for item in batch)
    inputs, targets = [], []
    for i, item in enumerate(batch):
        seq = [*item, pad_id]
        seq += [pad_id] * (width - len(seq))
        x = torch.tensor(seq[:-1], dtype=torch.long)
        y = torch.tensor(seq[1:], dtype=torch.long)
        pads = torch.nonzero(y == pad_id).flatten()
        if pads.numel() > 1:
            y[pads[1:]] = ignore_index
        if mask_prompt_lengths is not None:
            y[: max(int(mask_prompt_lengths[i]) - 1, 0)] = ignore_index
        if max_length is not None:
            x, y = x[:max_length], y[:max_length]
        inputs.append(x)
        targets.append(y)
    return torch.stack(inputs).to(device), torch.stack(targets).to(device)


def batch_indices(
    lengths: Sequence[int],
    batch_size: int,
    *,
    shuffle: bool,
    generator: torch.Generator | None = None,
    drop_last: bool = False,
    bucketing: bool = False,
    bucket_factor: int = 50,
) -> list[list[int]]:
    """Index batches for one epoch. With ``bucketing``: shuffled chunks of
    ``batch_size * bucket_factor`` sequences are sorted by length, cut into batches, and
    the batches are shuffled (all seeded by ``generator``)."""
    n = len(lengths)
    order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
    if bucketing:
        chunk = batch_size * max(bucket_factor, 1)
        sorted_order: list[int] = []
        for s in range(0, n, chunk):
            sorted_order += sorted(order[s : s + chunk], key=lambda i: lengths[i])
        order = sorted_order
    batches = [order[s : s + batch_size] for s in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if bucketing and shuffle:
        perm = torch.randperm(len(batches), generator=generator).tolist()
        batches = [batches[i] for i in perm]
    return batches


# --------------------------------------------------------------------------- training


def _set_dropout(model: nn.Module, p: float) -> None:
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = p
        if hasattr(m, "drop_rate") and isinstance(m.drop_rate, float):
            m.drop_rate = p


class _IndexDataset(Dataset[int]):
    """Yields positions; the collate function looks the sequences up."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class LengthBucketSampler(Sampler[list[int]]):
    """Batch sampler of :func:`batch_indices` with ``bucketing=True`` (seeded by
    ``generator``, which train_lm saves and restores for exact resume)."""

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        generator: torch.Generator,
        drop_last: bool,
        bucket_factor: int = 50,
    ) -> None:
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.generator = generator
        self.drop_last = drop_last
        self.bucket_factor = bucket_factor

    def __len__(self) -> int:
        n = len(self.lengths)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        yield from batch_indices(
            self.lengths,
            self.batch_size,
            shuffle=True,
            generator=self.generator,
            drop_last=self.drop_last,
            bucketing=True,
            bucket_factor=self.bucket_factor,
        )


def make_instruct_loader(
    ds: InstructionDataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 123,
    max_length: int | None = None,
    mask_prompt: bool = False,
    bucketing: bool = False,
    bucket_factor: int = 50,
) -> DataLoader[Any]:
    """A single-process DataLoader of collated ``(inputs, targets)`` batches whose order
    comes from its own seeded generator (``loader.generator``)."""

    def collate(idx: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        masks = [ds.prompt_lengths[i] for i in idx] if mask_prompt else None
        return collate_instruct(
            [ds.ids[i] for i in idx], max_length=max_length, mask_prompt_lengths=masks
        )

    gen = torch.Generator().manual_seed(seed)
    if bucketing and shuffle:
        sampler = LengthBucketSampler(
            [len(x) for x in ds.ids],
            batch_size,
            generator=gen,
            drop_last=drop_last,
            bucket_factor=bucket_factor,
        )
        return DataLoader(
            _IndexDataset(len(ds)),
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=0,
            generator=gen,
        )
    return DataLoader(
        _IndexDataset(len(ds)),
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=drop_last,
        collate_fn=collate,
        num_workers=0,
        generator=gen,
    )


def _sample_response(text: str, prompt: str) -> str:
    """A train_lm sample (prompt + greedy continuation) -> the response part, cut at the
    first end-of-text."""
    new = text[len(prompt) :] if text.startswith(prompt) else text
    from gpt.prompts import extract_response

    return extract_response(new.split(EOT_TEXT, 1)[0])


@launchable
def finetune_instruct(
    base_checkpoint_dir: Path,
    train_records: Sequence[dict[str, Any]],
    val_records: Sequence[dict[str, Any]],
    args: InstructArgs | None = None,
    *,
    out_dir: Path,
    tokenizer_dir: Path | None = None,
    device: str = "auto",
    on_metrics: MetricsCallback | None = None,
    on_sample: SampleCallback | None = None,
    on_progress: ProgressCallback | None = None,
    resume: bool = True,
    progress: bool = True,
) -> dict[str, Any]:
    """Finetune an LM checkpoint on Alpaca-formatted instruction records with
    :func:`gpt.train.train_lm` (cross-entropy ignoring the -100 targets).

    Metrics rows ``{step, epoch, seen (tokens), split, name, value}`` (train/val
    ``loss``, ``lr``, ``tokens_per_s``) go to ``on_metrics``; after each epoch a greedy
    sample ``{epoch, step, prompt, text}`` for the first validation record (text = the
    response only) goes to ``on_sample``; ``on_progress(step, steps)`` follows the
    optimizer steps (:func:`gpt.train.train_lm`). Training state lives in ``out_dir/"train"``
    (resumable); the finished model replaces it as the checkpoint in ``out_dir``.

    Under a torch.distributed process group (``gpt.distributed.run_distributed``) the
    training is data parallel (``batch_size`` is the global batch; the loss is
    token-weighted over it, as in one process) and rank 0 alone emits rows and samples
    and writes checkpoints.
    """
    from gpt import distributed as gd
    from gpt.checkpoint import load_checkpoint, save_checkpoint, weights_sha256
    from gpt.tokenizer import Tokenizer
    from gpt.train import train_lm

    args = args or InstructArgs()
    if not train_records:
        raise DataError("finetune_instruct got no training records")
    out_dir = Path(out_dir)
    timings: dict[str, float] = {}
    t_start = t0 = time.perf_counter()
    loaded = load_checkpoint(Path(base_checkpoint_dir))
    if loaded.kind != "lm":
        raise ConfigError(
            f"{base_checkpoint_dir} is a {loaded.kind} checkpoint; instruction finetuning "
            "needs a language-model checkpoint"
        )
    model = loaded.model
    tok_dir = tokenizer_dir or loaded.tokenizer_dir
    tokenizer = Tokenizer.from_dir(tok_dir) if tok_dir else Tokenizer.gpt2()
    model.cfg = model.cfg.replace(drop_rate=args.drop_rate)
    _set_dropout(model, args.drop_rate)
    if args.lora is not None:
        adapt(model, args.lora, base_dir=Path(base_checkpoint_dir), seed=args.seed)
    dev = resolve_device(device)
    model.to(dev)
    max_length = min(args.max_length or model.cfg.context_length, model.cfg.context_length)
    timings["load_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_ds = InstructionDataset(train_records, tokenizer)
    val_ds = InstructionDataset(val_records, tokenizer)
    timings["tokenize_s"] = time.perf_counter() - t0
    common = {"max_length": max_length, "mask_prompt": args.mask_prompt}
    train_loader = make_instruct_loader(
        train_ds,
        args.batch_size,
        shuffle=True,
        drop_last=args.drop_last and len(train_ds) >= args.batch_size,
        seed=args.seed,
        bucketing=args.length_bucketing,
        bucket_factor=args.bucket_factor,
        **common,
    )
    val_loader = (
        make_instruct_loader(val_ds, args.batch_size, shuffle=False, drop_last=False, **common)
        if len(val_ds)
        else None
    )

    sample_rec = val_records[0] if val_records else train_records[0]
    sample_prompt = format_prompt(sample_rec["instruction"], sample_rec.get("input", "") or "")
    samples: list[dict[str, Any]] = []

    def sample_hook(row: dict[str, Any]) -> None:
        clean = {
            **row,
            "prompt": sample_prompt,
            "text": _sample_response(row["text"], sample_prompt),
        }
        samples.append(clean)
        if on_sample is not None:
            on_sample(clean)

    t0 = time.perf_counter()
    result = train_lm(
        model,
        train_loader,
        val_loader,
        args,
        out_dir=out_dir / "train",
        on_metrics=on_metrics,
        on_sample=sample_hook,
        on_progress=on_progress,
        resume=resume,
        tokenizer=tokenizer,
        sample_prompt=sample_prompt,
        sample_tokens=args.sample_tokens,
        progress=progress,
    )
    timings["train_loop_s"] = time.perf_counter() - t0
    timings["train_s"] = result.train_seconds

    t0 = time.perf_counter()
    model.cpu()
    if gd.is_main():
        save_checkpoint(
            out_dir,
            model,
            hparams={**args.key_dict(), "max_length": max_length},  # not how it ran
            tokenizer_dir=Path(tok_dir) if tok_dir else None,
            meta={
                "task": "instruct",
                "prompt_format": "alpaca",
                "base_weights_sha256": weights_sha256(base_checkpoint_dir),
            },
        )
    gd.barrier()
    timings["save_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    size = model_size(model, out_dir, Path(base_checkpoint_dir), args.lora)
    if on_metrics is not None and gd.is_main():
        base_row = {"step": result.steps, "epoch": result.epochs_completed}
        on_metrics(
            [
                {**base_row, "seen": result.tokens_seen, "split": "train", "name": k, "value": v}
                for k, v in size.metrics().items()
            ]
        )
    return {
        "checkpoint": str(out_dir),
        "trainable_params": size.trainable_params,
        "model_size": size.to_dict(),
        "steps": result.steps,
        "tokens_seen": result.tokens_seen,
        "tokens_per_s": result.tokens_per_s,
        "final_train_loss": result.final_train_loss,
        "final_val_loss": result.final_val_loss,
        "resumed_from_step": result.resumed_from_step,
        "max_length": max_length,
        "n_train": len(train_ds),
        "n_val": len(val_ds),
        "samples": samples,
        "timings": timings,
        "args": args.to_dict(),
        "device": str(dev),
    }
