"""The results of bench/throughput.py as a markdown table and as the issue's ratios, from the results dict.

In:  the dict that bench/throughput.py writes to bench/results/<device>.json.
Out: text: one table row per (workload, batch, configuration, budget), and per workload the ratios the
     issue asks about at a 25% budget: (d) against (b), (d) against its physical bound, wait against decode,
     and (d)'s guesses per distance (how many MoE layers ahead) with the share of them used.
"""

from __future__ import annotations

CONFIG_ORDER = ("a resident", "b naive", "c compressed", "d +prefetch")
HEADER = (
    "| workload | batch | config | budget | tok/s | vs (b) | TPOT ms | TTFT s | MiB/token | hit rate "
    "| prefetch acc. | wait ms/token | decode ms/token | bound tok/s | of bound |"
)


def _num(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _pct(value) -> str:
    return "—" if value is None else f"{100 * value:.0f}%"


def naive_row(rows: list[dict], budget: str, batch: int) -> dict | None:
    return next((r for r in rows if r["config"] == "b naive" and r["budget"] == budget and r["batch"] == batch), None)


def markdown_table(results: dict) -> str:
    lines = [HEADER, "|" + "---|" * (HEADER.count("|") - 1)]
    for workload in results["workloads"]:
        rows = workload["rows"]
        ordered = sorted(rows, key=lambda r: (r["batch"], r["budget"] != "all", _budget_key(r["budget"]),
                                              CONFIG_ORDER.index(r["config"])))
        for r in ordered:
            base = naive_row(rows, r["budget"], r["batch"])
            speedup = r["tokens_per_s"] / base["tokens_per_s"] if base and r["config"] != "a resident" else None
            lines.append(
                f"| {workload['name']} | {r['batch']} | {r['config']} | {r['budget']} | {r['tokens_per_s']:.2f} "
                f"| {_num(speedup)}{'x' if speedup is not None else ''} | {r['tpot_ms']:.1f} | {r['ttft_s']:.3f} "
                f"| {r['bytes_per_token'] / 2**20:.2f} | {_pct(r['hit_rate'])} | {_pct(r['prefetch_accuracy'])} "
                f"| {r['wait_ms_per_token']:.2f} | {r['decode_ms_per_token']:.2f} | {_num(r['bound_tokens_per_s'])} "
                f"| {_pct(r['fraction_of_bound'])} |"
            )
    return "\n".join(lines)


def _budget_key(budget: str) -> float:
    """'10%' < '25%' < '50%'; other spellings keep their given order after them."""
    return float(budget[:-1]) if budget.endswith("%") else float("inf")


def print_checks(results: dict, budget: str = "25%") -> None:
    """The issue's questions, as ratios measured in this run (no pass/fail: the thresholds are for GPUs)."""
    print(f"\nAt a {budget} budget (issue targets on an H100: (d)/(b) >= 2.5x, (d) >= 80% of its bound):")
    for workload in results["workloads"]:
        for r in workload["rows"]:
            if r["config"] != "d +prefetch" or r["budget"] != budget:
                continue
            base = naive_row(workload["rows"], budget, r["batch"])
            speedup = r["tokens_per_s"] / base["tokens_per_s"] if base else None
            print(f"  {workload['name']} batch {r['batch']}: (d)/(b) {_num(speedup)}x, "
                  f"(d) at {_pct(r['fraction_of_bound'])} of its bound ({_num(r['bound_tokens_per_s'])} tok/s); "
                  f"per token: wait {r['wait_ms_per_token']:.2f} ms, "
                  f"decoding {r['decode_ms_per_token']:.2f} ms (summed over workers or streams), "
                  f"wall {1000 / r['tokens_per_s']:.2f} ms")
    print("\n(d) against (c), every row (issue target: (d) >= (c)):")
    for workload in results["workloads"]:
        rows = workload["rows"]
        for d in (r for r in rows if r["config"] == "d +prefetch"):
            c = next((r for r in rows if r["config"] == "c compressed" and (r["budget"], r["batch"]) == (d["budget"], d["batch"])), None)
            if c is not None:
                print(f"  {workload['name']} batch {d['batch']} {d['budget']}: (d)/(c) {d['tokens_per_s'] / c['tokens_per_s']:.2f}x")
    print(f"\nTimeline per token at a {budget} budget, (d) (GPU pipeline; events, so zero on a CPU):")
    for workload in results["workloads"]:
        for r in workload["rows"]:
            if r["config"] != "d +prefetch" or r["budget"] != budget:
                continue
            wall = 1000 / r["tokens_per_s"] * r["batch"]  # one step makes a token for each sequence
            print(f"  {workload['name']} batch {r['batch']}: step {wall:.2f} ms; copy engine busy "
                  f"{r['copy_ms_per_token'] * r['batch']:.2f} ms, decoding {r['decode_ms_per_token'] * r['batch']:.2f} ms, "
                  f"compute stalled on decodes {r['compute_wait_ms_per_token'] * r['batch']:.2f} ms, "
                  f"wrong guesses {r['prefetch_wasted_bytes_per_token'] * r['batch'] / 2**20:.2f} MiB")
    print(f"\nGuesses by distance in MoE layers at a {budget} budget, (d) (used / issued; depth "
          f"{results.get('prefetch_depth') or 'automatic'}):")
    for workload in results["workloads"]:
        for r in workload["rows"]:
            if r["config"] == "d +prefetch" and r["budget"] == budget:
                by_distance = r["prefetch_by_distance"].items()
                print(f"  {workload['name']} batch {r['batch']}: " + (", ".join(
                    f"{d} ahead {used}/{issued} ({_pct(used / issued)})" for d, (issued, used) in by_distance
                ) or "no guesses"))
    for workload in results["workloads"]:
        for reason in workload["skipped"]:
            print(f"  {workload['name']}: skipped {reason}")
