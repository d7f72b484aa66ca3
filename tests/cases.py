"""Random inputs for every head type, shared by the tests."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

import jheads


@dataclasses.dataclass(frozen=True)
class Case:
  """A head and a way to draw valid inputs for it."""

  id: str
  make_head: Callable[..., Any]
  draw_labels: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]
  weights: str | None = None  # None, "example" ([...]), "column" ([..., 1]) or "logit"

  def head(self, **kwargs):
    if self.weights is not None:
      kwargs.setdefault("weight_column", "w")
    return self.make_head(**kwargs)

  def inputs(self, head, rng: np.random.Generator, batch_shape=(16,), scale=3.0):
    logits = (scale * rng.normal(size=batch_shape + (head.logits_dim,))).astype(np.float32)
    labels = self.draw_labels(rng, batch_shape)
    features = {}
    if self.weights == "example":
      features["w"] = rng.uniform(0.0, 2.0, size=batch_shape).astype(np.float32)
    elif self.weights == "column":
      features["w"] = rng.uniform(0.0, 2.0, size=batch_shape + (1,)).astype(np.float32)
    elif self.weights == "logit":
      features["w"] = rng.uniform(0.0, 2.0, size=batch_shape + (head.logits_dim,)).astype(np.float32)
    return logits, labels, features or None


def _binary_labels(rng, shape):
  return rng.integers(0, 2, size=shape + (1,)).astype(np.float32)


def _soft_labels(rng, shape):
  return rng.uniform(0, 1, size=shape + (1,)).astype(np.float32)


def _class_ids(n):
  return lambda rng, shape: rng.integers(0, n, size=shape).astype(np.int32)


def _indicator(n):
  return lambda rng, shape: rng.integers(0, 2, size=shape + (n,)).astype(np.int32)


def _targets(d):
  return lambda rng, shape: rng.normal(size=shape + (d,)).astype(np.float32)


def _counts(d):
  return lambda rng, shape: rng.poisson(2.0, size=shape + (d,)).astype(np.float32)


CASES = [
    Case("binary", lambda **kw: jheads.binary_classification_head(**kw), _binary_labels),
    Case(
        "binary_thresholds_weighted",
        lambda **kw: jheads.binary_classification_head(thresholds=[0.3, 0.5, 0.8], **kw),
        _binary_labels,
        weights="column",
    ),
    Case("binary_soft", lambda **kw: jheads.binary_classification_head(**kw), _soft_labels, "example"),
    Case("multi_class", lambda **kw: jheads.multi_class_head(4, **kw), _class_ids(4)),
    Case("multi_class_weighted", lambda **kw: jheads.multi_class_head(5, **kw), _class_ids(5), "example"),
    Case("multi_label", lambda **kw: jheads.multi_label_head(3, **kw), _indicator(3)),
    Case(
        "multi_label_class_metrics",
        lambda **kw: jheads.multi_label_head(
            4, thresholds=[0.5, 0.7], classes_for_class_based_metrics=[0, 2], **kw
        ),
        _indicator(4),
        weights="column",
    ),
    Case("regression", lambda **kw: jheads.regression_head(**kw), _targets(1)),
    Case(
        "regression_3d_per_logit_weights",
        lambda **kw: jheads.regression_head(label_dimension=3, **kw),
        _targets(3),
        weights="logit",
    ),
    Case("poisson", lambda **kw: jheads.poisson_regression_head(**kw), _counts(1), "example"),
    Case(
        "poisson_2d_partial",
        lambda **kw: jheads.poisson_regression_head(label_dimension=2, compute_full_loss=False, **kw),
        _counts(2),
    ),
    Case("logistic", lambda **kw: jheads.logistic_regression_head(**kw), _soft_labels, "column"),
]

CASE_IDS = [case.id for case in CASES]
