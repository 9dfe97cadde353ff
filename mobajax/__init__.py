"""mobajax: long-context LLM inference in JAX with MoBA block-sparse attention."""

__version__ = "0.1.0"
