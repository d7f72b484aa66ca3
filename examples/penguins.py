"""Palmer penguins: one Flax NNX trunk, three heads, trained as one multi_head.

From a penguin's bill and flipper measurements and its island, predict

* its species (3 classes, string labels through a label vocabulary),
* its sex (binary, string labels; 9 penguins have no recorded sex: they get
  a zero example weight for this head and still train the other two),
* its body mass (regression on standardized grams).

Body mass is a target, so it is not an input; sex and species are targets
too, and using either as an input would leak what another head predicts.
Prints a per-head table of held-out metrics; with `--out DIR`, writes
`DIR/metrics.json` and `DIR/loss_curves.png`.

    python examples/penguins.py [--epochs 60] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import pathlib

import jax
import numpy as np
import optax
import palmerpenguins
from flax import nnx
from tqdm import tqdm

import jheads

MEASUREMENTS = ["bill_length_mm", "bill_depth_mm", "flipper_length_mm"]
ISLANDS = ["Biscoe", "Dream", "Torgersen"]
SPECIES = ["Adelie", "Chinstrap", "Gentoo"]
SEXES = ["female", "male"]
HELD_OUT = 0.2
BATCH_SIZE = 32
WIDTH = 32
LEARNING_RATE = 1e-2
EPOCHS = 60

HEAD = jheads.multi_head([
    jheads.multi_class_head(3, name="species", label_vocabulary=SPECIES),
    # Averaging over the known sexes only keeps the unknown ones from diluting
    # this head's loss.
    jheads.binary_classification_head(
        name="sex",
        label_vocabulary=SEXES,
        weight_column="sex_known",
        loss_reduction="sum_over_nonzero_weights",
    ),
    jheads.regression_head(name="body_mass"),
])
HEAD_NAMES = [head.name for head in HEAD.heads]


class Trunk(nnx.Module):
  """An MLP whose last layer holds the logits of every head."""

  def __init__(self, n_inputs: int, n_outputs: int, *, width: int, rngs: nnx.Rngs):
    self.hidden = nnx.Linear(n_inputs, width, rngs=rngs)
    self.hidden2 = nnx.Linear(width, width, rngs=rngs)
    self.logits = nnx.Linear(width, n_outputs, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = nnx.relu(self.hidden(x))
    x = nnx.relu(self.hidden2(x))
    return self.logits(x)


def load_data():
  """Train and held-out (features, labels), standardized with train statistics."""
  penguins = palmerpenguins.load_penguins()
  # Two penguins were never measured; the rest stay, sex or not.
  penguins = penguins.dropna(subset=MEASUREMENTS + ["body_mass_g"]).reset_index(drop=True)
  # A fixed, species-stratified split.
  held_out = penguins.groupby("species").sample(frac=HELD_OUT, random_state=0).index
  is_held_out = penguins.index.isin(held_out)
  train, held = penguins[~is_held_out], penguins[is_held_out]

  inputs_mean, inputs_std = train[MEASUREMENTS].mean(), train[MEASUREMENTS].std()
  mass_mean, mass_std = train.body_mass_g.mean(), train.body_mass_g.std()

  def arrays(frame):
    measurements = ((frame[MEASUREMENTS] - inputs_mean) / inputs_std).to_numpy()
    islands = (frame.island.to_numpy()[:, None] == np.array(ISLANDS)).astype(float)
    features = {
        "x": np.concatenate([measurements, islands], axis=1).astype(np.float32),
        "sex_known": frame.sex.notna().to_numpy(np.float32),
    }
    labels = jheads.encode_labels(HEAD, {
        "species": frame.species.to_numpy(str),
        # Any vocabulary entry will do where sex is unknown: its weight is 0.
        "sex": frame.sex.fillna(SEXES[0]).to_numpy(str),
        "body_mass": ((frame.body_mass_g - mass_mean) / mass_std).to_numpy(np.float32),
    })
    return features, labels

  return arrays(train), arrays(held), (mass_mean, mass_std)


def take(tree, index):
  return jax.tree.map(lambda x: x[index], tree)


def train_and_evaluate(train_data, held_out, *, epochs: int, seed: int = 0):
  """Trains the trunk; returns held-out metrics, loss curves and predictions."""
  train_x, train_y = train_data
  model = Trunk(train_x["x"].shape[1], HEAD.logits_dim, width=WIDTH, rngs=nnx.Rngs(seed))
  # The functional form: the module's structure stays outside jit, its
  # parameters go through the train step as a pytree.
  graphdef, params = nnx.split(model, nnx.Param)

  def apply_fn(params, features):
    return nnx.merge(graphdef, params)(features["x"])

  optimizer = optax.adam(LEARNING_RATE)
  opt_state = optimizer.init(params)
  train_step = jax.jit(
      jheads.training.make_train_step(HEAD, apply_fn, optimizer), donate_argnums=(0, 1)
  )
  eval_step = jax.jit(jheads.training.make_eval_step(HEAD, apply_fn))
  compute = jax.jit(jheads.metrics.compute)

  rng = np.random.default_rng(seed)
  n_train = len(train_x["x"])
  # Every batch has the same shape, so the train step compiles once; the few
  # examples left over change with every shuffle.
  n_batches = n_train // BATCH_SIZE
  curves = {split: {name: [] for name in HEAD_NAMES} for split in ("train", "held out")}
  progress = tqdm(range(epochs), desc="training", unit="epoch")
  for _ in progress:
    order = rng.permutation(n_train)
    epoch_losses = []
    for b in range(n_batches):
      index = order[b * BATCH_SIZE : (b + 1) * BATCH_SIZE]
      params, opt_state, out = train_step(
          params, opt_state, take(train_x, index), take(train_y, index)
      )
      epoch_losses.append(out.head_losses)
    # An epoch's train loss is the mean of its steps' losses, as TF logs it.
    train_losses = jax.device_get(jax.tree.map(lambda *x: np.mean(np.stack(x), axis=0), *epoch_losses))
    metrics = jax.device_get(compute(eval_step(params, *held_out)))
    for name in HEAD_NAMES:
      curves["train"][name].append(float(train_losses[name]))
      curves["held out"][name].append(float(metrics[f"loss/{name}"]))
    progress.set_postfix({name: f"{train_losses[name]:.3f}" for name in HEAD_NAMES})

  predict_step = jax.jit(jheads.training.make_predict_step(HEAD, apply_fn))
  predictions = jheads.decode_predictions(HEAD, predict_step(params, held_out[0]))
  return {key: float(value) for key, value in metrics.items()}, curves, predictions


def metrics_table(metrics: dict[str, float]) -> str:
  """A metric-by-head table of `<metric>/<head>` values."""
  by_metric: dict[str, dict[str, float]] = {}
  for key, value in metrics.items():
    metric, head = key.rsplit("/", 1)
    by_metric.setdefault(metric, {})[head] = value
  width = max(len(metric) for metric in by_metric)
  lines = [f"{'metric':<{width}}" + "".join(f"{name:>12}" for name in HEAD_NAMES)]
  for metric in sorted(by_metric):
    cells = (by_metric[metric].get(name) for name in HEAD_NAMES)
    lines.append(
        f"{metric:<{width}}"
        + "".join(f"{'':>12}" if v is None else f"{v:>12.4f}" for v in cells)
    )
  return "\n".join(lines)


def examples_table(predictions, held_out, mass_scale, n: int = 6) -> str:
  """A few held-out penguins, spread over the species: predicted | true."""
  _, labels = held_out
  mass_mean, mass_std = mass_scale
  rows = [("species", "sex", "body mass (g)")]
  for i in np.linspace(0, len(labels["species"]) - 1, n).astype(int):
    true_sex = SEXES[labels["sex"][i]] if held_out[0]["sex_known"][i] else "?"
    mass = predictions[("body_mass", "predictions")][i, 0] * mass_std + mass_mean
    true_mass = labels["body_mass"][i] * mass_std + mass_mean
    rows.append((
        f"{predictions[('species', 'classes')][i, 0]:<9} | {SPECIES[labels['species'][i]]}",
        f"{predictions[('sex', 'classes')][i, 0]:<6} | {true_sex}",
        f"{mass:>5.0f} | {true_mass:.0f}",
    ))
  return "\n".join(f"{a:<22}{b:<18}{c}" for a, b, c in rows)


def plot_curves(curves, path: pathlib.Path) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(HEAD_NAMES), figsize=(4 * len(HEAD_NAMES), 3.2))
  for ax, name in zip(axes, HEAD_NAMES):
    epochs = np.arange(1, len(curves["train"][name]) + 1)
    for split, losses in curves.items():
      ax.plot(epochs, losses[name], label=split)
    ax.set_title(name)
    ax.set_xlabel("epoch")
    ax.set_yscale("log")
  axes[0].set_ylabel("loss")
  axes[0].legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--epochs", type=int, default=EPOCHS)
  parser.add_argument(
      "--out", type=pathlib.Path, help="write metrics.json and loss_curves.png here"
  )
  args = parser.parse_args()

  train_data, held_out, mass_scale = load_data()
  n_train, n_held_out = len(train_data[0]["x"]), len(held_out[0]["x"])
  n_unknown_sex = sum(int(np.sum(x["sex_known"] == 0)) for x, _ in (train_data, held_out))
  print(
      f"{n_train + n_held_out} measured penguins ({n_unknown_sex} of unknown sex):"
      f" {n_train} to train on, {n_held_out} held out."
  )
  metrics, curves, predictions = train_and_evaluate(train_data, held_out, epochs=args.epochs)
  print(f"\nHeld-out metrics:\n{metrics_table(metrics)}")
  print("\nSome held-out penguins, predicted | true:")
  print(examples_table(predictions, held_out, mass_scale))
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    plot_curves(curves, args.out / "loss_curves.png")
    print(f"\nWrote {args.out / 'metrics.json'} and {args.out / 'loss_curves.png'}.")


if __name__ == "__main__":
  main()
