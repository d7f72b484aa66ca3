"""Test configuration: eight simulated CPU devices, so that pmap, shard_map and
sharded jit run as they would on a multi-device accelerator host."""

import os

os.environ["XLA_FLAGS"] = " ".join(
    filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=8"])
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
