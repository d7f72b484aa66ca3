"""The two-task toy of the CAGrad, Nash-MTL and FAMO papers, solved with jheads.aggregation.

Two losses of two parameters `x = (x1, x2)` (CAGrad's `toy.py`, scale 1): in
the upper half-plane each is the log of a distance to a curve, so both have
a narrow singular valley; in the lower half-plane each is a quadratic bowl,
the two centred at `x1 = 7` and `x1 = -7`. The Pareto set is the curve
`x1 = 14 lam - 7`, `x2 = argmin tanh(-x2/2) (19.6 lam (1 - lam) +
0.01 (x2 + 8)^2 - 20)` for `lam` in [0, 1]: `x2` is -8.3551 at `x1 = 0`
and -8.4345 at `x1 = +-7` (the papers draw it as the line `x2 = -8.3552`).

From the papers' starting points, Adam (lr 1e-3) follows each method's
update: the `[T, 2]` Jacobian of the two losses goes through a
`jheads.aggregation` aggregator and the result is Adam's gradient. Equal
weighting (the mean gradient) falls into a singular valley from (-8.5, 7.5)
and (9, 9) and creeps along it (x2 still about 2 after 150k steps, ten
units above the front); MGDA, PCGrad, CAGrad and UPGrad leave it and reach
the Pareto set (UPGrad the slowest, after about 122k steps). Hence 150k
steps rather than CAGrad's 100k.

Prints, for each method and start, the end point, its distance to the
Pareto set and the first step within `TOLERANCE` of it; with `--out DIR`,
draws the trajectories over the contours of the mean loss to
`DIR/mtl_toy.png`.

    python examples/mtl_toy.py [--steps 150000] [--out DIR]
"""

from __future__ import annotations

import argparse
import functools
import pathlib
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jheads import aggregation

LOWER = 5e-6  # toy.py's clamp of the log terms' arguments
INITS = ((-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0))  # CAGrad's starting points
STEPS = 150_000
LEARNING_RATE = 1e-3
RECORD_EVERY = 100
TOLERANCE = 0.05  # distance to the Pareto set that counts as reaching it


def toy_losses(x: jax.Array) -> jax.Array:
  """The `[2]` losses at `x = (x1, x2)` (CAGrad's `toy.py`, `Toy.forward`)."""
  x1, x2 = x[0], x[1]
  f1 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 - 7) - jnp.tanh(-x2)), LOWER)) + 6
  f2 = jnp.log(jnp.maximum(jnp.abs(0.5 * (-x1 + 3) + jnp.tanh(-x2) + 2), LOWER)) + 6
  c1 = jnp.maximum(jnp.tanh(x2 * 0.5), 0)
  f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
  c2 = jnp.maximum(jnp.tanh(-x2 * 0.5), 0)
  return jnp.stack([c1 * f1 + c2 * f1_sq, c1 * f2 + c2 * f2_sq])


def pareto_set(n: int = 14_001) -> np.ndarray:
  """`[n, 2]` points of the Pareto set, `x1` from -7 to 7 (float64 Newton on the x2 condition).

  Below `x2 = 0` the losses are `tanh(-x2/2) f_i_sq`; the minimiser of
  `lam L1 + (1 - lam) L2` has `x1 = 14 lam - 7`, and `x2` minimises
  `h(x2) = tanh(-x2/2) (19.6 lam (1 - lam) + 0.01 (x2 + 8)^2 - 20)`.
  """
  lam = np.linspace(0.0, 1.0, n)
  a = 19.6 * lam * (1 - lam)
  x2 = np.full(n, -8.4)
  for _ in range(30):
    t = np.tanh(-x2 / 2)
    dt = -0.5 * (1 - t * t)
    q, dq = a + 0.01 * (x2 + 8) ** 2 - 20, 0.02 * (x2 + 8)
    dh, d2h = dt * q + t * dq, t * dt * q + 2 * dt * dq + 0.02 * t
    x2 = x2 - dh / d2h
  return np.stack([14 * lam - 7, x2], axis=1)


def distance_to_pareto_set(points: np.ndarray, front: np.ndarray | None = None) -> np.ndarray:
  """Euclidean distance of `[..., 2]` points to the Pareto set."""
  front = pareto_set() if front is None else front
  points = np.asarray(points, np.float64)
  flat = points.reshape(-1, 2)
  distances = np.concatenate([  # in chunks: [chunk, n_front] at a time
      np.linalg.norm(chunk[:, None, :] - front, axis=-1).min(axis=1)
      for chunk in np.array_split(flat, max(1, len(flat) // 256))
  ])
  return distances.reshape(points.shape[:-1])


# The compared methods, with the papers' settings (CAGrad's c = 0.5, as in toy.py).
METHODS = {
    "equal weighting": lambda: aggregation.mean(),  # toy.py's mean_grad; Adam ignores scale
    "MGDA": lambda: aggregation.mgda(),
    "PCGrad": lambda: aggregation.pcgrad(key=jax.random.key(0)),  # T = 2: no order to draw
    "CAGrad": lambda: aggregation.cagrad(c=0.5),
    "UPGrad": lambda: aggregation.upgrad(),
}


def trajectories(
    name: str,
    inits: np.ndarray,
    *,
    steps: int = STEPS,
    learning_rate: float = LEARNING_RATE,
    record_every: int = RECORD_EVERY,
) -> np.ndarray:
  """Adam on method `name`'s update from each start: `[n_inits, steps // record_every + 1, 2]`."""
  program = _program(name, steps, learning_rate, record_every)
  return np.asarray(program(jnp.asarray(inits, jnp.float32)))


@functools.cache
def _program(name: str, steps: int, learning_rate: float, record_every: int):
  """One jitted program for all starts (vmapped) and steps (scanned), compiled once per setting."""
  aggregator = METHODS[name]()
  optimizer = optax.adam(learning_rate)

  def one(x0):
    def step(carry, _):
      x, state, opt_state = carry
      jacobian = jax.jacrev(toy_losses)(x)  # [T, 2]: one row per loss
      update, state = aggregator.update(jacobian, state)
      updates, opt_state = optimizer.update(update, opt_state, x)
      return (optax.apply_updates(x, updates), state, opt_state), None

    def record(carry, _):
      carry, _ = jax.lax.scan(step, carry, length=record_every)
      return carry, carry[0]

    carry = (x0, aggregator.init(2), optimizer.init(x0))
    _, path = jax.lax.scan(record, carry, length=steps // record_every)
    return jnp.concatenate([x0[None], path])

  return jax.jit(jax.vmap(one))


class Result(NamedTuple):
  """One method's runs, per start.

  Attributes:
    path: `[n_inits, n_records, 2]` the recorded points (every `record_every` steps).
    final: `[n_inits, 2]` the end points.
    losses: `[n_inits, 2]` the losses at the end points.
    distance: `[n_inits]` the end points' distances to the Pareto set.
    reached_at: per start, the first recorded step within `tolerance` of
      the Pareto set, or None.
  """

  path: np.ndarray
  final: np.ndarray
  losses: np.ndarray
  distance: np.ndarray
  reached_at: list[int | None]


def run_toy(
    names: list[str] | None = None,
    inits=INITS,
    *,
    steps: int = STEPS,
    record_every: int = RECORD_EVERY,
    tolerance: float = TOLERANCE,
) -> dict[str, Result]:
  """Runs the named methods (default all) from `inits`; see `Result`."""
  front, coarse = pareto_set(), pareto_set(1401)  # x1 spacing 1e-3 and 1e-2
  inits = np.asarray(inits, np.float32)
  results = {}
  for name in METHODS:
    if names is not None and name not in names:
      continue
    path = trajectories(name, inits, steps=steps, record_every=record_every)
    distances = distance_to_pareto_set(path, coarse)  # within 5e-3 of the exact distance
    reached = [
        int(np.argmax(d < tolerance)) * record_every if np.any(d < tolerance) else None
        for d in distances
    ]
    final = path[:, -1]
    results[name] = Result(
        path=path,
        final=final,
        losses=np.asarray(jax.vmap(toy_losses)(jnp.asarray(final))),
        distance=distance_to_pareto_set(final, front),
        reached_at=reached,
    )
  return results


def plot(results: dict[str, Result], inits, path: pathlib.Path) -> None:
  """Trajectories over the contours of the mean loss, one panel per method."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  grid = np.linspace(-11, 11, 300)
  xx, yy = np.meshgrid(grid, grid)
  points = jnp.asarray(np.stack([xx.ravel(), yy.ravel()], 1), jnp.float32)
  mean_loss = np.asarray(jax.vmap(toy_losses)(points)).mean(1).reshape(xx.shape)
  front = pareto_set(201)
  fig, axes = plt.subplots(1, len(results), figsize=(3.6 * len(results), 3.8), sharey=True)
  for ax, (name, result) in zip(np.atleast_1d(axes), results.items()):
    ax.contour(xx, yy, mean_loss, levels=20, cmap="viridis", linewidths=0.8)
    ax.plot(front[:, 0], front[:, 1], color="gray", linewidth=5, alpha=0.6, zorder=1)
    for run in result.path:
      ax.plot(run[:, 0], run[:, 1], color="tab:red", linewidth=1.5, zorder=3)
      ax.plot(*run[-1], marker="*", color="tab:red", markersize=9, zorder=4)
    for x0 in inits:
      ax.plot(*x0, marker="o", color="k", markersize=6, zorder=5)
    reached = sum(r is not None for r in result.reached_at)
    ax.set_title(f"{name}: {reached}/{len(result.reached_at)} reach the front", fontsize=10)
    ax.set_xlim(-11, 11)
    ax.set_ylim(-11, 11)
    ax.set_aspect("equal")
  fig.suptitle("Mean loss contours, Pareto set (gray), starts (black), Adam lr 1e-3")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv: list[str] | None = None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=STEPS)
  parser.add_argument("--out", type=pathlib.Path, help="write DIR/mtl_toy.png")
  args = parser.parse_args(argv)

  start = time.perf_counter()
  results = run_toy(steps=args.steps)
  wall = time.perf_counter() - start
  print(f"{args.steps} Adam steps (lr {LEARNING_RATE}) from {len(INITS)} starts; "
        f"reached = within {TOLERANCE} of the Pareto set")
  print(f"{'method':16s} {'start':>13s} {'end':>17s} {'L1':>8s} {'L2':>8s} "
        f"{'distance':>9s}  reached")
  for name, result in results.items():
    for x0, end, losses, distance, reached in zip(
        INITS, result.final, result.losses, result.distance, result.reached_at
    ):
      verdict = f"yes, at step {reached}" if reached is not None else "no"
      print(f"{name:16s} {f'({x0[0]:g}, {x0[1]:g})':>13s} "
            f"{f'({end[0]:.3f}, {end[1]:.3f})':>17s} {losses[0]:8.3f} {losses[1]:8.3f} "
            f"{distance:9.4f}  {verdict}")
  print(f"wall time {wall:.1f} s")
  if args.out is not None:
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, INITS, args.out / "mtl_toy.png")
    print(f"wrote {args.out / 'mtl_toy.png'}")


if __name__ == "__main__":
  main()
