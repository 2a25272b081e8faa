"""LoRA checkpoints: a folder with the adapter alone, tied to the base it adapts.

:func:`save_checkpoint <gpt.checkpoint.save_checkpoint>` of a model holding LoRA layers
writes the usual folder with ``adapter.safetensors`` in place of ``model.safetensors``:
every ``lora_A`` / ``lora_B``, plus the few full tensors the base does not hold (a new
class head) or that were trained outright (``trainable_blocks``). Its ``config.json``
gains an ``adapter`` object::

    {"format": "gptflow-lora/1",
     "base": {"relative": FROM_THIS_FOLDER, "sha256": OF_ITS_MANIFEST},
     "rank": 16, "alpha": 16.0, "dropout": 0.0,
     "targets": {"blocks.0.att.qkv": ["query", "key", "value"], ...},
     "full": ["out_head.weight", "out_head.bias"]}

The base's identity is the sha256 of its ``manifest.json``, which lists the sha256 of
every file of the base, so it names the base's exact bytes. The base's absolute path is
where it was when the adapter was saved: a fact of that run, so it is kept in the
folder's ``record.json`` (outside its manifest), not in ``config.json`` — the same
adapter trained in two artifacts folders is the same bytes. Loading finds the base
(relative path first, so a moved artifacts folder still works, then the recorded one),
refuses one whose digest differs, loads it verified, puts the adapter on and, unless
asked not to, merges it (:func:`gpt.lora.merge_lora`) — so every reader of checkpoints
(generation, response extraction, classification, export) works on LoRA folders as is.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gpt.errors import CheckpointError, ConfigError
from gpt.fileio import sha256_file
from gpt.lora import (
    LoraArgs,
    apply_lora,
    count_trainable,
    lora_modules,
    lora_targets,
    merge_lora,
)
from gpt.model import GPT, GPTConfig

__all__ = [
    "ADAPTER_FORMAT",
    "ADAPTER_WEIGHTS",
    "adapt",
    "adapter_payload",
    "base_digest",
    "base_of",
    "build_adapted_model",
    "model_size",
]

ADAPTER_FORMAT = "gptflow-lora/1"
ADAPTER_WEIGHTS = "adapter.safetensors"
_BASE_ATTR = "lora_base"


def base_digest(base_dir: str | Path) -> str:
    """The identity of a checkpoint folder: sha256 of its ``manifest.json``."""
    manifest = Path(base_dir) / "manifest.json"
    if not manifest.is_file():
        raise CheckpointError(f"{base_dir} is not a checkpoint folder (no manifest.json)")
    return sha256_file(manifest)


def _base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


#: The key of the base's absolute path in a LoRA checkpoint's ``record.json``.
BASE_PATH_RECORD = "adapter_base_path"


def _own_state(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict as a checkpoint stores it (a tied head once, as the embedding)."""
    tied = model.is_tied
    return {k: v for k, v in model.state_dict().items() if not (tied and k == "out_head.weight")}


def base_of(model: nn.Module) -> dict[str, Any] | None:
    """The base checkpoint a LoRA model adapts: ``{"path", "sha256", "new"}`` (None when
    it was not adapted from a checkpoint)."""
    return getattr(model, _BASE_ATTR, None)


def adapt(
    model: GPT, args: LoraArgs, *, base_dir: str | Path | None, seed: int, freeze: bool = True
) -> int:
    """Put LoRA adapters on the layers ``args.layers`` names (see
    :func:`gpt.lora.apply_lora`), with ``freeze`` freezing everything else first;
    returns how many layers got one. With ``base_dir``
    (the checkpoint ``model`` was loaded from) the model remembers that base, and which
    of its tensors the base lacks (e.g. a new class head), for :func:`adapter_payload`."""
    if base_dir is not None:
        base = Path(base_dir).expanduser().resolve()
        shapes = _base_shapes(base)
        new = [k for k, v in _own_state(model).items() if shapes.get(k) != tuple(v.shape)]
        setattr(model, _BASE_ATTR, {"path": str(base), "sha256": base_digest(base), "new": new})
    targets = lora_targets(model, args.layers)
    made = apply_lora(
        model,
        targets,
        rank=args.rank,
        alpha=args.alpha,
        dropout=args.dropout,
        seed=seed,
        freeze=freeze,
    )
    return len(made)


def adapter_payload(
    model: GPT, target: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """``(tensors, config["adapter"])`` for saving ``model`` as a LoRA checkpoint at
    ``target``, or None when ``model`` holds no LoRA layer (a full checkpoint)."""
    mods = lora_modules(model)
    if not mods:
        return None
    base = base_of(model)
    if base is None:
        raise CheckpointError(
            f"cannot save {target}: the model has LoRA layers but no base checkpoint to "
            "refer to; adapt it with gpt.adapter.adapt(..., base_dir=BASE) or merge it "
            "first (gpt.lora.merge_lora) to save a full checkpoint"
        )
    settings = {(m.rank, m.alpha, m.dropout) for m in mods.values()}
    if len(settings) != 1:
        raise CheckpointError(f"cannot save {target}: LoRA layers differ in rank/alpha/dropout")
    rank, alpha, dropout = settings.pop()
    tensors: dict[str, torch.Tensor] = {}
    for path, m in mods.items():
        tensors[f"{path}.lora_A"] = m.lora_A
        tensors[f"{path}.lora_B"] = m.lora_B
    state = _own_state(model)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    full = [k for k in state if k not in tensors and (k in base["new"] or k in trained)]
    tensors |= {k: state[k] for k in full}
    config = {
        "format": ADAPTER_FORMAT,
        "base": {
            "relative": os.path.relpath(base["path"], target),
            "sha256": base["sha256"],
        },
        "rank": rank,
        "alpha": alpha,
        "dropout": dropout,
        "targets": {p: list(m.part_names) for p, m in mods.items()},
        "full": full,
    }
    return {k: v.detach().cpu().contiguous() for k, v in tensors.items()}, config


def base_record(model: nn.Module) -> dict[str, str]:
    """What a LoRA checkpoint's ``record.json`` keeps of its base: where it was."""
    base = base_of(model)
    return {BASE_PATH_RECORD: base["path"]} if base else {}


def _recorded_base(folder: Path) -> str | None:
    import json

    try:
        value = json.loads((folder / "record.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    found = value.get(BASE_PATH_RECORD) if isinstance(value, dict) else None
    return found if isinstance(found, str) else None


def _find_base(folder: Path, info: dict[str, Any], base: str | Path | None) -> Path:
    if base is not None:
        candidates = [Path(base).expanduser()]
    else:
        recorded = _recorded_base(folder)
        candidates = [folder / info.get("relative", ""), *([Path(recorded)] if recorded else [])]
    found = next((c for c in candidates if (c / "manifest.json").is_file()), None)
    if found is None:
        raise CheckpointError(
            f"{folder} is a LoRA adapter of the checkpoint {info.get('relative')} (relative to "
            "it), which is not "
            f"there (looked at {', '.join(str(c) for c in candidates)}); restore that base "
            "checkpoint or pass its new location"
        )
    digest = base_digest(found)
    if digest != info.get("sha256"):
        raise CheckpointError(
            f"{folder} is a LoRA adapter of the base with manifest sha256 "
            f"{str(info.get('sha256'))[:12]}…, but {found} has {digest[:12]}…: another "
            "checkpoint; use the adapter with the base it was trained on"
        )
    return found


def build_adapted_model(
    folder: Path,
    info: dict[str, Any],
    cfg: GPTConfig,
    tensors: dict[str, torch.Tensor],
    *,
    num_classes: int | None,
    map_location: str | torch.device,
    merge: bool,
    base: str | Path | None = None,
    load_base: Callable[..., Any],
) -> GPT:
    """The model a LoRA checkpoint describes: its verified base with ``tensors`` (the
    folder's ``adapter.safetensors``) put on, merged when ``merge`` (else with trainable
    adapters, as training left it). ``load_base`` loads the base folder (the
    checkpoint loader, passed in: it is the caller)."""
    if info.get("format") != ADAPTER_FORMAT:
        raise CheckpointError(
            f"{folder}/config.json: unknown adapter format {info.get('format')!r} "
            f"(expected {ADAPTER_FORMAT})"
        )
    base_dir = _find_base(folder, info["base"], base)
    base_ck = load_base(base_dir, map_location=map_location)
    if base_ck.kind != "lm" or base_ck.config.replace(drop_rate=cfg.drop_rate) != cfg:
        raise CheckpointError(
            f"{folder} does not fit its base {base_dir}: the architectures differ "
            f"({cfg.to_dict()} vs {base_ck.config.to_dict()})"
        )
    with torch.device("meta"):
        model = GPT(cfg)
        if num_classes is not None:
            model.replace_head(num_classes)
    full = set(info.get("full", []))
    state = {k: v for k, v in _own_state(base_ck.model).items() if k not in full}
    state |= {k: tensors[k] for k in full if k in tensors}
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: adapter does not fit its base: {exc}") from exc
    if cfg.tie_weights and num_classes is None and "out_head.weight" not in state:
        model.out_head.weight = model.tok_emb.weight
    targets = {p: tuple(parts) for p, parts in info["targets"].items()}
    try:
        layers = apply_lora(
            model,
            targets,
            rank=int(info["rank"]),
            alpha=float(info["alpha"]),
            dropout=float(info.get("dropout", 0.0)),
        )
    except (AttributeError, ConfigError) as exc:
        raise CheckpointError(f"{folder}: adapter targets do not fit the model: {exc}") from exc
    expected = {f"{p}.lora_{x}" for p in layers for x in "AB"} | full
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{folder / ADAPTER_WEIGHTS} does not match config.json: missing {missing[:6]}, "
            f"unexpected {unexpected[:6]}"
        )
    for path, layer in layers.items():
        for x in "AB":
            t = tensors[f"{path}.lora_{x}"]
            p = getattr(layer, f"lora_{x}")
            if t.shape != p.shape:
                raise CheckpointError(
                    f"{folder / ADAPTER_WEIGHTS}: {path}.lora_{x} has shape {tuple(t.shape)}, "
                    f"expected {tuple(p.shape)}"
                )
            setattr(layer, f"lora_{x}", nn.Parameter(t.to(map_location)))
    for name, p in model.named_parameters():
        if name in full:
            p.requires_grad_(True)
    identity = {"path": str(base_dir.resolve()), "sha256": info["base"]["sha256"]}
    setattr(model, _BASE_ATTR, {**identity, "new": sorted(full)})
    if merge:
        merge_lora(model)
    return model.eval()


@dataclass
class ModelSize:
    """What a finetune trained and stored, for the metrics and the report."""

    trainable_params: int
    """Parameters that received gradients."""
    checkpoint_bytes: int
    """Bytes of the checkpoint folder (the adapter alone for LoRA)."""
    base: dict[str, str]
    """The base checkpoint: ``{"name", "sha256"}`` (its folder's name, the sha256 of its
    manifest: content, not a path, so two artifacts folders give the same result)."""
    lora: dict[str, Any] | None = None
    """rank, alpha, dropout and layers of a LoRA finetune (None: full finetune)."""

    def metrics(self) -> dict[str, float]:
        """The numbers, as metric rows name → value."""
        return {
            "trainable_params": float(self.trainable_params),
            "checkpoint_bytes": float(self.checkpoint_bytes),
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_size(
    model: nn.Module, checkpoint_dir: Path, base_dir: Path, lora: LoraArgs | None = None
) -> ModelSize:
    """The :class:`ModelSize` of ``model`` saved at ``checkpoint_dir`` from ``base_dir``."""
    files = [f for f in Path(checkpoint_dir).rglob("*") if f.is_file() and f.name != "record.json"]
    return ModelSize(
        trainable_params=count_trainable(model),
        checkpoint_bytes=sum(f.stat().st_size for f in files),
        base={"name": Path(base_dir).resolve().name, "sha256": base_digest(base_dir)},
        lora=lora.to_dict() if lora is not None else None,
    )
