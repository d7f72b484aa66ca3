"""A realistic multi-task workload (issue 10, part 5): jheads against Keras 3 and the Estimator.

    python -m benchmarks.workload [--quick] [--tf-python PYTHON] [--no-keras] [--json PATH]

The problem: a feed-ranking model with five heads on one 32 -> 256 -> 128
ReLU trunk, batch 1024, Adam (learning rate 1e-3), trained on synthetic data
whose labels come from a fixed random teacher network, so that held-out
metrics measure learning:

| head | kind | labels |
| --- | --- | --- |
| click | binary | Bernoulli(sigmoid(teacher)) |
| conversion | binary, masked to clicked rows | Bernoulli(sigmoid(teacher)) if clicked, else 0 |
| dwell | regression | teacher + N(0, 0.5^2) |
| category | 20-class softmax | a draw from softmax(teacher) |
| tags | 10-tag multi-label | independent Bernoulli(sigmoid(teacher)) |

The loss is `1 * click + 1 * conversion + 0.5 * dwell + 1 * category + 1 *
tags`, each a batch mean, the conversion loss a mean over the batch's clicked
rows. All contenders start from the same initial weights (Glorot uniform,
zero biases, drawn once with numpy) and see the batches in the same order.

Contenders:

* `jheads`: `jheads.training.make_train_step` + `make_eval_step`, jitted, on
  batches already on the device (the README's path);
* `jheads_numpy`: the same step fed numpy batches sliced on the host each
  step, as `keras.Model.fit` is fed;
* `jheads_metrics`: built `with_metrics=True`, the batch's statistics merged
  into running train metrics inside the jitted step (what Keras' `fit` does
  with `weighted_metrics`);
* `jheads_metrics_flat`: the same, the running statistics carried as one
  flat array (`ravel_pytree`) instead of a pytree of 62 arrays;
* `hand`: a hand-written JAX step of the same model and losses (no head
  library), and `trunk`: the model's forward and backward passes and Adam
  with a linear loss on the logits, the floor every contender pays;
* `keras` / `keras_no_metrics`: Keras 3 on JAX, a multi-output `fit` with the
  same losses (`mean_with_sample_weight` for conversion, whose sample
  weights are the click labels), `loss_weights`, and `weighted_metrics`
  matching jheads' train statistics (or none);
* `tf_estimator`: TF 2.15's `Estimator` with `tf.estimator.MultiHead`
  (`benchmarks/workload_estimator.py`, in a subprocess under `--tf-python`);
  its conversion head weights clicked rows by `batch / clicked rows` so that
  its `SUM_OVER_BATCH_SIZE` loss is the same mean over clicked rows.

Reported: ms per step (median over interleaved rounds of one epoch each;
ratios are medians of paired per-round ratios), the first step (trace,
compile and run of a fresh step), the first batch's loss (the same number
for every contender: a check that they train the same objective), and
held-out metrics after the same number of epochs, scored by one numpy
scorer from each contender's held-out logits (exact rank AUCs), beside each
framework's own metrics. Then `breakdown`: where the jheads step's time goes.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

os.environ.setdefault("KERAS_BACKEND", "jax")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

import jheads  # noqa: E402
from jheads import metrics, training  # noqa: E402

TRUNK = (32, 256, 128)
BATCH = 1024
LEARNING_RATE = 1e-3
N_CATEGORIES = 20
N_TAGS = 10
HEADS = (
    ("click", "binary", 1),
    ("conversion", "binary", 1),
    ("dwell", "regression", 1),
    ("category", "multi_class", N_CATEGORIES),
    ("tags", "multi_label", N_TAGS),
)
HEAD_NAMES = tuple(name for name, _, _ in HEADS)
HEAD_WEIGHTS = (1.0, 1.0, 0.5, 1.0, 1.0)
OFFSETS = tuple(int(x) for x in np.cumsum([0] + [dim for _, _, dim in HEADS]))
LOGITS_DIM = OFFSETS[-1]
COLUMNS = {name: slice(OFFSETS[i], OFFSETS[i + 1]) for i, name in enumerate(HEAD_NAMES)}
MASK_KEY = "clicked"
DWELL_NOISE = 0.5

Params = list[tuple[jax.Array, jax.Array]]


@dataclasses.dataclass(frozen=True)
class Settings:
  """How long to measure; `--quick` trades precision for time."""

  train_batches: int  # batches per epoch
  eval_batches: int  # held-out batches
  epochs: int  # epochs before the held-out metrics
  rounds: int  # timed rounds of one epoch per contender, interleaved
  first_step_repeats: int  # fresh steps per contender, interleaved
  estimator_repeats: int  # Estimator subprocesses
  breakdown_rounds: int
  breakdown_calls: int  # calls per breakdown block


QUICK = Settings(64, 16, 5, 3, 1, 1, 3, 50)
FULL = Settings(64, 16, 5, 15, 3, 3, 15, 200)


# ----------------------------------------------------------------------------
# Data: a fixed random teacher.


@dataclasses.dataclass(frozen=True)
class Split:
  """One split, as numpy arrays: features `x`, the click mask and labels by head."""

  x: np.ndarray  # [n, 32] float32
  clicked: np.ndarray  # [n] bool
  labels: dict[str, np.ndarray]
  teacher: dict[str, np.ndarray]  # the teacher's probabilities / mean, per head

  @property
  def rows(self) -> int:
    return self.x.shape[0]

  def features(self, rows: slice = slice(None)) -> dict[str, np.ndarray]:
    return {"x": self.x[rows], MASK_KEY: self.clicked[rows]}

  def batch(self, i: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    rows = slice(i * BATCH, (i + 1) * BATCH)
    return self.features(rows), {k: v[rows] for k, v in self.labels.items()}


def _teacher(seed: int) -> Callable[[np.ndarray], np.ndarray]:
  rng = np.random.default_rng(seed)
  hidden = rng.normal(size=(TRUNK[0], 64)) / np.sqrt(TRUNK[0])
  out = rng.normal(size=(64, LOGITS_DIM)) / np.sqrt(64)
  # Per-column scale and bias: click rate about 0.4, conversion about 0.35
  # of clicks, informative but not separable.
  scale = np.full(LOGITS_DIM, 2.5)
  scale[COLUMNS["category"]] = 4.0
  bias = np.zeros(LOGITS_DIM)
  bias[COLUMNS["click"]] = -0.4
  bias[COLUMNS["conversion"]] = -0.6
  bias[COLUMNS["tags"]] = -1.0

  def logits(x):
    return (np.tanh(x @ hidden) @ out) * scale + bias

  return logits


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1 / (1 + np.exp(-z))


def make_split(rows: int, *, seed: int, teacher_seed: int = 0) -> Split:
  """`rows` examples labelled by the teacher of `teacher_seed`."""
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(rows, TRUNK[0]))
  z = _teacher(teacher_seed)(x)
  p_click = _sigmoid(z[:, 0])
  p_conversion = _sigmoid(z[:, 1])
  clicked = rng.random(rows) < p_click
  conversion = clicked & (rng.random(rows) < p_conversion)
  dwell_mean = z[:, 2]
  dwell = dwell_mean + DWELL_NOISE * rng.normal(size=rows)
  category_logits = z[:, COLUMNS["category"]]
  category = np.argmax(category_logits + rng.gumbel(size=category_logits.shape), axis=1)
  p_category = np.exp(category_logits - category_logits.max(1, keepdims=True))
  p_category /= p_category.sum(1, keepdims=True)
  p_tags = _sigmoid(z[:, COLUMNS["tags"]])
  tags = rng.random(p_tags.shape) < p_tags
  return Split(
      x=x.astype(np.float32),
      clicked=clicked,
      labels={
          "click": clicked.astype(np.float32),
          "conversion": conversion.astype(np.float32),
          "dwell": dwell.astype(np.float32),
          "category": category.astype(np.int32),
          "tags": tags.astype(np.float32),
      },
      teacher={
          "click": p_click,
          "conversion": p_conversion,
          "dwell": dwell_mean,
          "category": p_category,
          "tags": p_tags,
      },
  )


def make_data(settings: Settings, seed: int = 0) -> tuple[Split, Split]:
  """The train and held-out splits (different rows, the same teacher)."""
  return (
      make_split(settings.train_batches * BATCH, seed=seed + 1),
      make_split(settings.eval_batches * BATCH, seed=seed + 2),
  )


# ----------------------------------------------------------------------------
# The model, shared by every contender.


def init_weights(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
  """Glorot-uniform kernels and zero biases (Keras' Dense defaults), as numpy."""
  rng = np.random.default_rng(seed)
  sizes = (*TRUNK, LOGITS_DIM)
  weights = []
  for fan_in, fan_out in zip(sizes, sizes[1:]):
    limit = np.sqrt(6 / (fan_in + fan_out))
    weights.append((
        rng.uniform(-limit, limit, (fan_in, fan_out)).astype(np.float32),
        np.zeros(fan_out, np.float32),
    ))
  return weights


def init_params(seed: int = 0) -> Params:
  return [(jnp.asarray(w), jnp.asarray(b)) for w, b in init_weights(seed)]


def apply(params: Params, x: jax.Array) -> jax.Array:
  """The trunk and one linear layer to all heads' logits, `[batch, 33]`."""
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def apply_fn(params: Params, features: dict[str, Any]) -> jax.Array:
  return apply(params, features["x"])


def make_optimizer() -> optax.GradientTransformation:
  return optax.adam(LEARNING_RATE)


def make_head() -> jheads.MultiHead:
  """The five heads as jheads writes them."""
  return jheads.multi_head(
      [
          jheads.binary_classification_head(name="click"),
          jheads.binary_classification_head(name="conversion", mask_column=MASK_KEY),
          jheads.regression_head(name="dwell"),
          jheads.multi_class_head(N_CATEGORIES, name="category"),
          jheads.multi_label_head(N_TAGS, name="tags"),
      ],
      head_weights=HEAD_WEIGHTS,
  )


# ----------------------------------------------------------------------------
# The JAX contenders' steps, unjitted: `(params, opt_state, features, labels)
# -> (params, opt_state, loss)`.


def jheads_train_step(head: jheads.MultiHead | None = None) -> Callable:
  """The README's train step, returning `TrainOutput.loss` as the loss."""
  inner = training.make_train_step(head or make_head(), apply_fn, make_optimizer())

  def step(params, opt_state, features, labels):
    params, opt_state, out = inner(params, opt_state, features, labels)
    return params, opt_state, out.loss

  return step


def jheads_metrics_train_step(head: jheads.MultiHead | None = None) -> Callable:
  """`with_metrics=True`, the statistics summed into running ones in the step.

  `(params, (opt_state, running), features, labels)`: the running statistics
  ride along with the optimizer state, as Keras keeps its metric variables
  in the train state.
  """
  inner = training.make_train_step(
      head or make_head(), apply_fn, make_optimizer(), with_metrics=True
  )

  def step(params, state, features, labels):
    opt_state, running = state
    params, opt_state, out = inner(params, opt_state, features, labels)
    return params, (opt_state, metrics.merge(running, out.metrics)), out.loss

  return step


def jheads_flat_metrics_train_step(head: jheads.MultiHead | None = None) -> Callable:
  """As `jheads_metrics_train_step`, the running statistics carried as one flat array.

  `jax.flatten_util.ravel_pytree` packs the statistics pytree (62 leaves
  here) into one float32 vector inside the step; `flat_statistics` gives the
  zero vector and the function that unpacks it on the host for
  `jheads.metrics.compute`. Same sums, one buffer in and out of the step.
  """
  inner = training.make_train_step(
      head or make_head(), apply_fn, make_optimizer(), with_metrics=True
  )

  def step(params, state, features, labels):
    opt_state, running = state
    params, opt_state, out = inner(params, opt_state, features, labels)
    return params, (opt_state, running + ravel_pytree(out.metrics)[0]), out.loss

  return step


def flat_statistics(
    head: jheads.MultiHead, features: Any, labels: Any
) -> tuple[jax.Array, Callable]:
  """Zero flat running statistics and `flat -> statistics pytree`."""
  return ravel_pytree(zero_statistics(head, features, labels))


def zero_statistics(head: jheads.MultiHead, features: Any, labels: Any) -> Any:
  """Zero running statistics of the head's structure."""
  shapes = jax.eval_shape(
      lambda f, l: head.metric_fn(jnp.zeros((BATCH, LOGITS_DIM)), l, f), features, labels
  )
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def _sigmoid_cross_entropy(z: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.maximum(z, 0) - z * y + jnp.log1p(jnp.exp(-jnp.abs(z)))


def hand_losses(logits: jax.Array, features: Any, labels: Any) -> tuple[jax.Array, jax.Array]:
  """The five losses written by hand: `(weighted total, [5] per-head losses)`."""
  z = {name: logits[:, cols] for name, cols in COLUMNS.items()}
  clicked = features[MASK_KEY].astype(logits.dtype)
  conversion = _sigmoid_cross_entropy(z["conversion"][:, 0], labels["conversion"])
  per_head = jnp.stack([
      jnp.mean(_sigmoid_cross_entropy(z["click"][:, 0], labels["click"])),
      jnp.sum(clicked * conversion) / jnp.maximum(jnp.sum(clicked), 1.0),
      jnp.mean(jnp.square(z["dwell"][:, 0] - labels["dwell"])),
      jnp.mean(optax.losses.softmax_cross_entropy_with_integer_labels(
          z["category"], labels["category"])),
      jnp.mean(_sigmoid_cross_entropy(z["tags"], labels["tags"])),
  ])
  return jnp.dot(jnp.asarray(HEAD_WEIGHTS), per_head), per_head


def hand_train_step() -> Callable:
  """A hand-written JAX step of the same model and losses (no head library)."""
  optimizer = make_optimizer()

  def step(params, opt_state, features, labels):
    def objective(params):
      return hand_losses(apply_fn(params, features), features, labels)

    (loss, _), grads = jax.value_and_grad(objective, has_aux=True)(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


def trunk_train_step() -> Callable:
  """The floor: forward, backward and Adam with a loss linear in the logits."""
  optimizer = make_optimizer()
  direction = jnp.asarray(np.random.default_rng(7).normal(size=LOGITS_DIM), jnp.float32)

  def step(params, opt_state, features, labels):
    del labels
    loss, grads = jax.value_and_grad(
        lambda p: jnp.mean(apply_fn(p, features) @ direction)
    )(params)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  return step


JAX_CONTENDERS = (
    "jheads", "jheads_numpy", "jheads_metrics", "jheads_metrics_flat", "hand", "trunk"
)


class JaxContender:
  """A jitted step that keeps its own parameters and optimizer state."""

  def __init__(self, name: str, train: Split):
    self.name = name
    head = make_head()
    features, labels = train.batch(0)
    if name == "jheads_metrics":
      self.step = jax.jit(jheads_metrics_train_step(head))
      opt_state = (make_optimizer().init(init_params()), zero_statistics(head, features, labels))
    elif name == "jheads_metrics_flat":
      self.step = jax.jit(jheads_flat_metrics_train_step(head))
      opt_state = (make_optimizer().init(init_params()), flat_statistics(head, features, labels)[0])
    else:
      factory = {
          "jheads": jheads_train_step,
          "jheads_numpy": jheads_train_step,
          "hand": hand_train_step,
          "trunk": trunk_train_step,
      }[name]
      self.step = jax.jit(factory() if name in ("hand", "trunk") else factory(head))
      opt_state = make_optimizer().init(init_params())
    self.params, self.opt_state = init_params(), opt_state
    batches = [train.batch(i) for i in range(train.rows // BATCH)]
    self.batches = batches if name == "jheads_numpy" else jax.device_put(batches)
    self.loss = None

  def epoch(self) -> float:
    """One pass over the train split; milliseconds per step."""
    start = time.perf_counter()
    for features, labels in self.batches:
      self.params, self.opt_state, self.loss = self.step(
          self.params, self.opt_state, features, labels
      )
    jax.block_until_ready(self.loss)
    return 1e3 * (time.perf_counter() - start) / len(self.batches)


def jax_first_step(name: str, train: Split) -> tuple[float, float]:
  """Trace, compile and run one step of a fresh contender: (seconds, loss)."""
  head = make_head()
  features, labels = jax.device_put(train.batch(0))
  params = init_params()
  opt_state = make_optimizer().init(params)
  if name == "jheads_metrics":
    step = jax.jit(jheads_metrics_train_step(head))
    opt_state = (opt_state, zero_statistics(head, features, labels))
  elif name == "jheads_metrics_flat":
    step = jax.jit(jheads_flat_metrics_train_step(head))
    opt_state = (opt_state, flat_statistics(head, features, labels)[0])
  elif name in ("hand", "trunk"):
    step = jax.jit({"hand": hand_train_step, "trunk": trunk_train_step}[name]())
  else:
    step = jax.jit(jheads_train_step(head))
  jax.block_until_ready((params, opt_state))
  start = time.perf_counter()
  loss = jax.block_until_ready(step(params, opt_state, features, labels)[2])
  return time.perf_counter() - start, float(loss)


def train_jax(name: str, train: Split, epochs: int) -> Params:
  """Trains `jheads` or `hand` from the shared initial weights for `epochs` epochs."""
  contender = JaxContender(name, train)
  for _ in range(epochs):
    contender.epoch()
  return contender.params


def jheads_evaluate(params: Params, split: Split) -> dict[str, float]:
  """The README's eval loop: the jitted eval step, statistics merged, computed."""
  eval_step = jax.jit(training.make_eval_step(make_head(), apply_fn))
  stats = functools.reduce(
      metrics.merge,
      [eval_step(params, *split.batch(i)) for i in range(split.rows // BATCH)],
  )
  return {k: float(v) for k, v in metrics.compute(stats).items()}


def held_out_logits(params: Params, split: Split) -> np.ndarray:
  return np.asarray(jax.jit(apply)(params, split.x))


# ----------------------------------------------------------------------------
# One scorer for every contender's held-out logits.


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
  """ROC AUC by ranks (Mann-Whitney U), ties counted half."""
  scores, labels = np.ravel(scores), np.ravel(labels) != 0
  _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
  # Average 1-based rank of each distinct score.
  ends = np.cumsum(counts)
  average_rank = ends - (counts - 1) / 2.0
  ranks = average_rank[inverse]
  positives = labels.sum()
  negatives = labels.size - positives
  return float(
      (ranks[labels].sum() - positives * (positives + 1) / 2) / (positives * negatives)
  )


SCORES = ("click_auc", "conversion_auc", "dwell_mse", "category_accuracy", "tags_auc")


def score(logits: np.ndarray, split: Split) -> dict[str, float]:
  """Held-out metrics of `[rows, 33]` logits: exact AUCs, accuracy, MSE."""
  logits = np.asarray(logits, np.float64)
  z = {name: logits[:, cols] for name, cols in COLUMNS.items()}
  labels, clicked = split.labels, split.clicked
  return {
      "click_auc": exact_auc(z["click"], labels["click"]),
      "conversion_auc": exact_auc(z["conversion"][clicked], labels["conversion"][clicked]),
      "dwell_mse": float(np.mean((z["dwell"][:, 0] - labels["dwell"]) ** 2)),
      "category_accuracy": float(np.mean(np.argmax(z["category"], 1) == labels["category"])),
      "tags_auc": exact_auc(z["tags"], labels["tags"]),
  }


def teacher_score(split: Split) -> dict[str, float]:
  """The same metrics of the teacher itself: the best any model can do."""
  t, labels, clicked = split.teacher, split.labels, split.clicked
  return {
      "click_auc": exact_auc(t["click"], labels["click"]),
      "conversion_auc": exact_auc(t["conversion"][clicked], labels["conversion"][clicked]),
      "dwell_mse": float(np.mean((t["dwell"] - labels["dwell"]) ** 2)),
      "category_accuracy": float(np.mean(np.argmax(t["category"], 1) == labels["category"])),
      "tags_auc": exact_auc(t["tags"], labels["tags"]),
  }


# ----------------------------------------------------------------------------
# Keras 3.


def keras_model(with_metrics: bool = True) -> Any:
  """The model as a Keras 3 multi-output model, compiled with the same objective.

  One Dense output per head from the shared trunk, set to the shared initial
  weights (the output layer's columns split by head).
  """
  import keras  # pylint: disable=g-import-not-at-top

  if keras.backend.backend() != "jax":
    raise RuntimeError(f"Keras runs on {keras.backend.backend()}; set KERAS_BACKEND=jax.")
  weights = init_weights()
  inputs = keras.Input((TRUNK[0],), name="x")
  hidden = inputs
  for units in TRUNK[1:]:
    hidden = keras.layers.Dense(units, activation="relu")(hidden)
  outputs = {
      name: keras.layers.Dense(dim, name=name)(hidden) for name, _, dim in HEADS
  }
  model = keras.Model(inputs, outputs)
  for layer, (w, b) in zip(
      [l for l in model.layers if isinstance(l, keras.layers.Dense)][: len(TRUNK) - 1],
      weights[:-1],
  ):
    layer.set_weights([w, b])
  w, b = weights[-1]
  for name in HEAD_NAMES:
    model.get_layer(name).set_weights([w[:, COLUMNS[name]], b[COLUMNS[name]]])

  def binary_metrics():
    return [
        keras.metrics.AUC(from_logits=True, name="auc"),
        keras.metrics.AUC(curve="PR", from_logits=True, name="auc_pr"),
        keras.metrics.BinaryAccuracy(threshold=0.0, name="accuracy"),
        keras.metrics.Precision(thresholds=0.0, name="precision"),
        keras.metrics.Recall(thresholds=0.0, name="recall"),
    ]

  weighted_metrics = None
  if with_metrics:
    weighted_metrics = {
        "click": binary_metrics(),
        "conversion": binary_metrics(),
        "dwell": [keras.metrics.MeanSquaredError(name="mse")],
        "category": [keras.metrics.SparseCategoricalAccuracy(name="accuracy")],
        "tags": [
            keras.metrics.AUC(from_logits=True, name="auc"),
            keras.metrics.AUC(curve="PR", from_logits=True, name="auc_pr"),
        ],
    }
  model.compile(
      optimizer=keras.optimizers.Adam(LEARNING_RATE),
      loss={
          "click": keras.losses.BinaryCrossentropy(from_logits=True),
          # Sample weights are the click labels: the mean over clicked rows.
          "conversion": keras.losses.BinaryCrossentropy(
              from_logits=True, reduction="mean_with_sample_weight"
          ),
          "dwell": keras.losses.MeanSquaredError(),
          "category": keras.losses.SparseCategoricalCrossentropy(from_logits=True),
          "tags": keras.losses.BinaryCrossentropy(from_logits=True),
      },
      loss_weights=dict(zip(HEAD_NAMES, HEAD_WEIGHTS)),
      weighted_metrics=weighted_metrics,
  )
  return model


def keras_data(split: Split, rows: slice = slice(None)) -> tuple[Any, Any, Any]:
  """`(x, y, sample_weight)` as `fit` takes them."""
  labels = {k: v[rows] for k, v in split.labels.items()}
  y = {
      "click": labels["click"][:, None],
      "conversion": labels["conversion"][:, None],
      "dwell": labels["dwell"][:, None],
      "category": labels["category"][:, None],
      "tags": labels["tags"],
  }
  ones = np.ones(split.x[rows].shape[0], np.float32)
  sample_weight = {name: ones for name in HEAD_NAMES}
  sample_weight["conversion"] = split.clicked[rows].astype(np.float32)
  return split.x[rows], y, sample_weight


class KerasContender:
  def __init__(self, train: Split, with_metrics: bool):
    self.model = keras_model(with_metrics)
    self.x, self.y, self.sample_weight = keras_data(train)
    self.steps = train.rows // BATCH

  def epoch(self) -> float:
    start = time.perf_counter()
    self.model.fit(
        self.x, self.y, sample_weight=self.sample_weight, batch_size=BATCH,
        epochs=1, verbose=0, shuffle=False,
    )
    return 1e3 * (time.perf_counter() - start) / self.steps


def keras_first_step(train: Split, with_metrics: bool) -> tuple[float, float]:
  """A fresh compiled model's first `train_on_batch`: (seconds, loss)."""
  model = keras_model(with_metrics)
  x, y, sample_weight = keras_data(train, slice(0, BATCH))
  start = time.perf_counter()
  out = model.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
  return time.perf_counter() - start, float(out["loss"])


def keras_weights_as_params(model: Any) -> Params:
  """The trained Keras weights as this module's `Params` (output columns re-joined)."""
  import keras  # pylint: disable=g-import-not-at-top

  dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
  trunk = [tuple(jnp.asarray(v) for v in l.get_weights()) for l in dense[: len(TRUNK) - 1]]
  heads = [model.get_layer(name).get_weights() for name in HEAD_NAMES]
  w = np.concatenate([h[0] for h in heads], axis=1)
  b = np.concatenate([h[1] for h in heads])
  return trunk + [(jnp.asarray(w), jnp.asarray(b))]


def keras_evaluate(model: Any, split: Split) -> dict[str, float]:
  x, y, sample_weight = keras_data(split)
  out = model.evaluate(
      x, y, sample_weight=sample_weight, batch_size=BATCH, verbose=0, return_dict=True
  )
  return {k: float(v) for k, v in out.items()}


# ----------------------------------------------------------------------------
# The TF Estimator, in a subprocess.


def save_for_estimator(train: Split, held_out: Split, path: str) -> None:
  """The problem, the data and the initial weights for `workload_estimator.py`."""
  weights = init_weights()
  steps = train.rows // BATCH
  # The conversion head's weight column: in training, clicked rows weigh
  # batch / (clicked rows in the batch), so that the SUM_OVER_BATCH_SIZE loss
  # is the mean over clicked rows; in evaluation, the plain click mask.
  clicked = train.clicked.reshape(steps, BATCH).astype(np.float64)
  per_batch = BATCH / np.maximum(clicked.sum(1, keepdims=True), 1)
  arrays = {
      "trunk": np.asarray(TRUNK),
      "names": np.asarray(HEAD_NAMES),
      "kinds": np.asarray([kind for _, kind, _ in HEADS]),
      "dims": np.asarray([dim for _, _, dim in HEADS]),
      "head_weights": np.asarray(HEAD_WEIGHTS),
      "batch": BATCH,
      "learning_rate": LEARNING_RATE,
      "train_conversion_weight": (clicked * per_batch).reshape(-1).astype(np.float32),
      "eval_conversion_weight": held_out.clicked.astype(np.float32),
  }
  for prefix, split in (("train", train), ("eval", held_out)):
    arrays[f"{prefix}_x"] = split.x
    for name, value in split.labels.items():
      arrays[f"{prefix}_label_{name}"] = value
  for i, (w, b) in enumerate(weights):
    arrays[f"kernel_{i}"], arrays[f"bias_{i}"] = w, b
  np.savez(path, **arrays)


def estimator_run(
    tf_python: str, path: str, epochs: int, evaluate: bool
) -> dict[str, Any]:
  script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "workload_estimator.py")
  out_path = path + ".logits.npy"
  command = [tf_python, script, path, str(epochs), out_path] + (["--evaluate"] if evaluate else [])
  done = subprocess.run(command, capture_output=True, text=True, check=False)
  if done.returncode != 0:
    raise RuntimeError(f"workload_estimator.py failed:\n{done.stderr[-3000:]}")
  result = json.loads(done.stdout.strip().splitlines()[-1])
  result["held_out_logits"] = np.load(out_path)
  return result


def find_tf_python(requested: str | None) -> tuple[str | None, str]:
  """A Python with TF 2.15 and tensorflow_estimator, or None and why not."""
  candidates = [requested, os.environ.get("JHEADS_TF_PYTHON")]
  candidate = next((c for c in candidates if c), None)
  if candidate is None:
    return None, "no TF Python: pass --tf-python or set JHEADS_TF_PYTHON"
  if not os.path.exists(candidate):
    return None, f"{candidate} does not exist"
  check = subprocess.run(
      [candidate, "-c", "import tensorflow, tensorflow_estimator"],
      capture_output=True, text=True, check=False,
  )
  if check.returncode != 0:
    return None, f"{candidate} cannot import tensorflow and tensorflow_estimator"
  return candidate, ""


# ----------------------------------------------------------------------------
# Measuring.


def interleave(
    blocks: dict[str, Callable[[], float]], rounds: int, cpu: dict[str, list[float]] | None = None
) -> dict[str, list[float]]:
  """Each block once per round, in turn; odd rounds in reverse order.

  A block returns wall time per unit (step, call). With `cpu`, the same
  figure in process CPU time (all threads) is appended to `cpu[name]`: the
  work done, which a loaded machine inflates far less than wall time.
  """
  results = {name: [] for name in blocks}
  if cpu is not None:
    cpu.update({name: [] for name in blocks})
  names = list(blocks)
  for round_ in range(rounds):
    for name in names if round_ % 2 == 0 else names[::-1]:
      wall, process = time.perf_counter(), time.process_time()
      value = blocks[name]()
      wall, process = time.perf_counter() - wall, time.process_time() - process
      results[name].append(value)
      if cpu is not None:
        cpu[name].append(value * process / wall)
  return results


def median(values: list[float]) -> float:
  return float(statistics.median(values))


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
  return median([a / b for a, b in zip(numerator, denominator)])


def load_average() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
  widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
  print(f"\n{title}")
  for row in [header, ["-" * w for w in widths]] + rows:
    print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)))
  sys.stdout.flush()


# ----------------------------------------------------------------------------
# Where the jheads step's time goes.


def _timed_calls(fn: Callable, args: tuple, calls: int) -> Callable[[], float]:
  """A block that calls `fn(*args)` `calls` times; microseconds per call."""
  jax.block_until_ready(fn(*args))

  def block():
    start = time.perf_counter()
    for _ in range(calls):
      out = fn(*args)
    jax.block_until_ready(out)
    return 1e6 * (time.perf_counter() - start) / calls

  return block


def breakdown_blocks(train: Split, calls: int) -> dict[str, Callable[[], float]]:
  """Timed pieces of the step: the head part alone, each head's statistics, the steps.

  Head-part blocks take fixed `[1024, 33]` logits and differentiate (or not)
  with respect to them only, so the trunk is not in them.
  """
  head = make_head()
  features, labels = jax.device_put(train.batch(0))
  params = init_params()
  logits = jax.jit(apply)(params, features["x"])
  adam = make_optimizer()

  def jheads_loss(z):
    return head.losses_fn(z, labels, features)[0]

  def hand_loss(z):
    return hand_losses(z, features, labels)[0]

  blocks = {
      "heads_loss_grad/jheads": _timed_calls(jax.jit(jax.grad(jheads_loss)), (logits,), calls),
      "heads_loss_grad/hand": _timed_calls(jax.jit(jax.grad(hand_loss)), (logits,), calls),
      "heads_loss_only/jheads": _timed_calls(jax.jit(jheads_loss), (logits,), calls),
      "heads_loss_only/hand": _timed_calls(jax.jit(hand_loss), (logits,), calls),
      "metric_fn/all": _timed_calls(
          jax.jit(lambda z: head.metric_fn(z, labels, features)), (logits,), calls
      ),
  }
  for i, name in enumerate(HEAD_NAMES):
    single = head.heads[i]
    cols = COLUMNS[name]
    blocks[f"metric_fn/{name}"] = _timed_calls(
        jax.jit(lambda z, single=single, cols=cols, name=name: single.metric_fn(
            z[:, cols], labels[name], features)),
        (logits,), calls,
    )
  blocks["dispatch/step_signature"] = _timed_calls(
      jax.jit(lambda p, o, f, l: (p, o, jnp.zeros(()))),
      (params, adam.init(params), features, labels),
      calls,
  )
  eval_step = jax.jit(training.make_eval_step(head, apply_fn))
  blocks["eval_step/jheads"] = _timed_calls(eval_step, (params, features, labels), calls)
  blocks["forward/trunk"] = _timed_calls(jax.jit(apply), (params, features["x"]), calls)
  return blocks


def first_step_phases(train: Split) -> dict[str, dict[str, float]]:
  """Seconds to trace, lower, compile and run once a fresh step of each JAX contender."""
  out = {}
  for name in ("trunk", "hand", "jheads", "jheads_metrics"):
    head = make_head()
    features, labels = jax.device_put(train.batch(0))
    params = init_params()
    opt_state = make_optimizer().init(params)
    if name == "jheads_metrics":
      fn = jheads_metrics_train_step(head)
      opt_state = (opt_state, zero_statistics(head, features, labels))
    else:
      fn = {"trunk": trunk_train_step, "hand": hand_train_step,
            "jheads": lambda: jheads_train_step(head)}[name]()
    args = (params, opt_state, features, labels)
    jax.block_until_ready(args)
    t0 = time.perf_counter()
    traced = jax.jit(fn).trace(*args)
    t1 = time.perf_counter()
    lowered = traced.lower()
    t2 = time.perf_counter()
    compiled = lowered.compile()
    t3 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    t4 = time.perf_counter()
    out[name] = {"trace_s": t1 - t0, "lower_s": t2 - t1, "compile_s": t3 - t2, "run_s": t4 - t3}
  return out


_INTERESTING = (
    "fusion", "scatter", "gather", "dynamic-slice", "dynamic-update-slice", "select",
    "compare", "sort", "while", "conditional", "custom-call", "reduce", "dot",
    "concatenate", "copy", "transpose", "broadcast", "slice", "exponential", "log",
    "log-plus-one", "parameter", "tuple",
)


def opcode_counts(optimized: str, stablehlo: str) -> dict[str, int]:
  """Instructions of a compiled module by opcode (fusion bodies included), and its StableHLO ops."""
  pattern = re.compile(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=\s*[^=]*?\s([a-z][a-z0-9\-]*)\(")
  counts: dict[str, int] = {"total": 0}
  for line in optimized.splitlines():
    match = pattern.match(line)
    if match:
      counts["total"] += 1
      op = match.group(1)
      if op in _INTERESTING:
        counts[op] = counts.get(op, 0) + 1
  fusions = re.findall(r"^\s*(?:ROOT\s+)?%[\w.\-]+\s*=.*?\sfusion\(", optimized, re.M)
  counts["top_level_fusions"] = len(fusions)
  # What XLA is handed, before it optimizes: compile time grows with it.
  counts["stablehlo_ops"] = len(re.findall(r"\bstablehlo\.[a-z_]+\b", stablehlo))
  return counts


# Thunk profiles: which ops of the compiled step take the time, and whose code they are.

_SECTION = re.compile(r"^(FileNames|FunctionNames|FileLocations|StackFrames)$")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%(\S+) \(.*\{$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9\-]*)\(")
_CALLS = re.compile(r"calls=%([\w.\-]+)")
_FRAME = re.compile(r"stack_frame_id=(\d+)")


_NOTABLE_IN_FUSIONS = frozenset({
    "dot", "scatter", "gather", "reduce", "reduce-window", "exponential", "log", "select",
    "compare", "sort",
})


def hlo_sources(text: str) -> tuple[dict[str, list[str]], dict[str, str]]:
  """Where each top-level instruction of a compiled module comes from.

  Returns `(sources, opcodes)`: for every instruction of the entry
  computation, the Python locations (`file:line function`) of it and of
  every instruction fused into it, one entry per instruction; and its opcode
  (or `fusion:<root opcodes>`).
  """
  tables: dict[str, dict[int, str]] = {}
  section = None
  computations: dict[str, list[tuple[str, str, str | None, int | None]]] = {}
  current, entry = None, None
  for line in text.splitlines():
    if _SECTION.match(line):
      section = line
      tables[section] = {}
      continue
    match = _COMPUTATION.match(line)
    if match:
      section, current = None, match.group(1)
      computations[current] = []
      if line.startswith("ENTRY"):
        entry = current
      continue
    if section is not None:
      head, _, rest = line.partition(" ")
      if head.isdigit():
        tables[section][int(head)] = rest
      continue
    if current is not None:
      match = _INSTRUCTION.match(line)
      if match:
        calls = _CALLS.search(line)
        frame = _FRAME.search(line)
        computations[current].append((
            match.group(1), match.group(2),
            calls.group(1) if calls else None,
            int(frame.group(1)) if frame else None,
        ))
  field = lambda entry, key: int(re.search(rf"{key}=(\d+)", entry).group(1))

  def location(frame_id: int) -> str:
    loc = tables["FileLocations"][field(tables["StackFrames"][frame_id], "file_location_id")]
    path = tables["FileNames"][field(loc, "file_name_id")].strip('"')
    function = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
    for marker in ("/jheads/", "/benchmarks/", "site-packages/"):
      if marker in path:
        prefix = "" if marker == "site-packages/" else marker.strip("/") + "/"
        path = prefix + path.split(marker, 1)[1]
        break
    return f"{path}:{field(loc, 'line')} {function.split('.<locals>.')[-1]}"

  def frames_of(computation: str) -> list[int]:
    out = []
    for _, _, calls, frame in computations.get(computation, []):
      if frame is not None:
        out.append(frame)
      if calls is not None:
        out.extend(frames_of(calls))
    return out

  sources, opcodes = {}, {}
  for name, opcode, calls, frame in computations[entry]:
    frames = ([frame] if frame is not None else []) + (frames_of(calls) if calls else [])
    sources[name] = [location(f) for f in frames]
    if calls:
      inner = {op for _, op, _, _ in computations.get(calls, [])} - {"parameter", "constant"}
      notable = sorted(inner & _NOTABLE_IN_FUSIONS) or ["elementwise"]
      opcode = "fusion:" + ",".join(notable)
    opcodes[name] = opcode
  return sources, opcodes


def category(location: str) -> str:
  """The part of the step a Python location belongs to."""
  path, _, function = location.partition(" ")
  if path.startswith("benchmarks/workload.py"):
    if function in ("apply", "apply_fn", "<lambda>", "objective"):
      # The layers, and the trunk floor's linear loss.
      return "model (trunk, output layer)"
    if function == "step":
      return "running-metrics merge"
    return "head losses"  # hand_losses and what it calls
  if path.startswith("optax/losses"):
    return "head losses"
  if path.startswith("optax"):
    return "adam"
  if path.startswith("jheads/metrics.py") or function in (
      "statistics", "binary_decisions", "at_thresholds", "confusion_counts"):
    return "metric statistics"
  if path.startswith("jheads/heads/") or function in (
      "sigmoid_cross_entropy", "_sigmoid_cross_entropy_jvp", "loss_terms", "reduce_loss",
      "safe_divide", "losses_fn", "grouped_losses", "kernel_loss_terms", "unreduced_loss"):
    return "head losses"
  if path.startswith("jheads/base.py") or path.startswith("jheads/checks.py"):
    return "head inputs (prepare: masks, weights, casts)"
  if path.startswith("jheads/"):
    return "multi_head / training plumbing"
  return "other"


def profile_step(fn: Callable, args: tuple, steps: int, directory: str) -> dict[str, Any]:
  """Per-op time of the jitted `fn(*args)` from a `jax.profiler` trace of `steps` calls.

  XLA:CPU records one event per thunk (a fusion, a dot, a scatter, ...),
  named as the compiled module's instruction, which `hlo_sources` ties to
  the Python that produced it. A fusion's time is split over categories in
  proportion to its instructions from each.
  """
  import gzip  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top

  lowered = jax.jit(fn).lower(*args)
  compiled = lowered.compile()
  text = compiled.as_text()
  sources, opcodes = hlo_sources(text)
  jax.block_until_ready(compiled(*args))
  with jax.profiler.trace(directory, create_perfetto_trace=True):
    start = time.perf_counter()
    for _ in range(steps):
      out = compiled(*args)
    jax.block_until_ready(out)
    wall = time.perf_counter() - start
  path = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  durations: dict[str, list[float]] = {}
  for e in events:
    if e["name"] in sources:
      durations.setdefault(e["name"], []).append(e["dur"])
  # An op runs once a step. Its median over the steps is what it took; its
  # fastest run estimates what it costs on an idle machine (preemption only
  # ever adds).
  per_op = {
      name: {"median_us": float(np.median(d)), "min_us": float(np.min(d)),
             "calls_per_step": len(d) / steps}
      for name, d in durations.items()
  }
  categories = {"median_us": {}, "min_us": {}}
  ops = []
  for name, times in sorted(per_op.items(), key=lambda kv: -kv[1]["median_us"]):
    locations = sources[name] or ["(no source)"]
    counts: dict[str, int] = {}
    for loc in locations:
      counts[category(loc)] = counts.get(category(loc), 0) + 1
    if "dot" in opcodes[name]:
      counts = {"model (trunk, output layer)": 1}
    for stat in categories:
      for cat, n in counts.items():
        categories[stat][cat] = (
            categories[stat].get(cat, 0.0)
            + times[stat] * times["calls_per_step"] * n / sum(counts.values())
        )
    top = sorted(set(locations), key=lambda l: -locations.count(l))[:3]
    ops.append({"op": name, **times, "opcode": opcodes[name], "sources": top})
  return {
      "hlo_opcodes": opcode_counts(text, lowered.as_text()),
      "wall_us_per_step_under_trace": 1e6 * wall / steps,
      "op_us_per_step": {stat: sum(c.values()) for stat, c in categories.items()},
      "categories_us": {
          stat: dict(sorted(c.items(), key=lambda kv: -kv[1])) for stat, c in categories.items()
      },
      "ops": ops,
  }


def profiles(settings: Settings, train: Split) -> dict[str, Any]:
  head = make_head()
  features, labels = jax.device_put(train.batch(0))
  params = init_params()
  adam = make_optimizer()
  state = (adam.init(params), zero_statistics(head, features, labels))
  programs = {
      "step/trunk": (trunk_train_step(), (params, adam.init(params), features, labels)),
      "step/hand": (hand_train_step(), (params, adam.init(params), features, labels)),
      "step/jheads": (jheads_train_step(head), (params, adam.init(params), features, labels)),
      "step/jheads_metrics": (jheads_metrics_train_step(head), (params, state, features, labels)),
      "eval_step/jheads": (training.make_eval_step(head, apply_fn), (params, features, labels)),
  }
  out = {}
  with tempfile.TemporaryDirectory() as directory:
    for name, (fn, args) in programs.items():
      out[name] = profile_step(fn, args, settings.breakdown_calls, os.path.join(directory, name))
  return out


def host_profile(epoch: Callable[[], float], steps: int, directory: str) -> dict[str, Any]:
  """What one epoch of a contender asks of the host, per step, from a profiler trace.

  Counts, which load does not change: jitted calls by function
  (`PjitFunction(...)` events: the train step, and any eager op a framework
  runs between steps) and host-to-device transfers (`DevicePut`).
  """
  import gzip  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top

  with jax.profiler.trace(directory, create_perfetto_trace=True):
    ms = epoch()
  path = sorted(glob.glob(os.path.join(directory, "**", "*.trace.json.gz"), recursive=True),
                key=os.path.getmtime)[-1]
  with gzip.open(path) as f:
    events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X"]
  calls: dict[str, float] = {}
  puts = 0
  # Each jitted call is recorded twice, one event nested in the other: count
  # only events not inside an earlier one of the same name on the same thread.
  last_end: dict[tuple[Any, str], float] = {}
  for e in sorted(events, key=lambda e: (e["tid"], e["ts"])):
    key = (e["tid"], e["name"])
    if e["ts"] < last_end.get(key, -1.0):
      continue
    last_end[key] = e["ts"] + e["dur"]
    if e["name"].startswith("PjitFunction("):
      name = e["name"][len("PjitFunction("):-1]
      calls[name] = calls.get(name, 0) + 1 / steps
    elif e["name"] == "DevicePut":
      puts += 1
  return {
      "ms_per_step_under_trace": ms,
      "jitted_calls_per_step": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
      "device_puts_per_step": puts / steps,
  }


def breakdown(settings: Settings, train: Split, report: dict[str, Any], keras: bool) -> None:
  blocks = breakdown_blocks(train, settings.breakdown_calls)
  cpu: dict[str, list[float]] = {}
  times = interleave(blocks, settings.breakdown_rounds, cpu)
  section = {
      name: {"wall_us": median(values), "wall_us_min": min(values), "cpu_us": median(cpu[name])}
      for name, values in times.items()
  }
  report["breakdown_us"] = section
  print_table(
      f"breakdown ({settings.breakdown_rounds} interleaved rounds of"
      f" {settings.breakdown_calls} calls; microseconds per call; load {load_average()})",
      ["piece", "wall median", "wall min", "CPU median"],
      [[name, f"{t['wall_us']:.0f}", f"{t['wall_us_min']:.0f}", f"{t['cpu_us']:.0f}"]
       for name, t in section.items()],
  )
  report["profiles"] = profiles(settings, train)
  for name, profile in report["profiles"].items():
    total = profile["op_us_per_step"]
    print_table(
        f"profile of {name}: op time by part, us a step (median and fastest of"
        f" {settings.breakdown_calls} steps; {profile['wall_us_per_step_under_trace']:.0f} us"
        " wall a step under the profiler)",
        ["part", "median", "share", "fastest", "share"],
        [[c, f"{us:.0f}", f"{us / total['median_us']:.1%}",
          f"{profile['categories_us']['min_us'].get(c, 0):.0f}",
          f"{profile['categories_us']['min_us'].get(c, 0) / total['min_us']:.1%}"]
         for c, us in profile["categories_us"]["median_us"].items()]
        + [["total", f"{total['median_us']:.0f}", "", f"{total['min_us']:.0f}", ""]],
    )
  for name in ("step/hand", "step/jheads", "step/jheads_metrics", "eval_step/jheads"):
    ops = [o for o in report["profiles"][name]["ops"]
           if category(o["sources"][0]) != "model (trunk, output layer)"
           and "dot" not in o["opcode"]]
    print_table(
        f"{name}: the ops outside the model's layers, by median time",
        ["op", "median us", "fastest us", "opcode", "from"],
        [[o["op"], f"{o['median_us']:.1f}", f"{o['min_us']:.1f}", o["opcode"],
          "; ".join(o["sources"])] for o in ops[:16]],
    )
  phases = report["first_step_phases"] = first_step_phases(train)
  print_table(
      "first step of a fresh jitted step, by phase (seconds)",
      ["contender", "trace", "lower", "compile", "run"],
      [[n, *(f"{p[k]:.3f}" for k in ("trace_s", "lower_s", "compile_s", "run_s"))]
       for n, p in phases.items()],
  )
  census = report["hlo_opcodes"] = {
      name: p.pop("hlo_opcodes") for name, p in report["profiles"].items()
  }
  ops = sorted({op for counts in census.values() for op in counts})
  print_table(
      "optimized HLO by opcode",
      ["opcode"] + list(census),
      [[op] + [str(census[c].get(op, 0)) for c in census] for op in ops],
  )
  epochs = {name: JaxContender(name, train) for name in ("jheads", "jheads_numpy")}
  if keras:
    epochs["keras"] = KerasContender(train, with_metrics=True)
    epochs["keras_no_metrics"] = KerasContender(train, with_metrics=False)
  host = {}
  with tempfile.TemporaryDirectory() as directory:
    for name, contender in epochs.items():
      contender.epoch()
      host[name] = host_profile(contender.epoch, train.rows // BATCH, os.path.join(directory, name))
  report["host_per_step"] = host
  print_table(
      "what an epoch asks of the host, per step (profiler counts)",
      ["contender", "jitted calls", "device puts", "calls by function"],
      [[n, f"{sum(h['jitted_calls_per_step'].values()):.1f}", f"{h['device_puts_per_step']:.1f}",
        ", ".join(f"{k} {v:.2f}" for k, v in list(h["jitted_calls_per_step"].items())[:6])]
       for n, h in host.items()],
  )


# ----------------------------------------------------------------------------
# The run.


def run(
    quick: bool,
    *,
    tf_python: str | None = None,
    keras: bool = True,
    sections: tuple[str, ...] = ("speed", "parity", "breakdown"),
) -> dict[str, Any]:
  """Runs the workload benchmark; returns its figures (JSON-serializable).

  Args:
    quick: fewer rounds (QUICK settings); the same data and epochs.
    tf_python: a Python with TF 2.15 and tensorflow_estimator (default
      `$JHEADS_TF_PYTHON`); without one the Estimator is skipped, saying why.
    keras: time Keras 3 (skipped, saying why, if it is not installed).
    sections: "speed" (ms per step, first step), "parity" (held-out
      metrics), "breakdown" (where jheads' time goes).
  """
  settings = QUICK if quick else FULL
  started = time.perf_counter()
  report: dict[str, Any] = {
      "settings": dataclasses.asdict(settings),
      "problem": {
          "trunk": TRUNK, "batch": BATCH, "heads": [list(h) for h in HEADS],
          "head_weights": HEAD_WEIGHTS, "learning_rate": LEARNING_RATE,
      },
      "load_average_start": load_average(),
  }
  train, held_out = make_data(settings)
  report["problem"]["train_rows"] = train.rows
  report["problem"]["held_out_rows"] = held_out.rows
  report["problem"]["click_rate"] = float(train.clicked.mean())
  report["problem"]["conversion_rate_of_clicks"] = float(
      train.labels["conversion"][train.clicked].mean()
  )
  if keras:
    try:
      import keras as keras_module  # pylint: disable=g-import-not-at-top

      report["keras"] = keras_module.__version__
    except ImportError:
      keras = False
      report["keras_skipped"] = "keras is not installed (pip install -e '.[bench]')"
  resolved_tf, why_not = find_tf_python(tf_python)
  if resolved_tf is None:
    report["tf_estimator_skipped"] = why_not
    print(f"TF Estimator skipped: {why_not}")
  tmp = tempfile.TemporaryDirectory()
  problem_path = os.path.join(tmp.name, "workload.npz")
  if resolved_tf is not None:
    save_for_estimator(train, held_out, problem_path)
  estimator_runs: list[dict[str, Any]] = []

  seconds = report["section_seconds"] = {}
  for section in sections:
    start = time.perf_counter()
    if section == "speed":
      speed(settings, train, report, keras, resolved_tf, problem_path, estimator_runs)
    elif section == "parity":
      parity(settings, train, held_out, report, keras, resolved_tf, problem_path, estimator_runs)
    elif section == "breakdown":
      breakdown(settings, train, report, keras)
    seconds[section] = time.perf_counter() - start
  tmp.cleanup()
  report["load_average_end"] = load_average()
  report["seconds"] = time.perf_counter() - started
  return report


def speed(settings, train, report, keras, tf_python, problem_path, estimator_runs) -> None:
  names = list(JAX_CONTENDERS) + (["keras", "keras_no_metrics"] if keras else [])

  def first_step(name):
    if name == "keras":
      return keras_first_step(train, True)
    if name == "keras_no_metrics":
      return keras_first_step(train, False)
    return jax_first_step(name, train)

  first: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
  for repeat in range(settings.first_step_repeats):
    for name in names if repeat % 2 == 0 else names[::-1]:
      first[name].append(first_step(name))
  contenders: dict[str, Any] = {n: JaxContender(n, train) for n in JAX_CONTENDERS}
  if keras:
    contenders["keras"] = KerasContender(train, with_metrics=True)
    contenders["keras_no_metrics"] = KerasContender(train, with_metrics=False)
  for contender in contenders.values():
    contender.epoch()  # compile outside the timed rounds
  cpu: dict[str, list[float]] = {}
  times = interleave({n: c.epoch for n, c in contenders.items()}, settings.rounds, cpu)
  section: dict[str, Any] = {}
  for name in names:
    section[name] = {
        "ms_per_step": median(times[name]),
        "ms_per_step_min": min(times[name]),
        "cpu_ms_per_step": median(cpu[name]),
        "cpu_vs_jheads": paired_ratio(cpu[name], cpu["jheads"]),
        "first_step_s": median([s for s, _ in first[name]]),
        "first_loss": first[name][0][1],
        "vs_jheads": paired_ratio(times[name], times["jheads"]),
    }
  ratios = {
      "jheads_over_hand": paired_ratio(times["jheads"], times["hand"]),
      "jheads_over_trunk": paired_ratio(times["jheads"], times["trunk"]),
      "hand_over_trunk": paired_ratio(times["hand"], times["trunk"]),
      "jheads_metrics_over_jheads": paired_ratio(times["jheads_metrics"], times["jheads"]),
      "jheads_numpy_over_jheads": paired_ratio(times["jheads_numpy"], times["jheads"]),
      "cpu_jheads_over_hand": paired_ratio(cpu["jheads"], cpu["hand"]),
      "cpu_jheads_over_trunk": paired_ratio(cpu["jheads"], cpu["trunk"]),
      "cpu_jheads_metrics_over_jheads": paired_ratio(cpu["jheads_metrics"], cpu["jheads"]),
      "cpu_jheads_metrics_flat_over_jheads": paired_ratio(
          cpu["jheads_metrics_flat"], cpu["jheads"]
      ),
  }
  if keras:
    ratios["keras_over_jheads_metrics"] = paired_ratio(times["keras"], times["jheads_metrics"])
    ratios["keras_no_metrics_over_jheads"] = paired_ratio(
        times["keras_no_metrics"], times["jheads"]
    )
    ratios["keras_no_metrics_over_jheads_numpy"] = paired_ratio(
        times["keras_no_metrics"], times["jheads_numpy"]
    )
    ratios["cpu_keras_over_jheads_metrics"] = paired_ratio(cpu["keras"], cpu["jheads_metrics"])
    ratios["keras_over_jheads_metrics_flat"] = paired_ratio(
        times["keras"], times["jheads_metrics_flat"]
    )
    ratios["cpu_keras_over_jheads_metrics_flat"] = paired_ratio(
        cpu["keras"], cpu["jheads_metrics_flat"])
    ratios["cpu_keras_no_metrics_over_jheads"] = paired_ratio(
        cpu["keras_no_metrics"], cpu["jheads"]
    )
  if tf_python is not None:
    # A subprocess cannot interleave step by step: alternate jheads epochs
    # with whole Estimator runs, each timed per step by a hook.
    near_wall, near_cpu = [], []
    for repeat in range(settings.estimator_repeats):
      epoch_cpu: dict[str, list[float]] = {}
      walls = interleave({"jheads": contenders["jheads"].epoch}, 3, epoch_cpu)["jheads"]
      near_wall.append(median(walls))
      near_cpu.append(median(epoch_cpu["jheads"]))
      estimator_runs.append(
          estimator_run(tf_python, problem_path, settings.epochs, evaluate=repeat == 0)
      )
    tf_ms = [r["ms_per_step"] for r in estimator_runs]
    tf_cpu = [r["cpu_ms_per_step"] for r in estimator_runs]
    section["tf_estimator"] = {
        "ms_per_step": median(tf_ms),
        "ms_per_step_min": min(tf_ms),
        "cpu_ms_per_step": median(tf_cpu),
        "cpu_vs_jheads": paired_ratio(tf_cpu, near_cpu),
        "first_step_s": median([r["first_step_s"] for r in estimator_runs]),
        "first_loss": estimator_runs[0]["first_loss"],
        "vs_jheads": paired_ratio(tf_ms, near_wall),
        "jheads_ms_per_step_beside": median(near_wall),
        "jheads_cpu_ms_per_step_beside": median(near_cpu),
        "tensorflow": estimator_runs[0]["tensorflow"],
    }
    ratios["tf_estimator_over_jheads"] = section["tf_estimator"]["vs_jheads"]
    ratios["cpu_tf_estimator_over_jheads"] = section["tf_estimator"]["cpu_vs_jheads"]
    names = names + ["tf_estimator"]
  report["speed"] = section
  report["speed_ratios"] = ratios
  print_table(
      f"workload train step, batch {BATCH}, {train.rows // BATCH} steps an epoch"
      f" ({settings.rounds} interleaved rounds of one epoch each; load {load_average()})",
      ["contender", "wall ms/step", "min", "vs jheads", "CPU ms/step", "vs jheads",
       "first step s", "first loss"],
      [
          [
              n,
              f"{section[n]['ms_per_step']:.3f}",
              f"{section[n]['ms_per_step_min']:.3f}",
              f"{section[n]['vs_jheads']:.2f}x",
              f"{section[n]['cpu_ms_per_step']:.3f}",
              f"{section[n]['cpu_vs_jheads']:.2f}x",
              f"{section[n]['first_step_s']:.2f}",
              f"{section[n]['first_loss']:.6f}",
          ]
          for n in names
      ],
  )
  print(json.dumps({k: round(v, 3) for k, v in ratios.items()}))


def parity(settings, train, held_out, report, keras, tf_python, problem_path, estimator_runs):
  epochs = settings.epochs
  section: dict[str, Any] = {"epochs": epochs, "teacher": teacher_score(held_out)}
  own: dict[str, Any] = {}
  jheads_params = train_jax("jheads", train, epochs)
  section["jheads"] = score(held_out_logits(jheads_params, held_out), held_out)
  own["jheads"] = jheads_evaluate(jheads_params, held_out)
  hand_params = train_jax("hand", train, epochs)
  section["hand"] = score(held_out_logits(hand_params, held_out), held_out)
  if keras:
    model = keras_model(with_metrics=True)
    x, y, sample_weight = keras_data(train)
    model.fit(
        x, y, sample_weight=sample_weight, batch_size=BATCH, epochs=epochs, verbose=0,
        shuffle=False,
    )
    section["keras"] = score(held_out_logits(keras_weights_as_params(model), held_out), held_out)
    own["keras"] = keras_evaluate(model, held_out)
  if tf_python is not None:
    if not estimator_runs:
      estimator_runs.append(estimator_run(tf_python, problem_path, epochs, evaluate=True))
    section["tf_estimator"] = score(estimator_runs[0]["held_out_logits"], held_out)
    own["tf_estimator"] = estimator_runs[0]["evaluation"]
  report["parity"] = section
  report["own_metrics"] = own
  contenders = [c for c in ("teacher", "jheads", "hand", "keras", "tf_estimator") if c in section]
  print_table(
      f"held-out metrics after {epochs} epochs ({held_out.rows} rows; exact AUCs from"
      " each contender's logits; 'teacher' is the labelling network itself)",
      ["metric"] + contenders,
      [[m] + [f"{section[c][m]:.4f}" for c in contenders] for m in SCORES],
  )
  own_keys = {
      "jheads": ("auc/click", "auc/conversion", "average_loss/dwell", "accuracy/category",
                 "auc/tags"),
      "keras": ("click_auc", "conversion_auc", "dwell_mse", "category_accuracy", "tags_auc"),
      "tf_estimator": ("auc/click", "auc/conversion", "average_loss/dwell",
                       "accuracy/category", "auc/tags"),
  }
  print_table(
      "the same metrics as each framework reports them (200-threshold AUCs)",
      ["metric"] + list(own),
      [
          [m] + [f"{own[c].get(own_keys[c][i], float('nan')):.4f}" for c in own]
          for i, m in enumerate(SCORES)
      ],
  )


def source_state() -> dict[str, Any]:
  """The commit measured, and the files that differed from it (a shared working tree)."""
  here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

  def git(*args):
    done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, check=False)
    return done.stdout

  return {
      "commit": git("rev-parse", "HEAD").strip(),
      "modified": [
          line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()
      ],
  }


def machine() -> dict[str, Any]:
  model = platform.processor()
  try:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    model = next(
        line.split(":", 1)[1].strip() for line in lscpu.splitlines()
        if line.startswith("Model name")
    )
  except (OSError, subprocess.CalledProcessError, StopIteration):
    pass
  return {
      "cpu": model,
      "cores": os.cpu_count(),
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": jax.__version__,
      "optax": optax.__version__,
      "device": str(jax.devices()[0]),
  }


def main(argv: list[str] | None = None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="fewer rounds (about 2 minutes)")
  parser.add_argument("--tf-python", metavar="PYTHON", help="a Python with TF 2.15 Estimator")
  parser.add_argument("--no-keras", action="store_true", help="skip Keras 3")
  parser.add_argument(
      "--sections", nargs="+", choices=("speed", "parity", "breakdown"),
      default=("speed", "parity", "breakdown"),
  )
  parser.add_argument("--json", metavar="PATH", help="write the figures to PATH")
  args = parser.parse_args(argv)
  report = {
      "command": " ".join(
          ["python -m benchmarks.workload"] + (argv if argv is not None else sys.argv[1:])
      ),
      "machine": machine(),
      "source": source_state(),
  }
  print(json.dumps(report["machine"]))
  report.update(
      run(args.quick, tf_python=args.tf_python, keras=not args.no_keras,
          sections=tuple(args.sections))
  )
  print(f"\ntook {report['seconds']:.0f} s; load average {report['load_average_end']}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
  return report


if __name__ == "__main__":
  main()
