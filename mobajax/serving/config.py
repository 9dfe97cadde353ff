"""Engine arguments (vLLM's names), validated where they enter."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Static configuration of an engine.

    page_size: tokens per KV page (G). num_pages: pages in the pool; None sizes it from
    gpu_memory_utilization on a GPU (fraction of free device memory) or from max_num_seqs *
    max_model_len on a CPU. max_num_seqs: requests running at once. max_num_batched_tokens: tokens
    per step (prefill chunks + decodes). max_model_len: prompt + output tokens per request (None =
    the model's maximum). enable_prefix_caching: reuse full cached pages across requests.
    decode_steps: decode steps fused into one jitted call when no admission is pending.
    async_scheduling: while the batch stays the same, dispatch the next fused decode before
      reading the current one's tokens, so host work overlaps the device (vLLM's name).
    warmup: compile every step bucket when the engine starts (else on first use).
    tensor_parallel_size, expert_parallel_size: shard the model over that many devices (see
    `mobajax.parallel`): attention heads, MLP columns and the KV pool's kv heads over `tensor`,
    MoE experts over `expert`; the engine uses the first tensor * expert devices.
    """

    dtype: str = "float32"
    page_size: int = 16
    num_pages: int | None = None
    gpu_memory_utilization: float = 0.9
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None
    enable_prefix_caching: bool = True
    decode_steps: int = 8
    async_scheduling: bool = True
    seed: int = 0
    warmup: bool = True
    tensor_parallel_size: int = 1
    expert_parallel_size: int = 1

    def __post_init__(self):
        checks = [
            (self.page_size in (8, 16, 32, 64, 128),
             f"page_size must be one of 8, 16, 32, 64, 128, got {self.page_size}"),
            (self.num_pages is None or self.num_pages >= 2, f"num_pages must be >= 2, got {self.num_pages}"),
            (0 < self.gpu_memory_utilization <= 1,
             f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"),
            (self.max_num_seqs >= 1, f"max_num_seqs must be >= 1, got {self.max_num_seqs}"),
            (self.max_num_batched_tokens >= 1,
             f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}"),
            (self.max_model_len is None or self.max_model_len >= 2,
             f"max_model_len must be >= 2, got {self.max_model_len}"),
            (self.decode_steps >= 1, f"decode_steps must be >= 1, got {self.decode_steps}"),
            (self.dtype in ("float32", "bfloat16"), f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}"),
            (self.tensor_parallel_size >= 1, f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}"),
            (self.expert_parallel_size >= 1, f"expert_parallel_size must be >= 1, got {self.expert_parallel_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
