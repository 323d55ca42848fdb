"""How many MoE layers ahead the model should guess experts: the prediction depth.

In:  the cache's slot count, the number of MoE layers, the experts per MoE layer, and the routing width
     (experts one layer's fetch asks for: top_k for one token, the union of the batch's choices beyond).
Out: the depth k >= 1: after layer l's attention the model predicts layers l+1 .. l+k.
"""

from __future__ import annotations


def automatic_prediction_depth(num_slots: int, moe_layers: int, experts_per_layer: int, width: int) -> int:
    """The largest k whose guesses fit in the slots that hold nothing a layer is likely to reuse.

    What each layer routed to on its latest pass is what it is likely to reuse (what it skipped is stale),
    so one step's working set is `moe_layers * width` slots, the current layer's own experts included.
    The rest, `num_slots - moe_layers * width`, is spare. Guesses for k layers ahead occupy up to
    `k * width` slots from the fetch that issues them until their layers run; taken from the spare, they
    evict nothing the next k layers (or any other) are likely to reuse. Hence k = spare // width.

    At least 1: the next layer's guess is the long-standing default, and it is safe on its own (it takes
    only free or stale slots where guesses may not evict). At most `moe_layers - 1`: the model predicts
    only the MoE layers after the current one in the same step. A width of all the experts (a prefill)
    leaves no spare, so the depth falls back to 1 for that step.
    """
    width = max(1, min(width, experts_per_layer))
    spare = num_slots - moe_layers * width
    return max(1, min(spare // width, moe_layers - 1))
