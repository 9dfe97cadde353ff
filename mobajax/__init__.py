"""mobajax: long-context LLM inference in JAX with MoBA block-sparse attention.

`mobajax.LLM` and `mobajax.SamplingParams` are the offline API (imported on first use).
"""

__version__ = "0.1.0"

__all__ = ["LLM", "SamplingParams"]


def __getattr__(name: str):
    if name == "LLM":
        from mobajax.serving.llm import LLM

        return LLM
    if name == "SamplingParams":
        from mobajax.serving.sampling_params import SamplingParams

        return SamplingParams
    raise AttributeError(f"module 'mobajax' has no attribute {name!r}")
