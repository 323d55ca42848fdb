"""Building blocks shared by every model family: norms, rotary embedding, attention, MLPs, the MoE block."""
