"""Train the embedded default model from scratch on the task suite (CPU, deterministic).

    python -m moeserve.eval.train_default --out DIR [--steps N] [--seed S] ...

Writes into DIR: tokenizer.json / tokenizer_config.json (trained first), then, at the end,
config.json, generation_config.json and model.safetensors (bf16 tensors; config dtype float32, the
compute dtype on load) as a Qwen3-MoE checkpoint.
train_state.pt (weights + optimizer at the last validation) lets an interrupted run resume with
--resume and continue bit for bit: batches depend only on (seed, step).
Validation accuracy is printed through `evaluate`, the same code `moeserve eval` runs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from moeserve.eval.build_tokenizer import build_tokenizer, save_tokenizer
from moeserve.eval.chat_format import EOS, PAD
from moeserve.eval.evaluate import evaluate
from moeserve.eval.reference import ReferenceRunner
from moeserve.eval.train_data import IGNORE, make_batch
from moeserve.eval.train_model import MoeConfig, MoeForCausalLM, packed_layout

# Training mixture (relative shares of examples), set from single-skill pilots: reversing and
# sorting are learned from ~10k examples and facts from ~20k, while multi-digit arithmetic and the
# word problems need several times more.
DEFAULT_WEIGHTS = {"add": 1.7, "sub": 2.4, "mul": 2.2, "sort": 0.45, "reverse": 0.4, "facts": 1.2, "word": 1.15}
# A last phase at the final (lowest) lr on the skills still weakest after the main run: multiplication
# (the slowest arithmetic skill to generalise) and the word problems; the others keep a share so they stay.
FINAL_WEIGHTS = {"add": 1.0, "sub": 1.2, "mul": 3.0, "sort": 0.3, "reverse": 0.3, "facts": 1.2, "word": 1.5}


@dataclass
class TrainArgs:
    out: Path
    steps: int = 11000  # the main run: warm-up, constant, decay
    final_steps: int = 1000  # then this many at the final lr with FINAL_WEIGHTS
    rows: int = 12  # rows per batch
    row_len: int = 96  # tokens per row (several examples each)
    lr: float = 4e-3
    warmup: int = 200
    decay_frac: float = 0.3  # share of the steps over which lr decays at the end
    min_lr_ratio: float = 0.05  # the decay ends at this share of lr
    weight_decay: float = 0.1  # discourages memorising the small problem sets (mul, sub, word)
    aux_coef: float = 0.01  # weight of the load-balancing loss
    seed: int = 1  # seed 0 trained a model that answered "What is 123 + 456?" with 589
    eval_every: int = 2750
    eval_items: int = 30  # validation items per task at each evaluation
    threads: int = 2
    resume: bool = False
    model: MoeConfig = field(default_factory=MoeConfig)


def load_balancing_loss(router_logits: list[torch.Tensor], real: torch.Tensor, top_k: int) -> torch.Tensor:
    """Switch-Transformer loss averaged over layers, as transformers' load_balancing_loss_func.

    E * sum_e f_e * P_e, with f_e the share of routed slots going to expert e and P_e the mean
    router probability of e; its minimum (top_k) is reached when both are uniform.
    """
    mask = real.reshape(-1, 1).float()  # [N, 1]
    count = mask.sum()
    losses = []
    for logits in router_logits:  # [N, E]
        probs = logits.float().softmax(-1)
        chosen = F.one_hot(probs.topk(top_k, -1).indices, probs.shape[-1]).sum(1).float()  # [N, E]
        share = (chosen * mask).sum(0) / count
        mean_prob = (probs * mask).sum(0) / count
        losses.append(probs.shape[-1] * (share * mean_prob).sum())
    return torch.stack(losses).mean()


def lr_at(args: TrainArgs, step: int) -> float:
    """Warm-up, then constant, then a cosine decay over the last `decay_frac` of the steps.

    A long constant phase keeps learning fast while the arithmetic skills are still far from
    learned; the final decay is where the accuracy on held-out problems jumps.
    """
    if step >= args.steps:  # the final phase
        return args.lr * args.min_lr_ratio
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    decay_start = args.steps * (1 - args.decay_frac)
    if step < decay_start:
        return args.lr
    progress = (step - decay_start) / max(1, args.steps - decay_start)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: MoeForCausalLM, args: TrainArgs) -> torch.optim.AdamW:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    keep = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": keep, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.98), eps=1e-8)


def export_checkpoint(model: MoeForCausalLM, args: TrainArgs, eos_id: int, pad_id: int) -> None:
    """Write config.json, generation_config.json and bf16 model.safetensors into args.out."""
    config = model.cfg.hf_config(eos_token_id=eos_id, pad_token_id=pad_id, aux_coef=args.aux_coef)
    (args.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"eos_token_id": eos_id, "pad_token_id": pad_id, "do_sample": False, "max_new_tokens": 32}
    (args.out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    tensors = {k: v.to(torch.bfloat16) for k, v in model.hf_state_dict().items()}
    save_file(tensors, args.out / "model.safetensors", metadata={"format": "pt"})


def validate(model: MoeForCausalLM, tokenizer, args: TrainArgs) -> str:
    model.eval()
    report = evaluate(ReferenceRunner(model, tokenizer), split="validation", limit=args.eval_items)
    model.train()
    per_task = " ".join(f"{n}={100 * s.accuracy:.0f}" for n, s in report.per_task.items())
    return f"val avg={100 * report.average:.1f} {per_task}"


def train(args: TrainArgs) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(args.seed)
    save_tokenizer(tokenizer, args.out, args.model.max_position_embeddings)
    if tokenizer.get_vocab_size() != args.model.vocab_size:
        raise SystemExit(f"tokenizer has {tokenizer.get_vocab_size()} tokens, model expects {args.model.vocab_size}")
    eos_id, pad_id = tokenizer.token_to_id(EOS), tokenizer.token_to_id(PAD)

    model = MoeForCausalLM(args.model)
    model.init_weights(args.seed)
    optimizer = make_optimizer(model, args)
    state_path = args.out / "train_state.pt"
    start, totals = 0, {"examples": 0, "tokens": 0, "elapsed": 0.0}
    if args.resume and state_path.exists():
        state = torch.load(state_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start, totals = state["step"], state["totals"]
        print(f"resumed at step {start}", flush=True)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params / 1e6:.2f}M; args {asdict(args)}", flush=True)

    t0 = time.time() - totals["elapsed"]  # wall and CPU time count the interrupted part too
    cpu0 = time.process_time() - totals.get("cpu_time", 0.0)
    total_steps = args.steps + args.final_steps
    for step in range(start, total_steps):
        weights = DEFAULT_WEIGHTS if step < args.steps else FINAL_WEIGHTS
        batch = make_batch(tokenizer, args.seed, step, args.rows, args.row_len, weights)
        positions, mask = packed_layout(batch.segments)
        logits, router_logits = model(batch.ids, positions, mask)
        lm_loss = F.cross_entropy(logits.flatten(0, 1), batch.labels.flatten(), ignore_index=IGNORE)
        aux = load_balancing_loss(router_logits, batch.real, args.model.num_experts_per_tok)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(args, step)
        optimizer.zero_grad(set_to_none=True)
        (lm_loss + args.aux_coef * aux).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        totals["examples"] += batch.examples
        totals["tokens"] += int(batch.real.sum())
        if step % 50 == 0:
            elapsed = time.time() - t0
            print(f"step {step} loss {lm_loss.item():.4f} aux {aux.item():.3f} lr {lr_at(args, step):.2e} "
                  f"examples {batch.examples} elapsed {elapsed:.0f}s", flush=True)
        if (step + 1) % args.eval_every == 0 or step + 1 in (args.steps, total_steps):
            print(f"step {step + 1} {validate(model, tokenizer, args)} elapsed {time.time() - t0:.0f}s", flush=True)
            totals["elapsed"] = time.time() - t0
            totals["cpu_time"] = time.process_time() - cpu0
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step + 1,
                        "totals": totals}, state_path)
    export_checkpoint(model, args, eos_id, pad_id)
    write_training_record(args, totals, time.time() - t0, time.process_time() - cpu0)
    print(f"done: {total_steps} steps in {time.time() - t0:.0f}s; checkpoint in {args.out}", flush=True)


def write_training_record(args: TrainArgs, totals: dict, wall_time_s: float, cpu_time_s: float) -> None:
    """training.json: what the model card reports about this run."""
    record = {
        # Without --resume: a resumed run is bit-identical to an uninterrupted one (batches depend
        # only on seed and step), so the command that reproduces it is the plain one.
        "command": "OMP_WAIT_POLICY=PASSIVE python -m moeserve.eval.train_default "
                   + " ".join(a for a in sys.argv[1:] if a != "--resume"),
        "wall_time_s": round(wall_time_s),
        # CPU time over wall time shows how much of the machine the run actually had (shared CPUs).
        "cpu_time_s": round(cpu_time_s),
        "hardware": f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), "
                    f"{args.threads} torch threads, torch {torch.__version__}",
        "mixture": ", ".join(f"{k} {v:g}" for k, v in DEFAULT_WEIGHTS.items()),
        "final_mixture": ", ".join(f"{k} {v:g}" for k, v in FINAL_WEIGHTS.items()),
        "examples": totals["examples"],
        "tokens": totals["tokens"],
        **{k: v for k, v in asdict(args).items() if k not in ("out", "model", "resume")},
    }
    (args.out / "training.json").write_text(json.dumps(record, indent=2) + "\n")


def parse_args(argv: list[str] | None = None) -> TrainArgs:
    defaults = TrainArgs(out=Path("."))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    for name in ("steps", "final_steps", "rows", "row_len", "warmup", "seed", "eval_every", "eval_items", "threads"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults, name))
    for name in ("lr", "decay_frac", "min_lr_ratio", "weight_decay", "aux_coef"):
        parser.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(defaults, name))
    for name in ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size"):
        parser.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(defaults.model, name))
    parser.add_argument("--resume", action="store_true", help="continue from DIR/train_state.pt")
    ns = vars(parser.parse_args(argv))
    model_fields = {k: ns.pop(k) for k in ("hidden_size", "num_hidden_layers", "num_experts", "moe_intermediate_size")}
    return TrainArgs(model=MoeConfig(**model_fields), **ns)


if __name__ == "__main__":
    train(parse_args())
