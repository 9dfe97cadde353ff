"""The offline API: `mobajax.LLM(model=..., **engine_args).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

from tqdm.auto import tqdm

from mobajax.models.config import MobaConfig
from mobajax.serving.config import EngineConfig
from mobajax.serving.engine import LLMEngine
from mobajax.serving.outputs import RequestOutput
from mobajax.serving.sampling_params import SamplingParams

ENGINE_ARGS = tuple(f.name for f in dataclasses.fields(EngineConfig))


def engine_config(**engine_args) -> EngineConfig:
    """EngineConfig from keyword arguments; unknown names raise ValueError listing the known ones."""
    unknown = sorted(set(engine_args) - set(ENGINE_ARGS))
    if unknown:
        raise ValueError(f"unknown engine arguments {unknown}; allowed: {', '.join(ENGINE_ARGS)}")
    return EngineConfig(**engine_args)


class LLM:
    """Offline batched generation with continuous batching (vLLM's `LLM`).

    model: an HF checkpoint directory, a .gguf file or "default"; moba: MoBA attention settings
    (`mobajax.models.MobaConfig`; None = full attention); engine_args: EngineConfig fields
    (dtype, page_size, num_pages, max_num_seqs, max_num_batched_tokens, max_model_len, ...).
    """

    def __init__(self, model: str = "default", *, moba: MobaConfig | None = None, **engine_args):
        config = engine_config(**engine_args)
        self.engine = LLMEngine.from_pretrained(model, config, moba=moba)
        if config.warmup:
            self.engine.warmup()
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def _encode(self, prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, dict) and "prompt_token_ids" in prompt:
            return None, list(prompt["prompt_token_ids"])
        if isinstance(prompt, Sequence) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise ValueError("each prompt must be a string, a list of token ids or {'prompt_token_ids': [...]}")

    def generate(
        self,
        prompts,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Complete every prompt; outputs come back in the order of `prompts`."""
        if isinstance(prompts, (str, dict)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if sampling_params is None:
            sampling_params = SamplingParams()
        if isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params] * len(prompts)
        if len(sampling_params) != len(prompts):
            raise ValueError(f"got {len(sampling_params)} sampling params for {len(prompts)} prompts")
        ids = []
        try:
            for prompt, params in zip(prompts, sampling_params):
                text, token_ids = self._encode(prompt)
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, token_ids, params, text)
                ids.append(request_id)
        except ValueError:
            for request_id in ids:  # all or nothing
                self.engine.abort_request(request_id)
            raise
        return self._run(ids, use_tqdm)

    def chat(
        self, messages, sampling_params: SamplingParams | None = None, *, use_tqdm: bool = True
    ) -> list[RequestOutput]:
        """Like `generate`, for one conversation (a list of {"role", "content"}) or a list of them."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else list(messages)
        prompts = [
            self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=True, return_dict=False)
            for c in conversations
        ]
        return self.generate([list(p) for p in prompts], sampling_params, use_tqdm=use_tqdm)

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        done: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    if output.finished:
                        done[output.request_id] = output
                        bar.update()
        return [done[i] for i in ids]
