"""Generation behaviour: batching, sampling, stop conditions, logprobs, the KV cache rows."""

from __future__ import annotations

import math

import pytest
import torch

from moeserve import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = [[7, 8, 9, 10, 11, 12, 13], [3], [100, 101, 102], list(range(20, 45)), [9, 9]]


@pytest.fixture(scope="module")
def llm(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    return LLM(directory, device="cpu")


@pytest.mark.exact
def test_batched_greedy_equals_one_at_a_time(llm):
    batched = [o.token_ids for o in llm.generate(PROMPTS, GREEDY)]
    alone = [llm.generate([p], GREEDY)[0].token_ids for p in PROMPTS]
    assert batched == alone
    assert all(len(t) == 24 for t in batched)


def test_sequences_finishing_at_different_times_keep_their_cache(llm):
    # Different max_tokens make rows leave the cache mid-batch; the survivors must be unaffected.
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (3, 24, 1, 10, 24)]
    mixed = llm.generate(PROMPTS, params)
    full = llm.generate(PROMPTS, GREEDY)
    for out, ref, p in zip(mixed, full, params):
        assert out.token_ids == ref.token_ids[: p.max_tokens]
        assert out.finish_reason == "length"


@pytest.mark.exact
def test_seeded_sampling_is_reproducible_and_independent_of_batch(llm):
    params = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, top_k=20, seed=1234)
    alone = llm.generate([PROMPTS[0]], params)[0].token_ids
    again = llm.generate([PROMPTS[0]], params)[0].token_ids
    in_batch = llm.generate([PROMPTS[1], PROMPTS[0]], [GREEDY, params])[1].token_ids
    assert alone == again == in_batch
    other = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=16, temperature=1.0, seed=99))[0].token_ids
    assert other != alone


def test_top_k_one_is_greedy(llm):
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.7, top_k=1, ignore_eos=True, seed=3))
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_tiny_top_p_is_greedy(llm):
    sampled = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, ignore_eos=True))
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    assert [o.token_ids for o in sampled] == [o.token_ids for o in greedy]


def test_stop_token_ids_end_generation(llm):
    ref = llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
    stop_at = ref[5]
    first = ref.index(stop_at)
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[stop_at]))[0]
    assert out.token_ids == ref[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_at


def test_stop_string_truncates_text(llm):
    ref = llm.generate(["hello world"], GREEDY)[0]
    assert len(ref.text) > 6
    stop = ref.text[3:6]
    out = llm.generate(["hello world"], SamplingParams(max_tokens=24, temperature=0.0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == ref.text[: ref.text.index(stop)]
    assert stop not in out.text


def test_eos_stops_unless_ignored(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    probe = LLM(directory, device="cpu")
    ref = probe.generate([PROMPTS[2]], GREEDY)[0].token_ids
    # Declare the 4th greedy token the model's EOS: generation must stop there.
    eos_llm = LLM(directory, device="cpu")
    eos_llm.engine.eos_token_ids = {ref[3]}
    out = eos_llm.generate([PROMPTS[2]], SamplingParams(max_tokens=24, temperature=0.0))[0]
    assert out.token_ids == ref[: ref.index(ref[3]) + 1] and out.finish_reason == "stop"
    ignored = eos_llm.generate([PROMPTS[2]], GREEDY)[0]
    assert ignored.token_ids == ref


def test_text_equals_decode_of_tokens(llm):
    out = llm.generate(["the quick brown"], GREEDY)[0]
    assert out.text == llm.tokenizer.decode(out.token_ids)
    assert out.prompt_token_ids == llm.tokenizer.encode("the quick brown")


def test_generation_stops_at_the_context(checkpoint_factory):
    directory, _ = checkpoint_factory("qwen3_moe", tokenizer=True)
    small = LLM(directory, device="cpu", max_model_len=12)
    out = small.generate([list(range(1, 9))], SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 4 and out.finish_reason == "length"


def test_logprobs_match_score(llm):
    prompt = PROMPTS[0]
    out = llm.generate([prompt], SamplingParams(max_tokens=4, temperature=0.0, logprobs=3, prompt_logprobs=2, ignore_eos=True))[0]
    logits = llm.score(prompt + out.token_ids)  # [T, V]
    ref = torch.log_softmax(logits, dim=-1)
    for i, (token, entry) in enumerate(zip(out.token_ids, out.logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert next(iter(entry)) == token
        assert math.isclose(entry[token], row[token].item(), abs_tol=1e-4)
        top = row.topk(3)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert math.isclose(entry[t], v, abs_tol=1e-4)
    assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
    for j in range(1, len(prompt)):
        assert math.isclose(out.prompt_logprobs[j][prompt[j]], ref[j - 1, prompt[j]].item(), abs_tol=1e-4)


def test_chat_renders_template_once(llm):
    messages = [{"role": "user", "content": "hello"}]
    rendered = llm.tokenizer.apply_chat_template(messages)
    assert rendered == "<|user|>hello<|end|><|assistant|>"
    out = llm.chat([messages], GREEDY)[0]
    assert out.prompt_token_ids == llm.tokenizer.encode(rendered, add_special_tokens=False)


def test_score_accepts_text_and_matches_generate_logits(llm):
    text_logits = llm.score("hello world")
    assert text_logits.shape[0] == len(llm.tokenizer.encode("hello world"))
    assert llm.engine.runner.blocks.blocks_in_use == 0  # score leaves no block behind


def test_decode_of_a_subset_of_running_sequences(llm):
    # A step may decode some running sequences but not others (e.g. one policy variant at a
    # time): sequences 2 and 0, out of order, must give what each sequence gives alone.
    engine, runner, experts = llm.engine, llm.engine.runner, llm.experts

    def prepared(prompts):
        seqs = [engine.make_sequence(p, GREEDY) for p in prompts]
        runner.extend(seqs, [False] * len(seqs), experts)
        for seq in seqs:
            seq.output_ids.append(5)
        return seqs

    seqs = prepared(PROMPTS[:3])
    subset = runner.decode([seqs[2], seqs[0]], experts)  # [2, V]
    for seq in seqs:
        engine.scheduler.release(seq)
    for row, prompt in zip(subset, (PROMPTS[2], PROMPTS[0])):
        (alone,) = prepared([prompt])
        assert torch.allclose(row, runner.decode([alone], experts)[0], atol=1e-5)
        engine.scheduler.release(alone)


def test_step_outputs_add_up_to_the_finished_sequence(llm):
    # Per step, each sequence's new token, its logprobs and a text delta that is never taken back,
    # even when a stop string is found only after part of it was already produced.
    ref = llm.generate(["hello world"], GREEDY)[0]
    start = next(i for i in range(2, len(ref.text) - 3) if "\ufffd" not in ref.text[i - 2 : i + 3])
    stop = ref.text[start : start + 3]
    seqs = [
        llm.engine.make_sequence("hello world", SamplingParams(max_tokens=24, temperature=0, stop=[stop], logprobs=1)),
        llm.engine.make_sequence(PROMPTS[0], SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)),
    ]
    for seq in seqs:
        llm.engine.submit(seq, llm.experts)
    outputs = {seq.seq_id: [] for seq in seqs}
    while llm.engine.has_unfinished():
        for out in llm.engine.step():
            outputs[out.seq_id].append(out)
    for seq in seqs:
        mine = outputs[seq.seq_id]
        assert [t for out in mine for t in out.token_ids] == seq.output_ids
        assert "".join(out.text_delta for out in mine) == seq.text
        assert [out.finish_reason for out in mine] == [None] * (len(mine) - 1) + [seq.finish_reason]
    stopped, plain = (outputs[seq.seq_id] for seq in seqs)
    assert stopped[-1].finish_reason == "stop" and stopped[-1].stop_reason == stop
    assert seqs[0].text == ref.text[: ref.text.index(stop)]
    assert all(len(out.logprobs) == 1 for out in stopped) and all(out.logprobs == [] for out in plain)
    assert plain[-1].finish_reason == "length" and len(plain) == 5
