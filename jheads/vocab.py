"""Host-side label vocabularies: strings in, ids to the device, strings back out.

Strings cannot live in jax arrays, so class names never enter a jitted
function. `encode_labels` maps string labels to class ids with numpy before
the step; `decode_predictions` adds the class-name outputs (`classes`,
`all_classes`) to device predictions afterwards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

from jheads import base
from jheads import combinator

_CLASSIFIERS = ("binary_classification", "multi_class", "multi_label")


def class_names(head: base.Head) -> tuple[str, ...] | None:
  """A classification head's class names: its vocabulary, or "0".."n-1"; None otherwise.

  Example:
    >>> import jheads
    >>> jheads.class_names(jheads.binary_classification_head())
    ('0', '1')
  """
  config = head.config
  if config.kind not in _CLASSIFIERS:
    return None
  if config.label_vocabulary is not None:
    return config.label_vocabulary
  return tuple(str(i) for i in range(config.n_classes))


def encode_labels(head: base.Head | combinator.MultiHead, labels: Any) -> Any:
  """Maps string labels to class ids on the host, through the head's vocabulary.

  * binary and multi-class heads: an array of class names becomes an int32
    array of ids of the same shape.
  * multi-label heads: a list of per-example lists of class names becomes
    an int32 0/1 indicator `[batch, n_classes]` (numeric labels are taken to
    be that indicator already).
  * numeric labels, and labels of regression heads, pass through as numpy.
  * a multi_head takes a dict keyed by head name and returns one.

  Unknown class names raise a ValueError naming the head and the names.
  Missing labels (None, or NaN) become the head's `missing_label` (a
  multi-label row that is None: every class missing); without one they are
  an error.

  Example:
    >>> import numpy as np, jheads
    >>> head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"])
    >>> jheads.encode_labels(head, np.array(["c", "a"])).tolist()
    [2, 0]
  """
  if isinstance(head, combinator.MultiHead):
    if not isinstance(labels, Mapping):
      raise ValueError(
          f"multi_head: labels must be a dict keyed by head name, got"
          f" {type(labels).__name__}."
      )
    by_name = {h.name: h for h in head.heads}
    unknown = sorted(set(labels) - set(by_name))
    if unknown:
      raise ValueError(f"multi_head: labels for unknown head(s) {unknown}; heads are {list(by_name)}.")
    return {name: encode_labels(by_name[name], value) for name, value in labels.items()}
  config = head.config
  where = config.description
  if config.kind == "multi_label" and _is_list_of_name_lists(where, labels):
    return _indicator(where, labels, config)
  array = np.asarray(labels)
  missing = _missing_entries(array)
  if missing is not None and missing.any():
    if config.missing_label is None:
      raise ValueError(
          f"{where}: labels hold None or NaN but the head has no missing_label;"
          " pass missing_label=... to the head to mark them missing."
      )
    return _encode_with_missing(head, array, missing)
  if array.dtype.kind not in "USO":
    return array
  if config.label_vocabulary is None:
    raise ValueError(
        f"{where}: labels are strings but the head has no label_vocabulary."
    )
  if config.kind == "multi_label":
    raise ValueError(
        f"{where}: give multi-label string labels as a list of per-example"
        " lists of class names."
    )
  return _lookup(where, array, config.label_vocabulary)


def _missing_entries(array: np.ndarray) -> np.ndarray | None:
  """Where labels are None or NaN, or None if they cannot be."""
  if array.dtype.kind == "f":
    return np.isnan(array)
  if array.dtype.kind == "O":
    return np.vectorize(
        lambda v: v is None or (isinstance(v, float) and v != v), otypes=[bool]
    )(array)
  return None


def _encode_with_missing(head: base.Head, array: np.ndarray, missing: np.ndarray) -> np.ndarray:
  """Encodes the present labels; missing ones become the head's `missing_label`."""
  config = head.config
  present = array[~missing]
  if present.dtype.kind == "O" and present.size and all(isinstance(v, str) for v in present):
    present = present.astype(str)
  encoded_present = encode_labels(head, present) if present.size else present
  integer = config.kind == "multi_class" or (
      config.label_vocabulary is not None and config.kind != "multi_label"
  )
  dtype = np.int32 if integer else np.float32
  if integer and isinstance(config.missing_label, float):
    raise ValueError(
        f"{config.description}: labels are class ids, so missing_label must be an"
        f" int (e.g. -1), got {config.missing_label!r}."
    )
  out = np.full(array.shape, config.missing_label, dtype)
  out[~missing] = np.asarray(encoded_present, dtype)
  return out


def decode_predictions(
    head: base.Head | combinator.MultiHead, predictions: Mapping[Any, Any]
) -> dict[Any, np.ndarray]:
  """Device predictions as numpy, plus class names for classification heads.

  Adds `classes` (`[..., 1]`: the predicted class name) and `all_classes`
  (`[..., n]`) to binary and multi-class predictions, and `classes` (all
  class names, `[..., n]`) to multi-label ones, as TF's heads did. For a
  multi_head the added keys are `(head_name, "classes")` and so on.

  Example:
    >>> import jax.numpy as jnp, jheads
    >>> head = jheads.binary_classification_head(label_vocabulary=["aang", "iroh"])
    >>> out = jheads.decode_predictions(head, head.predict_fn(jnp.array([[1.0], [0.0]])))
    >>> out["classes"].tolist()
    [['iroh'], ['aang']]
  """
  if isinstance(head, combinator.MultiHead):
    decoded = {}
    for sub_head in head.heads:
      own = {key: value for (name, key), value in predictions.items() if name == sub_head.name}
      for key, value in decode_predictions(sub_head, own).items():
        decoded[(sub_head.name, key)] = value
    return decoded
  decoded = {key: np.asarray(value) for key, value in predictions.items()}
  names = class_names(head)
  for key, output in class_outputs(head).items():
    decoded[key] = output.render(np.asarray(names), decoded[output.source])
  return decoded


class ClassOutput(NamedTuple):
  """A string output made on the host from a numeric one and the class names.

  Attributes:
    mode: ``"lookup"`` maps the class ids in `source` to names;
      ``"all"`` broadcasts every class name to `source`'s shape.
    source: the numeric output it is made from.
  """

  mode: str
  source: str

  def render(self, names: np.ndarray, source: np.ndarray) -> np.ndarray:
    if self.mode == "lookup":
      return names[source]
    return np.broadcast_to(names, source.shape)


def class_outputs(head: base.Head) -> dict[str, ClassOutput]:
  """The class-name outputs a head's predictions gain on the host (TF's `classes`...)."""
  if class_names(head) is None:
    return {}
  if head.config.kind == "multi_label":
    return {"classes": ClassOutput("all", "probabilities")}
  return {
      "classes": ClassOutput("lookup", "class_ids"),
      "all_classes": ClassOutput("all", "probabilities"),
  }


def _lookup(where: str, labels: np.ndarray, vocabulary: Sequence[str]) -> np.ndarray:
  labels = _as_text(labels)
  vocab = np.asarray(vocabulary)
  order = np.argsort(vocab)
  position = np.searchsorted(vocab, labels, sorter=order)
  ids = order[np.minimum(position, len(vocab) - 1)]
  unknown = vocab[ids] != labels
  if np.any(unknown):
    missing = sorted(set(labels[unknown].tolist()))
    shown = ", ".join(repr(m) for m in missing[:5]) + (", ..." if len(missing) > 5 else "")
    raise ValueError(
        f"{where}: labels {shown} are not in label_vocabulary {list(vocabulary)}."
    )
  return ids.astype(np.int32)


def _as_text(array: np.ndarray) -> np.ndarray:
  if array.dtype.kind == "S":
    return np.char.decode(array, "utf-8")
  return array.astype(str)


def _is_list_of_name_lists(where: str, labels: Any) -> bool:
  """Whether `labels` are per-example lists of class names (rows may be empty)."""
  if isinstance(labels, (str, np.ndarray)) or not isinstance(labels, Sequence):
    return False
  if not all(
      row is None or (isinstance(row, (Sequence, np.ndarray)) and not isinstance(row, str))
      for row in labels
  ):
    return False
  rows = [np.asarray([] if row is None else row) for row in labels]
  if all(row.size == 0 or row.dtype.kind in "USO" for row in rows):
    return True
  if len({row.shape for row in rows}) > 1:
    raise ValueError(
        f"{where}: multi-label labels must be a 0/1 indicator [batch, n_classes]"
        " or per-example lists of class names; got lists of unequal length"
        " (lists of class ids are ambiguous with an indicator: convert them"
        " to an indicator first)."
    )
  return False


def _indicator(where: str, rows: Sequence[Any], config: base.HeadConfig) -> np.ndarray:
  """Lists of class names per example -> a 0/1 indicator `[batch, n_classes]`."""
  indicator = np.zeros((len(rows), config.n_classes), np.int32)
  if any(row is None for row in rows):
    if config.missing_label is None:
      raise ValueError(
          f"{where}: a row of labels is None but the head has no missing_label;"
          " pass missing_label=... to the head to mark it missing."
      )
    indicator = indicator.astype(np.float32 if isinstance(config.missing_label, float) else np.int32)
  for row_index, row in enumerate(rows):
    if row is None:
      indicator[row_index] = config.missing_label
      continue
    names = np.asarray(row).reshape(-1)
    if names.size == 0:
      continue
    if config.label_vocabulary is None:
      raise ValueError(f"{where}: labels are strings but the head has no label_vocabulary.")
    indicator[row_index, _lookup(where, names, config.label_vocabulary)] = 1
  return indicator
