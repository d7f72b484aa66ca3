"""The `[T, T]` solves of jheads.aggregation: time and accuracy (issue 11.2).

    python -m benchmarks.aggregation_solvers [--heads 2 10 40] [--rounds 7] [--json PATH]

For each number of heads T, a Gaussian Jacobian with P = 700 columns (at
T = 40 its Gramian has condition about 2.6, the issue's case) and, harder, one
with singular values down to 1e-1 (condition 1e2 x more) give Gramians; every
Gramian method's jitted `weights` is timed on them (first call excluded),
in float32, and in float64 under `jax.enable_x64`. Contenders run
interleaved, each round in turn, and a time is the median over rounds of the
per-round median, which cancels load that drifts between rounds. Reported
per method: ms per solve (wall and process CPU time, which counts the
threads of XLA's pool and is less sensitive to other processes on a shared
machine), and the float32 weights' largest deviation from the float64 ones
(the exact solution of the same problem, to 1e-13).

With `quadprog` importable (it is in a torchjd venv, not in jheads'), also
times torchjd's way of solving UPGrad: T calls of `quadprog.solve_qp` on the
normalised Gramian, in the same rounds, and reports the ratio.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import jheads.aggregation as aggregation

METHODS = {
    "upgrad": lambda: aggregation.upgrad(),
    "dualproj": lambda: aggregation.dualproj(),
    "mgda": lambda: aggregation.mgda(),
    "cagrad": lambda: aggregation.cagrad(),
    "nash_mtl": lambda: aggregation.nash_mtl(),
    "imtl_g": lambda: aggregation.imtl_g(),
    "aligned_mtl": lambda: aggregation.aligned_mtl(),
    "config": lambda: aggregation.config(),
    "pcgrad": lambda: aggregation.pcgrad(key=jax.random.key(0)),
}


def gramians(t, seed=0):
  rng = np.random.default_rng(seed)
  p = 700
  well = rng.normal(size=(t, p)) / np.sqrt(p)
  u, _, vt = np.linalg.svd(rng.normal(size=(t, p)), full_matrices=False)
  ill = (u * np.logspace(0, -1, t)) @ vt
  return {"well": well @ well.T, "ill": ill @ ill.T}


def _timed(fn, arg, steps):
  wall, cpu = [], []
  for _ in range(steps):
    w0, c0 = time.perf_counter(), time.process_time()
    jax.block_until_ready(fn(arg))
    wall.append(time.perf_counter() - w0)
    cpu.append(time.process_time() - c0)
  return statistics.median(wall), statistics.median(cpu)


def quadprog_upgrad(gram):
  import quadprog  # noqa: PLC0415 - optional, outside jheads' dependencies

  t = gram.shape[0]
  gh = gram / np.trace(gram) + 1e-4 * np.eye(t)
  total = np.zeros(t)
  for i in range(t):
    u = np.zeros(t)
    u[i] = 1 / t
    total += quadprog.solve_qp(gh, np.zeros(t), np.eye(t), u)[0]
  return total


def bench(heads, rounds, steps, methods):
  have_quadprog = importlib.util.find_spec("quadprog") is not None
  rows = []
  for t in heads:
    for kind, gram in gramians(t).items():
      cond = float(np.linalg.cond(gram))
      contenders = {}
      exact = {}
      for name in methods:
        a = METHODS[name]()
        state = a.init(t)
        with jax.enable_x64(True):
          f64 = jax.jit(lambda g, a=a, s=state: a.weights(g, s)[0])
          g64 = jnp.asarray(gram, jnp.float64)
          exact[name] = np.asarray(f64(g64))
          contenders[(name, "float64")] = (f64, g64)
        f32 = jax.jit(lambda g, a=a, s=state: a.weights(g, s)[0])
        g32 = jnp.asarray(gram, jnp.float32)
        contenders[(name, "float32")] = (f32, g32)
      if have_quadprog:
        contenders[("quadprog_upgrad", "float64")] = (quadprog_upgrad, gram)
      dev = {}
      for (name, dtype), (fn, arg) in contenders.items():
        with jax.enable_x64(dtype == "float64"):
          out = np.asarray(fn(arg), np.float64)  # compile, and the accuracy
        if dtype == "float32":
          dev[name] = float(np.max(np.abs(out - exact[name])))
        if name == "quadprog_upgrad":
          dev[name] = float(np.max(np.abs(out - exact["upgrad"]))) if "upgrad" in exact else None
      times = {key: [] for key in contenders}
      keys = list(contenders)
      for r in range(rounds):
        for key in keys if r % 2 == 0 else keys[::-1]:
          fn, arg = contenders[key]
          with jax.enable_x64(key[1] == "float64"):
            times[key].append(_timed(fn, arg, steps))
      for key in keys:
        wall = statistics.median(x[0] for x in times[key]) * 1e3
        cpu = statistics.median(x[1] for x in times[key]) * 1e3
        row = {
            "T": t, "gramian": kind, "condition": cond, "method": key[0], "dtype": key[1],
            "wall_ms": wall, "cpu_ms": cpu,
        }
        if key[0] in dev and (key[1] == "float32" or key[0] == "quadprog_upgrad"):
          row["max_dev_from_float64"] = dev[key[0]]
        rows.append(row)
        extra = f"  |w32 - w64| = {row['max_dev_from_float64']:.1e}" if "max_dev_from_float64" in row else ""
        print(
            f"T={t:>2} {kind:4} cond={cond:8.3g} {key[0]:>15} {key[1]}: "
            f"{wall:7.3f} ms wall {cpu:7.3f} ms cpu{extra}",
            flush=True,
        )
  return rows


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, nargs="+", default=[2, 10, 40])
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--steps", type=int, default=20, help="timed calls per contender per round")
  parser.add_argument("--json", type=str, default=None)
  args = parser.parse_args(argv)
  load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}, {os.cpu_count()} cpus, load {load}")
  rows = bench(args.heads, args.rounds, args.steps, args.methods)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"load_average": load, "rows": rows}, f, indent=1)


if __name__ == "__main__":
  main()
