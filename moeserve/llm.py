"""`LLM`: the public offline API — load a checkpoint, then `generate`, `chat` and `score`.

In:  a checkpoint directory, device and dtype, engine limits, and the offloading keyword arguments
     (one `OffloadOptions`).
Out: `RequestOutput`s; `score` gives logits. The LLM owns one expert provider, its default: resident
     experts, or an offloading runtime's. A server takes it over (`hand_over_experts`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Sequence as Seq

import torch
from tqdm import tqdm

from moeserve.config import parse_dtype_option
from moeserve.devices import resolve_device
from moeserve.engine.llm_engine import LLMEngine
from moeserve.engine.outputs import RequestOutput
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS
from moeserve.errors import InputError, ModelLoadError
from moeserve.kv.plan import DEFAULT_GPU_MEMORY_UTILIZATION, MemoryPlan
from moeserve.experts import ExpertProvider
from moeserve.loader import load_dense_experts, load_model, resolve_model_dir
from moeserve.offload.options import OffloadOptions
from moeserve.offload.runtime import OffloadRuntime, build_offload_runtime, is_compressed_dir, policy_fingerprint

Prompt = str | list[int]


class LLM:
    """A loaded MoE model and its engine.

    model: a local Hugging Face checkpoint directory; None = the embedded default model.
    device: "cpu", "cuda" or "cuda:N"; None = CUDA when available, else CPU.
    dtype: compute dtype ("bfloat16", "float16", "float32"); None = the checkpoint's dtype.
    max_model_len: the context in tokens; None = the model's max_position_embeddings.
    policy: per-layer error-bound policy (YAML/JSON path or text, or a dict); experts are then kept
        compressed in host memory and decoded into a bounded cache. None = lossless (`codec: raw`)
        when offloading, or no offloading at all when `expert_cache` is None too.
    expert_cache: decoded-expert budget: "25%" of all experts, "512MiB", or bytes; None = all.
    eviction: "lfu" (least frequently used, with aging; offload/cache.py) or "lru". prefetch: predict and load
        the next layers' experts ahead of time.
    prefetch_depth: MoE layers ahead to predict; None = on a GPU as many as the expert cache has room
        for, on a CPU 0 (no guesses: they cost a CPU more than they save, see docs/offload.md).
    decode_workers: CPU threads decoding experts; None = one per 8 cores, at least two.
    enforce_eager: run every decode step eagerly: on a GPU never from CUDA graphs (engine/decode_graphs.py), on
        a CPU never compiled (engine/compiled_decode.py). None = False unless MOESERVE_ENFORCE_EAGER=1.
    kv_cache: the paged KV cache's size: bytes ("4GiB", or a number) or a share of the device's memory
        ("30%"); None = what remains of gpu_memory_utilization on a GPU, a share of RAM on a CPU (kv/plan.py).
    gpu_memory_utilization: the share of the GPU's memory the whole memory plan may take (default 0.9).
    prefix_caching: reuse the KV of prompt prefixes seen before (under the same policy); docs/kv-cache.md.
    """

    def __init__(
        self,
        model: str | Path | None = None,
        *,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        max_model_len: int | None = None,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        seed: int = 0,
        policy: str | Path | dict | None = None,
        expert_cache: str | int | None = None,
        eviction: str = "lfu",
        prefetch: bool = True,
        decode_workers: int | None = None,
        prefetch_depth: int | None = None,
        enforce_eager: bool | None = None,
        kv_cache: str | int | None = None,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        prefix_caching: bool = True,
        progress: bool = True,
    ):
        self.device = resolve_device(device, ModelLoadError)
        self.model_dir = resolve_model_dir(model)
        loaded = load_model(self.model_dir, self.device, parse_dtype_option(dtype))
        self.config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.model = loaded.model
        # Options are checked before the (possibly long) expert loading or compression starts.
        context = self.config.max_position_embeddings
        if max_model_len is not None:
            if not isinstance(max_model_len, int) or not 2 <= max_model_len <= context:
                raise ModelLoadError(f"max_model_len must be an integer in 2..{context} for this model, got {max_model_len!r}.")
            context = max_model_len
        for name, value in (("max_num_seqs", max_num_seqs), ("max_num_batched_tokens", max_num_batched_tokens)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ModelLoadError(f"{name} must be a positive integer, got {value!r}.")
        if not isinstance(gpu_memory_utilization, (int, float)) or not 0 < gpu_memory_utilization <= 1:
            raise ModelLoadError(f"gpu_memory_utilization must be a share in (0, 1], got {gpu_memory_utilization!r}.")
        self.offload_options = OffloadOptions(policy, expert_cache, eviction, prefetch, decode_workers, prefetch_depth)
        self.offload: OffloadRuntime | None = None
        self.experts: ExpertProvider | None  # the default provider; None once handed over
        if self.offload_options.offloads(is_compressed_dir(self.model_dir)):
            self.offload = build_offload_runtime(loaded, self.offload_options, self.device, progress=progress)
            self.experts = self.offload.provider
        else:
            self.experts = load_dense_experts(loaded, self.device)
        self.loaded = loaded  # resident weights and the mapped checkpoint (e.g. for `moeserve compress`)
        self.engine = LLMEngine(
            self.model,
            self.tokenizer,
            self.device,
            max_model_len=context,
            max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens,
            seed=seed,
            enforce_eager=enforce_eager,
            kv_cache=kv_cache,
            gpu_memory_utilization=gpu_memory_utilization,
            profile_experts=self.experts,
            prefix_caching=prefix_caching,
            progress=progress,
        )
        self.memory_plan = self._memory_plan()
        if progress:
            print(self.memory_plan.line(), file=sys.stderr)

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    def stats(self) -> dict[str, float]:
        """The engine's KV cache figures (kv_cache_usage_perc, kv_blocks_in_use / _free / _peak, kv_block_bytes,
        num_preemptions, prefix_cache_queries / _hits in tokens); offloading figures are in `llm.offload.stats`."""
        return self.engine.kv_stats()

    def _memory_plan(self) -> MemoryPlan:
        weights = sum(t.numel() * t.element_size() for t in (*self.model.parameters(), *self.model.buffers()))
        if self.offload is None:
            weights += self.experts.nbytes
        cache = self.engine.runner.cache
        return MemoryPlan(
            device=str(self.device),
            weights=weights,
            expert_cache=0 if self.offload is None else self.offload.budget_bytes,
            kv=cache.nbytes,
            kv_tokens=cache.manager.usable_blocks // cache.num_groups * cache.block_size,
            workspace=self.engine.workspace_bytes,
        )

    def hand_over_experts(self) -> tuple[ExpertProvider, OffloadRuntime | None]:
        """Give up this LLM's expert provider (and its runtime) to a new owner, e.g. the server's first
        policy generation, which frees it when it retires. Afterwards calls must pass `experts=`."""
        experts, runtime = self._default_experts(), self.offload
        self.experts, self.offload = None, None
        return experts, runtime

    def _default_experts(self) -> ExpertProvider:
        if self.experts is None:
            raise InputError("this LLM's experts were handed to a server; pass experts= or load another LLM.")
        return self.experts

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        experts: ExpertProvider | None = None,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); outputs are in prompt order.
        `experts`: run on this expert provider instead of the model's own (e.g. `moeserve bench`
        running the model with some experts compressed); None: the model's own."""
        prompt_list = _as_prompt_list(prompts)
        params = _as_params_list(sampling_params, len(prompt_list))
        seqs = [self.engine.make_sequence(p, sp) for p, sp in zip(prompt_list, params)]
        salt = None  # another provider: its own prefix-cache blocks only
        if experts is None:
            experts = self._default_experts()
            salt = policy_fingerprint(self.offload)
        for seq in seqs:
            self.engine.submit(seq, experts, salt)
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="generate", unit="req") as bar:
            while self.engine.has_unfinished():
                bar.update(sum(out.finish_reason is not None for out in self.engine.step()))
        return [RequestOutput.from_sequence(seq) for seq in seqs]

    def chat(
        self,
        conversations: list[dict[str, Any]] | Seq[list[dict[str, Any]]],
        sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
        use_tqdm: bool = False,
        experts: ExpertProvider | None = None,
    ) -> list[RequestOutput]:
        """Like `generate`, for conversations rendered through the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        if self.tokenizer is None:
            raise InputError("this model directory has no tokenizer.json, so chat cannot be used; pass token ids.")
        prompts = [self.tokenizer.encode_chat(list(messages)) for messages in conversations]
        return self.generate(prompts, sampling_params, use_tqdm, experts)

    def score(self, prompt: Prompt, experts: ExpertProvider | None = None) -> torch.Tensor:
        """float32 logits [T, vocab] at every prompt position (row t predicts token t+1), on CPU.
        `experts` as in `generate`."""
        seq = self.engine.make_sequence(prompt, SamplingParams(max_tokens=1))
        experts = self._default_experts() if experts is None else experts
        try:
            (logits,) = self.engine.runner.extend([seq], [True], experts)
        finally:
            self.engine.scheduler.release(seq)
        return logits.cpu()


def _as_prompt_list(prompts: Prompt | Seq[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts:
        raise InputError("no prompts were given; pass a prompt or a list of prompts.")
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompts):
        return [prompts]  # one prompt given as token ids
    for p in prompts:
        if not isinstance(p, (str, list, tuple)):
            raise InputError(f"a prompt must be a string or a list of token ids, got {type(p).__name__}.")
    return [p if isinstance(p, str) else list(p) for p in prompts]


def _as_params_list(params: SamplingParams | Seq[SamplingParams] | None, count: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * count
    if isinstance(params, SamplingParams):
        return [params] * count
    params = list(params)
    if len(params) != count:
        raise InputError(f"got {len(params)} sampling params for {count} prompts; pass one, or one per prompt.")
    return params
