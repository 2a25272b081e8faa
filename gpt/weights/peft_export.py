"""Export a LoRA checkpoint as a ``peft`` adapter folder for the exported base.

The folder (``adapter_config.json`` + ``adapter_model.safetensors``) is what
``peft.PeftModel.from_pretrained(model, DIR)`` reads, where ``model`` is the base
checkpoint exported with :func:`gpt.weights.hf_export.export_hf` and loaded with
``transformers`` (``GPT2LMHeadModel``; for a classifier
``GPT2ForSequenceClassification.from_pretrained(BASE, num_labels=N, pad_token_id=…)``).
``peft`` itself is not needed to write it.

How gptflow's adapter maps onto peft's LoRA (HF's GPT-2 ``Conv1D`` layers: ``fan_in_fan_out``):

* A plain layer (``out_proj``, ``fc1``, ``fc2``, an LM's ``out_head``) keeps its ``A``
  and ``B`` as ``lora_A.weight`` / ``lora_B.weight`` of ``c_proj`` / ``c_fc`` /
  ``mlp.c_proj`` / ``lm_head``.
* The fused ``qkv`` (HF's ``c_attn``) carries one rank-r update per adapted part. That
  is one update of rank n·r on ``c_attn``: ``A`` = the parts' ``A`` stacked, ``B`` =
  each part's ``B`` in its output rows and its own columns (zeros elsewhere); the
  folder's ``rank_pattern`` / ``alpha_pattern`` give ``c_attn`` rank n·r and alpha
  n·alpha, so the scale alpha / rank is unchanged.
* A classifier's head (frozen, new, adapted) goes whole into ``modules_to_save`` as
  ``score`` with the update merged in; HF's ``score`` has no bias, so the head's bias
  is folded into the final LayerNorm's shift (``ln_f``, also in ``modules_to_save``)
  with the merged head weight, as :func:`~gpt.weights.hf_export.fold_head_bias` does.

Weights a LoRA finetune trained outright (``trainable_blocks`` > 0, ``train_final_norm``)
are refused: peft's adapter cannot carry them beside LoRA layers in the same block;
``export --format hf`` writes the merged model instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.errors import ExportError
from gpt.fileio import save_safetensors
from gpt.lora import lora_modules
from gpt.weights.hf import BODY_PREFIX, hf_name_map
from gpt.weights.hf_export import (
    EXPORT_INFO,
    classifier_pool,
    export_tokenizer,
    fold_head_bias,
    write_folder,
)

__all__ = ["PeftExport", "export_peft", "peft_adapter"]

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass
class PeftExport:
    """What :func:`export_peft` wrote."""

    path: Path
    """The adapter folder."""
    task_type: str
    """``CAUSAL_LM`` or ``SEQ_CLS``."""
    notes: list[str] = field(default_factory=list)
    """How to load it for gptflow's outputs."""


def _hf_module(path: str, n_layers: int, kind: str) -> str:
    """Our module path → the HF module holding the same weight."""
    if path == "out_head":
        return "score" if kind == "classifier" else "lm_head"
    ours_to_hf = {ours: hf for hf, (ours, _) in hf_name_map(n_layers).items()}
    hf = ours_to_hf.get(f"{path}.weight")
    if hf is None:
        raise ExportError(f"{path}: no Hugging Face GPT-2 layer corresponds to it")
    return BODY_PREFIX + hf.removesuffix(".weight")


def peft_adapter(loaded: Any, eot_id: int, allow_padded_last: bool, ckpt: Path) -> tuple[
    dict[str, torch.Tensor], dict[str, Any], list[str]
]:  # fmt: skip
    """(tensors, adapter_config, notes) of the unmerged LoRA checkpoint ``loaded``."""
    model, info, kind = loaded.model, loaded.adapter, loaded.kind
    n_layers = model.cfg.n_layers
    rank, alpha = int(info["rank"]), float(info["alpha"])
    head_names = {"out_head.weight", "out_head.bias"}
    outright = sorted(set(info.get("full", [])) - (head_names if kind == "classifier" else set()))
    if outright:
        raise ExportError(
            f"{ckpt}: weights trained outright beside the adapter ({outright[:4]}…) cannot go "
            "into a peft LoRA adapter; export the merged model with --format hf"
        )
    tensors: dict[str, torch.Tensor] = {}
    targets: list[str] = []
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    notes: list[str] = []
    for path, layer in lora_modules(model).items():
        if kind == "classifier" and path == "out_head":
            continue  # the whole head goes to modules_to_save below
        hf = _hf_module(path, n_layers, kind)
        n = len(layer.parts)
        b = torch.zeros(layer.out_features, n * rank, dtype=layer.lora_B.dtype)
        for i, (off, size, _, b_i) in enumerate(layer.pieces()):
            b[off : off + size, i * rank : (i + 1) * rank] = b_i.detach()
        tensors[f"{_PREFIX}{hf}.lora_A.weight"] = layer.lora_A.detach()
        tensors[f"{_PREFIX}{hf}.lora_B.weight"] = b
        targets.append(hf)
        if n != 1:
            rank_pattern[hf], alpha_pattern[hf] = n * rank, n * alpha
    modules_to_save = None
    task_type = "CAUSAL_LM"
    if kind == "classifier":
        task_type = "SEQ_CLS"
        head = model.out_head
        weight = head.merged_weight() if hasattr(head, "merged_weight") else head.weight.detach()
        _, pad_id, max_length, notes = classifier_pool(loaded, eot_id, allow_padded_last, ckpt)
        shift = model.final_norm.bias.detach()
        if head.bias is not None:
            shift = fold_head_bias(weight, head.bias, shift)
        tensors |= {
            f"{_PREFIX}score.weight": weight,
            f"{_PREFIX}{BODY_PREFIX}ln_f.weight": model.final_norm.weight.detach(),
            f"{_PREFIX}{BODY_PREFIX}ln_f.bias": shift,
        }
        modules_to_save = ["score", "ln_f"]
        notes.append(
            f"load the base with GPT2ForSequenceClassification.from_pretrained(BASE, "
            f"num_labels={head.out_features}, pad_token_id={pad_id}) before "
            f"PeftModel.from_pretrained and truncate inputs to {max_length} tokens; score "
            "and ln_f come from the adapter (head bias folded into ln_f.bias)"
        )
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "r": rank,
        "lora_alpha": alpha,
        "lora_dropout": float(info.get("dropout", 0.0)),
        "target_modules": sorted(targets),
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "modules_to_save": modules_to_save,
        "fan_in_fan_out": True,
        "bias": "none",
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "base_model_name_or_path": None,
    }
    tensors = {k: v.float().cpu().contiguous() for k, v in tensors.items()}
    return tensors, config, notes


def export_peft(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    base_out: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    allow_padded_last: bool = False,
    overwrite: bool = False,
) -> PeftExport:
    """Write the LoRA checkpoint ``checkpoint_dir`` as a peft adapter folder at
    ``out_dir`` (see the module docstring). With ``base_out`` its base checkpoint is
    exported there too (:func:`~gpt.weights.hf_export.export_hf`) and named as the
    adapter's ``base_model_name_or_path``."""
    from gpt.adapter import base_of
    from gpt.checkpoint import load_checkpoint
    from gpt.weights.hf_export import export_hf

    ckpt = Path(checkpoint_dir).expanduser()
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; choose another --out or pass --force")
    loaded = load_checkpoint(ckpt, merge=False)
    if loaded.adapter is None:
        raise ExportError(
            f"{ckpt} is a full checkpoint, not a LoRA adapter: export it with --format hf"
        )
    tok, eot_id = export_tokenizer(loaded, tokenizer_dir, ckpt)
    tensors, config, notes = peft_adapter(loaded, eot_id, allow_padded_last, ckpt)
    identity = base_of(loaded.model) or {}
    base = Path(identity["path"])
    if base_out is not None:
        exported = export_hf(base, base_out, tokenizer_dir=tok, overwrite=overwrite)
        config["base_model_name_or_path"] = str(exported.path)
        notes.append(f"base exported to {exported.path}")
    else:
        notes.append(f"export its base with: gptflow export {base} --format hf --out BASE")

    def fill(tmp: Path) -> None:
        save_safetensors(tensors, tmp / PEFT_WEIGHTS, {"format": "pt"})
        for name, obj in (
            (PEFT_CONFIG, config),
            (
                EXPORT_INFO,
                {
                    "source_checkpoint": str(ckpt.resolve()),
                    "base_checkpoint": {k: identity[k] for k in ("path", "sha256")},
                    "kind": loaded.kind,
                    "format": "peft",
                    "notes": notes,
                },
            ),
        ):
            (tmp / name).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")

    write_folder(target, fill)
    for n in notes:
        log.info("export note: %s", n)
    return PeftExport(path=target, task_type=config["task_type"], notes=notes)
