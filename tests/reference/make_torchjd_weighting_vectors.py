"""Writes tests/data/torchjd_weighting.json: torchjd 0.18's scalarizers, step by step.

For seeds 0-2 and T in {1, 2, 3, 5}, sequences of losses go through torchjd's
`torchjd.scalarization` (Sum, Mean, Constant, UW with its optimizer, DWA over
epochs, GeometricMean, STCH, FAMO over updates) in float64, and the file
records each step's objective and head weights (d objective / d losses), and
the learned parameters after each update. Inputs are float32-representable, so
that jheads' float32 run sees exactly the losses torchjd saw. `tests/test_weighting.py` checks
`jheads.weighting` against it without torch.

Run it in a separate venv, never jheads' own:

  python3 -m venv /work/venv-torchjd
  /work/venv-torchjd/bin/pip install torch==2.13.0 'torchjd==0.18.*' numpy
  /work/venv-torchjd/bin/python tests/reference/make_torchjd_weighting_vectors.py

torch is imported inside `main`, so pytest's doctest collection can import
this file without it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import pathlib

import numpy as np

SEEDS = (0, 1, 2)
N_HEADS = (1, 2, 3, 5)
N_STEPS = 8
DWA_STEPS_PER_EPOCH = 3
DWA_EPOCHS = 5
OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "torchjd_weighting.json"


def _floats(values) -> list[float | None]:
  """A flat list of floats, NaN as None (JSON has no NaN)."""
  return [None if math.isnan(v) else float(v) for v in np.asarray(values, np.float64).ravel()]


def _f32(values) -> np.ndarray:
  """Float32-representable float64 values: jheads' float32 run then sees the exact inputs."""
  return np.asarray(values, np.float64).astype(np.float32).astype(np.float64)


def _positive_losses(rng: np.random.RandomState, n_steps: int, n_heads: int):
  # Log-normal, and drifting down as a training run's would.
  drift = np.linspace(0.0, -0.5, n_steps)[:, None]
  return _f32(np.exp(rng.normal(0.0, 1.0, (n_steps, n_heads)) * 0.7 + drift))


def main() -> None:
  import torch
  from torchjd import scalarization as sc

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  args = parser.parse_args()

  torch.set_default_dtype(torch.float64)

  def evaluate(scalarizer, losses):
    values = torch.tensor(losses, dtype=torch.float64, requires_grad=True)
    objective = scalarizer(values)
    (weights,) = torch.autograd.grad(objective, values)
    return float(objective.detach()), _floats(weights)

  def stateless(scalarizer, losses_seq):
    steps = []
    for losses in losses_seq:
      value, weights = evaluate(scalarizer, losses)
      steps.append({"losses": _floats(losses), "value": value, "weights": weights})
    return steps

  def uw_steps(n_heads, losses_seq, init_log_var, optimizer_spec):
    uw = sc.UW(n_heads)
    with torch.no_grad():
      uw.log_var.fill_(init_log_var)
    if optimizer_spec["name"] == "adam":
      opt = torch.optim.Adam(uw.parameters(), lr=optimizer_spec["lr"])
    else:
      opt = torch.optim.SGD(uw.parameters(), lr=optimizer_spec["lr"])
    steps = []
    for losses in losses_seq:
      values = torch.tensor(losses, requires_grad=True)
      objective = uw(values)
      opt.zero_grad()
      objective.backward()
      step = {"losses": _floats(losses), "value": float(objective.detach()),
              "weights": _floats(values.grad)}
      opt.step()
      step["log_var"] = _floats(uw.log_var.detach())
      steps.append(step)
    return steps

  def dwa_steps(losses_seq, temperature):
    dwa = sc.DWA(temperature=temperature)
    steps = []
    for epoch in range(DWA_EPOCHS):
      for b in range(DWA_STEPS_PER_EPOCH):
        losses = losses_seq[epoch * DWA_STEPS_PER_EPOCH + b]
        value, weights = evaluate(dwa, losses)
        steps.append({"losses": _floats(losses), "value": value, "weights": weights})
      dwa.step()
    return steps

  def famo_steps(n_heads, losses_seq, after_seq, min_losses, lr, weight_decay):
    kwargs = {} if min_losses is None else {"min_losses": torch.tensor(min_losses)}
    famo = sc.FAMO(n_heads, lr=lr, weight_decay=weight_decay, **kwargs)
    steps = []
    for losses, after in zip(losses_seq, after_seq):
      value, weights = evaluate(famo, losses)
      famo.update(torch.tensor(after))
      steps.append({"losses": _floats(losses), "losses_after": _floats(after), "value": value,
                    "weights": weights, "logits": _floats(famo._w.detach())})
    return steps

  cases = []

  def add(name, factory, kwargs, n_heads, seed, steps, **extra):
    cases.append({"name": name, "factory": factory, "kwargs": kwargs, "n_heads": n_heads,
                  "seed": seed, **extra, "steps": steps})

  for seed in SEEDS:
    for n_heads in N_HEADS:
      # Hyper-parameters depend on T only, so a test compiles one program for all seeds.
      hyper_rng = np.random.RandomState(n_heads)
      constant = _f32(hyper_rng.normal(0.5, 1.0, n_heads))
      pref = _f32(hyper_rng.dirichlet(np.ones(n_heads)))
      reference = _f32(0.1 * hyper_rng.uniform(size=n_heads))
      rng = np.random.RandomState(1000 * seed + n_heads)
      losses_seq = _positive_losses(rng, N_STEPS, n_heads)

      add("Sum", "equal", {}, n_heads, seed, stateless(sc.Sum(), losses_seq[:3]))
      add("Mean", "fixed", {"weights": _floats(np.full(n_heads, 1.0 / n_heads))}, n_heads, seed,
          stateless(sc.Mean(), losses_seq[:3]))
      add("Constant", "fixed", {"weights": _floats(constant)}, n_heads, seed,
          stateless(sc.Constant(torch.tensor(constant)), losses_seq[:3]))

      for init_log_var, spec in ((0.0, {"name": "adam", "lr": 0.025}),
                                 (-0.5, {"name": "adam", "lr": 0.025}),
                                 (0.0, {"name": "sgd", "lr": 0.1})):
        add("UW", "uncertainty", {"init_log_var": init_log_var}, n_heads, seed,
            uw_steps(n_heads, losses_seq, init_log_var, spec), optimizer=spec)

      dwa_losses = _positive_losses(rng, DWA_EPOCHS * DWA_STEPS_PER_EPOCH, n_heads)
      for temperature in (2.0, 0.5):
        add("DWA", "dwa", {"steps_per_epoch": DWA_STEPS_PER_EPOCH, "temperature": temperature},
            n_heads, seed, dwa_steps(dwa_losses, temperature))

      add("GeometricMean", "geometric", {}, n_heads, seed,
          stateless(sc.GeometricMean(), losses_seq))

      for mu in (1.0, 0.1, 0.01):
        add("STCH", "stch", {"mu": mu}, n_heads, seed,
            stateless(sc.STCH(mu), losses_seq))
        add("STCH", "stch",
            {"mu": mu, "pref_vector": _floats(pref), "reference": _floats(reference)},
            n_heads, seed,
            stateless(sc.STCH(mu, torch.tensor(pref), torch.tensor(reference)), losses_seq))
      # Large losses and a small mu: the max-subtracted form must not overflow.
      add("STCH", "stch", {"mu": 0.01, "pref_vector": _floats(pref)}, n_heads, seed,
          stateless(sc.STCH(0.01, torch.tensor(pref)), _f32(1e4 * losses_seq[:3])))

      after_seq = _f32(losses_seq * np.exp(rng.normal(-0.1, 0.2, losses_seq.shape)))
      for lr, weight_decay in ((0.025, 1e-3), (0.1, 0.0), (0.025, 1e-2)):
        add("FAMO", "famo", {}, n_heads, seed,
            famo_steps(n_heads, losses_seq, after_seq, None, lr, weight_decay),
            optimizer={"name": "adam_l2", "lr": lr, "weight_decay": weight_decay})
      # Negative losses above a lower bound, as on the CAGrad toy (min_losses -21).
      min_losses = np.full(n_heads, -21.0)
      add("FAMO", "famo", {"min_losses": _floats(min_losses)}, n_heads, seed,
          famo_steps(n_heads, _f32(losses_seq - 21.0), _f32(after_seq - 21.0), min_losses, 0.025,
                     1e-3),
          optimizer={"name": "adam_l2", "lr": 0.025, "weight_decay": 1e-3})

  # Degenerate inputs: what torchjd returns (NaN recorded as null) or that it raises.
  degenerate = []
  for losses in ([0.0], [0.0, 2.0], [1.0, 0.0, 4.0], [0.0, 0.0]):
    value, weights = evaluate(sc.GeometricMean(), np.asarray(losses))
    degenerate.append({"name": "GeometricMean", "factory": "geometric", "losses": losses,
                       "value": value, "weights": weights})
  try:
    evaluate(sc.GeometricMean(), np.asarray([-1.0, 2.0]))
  except ValueError as error:
    degenerate.append({"name": "GeometricMean", "factory": "geometric", "losses": [-1.0, 2.0],
                       "raises": str(error)})
  else:
    raise AssertionError("torchjd's GeometricMean no longer raises on a negative loss")
  for losses in ([0.0, 0.0], [3.0, 3.0, 3.0]):  # equal losses: FAMO's logits get no gradient
    famo = sc.FAMO(len(losses))
    value, weights = evaluate(famo, np.asarray(losses) + 1.0)
    famo.update(torch.tensor(losses) + 0.5)
    degenerate.append({"name": "FAMO", "factory": "famo", "losses": _floats(np.add(losses, 1.0)),
                       "losses_after": _floats(np.add(losses, 0.5)), "value": value,
                       "weights": weights, "logits": _floats(famo._w.detach())})

  data = {
      "meta": {
          "generator": "tests/reference/make_torchjd_weighting_vectors.py",
          "torch": torch.__version__,
          "torchjd": importlib.metadata.version("torchjd"),
          "dtype": "float64",
          "dwa_steps_per_epoch": DWA_STEPS_PER_EPOCH,
          "optimizers": {
              "adam": "torch.optim.Adam(lr) = optax.adam(lr)",
              "sgd": "torch.optim.SGD(lr) = optax.sgd(lr)",
              "adam_l2": "torch.optim.Adam(lr, weight_decay) = "
                         "optax.chain(optax.add_decayed_weights(weight_decay), optax.adam(lr))",
          },
      },
      "cases": cases,
      "degenerate": degenerate,
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  args.out.write_text(json.dumps(data, allow_nan=False, separators=(",", ":")) + "\n")
  print(f"wrote {len(cases)} cases, {sum(len(c['steps']) for c in cases)} steps, "
        f"{len(degenerate)} degenerate inputs to {args.out}")


if __name__ == "__main__":
  main()
