"""Serving: named export outputs per head, and portable `jax.export` artifacts.

Estimator heads were served through named signatures: `classification` (scores),
`regression` (a value) and `predict` (every prediction), with one of them as
`serving_default`. `serving_outputs` computes the same outputs as arrays;
`save` writes each signature as a serialized `jax.export` module (StableHLO)
beside a `manifest.json`, and `load` turns such a directory back into
callables that need neither the model's code nor the head.

Class names are strings, and strings cannot live in jax arrays: they are
metadata of the artifact (in the manifest), and `load`'s callables add the
`classes` outputs on the host, as `jheads.decode_predictions` does.

Like the rest of jheads, this module sees a head only through its interface:
`predict_fn`, `config` and, for a multi_head, `heads`.
"""

from __future__ import annotations

import json
import pathlib
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import jheads
from jheads import base
from jheads import combinator
from jheads import vocab

ArrayLike = jax.typing.ArrayLike
AnyHead = base.Head | combinator.MultiHead
Features = Mapping[str, ArrayLike]

DEFAULT_SERVING_KEY = "serving_default"
"""The signature a server calls when a request names none."""
CLASSIFY_SERVING_KEY = "classification"
REGRESS_SERVING_KEY = "regression"
PREDICT_SERVING_KEY = "predict"

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BATCH_DIM = "b"
"""The name of the symbolic batch dimension every input shares."""

_BINARY = "binary_classification"
_MULTI_LABEL = "multi_label"


def class_names(head: AnyHead) -> tuple[str, ...] | dict[str, tuple[str, ...] | None] | None:
  """Class names of a head, as its serving outputs' `classes` use them.

  For a head, `jheads.class_names`: its vocabulary or "0".."n-1" for a
  classification head, None otherwise. For a multi_head, a dict of those,
  keyed by head name in head order.

  Example:
    >>> import jheads, jheads.export
    >>> head = jheads.multi_head([
    ...     jheads.binary_classification_head(name="sex", label_vocabulary=["f", "m"]),
    ...     jheads.regression_head(name="mass")])
    >>> jheads.export.class_names(head)
    {'sex': ('f', 'm'), 'mass': None}
  """
  if isinstance(head, combinator.MultiHead):
    return {h.name: vocab.class_names(h) for h in head.heads}
  return vocab.class_names(head)


def serving_outputs(head: AnyHead, logits: Any) -> dict[str, dict[str, jax.Array]]:
  """A head's named serving outputs: `{signature: {output: array}}`.

  Pure and jit-able (the head is static). For a head (Estimator's export
  outputs):

  * classification heads (binary, multi-class, multi-label):
    `classification` with `scores` (the probabilities), and `predict` with
    every prediction; binary heads also `regression` with `value` (the
    logistic);
  * regression heads (regression, Poisson, logistic regression):
    `regression` with `value` (the predictions), and `predict`;
  * `serving_default` is `classification` or `regression`.

  For a multi_head: `serving_default` is the first head's default; each
  head's default is again under `<head>` and its other outputs under
  `<head>/<signature>`; and one merged `predict` holds every head's
  predictions under `'<head>/<prediction key>'` keys.

  Class names are not arrays: see `class_names`, and `load`, whose
  classification signatures return them as `classes`.

  Differences from TensorFlow: a multi_head whose signature names collide
  (a head named `predict`, or `a` beside a head named `a/regression`) raises
  instead of letting one output silently replace another.

  Args:
    head: a head or multi_head.
    logits: the model's logits, as the head's `predict_fn` takes them.

  Returns:
    A dict from signature name to a dict of output arrays.

  Example:
    >>> import jax.numpy as jnp, jheads, jheads.export
    >>> head = jheads.binary_classification_head()
    >>> outputs = jheads.export.serving_outputs(head, jnp.array([[0.0]]))
    >>> sorted(outputs)
    ['classification', 'predict', 'regression', 'serving_default']
    >>> outputs["serving_default"]["scores"].tolist()
    [[0.5, 0.5]]
  """
  if isinstance(head, combinator.MultiHead):
    predictions = head.predict_fn(logits)
    per_head = [
        _head_outputs(h, {k: v for (name, k), v in predictions.items() if name == h.name})
        for h in head.heads
    ]
    return _merge(head.heads, per_head, _prefix_arrays)
  return _head_outputs(head, head.predict_fn(logits))


def _head_outputs(head: base.Head, predictions: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  config = head.config
  if config.is_classifier:
    default = {"scores": _prediction(head, predictions, "probabilities")}
    outputs = {DEFAULT_SERVING_KEY: default, CLASSIFY_SERVING_KEY: dict(default)}
    if config.kind == _BINARY:
      outputs[REGRESS_SERVING_KEY] = {"value": _prediction(head, predictions, "logistic")}
  else:
    default = {"value": _prediction(head, predictions, "predictions")}
    outputs = {DEFAULT_SERVING_KEY: default, REGRESS_SERVING_KEY: dict(default)}
  outputs[PREDICT_SERVING_KEY] = dict(predictions)
  return outputs


def _prediction(head: base.Head, predictions: Mapping[str, Any], key: str) -> Any:
  if key not in predictions:
    raise ValueError(
        f"{head.config.description}: cannot build serving outputs of a"
        f" {head.config.kind} head: its predictions have no {key!r} (keys:"
        f" {sorted(predictions)})."
    )
  return predictions[key]


def _merge(
    heads: Sequence[base.Head],
    per_head: Sequence[dict[str, dict[str, Any]]],
    prefix: Callable[[str, dict[str, Any]], dict[str, Any]],
) -> dict[str, dict[str, Any]]:
  """Merges per-head signatures as TF's multi_head did; `prefix` renames predict entries."""
  merged = {DEFAULT_SERVING_KEY: per_head[0][DEFAULT_SERVING_KEY]}
  merged_predict = {}
  for head, outputs in zip(heads, per_head):
    for key, output in outputs.items():
      name = head.name if key == DEFAULT_SERVING_KEY else f"{head.name}/{key}"
      _put(merged, name, output)
    merged_predict.update(prefix(head.name, outputs[PREDICT_SERVING_KEY]))
  _put(merged, PREDICT_SERVING_KEY, merged_predict)
  return merged


def _put(merged: dict[str, Any], name: str, output: Any) -> None:
  if name in merged:
    raise ValueError(
        f"multi_head: two serving signatures are named {name!r}; rename the"
        f" head that makes {name!r} collide (head names {DEFAULT_SERVING_KEY!r}"
        f" and {PREDICT_SERVING_KEY!r}, or names with '/', can)."
    )
  merged[name] = output


def _prefix_arrays(head_name: str, predictions: dict[str, Any]) -> dict[str, Any]:
  return {f"{head_name}/{key}": value for key, value in predictions.items()}


# ----------------------------------------------------------------------------
# Class-name outputs: added on the host, from rules kept in the manifest.
#
# A rule `{"head": h, "mode": "lookup", "from": k}` maps the ids in output k
# to head h's class names; `{"mode": "all", ...}` broadcasts all of h's class
# names to output k's shape. These are the `classes`/`all_classes` that
# Estimator's export outputs and `jheads.decode_predictions` give.


def _class_rules(head: AnyHead) -> dict[str, dict[str, dict[str, Any]]]:
  """The class-name outputs of every signature of `head`, as rules."""
  if isinstance(head, combinator.MultiHead):
    per_head = [_head_class_rules(h) for h in head.heads]
    return _merge(head.heads, per_head, _prefix_rules)
  return _head_class_rules(head)


def _head_class_rules(head: base.Head) -> dict[str, dict[str, dict[str, Any]]]:
  predict = vocab.class_outputs(head)
  if not predict:
    return {DEFAULT_SERVING_KEY: {}, PREDICT_SERVING_KEY: {}}

  def rule(output: vocab.ClassOutput) -> dict[str, Any]:
    return {"head": head.name, "mode": output.mode, "from": output.source}

  scores = {"classes": rule(vocab.ClassOutput("all", "scores"))}
  return {
      DEFAULT_SERVING_KEY: scores,
      CLASSIFY_SERVING_KEY: dict(scores),
      PREDICT_SERVING_KEY: {key: rule(output) for key, output in predict.items()},
  }


def _prefix_rules(head_name: str, rules: dict[str, Any]) -> dict[str, Any]:
  return {
      f"{head_name}/{key}": dict(rule, **{"from": f"{head_name}/{rule['from']}"})
      for key, rule in rules.items()
  }


def _add_classes(
    outputs: dict[str, np.ndarray],
    rules: Mapping[str, Mapping[str, Any]],
    names: Mapping[str | None, np.ndarray],
) -> dict[str, np.ndarray]:
  for key, rule in rules.items():
    output = vocab.ClassOutput(rule["mode"], rule["from"])
    outputs[key] = output.render(names[rule["head"]], outputs[rule["from"]])
  return outputs


# ----------------------------------------------------------------------------
# Artifacts: one serialized jax.export module per signature, and a manifest.


def save(
    directory: str | pathlib.Path,
    head: AnyHead,
    predict_logits: Callable[[Features], Any],
    example_features: Features,
    *,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> dict[str, Any]:
  """Exports every serving signature of a model as a portable artifact.

  Each signature becomes `features -> outputs`, the model and the head traced
  together, exported with `jax.export` for all `platforms` at once and
  serialized into its own file. Every input's leading dimension is the one
  symbolic batch dimension `b` (any size >= 1); its other dimensions and
  dtype are those of `example_features`. The model's parameters, closed over
  by `predict_logits`, are stored in each file as constants.

  The directory then holds, beside `manifest.json`, one `<signature>.jaxexport`
  per signature (the name percent-encoded, so `head/predict` is
  `head%2Fpredict.jaxexport`). The manifest lists the format version, the jax
  and jheads versions, the platforms, the inputs (shapes with "b" for the batch
  dimension, dtypes), every signature's file and outputs, the heads with their
  kinds and class names, and the class-name outputs `load` adds. It is written
  last, so a directory with a manifest is complete.

  Args:
    directory: where to write; created if missing, and must be empty.
    head: the head or multi_head that turns the logits into outputs.
    predict_logits: `features -> logits`, the model with its parameters
      closed over; `features` is a dict of arrays with a leading batch axis.
    example_features: a dict from input name to an example array (any batch
      size); it fixes the inputs' names, inner shapes and dtypes.
    platforms: the platforms the artifact runs on (`"cpu"`, `"cuda"`,
      `"rocm"`, `"tpu"`); exporting for one needs no such device.

  Returns:
    The manifest, as written.

  Example:
    >>> import tempfile, jax.numpy as jnp, numpy as np, jheads, jheads.export
    >>> head = jheads.multi_class_head(3, label_vocabulary=["a", "b", "c"])
    >>> w = jnp.eye(2, 3)
    >>> model = lambda features: features["x"] @ w
    >>> with tempfile.TemporaryDirectory() as path:
    ...   _ = jheads.export.save(path, head, model, {"x": np.zeros((1, 2), np.float32)})
    ...   serve = jheads.export.load(path)["serving_default"]
    >>> out = serve({"x": np.array([[0.0, 9.0]], np.float32)})
    >>> out["classes"][0].tolist(), out["scores"].argmax(-1).tolist()
    (['a', 'b', 'c'], [1])
  """
  directory = pathlib.Path(directory)
  if directory.exists() and any(directory.iterdir()):
    raise ValueError(f"jheads.export.save: {str(directory)!r} is not empty.")
  inputs = _input_specs(example_features)
  platforms = tuple(platforms)
  signatures = _signature_names(head, predict_logits, inputs)
  rules = _class_rules(head)

  directory.mkdir(parents=True, exist_ok=True)
  manifest_signatures = {}
  for signature in signatures:
    exported = jax.export.export(
        jax.jit(_signature_fn(head, predict_logits, signature)), platforms=platforms
    )(inputs)
    filename = urllib.parse.quote(signature, safe="") + ".jaxexport"
    (directory / filename).write_bytes(exported.serialize())
    output_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    manifest_signatures[signature] = {
        "file": filename,
        "outputs": {name: _describe(aval) for name, aval in output_avals.items()},
        "class_outputs": rules.get(signature, {}),
    }

  heads = head.heads if isinstance(head, combinator.MultiHead) else (head,)
  manifest = {
      "format": FORMAT_VERSION,
      "jheads_version": jheads.__version__,
      "jax_version": jax.__version__,
      "platforms": list(platforms),
      "inputs": {name: _describe(spec) for name, spec in inputs.items()},
      "signatures": manifest_signatures,
      "heads": [
          {
              "name": h.name,
              "kind": h.config.kind,
              "class_names": _as_list(vocab.class_names(h)),
          }
          for h in heads
      ],
      "class_names": _as_json(class_names(head)),
  }
  (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def load(directory: str | pathlib.Path) -> dict[str, Callable[[Features], dict[str, np.ndarray]]]:
  """Rebuilds a saved artifact's signatures as callables.

  Needs only jax, numpy and the directory: not the model's code, not the
  head. Each callable takes a dict of input arrays (numpy, jax or nested
  lists; any batch size >= 1; values are cast to the input's dtype when
  that is a same-kind cast, e.g. float64 to float32) and returns a dict of
  numpy arrays: the signature's outputs, plus the class-name outputs of
  classification heads (`classes` beside `scores`; `classes` and
  `all_classes` beside the predictions, as `jheads.decode_predictions`).
  Each batch size compiles once, on the default device's platform.

  Args:
    directory: a directory written by `save`.

  Returns:
    A dict from signature name to callable.
  """
  directory = pathlib.Path(directory)
  manifest = json.loads((directory / MANIFEST).read_text())
  if manifest.get("format") != FORMAT_VERSION:
    raise ValueError(
        f"jheads.export.load: {str(directory)!r} has artifact format"
        f" {manifest.get('format')!r}; this jheads reads format {FORMAT_VERSION}."
    )
  names = {
      h["name"]: np.asarray(h["class_names"])
      for h in manifest["heads"]
      if h["class_names"] is not None
  }
  return {
      signature: _served(
          jax.export.deserialize((directory / entry["file"]).read_bytes()),
          manifest["inputs"],
          entry["class_outputs"],
          names,
      )
      for signature, entry in manifest["signatures"].items()
  }


def _served(
    exported: jax.export.Exported,
    inputs: Mapping[str, Any],
    rules: Mapping[str, Any],
    names: Mapping[str | None, np.ndarray],
) -> Callable[[Features], dict[str, np.ndarray]]:
  call = jax.jit(exported.call)

  def serve(features: Features) -> dict[str, np.ndarray]:
    outputs = call(_cast_inputs(features, inputs))
    return _add_classes({k: np.asarray(v) for k, v in outputs.items()}, rules, names)

  return serve


def _signature_names(
    head: AnyHead, predict_logits: Callable[[Features], Any], inputs: Features
) -> list[str]:
  return sorted(jax.eval_shape(
      lambda features: serving_outputs(head, predict_logits(features)), inputs
  ))


def _signature_fn(head: AnyHead, predict_logits: Callable[[Features], Any], signature: str):
  def signature_fn(features):
    return serving_outputs(head, predict_logits(features))[signature]

  return signature_fn


def _input_specs(example_features: Features) -> dict[str, jax.ShapeDtypeStruct]:
  """Shapes of the exported inputs: the examples' with a shared symbolic batch dim."""
  where = "jheads.export"
  if not isinstance(example_features, Mapping) or not example_features:
    raise ValueError(
        f"{where}: example_features must be a non-empty dict of arrays keyed by"
        f" input name, got {type(example_features).__name__}."
    )
  (batch,) = jax.export.symbolic_shape(BATCH_DIM)
  specs, sizes = {}, {}
  for name, value in example_features.items():
    if not isinstance(name, str):
      raise ValueError(f"{where}: input names must be strings, got {name!r}.")
    shape, dtype = np.shape(value), jnp.result_type(value)
    if not shape:
      raise ValueError(f"{where}: input {name!r} needs a leading batch axis; it is a scalar.")
    sizes[name] = shape[0]
    specs[name] = jax.ShapeDtypeStruct((batch, *shape[1:]), dtype)
  if len(set(sizes.values())) > 1:
    raise ValueError(
        f"{where}: the inputs share one batch dimension, but example_features'"
        f" leading sizes differ: {sizes}."
    )
  return specs


def _cast_inputs(features: Features, inputs: Mapping[str, Any]) -> dict[str, Any]:
  where = "jheads.export"
  if not isinstance(features, Mapping):
    raise ValueError(
        f"{where}: features must be a dict keyed by input name ({sorted(inputs)}),"
        f" got {type(features).__name__}."
    )
  missing, unexpected = sorted(set(inputs) - set(features)), sorted(set(features) - set(inputs))
  if missing or unexpected:
    raise ValueError(
        f"{where}: features must have exactly the inputs {sorted(inputs)};"
        f" missing {missing}, unexpected {unexpected}."
    )
  cast = {}
  for name, spec in inputs.items():
    value = features[name]
    if not isinstance(value, jax.Array):
      value = np.asarray(value)
    dtype = np.dtype(spec["dtype"])
    if not np.can_cast(value.dtype, dtype, "same_kind"):
      raise ValueError(
          f"{where}: input {name!r} must be {dtype} (or cast to it safely),"
          f" got {value.dtype}."
      )
    cast[name] = value.astype(dtype)
  return cast


def _describe(aval: Any) -> dict[str, Any]:
  """An array's shape and dtype for the manifest; symbolic dimensions as names."""
  shape = [d if isinstance(d, int) else str(d) for d in aval.shape]
  return {"shape": shape, "dtype": np.dtype(aval.dtype).name}


def _as_list(names: Sequence[str] | None) -> list[str] | None:
  return None if names is None else list(names)


def _as_json(names: Any) -> Any:
  if isinstance(names, Mapping):
    return {key: _as_list(value) for key, value in names.items()}
  return _as_list(names)


# ----------------------------------------------------------------------------
# TF Serving: the same signatures as a TensorFlow SavedModel.


def save_saved_model(
    directory: str | pathlib.Path,
    head: AnyHead,
    predict_logits: Callable[[Features], Any],
    example_features: Features,
    *,
    platforms: Sequence[str] = ("cpu", "cuda"),
) -> None:
  """Writes the serving signatures as a TensorFlow SavedModel, for TF Serving.

  Needs TensorFlow (`pip install 'jheads[tf]'`); `save` does not. The
  signatures, their inputs (a leading batch dimension of any size) and
  outputs are those of `save` and `load`, class names included as string
  tensors. Each signature wraps the same StableHLO, through
  `jax.experimental.jax2tf`, for all `platforms` at once. They are
  Predict-API signatures: TF Serving's Classify and Regress APIs, which feed
  serialized `tf.Example`s, do not apply.

  Args:
    directory: where to write the SavedModel (as `tf.saved_model.save`).
    head: the head or multi_head that turns the logits into outputs.
    predict_logits: `features -> logits`, the model with its parameters
      closed over.
    example_features: a dict from input name to an example array.
    platforms: the platforms the SavedModel runs on.
  """
  import tensorflow as tf  # Optional: only this route needs TensorFlow.
  from jax.experimental import jax2tf

  inputs = _input_specs(example_features)
  rules = _class_rules(head)
  heads = head.heads if isinstance(head, combinator.MultiHead) else (head,)
  names = {h.name: vocab.class_names(h) for h in heads}
  input_signature = [
      tf.TensorSpec((None, *spec.shape[1:]), tf.as_dtype(spec.dtype), name=name)
      for name, spec in inputs.items()
  ]

  def tf_signature(signature: str) -> Any:
    converted = jax2tf.convert(
        _signature_fn(head, predict_logits, signature),
        polymorphic_shapes=[{name: f"({BATCH_DIM}, ...)" for name in inputs}],
        native_serialization_platforms=tuple(platforms),
        with_gradient=False,
    )

    def serve(*args):
      outputs = dict(converted(dict(zip(inputs, args))))
      for key, rule in rules.get(signature, {}).items():
        table = tf.constant(names[rule["head"]])
        source = outputs[rule["from"]]
        if rule["mode"] == "lookup":
          outputs[key] = tf.gather(table, source)
        else:
          outputs[key] = tf.broadcast_to(table, tf.shape(source))
      return outputs

    return tf.function(
        serve, input_signature=input_signature, autograph=False
    ).get_concrete_function()

  signatures = {
      signature: tf_signature(signature)
      for signature in _signature_names(head, predict_logits, inputs)
  }
  tf.saved_model.save(tf.Module(), str(directory), signatures=signatures)
