"""Checkpoints as folders, written atomically and verified on load.

Layout of a checkpoint folder::

    manifest.json              sha256 + size of every other file (checked on load)
    config.json                GPTConfig fields + "kind" ("lm" | "classifier") (+ num_classes, labels)
    model.safetensors          weights (a tied output head is stored once, as tok_emb.weight)
    adapter.safetensors        instead of model.safetensors in a LoRA checkpoint: the adapter
                               only; config.json's "adapter" names the base (gpt.adapter)
    hparams.json               training hyperparameters ({} when none)
    meta.json                  free-form provenance ({} when none)
    optimizer.pt               optimizer state_dict (optional; read with weights_only=True)
    trainer_state.json         step/epoch/tokens_seen... (optional); tensor values (e.g. RNG
    trainer_tensors.safetensors  states) live in this file and are put back on load
    tokenizer/encoder.json, tokenizer/vocab.bpe   (optional)
    record.json                how the training went in wall-clock terms (optional; NOT in
                               the manifest)

Every file but ``record.json`` depends only on what was computed: the same model and
state written twice — by two runs, or by a run killed and resumed — give the same bytes
(sorted JSON keys, a canonical safetensors header, a fixed archive name inside
optimizer.pt), so the manifest, and every digest taken of the folder, are equal too.
Times and speeds differ between such runs; they go to ``record.json``.

Nothing is ever unpickled except through ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt.adapter import ADAPTER_WEIGHTS, adapter_payload, base_of, base_record, build_adapted_model
from gpt.checkpoint_io import (
    fsync_dir,
    fsync_file,
    join_tensors,
    load_optimizer,
    load_safetensors,
    old_versions,
    read_json,
    remove_stale_olds,
    restore_swapped,
    split_tensors,
    swap_in,
    write_json,
)
from gpt.errors import CheckpointError, ConfigError
from gpt.fileio import save_safetensors
from gpt.fileio import sha256_file as _sha256
from gpt.model import GPT, GPTConfig

__all__ = [
    "CHECKPOINT_FORMAT",
    "LoadedCheckpoint",
    "load_checkpoint",
    "read_checkpoint_config",
    "recover_checkpoint",
    "save_checkpoint",
    "verify_checkpoint",
    "weights_sha256",
]

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "gptflow-checkpoint/1"
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
HPARAMS = "hparams.json"
META = "meta.json"
OPTIMIZER = "optimizer.pt"
TRAINER_STATE = "trainer_state.json"
TRAINER_TENSORS = "trainer_tensors.safetensors"
RECORD = "record.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("encoder.json", "vocab.bpe")
ADAPTER = "adapter.safetensors"  # in place of model.safetensors in a LoRA folder (gpt.adapter)


@dataclass
class LoadedCheckpoint:
    """What :func:`load_checkpoint` returns."""

    model: GPT
    """The model, in eval mode, on ``map_location``."""
    config: GPTConfig
    """Its architecture."""
    hparams: dict[str, Any]
    """Training hyperparameters saved with it ({} when none)."""
    optimizer_state: dict[str, Any] | None
    """Optimizer state_dict (only with ``with_optimizer=True`` and when saved)."""
    trainer_state: dict[str, Any] | None
    """Trainer bookkeeping (step, epoch, tokens seen, RNG states ...) or None."""
    kind: str
    """``"lm"`` or ``"classifier"``."""
    tokenizer_dir: Path | None
    """Folder with encoder.json + vocab.bpe inside the checkpoint, if saved."""
    meta: dict[str, Any] = field(default_factory=dict)
    """Free-form provenance."""
    record: dict[str, Any] = field(default_factory=dict)
    """Wall-clock facts saved with it (``record.json``; {} when none)."""
    num_classes: int | None = None
    """Classifier output count (None for a language model)."""
    labels: list[str] | None = None
    """Classifier label names in output order, if saved."""
    path: Path | None = None
    """The checkpoint folder."""
    adapter: dict[str, Any] | None = None
    """A LoRA checkpoint's ``adapter`` settings and base identity (:mod:`gpt.adapter`)."""


# --------------------------------------------------------------------------- helpers


def _unwrap(model: nn.Module) -> GPT:
    inner = getattr(model, "_orig_mod", model)  # torch.compile wrapper
    if not isinstance(inner, GPT):
        raise CheckpointError(f"save_checkpoint needs a gpt.model.GPT, got {type(model).__name__}")
    return inner


def _model_kind(model: GPT) -> tuple[str, int | None]:
    head = model.out_head
    if not isinstance(head, nn.Linear):
        raise CheckpointError(f"out_head must be an nn.Linear, got {type(head).__name__}")
    if head.out_features == model.cfg.vocab_size and head.bias is None:
        return "lm", None
    return "classifier", head.out_features


# --------------------------------------------------------------------------- save


def save_checkpoint(
    dir: str | Path,
    model: nn.Module,
    *,
    hparams: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    tokenizer_dir: str | Path | None = None,
    extra_state: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    labels: list[str] | None = None,
    record: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` (and optional training state) as a checkpoint folder at ``dir``.

    The folder is built in a hidden sibling temp folder and renamed into place; an
    existing checkpoint at ``dir`` stays intact until the new one is complete.
    ``extra_state`` becomes trainer_state.json (tensors inside it are stored in
    safetensors). ``labels`` (or ``meta["labels"]``) names classifier outputs.
    ``record`` (times, speeds: what differs between two runs computing the same thing)
    becomes record.json, outside the manifest. Returns the checkpoint path.
    """
    target = Path(dir).expanduser().resolve()
    gpt = _unwrap(model)
    kind, num_classes = _model_kind(gpt)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as exc:
        raise CheckpointError(
            f"cannot write checkpoint {target}: cannot create its folder ({exc}); "
            "check that the parent path is a writable folder"
        ) from exc
    try:
        files: list[Path] = []

        # weights
        tied = gpt.is_tied
        adapter = adapter_payload(gpt, target)  # LoRA: the adapter alone (gpt.adapter)
        weights = WEIGHTS if adapter is None else ADAPTER_WEIGHTS
        state = (
            {
                k: v.detach().cpu().contiguous()
                for k, v in gpt.state_dict().items()
                if not (tied and k == "out_head.weight")
            }
            if adapter is None
            else adapter[0]
        )
        save_safetensors(state, tmp / weights, {"format": "pt", "tied": str(tied).lower()})
        files.append(tmp / weights)

        config: dict[str, Any] = {**gpt.cfg.to_dict(), "kind": kind, "tied_head": tied}
        if adapter is not None:
            config["adapter"] = adapter[1]
            record = {**(record or {}), **base_record(gpt)}  # where the base was: a fact
        if kind == "classifier":
            config["num_classes"] = num_classes
            lab = labels if labels is not None else (meta or {}).get("labels")
            if lab is not None:
                lab = [str(x) for x in lab]
                if len(lab) != num_classes:
                    raise CheckpointError(
                        f"labels {lab} do not match the classifier's {num_classes} outputs"
                    )
                config["labels"] = lab
        write_json(tmp / CONFIG, config)
        write_json(tmp / HPARAMS, hparams or {})
        write_json(tmp / META, meta or {})
        files += [tmp / CONFIG, tmp / HPARAMS, tmp / META]

        if optimizer is not None:
            opt_state = optimizer.state_dict() if hasattr(optimizer, "state_dict") else optimizer
            try:
                torch.save(opt_state, tmp / OPTIMIZER)
            except RuntimeError as exc:  # torch's stream writer reports I/O errors so
                raise OSError(f"writing {OPTIMIZER} failed: {exc}") from exc
            files.append(tmp / OPTIMIZER)

        if extra_state is not None:
            tensors: dict[str, torch.Tensor] = {}
            plain = split_tensors(dict(extra_state), tensors, "state")
            write_json(tmp / TRAINER_STATE, plain)
            files.append(tmp / TRAINER_STATE)
            if tensors:
                save_safetensors(tensors, tmp / TRAINER_TENSORS)
                files.append(tmp / TRAINER_TENSORS)

        if tokenizer_dir is not None:
            src = Path(tokenizer_dir)
            (tmp / TOKENIZER_DIR).mkdir()
            for name in TOKENIZER_FILES:
                if not (src / name).is_file():
                    raise CheckpointError(f"tokenizer file {src / name} not found")
                shutil.copyfile(src / name, tmp / TOKENIZER_DIR / name)
                files.append(tmp / TOKENIZER_DIR / name)

        manifest = {
            "format": CHECKPOINT_FORMAT,
            "files": {
                f.relative_to(tmp).as_posix(): {"sha256": _sha256(f), "size": f.stat().st_size}
                for f in files
            },
        }
        write_json(tmp / MANIFEST, manifest)
        written = [*files, tmp / MANIFEST]
        if record:
            write_json(tmp / RECORD, record)
            written.append(tmp / RECORD)
        for f in written:
            fsync_file(f)
        fsync_dir(tmp)

        if target.exists():
            swap_in(tmp, target)
        else:
            os.rename(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(
            f"cannot write checkpoint {target}: {exc}; the previous checkpoint there (if "
            "any) is unchanged: free disk space or fix the folder and save again"
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale_olds(target)
    log.info("saved %s checkpoint to %s", kind, target)
    return target


def recover_checkpoint(dir: str | Path) -> Path | None:
    """Undo an interrupted :func:`save_checkpoint` swap: when ``dir`` is missing but a
    save killed between its two renames left the previous checkpoint aside (complete:
    verified against its manifest), it is renamed back. Returns ``dir`` when a checkpoint
    folder is (now) there, else None."""
    return restore_swapped(dir, verify_checkpoint)


# --------------------------------------------------------------------------- load


def _require_dir(path: Path) -> None:
    if recover_checkpoint(path) is not None:
        return
    olds = old_versions(path)
    hint = (
        f" (an interrupted save left an incomplete previous version at {olds[0]})" if olds else ""
    )
    raise CheckpointError(f"checkpoint folder {path} does not exist{hint}")


def verify_checkpoint(dir: str | Path) -> dict[str, Any]:
    """Check every file listed in manifest.json (presence, size, sha256); returns the
    manifest. Raises :class:`CheckpointError` naming the first bad file."""
    path = Path(dir).expanduser()
    _require_dir(path)
    manifest = read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"{path / MANIFEST} is not a {CHECKPOINT_FORMAT} manifest; re-save the checkpoint"
        )
    entries = manifest.get("files")
    has_weights = isinstance(entries, dict) and (WEIGHTS in entries or ADAPTER in entries)
    if not has_weights or CONFIG not in entries:
        raise CheckpointError(f"{path / MANIFEST} does not list {WEIGHTS} and {CONFIG}")
    for rel, info in entries.items():
        f = path / rel
        if ".." in Path(rel).parts or Path(rel).is_absolute():
            raise CheckpointError(f"{path / MANIFEST} names a file outside the folder: {rel!r}")
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing")
        size = f.stat().st_size
        if size != info.get("size"):
            raise CheckpointError(
                f"checkpoint file {f} is corrupt or truncated: {size} bytes, "
                f"manifest says {info.get('size')}"
            )
        if _sha256(f) != info.get("sha256"):
            raise CheckpointError(
                f"checkpoint file {f} is corrupt: sha256 does not match {MANIFEST}"
            )
    return manifest


def read_checkpoint_config(dir: str | Path) -> dict[str, Any]:
    """config.json of a checkpoint (cheap: no weights are read, nothing verified)."""
    path = Path(dir).expanduser()
    _require_dir(path)
    cfg = read_json(path / CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{path / CONFIG} must hold a JSON object")
    return cfg


def load_checkpoint(
    dir: str | Path,
    *,
    map_location: str | torch.device = "cpu",
    with_optimizer: bool = False,
    verify: bool = True,
    merge: bool = True,
    base: str | Path | None = None,
) -> LoadedCheckpoint:
    """Load a checkpoint folder written by :func:`save_checkpoint`.

    Every file is checked against manifest.json first (``verify``); weights come from
    safetensors, the optimizer state through ``torch.load(weights_only=True)``. Any
    missing, corrupt or unsafe file raises :class:`CheckpointError` naming it.

    A LoRA checkpoint (:mod:`gpt.adapter`) is put on its base checkpoint (found where
    it was, or at ``base``; refused unless it is the same base) and merged into it,
    unless ``merge=False`` (resuming training needs the adapter apart).
    """
    path = Path(dir).expanduser()
    _require_dir(path)
    if verify:
        verify_checkpoint(path)
    raw = read_checkpoint_config(path)
    kind = raw.pop("kind", "lm")
    raw.pop("tied_head", None)
    adapter = raw.pop("adapter", None)
    num_classes = raw.pop("num_classes", None)
    labels = raw.pop("labels", None)
    try:
        cfg = GPTConfig.from_dict(raw)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path / CONFIG}: {exc}") from exc
    if kind not in ("lm", "classifier"):
        raise CheckpointError(f"{path / CONFIG}: unknown kind {kind!r} (expected lm|classifier)")
    if kind == "classifier" and not (isinstance(num_classes, int) and num_classes > 0):
        raise CheckpointError(f"{path / CONFIG}: classifier checkpoint needs num_classes")

    if adapter is not None:
        model = build_adapted_model(
            path,
            adapter,
            cfg,
            load_safetensors(path / ADAPTER, map_location),
            num_classes=int(num_classes) if kind == "classifier" else None,
            map_location=map_location,
            merge=merge,
            base=base,
            load_base=load_checkpoint,
        )
    else:
        model = _load_model(path, cfg, kind, num_classes, map_location)

    hparams = read_json(path / HPARAMS) if (path / HPARAMS).exists() else {}
    meta = read_json(path / META) if (path / META).exists() else {}

    trainer_state = None
    if (path / TRAINER_STATE).exists():
        tensors = (
            load_safetensors(path / TRAINER_TENSORS, "cpu")
            if (path / TRAINER_TENSORS).exists()
            else {}
        )
        trainer_state = join_tensors(
            read_json(path / TRAINER_STATE),
            tensors,
            f"{TRAINER_TENSORS} lacks tensor {{key}} named in {TRAINER_STATE}",
        )

    optimizer_state = None
    if with_optimizer and (path / OPTIMIZER).exists():
        optimizer_state = load_optimizer(path / OPTIMIZER, map_location)

    tok = path / TOKENIZER_DIR
    if adapter is not None and not (tok / TOKENIZER_FILES[0]).is_file():
        tok = Path(base_of(model)["path"]) / TOKENIZER_DIR  # a LoRA folder: its base's
    tokenizer_dir = tok if all((tok / n).is_file() for n in TOKENIZER_FILES) else None
    return LoadedCheckpoint(
        model=model,
        config=cfg,
        hparams=hparams,
        optimizer_state=optimizer_state,
        trainer_state=trainer_state,
        kind=kind,
        tokenizer_dir=tokenizer_dir,
        meta=meta,
        record=_read_record(path / RECORD),
        num_classes=num_classes,
        labels=labels,
        path=path,
        adapter=adapter,
    )


def _load_model(
    path: Path, cfg: GPTConfig, kind: str, num_classes: Any, map_location: str | torch.device
) -> GPT:
    """The model of a full checkpoint folder (model.safetensors), in eval mode."""
    state = load_safetensors(path / WEIGHTS, map_location)
    with torch.device("meta"):
        model = GPT(cfg)
        if kind == "classifier":
            model.replace_head(int(num_classes))
    tied = model.is_tied
    expected = set(model.state_dict())
    if tied:
        expected.discard("out_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path / WEIGHTS} does not fit the model in {CONFIG}: "
            f"missing {missing[:10]}{'...' if len(missing) > 10 else ''}, "
            f"unexpected {unexpected[:10]}{'...' if len(unexpected) > 10 else ''}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(
            f"{path / WEIGHTS} does not fit the model in {CONFIG}: {exc}"
        ) from exc
    if tied:
        model.out_head.weight = model.tok_emb.weight
    model.eval()
    return model


def _read_record(f: Path) -> dict[str, Any]:
    """record.json as a dict; {} when it is missing or unreadable (it is not covered by
    the manifest and holds nothing a load depends on: times only)."""
    try:
        value = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def weights_sha256(dir: str | Path) -> str:
    """The sha256 of a checkpoint's weights file as its manifest lists it: what names a
    checkpoint's content in another checkpoint's provenance (a path would differ between
    two artifacts folders holding the same model)."""
    path = Path(dir).expanduser()
    _require_dir(path)
    manifest = read_json(path / MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    entry = (files.get(WEIGHTS) or files.get(ADAPTER)) if isinstance(files, dict) else None
    sha = entry.get("sha256") if isinstance(entry, dict) else None
    if not isinstance(sha, str):
        raise CheckpointError(
            f"{path / MANIFEST} lists neither {WEIGHTS} nor {ADAPTER}; re-save the checkpoint"
        )
    return sha
