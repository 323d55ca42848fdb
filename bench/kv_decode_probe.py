"""One measurement for bench/kv_decode_compare.py's CPU-time mode: decode steps of the tiny preset, timed by
the CPU time the process spends on them (time.process_time, every torch thread included), which a busy or
preempted machine disturbs less than wall time. Uses only the engine API that both sides of a comparison
share, so it runs from any revision's tree (PYTHONPATH) and prints one JSON line: {batch: ms per step}.

    python bench/kv_decode_probe.py --batches 1,8 --steps 48 --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

if str(Path(__file__).resolve().parent) not in sys.path:
    sys.path.append(str(Path(__file__).resolve().parent))

from throughput_models import synthetic_workload  # noqa: E402

from moeserve.engine.llm_engine import LLMEngine  # noqa: E402
from moeserve.engine.sampling_params import SamplingParams  # noqa: E402
from moeserve.experts import DenseExpertProvider, stack_experts  # noqa: E402

PROMPT = 64
WARMUP = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    workload = synthetic_workload("tiny", 4, cpu, 0)
    c = workload.config
    provider = DenseExpertProvider.from_stacked({
        layer: stack_experts(weights, c.num_experts, c.moe_intermediate_size, c.hidden_size, cpu, c.dtype)
        for layer, weights in workload.experts()
    })
    generator = torch.Generator().manual_seed(0)
    result = {}
    for batch in (int(b) for b in args.batches.split(",")):
        engine = LLMEngine(workload.model, None, cpu, max_model_len=PROMPT + args.steps + WARMUP + 8,
                           max_num_seqs=batch, max_num_batched_tokens=batch * PROMPT)
        params = SamplingParams(max_tokens=args.steps + WARMUP + 2, temperature=0.0, ignore_eos=True)
        for _ in range(batch):
            engine.submit(engine.make_sequence(torch.randint(c.vocab_size, (PROMPT,), generator=generator).tolist(), params), provider)
        for _ in range(1 + WARMUP):  # the prefill, then first-use costs
            engine.step()
        times = []
        for _ in range(args.steps):
            start = time.process_time()
            engine.step()
            times.append(time.process_time() - start)
        result[batch] = 1000 * statistics.median(times)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
