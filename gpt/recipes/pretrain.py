"""The pretraining stage: a GPT from scratch on a tokenized text (the reference recipe:
the-verdict, 256-token windows, batch 2, AdamW 4e-4, 10 epochs).

:func:`pretrain` reads the train/validation token files the tokenize stage wrote
(:mod:`gpt.recipes.prepare`), cuts them into windows, trains with :func:`gpt.train.train_lm` (checkpoints in
``out_dir/last``, so a rerun after an interruption continues where it stopped), writes
the final checkpoint folder ``out_dir/final`` (tokenizer files included) and a loss curve
``out_dir/loss.png``, and returns a small JSON-able summary.

Under a torch.distributed process group (``gpt.distributed.run_distributed``) the
training is data parallel over the ranks (``batch_size`` is the global batch) and rank 0
alone writes ``final``, ``loss.png`` and the checkpoints; the others wait for it.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import torch
from pydantic import Field, TypeAdapter, ValidationError, model_validator

from gpt.config import Args, FieldError, operational
from gpt.data.windows import SlidingWindowDataset, load_tokens, make_loader
from gpt.device import resolve_device
from gpt.distributed.launch import launchable
from gpt.errors import ConfigError, DataError
from gpt.fileio import atomic_open
from gpt.model import GPTConfig, get_config
from gpt.train import DistributedLMArgs, train_lm

__all__ = ["ModelSpec", "PretrainArgs", "PretrainResult", "plot_losses", "pretrain"]

log = logging.getLogger(__name__)


class ModelSpec(Args):
    """Which architecture to build: a named config plus field overrides."""

    name: str = "gpt2-small-256"
    """A name from :data:`gpt.model.CONFIGS` (default: the reference's 256-context 124M)."""
    overrides: dict[str, int | float | bool | str] = Field(default_factory=dict)
    """GPTConfig fields to change, e.g. ``{"n_layers": 2, "emb_dim": 64}``."""

    def build(self) -> GPTConfig:
        """The :class:`~gpt.model.GPTConfig` (unknown names/fields raise ConfigError)."""
        return get_config(self.name, **self.overrides)

    @model_validator(mode="after")
    def _buildable(self) -> Self:
        """The architecture is built with the settings: a bad name, an unknown override
        field, an override of the wrong type (strict, as every setting) or an impossible
        combination (``emb_dim`` not divisible by ``n_heads``) is refused here."""
        from gpt.tokenizer import GPT2_VOCAB_SIZE

        try:
            get_config(self.name)
        except ConfigError as exc:
            raise FieldError("name", str(exc)) from None
        hints = typing.get_type_hints(GPTConfig)
        for key, value in self.overrides.items():
            if key not in hints:
                raise FieldError(
                    f"overrides.{key}", f"not a GPTConfig field; fields: {', '.join(hints)}"
                )
            try:
                TypeAdapter(hints[key]).validate_python(value, strict=True)
            except ValidationError as exc:
                raise FieldError(f"overrides.{key}", exc.errors()[0]["msg"]) from None
        try:
            cfg = self.build()
        except ConfigError as exc:
            raise FieldError("overrides", str(exc)) from None
        if cfg.vocab_size < GPT2_VOCAB_SIZE:
            raise FieldError(
                "overrides.vocab_size",
                f"{cfg.vocab_size} is smaller than the GPT-2 tokenizer's {GPT2_VOCAB_SIZE} ids",
            )
        return self


def windows_problem(max_length: int, model: GPTConfig) -> str | None:
    """Why windows of ``max_length`` tokens cannot train ``model`` (None when they can):
    checked with the settings (``tokenize.max_length`` against ``pretrain.model``) and
    again by :func:`pretrain` for direct callers."""
    if max_length > model.context_length:
        return (
            f"the windows are {max_length} tokens but the model has a context length of "
            f"{model.context_length}; lower tokenize.max_length or raise "
            "pretrain.model.overrides.context_length"
        )
    return None


class PretrainArgs(DistributedLMArgs):
    """Pretraining settings: the model, the per-epoch sample and the loss plot, plus every
    :class:`LMTrainArgs` field (whose defaults are the reference recipe). The windows
    (length, stride) come from the token files' producer (the tokenize stage)."""

    model: ModelSpec = Field(default_factory=ModelSpec)
    """Architecture of the model trained from scratch."""
    checkpoint_every: int = operational(50, ge=0)
    """Write a resumable checkpoint every N steps (0 = only at epoch ends)."""
    sample_prompt: str | None = "Every effort moves you"
    """Prompt of the greedy sample generated after each epoch (None = no samples)."""
    sample_tokens: int = Field(50, ge=0)
    """New tokens in each sample."""
    plot: bool = True
    """Write ``loss.png`` (train/val loss against tokens seen)."""


@dataclass
class PretrainResult:
    """Summary of a :func:`pretrain` run (``to_dict`` is JSON-able)."""

    out_dir: Path
    final_dir: Path
    """The final checkpoint folder."""
    last_dir: Path | None
    """The resumable checkpoint (None when ``keep_last`` is False)."""
    loss_png: Path | None
    train_tokens: int
    val_tokens: int
    train_windows: int
    val_windows: int
    steps: int
    epochs: int
    tokens_seen: int
    tokens_per_s: float
    """Training throughput over all (resumed) runs, evaluation excluded."""
    train_seconds: float
    wall_seconds: float
    """Wall time of this call (data, training, checkpoint, plot)."""
    final_train_loss: float
    final_val_loss: float
    resumed_from_step: int | None
    parameters: int
    device: str
    config: dict[str, Any]
    samples: list[dict[str, Any]]
    metrics: list[dict[str, Any]] = field(default_factory=list, repr=False)
    """All metrics rows (left out of :meth:`to_dict`)."""

    def to_dict(self, *, include_metrics: bool = False) -> dict[str, Any]:
        """Plain dict with paths as strings."""
        d: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if f.name == "metrics" and not include_metrics:
                continue
            v = getattr(self, f.name)
            d[f.name] = str(v) if isinstance(v, Path) else v
        return d


def plot_losses(
    metrics: list[dict[str, Any]], path: Path, *, tokens_per_epoch: int | None = None
) -> Path:
    """Train/val loss against tokens seen (epochs on a top axis when ``tokens_per_epoch``),
    written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    def series(split: str) -> tuple[list[int], list[float]]:
        rows = [r for r in metrics if r["split"] == split and r["name"] == "loss"]
        return [r["seen"] for r in rows], [r["value"] for r in rows]

    fig = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for split, style in (("train", "-"), ("val", "-.")):
        xs, ys = series(split)
        ax.plot(xs, ys, style, label=f"{split} loss")
    ax.set_xlabel("tokens seen")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    if tokens_per_epoch:
        top = ax.secondary_xaxis(
            "top",
            functions=(lambda t: t / tokens_per_epoch, lambda e: e * tokens_per_epoch),
        )
        top.set_xlabel("epochs")
    fig.tight_layout()
    path = Path(path)
    with atomic_open(path, "wb", fsync=False) as f:
        fig.savefig(f, format="png")
    return path


def _write_outputs(
    model: torch.nn.Module,
    args: PretrainArgs,
    res: Any,
    out_dir: Path,
    tokenizer_dir: Path,
    data_info: dict[str, Any],
    steps_per_epoch: int,
    keep_last: bool,
) -> None:
    """The final checkpoint, the loss plot, and (unless ``keep_last``) the removal of the
    resumable state: what one process (rank 0) writes after training."""
    from gpt.checkpoint import save_checkpoint

    save_checkpoint(
        out_dir / "final",
        model,
        hparams={**args.key_dict(), "steps_per_epoch": steps_per_epoch},  # not how it ran
        tokenizer_dir=tokenizer_dir,
        meta={
            "stage": "pretrain",
            **data_info,
            "steps": res.steps,
            "tokens_seen": res.tokens_seen,
            "final_train_loss": res.final_train_loss,
            "final_val_loss": res.final_val_loss,
        },
    )
    if args.plot:
        tokens_per_epoch = steps_per_epoch * args.batch_size * data_info["max_length"]
        plot_losses(res.metrics, out_dir / "loss.png", tokens_per_epoch=tokens_per_epoch)
    if not keep_last and res.last_checkpoint is not None:
        import shutil

        shutil.rmtree(res.last_checkpoint, ignore_errors=True)


@launchable
def pretrain(
    train_tokens: Path,
    val_tokens: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    args: PretrainArgs | None = None,
    *,
    max_length: int,
    stride: int,
    device: str = "auto",
    keep_last: bool = True,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a GPT from scratch on two uint16 token files (train, validation); see the
    module docstring.

    Windows are ``max_length`` tokens every ``stride``. ``on_metrics`` / ``on_sample`` /
    ``on_progress`` receive what :func:`gpt.train.train_lm` emits (rows ``{step, epoch,
    seen, split, name, value}``, samples ``{epoch, step, prompt, text}``, ``(step,
    steps)``). Rerunning with the same
    ``out_dir`` continues from ``out_dir/last``; ``keep_last=False`` deletes that
    resumable state (weights + optimizer, ~12 bytes/parameter) once ``final`` is written.
    """
    from gpt import distributed as gd
    from gpt.model import GPT, count_parameters
    from gpt.tokenizer import Tokenizer

    args = args or PretrainArgs()
    t_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if max_length < 1 or stride < 1:
        raise ConfigError(f"max_length and stride must be >= 1 (got {max_length}, {stride})")

    cfg = args.model.build()
    problem = windows_problem(max_length, cfg)
    if problem:
        raise ConfigError(problem)
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    dev = resolve_device(device)

    train_ids, val_ids = load_tokens(Path(train_tokens)), load_tokens(Path(val_tokens))
    train_ds = SlidingWindowDataset(train_ids, max_length, stride)
    val_ds = SlidingWindowDataset(val_ids, max_length, stride)
    if len(train_ds) < args.batch_size:
        raise DataError(
            f"{train_tokens}: {len(train_ids)} training tokens give {len(train_ds)} windows "
            f"of {max_length}, fewer than one batch of {args.batch_size}; use a longer "
            "text, a shorter tokenize.max_length/stride or a smaller pretrain.batch_size"
        )
    if len(val_ds) == 0:
        raise DataError(
            f"{val_tokens}: {len(val_ids)} validation tokens are too few for one window of "
            f"{max_length}+1 tokens; use a longer text, a lower tokenize.train_ratio or a "
            "shorter tokenize.max_length"
        )
    log.info(
        "pretrain: %d train / %d val tokens, %d / %d windows, on %s",
        len(train_ids), len(val_ids), len(train_ds), len(val_ds), dev,
    )  # fmt: skip

    torch.manual_seed(args.seed)  # as the reference: seed, then build the model
    model = GPT(cfg).to(dev)
    train_loader = make_loader(
        train_ds, args.batch_size, shuffle=True, drop_last=True, seed=args.seed
    )
    val_loader = make_loader(
        val_ds, args.batch_size, shuffle=False, drop_last=False, seed=args.seed
    )

    res = train_lm(
        model,
        train_loader,
        val_loader,
        args,
        out_dir=out_dir,
        on_metrics=on_metrics,
        on_sample=on_sample,
        on_progress=on_progress,
        resume=True,
        tokenizer=tokenizer,
        sample_prompt=args.sample_prompt,
        sample_tokens=args.sample_tokens,
        progress=progress,
    )

    data_info = {
        "train_tokens": len(train_ids),
        "val_tokens": len(val_ids),
        "train_windows": len(train_ds),
        "val_windows": len(val_ds),
        "max_length": max_length,
        "stride": stride,
    }
    final_dir = (out_dir / "final").expanduser().resolve()
    loss_png = out_dir / "loss.png" if args.plot else None
    last_dir = res.last_checkpoint
    if gd.is_main():
        _write_outputs(
            model, args, res, out_dir, tokenizer_dir, data_info, len(train_loader), keep_last
        )
    gd.barrier()
    if not keep_last:
        last_dir = None

    wall = time.perf_counter() - t_start
    result = PretrainResult(
        out_dir=out_dir,
        final_dir=final_dir,
        last_dir=last_dir,
        loss_png=loss_png,
        train_tokens=len(train_ids),
        val_tokens=len(val_ids),
        train_windows=len(train_ds),
        val_windows=len(val_ds),
        steps=res.steps,
        epochs=res.epochs_completed,
        tokens_seen=res.tokens_seen,
        tokens_per_s=res.tokens_per_s,
        train_seconds=res.train_seconds,
        wall_seconds=wall,
        final_train_loss=res.final_train_loss,
        final_val_loss=res.final_val_loss,
        resumed_from_step=res.resumed_from_step,
        parameters=count_parameters(model),
        device=str(dev),
        config=cfg.to_dict(),
        samples=res.samples,
        metrics=res.metrics,
    )
    if not math.isfinite(result.final_val_loss):
        log.warning("pretrain finished without a finite validation loss")
    log.info(
        "pretrain done: %d steps, train %.3f / val %.3f, %.0f tokens/s, %.1f s",
        res.steps, res.final_train_loss, res.final_val_loss, res.tokens_per_s, wall,
    )  # fmt: skip
    return result
