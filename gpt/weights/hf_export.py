"""Export a gptflow checkpoint as a Hugging Face ``transformers`` folder.

A language model becomes a ``GPT2LMHeadModel`` folder (an untied head stays untied:
``tie_word_embeddings: false`` + ``lm_head.weight``); a spam classifier becomes a
``GPT2ForSequenceClassification`` folder. The folder holds ``config.json``,
``model.safetensors`` and the tokenizer (``vocab.json`` / ``merges.txt`` — the same bytes
as GPT-2's ``encoder.json`` / ``vocab.bpe`` — plus ``tokenizer_config.json``), so
``from_pretrained(DIR)`` and ``AutoTokenizer.from_pretrained(DIR)`` load it with no
conversion code. ``gptflow_export.json`` records where it came from and what matches.

Classifiers, exactly what carries over:

* HF's classification head has no bias; ours has one. The bias ``b`` is folded into the
  final LayerNorm's shift: with head weight ``W`` (C×D, full row rank) the shift becomes
  ``beta + Wᵀ(WWᵀ)⁻¹b``, so ``W·LN(x)`` equals our ``W·LN(x) + b`` (the final norm feeds
  only the head). The residual is checked.
* ``pool="last_real"`` (the message's last real token) is what HF computes with
  ``pad_token_id = 50256`` (the rightmost non-padding token), given the same truncation
  to the classifier's ``max_length``; it differs only for a message whose own last token
  is ``<|endoftext|>``.
* ``pool="last"`` (the last position of messages right-padded with 50256 to
  ``max_length``, the reference recipe) cannot be expressed: HF skips the padding. Export
  refuses it unless ``allow_padded_last``; then ``pad_token_id`` stays unset and HF takes
  the last position, which matches gptflow only on inputs padded to exactly
  ``max_length`` tokens, one message per call (HF refuses batches without a pad id).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gpt.errors import CheckpointError, ExportError
from gpt.fileio import save_safetensors
from gpt.weights.hf import BODY_PREFIX, HF_CONFIG, HF_WEIGHTS, gpt_to_hf_state, hf_config

__all__ = [
    "HFExport",
    "classifier_pool",
    "export_hf",
    "export_tokenizer",
    "fold_head_bias",
    "write_folder",
]

log = logging.getLogger(__name__)

EOT_TOKEN = "<|endoftext|>"
EXPORT_INFO = "gptflow_export.json"


@dataclass
class HFExport:
    """What :func:`export_hf` wrote."""

    path: Path
    """The exported folder."""
    architecture: str
    """``GPT2LMHeadModel`` or ``GPT2ForSequenceClassification``."""
    tied: bool
    """Whether the LM head shares the token embedding (always False for classifiers)."""
    notes: list[str] = field(default_factory=list)
    """What a user of the folder must know for the same outputs as gptflow."""


def fold_head_bias(
    weight: torch.Tensor, bias: torch.Tensor, norm_shift: torch.Tensor
) -> torch.Tensor:
    """The final-LayerNorm shift that makes ``weight @ h`` equal ``weight @ h + bias``
    (``h`` the norm's output): ``shift + Wᵀ(WWᵀ)⁻¹ bias``, computed in float64. Raises
    :class:`ExportError` when ``weight``'s rows are linearly dependent (no such shift)."""
    w, b = weight.detach().double().cpu(), bias.detach().double().cpu()
    gram = w @ w.T
    try:
        delta = w.T @ torch.linalg.solve(gram, b)
    except RuntimeError as exc:
        raise ExportError(
            f"cannot fold the classifier head's bias into the final norm: its weight rows are "
            f"linearly dependent ({exc})"
        ) from exc
    residual = float((w @ delta - b).abs().max())
    if residual > 1e-7 * (1.0 + float(b.abs().max())):
        raise ExportError(
            f"cannot fold the classifier head's bias into the final norm exactly (residual "
            f"{residual:.3g}): the head's weight rows are (nearly) linearly dependent"
        )
    return (norm_shift.detach().double().cpu() + delta).to(torch.float32)


def write_folder(target: Path, fill: Callable[[Path], None]) -> None:
    """Build a folder with ``fill(tmp)`` in a hidden sibling and rename it to ``target``
    (an existing ``target`` is replaced only once the new folder is complete)."""
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:12]}"
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
        fill(tmp)
        if target.exists():
            old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write the export folder {target}: {exc}") from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _eot_id(encoder_json: Path) -> int:
    try:
        vocab = json.loads(encoder_json.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{encoder_json} is not a readable GPT-2 vocabulary ({exc})") from exc
    if not isinstance(vocab, dict) or EOT_TOKEN not in vocab:
        raise ExportError(f"{encoder_json} has no {EOT_TOKEN} entry: not a GPT-2 vocabulary")
    return int(vocab[EOT_TOKEN])


def export_tokenizer(loaded: Any, tokenizer_dir: str | Path | None, ckpt: Path) -> tuple[Path, int]:
    """(tokenizer folder, end-of-text id) for exporting ``loaded``: the checkpoint's own
    tokenizer, else ``tokenizer_dir``; refused when neither is there or it does not fit."""
    tok = loaded.tokenizer_dir or (Path(tokenizer_dir) if tokenizer_dir else None)
    if tok is None or not all((tok / n).is_file() for n in ("encoder.json", "vocab.bpe")):
        raise ExportError(
            f"{ckpt} holds no tokenizer (tokenizer/encoder.json, vocab.bpe): pass "
            "--tokenizer-dir FOLDER with GPT-2's encoder.json and vocab.bpe"
        )
    eot_id = _eot_id(tok / "encoder.json")
    if loaded.config.vocab_size <= eot_id:
        raise ExportError(
            f"{ckpt}: the model's vocabulary ({loaded.config.vocab_size}) is smaller than the "
            f"GPT-2 tokenizer's ({eot_id + 1}); it cannot be used with that tokenizer"
        )
    return tok, eot_id


def _write_tokenizer(src: Path, dest: Path, *, max_length: int, eot_id: int, pad: bool) -> None:
    """vocab.json / merges.txt (byte copies of encoder.json / vocab.bpe) and the config a
    ``GPT2Tokenizer`` needs; ``pad`` sets ``<|endoftext|>`` as the padding token."""
    shutil.copyfile(src / "encoder.json", dest / "vocab.json")
    shutil.copyfile(src / "vocab.bpe", dest / "merges.txt")
    special = {"bos_token": EOT_TOKEN, "eos_token": EOT_TOKEN, "unk_token": EOT_TOKEN}
    if pad:
        special["pad_token"] = EOT_TOKEN
    tok_cfg = {
        "tokenizer_class": "GPT2Tokenizer",
        "model_max_length": max_length,
        "add_prefix_space": False,
        "errors": "replace",
        "padding_side": "right",
        "clean_up_tokenization_spaces": False,
        "added_tokens_decoder": {
            str(eot_id): {
                "content": EOT_TOKEN,
                "lstrip": False,
                "normalized": True,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
        },
        **special,
    }
    _dump(dest / "tokenizer_config.json", tok_cfg)
    _dump(dest / "special_tokens_map.json", special)


def _dump(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _classifier_setting(loaded: Any, name: str) -> Any:
    return (loaded.meta or {}).get(name, (loaded.hparams or {}).get(name))


def classifier_pool(
    loaded: Any, eot_id: int, allow_padded_last: bool, ckpt: Path
) -> tuple[str, int | None, int, list[str]]:
    """``(pool, pad_token_id, max_length, notes)`` of an exported classifier: how HF
    must pool to compute what gptflow does (see the module docstring)."""
    notes: list[str] = []
    cfg = loaded.model.cfg
    pool = _classifier_setting(loaded, "pool") or "last"
    max_length = int(_classifier_setting(loaded, "max_length") or cfg.context_length)
    if pool == "last_real":
        pad_id: int | None = eot_id
        notes.append(
            f"pool=last_real: HF pools the rightmost token that is not {eot_id} "
            f"(pad_token_id); tokenize with truncation to max_length={max_length} as gptflow "
            f"does. Differs only for a message whose own last token is {EOT_TOKEN}."
        )
    elif pool == "last":
        if not allow_padded_last:
            raise ExportError(
                f"{ckpt}: this classifier reads the last position of messages right-padded "
                f"with {eot_id} to max_length={max_length} (spam.pool='last', the reference "
                "recipe); GPT2ForSequenceClassification pools the last non-padding token "
                "instead, so its predictions would differ. Retrain with spam.pool=last_real "
                "for an exact export, or export with --padded-last-position (HF then matches "
                f"only on inputs padded to exactly {max_length} tokens, one message per call)"
            )
        pad_id = None
        notes.append(
            f"pool=last exported with pad_token_id unset: HF takes the last position, which "
            f"matches gptflow only when each message is right-padded with {eot_id} to "
            f"exactly {max_length} tokens (tokenizer(text, padding='max_length', "
            f"truncation=True, max_length={max_length})) and passed one per call."
        )
    else:
        raise ExportError(f"{ckpt}: unknown classifier pool {pool!r} (expected last|last_real)")
    return pool, pad_id, max_length, notes


def _prepare(
    loaded: Any, eot_id: int, allow_padded_last: bool, ckpt: Path
) -> tuple[dict[str, torch.Tensor], dict[str, Any], list[str], int]:
    """(state dict, config, notes, tokenizer max length) for the folder."""
    model = loaded.model
    cfg = model.cfg
    body = {BODY_PREFIX + k: v for k, v in gpt_to_hf_state(model).items()}
    notes: list[str] = []
    if loaded.kind == "lm":
        tied = model.is_tied
        if not tied:
            body["lm_head.weight"] = model.out_head.weight.detach().float().cpu().contiguous()
            notes.append("untied output head: tie_word_embeddings=false + lm_head.weight")
        if not cfg.qkv_bias:
            notes.append("no QKV bias in gptflow: exported as an all-zero c_attn.bias")
        return body, hf_config(cfg, eot_id=eot_id, tied=tied), notes, cfg.context_length

    head = model.out_head
    labels = list(loaded.labels or [str(i) for i in range(head.out_features)])
    pool, pad_id, max_length, pool_notes = classifier_pool(loaded, eot_id, allow_padded_last, ckpt)
    notes += pool_notes
    if head.bias is not None and bool(head.bias.detach().abs().max() > 0):
        body[BODY_PREFIX + "ln_f.bias"] = fold_head_bias(
            head.weight, head.bias, model.final_norm.bias
        )
        notes.append("classifier head bias folded into transformer.ln_f.bias (HF's has none)")
    body["score.weight"] = head.weight.detach().float().cpu().contiguous()
    config = hf_config(cfg, eot_id=eot_id, labels=labels, pad_token_id=pad_id)
    config["gptflow"] = {"pool": pool, "max_length": max_length}
    return body, config, notes, max_length


def export_hf(
    checkpoint_dir: str | Path,
    out_dir: str | Path,
    *,
    tokenizer_dir: str | Path | None = None,
    allow_padded_last: bool = False,
    overwrite: bool = False,
) -> HFExport:
    """Write the gptflow checkpoint ``checkpoint_dir`` (verified on load) as a Hugging
    Face folder at ``out_dir`` (see the module docstring). The tokenizer comes from the
    checkpoint, else ``tokenizer_dir``. The folder is built aside and renamed into place;
    an existing ``out_dir`` is replaced only with ``overwrite``."""
    from gpt.checkpoint import load_checkpoint, weights_sha256

    ckpt = Path(checkpoint_dir).expanduser()
    target = Path(out_dir).expanduser().resolve()
    if target.exists() and not overwrite:
        raise ExportError(f"{target} already exists; choose another --out or pass --force")
    loaded = load_checkpoint(ckpt)
    tok, eot_id = export_tokenizer(loaded, tokenizer_dir, ckpt)
    state, config, notes, max_len = _prepare(loaded, eot_id, allow_padded_last, ckpt)
    arch = config["architectures"][0]
    # the source by its content (the sha256 of its weights), not its path: exporting one
    # model from two artifacts folders gives the same bytes
    source_sha = weights_sha256(ckpt)
    config["gptflow_source"] = f"sha256:{source_sha}"

    def fill(tmp: Path) -> None:
        save_safetensors(state, tmp / HF_WEIGHTS, {"format": "pt"})
        _dump(tmp / HF_CONFIG, config)
        _write_tokenizer(
            tok, tmp, max_length=max_len, eot_id=eot_id, pad=loaded.kind == "classifier"
        )
        _dump(
            tmp / EXPORT_INFO,
            {
                "source_weights_sha256": source_sha,
                "kind": loaded.kind,
                "architecture": arch,
                "notes": notes,
            },
        )

    write_folder(target, fill)
    for n in notes:
        log.info("export note: %s", n)
    return HFExport(
        path=target,
        architecture=arch,
        tied=bool(config.get("tie_word_embeddings")),
        notes=notes,
    )
