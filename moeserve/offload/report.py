"""Human-readable tables of a resolved policy and the store it produced."""

from __future__ import annotations


def format_policy_table(runtime) -> str:
    """One row per MoE layer: codec(s), mode and bound, realised bits/value and compressed bytes."""
    sizes = runtime.store.layer_sizes()
    rows = [("layer", "codec", "mode", "bound", "bits/value", "bytes")]
    for layer, size in sorted(sizes.items()):
        settings = runtime.policy.layer_settings(layer)
        rows.append(
            (
                str(layer),
                "+".join(dict.fromkeys(s.codec for s in settings)),
                "+".join(dict.fromkeys(s.mode for s in settings if s.error_bound is not None)) or "-",
                "+".join(dict.fromkeys(f"{s.error_bound:g}" for s in settings if s.error_bound is not None)) or "-",
                f"{size.bits_per_value:.2f}",
                str(size.nbytes),
            )
        )
    total_bytes = sum(s.nbytes for s in sizes.values())
    total_values = sum(s.numel for s in sizes.values())
    rows.append(("all", "", "", "", f"{8 * total_bytes / max(total_values, 1):.2f}", str(total_bytes)))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths)) for row in rows)
