"""`moeserve bench`: accuracy and quality versus error bound, per codec, bound mode and layer group.

In:  an `LLM` holding its experts uncompressed (float32 compute), `BenchOptions` (the grid).
Out: DIR/results.json (one row per configuration with its exact settings, rewritten after every row so
     an interrupted run resumes where it stopped), then DIR/report.md and the PNG plots (bench_report.py).

A configuration perturbs the experts of one layer group (all, shallow / middle / deep thirds of the MoE
layers, or an id range) with one setting: a codec round trip (what the offloading runtime would serve)
or, with --simulate gaussian, the study's N(0, eb) stand-in. Experts outside the group stay exact. Each
configuration is scored on the task suite (exact match) and against the uncompressed model (KL, top-1
agreement, perplexity: quality.py).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from moeserve.codecs import names as codec_names
from moeserve.codecs.bounds import MODES
from moeserve.codecs.registry import get as get_codec
from moeserve.errors import MoeServeError
from moeserve.eval.evaluate import evaluate
from moeserve.eval.bench_report import write_report
from moeserve.eval.perturb import BASELINE, GAUSSIAN, ExpertPerturber, Perturbation
from moeserve.eval.quality import QualityProbe, expert_usage
from moeserve.eval.tasks import resolve_tasks, split_items, split_size
from moeserve.loader import iter_stored_experts
from moeserve.offload.policy_resolve import GROUPS, split_groups

RESULTS = "results.json"
USAGE_SPLIT = "validation"  # the calibration split: expert usage for most-used:K is counted there


class BenchError(MoeServeError):
    """A bench option or output directory that cannot be used."""


@dataclass(frozen=True)
class BenchOptions:
    codecs: tuple[str, ...] = ("szp", "int8", "int4")
    modes: tuple[str, ...] = ("rel",)
    error_bounds: tuple[float, ...] = (1e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1)
    layers: tuple[str, ...] = ("all", "shallow", "middle", "deep")
    experts: str = "all"  # or "most-used:K"
    simulate: str | None = None  # "gaussian": also run N(0, eb) noise for every mode and bound
    tasks: tuple[str, ...] | None = None
    limit: int | None = None  # items per task (default: the whole split)
    split: str = "test"
    quality_items: int = 20  # held-out chats per task for KL, agreement and perplexity

    def __post_init__(self):
        for codec in self.codecs:
            if codec not in codec_names():
                raise BenchError(f"--codecs names {codec!r}; choose from {', '.join(codec_names())}.")
        for mode in self.modes:
            if mode not in MODES:
                raise BenchError(f"--modes names {mode!r}; choose from {', '.join(MODES)}.")
        if any(not (eb > 0) for eb in self.error_bounds):
            raise BenchError("--error-bounds must all be above 0, e.g. 1e-4,1e-3,1e-2.")
        if self.simulate not in (None, GAUSSIAN):
            raise BenchError(f"--simulate {self.simulate!r} is not known; the only stand-in is gaussian.")
        if not self.layers:
            raise BenchError("--layers is empty; give e.g. all,shallow,middle,deep or 0-3.")
        if self.experts != "all" and most_used_count(self.experts) is None:
            raise BenchError(f"--experts {self.experts!r} is not understood; use all or most-used:K, e.g. most-used:2.")
        if self.tasks is not None:
            resolve_tasks(list(self.tasks))
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"--limit must be at least 1, got {self.limit}.")
        if self.quality_items < 1:
            raise BenchError(f"--quality-items must be at least 1, got {self.quality_items}.")

    def settings(self) -> list[Perturbation]:
        """Every setting of the grid, the uncompressed baseline first."""
        out = [Perturbation(BASELINE)]
        for codec in self.codecs:
            if not get_codec(codec).bounded:
                out.append(Perturbation(codec))
                continue
            out += [Perturbation(codec, m, eb) for m in self.modes for eb in self.error_bounds]
        if self.simulate:
            out += [Perturbation(GAUSSIAN, m, eb) for m in self.modes for eb in self.error_bounds]
        return out


def most_used_count(spec: str) -> int | None:
    match = re.fullmatch(r"most-used:(\d+)", spec.strip())
    return int(match[1]) if match and int(match[1]) >= 1 else None


def layer_groups(selectors: tuple[str, ...], moe_layers: list[int]) -> dict[str, tuple[int, ...]]:
    """--layers entries → MoE layer ids: all, shallow / middle / deep, an id "5" or a range "0-3"."""
    thirds = split_groups(moe_layers)
    groups = {}
    for raw in selectors:
        name = raw.strip()
        if name == "all":
            ids = tuple(moe_layers)
        elif name in GROUPS:
            ids = thirds[name]
        else:
            match = re.fullmatch(r"(\d+)(?:-(\d+))?", name)
            if not match:
                raise BenchError(f"--layers entry {raw!r} is not understood; use all, shallow, middle, deep, 5 or 0-3.")
            first, last = int(match[1]), int(match[2] or match[1])
            ids = tuple(x for x in moe_layers if first <= x <= last)
            if not ids:
                raise BenchError(f"--layers entry {raw!r} holds no MoE layer; the MoE layers are {moe_layers[0]}-{moe_layers[-1]}.")
        if not ids:
            raise BenchError(f"--layers {name}: this model has too few MoE layers for a {name} third; use all or ids.")
        groups[name] = ids
    return groups


def row_id(setting: Perturbation, group: str, experts: str) -> str:
    bound = "" if setting.error_bound is None else repr(setting.error_bound)
    return f"{setting.codec}|{setting.mode or ''}|{bound}|{group}|{experts}"


def run_bench(llm, options: BenchOptions, out_dir: Path, progress: bool = True) -> list[dict]:
    """Runs every configuration not yet in out_dir/results.json; returns all rows (old and new)."""
    out_dir = Path(out_dir)
    header = {
        "model": str(llm.model_dir),
        "split": options.split,
        "tasks": resolve_tasks(list(options.tasks) if options.tasks else None),
        "items_per_task": split_size(options.split) if options.limit is None else min(options.limit, split_size(options.split)),
        "quality_items_per_task": options.quality_items,
        "experts": options.experts,
        "dtype": str(llm.config.dtype).removeprefix("torch."),
        "stored_bits_per_value": _stored_bits(llm),
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BenchError(f"--out {out_dir} cannot be created ({exc.strerror}); choose a writable directory.") from None
    rows = _load_rows(out_dir, header)
    done = {row["id"] for row in rows}
    moe_layers = list(llm.config.moe_layer_ids)
    groups = layer_groups(options.layers, moe_layers)
    plan = [(s, g) for s in options.settings() for g in (groups if s.codec != BASELINE else ["none"])]
    todo = [(s, g) for s, g in plan if row_id(s, g, options.experts) not in done]
    if todo:
        perturber = ExpertPerturber(llm)
        chosen = _chosen_experts(llm, options, progress)
        probe = QualityProbe(llm, split_items(options.split, header["tasks"], per_task=min(
            options.quality_items, split_size(options.split))))
        for setting, group in tqdm(todo, desc="bench", unit="config", disable=not progress):
            start = time.perf_counter()
            if setting.codec == BASELINE:
                provider, stats, layer_ids = None, None, ()
            else:
                layer_ids = groups[group]
                pairs = [(layer, e) for layer in layer_ids for e in chosen[layer]]
                provider, stats = perturber.provider(setting, pairs)
            report = evaluate(llm, options.split, header["tasks"], options.limit, experts=provider)
            quality = probe.baseline if provider is None else probe.measure(provider)
            rows.append({
                "id": row_id(setting, group, options.experts),
                "codec": setting.codec,
                "mode": setting.mode,
                "error_bound": setting.error_bound,
                "layers": group,
                "layer_ids": list(layer_ids),
                "experts": options.experts,
                "accuracy": report.average,
                "per_task": {name: s.accuracy for name, s in report.per_task.items()},
                **asdict(quality),
                "bits_per_value": None if stats is None else stats.bits_per_value,
                "compressed_bytes": None if stats is None else stats.compressed_bytes,
                "values": None if stats is None else stats.values,
                "max_error_over_bound": None if stats is None else stats.max_error_over_bound,
                "seconds": round(time.perf_counter() - start, 2),
            })
            _save_rows(out_dir, header, rows)
    order = {row_id(s, g, options.experts): i for i, (s, g) in enumerate(plan)}
    rows = sorted(rows, key=lambda r: order.get(r["id"], len(order)))
    write_report(rows, header, out_dir)
    return rows


def _stored_bits(llm) -> int:
    """Bits per value of the checkpoint's expert tensors (16 for bf16): the uncompressed point of the plots."""
    _, experts = next(iter_stored_experts(llm.model, llm.loaded.checkpoint, llm.config))
    return 8 * experts[0].gate.element_size()


def _chosen_experts(llm, options: BenchOptions, progress: bool) -> dict[int, list[int]]:
    """Per MoE layer, the experts a configuration perturbs: all, or the K most used on the calibration split."""
    everyone = list(range(llm.config.num_experts))
    k = most_used_count(options.experts) if options.experts != "all" else None
    if k is None:
        return {layer: everyone for layer in llm.config.moe_layer_ids}
    if k > len(everyone):
        raise BenchError(f"--experts most-used:{k} asks for more experts than the {len(everyone)} each layer has.")
    if progress:
        print(f"counting expert usage on the {USAGE_SPLIT} split for --experts {options.experts}")
    usage = expert_usage(llm, split_items(USAGE_SPLIT, list(options.tasks) if options.tasks else None))
    return {layer: sorted(sorted(everyone, key=lambda e: -counts[e])[:k]) for layer, counts in usage.items()}


def _load_rows(out_dir: Path, header: dict) -> list[dict]:
    path = out_dir / RESULTS
    if not path.exists():
        return []
    try:
        saved = json.loads(path.read_text())
        saved_header, rows = saved["settings"], list(saved["rows"])
    except (OSError, ValueError, KeyError, TypeError):
        raise BenchError(f"{path} exists but is not a moeserve bench result; choose another --out.") from None
    if saved_header != header:
        changed = next(k for k in header if saved_header.get(k) != header[k])
        raise BenchError(
            f"{path} was measured with another {changed} ({saved_header.get(changed)!r}, now {header[changed]!r}); "
            "use another --out to keep both, or the same options to resume."
        )
    return rows


def _save_rows(out_dir: Path, header: dict, rows: list[dict]) -> None:
    """Written to a temporary file, then renamed: an interrupted run never leaves a broken results.json."""
    tmp = out_dir / (RESULTS + ".tmp")
    tmp.write_text(json.dumps({"settings": header, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, out_dir / RESULTS)
