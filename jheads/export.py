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

An artifact is executable code. `load` checks that a directory is what `save`
wrote (SHA-256 digests, paths, shapes and dtypes, stable custom calls, every
jax.export safety check on) and raises `ArtifactError` otherwise; it cannot
tell who wrote it, so load artifacts only from sources you trust.

Like the rest of jheads, this module sees a head only through its interface:
`predict_fn`, `config` and, for a multi_head, `heads`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import pathlib
import stat
import threading
import urllib.parse
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

import jax
# jax.export checks custom calls and reads modules with these; `load` uses
# them to check a module exactly as jax.export would have when it was saved.
from jax._src.export import _export as jax_export_impl
from jax._src.interpreters import mlir as jax_mlir
from jax.extend.mlir import ir as mlir_ir
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
CLASSIFY_SERVING_KEY = "classification"
REGRESS_SERVING_KEY = "regression"
PREDICT_SERVING_KEY = "predict"

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
BATCH_DIM = "b"
"""The name of the symbolic batch dimension every input shares."""
FORMAT_VERSION = 2
"""Format 2 records SHA-256 digests; `load` refuses format 1, which has none."""
MODULE_SUFFIX = ".jaxexport"
BATCH_DIM = "b"
"""The name of the symbolic batch dimension every input shares."""
DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""`load`'s batch sizes: a request pads to at most twice its rows."""

_BINARY = "binary_classification"
_MULTI_LABEL = "multi_label"
_MANIFEST_DIGEST = "manifest_sha256"
_MANIFEST_KEYS = (
    "format", "jheads_version", "jax_version", "platforms", "inputs",
    "signatures", "heads", "class_names", _MANIFEST_DIGEST,
)
# The dtypes an artifact's arrays may have, with their StableHLO element types.
_MLIR_ELEMENT_TYPES = {
    "bool": "i1",
    "int8": "i8", "int16": "i16", "int32": "i32", "int64": "i64",
    "uint8": "ui8", "uint16": "ui16", "uint32": "ui32", "uint64": "ui64",
    "bfloat16": "bf16", "float16": "f16", "float32": "f32", "float64": "f64",
    "complex64": "complex<f32>", "complex128": "complex<f64>",
}
# Used only if jax.export's own set moves: the custom calls of jheads' modules.
_STABLE_CUSTOM_CALLS_FALLBACK = frozenset({
    "shape_assertion", "Sharding", "SPMDFullToShardShape", "SPMDShardToFullShape",
    "annotate_device_placement", "AllocateBuffer",
})


class ArtifactError(ValueError):
  """A directory `jheads.export.load` will not serve, and why.

  Raised for a malformed or foreign manifest, a file outside the artifact or
  not a regular file, a module whose SHA-256 differs from the manifest's, and
  a module whose contents differ from what `save` writes. A ValueError, as
  every bad-input error in jheads.
  """


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
  if config.serving is not None:
    # A kind defined with jheads.define_head names its own signatures.
    own = {name: dict(outputs) for name, outputs in config.serving(dict(predictions)).items()}
    if not own:
      raise ValueError(f"{config.description}: its serving function returned no signature.")
    outputs = {DEFAULT_SERVING_KEY: dict(next(iter(own.values()))), **own}
    outputs.setdefault(PREDICT_SERVING_KEY, dict(predictions))
    return outputs
  if config.kind == "ranking":
    default = {"value": _prediction(head, predictions, "logits")}
    return {
        DEFAULT_SERVING_KEY: default,
        REGRESS_SERVING_KEY: dict(default),
        PREDICT_SERVING_KEY: dict(predictions),
    }
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

  The artifact always runs on one device, wherever it was saved: `save`
  traces the model with no mesh in context (inside `jax.set_mesh` too) and
  copies the arrays it closes over to the host first, so parameters that are
  replicated or sharded over many devices (by an Explicit or Auto mesh)
  become plain constants. A model that constrains shardings with bare
  `PartitionSpec`s is traced under a one-device mesh with the same axis
  names.

  The directory then holds, beside `manifest.json`, one `<signature>.jaxexport`
  per signature (the name percent-encoded, so `head/predict` is
  `head%2Fpredict.jaxexport`). The manifest lists the format version, the jax
  and jheads versions, the platforms, the inputs (shapes with "b" for the batch
  dimension, dtypes), every signature's file, its SHA-256 and its outputs, the
  heads with their kinds and class names, the class-name outputs `load` adds,
  and the SHA-256 of the manifest itself (`manifest_sha256`, of its other
  entries as sorted, compact JSON). It is written last, so a directory with a
  manifest is complete.

  Args:
    directory: where to write; created if missing, and must be empty.
    head: the head or multi_head that turns the logits into outputs.
    predict_logits: `features -> logits`, the model with its parameters
      closed over; `features` is a dict of arrays with a leading batch axis.
      Each row's logits must depend on that row's features only (as in any
      inference model), which `load`'s batch buckets rely on.
    example_features: a dict from input name to an example array (any batch
      size); it fixes the inputs' names, inner shapes and dtypes.
    platforms: the platforms the artifact runs on (`"cpu"`, `"cuda"`,
      `"rocm"`, `"tpu"`); exporting for one needs no such device.

  Returns:
    The manifest, as written.

  Raises:
    ValueError: on bad `example_features`, a non-empty `directory`, or a
      model that cannot be exported for one device.

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
  exports = _export_signatures(head, predict_logits, inputs, platforms)
  rules = _class_rules(head)

  directory.mkdir(parents=True, exist_ok=True)
  manifest_signatures = {}
  for signature, exported in exports.items():
    module = bytes(exported.serialize())
    filename = _module_file(signature)
    (directory / filename).write_bytes(module)
    output_avals = jax.tree.unflatten(exported.out_tree, exported.out_avals)
    outputs = {name: _describe(aval) for name, aval in output_avals.items()}
    for name, spec in outputs.items():
      if _spec_problem(spec):
        raise ValueError(
            f"jheads.export.save: signature {signature!r}'s output {name!r} is"
            f" {spec['shape']}; every output needs the batch dimension first."
        )
    manifest_signatures[signature] = {
        "file": filename,
        "sha256": hashlib.sha256(module).hexdigest(),
        "outputs": outputs,
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
  manifest[_MANIFEST_DIGEST] = _manifest_sha256(manifest)
  (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
  return manifest


def _export_signatures(
    head: AnyHead,
    predict_logits: Callable[[Features], Any],
    inputs: Mapping[str, jax.ShapeDtypeStruct],
    platforms: tuple[str, ...],
) -> dict[str, jax.export.Exported]:
  """Every serving signature of the model, exported for one device."""
  model = _one_device_model(predict_logits, inputs)
  with jax.set_mesh(None):
    names = _signature_names(head, model, inputs)
    exports = {
        signature: jax.export.export(
            jax.jit(_signature_fn(head, model, signature)), platforms=platforms
        )(inputs)
        for signature in names
    }
  for signature, exported in exports.items():
    if exported.nr_devices != 1:
      raise ValueError(
          f"jheads.export: signature {signature!r} was lowered for"
          f" {exported.nr_devices} devices; a served artifact runs on one."
          " Remove the model's sharding annotations that name concrete"
          " multi-device shardings (NamedSharding of a mesh), or save outside"
          " that mesh."
      )
  return exports


def _module_file(signature: str) -> str:
  return urllib.parse.quote(signature, safe="") + MODULE_SUFFIX


def _manifest_sha256(manifest: Mapping[str, Any]) -> str:
  """The SHA-256 of a manifest's entries but its own digest, as canonical JSON."""
  body = {key: value for key, value in manifest.items() if key != _MANIFEST_DIGEST}
  text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
  return hashlib.sha256(text.encode("ascii")).hexdigest()


def _one_device_model(
    predict_logits: Callable[[Features], Any], inputs: Mapping[str, jax.ShapeDtypeStruct]
) -> Callable[[Features], Any]:
  """`predict_logits` as a function of its features alone, free of any mesh.

  A model trained on many devices closes over parameters that live on all of
  them (typed by the mesh when its axes are Explicit), and inside
  `jax.set_mesh` every jit is a program for the whole mesh; exported as they
  are, both give modules that need those devices to run. So the model is
  traced once with no mesh in context, and the trace is replayed with its
  constants (the closed-over arrays) copied to the host: the replay is a
  one-device program whatever the parameters' shardings were.
  """
  caller_mesh = jax.sharding.get_mesh()
  try:
    with jax.set_mesh(None):
      closed, out_shapes = jax.make_jaxpr(predict_logits, return_shape=True)(inputs)
  except Exception:
    if caller_mesh.empty:
      raise
    # Sharding constraints given as bare PartitionSpecs need a mesh to name;
    # one device with the caller's axis names gives them one.
    names = caller_mesh.axis_names
    one_device = jax.sharding.Mesh(
        np.asarray(jax.devices()[:1], dtype=object).reshape((1,) * len(names)),
        names,
        axis_types=(jax.sharding.AxisType.Auto,) * len(names),
    )
    with jax.set_mesh(one_device):
      closed, out_shapes = jax.make_jaxpr(predict_logits, return_shape=True)(inputs)
  consts = [_host_copy(value) for value in closed.consts]
  jaxpr, out_tree = closed.jaxpr, jax.tree.structure(out_shapes)

  def model(features: Features) -> Any:
    flat = jax.tree.leaves((features,))
    return jax.tree.unflatten(out_tree, jax.core.eval_jaxpr(jaxpr, consts, *flat))

  return model


def _host_copy(value: Any) -> Any:
  if not isinstance(value, jax.Array) or jax.dtypes.issubdtype(value.dtype, jax.dtypes.extended):
    return value
  if not value.is_fully_addressable:
    raise ValueError(
        "jheads.export.save: the model closes over an array that spans several"
        f" processes ({jax.typeof(value)}); gather it to every process first,"
        " e.g. with jax.experimental.multihost_utils.process_allgather."
    )
  return np.asarray(value)


def load(
    directory: str | pathlib.Path,
    *,
    batch_buckets: Sequence[int] | None = DEFAULT_BATCH_BUCKETS,
    warmup: bool | Sequence[str] = False,
    expected_sha256: str | None = None,
) -> dict[str, Signature]:
  """Rebuilds a saved artifact's signatures as callables, after checking it.

  Needs only jax, numpy and the directory: not the model's code, not the
  head. Each `Signature` takes a dict of input arrays (numpy, jax or nested
  lists; any batch size >= 1) and returns a dict of numpy arrays: the
  signature's outputs, plus the class-name outputs of classification heads
  (`classes` beside `scores`; `classes` and `all_classes` beside the
  predictions, as `jheads.decode_predictions`). Values are cast to the input's
  dtype when that is a same-kind cast (float64 to float32, int64 to int32),
  and a value the cast would change beyond rounding raises: an integer out of
  the dtype's range (3,000,000,000 into int32) or a finite float beyond it
  (1e39 into float32).

  **Batch buckets.** XLA compiles one program per input shape. With
  `batch_buckets`, a request of `n` rows is padded (repeating its last row)
  to the smallest bucket >= `n`, run, and its outputs cut back to `n` rows,
  so a server compiles each bucket once, on its first use (or all of them in
  `load` with `warmup`), and never again. A request larger than the
  largest bucket is split into chunks of that size (the last chunk padded to
  its own bucket), run one after another, and concatenated. Padding relies on
  the model treating rows independently, as inference models do; pass
  `batch_buckets=None` to run every request at its exact size instead (each
  new size then compiles once, on its first call).

  **Checks.** `load` serves only what `save` wrote, and refuses (with an
  `ArtifactError` naming the file and the problem) anything else: a manifest
  that is malformed or not this format, or whose own SHA-256 does not match;
  a file named outside the artifact directory (`..`, absolute paths,
  symlinks that leave it) or that is not a regular file; a module whose
  SHA-256 differs from the manifest's (checked before it is deserialized, so
  a corrupted file never reaches jax); and a module whose inputs or outputs
  (names, shapes, dtypes) differ from the manifest's, that was lowered for
  more than one device or other platforms, that has side effects or
  non-replicated shardings, that was exported with any jax.export safety
  check disabled, or that calls custom-call targets outside jax.export's
  stable set.

  The digests catch corruption and files swapped by mistake, not an author
  who rewrites them: an artifact is executable code, and jax's own reader of
  its StableHLO is not hardened against crafted bytes (with its digests
  recomputed, a module with random bit flips can crash it). Load artifacts
  only from sources you trust, and pin the one you mean with
  `expected_sha256`.

  Args:
    directory: a directory written by `save`.
    batch_buckets: the batch sizes to pad requests to (positive ints, any
      order); None runs requests at their exact size.
    warmup: compile every bucket now, so that no request waits for a
      compilation: True for every signature, or the names of the signatures
      to compile (a server that answers `predict` only needs that one; each
      bucket of each signature is one compilation). Needs `batch_buckets`.
    expected_sha256: serve only the artifact with this digest, its
      manifest's `manifest_sha256` (as `save` returns it). The manifest's
      digest covers every module's, so no other file passes, and nothing is
      deserialized before the manifest matches.

  Returns:
    A dict from signature name to `Signature`.

  Raises:
    ArtifactError: the directory is not an artifact this jheads serves, or
      not the `expected_sha256` one.
    ValueError: bad `batch_buckets`, `warmup` or `expected_sha256`.
  """
  where = "jheads.export.load"
  buckets = _check_buckets(batch_buckets)
  if expected_sha256 is not None and not _is_sha256(expected_sha256):
    raise ValueError(
        f"{where}: expected_sha256 must be 64 lowercase hex digits (a manifest's"
        f" 'manifest_sha256'), got {expected_sha256!r}."
    )
  if isinstance(warmup, str) or not isinstance(warmup, (bool, Sequence)):
    raise ValueError(
        f"{where}: warmup must be True, False or a list of signature names, got {warmup!r}."
    )
  if warmup and buckets is None:
    raise ValueError(
        f"{where}: warmup compiles the batch buckets, but batch_buckets=None"
        " has none; pass batch buckets, or warmup=False."
    )
  root = _artifact_root(directory)
  manifest_path = root / MANIFEST
  manifest = _read_manifest(manifest_path, _read_member(root, MANIFEST, "the manifest"))
  if expected_sha256 is not None and manifest[_MANIFEST_DIGEST] != expected_sha256:
    raise ArtifactError(
        f"{where}: {str(manifest_path)!r} is the artifact {manifest[_MANIFEST_DIGEST]},"
        f" not the expected {expected_sha256}."
    )
  names = {
      h["name"]: np.asarray(h["class_names"])
      for h in manifest["heads"]
      if h["class_names"] is not None
  }
  signatures = {}
  context = jax_mlir.make_ir_context()  # One for all modules: each costs milliseconds.
  for signature, entry in manifest["signatures"].items():
    path = root / entry["file"]
    module = _read_member(root, entry["file"], f"signature {signature!r}")
    digest = hashlib.sha256(module).hexdigest()
    if digest != entry["sha256"]:
      raise ArtifactError(
          f"{where}: {str(path)!r} (signature {signature!r}) has SHA-256 {digest},"
          f" but the manifest records {entry['sha256']}: the file was corrupted or"
          " replaced after it was saved. Refusing to deserialize it."
      )
    try:
      exported = jax.export.deserialize(bytearray(module))
    except Exception as error:  # A malformed flatbuffer can fail in any way.
      raise ArtifactError(
          f"{where}: {str(path)!r} (signature {signature!r}) is not a serialized"
          f" jax.export module this jax reads: {type(error).__name__}: {error}"
      ) from error
    _check_module(
        f"{where}: {str(path)!r} (signature {signature!r})", exported, manifest, entry, context
    )
    signatures[signature] = Signature(
        signature, exported, manifest["inputs"], entry, names, buckets
    )
  if warmup:
    names = list(signatures) if warmup is True else list(warmup)
    unknown = sorted(set(names) - set(signatures))
    if unknown:
      raise ValueError(
          f"{where}: warmup names signatures {unknown} that the artifact does not"
          f" have; it has {sorted(signatures)}."
      )
    for name in names:
      signatures[name].warmup()
  return signatures


class Signature:
  """One loaded serving signature: call it with a features dict.

  Made by `load`. Calling it checks and casts the inputs, runs the module and
  returns its outputs as numpy arrays, class-name outputs included.

  Attributes:
    name: the signature's name.
    inputs: `{input: {"shape": [...], "dtype": ...}}`, "b" for the batch.
    outputs: the module's outputs, likewise (class-name outputs aside).
    batch_buckets: the sorted batch sizes requests are padded to, or None.
  """

  def __init__(
      self,
      name: str,
      exported: jax.export.Exported,
      inputs: Mapping[str, Any],
      entry: Mapping[str, Any],
      class_names: Mapping[str, np.ndarray],
      batch_buckets: tuple[int, ...] | None,
  ):
    self.name = name
    self.inputs = inputs
    self.outputs = entry["outputs"]
    self.batch_buckets = batch_buckets
    self._exported = exported
    self._rules = entry["class_outputs"]
    self._class_names = class_names
    self._where = f"jheads.export: signature {name!r}"
    self._exact = jax.jit(exported.call)
    self._executables: dict[int, Callable[[Features], Any]] = {}
    self._lock = threading.Lock()

  def __repr__(self) -> str:
    return f"Signature({self.name!r}, batch_buckets={self.batch_buckets})"

  @property
  def compiled_batch_sizes(self) -> tuple[int, ...]:
    """The buckets compiled so far (with `batch_buckets`; else empty)."""
    return tuple(sorted(self._executables))

  def warmup(self) -> None:
    """Compiles every batch bucket now, so that no request waits for one."""
    if self.batch_buckets is None:
      raise ValueError(f"{self._where}: warmup needs batch_buckets; it has none.")
    for size in self.batch_buckets:
      self._executable(size)

  def __call__(self, features: Features) -> dict[str, np.ndarray]:
    """Runs the signature on `features`, a dict of arrays with one batch size."""
    arrays, batch = _prepare_inputs(self._where, features, self.inputs)
    if self.batch_buckets is None:
      outputs = {k: np.asarray(v) for k, v in self._exact(arrays).items()}
    else:
      largest = self.batch_buckets[-1]
      if batch <= largest:
        outputs = self._run_bucketed(arrays, batch)
      else:
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        parts = [
            self._run_bucketed({k: v[start : start + largest] for k, v in arrays.items()},
                               min(largest, batch - start))
            for start in range(0, batch, largest)
        ]
        outputs = {k: np.concatenate([part[k] for part in parts]) for k in parts[0]}
    return _add_classes(outputs, self._rules, self._class_names)

  def _run_bucketed(self, arrays: dict[str, Any], batch: int) -> dict[str, np.ndarray]:
    size = self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch)]
    if size != batch:
      arrays = {name: _pad_rows(value, size) for name, value in arrays.items()}
    outputs = self._executable(size)(arrays)
    return {k: np.asarray(v)[:batch] for k, v in outputs.items()}

  def _executable(self, size: int) -> Callable[[Features], Any]:
    executable = self._executables.get(size)
    if executable is None:
      with self._lock:  # Concurrent first requests compile a bucket once.
        executable = self._executables.get(size)
        if executable is None:
          specs = {
              name: jax.ShapeDtypeStruct((size, *spec["shape"][1:]), jnp.dtype(spec["dtype"]))
              for name, spec in self.inputs.items()
          }
          executable = jax.jit(self._exported.call).lower(specs).compile()
          self._executables[size] = executable
    return executable


def _pad_rows(value: Any, size: int) -> np.ndarray:
  # The last row again, not zeros: padding rows stay valid inputs (ids in
  # range, no NaN), so they cannot slow or break the program.
  value = np.asarray(value)
  return np.concatenate([value, np.repeat(value[-1:], size - len(value), axis=0)])


def _check_buckets(batch_buckets: Sequence[int] | None) -> tuple[int, ...] | None:
  if batch_buckets is None:
    return None
  where = "jheads.export.load"
  try:
    sizes = list(batch_buckets)
  except TypeError:
    sizes = None
  if not sizes or not all(
      isinstance(s, (int, np.integer)) and not isinstance(s, bool) and s >= 1 for s in sizes
  ):
    raise ValueError(
        f"{where}: batch_buckets must be a non-empty sequence of positive ints"
        f" (or None), got {batch_buckets!r}."
    )
  return tuple(sorted({int(s) for s in sizes}))


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
    if dtype.name not in _MLIR_ELEMENT_TYPES:
      raise ValueError(
          f"{where}: input {name!r} has dtype {dtype}; artifacts take"
          f" {sorted(_MLIR_ELEMENT_TYPES)}."
      )
    sizes[name] = shape[0]
    specs[name] = jax.ShapeDtypeStruct((batch, *shape[1:]), dtype)
  if len(set(sizes.values())) > 1:
    raise ValueError(
        f"{where}: the inputs share one batch dimension, but example_features'"
        f" leading sizes differ: {sizes}."
    )
  return specs


# ----------------------------------------------------------------------------
# Call time: inputs checked against the manifest, cast only where it is exact.


def _prepare_inputs(
    where: str, features: Features, inputs: Mapping[str, Any]
) -> tuple[dict[str, Any], int]:
  """The features as the module's dtypes, and their shared batch size."""
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
  cast, sizes = {}, {}
  for name, spec in inputs.items():
    value = features[name]
    if not isinstance(value, (jax.Array, np.ndarray)):
      value = np.asarray(value)
    dtype = jnp.dtype(spec["dtype"])
    inner = tuple(spec["shape"][1:])
    if value.ndim != 1 + len(inner) or tuple(value.shape[1:]) != inner:
      expected = ", ".join(["batch", *map(str, inner)])
      raise ValueError(
          f"{where}: input {name!r} must have shape [{expected}], got {tuple(value.shape)}."
      )
    sizes[name] = value.shape[0]
    cast[name] = _cast_exactly(where, name, value, dtype)
  if len(set(sizes.values())) > 1:
    raise ValueError(f"{where}: the inputs share one batch size, got {sizes}.")
  (batch,) = set(sizes.values())
  if batch < 1:
    raise ValueError(f"{where}: a request needs at least one row; got batch size 0.")
  return cast, batch


def _cast_exactly(where: str, name: str, value: Any, dtype: np.dtype) -> Any:
  """`value` as `dtype`, refusing casts that wrap integers or overflow floats."""
  if value.dtype == dtype:
    return value
  if not np.can_cast(value.dtype, dtype, "same_kind"):
    raise ValueError(
        f"{where}: input {name!r} must be {dtype} (or cast to it safely),"
        f" got {value.dtype}."
    )
  value = np.asarray(value)
  with np.errstate(over="ignore", invalid="ignore"):  # Overflow is checked below.
    cast = value.astype(dtype)
  if np.can_cast(value.dtype, dtype, "safe") or not value.size:
    return cast
  if dtype.kind in "iu" and value.dtype.kind in "iu":
    info, low, high = np.iinfo(dtype), int(value.min()), int(value.max())
    if low < info.min or high > info.max:
      raise ValueError(
          f"{where}: input {name!r} holds {value.dtype} values in [{low}, {high}],"
          f" outside {dtype}'s [{info.min}, {info.max}]: the cast would wrap them."
          f" Pass values that fit {dtype}, or export the model with a wider input."
      )
  elif dtype.kind in "fc":
    overflow = np.isinf(cast) & np.isfinite(value)
    if overflow.any():
      raise ValueError(
          f"{where}: input {name!r} holds finite {value.dtype} values beyond"
          f" {dtype}'s range (e.g. {value[overflow].flat[0].item()!r}; its largest"
          f" is {np.finfo(dtype).max.item():.8g}): the cast would make them infinite."
      )
  return cast


# ----------------------------------------------------------------------------
# Load time: the manifest's structure, the files' paths, the modules' contents.


def _artifact_root(directory: str | pathlib.Path) -> pathlib.Path:
  try:
    root = pathlib.Path(directory).resolve(strict=True)
  except (OSError, RuntimeError) as error:
    raise ArtifactError(f"jheads.export.load: no artifact at {str(directory)!r}: {error}") from error
  if not root.is_dir():
    raise ArtifactError(f"jheads.export.load: {str(directory)!r} is not a directory.")
  return root


def _read_member(root: pathlib.Path, name: Any, what: str) -> bytes:
  """The bytes of the artifact's file `name`, which must lie inside `root`."""
  where = f"jheads.export.load: {str(root)!r}: {what}"
  if (
      not isinstance(name, str)
      or name in ("", ".", "..")
      or any(c in name for c in "/\\\0")
      or pathlib.PurePath(name).is_absolute()
  ):
    raise ArtifactError(
        f"{where} names the file {name!r}: artifact files must be plain file"
        " names inside the artifact directory (no '..', no separators, no"
        " absolute paths)."
    )
  path = root / name
  try:
    resolved = path.resolve(strict=True)
  except (OSError, RuntimeError) as error:
    raise ArtifactError(f"{where}: {str(path)!r} cannot be read: {error}") from error
  # Links within the directory are its own files (Kubernetes mounts them so).
  if not resolved.is_relative_to(root) or resolved == root:
    raise ArtifactError(
        f"{where}: {str(path)!r} is a symbolic link to {str(resolved)!r}, not a"
        " file inside the artifact directory."
    )
  # O_NONBLOCK: opening a FIFO must not wait for a writer; fstat then rejects it.
  flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
  try:
    fd = os.open(resolved, flags | getattr(os, "O_CLOEXEC", 0))
  except OSError as error:
    raise ArtifactError(f"{where}: {str(path)!r} cannot be opened: {error}") from error
  try:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise ArtifactError(f"{where}: {str(path)!r} is not a regular file.")
    with os.fdopen(fd, "rb", closefd=False) as file:
      return file.read()
  finally:
    os.close(fd)


def _read_manifest(path: pathlib.Path, text: bytes) -> dict[str, Any]:
  where = f"jheads.export.load: {str(path)!r}"

  def fail(problem: str) -> NoReturn:
    raise ArtifactError(f"{where}: {problem}")

  try:
    manifest = json.loads(text)
  except (ValueError, UnicodeDecodeError) as error:
    raise ArtifactError(f"{where} is not valid JSON: {error}") from error
  if not isinstance(manifest, dict):
    fail(f"the manifest must be a JSON object, got {_json_type(manifest)}.")
  if "format" not in manifest:
    fail("the manifest has no 'format' entry: it was not written by jheads.export.save.")
  version = manifest["format"]
  if type(version) is not int:
    fail(f"'format' must be an integer, got {json.dumps(version)}.")
  if version != FORMAT_VERSION:
    fail(f"artifact format {version}; this jheads reads format {FORMAT_VERSION} (re-save it).")
  missing = sorted(set(_MANIFEST_KEYS) - set(manifest))
  if missing:
    fail(f"the manifest is missing the entries {missing}.")

  for key in ("jheads_version", "jax_version", _MANIFEST_DIGEST):
    if not isinstance(manifest[key], str):
      fail(f"{key!r} must be a string, got {_json_type(manifest[key])}.")
  platforms = manifest["platforms"]
  if not _is_list_of(platforms, str) or not platforms:
    fail(f"'platforms' must be a non-empty list of strings, got {json.dumps(platforms)}.")

  inputs = manifest["inputs"]
  if not isinstance(inputs, dict) or not inputs:
    fail(f"'inputs' must be a non-empty object, got {_json_type(inputs)}.")
  for name, spec in inputs.items():
    problem = _spec_problem(spec)
    if problem:
      fail(f"input {name!r}: {problem}")

  heads = manifest["heads"]
  if not isinstance(heads, list) or not heads:
    fail(f"'heads' must be a non-empty list, got {_json_type(heads)}.")
  head_names = {}
  for i, h in enumerate(heads):
    if not isinstance(h, dict) or set(h) != {"name", "kind", "class_names"}:
      fail(f"heads[{i}] must be an object with 'name', 'kind' and 'class_names'.")
    if not isinstance(h["name"], (str, type(None))) or not isinstance(h["kind"], str):
      fail(f"heads[{i}]: 'name' must be a string or null (one unnamed head), 'kind' a string.")
    if h["class_names"] is not None and not _is_list_of(h["class_names"], str):
      fail(f"heads[{i}]: 'class_names' must be a list of strings or null.")
    if h["name"] in head_names:
      fail(f"two heads are named {h['name']!r}.")
    head_names[h["name"]] = h["class_names"]

  signatures = manifest["signatures"]
  if not isinstance(signatures, dict) or not signatures:
    fail(f"'signatures' must be a non-empty object, got {_json_type(signatures)}.")
  for signature, entry in signatures.items():
    at = f"signature {signature!r}"
    if not isinstance(entry, dict) or set(entry) != {"file", "sha256", "outputs", "class_outputs"}:
      fail(f"{at} must be an object with 'file', 'sha256', 'outputs' and 'class_outputs'.")
    if not isinstance(entry["file"], str):
      fail(f"{at}: 'file' must be a string, got {_json_type(entry['file'])}.")
    digest = entry["sha256"]
    if not _is_sha256(digest):
      fail(f"{at}: 'sha256' must be 64 lowercase hex digits, got {json.dumps(digest)}.")
    outputs = entry["outputs"]
    if not isinstance(outputs, dict) or not outputs:
      fail(f"{at}: 'outputs' must be a non-empty object.")
    for name, spec in outputs.items():
      problem = _spec_problem(spec)
      if problem:
        fail(f"{at}: output {name!r}: {problem}")
    rules = entry["class_outputs"]
    if not isinstance(rules, dict):
      fail(f"{at}: 'class_outputs' must be an object.")
    for key, rule in rules.items():
      if (
          not isinstance(rule, dict)
          or set(rule) != {"head", "mode", "from"}
          or rule["mode"] not in ("lookup", "all")
      ):
        fail(f"{at}: class output {key!r} must be {{'head', 'mode': 'lookup' or 'all', 'from'}}.")
      if key in outputs:
        fail(f"{at}: class output {key!r} has the name of a module output.")
      if not isinstance(rule["from"], str) or rule["from"] not in outputs:
        fail(f"{at}: class output {key!r} reads {rule['from']!r}, not an output.")
      if head_names.get(rule["head"]) is None:
        fail(f"{at}: class output {key!r} needs the class names of head {rule['head']!r},"
             " which the manifest does not list.")

  digest = _manifest_sha256(manifest)
  if manifest[_MANIFEST_DIGEST] != digest:
    fail(
        f"the manifest's SHA-256 is {digest}, but it records {manifest[_MANIFEST_DIGEST]}:"
        " it was corrupted or edited after it was saved."
    )
  return manifest


def _spec_problem(spec: Any) -> str | None:
  """What is wrong with a manifest's `{"shape", "dtype"}`, if anything.

  Every input and output is batched: its leading dimension is "b" (which
  batch buckets cut back), the others sizes.
  """
  if not isinstance(spec, dict) or set(spec) != {"shape", "dtype"}:
    return "must be an object with 'shape' and 'dtype'."
  shape, dtype = spec["shape"], spec["dtype"]
  if not isinstance(dtype, str) or dtype not in _MLIR_ELEMENT_TYPES:
    return f"dtype {json.dumps(dtype)} is not one of {sorted(_MLIR_ELEMENT_TYPES)}."
  if not isinstance(shape, list) or not shape or shape[0] != BATCH_DIM:
    return f"shape must be a list starting with {BATCH_DIM!r}, got {json.dumps(shape)}."
  for d in shape[1:]:
    if not (isinstance(d, int) and not isinstance(d, bool) and d >= 0):
      return f"shape {json.dumps(shape)} holds {json.dumps(d)}, not a size."
  return None


def _is_sha256(value: Any) -> bool:
  return isinstance(value, str) and len(value) == 64 and not set(value) - set("0123456789abcdef")


def _is_list_of(value: Any, kind: type) -> bool:
  return isinstance(value, list) and all(isinstance(v, kind) for v in value)


def _json_type(value: Any) -> str:
  names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
           int: "a number", float: "a number", type(None): "null"}
  return names.get(type(value), type(value).__name__)


def _check_module(
    where: str,
    exported: jax.export.Exported,
    manifest: Mapping[str, Any],
    entry: Mapping[str, Any],
    context: mlir_ir.Context,
) -> None:
  """Raises an ArtifactError unless `exported` is what `save` writes for `entry`."""

  def fail(problem: str) -> NoReturn:
    raise ArtifactError(f"{where}: {problem}")

  if tuple(exported.platforms) != tuple(manifest["platforms"]):
    fail(f"it was exported for {list(exported.platforms)}; the manifest says {manifest['platforms']}.")
  version = exported.calling_convention_version
  lowest = jax.export.minimum_supported_calling_convention_version
  highest = jax.export.maximum_supported_calling_convention_version
  if not lowest <= version <= highest:
    fail(f"it uses calling convention {version}; this jax runs {lowest} to {highest}.")
  if exported.disabled_safety_checks:
    fail(
        "it was exported with jax.export safety checks disabled"
        f" ({', '.join(map(str, exported.disabled_safety_checks))}); jheads serves"
        " only modules with every check on."
    )
  if exported.nr_devices != 1:
    fail(f"it is a program for {exported.nr_devices} devices; a served module runs on one.")
  effects = (*exported.ordered_effects, *exported.unordered_effects)
  if effects:
    fail(f"it has side effects ({', '.join(map(str, effects))}); serving modules are pure.")
  shardings = (*exported.in_shardings_hlo, *exported.out_shardings_hlo)
  if any(s is not None and not s.is_replicated() for s in shardings):
    fail("its inputs or outputs are sharded; a served module is not.")

  inputs, outputs = manifest["inputs"], entry["outputs"]
  input_order = jax.tree.leaves(((dict(zip(inputs, inputs)),), {}))
  if exported.in_tree != jax.tree.structure(((dict.fromkeys(inputs, 0),), {})):
    fail(f"its inputs are {exported.in_tree}, not the manifest's features {sorted(inputs)}.")
  for name, aval in zip(input_order, exported.in_avals):
    if _describe(aval) != inputs[name]:
      fail(f"its input {name!r} is {_describe(aval)}; the manifest says {inputs[name]}.")
  output_order = jax.tree.leaves(dict(zip(outputs, outputs)))
  if exported.out_tree != jax.tree.structure(dict.fromkeys(outputs, 0)):
    fail(f"its outputs are {exported.out_tree}, not the manifest's {sorted(outputs)}.")
  for name, aval in zip(output_order, exported.out_avals):
    if _describe(aval) != outputs[name]:
      fail(f"its output {name!r} is {_describe(aval)}; the manifest says {outputs[name]}.")
  kept = exported.module_kept_var_idx
  if list(kept) != sorted(set(kept)) or any(not 0 <= i < len(exported.in_avals) for i in kept):
    fail(f"its kept-argument indices {list(kept)} do not index its inputs.")

  problem = _stablehlo_problem(exported, context)
  if problem:
    fail(problem)


def _stablehlo_problem(exported: jax.export.Exported, context: mlir_ir.Context) -> str | None:
  """What is wrong with the module's StableHLO itself, if anything.

  Reads the module as jax's own call lowering does: its custom-call targets
  must be in jax.export's stable set (the targets it guarantees backward
  compatibility for, which `jax.export.export` enforces unless a safety check
  is disabled), and its `main` must take and return exactly the types its
  metadata states, since jax splices the module in trusting them.
  """
  try:
    with context:
      module = exported.mlir_module(serialized=False)
      targets, main = set(), None
      stack = [module.operation]
      while stack:
        op = stack.pop()
        name = op.name
        if name == "stablehlo.custom_call":
          targets.add(mlir_ir.StringAttr(op.attributes["call_target_name"]).value)
        elif name == "func.func" and mlir_ir.StringAttr(op.attributes["sym_name"]).value == "main":
          main = mlir_ir.FunctionType(mlir_ir.TypeAttr(op.attributes["function_type"]).value)
          main = ([str(t) for t in main.inputs], [str(t) for t in main.results])
        for region in op.regions:
          for block in region:
            stack.extend(inner.operation for inner in block)
  except Exception as error:  # A module that does not parse is not served.
    return f"its StableHLO cannot be read: {type(error).__name__}: {error}"

  unstable = sorted(targets - _stable_custom_calls())
  if unstable:
    return (
        f"it calls custom-call targets outside jax.export's stable set: {unstable};"
        " jheads serves only modules whose custom calls jax.export guarantees."
    )
  if main is None:
    return "its StableHLO has no main function."
  expected_inputs = ["tensor<i32>"] * (len(exported.platforms) > 1) + [
      _tensor_type(exported.in_avals[i]) for i in exported.module_kept_var_idx
  ]
  expected = (expected_inputs, [_tensor_type(aval) for aval in exported.out_avals])
  if main != expected:
    return (
        f"its main function takes {main[0]} and returns {main[1]}, not the"
        f" {expected[0]} and {expected[1]} its metadata states."
    )
  return None


def _stable_custom_calls() -> frozenset[str]:
  # jax.export keeps the set privately; without it, the targets a module of
  # heads and dense layers can hold.
  stable = getattr(jax_export_impl, "_CUSTOM_CALL_TARGETS_GUARANTEED_STABLE", None)
  return frozenset(stable) if stable else _STABLE_CUSTOM_CALLS_FALLBACK


def _tensor_type(aval: Any) -> str:
  dims = ["?" if not isinstance(d, int) else str(d) for d in aval.shape]
  element = _MLIR_ELEMENT_TYPES.get(np.dtype(aval.dtype).name, f"<{aval.dtype}>")
  return f"tensor<{'x'.join([*dims, element])}>"


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
  tensors. Each signature wraps the very module `save` exports for it (so a
  model saved from many devices serves on one here too), through
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
  exports = _export_signatures(head, predict_logits, inputs, tuple(platforms))
  rules = _class_rules(head)
  heads = head.heads if isinstance(head, combinator.MultiHead) else (head,)
  names = {h.name: vocab.class_names(h) for h in heads}
  input_signature = [
      tf.TensorSpec((None, *spec.shape[1:]), tf.as_dtype(spec.dtype), name=name)
      for name, spec in inputs.items()
  ]

  def tf_signature(signature: str) -> Any:
    converted = jax2tf.convert(
        exports[signature].call,
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

  signatures = {signature: tf_signature(signature) for signature in exports}
  tf.saved_model.save(tf.Module(), str(directory), signatures=signatures)
