"""self_flow: a JAX/Flax trainer for Self-Flow (self-supervised flow matching)."""

import flax

# Parameters carry *logical* axis names ("embed", "mlp", ...) that only `self_flow.sharding` maps
# onto mesh axes; Flax's eager sharding would read them as mesh axes, so it stays off.
flax.config.update("flax_always_shard_variable", False)
