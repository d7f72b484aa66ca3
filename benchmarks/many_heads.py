"""Compile time, memory and step time of a multi_head with many heads (issue 10's scale targets).

  python -m benchmarks.many_heads [T] [binary|cycling] [--out PATH]

T binary heads (or T heads cycling binary / 5-way / regression), batch 256,
against the "stacked floor": the same numbers computed by hand-written JAX
on `[256, heads]` arrays, one op per kind of head (what a user who gave up
on per-head abstractions would write). Figures:

* eval step (`jit(head.metric_fn)` on the logits): compile time, output
  leaves, step time and its ratio to the floor's, `metrics.merge` and
  `metrics.compute` of its statistics;
* train step (a linear layer to the logits, `head.loss_fn`, its gradient
  and an Adam update): compile time, step time and ratio to the floor's;
  the same for `jheads.training.make_train_step` (value checks on, its
  default) and `make_eval_step`;
* the process' peak RSS.

The floor takes the labels as jheads does, a dict keyed by head name,
and stacks them itself; the `*_vs_array_floor` rows pair jheads with the
floor fed labels already stacked per kind (no dict at all), and in cycling
mode `*_vs_binary_floor` rows pair it with the T binary heads' floor.

Step times are paired: each round times a few calls of jheads and of the
floor back to back, and the ratio is taken within the round; the median
round is reported, so load on a shared machine cancels out as far as it
can. Inputs are device arrays (as a data pipeline that prefetches gives
them); `eval_step_numpy` feeds both numpy labels instead, one
host-to-device transfer per head. The floor's values are checked against
jheads' (to 1e-4) before anything is timed, so both compute the same thing.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import sys
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jheads
from jheads import metrics
from jheads import training

BATCH = 256
FEATURES = 32
N_CLASSES = 5
NUM_THRESHOLDS = 200
KINDS = ("binary", "multi_class", "regression")
ROUNDS = 15
CALLS = 5


def head_kinds(num_heads: int, mode: str) -> list[str]:
  if mode == "binary":
    return ["binary"] * num_heads
  if mode == "cycling":
    return [KINDS[i % 3] for i in range(num_heads)]
  raise ValueError(f"many_heads: mode must be 'binary' or 'cycling', got {mode!r}.")


def make_head(kinds: list[str]) -> jheads.MultiHead:
  factories = {
      "binary": lambda n: jheads.binary_classification_head(name=n),
      "multi_class": lambda n: jheads.multi_class_head(N_CLASSES, name=n),
      "regression": lambda n: jheads.regression_head(name=n),
  }
  return jheads.multi_head([factories[k](f"h{i:04d}") for i, k in enumerate(kinds)])


def make_data(kinds: list[str], seed: int = 0) -> dict[str, Any]:
  rng = np.random.default_rng(seed)
  dims = [N_CLASSES if k == "multi_class" else 1 for k in kinds]
  labels = {}
  for i, kind in enumerate(kinds):
    if kind == "binary":
      labels[f"h{i:04d}"] = rng.integers(0, 2, BATCH).astype(np.float32)
    elif kind == "multi_class":
      labels[f"h{i:04d}"] = rng.integers(0, N_CLASSES, BATCH).astype(np.int32)
    else:
      labels[f"h{i:04d}"] = rng.normal(size=BATCH).astype(np.float32)
  x = rng.normal(size=(BATCH, FEATURES)).astype(np.float32)
  w = (rng.normal(size=(FEATURES, sum(dims))) * FEATURES**-0.5).astype(np.float32)
  params = {"w": w, "b": np.zeros(sum(dims), np.float32)}
  return {"labels": labels, "x": x, "params": params, "logits": x @ w, "dims": dims}


# ----------------------------------------------------------------------------
# The stacked floor: each kind's heads in one op on `[B, heads]` arrays.


def _layout(kinds: list[str]) -> dict[str, tuple[list[str], np.ndarray]]:
  """Per kind: its head names and static logits columns `[heads, dim]`."""
  dims = [N_CLASSES if k == "multi_class" else 1 for k in kinds]
  offsets = np.cumsum([0] + dims)
  out = {}
  for kind in KINDS:
    members = [i for i, k in enumerate(kinds) if k == kind]
    if members:
      dim = N_CLASSES if kind == "multi_class" else 1
      out[kind] = (
          [f"h{i:04d}" for i in members],
          np.asarray([offsets[i] + np.arange(dim) for i in members], np.int32),
      )
  return out


def _floor_blocks(logits: jax.Array, layout: dict[str, Any]) -> dict[str, jax.Array]:
  """Per kind `[B, heads, dim]`: one gather putting the kinds' columns in kind order
  (none when each kind's columns are already contiguous), then one slice per kind."""
  flat = np.concatenate([columns.reshape(-1) for _, columns in layout.values()])
  if np.array_equal(flat, np.arange(flat.size)):
    permuted = logits
  else:
    permuted = logits[:, flat]
  blocks, start = {}, 0
  for kind, (_, columns) in layout.items():
    block = permuted[:, start : start + columns.size]
    blocks[kind] = block.reshape(logits.shape[0], *columns.shape)
    start += columns.size
  return blocks


def stacked_labels(kinds: list[str], labels: dict[str, Any]) -> dict[str, np.ndarray]:
  """Per kind, its heads' labels as one `[B, heads]` array (the array floor's input)."""
  return {
      kind: np.stack([np.asarray(labels[n]) for n in names], axis=-1)
      for kind, (names, _) in _layout(kinds).items()
  }


def _per_example_losses(kind: str, z: jax.Array, y: jax.Array) -> jax.Array:
  if kind == "binary":
    return optax.losses.sigmoid_binary_cross_entropy(z[..., 0], y)
  if kind == "multi_class":
    return optax.losses.softmax_cross_entropy_with_integer_labels(z, y)
  return jnp.square(z[..., 0] - y)


def _kind_labels(layout: dict[str, Any], labels: dict[str, Any], stacked: bool) -> dict[str, Any]:
  if stacked:
    return labels
  return {
      kind: jnp.stack([labels[n] for n in names], axis=-1) for kind, (names, _) in layout.items()
  }


def floor_losses(kinds: list[str], *, stacked: bool = False) -> Callable[..., jax.Array]:
  """`(logits, labels) -> sum of the heads' mean losses`, hand-written and stacked.

  Labels come as jheads takes them, a dict keyed by head name, or with
  `stacked` as `stacked_labels` gives them.
  """
  layout = _layout(kinds)

  def loss(logits, labels):
    blocks, labels = _floor_blocks(logits, layout), _kind_labels(layout, labels, stacked)
    total = 0.0
    for kind in layout:
      total = total + jnp.sum(_per_example_losses(kind, blocks[kind], labels[kind]))
    return total / logits.shape[0]

  return loss


def floor_statistics(kinds: list[str], *, stacked: bool = False) -> Callable[..., dict[str, Any]]:
  """`(logits, labels) -> {kind: {key: [heads] numerator and denominator}}`, hand-written.

  The statistics a jheads head of each kind reports by default, as stacked
  arrays; `floor_values` turns them into the metric values. Labels as for
  `floor_losses`.
  """
  layout = _layout(kinds)
  t = NUM_THRESHOLDS

  def statistics(logits, labels):
    blocks, labels = _floor_blocks(logits, layout), _kind_labels(layout, labels, stacked)
    out = {}
    for kind, (names, _) in layout.items():
      z, y = blocks[kind], labels[kind]
      losses = _per_example_losses(kind, z, y)
      n = jnp.asarray(logits.shape[0], jnp.float32)
      count = jnp.full(len(names), n)
      loss_sum = jnp.sum(losses, axis=0)
      stats = {"loss": (loss_sum / n, jnp.ones(len(names))), "average_loss": (loss_sum, count)}
      if kind == "binary":
        p = jax.nn.sigmoid(z[..., 0])
        predicted = (z[..., 0] > 0).astype(jnp.float32)
        positive = (y != 0).astype(jnp.float32)
        true_positives = jnp.sum(predicted * positive, axis=0)
        label_sum = jnp.sum(y, axis=0)
        stats.update({
            "accuracy": (jnp.sum((y == predicted).astype(jnp.float32), axis=0), count),
            "precision": (true_positives, jnp.sum(predicted, axis=0)),
            "recall": (true_positives, jnp.sum(positive, axis=0)),
            "prediction/mean": (jnp.sum(p, axis=0), count),
            "label/mean": (label_sum, count),
        })
        bucket = jnp.maximum(jnp.ceil(p * (t - 1)) - 1, 0).astype(jnp.int32)
        index = bucket + t * (y == 0).astype(jnp.int32) + 2 * t * jnp.arange(len(names))
        histogram = jnp.zeros(2 * t * len(names)).at[index.reshape(-1)].add(1.0)
        stats["histogram"] = histogram.reshape(len(names), 2, t)
      elif kind == "multi_class":
        correct = (jnp.argmax(z, axis=-1) == y).astype(jnp.float32)
        stats["accuracy"] = (jnp.sum(correct, axis=0), count)
      else:
        stats["prediction/mean"] = (jnp.sum(z[..., 0], axis=0), count)
        stats["label/mean"] = (jnp.sum(y, axis=0), count)
      out[kind] = stats
    return out

  return statistics


def floor_values(kinds: list[str], stats: dict[str, Any]) -> dict[str, np.ndarray]:
  """Metric values of `floor_statistics`' output, keyed as jheads keys them."""
  layout = _layout(kinds)
  values = {}
  for kind, (names, _) in layout.items():
    for key, stat in stats[kind].items():
      if key == "histogram":
        auc = metrics.AUC(np.asarray(stat[:, 0], np.float64), np.asarray(stat[:, 1], np.float64))
        per_head = auc.result()
        key = "auc"
      else:
        numerator, denominator = (np.asarray(s, np.float64) for s in stat)
        per_head = np.where(denominator == 0, 0.0, numerator / np.where(denominator == 0, 1, denominator))
      for name, value in zip(names, per_head):
        values[f"{key}/{name}"] = value
  return values


# ----------------------------------------------------------------------------
# Train steps: a linear layer to the logits, the loss, its gradient, Adam.


def linear(params, x):
  return x @ params["w"] + params["b"]


def sgd_step(loss_fn: Callable[..., jax.Array], optimizer: optax.GradientTransformation):
  def step(params, opt_state, x, labels):
    loss, grads = jax.value_and_grad(lambda p: loss_fn(linear(p, x), labels))(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


# ----------------------------------------------------------------------------
# Measuring.


def compile_seconds(fn: Callable, *args: Any) -> tuple[Any, float, float]:
  """`(compiled, trace-and-lower seconds, XLA compile seconds)` of a fresh `jax.jit(fn)`."""
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  lowered_at = time.perf_counter()
  compiled = lowered.compile()
  return compiled, lowered_at - start, time.perf_counter() - lowered_at


def paired_ms(pairs: dict[str, tuple[Callable[[], Any], Callable[[], Any]]]) -> dict[str, dict[str, float]]:
  """Per name: median ms of jheads and of the floor, and the median per-round ratio."""
  for run, floor in pairs.values():
    jax.block_until_ready(run())
    jax.block_until_ready(floor())
  samples = {name: ([], []) for name in pairs}
  for _ in range(ROUNDS):
    for name, fns in pairs.items():
      for fn, into in zip(fns, samples[name]):
        start = time.perf_counter()
        for _ in range(CALLS):
          out = fn()
        jax.block_until_ready(out)
        into.append((time.perf_counter() - start) / CALLS * 1e3)
  return {
      name: {
          "ms": float(np.median(ours)),
          "floor_ms": float(np.median(floor)),
          "ratio": float(np.median(np.asarray(ours) / np.asarray(floor))),
      }
      for name, (ours, floor) in samples.items()
  }


def main(argv=None) -> dict[str, Any]:
  argv = list(sys.argv[1:] if argv is None else argv)
  out_path = None
  if "--out" in argv:
    i = argv.index("--out")
    out_path = argv[i + 1]
    del argv[i : i + 2]
  num_heads = int(argv[0]) if argv else 1000
  mode = argv[1] if len(argv) > 1 else "binary"
  kinds = head_kinds(num_heads, mode)
  head = make_head(kinds)
  data = make_data(kinds)
  dev = jax.device_put(data)
  figures: dict[str, Any] = {
      "num_heads": num_heads,
      "mode": mode,
      "batch": BATCH,
      "load_before": os.getloadavg(),
  }

  # Eval step.
  eval_fn = lambda logits, labels: head.metric_fn(logits, labels)
  eval_step, lower_s, compile_s = compile_seconds(eval_fn, dev["logits"], dev["labels"])
  figures["eval_lower_s"], figures["eval_compile_s"] = lower_s, compile_s
  figures["eval_total_compile_s"] = lower_s + compile_s
  stats = eval_step(dev["logits"], dev["labels"])
  figures["eval_output_leaves"] = len(jax.tree.leaves(stats))
  floor_eval = jax.jit(floor_statistics(kinds))
  values = metrics.compute(stats)
  expected = floor_values(kinds, floor_eval(dev["logits"], dev["labels"]))
  worst = max(abs(float(values[k]) - float(v)) for k, v in expected.items())
  if worst > 1e-4:
    raise AssertionError(f"the floor and jheads disagree by {worst}")
  figures["floor_max_abs_difference"] = worst
  start = time.perf_counter()
  merged = metrics.merge(stats, stats)
  figures["merge_s"] = time.perf_counter() - start
  start = time.perf_counter()
  figures["metric_keys"] = len(metrics.compute(merged))
  figures["compute_s"] = time.perf_counter() - start

  # Train steps.
  optimizer = optax.adam(1e-3)
  opt_state = jax.device_put(optimizer.init(data["params"]))
  train_args = (dev["params"], opt_state, dev["x"], dev["labels"])
  train, lower_s, compile_s = compile_seconds(sgd_step(head.loss_fn, optimizer), *train_args)
  figures["train_lower_s"], figures["train_compile_s"] = lower_s, compile_s
  figures["train_total_compile_s"] = lower_s + compile_s
  floor_train = jax.jit(sgd_step(floor_losses(kinds), optimizer))
  difference = abs(float(train(*train_args)[2]) - float(floor_train(*train_args)[2]))
  if difference > 1e-3 * max(1.0, abs(float(floor_train(*train_args)[2]))):
    raise AssertionError(f"the floor's loss and jheads' disagree by {difference}")

  features = {"x": dev["x"]}
  builder_step = training.make_train_step(head, lambda p, f: linear(p, f["x"]), optimizer)
  builder_args = (dev["params"], opt_state, features, dev["labels"])
  builder, lower_s, compile_s = compile_seconds(builder_step, *builder_args)
  figures["make_train_step_lower_s"], figures["make_train_step_compile_s"] = lower_s, compile_s
  figures["make_train_step_total_compile_s"] = lower_s + compile_s
  figures["make_train_step_output_leaves"] = len(jax.tree.leaves(builder(*builder_args)))
  eval_builder_step = training.make_eval_step(head, lambda p, f: linear(p, f["x"]))
  eval_builder, lower_s, compile_s = compile_seconds(
      eval_builder_step, dev["params"], features, dev["labels"]
  )
  figures["make_eval_step_total_compile_s"] = lower_s + compile_s
  figures["make_eval_step_output_leaves"] = len(
      jax.tree.leaves(eval_builder(dev["params"], features, dev["labels"]))
  )

  floor_eval_from_params = jax.jit(
      lambda p, x, labels: floor_statistics(kinds)(linear(p, x), labels)
  )
  # The floor of floors: labels already stacked per kind, no dict to take apart.
  array_labels = jax.device_put(stacked_labels(kinds, data["labels"]))
  array_floor_eval = jax.jit(floor_statistics(kinds, stacked=True))
  array_floor_train = jax.jit(sgd_step(floor_losses(kinds, stacked=True), optimizer))
  array_train_args = (dev["params"], opt_state, dev["x"], array_labels)
  pairs = {}
  if mode == "cycling":
    # Issue 10: cycling kinds within 2x of the binary heads' stacked floor.
    binary = head_kinds(num_heads, "binary")
    binary_data = jax.device_put(make_data(binary))
    binary_floor_eval = jax.jit(floor_statistics(binary))
    binary_floor_train = jax.jit(sgd_step(floor_losses(binary), optimizer))
    binary_opt_state = jax.device_put(optimizer.init(binary_data["params"]))
    binary_train_args = (
        binary_data["params"], binary_opt_state, binary_data["x"], binary_data["labels"]
    )
    pairs["eval_step_vs_binary_floor"] = (
        lambda: eval_step(dev["logits"], dev["labels"]),
        lambda: binary_floor_eval(binary_data["logits"], binary_data["labels"]),
    )
    pairs["train_step_vs_binary_floor"] = (
        lambda: train(*train_args), lambda: binary_floor_train(*binary_train_args)
    )
  timed = paired_ms(pairs | {
      "eval_step": (
          lambda: eval_step(dev["logits"], dev["labels"]),
          lambda: floor_eval(dev["logits"], dev["labels"]),
      ),
      "eval_step_numpy": (
          lambda: eval_step(dev["logits"], data["labels"]),
          lambda: floor_eval(dev["logits"], data["labels"]),
      ),
      "train_step": (lambda: train(*train_args), lambda: floor_train(*train_args)),
      "make_train_step": (lambda: builder(*builder_args), lambda: floor_train(*train_args)),
      "make_eval_step": (
          lambda: eval_builder(dev["params"], features, dev["labels"]),
          lambda: floor_eval_from_params(dev["params"], dev["x"], dev["labels"]),
      ),
      "eval_step_vs_array_floor": (
          lambda: eval_step(dev["logits"], dev["labels"]),
          lambda: array_floor_eval(dev["logits"], array_labels),
      ),
      "train_step_vs_array_floor": (
          lambda: train(*train_args), lambda: array_floor_train(*array_train_args)
      ),
  })
  for name, row in timed.items():
    figures[f"{name}_ms"] = row["ms"]
    figures[f"{name}_floor_ms"] = row["floor_ms"]
    figures[f"{name}_ratio"] = row["ratio"]
  figures["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  figures["load_after"] = os.getloadavg()
  figures["cpu"] = platform.processor() or platform.machine()
  figures["cpus"] = os.cpu_count()
  figures["jax"] = jax.__version__
  for key, value in figures.items():
    print(f"{key:34s} {value:.3f}" if isinstance(value, float) else f"{key:34s} {value}")
  if out_path is not None:
    with open(out_path, "w") as f:
      json.dump(figures, f, indent=1)
  return figures


if __name__ == "__main__":
  main()
