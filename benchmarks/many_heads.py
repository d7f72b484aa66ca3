"""Compile time, memory and step time of a multi_head with many heads (issue 10's scale targets).

  python -m benchmarks.many_heads [T] [binary|cycling]

T binary heads (or T heads cycling binary / 5-way / regression), batch 256:
the eval step's compile time, step time and number of output leaves,
`metrics.merge` and `metrics.compute` of its statistics, the loss-and-gradient
compile time, and the process's peak RSS.
"""

import resource
import sys
import time

import jax
import numpy as np

import jheads
from jheads import metrics


def main(argv=None):
  argv = sys.argv[1:] if argv is None else argv
  num_heads = int(argv[0]) if argv else 1000
  kind = argv[1] if len(argv) > 1 else "binary"
  factories = [
      lambda n: jheads.binary_classification_head(name=n),
      lambda n: jheads.multi_class_head(5, name=n),
      lambda n: jheads.regression_head(name=n),
  ]
  heads = [
      factories[0 if kind == "binary" else i % 3](f"h{i:04d}") for i in range(num_heads)
  ]
  head = jheads.multi_head(heads)
  batch = 256
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(batch, head.logits_dim)).astype(np.float32)
  labels = {
      h.name: (
          rng.integers(0, 5, batch).astype(np.int32)
          if h.config.kind == "multi_class"
          else rng.integers(0, 2, batch).astype(np.float32)
      )
      for h in heads
  }
  figures = {}
  start = time.perf_counter()
  eval_step = jax.jit(lambda lo, la: head.metric_fn(lo, la))
  eval_step.lower(logits, labels).compile()
  figures["eval_compile_s"] = time.perf_counter() - start
  stats = jax.block_until_ready(eval_step(logits, labels))
  start = time.perf_counter()
  for _ in range(10):
    stats = eval_step(logits, labels)
  jax.block_until_ready(stats)
  figures["eval_step_ms"] = (time.perf_counter() - start) / 10 * 1e3
  figures["eval_output_leaves"] = len(jax.tree.leaves(stats))
  start = time.perf_counter()
  merged = metrics.merge(stats, stats)
  figures["merge_s"] = time.perf_counter() - start
  start = time.perf_counter()
  values = metrics.compute(merged)
  figures["compute_s"] = time.perf_counter() - start
  figures["metric_keys"] = len(values)
  start = time.perf_counter()
  jax.jit(jax.value_and_grad(lambda lo, la: head.losses_fn(lo, la), has_aux=True)).lower(
      logits, labels
  ).compile()
  figures["loss_grad_compile_s"] = time.perf_counter() - start
  figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  for key, value in figures.items():
    print(f"{key:22s} {value:.3f}" if isinstance(value, float) else f"{key:22s} {value}")
  return figures


if __name__ == "__main__":
  main()
