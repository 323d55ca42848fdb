"""The device memory the largest step takes beyond weights and KV: one profiling step, for the memory plan.

In:  the model, its device, the step's token count (max_num_batched_tokens, within the context), the block
     size and an expert provider to run it on.
Out: the peak bytes the step allocated (activations, attention and expert workspaces), on a GPU.

The step runs one sequence of dummy tokens over a KV cache made just for it and freed afterwards.
"""

from __future__ import annotations

import torch

from moeserve.engine.runner import ModelRunner, kv_layout
from moeserve.engine.sampling_params import SamplingParams
from moeserve.engine.sequence import Sequence
from moeserve.experts import ExpertProvider
from moeserve.kv.blocks import blocks_for
from moeserve.models.decoder import MoeCausalLM


def step_peak_bytes(
    model: MoeCausalLM, device: torch.device, tokens: int, block_size: int, experts: ExpertProvider
) -> int:
    groups = len(kv_layout(model).groups)
    runner = ModelRunner(model, device, tokens + 1, blocks_for(tokens, block_size) * groups + 1, block_size, True)
    seq = Sequence(0, [0] * tokens, SamplingParams(max_tokens=1), tokens + 1, None, None, experts=experts)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    runner.extend([seq], [False], experts)
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del runner, seq
    torch.cuda.empty_cache()
    return peak
