"""Logical axis names carried by every parameter and main activation.

Sharding rules (``cai_jax.sharding.RULE_PRESETS``) map these names to mesh
axes; model code never names a mesh axis directly.
"""

BATCH = "batch"        # examples in a batch
LENGTH = "length"      # token positions
ACTIVATION_LENGTH = "activation_length"  # token positions of the residual stream between
                                         # blocks (sequence parallelism under fsdp_tp)
EMBED = "embed"        # residual stream (d_model)
MLP = "mlp"            # SwiGLU hidden (d_ff)
HEADS = "heads"        # query heads
KV_HEADS = "kv_heads"  # key/value heads (grouped-query attention)
KV = "kv"              # per-head feature dimension (head_dim)
VOCAB = "vocab"        # token ids
LAYERS = "layers"      # stacked decoder blocks under nn.scan

ALL = (BATCH, LENGTH, ACTIVATION_LENGTH, EMBED, MLP, HEADS, KV_HEADS, KV, VOCAB, LAYERS)
