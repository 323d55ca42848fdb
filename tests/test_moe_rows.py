"""The MoE block's host path (`MoeBlock._many_tokens`) runs per expert only its matmuls and activation;
the gather, bias, routing weights and return to token order run once per layer. These check that this
gives, bit for bit, what computing each expert's rows on their own gives, in every family, in float32 and
bfloat16, with hidden sizes whose rows do and do not span whole 64-byte alignments."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILY_CONFIGS
from moeserve import LLM
from moeserve.alignment import rows_per_alignment
from moeserve.layers.grouped_gemm import GROUPED_GEMM_MAX_TOKENS, has_kernel
from moeserve.layers.moe import _gather_rows, _sum_slots


def expert_by_expert(block, x, weights, ids, experts):
    """The arithmetic before the per-layer ops: each expert's rows gathered, computed, finished and
    weighted on their own, written into their pairs' rows, summed over the slots."""
    T, D = x.shape
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=block.num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    starts = dict(zip(used, torch.tensor([0] + [counts[e] for e in used]).cumsum(0).tolist()))
    token_of, weight_of = order // block.top_k, weights.flatten()[order]
    per_pair = x.new_zeros(T * block.top_k, D)
    grouped = T <= GROUPED_GEMM_MAX_TOKENS and has_kernel(x.device, x.dtype)  # as MoeBlock.routed picks
    for expert_id, w in experts.fetch(block.layer_id, used):
        start, n = starts[expert_id], counts[expert_id]
        y = block._expert(x[token_of[start : start + n]], w, expert_id, grouped)
        per_pair[order[start : start + n]] = (y * weight_of[start : start + n, None]).to(x.dtype)
    return _sum_slots(per_pair.view(T, block.top_k, D).unbind(dim=1))


def check_layers(llm, tokens: int) -> None:
    model = llm.model
    for layer in model.moe_layer_ids:
        block = model.moe_block(layer)
        generator = torch.Generator().manual_seed(layer)
        x = torch.randn(tokens, model.config.hidden_size, generator=generator).to(model.config.dtype)
        weights, ids = block.route(x)
        ours = block.routed(x, weights, ids, llm.experts)
        reference = expert_by_expert(block, x, weights, ids, llm.experts)
        assert torch.equal(ours, reference), (model.config.model_type, layer)


@pytest.mark.exact
@pytest.mark.parametrize("model_type", sorted(FAMILY_CONFIGS))
def test_per_layer_ops_equal_expert_by_expert(checkpoint_factory, model_type):
    directory, _ = checkpoint_factory(model_type)
    llm = LLM(directory, device="cpu", progress=False)
    for tokens in (2, 37, 300):
        check_layers(llm, tokens)


@pytest.mark.exact
@pytest.mark.parametrize("dtype, hidden", [(torch.float32, 24), (torch.bfloat16, 40), (torch.bfloat16, 32)])
def test_rows_that_do_not_span_whole_alignments(checkpoint_factory, dtype, hidden):
    directory, _ = checkpoint_factory("qwen3_moe", dtype=dtype, hidden_size=hidden)
    llm = LLM(directory, device="cpu", progress=False)
    assert rows_per_alignment(hidden, dtype) == {24 * 4: 2, 40 * 2: 4, 32 * 2: 1}[hidden * dtype.itemsize]
    check_layers(llm, 150)


@pytest.mark.parametrize("dtype, hidden", [(torch.float32, 24), (torch.bfloat16, 40), (torch.float32, 32)])
def test_each_experts_rows_start_aligned_and_hold_its_tokens(dtype, hidden):
    x = torch.randn(50, hidden).to(dtype)
    ids = torch.randint(0, 5, (50, 2), generator=torch.Generator().manual_seed(0))
    flat_ids = ids.flatten()
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=6).tolist()  # expert 5 unused
    used = [e for e, c in enumerate(counts) if c]
    starts = dict(zip(used, torch.tensor([0] + [counts[e] for e in used]).cumsum(0).tolist()))
    rows, at = _gather_rows(x, order // 2, flat_ids[order], used, counts, starts)
    for e in used:
        mine = rows[at[e] : at[e] + counts[e]]
        assert mine.data_ptr() % 64 == 0
        assert torch.equal(mine, x[order[starts[e] : starts[e] + counts[e]] // 2])
