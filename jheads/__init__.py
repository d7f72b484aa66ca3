"""jheads: Estimator-style heads for JAX, as pure functions.

A head turns a model's logits into a training loss, additive metric
statistics and predictions. Factories build one head per TensorFlow
Estimator head; `multi_head` combines named heads into one.

Example:
  >>> import jax.numpy as jnp, jheads
  >>> head = jheads.multi_head([
  ...     jheads.multi_class_head(3, name="species"),
  ...     jheads.regression_head(name="mass")])
  >>> logits = jnp.zeros((4, head.logits_dim))
  >>> labels = {"species": jnp.array([0, 1, 2, 0]), "mass": jnp.ones(4)}
  >>> stats = head.metric_fn(logits, labels)
  >>> sorted(jheads.metrics.compute(stats))[:3]
  ['accuracy/species', 'average_loss/mass', 'average_loss/species']
"""

from jheads import aggregation, export, metrics, training, weighting
from jheads.base import Head, HeadConfig, LossReduction
from jheads.checks import checked
from jheads.combinator import MultiHead, multi_head
from jheads.define import define_head
from jheads.heads import (
    binary_classification_head,
    logistic_regression_head,
    multi_class_head,
    multi_label_head,
    poisson_regression_head,
    ranking_head,
    regression_head,
    sequence_head,
)
from jheads.vocab import class_names, decode_predictions, encode_labels

__version__ = "0.1.0"

__all__ = [
    "Head",
    "HeadConfig",
    "LossReduction",
    "MultiHead",
    "aggregation",
    "binary_classification_head",
    "checked",
    "class_names",
    "decode_predictions",
    "define_head",
    "encode_labels",
    "export",
    "logistic_regression_head",
    "metrics",
    "multi_class_head",
    "multi_head",
    "multi_label_head",
    "poisson_regression_head",
    "ranking_head",
    "regression_head",
    "sequence_head",
    "training",
    "weighting",
]
