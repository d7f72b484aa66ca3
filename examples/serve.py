"""Serving: train a three-head penguins model, export it, serve it from a fresh process.

A small MLP in plain JAX reads four inputs (three measurements and the
island) and feeds a multi_head: `species` (3 classes), `sex` (binary, with
class names) and `body_mass` (regression, in kg). After a few hundred Adam
steps the model is exported with `jheads.export.save`, and a separate Python
process, which imports only jax, numpy and `jheads.export` (not this file),
loads the artifact and prints its predictions with class names. `load`
checks the artifact first (every module's SHA-256, its paths, shapes and
dtypes), and pads each request to a batch bucket, so requests of new sizes
reuse the programs already compiled.

    python examples/serve.py [--out DIR]

With `--out` the artifact is kept in DIR (which must be empty or absent).
"""

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
import palmerpenguins

import jheads
import jheads.export

SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
SEXES = ["female", "male"]
ISLANDS = ["Biscoe", "Dream", "Torgersen"]
MEASUREMENTS = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]

# The serving process: it sees the artifact's directory and a JSON request,
# never this file's model code.
LOADER = """
import json, sys
import numpy as np
import jheads.export

signatures = jheads.export.load(sys.argv[1], batch_buckets=(1, 16, 128))
request = json.load(sys.stdin)
print("served signatures:", ", ".join(sorted(signatures)))
out = signatures["predict"](request["features"])
# Requests of 1 to 128 rows: each runs padded to a bucket compiled once.
for n in (1, 5, 9, 16, 40, 128):
  part = signatures["predict"]({k: v[:n] for k, v in request["features"].items()})
  assert all(np.array_equal(part[k], out[k][:n]) for k in ("species/classes", "sex/classes"))
print("predict compiled batch sizes:", list(signatures["predict"].compiled_batch_sizes))
truth = request["truth"]
print(f"{'species':>9s} {'p':>5s} {'sex':>6s} {'p':>5s} {'mass kg':>7s}   true")
for i in range(min(8, len(truth["species"]))):
  species_p = out["species/probabilities"][i].max()
  sex_p = out["sex/probabilities"][i].max()
  print(f"{out['species/classes'][i, 0]:>9s} {species_p:5.2f} {out['sex/classes'][i, 0]:>6s}"
        f" {sex_p:5.2f} {out['body_mass/predictions'][i, 0]:7.2f}   {truth['species'][i]},"
        f" {truth['sex'][i]}, {truth['body_mass'][i]:.2f}")
default = signatures["serving_default"](request["features"])
print("serving_default outputs:", sorted(default), "classes:", default["classes"][0].tolist())
species_accuracy = np.mean(out["species/classes"][:, 0] == np.asarray(truth["species"]))
sex_accuracy = np.mean(out["sex/classes"][:, 0] == np.asarray(truth["sex"]))
print(f"served accuracy/species {species_accuracy:.4f}")
print(f"served accuracy/sex {sex_accuracy:.4f}")
"""


def load_data(rng: np.random.Generator):
  """Penguins with every field known, shuffled and split 80/20."""
  frame = palmerpenguins.load_penguins().dropna(
      subset=MEASUREMENTS + ["body_mass_g", "sex"]
  )
  frame = frame.iloc[rng.permutation(len(frame))]
  features = {name: frame[name].to_numpy(np.float32) for name in MEASUREMENTS}
  features["island"] = np.searchsorted(ISLANDS, frame["island"].to_numpy()).astype(np.int32)
  labels = {
      "species": frame["species"].to_numpy(str),
      "sex": frame["sex"].to_numpy(str),
      "body_mass": (frame["body_mass_g"].to_numpy(np.float32) / 1000.0),
  }
  n_train = int(0.8 * len(frame))

  def split(part):
    return [{k: v[part] for k, v in d.items()} for d in (features, labels)]

  return split(slice(None, n_train)), split(slice(n_train, None))


def init_params(key, sizes):
  params = []
  for k, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes, sizes[1:])):
    params.append((jax.random.normal(k, (fan_in, fan_out)) * fan_in**-0.5, jnp.zeros(fan_out)))
  return params


def predict_logits(params, normalizer, features):
  """`features` (a dict of [batch] arrays) -> logits; the exported model."""
  mean, std = normalizer
  measurements = jnp.stack([features[name] for name in MEASUREMENTS], axis=-1)
  x = jnp.concatenate(
      [(measurements - mean) / std, jax.nn.one_hot(features["island"], len(ISLANDS))],
      axis=-1,
  )
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", help="where to keep the artifact (default: a temporary directory)")
  parser.add_argument("--steps", type=int, default=400)
  args = parser.parse_args()

  head = jheads.multi_head([
      jheads.multi_class_head(3, name="species", label_vocabulary=SPECIES),
      jheads.binary_classification_head(name="sex", label_vocabulary=SEXES),
      jheads.regression_head(name="body_mass"),
  ])
  rng = np.random.default_rng(0)
  (train_x, train_y), (test_x, test_y) = load_data(rng)
  train_ids, test_ids = jheads.encode_labels(head, train_y), jheads.encode_labels(head, test_y)

  measurements = np.stack([train_x[name] for name in MEASUREMENTS], axis=-1)
  normalizer = (measurements.mean(0), measurements.std(0))
  params = init_params(jax.random.key(0), [len(MEASUREMENTS) + len(ISLANDS), 32, head.logits_dim])
  optimizer = optax.adam(1e-2)
  opt_state = optimizer.init(params)

  @jax.jit
  def train_step(params, opt_state, features, labels):
    def loss(p):
      return head.loss_fn(predict_logits(p, normalizer, features), labels)

    value, grads = jax.value_and_grad(loss)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, value

  for _ in range(args.steps):
    params, opt_state, loss = train_step(params, opt_state, train_x, train_ids)
  print(f"trained {args.steps} steps, final loss {float(loss):.4f}")

  model = functools.partial(predict_logits, params, normalizer)
  stats = head.metric_fn(jax.jit(model)(test_x), test_ids)
  metrics = jheads.metrics.compute(stats)
  for key in ("accuracy/species", "accuracy/sex", "average_loss/body_mass"):
    print(f"in-process {key} {float(metrics[key]):.4f}")

  with tempfile.TemporaryDirectory() as scratch:
    directory = args.out or os.path.join(scratch, "penguins")
    example = {name: value[:1] for name, value in train_x.items()}
    jheads.export.save(directory, head, model, example)
    print(f"exported to {directory}: {', '.join(sorted(os.listdir(directory)))}")

    request = {
        "features": {name: value.tolist() for name, value in test_x.items()},
        "truth": {name: value.tolist() for name, value in test_y.items()},
    }
    served = subprocess.run(
        [sys.executable, "-c", LOADER, directory],
        input=json.dumps(request),
        capture_output=True,
        text=True,
    )
    print(served.stdout, end="")
    if served.returncode:
      sys.exit(f"the serving process failed:\n{served.stderr}")


if __name__ == "__main__":
  main()
