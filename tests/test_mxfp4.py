"""MXFP4: the codec against transformers' dequantisation and the OCP MX rules, and an MXFP4 gpt_oss
checkpoint (made here from a tiny bf16 one) that loads, matches transformers, generates, serves and
offloads under the mxfp4 codec."""

from __future__ import annotations

import json

import httpx
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_hf_model, write_tokenizer
from moeserve import LLM, SamplingParams
from moeserve.codecs import Blob, decode, decode_into, encode
from moeserve.codecs.mxfp4 import FP4_VALUES, Mxfp4Tensor, blob_of, quantize
from moeserve.offload.cache import SlotPool
from moeserve.server import ServerConfig, create_app
from moeserve.server.background import BackgroundServer

PROMPTS = [[5, 6, 7], [10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 11]]
GREEDY = SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True)
SCORE_IDS = [3, 14, 15, 92, 65, 35, 89, 79, 32, 38, 46, 26, 43]


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality also covers -0.0, infinities and NaNs."""
    return t.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[t.dtype])


def _random_mxfp4(rows: int, groups: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """blocks [2, rows, groups, 16] with every byte value, scales [2, rows, groups] with every exponent."""
    g = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (2, rows, groups, 16), dtype=torch.uint8, generator=g)
    blocks.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    scales = torch.randint(100, 140, (2, rows, groups), dtype=torch.uint8, generator=g)
    scales.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)
    return blocks, scales


@pytest.mark.exact
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
def test_decode_equals_transformers_dequantisation_bit_for_bit(dtype):
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    blocks, scales = _random_mxfp4(rows=48, groups=3)
    reference = convert_moe_packed_tensors(blocks, scales, dtype=dtype)  # [2, 96, 48]: transposed, as a parameter
    for expert in range(2):
        tensor = Mxfp4Tensor(blocks[expert], scales[expert], dtype)
        expected = _bits(reference[expert].T.contiguous())  # [48, 96]
        assert torch.equal(_bits(tensor.dequantize()), expected)
        blob = Blob.from_bytes(bytes(blob_of(tensor)))  # the host store's form, through its byte format
        assert blob.codec == "mxfp4" and blob.shape == (48, 96) and blob.dtype == dtype
        assert torch.equal(_bits(decode(blob)), expected)
        out = torch.empty(48, 96, dtype=dtype)
        assert torch.equal(_bits(decode_into(blob, out)), expected)


def _reference_quantize(values: list[float]) -> tuple[int, list[int]]:
    """The OCP MX v1.0 rules written out for one block: shared scale 2^(floor(log2 amax) - 2), each value
    to the nearest FP4 E2M1 value, ties to the even code, saturating at 6."""
    amax = max(abs(v) for v in values)
    exponent = -127 if amax == 0 else max(-127, min(127, torch.tensor(amax).log2().floor().int().item() - 2))
    codes = []
    for v in values:
        scaled = v / 2.0**exponent
        candidates = range(8, 16) if scaled < 0 else range(8)
        distance = {code: abs(scaled - FP4_VALUES[code]) for code in candidates}
        best = min(distance.values())
        codes.append(min((c for c in candidates if distance[c] == best), key=lambda c: (c % 2, c)))
    return exponent + 127, codes


def test_quantize_follows_the_ocp_mx_rules():
    g = torch.Generator().manual_seed(1)
    step = 2.0**-5  # the scale of a block whose largest magnitude is in [2^-3, 2^-2)
    ties = [m * step for m in (0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)]
    blocks = [
        torch.randn(32, generator=g) * 0.02,
        torch.tensor(ties + [-t for t in ties] + [0.2] + [0.0] * 17),  # exact midpoints, both signs
        torch.tensor([7.0, -6.9, 6.5, 0.1] + [0.0] * 28),  # 7.0 sets the scale to 1; 6.5 and -6.9 saturate
        torch.zeros(32),
        torch.randn(32, generator=g) * 1e3,
    ]
    x = torch.cat(blocks)
    scales, packed = quantize(x)
    codes = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(len(blocks), 32)  # low nibble first
    for i, block in enumerate(blocks):
        scale, expected = _reference_quantize(block.tolist())
        assert scales[i].item() == scale and codes[i].tolist() == expected, i


def test_mxfp4_codec_round_trips_fp4_values_exactly():
    x = torch.tensor(FP4_VALUES * 6, dtype=torch.float32).reshape(3, 32) * torch.tensor([[2.0**-8], [1.0], [2.0**9]])
    for dtype in (torch.float32, torch.bfloat16):
        blob = Blob.from_bytes(bytes(encode(x.to(dtype), codec="mxfp4")))
        assert torch.equal(decode(blob), x.to(dtype))
        assert blob.payload_nbytes == 3 * 17  # one scale byte and 16 code bytes per 32 values


def write_mxfp4_checkpoint(hf_bf16, directory) -> None:
    """The published layout of an MXFP4 gpt_oss checkpoint: each expert matrix as [E, out, in] blocks of 32
    along `in` (gate_up_proj_blocks [E, 2I, D/32, 16], _scales [E, 2I, D/32]; down_proj_* likewise with
    [E, D, I/32]), every other tensor in bf16, and quantization_config naming mxfp4."""
    state = {name: t.contiguous() for name, t in hf_bf16.state_dict().items()}
    for name in [n for n in state if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        matrix = state.pop(name).transpose(1, 2)  # [E, D, 2I] → [E, 2I, D]; [E, I, D] → [E, D, I]
        scales, blocks = quantize(matrix.reshape(-1))  # `in` is a multiple of 32: blocks never cross rows
        state[f"{name}_blocks"] = blocks.view(*matrix.shape[:2], -1, 16)
        state[f"{name}_scales"] = scales.view(*matrix.shape[:2], -1)
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = hf_bf16.config.to_dict()
    config["dtype"] = "bfloat16"
    config["quantization_config"] = {
        "quant_method": "mxfp4",
        "modules_to_not_convert": [
            "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
        ],  # fmt: skip
    }
    (directory / "config.json").write_text(json.dumps(config))
    write_tokenizer(directory)


@pytest.fixture(scope="module")
def mxfp4_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("gpt_oss-mxfp4")
    write_mxfp4_checkpoint(make_hf_model("gpt_oss", seed=4).to(torch.bfloat16), directory)
    return directory


@pytest.fixture(autouse=True)
def store_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOESERVE_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def resident(mxfp4_dir):
    return LLM(mxfp4_dir, device="cpu")


def _transformers_dequantized(directory, dtype):
    """transformers' own loading of the checkpoint, dequantizing the experts (what it does without
    MXFP4 kernels, as on this CPU)."""
    from transformers import AutoModelForCausalLM, Mxfp4Config

    config = Mxfp4Config(dequantize=True)
    return AutoModelForCausalLM.from_pretrained(directory, dtype=dtype, quantization_config=config).eval()


@pytest.mark.exact
def test_resident_experts_are_transformers_dequantised_weights(mxfp4_dir, resident):
    hf = _transformers_dequantized(mxfp4_dir, torch.bfloat16)
    assert resident.config.expert_quantization == "mxfp4" and resident.config.dtype == torch.bfloat16
    for layer in resident.config.moe_layer_ids:
        experts = hf.model.layers[layer].mlp.experts
        for e in range(resident.config.num_experts):
            ours = resident.experts.expert(layer, e)
            gate_up = experts.gate_up_proj[e]  # [D, 2I], gate and up interleaved
            assert torch.equal(_bits(ours.gate), _bits(gate_up[:, 0::2].T.contiguous()))
            assert torch.equal(_bits(ours.up), _bits(gate_up[:, 1::2].T.contiguous()))
            assert torch.equal(_bits(ours.down), _bits(experts.down_proj[e].T.contiguous()))


def test_matches_transformers_loading_the_mxfp4_checkpoint(mxfp4_dir):
    hf = _transformers_dequantized(mxfp4_dir, torch.float32)
    llm = LLM(mxfp4_dir, device="cpu", dtype="float32")
    with torch.no_grad():
        reference = hf(torch.tensor([SCORE_IDS])).logits[0]
    assert (llm.score(SCORE_IDS) - reference).abs().max().item() <= 1e-4
    for prompt, out in zip(PROMPTS, llm.generate(PROMPTS, GREEDY)):
        with torch.no_grad():
            expected = hf.generate(
                torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0
            )
        assert out.token_ids == expected[0, len(prompt) :].tolist()


def _run(llm):
    short = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    return [o.token_ids for o in llm.generate(PROMPTS, short)], llm.score(SCORE_IDS)


@pytest.mark.exact
def test_offloaded_under_the_mxfp4_codec_equals_resident(mxfp4_dir, resident):
    tokens, logits = _run(resident)
    c = resident.config
    minimum = c.top_k * SlotPool.slot_nbytes(c.hidden_size, c.moe_intermediate_size, c.dtype)  # one layer's top-k
    for budget in ("50%", minimum):
        llm = LLM(mxfp4_dir, device="cpu", expert_cache=budget, progress=False)
        store = llm.offload.store
        assert {b.codec for p in store.experts.values() for b in p.blobs} == {"mxfp4"}  # the default, bytes as shipped
        assert all(4.25 <= s.bits_per_value < 5 for s in store.layer_sizes().values())
        got_tokens, got_logits = _run(llm)
        assert got_tokens == tokens and torch.equal(got_logits, logits), budget
    raw = LLM(mxfp4_dir, device="cpu", policy={"default": {"codec": "raw"}}, expert_cache="50%", progress=False)
    assert {b.codec for p in raw.offload.store.experts.values() for b in p.blobs} == {"raw"}
    got_tokens, got_logits = _run(raw)
    assert got_tokens == tokens and torch.equal(got_logits, logits)


def test_compress_keeps_the_experts_in_mxfp4_by_default(mxfp4_dir, resident, tmp_path):
    from moeserve.cli import main

    out = tmp_path / "compressed"
    assert main(["compress", "--model", str(mxfp4_dir), "--out", str(out)]) == 0  # no --policy
    served = LLM(out, device="cpu", expert_cache="50%", progress=False)
    assert {b.codec for p in served.offload.store.experts.values() for b in p.blobs} == {"mxfp4"}
    assert _run(served)[0] == _run(resident)[0]


def test_mxfp4_checkpoint_serves_one_request(resident):
    (expected,) = resident.generate([PROMPTS[1]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    with BackgroundServer(create_app(resident, ServerConfig(model_name="tiny-gpt-oss"))) as server:
        response = httpx.post(
            f"{server.url}/v1/completions",
            json={"model": "tiny-gpt-oss", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            timeout=60,
        )
    assert response.status_code == 200
    choice = response.json()["choices"][0]
    assert choice["text"] == expected.text and response.json()["usage"]["completion_tokens"] == 8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.gpu
def test_cuda_decode_and_offload_equal_resident(mxfp4_dir):
    blocks, scales = _random_mxfp4(rows=48, groups=3)
    blob = blob_of(Mxfp4Tensor(blocks[0], scales[0], torch.bfloat16))
    for dtype in (torch.bfloat16, torch.float32):
        cpu = decode_into(blob, torch.empty(48, 96, dtype=dtype))
        device_blob = blob.with_payload(torch.from_numpy(blob.payload_numpy()).cuda())
        out = torch.empty(48, 96, dtype=dtype, device="cuda")
        decode_into(device_blob, out)
        torch.cuda.synchronize()
        assert torch.equal(_bits(out.cpu()), _bits(cpu))
        assert torch.equal(_bits(decode(blob, "cuda").cpu()), _bits(decode(blob)))
    resident = LLM(mxfp4_dir, device="cuda")
    offloaded = LLM(mxfp4_dir, device="cuda", expert_cache="50%", progress=False)
    tokens, logits = _run(resident)
    got_tokens, got_logits = _run(offloaded)
    assert got_tokens == tokens and torch.equal(got_logits, logits)
