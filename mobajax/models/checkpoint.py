"""Converted checkpoints: params saved with Orbax beside the HF config and the tokenizer.

Layout of a converted directory:
  mobajax.json   {"format": 1, "dtype": "<dtype>"}  (marks the directory as converted)
  config.json    the HF config dict the model was built from
  params/        Orbax StandardCheckpointer checkpoint of the params tree
  tokenizer files (if the model has a tokenizer)
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax

MARKER = "mobajax.json"
FORMAT = 1


def is_converted(path: str) -> bool:
    return os.path.isfile(os.path.join(path, MARKER))


def save_converted(path: str, hf_config: dict[str, Any], params: Any, dtype: str, tokenizer=None) -> None:
    """Write a converted directory at `path` (created; params/ must not exist yet)."""
    path = os.path.abspath(path)
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    import orbax.checkpoint as ocp  # imported on use: serving and benchmarks don't need it

    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.join(path, "params"), params)
    checkpointer.wait_until_finished()
    with open(os.path.join(path, MARKER), "w") as f:  # last: marks the directory complete
        json.dump({"format": FORMAT, "dtype": dtype}, f)


def read_marker(path: str) -> dict[str, Any]:
    with open(os.path.join(path, MARKER)) as f:
        marker = json.load(f)
    if marker.get("format") != FORMAT:
        raise ValueError(f"{path} was converted with format {marker.get('format')}, this version reads {FORMAT}")
    return marker


def restore_params(path: str, abstract_params: Any) -> Any:
    """Restore the params tree; `abstract_params` is its jax.ShapeDtypeStruct tree."""
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    return checkpointer.restore(os.path.join(os.path.abspath(path), "params"), abstract_params)


def abstract_tree(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)
