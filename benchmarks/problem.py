"""The benchmark problem of issue 5, in one place for run.py and the CI guards.

A 32 -> 64 -> 64 ReLU MLP trunk, a linear layer to every head's logits, batch
256, and T heads cycling binary / 5-way softmax / 1-d regression, trained
with Adam. Three ways to write its training loss:

* `jheads_loss`: `jheads.multi_head` over T named heads;
* `hand_loss`: hand-written vectorized JAX, each kind of head's losses in
  one op over a static gather of its logits columns (the performance limit);
* `loop_loss`: the naive hand-written per-head loop, T small losses;

and `multi_head(..., vectorize=False)`, jheads without grouping. All take the
same batch, `(x, labels)` with labels a dict keyed by head name as
`multi_head` wants them, and return the same number. `keras_model` and
`save_for_estimator` give the peers the same model and data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jheads

TRUNK = (32, 64, 64)
BATCH = 256
N_CLASSES = 5
KINDS = ("binary", "multi_class", "regression")
LEARNING_RATE = 1e-3

Params = list[tuple[jax.Array, jax.Array]]
Batch = tuple[jax.Array, dict[str, jax.Array]]
LossFn = Callable[[Params, Batch], jax.Array]


def head_kinds(num_heads: int) -> list[str]:
  return [KINDS[i % len(KINDS)] for i in range(num_heads)]


def head_names(num_heads: int) -> list[str]:
  return [f"h{i:03d}" for i in range(num_heads)]


def head_dims(num_heads: int) -> list[int]:
  return [N_CLASSES if k == "multi_class" else 1 for k in head_kinds(num_heads)]


def make_heads(num_heads: int) -> list[jheads.Head]:
  factories = {
      "binary": lambda name: jheads.binary_classification_head(name=name),
      "multi_class": lambda name: jheads.multi_class_head(N_CLASSES, name=name),
      "regression": lambda name: jheads.regression_head(name=name),
  }
  return [
      factories[kind](name)
      for kind, name in zip(head_kinds(num_heads), head_names(num_heads))
  ]


def make_multi_head(num_heads: int, *, vectorize: bool = True) -> jheads.MultiHead:
  return jheads.multi_head(make_heads(num_heads), vectorize=vectorize)


def init_params(key: jax.Array, num_heads: int) -> Params:
  sizes = (*TRUNK, sum(head_dims(num_heads)))
  params = []
  for k, (fan_in, fan_out) in zip(
      jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])
  ):
    w = jax.random.normal(k, (fan_in, fan_out)) * fan_in**-0.5
    params.append((w, jnp.zeros(fan_out)))
  return params


def apply(params: Params, x: jax.Array) -> jax.Array:
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def make_batch(seed: int, num_heads: int, batch_size: int = BATCH) -> Batch:
  """Random features and one label column per head, as device arrays."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(batch_size, TRUNK[0])).astype(np.float32)
  labels = {}
  for kind, name in zip(head_kinds(num_heads), head_names(num_heads)):
    if kind == "binary":
      labels[name] = rng.integers(0, 2, batch_size).astype(np.float32)
    elif kind == "multi_class":
      labels[name] = rng.integers(0, N_CLASSES, batch_size).astype(np.int32)
    else:
      labels[name] = rng.normal(size=batch_size).astype(np.float32)
  return jax.device_put((x, labels))


def jheads_loss(head: jheads.MultiHead) -> LossFn:
  def loss(params, batch):
    x, labels = batch
    return head.loss_fn(apply(params, x), labels)

  return loss


def _columns(num_heads: int) -> dict[str, tuple[list[str], np.ndarray]]:
  """Per kind: the head names and the static logits columns, `[heads, dim]`."""
  offsets = np.cumsum([0] + head_dims(num_heads))
  out = {}
  for kind in KINDS:
    members = [i for i, k in enumerate(head_kinds(num_heads)) if k == kind]
    dim = N_CLASSES if kind == "multi_class" else 1
    columns = np.asarray([offsets[i] + np.arange(dim) for i in members], np.int32)
    out[kind] = ([head_names(num_heads)[i] for i in members], columns)
  return out


def hand_loss(num_heads: int) -> LossFn:
  """Hand-written vectorized JAX: like heads' losses in one op each."""
  columns = _columns(num_heads)

  def loss(params, batch):
    x, labels = batch
    logits = apply(params, x)
    total = 0.0
    for kind, (names, cols) in columns.items():
      if not names:
        continue
      y = jnp.stack([labels[n] for n in names], axis=-1)  # [B, heads]
      z = logits[:, cols]  # [B, heads, dim]
      if kind == "binary":
        per_example = optax.losses.sigmoid_binary_cross_entropy(z[..., 0], y)
      elif kind == "multi_class":
        per_example = optax.losses.softmax_cross_entropy_with_integer_labels(z, y)
      else:
        per_example = optax.losses.squared_error(z[..., 0], y)
      # sum_over_batch_size per head, head weights 1.
      total = total + jnp.sum(per_example) / x.shape[0]
    return total

  return loss


def loop_loss(num_heads: int) -> LossFn:
  """The naive hand-written loop: one small loss per head."""
  kinds, names, dims = head_kinds(num_heads), head_names(num_heads), head_dims(num_heads)
  offsets = np.cumsum([0] + dims)

  def loss(params, batch):
    x, labels = batch
    logits = apply(params, x)
    total = 0.0
    for i, (kind, name) in enumerate(zip(kinds, names)):
      z, y = logits[:, offsets[i] : offsets[i + 1]], labels[name]
      if kind == "binary":
        total = total + jnp.mean(optax.losses.sigmoid_binary_cross_entropy(z[:, 0], y))
      elif kind == "multi_class":
        total = total + jnp.mean(
            optax.losses.softmax_cross_entropy_with_integer_labels(z, y)
        )
      else:
        total = total + jnp.mean(optax.losses.squared_error(z[:, 0], y))
    return total

  return loss


def make_optimizer() -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE)


def train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation) -> Callable:
  """`(params, opt_state, batch) -> (params, opt_state, loss)`, not yet jitted."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


CONTENDERS = ("jheads", "hand", "loop", "jheads_unvectorized")
"""The training losses the overhead section compares."""


def make_loss(contender: str, num_heads: int) -> LossFn:
  """A fresh loss function (new heads, new closures) for one of `CONTENDERS`."""
  if contender == "jheads":
    return jheads_loss(make_multi_head(num_heads))
  if contender == "jheads_unvectorized":
    return jheads_loss(make_multi_head(num_heads, vectorize=False))
  if contender == "hand":
    return hand_loss(num_heads)
  if contender == "loop":
    return loop_loss(num_heads)
  raise ValueError(f"unknown contender {contender!r}; expected one of {CONTENDERS}")


def step_inputs(num_heads: int, seed: int = 0) -> tuple[Params, Any, Batch]:
  """Initial params, Adam state and a batch for `train_step`."""
  params = init_params(jax.random.key(seed), num_heads)
  return params, make_optimizer().init(params), make_batch(seed, num_heads)


# ----------------------------------------------------------------------------
# HLO size, shared by run.py and the CI guard.

_HLO_INSTRUCTION = re.compile(r"^\s*(ROOT\s+)?%[\w.\-]+\s*=\s")
_STABLEHLO_OP = re.compile(r"\bstablehlo\.[a-z_]+\b")


def hlo_op_counts(fn: Callable, *args: Any) -> dict[str, int]:
  """Op counts of `jax.jit(fn)` at `args`.

  Returns:
    `optimized_hlo`: instructions of the compiled module's HLO text
    (`jit(fn).lower(...).compile().as_text()`), in every computation, fusion
    bodies included; `stablehlo`: `stablehlo.*` ops of the lowered module,
    before XLA optimizes it.
  """
  lowered = jax.jit(fn).lower(*args)
  optimized = lowered.compile().as_text()
  return {
      "optimized_hlo": sum(
          1 for line in optimized.splitlines() if _HLO_INSTRUCTION.match(line)
      ),
      "stablehlo": len(_STABLEHLO_OP.findall(lowered.as_text())),
  }


# ----------------------------------------------------------------------------
# The same problem for the peers.


def keras_model(num_heads: int) -> Any:
  """The model as a compiled Keras 3 multi-output model: one Dense output per head.

  The backend must already be JAX (`KERAS_BACKEND=jax` before keras is
  imported). Keras sums the per-output losses, each a batch mean, as
  `multi_head` does with head weights 1.
  """
  import keras  # pylint: disable=g-import-not-at-top

  inputs = keras.Input((TRUNK[0],))
  hidden = inputs
  for units in TRUNK[1:]:
    hidden = keras.layers.Dense(units, activation="relu")(hidden)
  losses = {
      "binary": lambda: keras.losses.BinaryCrossentropy(from_logits=True),
      "multi_class": lambda: keras.losses.SparseCategoricalCrossentropy(from_logits=True),
      "regression": keras.losses.MeanSquaredError,
  }
  outputs = [
      keras.layers.Dense(dim, name=name)(hidden)
      for name, dim in zip(head_names(num_heads), head_dims(num_heads))
  ]
  model = keras.Model(inputs, outputs)
  model.compile(
      optimizer=keras.optimizers.Adam(LEARNING_RATE),
      loss=[losses[kind]() for kind in head_kinds(num_heads)],
  )
  return model


def keras_batch(batch: Batch) -> tuple[np.ndarray, list[np.ndarray]]:
  """`batch` as Keras takes it: features, and one `[B, 1]` label array per output."""
  x, labels = batch
  return np.asarray(x), [np.asarray(labels[n]).reshape(-1, 1) for n in labels]


def save_for_estimator(num_heads: int, batch: Batch, path: str) -> None:
  """Writes the problem and `batch` for `peer_estimator.py`, which has no jax."""
  x, labels = batch
  np.savez(
      path,
      kinds=np.asarray(head_kinds(num_heads)),
      names=np.asarray(head_names(num_heads)),
      trunk=np.asarray(TRUNK),
      n_classes=N_CLASSES,
      learning_rate=LEARNING_RATE,
      x=np.asarray(x),
      **{f"label_{name}": np.asarray(value) for name, value in labels.items()},
  )
