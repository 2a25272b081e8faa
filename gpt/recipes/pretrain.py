"""The pretraining stage: a GPT from scratch on one text file (the reference recipe:
the-verdict, 256-token windows, batch 2, AdamW 4e-4, 10 epochs).

:func:`pretrain` reads the text, splits it 90/10 by characters, stores both parts as
uint16 token files, trains with :func:`gpt.train.train_lm` (checkpoints in
``out_dir/last``, so a rerun after an interruption continues where it stopped), writes
the final checkpoint folder ``out_dir/final`` (tokenizer files included) and a loss curve
``out_dir/loss.png``, and returns a small JSON-able summary.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.data.windows import SlidingWindowDataset, load_tokens, make_loader, tokenize_to_npy
from gpt.errors import ConfigError, DataError
from gpt.train import LMTrainArgs, train_lm

__all__ = ["PretrainArgs", "PretrainResult", "plot_losses", "pretrain", "read_text_strict"]

log = logging.getLogger(__name__)


@dataclass
class PretrainArgs(LMTrainArgs):
    """Pretraining settings: the model and data windows, plus every :class:`LMTrainArgs`
    field (whose defaults are already the reference recipe)."""

    model: str = "gpt2-small-256"
    """Name of a config in :data:`gpt.model.CONFIGS` (the reference's 256-context 124M)."""
    model_overrides: dict[str, Any] = field(default_factory=dict)
    """GPTConfig fields to change on top of ``model`` (e.g. ``{"n_layers": 2}``)."""
    max_length: int = 256
    """Window length in tokens (must fit the model's context)."""
    stride: int = 256
    """Step between window starts."""
    train_ratio: float = 0.9
    """Share of the text's characters (from the start) used for training; the rest is
    validation."""
    device: str = "auto"
    """``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda``, ``cuda:1`` …"""
    plot: bool = True
    """Write ``loss.png``."""
    keep_last: bool = True
    """Keep ``out_dir/last`` (model + optimizer) after training, so a rerun is a no-op
    instead of a new training; False deletes it once ``final`` is written."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_length < 1 or self.stride < 1:
            raise ConfigError(
                f"max_length and stride must be >= 1 (got {self.max_length}, {self.stride})"
            )
        if not 0.0 < self.train_ratio < 1.0:
            raise ConfigError(f"train_ratio must be in (0, 1), got {self.train_ratio!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PretrainArgs:
        """Build from a plain dict; unknown keys raise :class:`ConfigError`."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown pretrain setting(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    def train_args(self) -> LMTrainArgs:
        """The :class:`LMTrainArgs` part."""
        names = {f.name for f in dataclasses.fields(LMTrainArgs)}
        return LMTrainArgs(**{k: v for k, v in self.to_dict().items() if k in names})


@dataclass
class PretrainResult:
    """Summary of a :func:`pretrain` run (``to_dict`` is JSON-able)."""

    out_dir: Path
    final_dir: Path
    """The final checkpoint folder."""
    last_dir: Path | None
    """The resumable checkpoint (None when ``keep_last`` is False)."""
    loss_png: Path | None
    train_tokens_path: Path
    val_tokens_path: Path
    text_sha256: str
    train_chars: int
    val_chars: int
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


def read_text_strict(path: Path) -> str:
    """The file's text, decoded as strict UTF-8; :class:`DataError` names the file and
    the byte offset of the first bad sequence."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DataError(f"{path}: text file not found; run the download step first") from exc
    except OSError as exc:
        raise DataError(f"{path}: cannot read text file ({exc})") from exc
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path}: not valid UTF-8 at byte offset {exc.start} ({exc.reason}); "
            "re-download the file or convert it to UTF-8"
        ) from exc


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as exc:
        raise ConfigError(f"device {name!r} is not a torch device name ({exc})") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available; use 'auto'")
    return dev


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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def pretrain(
    text_path: Path,
    tokenizer_dir: Path,
    out_dir: Path,
    args: PretrainArgs | None = None,
    *,
    on_metrics: Callable[[list[dict[str, Any]]], None] | None = None,
    on_sample: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
) -> PretrainResult:
    """Pretrain a GPT from scratch on ``text_path``; see the module docstring.

    ``on_metrics`` / ``on_sample`` receive what :func:`gpt.train.train_lm` emits (rows
    ``{step, epoch, seen, split, name, value}`` and samples ``{epoch, step, prompt,
    text}``). Rerunning with the same ``out_dir`` continues from ``out_dir/last``.
    """
    from gpt.checkpoint import save_checkpoint
    from gpt.model import GPT, count_parameters, get_config
    from gpt.tokenizer import Tokenizer

    args = args or PretrainArgs()
    t_start = time.perf_counter()
    text_path, tokenizer_dir, out_dir = Path(text_path), Path(tokenizer_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    cfg = get_config(args.model, **args.model_overrides)
    if args.max_length > cfg.context_length:
        raise ConfigError(
            f"max_length {args.max_length} exceeds the context length {cfg.context_length} "
            f"of model {args.model!r}; lower max_length or raise context_length"
        )
    tokenizer = Tokenizer.from_dir(tokenizer_dir)
    if cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model vocab_size {cfg.vocab_size} is smaller than the tokenizer's "
            f"{tokenizer.vocab_size}"
        )
    device = _resolve_device(args.device)

    text = read_text_strict(text_path)
    split = int(args.train_ratio * len(text))
    train_text, val_text = text[:split], text[split:]
    tok_dir = out_dir / "tokens"
    train_info = tokenize_to_npy(train_text, tokenizer, tok_dir / "train.npy")
    val_info = tokenize_to_npy(val_text, tokenizer, tok_dir / "val.npy")
    train_ds = SlidingWindowDataset(load_tokens(train_info.path), args.max_length, args.stride)
    val_ds = SlidingWindowDataset(load_tokens(val_info.path), args.max_length, args.stride)
    if len(train_ds) < args.batch_size:
        raise DataError(
            f"{text_path}: the training part ({len(train_text)} chars, "
            f"{train_info.num_tokens} tokens) gives {len(train_ds)} windows of "
            f"{args.max_length} tokens, fewer than one batch of {args.batch_size}; use a "
            "longer text, a shorter max_length/stride or a smaller batch_size"
        )
    if len(val_ds) == 0:
        raise DataError(
            f"{text_path}: the validation part ({len(val_text)} chars, {val_info.num_tokens} "
            f"tokens) is too short for one window of {args.max_length}+1 tokens; use a "
            "longer text, a lower train_ratio or a shorter max_length"
        )
    log.info(
        "pretrain: %d train / %d val tokens, %d / %d windows",
        train_info.num_tokens, val_info.num_tokens, len(train_ds), len(val_ds),
    )  # fmt: skip

    torch.manual_seed(args.seed)  # as the reference: seed, then build the model
    model = GPT(cfg).to(device)
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
        args.train_args(),
        out_dir=out_dir,
        on_metrics=on_metrics,
        on_sample=on_sample,
        resume=True,
        tokenizer=tokenizer,
        progress=progress,
    )

    text_sha = hashlib.sha256(text.encode("utf-8")).hexdigest()
    data_info = {
        "text_path": str(text_path),
        "text_sha256": text_sha,
        "train_chars": len(train_text),
        "val_chars": len(val_text),
        "train_tokens": train_info.num_tokens,
        "val_tokens": val_info.num_tokens,
        "train_windows": len(train_ds),
        "val_windows": len(val_ds),
    }
    final_dir = save_checkpoint(
        out_dir / "final",
        model,
        hparams={**args.to_dict(), "steps_per_epoch": len(train_loader)},
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
    loss_png = None
    if args.plot:
        tokens_per_epoch = len(train_loader) * args.batch_size * args.max_length
        loss_png = plot_losses(res.metrics, out_dir / "loss.png", tokens_per_epoch=tokens_per_epoch)
    last_dir = res.last_checkpoint
    if not args.keep_last and last_dir is not None:
        import shutil

        shutil.rmtree(last_dir, ignore_errors=True)
        last_dir = None

    wall = time.perf_counter() - t_start
    result = PretrainResult(
        out_dir=out_dir,
        final_dir=final_dir,
        last_dir=last_dir,
        loss_png=loss_png,
        train_tokens_path=train_info.path,
        val_tokens_path=val_info.path,
        text_sha256=text_sha,
        train_chars=len(train_text),
        val_chars=len(val_text),
        train_tokens=train_info.num_tokens,
        val_tokens=val_info.num_tokens,
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
        device=str(device),
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
