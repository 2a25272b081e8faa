"""A GPT-2 release in OpenAI's exact TF checkpoint layout, tiny and random: for the
importer's tests (``tests/gpt/test_openai_import.py``) and the pipeline's
``load_gpt2.base_model=gpt2`` path (``tests/pipeline/test_pipeline.py``)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from _ci import require_module


def openai_arrays(hp: dict, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 arrays named and shaped exactly like OpenAI's GPT-2 release."""
    rng = np.random.default_rng(seed)
    e, v, c = hp["n_embd"], hp["n_vocab"], hp["n_ctx"]

    def r(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    arrays = {"model/wte": r(v, e, scale=0.5), "model/wpe": r(c, e, scale=0.1)}
    for i in range(hp["n_layer"]):
        h = f"model/h{i}"
        arrays |= {
            f"{h}/ln_1/g": 1 + r(e, scale=0.1),
            f"{h}/ln_1/b": r(e, scale=0.1),
            f"{h}/attn/c_attn/w": r(1, e, 3 * e),
            f"{h}/attn/c_attn/b": r(3 * e, scale=0.1),
            f"{h}/attn/c_proj/w": r(1, e, e),
            f"{h}/attn/c_proj/b": r(e, scale=0.1),
            f"{h}/ln_2/g": 1 + r(e, scale=0.1),
            f"{h}/ln_2/b": r(e, scale=0.1),
            f"{h}/mlp/c_fc/w": r(1, e, 4 * e),
            f"{h}/mlp/c_fc/b": r(4 * e, scale=0.1),
            f"{h}/mlp/c_proj/w": r(1, 4 * e, e),
            f"{h}/mlp/c_proj/b": r(e, scale=0.1),
        }
    arrays |= {"model/ln_f/g": 1 + r(e, scale=0.1), "model/ln_f/b": r(e, scale=0.1)}
    return arrays


def write_openai_checkpoint(folder: Path, hp: dict, arrays: dict[str, np.ndarray]) -> Path:
    """Write hparams.json + checkpoint + model.ckpt.{index,data,meta} with TF1's Saver,
    under exactly the given variable names (as OpenAI's release was written)."""
    tf = require_module("tensorflow", "it writes OpenAI's TF checkpoints (make setup)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "hparams.json").write_text(json.dumps(hp, indent=2))
    graph = tf.Graph()
    with graph.as_default():
        variables = {name: tf.compat.v1.Variable(arr) for name, arr in arrays.items()}
        saver = tf.compat.v1.train.Saver(var_list=variables, save_relative_paths=True)
        with tf.compat.v1.Session(graph=graph) as sess:
            sess.run(tf.compat.v1.global_variables_initializer())
            saver.save(sess, str(folder / "model.ckpt"))
    return folder
