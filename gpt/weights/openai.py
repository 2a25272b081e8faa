"""Import OpenAI's GPT-2 TensorFlow checkpoints (hparams.json + model.ckpt.*).

TensorFlow is imported lazily, only here. The model keeps a fused QKV ``nn.Linear``, so
``c_attn`` needs only the Conv1D -> Linear transpose (its output columns are already
ordered q | k | v, heads contiguous, exactly like our ``qkv`` projection).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt.errors import CheckpointError, ConfigError
from gpt.model import GPT, GPTConfig

__all__ = [
    "convert_openai_checkpoint",
    "load_openai_gpt2",
    "openai_name_map",
    "read_openai_config",
]

log = logging.getLogger(__name__)

#: Per-block TF name (under ``model/h{i}/``) -> (our parameter name under
#: ``blocks.{i}.``, Conv1D weight needing squeeze + transpose).
_BLOCK_MAP: dict[str, tuple[str, bool]] = {
    "ln_1/g": ("norm1.weight", False),
    "ln_1/b": ("norm1.bias", False),
    "attn/c_attn/w": ("att.qkv.weight", True),
    "attn/c_attn/b": ("att.qkv.bias", False),
    "attn/c_proj/w": ("att.out_proj.weight", True),
    "attn/c_proj/b": ("att.out_proj.bias", False),
    "ln_2/g": ("norm2.weight", False),
    "ln_2/b": ("norm2.bias", False),
    "mlp/c_fc/w": ("ff.fc1.weight", True),
    "mlp/c_fc/b": ("ff.fc1.bias", False),
    "mlp/c_proj/w": ("ff.fc2.weight", True),
    "mlp/c_proj/b": ("ff.fc2.bias", False),
}
_TOP_MAP: dict[str, tuple[str, bool]] = {
    "wte": ("tok_emb.weight", False),
    "wpe": ("pos_emb.weight", False),
    "ln_f/g": ("final_norm.weight", False),
    "ln_f/b": ("final_norm.bias", False),
}
_HPARAM_KEYS = ("n_vocab", "n_ctx", "n_embd", "n_head", "n_layer")


def openai_name_map(n_layer: int) -> dict[str, tuple[str, bool]]:
    """Every TF variable name of an ``n_layer`` GPT-2 -> (our parameter, transpose?)."""
    names = {f"model/{k}": v for k, v in _TOP_MAP.items()}
    for i in range(n_layer):
        for k, (ours, t) in _BLOCK_MAP.items():
            names[f"model/h{i}/{k}"] = (f"blocks.{i}.{ours}", t)
    return names


def read_openai_config(
    openai_dir: str | Path, *, drop_rate: float = 0.0, attention: str = "sdpa"
) -> GPTConfig:
    """GPTConfig from ``openai_dir/hparams.json`` (QKV bias on, tied head)."""
    f = Path(openai_dir) / "hparams.json"
    if not f.is_file():
        raise CheckpointError(f"{f} not found: an OpenAI GPT-2 folder holds hparams.json")
    try:
        hp = json.loads(f.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{f} is not valid JSON ({exc})") from exc
    missing = [k for k in _HPARAM_KEYS if k not in hp]
    if missing:
        raise CheckpointError(f"{f} lacks key(s) {missing} (needs {list(_HPARAM_KEYS)})")
    try:
        return GPTConfig(
            vocab_size=int(hp["n_vocab"]),
            context_length=int(hp["n_ctx"]),
            emb_dim=int(hp["n_embd"]),
            n_heads=int(hp["n_head"]),
            n_layers=int(hp["n_layer"]),
            drop_rate=float(drop_rate),
            qkv_bias=True,
            tie_weights=True,
            attention=attention,  # type: ignore[arg-type]
        )
    except (ConfigError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{f}: {exc}") from exc


def _import_tf() -> Any:
    try:
        import tensorflow as tf
    except ImportError as exc:
        raise CheckpointError(
            "reading OpenAI's GPT-2 checkpoint needs TensorFlow: pip install tensorflow-cpu "
            f"({exc})"
        ) from exc
    return tf


def _checkpoint_prefix(tf: Any, folder: Path) -> str:
    prefix = None
    if (folder / "checkpoint").is_file():
        try:
            prefix = tf.train.latest_checkpoint(str(folder))
        except Exception:  # a corrupt "checkpoint" text file: fall back to the usual name
            prefix = None
    if prefix is None and (folder / "model.ckpt.index").is_file():
        prefix = str(folder / "model.ckpt")
    if prefix is None or not Path(prefix + ".index").is_file():
        raise CheckpointError(
            f"no TensorFlow checkpoint in {folder}: expected checkpoint, model.ckpt.index and "
            "model.ckpt.data-00000-of-00001 (download the GPT-2 release files)"
        )
    return prefix


def load_openai_gpt2(
    openai_dir: str | Path, *, drop_rate: float = 0.0, attention: str = "sdpa"
) -> GPT:
    """A :class:`GPT` holding the weights of OpenAI's GPT-2 checkpoint in ``openai_dir``.

    Every variable must map to exactly one parameter with the expected shape; unmapped,
    missing or misshapen variables raise :class:`CheckpointError` listing them.
    """
    folder = Path(openai_dir)
    cfg = read_openai_config(folder, drop_rate=drop_rate, attention=attention)
    tf = _import_tf()
    prefix = _checkpoint_prefix(tf, folder)
    try:
        variables = dict(tf.train.list_variables(prefix))
    except Exception as exc:
        raise CheckpointError(f"cannot read TF checkpoint {prefix}: {exc}") from exc

    name_map = openai_name_map(cfg.n_layers)
    unmapped = sorted(set(variables) - set(name_map))
    missing = sorted(set(name_map) - set(variables))
    if unmapped or missing:
        raise CheckpointError(
            f"TF checkpoint {prefix} does not match hparams.json "
            f"({cfg.n_layers} layers): unmapped variables {unmapped}, missing variables {missing}"
        )

    with torch.device("meta"):
        model = GPT(cfg)
    targets = model.state_dict()
    state: dict[str, torch.Tensor] = {}
    bad_shapes: list[str] = []
    for tf_name, (ours, transpose) in name_map.items():
        want = tuple(targets[ours].shape)
        got = tuple(variables[tf_name])
        expect_tf = (1, want[1], want[0]) if transpose else want
        if got != expect_tf:
            bad_shapes.append(f"{tf_name}: {got}, expected {expect_tf}")
            continue
        try:
            arr = np.asarray(tf.train.load_variable(prefix, tf_name), dtype=np.float32)
        except Exception as exc:
            raise CheckpointError(f"cannot read variable {tf_name} from {prefix}: {exc}") from exc
        if transpose:
            arr = arr[0].T
        state[ours] = torch.from_numpy(np.ascontiguousarray(arr))
    if bad_shapes:
        raise CheckpointError(f"TF checkpoint {prefix} has wrong shapes: " + "; ".join(bad_shapes))

    missing_keys, unexpected = model.load_state_dict(state, strict=False, assign=True)
    leftover = [k for k in missing_keys if k != "out_head.weight"]
    if leftover or unexpected:  # defensive: the name map covers every parameter
        raise CheckpointError(f"internal name map incomplete: {leftover} {unexpected}")
    model.out_head.weight = model.tok_emb.weight
    model.eval()
    log.info("imported OpenAI GPT-2 (%d layers, emb %d) from %s", cfg.n_layers, cfg.emb_dim, folder)
    return model


def convert_openai_checkpoint(
    openai_dir: str | Path,
    out_dir: str | Path,
    tokenizer_dir: str | Path | None = None,
    *,
    drop_rate: float = 0.0,
) -> Path:
    """Import OpenAI's checkpoint in ``openai_dir`` and save it as a gptflow checkpoint at
    ``out_dir`` (with the tokenizer files from ``openai_dir`` if present, else from
    ``tokenizer_dir``). Returns the checkpoint path."""
    from gpt.checkpoint import save_checkpoint

    folder = Path(openai_dir)
    model = load_openai_gpt2(folder, drop_rate=drop_rate)
    tok = None
    if all((folder / n).is_file() for n in ("encoder.json", "vocab.bpe")):
        tok = folder
    elif tokenizer_dir is not None:
        tok = Path(tokenizer_dir)
    hparams = json.loads((folder / "hparams.json").read_text(encoding="utf-8"))
    # the release by its folder name (the size): a path would differ between two datasets
    # folders holding the same verified files
    meta = {"source": "openai-gpt2", "openai_release": folder.name, "openai_hparams": hparams}
    out = save_checkpoint(out_dir, model, tokenizer_dir=tok, meta=meta)
    if tok is None:
        log.warning("no encoder.json/vocab.bpe found; checkpoint %s has no tokenizer", out)
    return out
