"""The synchronous engine loop: schedule → run → sample → post-process, one step at a time.

In:  requests (prompt ids + `SamplingParams`) as `Sequence`s, each submitted with its expert provider.
Out: per step, a `StepOutput` for every sequence of the step: its new token, logprobs, text delta and
     finish reason (the sequences themselves advance by one token per step until they finish).

`LLM.generate` drives it to completion; the HTTP server's async scheduler calls `step()` from
its own loop. Everything here runs on the host except the model step and sampling (compute device).
"""

from __future__ import annotations

import hashlib
import itertools
import uuid
import weakref

import torch

from moeserve.engine.compiled_decode import eager_by_default
from moeserve.engine.outputs import StepOutput
from moeserve.engine.profile import step_peak_bytes
from moeserve.engine.runner import ModelRunner, kv_layout
from moeserve.engine.sampler import sample, token_logprobs
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.scheduler import DEFAULT_MAX_NUM_BATCHED_TOKENS, Scheduler
from moeserve.engine.sequence import Sequence
from moeserve.errors import InputError
from moeserve.experts import ExpertProvider
from moeserve.kv.cache import DEFAULT_BLOCK_SIZE
from moeserve.kv.plan import DEFAULT_GPU_MEMORY_UTILIZATION, kv_budget, num_blocks
from moeserve.models.decoder import MoeCausalLM
from moeserve.tokenizer import IncrementalDetokenizer, Tokenizer


class LLMEngine:
    def __init__(
        self,
        model: MoeCausalLM,
        tokenizer: Tokenizer | None,
        device: torch.device,
        max_model_len: int,
        max_num_seqs: int = 256,
        max_num_batched_tokens: int = DEFAULT_MAX_NUM_BATCHED_TOKENS,
        seed: int = 0,
        enforce_eager: bool | None = None,
        kv_cache: str | int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        profile_experts: ExpertProvider | None = None,
        prefix_caching: bool = True,
        progress: bool = True,
    ):
        """kv_cache: the KV cache's size, bytes or a share of device memory (kv/plan.py); None = the device's
        default, for which a GPU runs one profiling step of max_num_batched_tokens on `profile_experts`."""
        self.config = model.config
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.workspace_bytes: int | None = None  # reserved for activations (GPU default plan only)
        if device.type == "cuda" and kv_cache is None and profile_experts is not None:
            steps = min(max_num_batched_tokens + max_num_seqs, max_model_len - 1)  # a mixed step's most tokens
            self.workspace_bytes = step_peak_bytes(model, device, steps, block_size, profile_experts)
        budget = kv_budget(kv_cache, device, self.workspace_bytes or 0, gpu_memory_utilization)
        blocks = num_blocks(budget, kv_layout(model), block_size, max_model_len, max_num_seqs)
        eager = eager_by_default() if enforce_eager is None else enforce_eager  # None: MOESERVE_ENFORCE_EAGER decides
        self.runner = ModelRunner(model, device, max_model_len, blocks, block_size, eager, progress)
        self.scheduler = Scheduler(max_num_seqs, max_num_batched_tokens, self.runner.blocks)
        manager = self.runner.blocks
        manager.prefix_caching = prefix_caching
        self._model_tag = f"{self.config.model_type}|{self.config.dtype}"
        self._provider_salts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # provider → its own salt
        # the most positions one sequence can hold when it has every block to itself
        self.kv_tokens_alone = manager.usable_blocks // len(manager.windows) * block_size
        self.eos_token_ids = set(self.config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(tokenizer.eos_token_id)
        self._ids = itertools.count()
        # Unseeded sampled rows draw from this; seeded ones from their own (see `make_sequence`), all on
        # the compute device so that sampling never leaves it.
        self._generator = torch.Generator(device=device).manual_seed(seed)

    def make_sequence(self, prompt: str | list[int], params: SamplingParams) -> Sequence:
        """Validate one request and wrap it; nothing is queued yet."""
        if not isinstance(params, SamplingParams):
            raise InputError(f"sampling_params must be a SamplingParams, got {type(params).__name__}.")
        text = None
        if isinstance(prompt, str):
            text = prompt
            prompt_ids = self._require_tokenizer("text prompts").encode(prompt)
        else:
            prompt_ids = list(prompt)
        self._check_prompt(prompt_ids)
        max_len = self._fit_in_kv_cache(len(prompt_ids), params.max_tokens)
        if params.stop and self.tokenizer is None:
            self._require_tokenizer("stop strings")
        detokenizer = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens) if self.tokenizer else None
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        return Sequence(
            seq_id=next(self._ids),
            prompt_ids=prompt_ids,
            params=params,
            max_len=max_len,
            detokenizer=detokenizer,
            generator=generator,
            prompt=text,
        )

    def submit(self, seq: Sequence, experts: ExpertProvider, cache_salt: str | None = None) -> None:
        """Queue `seq`; it runs wholly on `experts`. Steps never mix providers, so a server can hold
        several policy variants over one model and one KV cache. `cache_salt` names what `experts`
        computes (e.g. its policy's fingerprint): sequences share prefix-cache blocks only under the same
        salt. None: this provider object's own (shared only with sequences on the very same provider)."""
        if seq.experts is not None:
            raise ValueError(f"sequence {seq.seq_id} was already submitted")
        seq.experts = experts
        if cache_salt is None:
            cache_salt = self._provider_salts.setdefault(experts, f"provider-{uuid.uuid4().hex}")
        seq.cache_salt = hashlib.sha256(f"{self._model_tag}|{cache_salt}".encode()).digest()
        self.scheduler.add(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def abort(self, seq: Sequence) -> None:
        """Cancel a request (e.g. its client went away) and free its cache row."""
        if seq.is_finished:
            return
        self.scheduler.abort(seq)
        self.scheduler.remove_finished()

    def step(self) -> list[StepOutput]:
        """Run one step; return what each of its sequences produced (finished ones have left)."""
        step = self.scheduler.schedule()
        if step is None:
            return []
        seqs = step.seqs
        prompt_logprobs: list[list | None] = [None] * len(seqs)
        if step.is_decode:
            logits = self.runner.decode(seqs, step.experts)  # [B, V]
        else:
            starts = [seq.num_cached for seq in seqs]
            # (a preempted sequence that runs again has its prompt's logprobs already)
            wants_prompt = [seq.params.prompt_logprobs is not None and not seq.output_ids for seq in seqs]
            per_seq = self.runner.extend(seqs, wants_prompt, step.experts, step.counts)
            for i, (seq, rows, wanted, start) in enumerate(zip(seqs, per_seq, wants_prompt, starts)):
                if wanted:
                    self._record_prompt_logprobs(seq, rows, start)
                    self.runner.blocks.keep_prompt_logprobs(
                        seq.blocks, seq.prompt_ids, seq.prompt_logprobs, seq.params.prompt_logprobs
                    )
                    if seq.num_cached == seq.num_tokens:
                        prompt_logprobs[i] = list(seq.prompt_logprobs)
            # only sequences whose every token is now computed sample; the others are part-way through a prompt
            done = [i for i, seq in enumerate(seqs) if seq.num_cached == seq.num_tokens]
            if not done:
                return []
            seqs, prompt_logprobs = [seqs[i] for i in done], [prompt_logprobs[i] for i in done]
            logits = torch.cat([per_seq[i][-1:] for i in done])  # [B, V]
        sampled = sample(logits, seqs, self._generator)
        outputs = []
        for seq, token, lp, prompt_lp in zip(seqs, sampled.tokens, sampled.logprobs, prompt_logprobs):
            self._append(seq, token, lp)
            outputs.append(
                StepOutput(
                    seq.seq_id,
                    [token],
                    [] if lp is None else [lp],
                    self._text_delta(seq),
                    seq.finish_reason,
                    seq.stop_reason,
                    prompt_lp,
                )
            )
        self.scheduler.remove_finished()
        return outputs

    @staticmethod
    def _text_delta(seq: Sequence) -> str:
        """Text not yet handed out, less a tail that could still turn out to start a stop string (that
        tail would have to be taken back when the stop string is cut; the cut never reaches further back)."""
        text = seq.text
        if seq.is_finished or not seq.params.stop:
            end = len(text)
        else:
            held_back = max(len(s) for s in seq.params.stop) - 1
            end = max(seq.text_emitted, len(text) - held_back)
        delta = text[seq.text_emitted : end]
        seq.text_emitted = end
        return delta

    def _append(self, seq: Sequence, token: int, logprobs) -> None:
        params = seq.params
        seq.output_ids.append(token)
        if logprobs is not None:
            seq.logprobs.append(logprobs)
        if token in params.stop_token_ids:
            seq.finish("stop", token)
        elif not params.ignore_eos and token in self.eos_token_ids:
            seq.finish("stop")
        else:
            if seq.detokenizer is not None:
                delta = seq.detokenizer.add(token)
                seq.text = seq.detokenizer.text
                if params.stop and delta and self._stop_string_hit(seq, len(delta)):
                    return
            if params.max_tokens is not None and len(seq.output_ids) >= params.max_tokens:
                seq.finish("length")
            elif seq.num_tokens >= seq.max_len:
                seq.finish("length")
        if seq.is_finished and seq.detokenizer is not None:
            seq.detokenizer.flush()
            seq.text = seq.detokenizer.text

    @staticmethod
    def _stop_string_hit(seq: Sequence, delta_len: int) -> bool:
        text = seq.text
        longest = max(len(s) for s in seq.params.stop)
        # Only a match that ends inside the new text is new; search just the tail that could hold one.
        window = max(0, len(text) - delta_len - longest + 1)
        hits = [(pos, stop) for stop in seq.params.stop if (pos := text.find(stop, window)) >= 0]
        if not hits:
            return False
        pos, stop = min(hits)
        seq.text = text[:pos]
        seq.finish("stop", stop)
        return True

    def _record_prompt_logprobs(self, seq: Sequence, logits: torch.Tensor, start: int) -> None:
        """logits [n, V] of prompt positions start..start+n-1 (one chunk): row j predicts token start+j+1."""
        if start == 0:
            seq.prompt_logprobs = [None]  # the first token has no prediction
        targets = seq.prompt_ids[start + 1 : start + 1 + logits.shape[0]]
        if targets:
            seq.prompt_logprobs += token_logprobs(logits[: len(targets)], targets, [seq.params.prompt_logprobs] * len(targets))

    def _check_prompt(self, prompt_ids: list[int]) -> None:
        if not prompt_ids:
            raise InputError("the prompt is empty; send at least one token.")
        vocab = self.config.vocab_size
        bad = next((t for t in prompt_ids if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < vocab), None)
        if bad is not None:
            raise InputError(f"prompt token id {bad!r} is not in the vocabulary (ids 0..{vocab - 1}).")
        if len(prompt_ids) >= self.max_model_len:
            raise InputError(
                f"the prompt has {len(prompt_ids)} tokens but the context holds {self.max_model_len} "
                f"(prompt plus at least one generated token); shorten the prompt."
            )

    def _fit_in_kv_cache(self, prompt_len: int, max_tokens: int | None) -> int:
        """The most tokens a request may reach: the context, or what the whole KV cache holds for one
        sequence if that is less. A request whose prompt and max_tokens cannot fit even alone is refused."""
        alone = self.kv_tokens_alone
        needed = prompt_len + 1 if max_tokens is None else min(self.max_model_len, prompt_len + max_tokens)
        if needed > alone:
            cache = self.runner.cache
            asked = f"the prompt ({prompt_len} tokens)" + ("" if max_tokens is None else f" and max_tokens ({max_tokens})")
            raise InputError(
                f"{asked} need {needed} tokens of KV cache but the whole KV cache ({cache.nbytes / 2**20:.1f} MiB) "
                f"holds {alone} for one sequence; raise kv_cache (--kv-cache) or ask for fewer tokens."
            )
        return min(self.max_model_len, alone)

    def kv_stats(self) -> dict[str, float]:
        """The KV cache's state: usage, blocks in use and free, their peak, preemptions so far."""
        manager = self.runner.blocks
        return {
            "kv_cache_usage_perc": manager.blocks_in_use / manager.usable_blocks,
            "kv_blocks_in_use": manager.blocks_in_use,
            "kv_blocks_free": manager.free_blocks,
            "kv_blocks_peak": manager.peak_in_use,
            "kv_block_bytes": self.runner.cache.bytes_per_block,
            "num_preemptions": self.scheduler.num_preemptions,
            "prefix_cache_queries": manager.prefix_queries,
            "prefix_cache_hits": manager.prefix_hits,
        }

    def _require_tokenizer(self, what: str) -> Tokenizer:
        if self.tokenizer is None:
            raise InputError(f"this model directory has no tokenizer.json, so {what} cannot be used; pass token ids.")
        return self.tokenizer
