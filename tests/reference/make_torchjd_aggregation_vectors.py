"""Writes tests/data/torchjd_aggregation.json: torchjd 0.18's aggregators on many Jacobians.

Random Jacobians `J` (`T` in 1..10 and 40 heads, `P` from 1 to 50 columns:
well-conditioned Gaussian, ill-conditioned with singular values down to
10^-1.5 and (`very_ill_`) 1e-3, head norms 1e2 and (`wide_scaled_`) 1e4
apart, correlated heads sharing a component, `P < T`) and the degenerate cases of the design's table (one head, a zero
row, all zeros, opposing and duplicate rows, tiny rows, three heads at 120
degrees) go through torchjd's aggregators in float64. The entries of `J` are
float32 numbers, so that a float32 run of jheads sees exactly the same input.

For each case the file records the update of `Mean`, `Sum`, `UPGrad`,
`DualProj`, `MGDA`, `PCGrad`, `CAGrad(c=0.5)`, `IMTLG`, `AlignedMTL` (three
scale modes), `NashMTL` (a fresh instance, one call; null where it raises),
`ConFIG` and `GradDrop`, the weights of the Gramian-based ones, and, with a
preference vector, UPGrad, DualProj, AlignedMTL and ConFIG. The random ones
are reproduced: PCGrad's `torch.randperm` orders and GradDrop's
`torch.rand` uniforms are replayed from the same seed and stored, and
checked against torchjd's output.

Where torchjd's solver stops short of the solution, the file also records
the exact one, computed here independently in float64:

* `exact/mgda`: the min-norm point of the hull, by quadprog on the simplex
  (with a 1e-12 relative ridge: unique weights when `G` is singular);
* `exact/nash`: `alpha_i (G alpha)_i = 1` by damped Newton with a line search
  in numpy (null when it has no solution: Pareto-stationary heads), then
  torchjd's clipping to norm 1;
* `exact/cagrad`: CAGrad's inner problem by cvxpy's Clarabel at 1e-13
  tolerances, then solved exactly on Clarabel's support (its KKT
  conditions are linear there given `|g_w|`); torchjd's default tolerances
  stop about 1e-4 short.

`tests/test_aggregation.py` checks `jheads.aggregation` against this file
without torch. Run it in a separate venv, never jheads' own:

  python3 -m venv /work/venv-torchjd-agg
  /work/venv-torchjd-agg/bin/pip install torch==2.13.0 'torchjd[full]==0.18.*'
  /work/venv-torchjd-agg/bin/python tests/reference/make_torchjd_aggregation_vectors.py

torch is imported inside `main`, so pytest's doctest collection can import
this file without it.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import pathlib
import warnings

import numpy as np

OUT = pathlib.Path(__file__).resolve().parents[1] / "data" / "torchjd_aggregation.json"


def f32(a):
  """The float32 number nearest to each entry, as float64."""
  return np.asarray(a, np.float64).astype(np.float32).astype(np.float64)


def random_cases(rng):
  """(name, J) pairs: several kinds for every T in 1..10 and 40."""
  cases = []
  for t in list(range(1, 11)) + [40]:
    reps = 1
    for rep in range(reps):
      p_big = int(rng.integers(max(t, 2), 51))
      p_small = int(rng.integers(1, t)) if t > 1 else 1
      cases.append((f"gauss_T{t}_P{p_big}_{rep}", rng.normal(size=(t, p_big))))
      if t > 1:
        cases.append((f"few_columns_T{t}_P{p_small}_{rep}", rng.normal(size=(t, p_small))))
      u, _, vt = np.linalg.svd(rng.normal(size=(t, p_big)), full_matrices=False)
      k = min(t, p_big)
      # Singular values down to 10^-1.5 (Gramian condition 1e3), and to 1e-3
      # (1e6, past what a float32 Gramian resolves: float64 checks only).
      cases.append((f"ill_T{t}_P{p_big}_{rep}", (u[:, :k] * np.logspace(0, -1.5, k)) @ vt[:k]))
      cases.append((f"very_ill_T{t}_P{p_big}_{rep}", (u[:, :k] * np.logspace(0, -3, k)) @ vt[:k]))
      # Head norms 1e2 apart, and 1e4 apart (float64 checks only).
      scales = np.exp(rng.uniform(np.log(1e-1), np.log(1e1), size=(t, 1)))
      cases.append((f"scaled_T{t}_P{p_big}_{rep}", scales * rng.normal(size=(t, p_big))))
      scales = np.exp(rng.uniform(np.log(1e-2), np.log(1e2), size=(t, 1)))
      cases.append((f"wide_scaled_T{t}_P{p_big}_{rep}", scales * rng.normal(size=(t, p_big))))
      shared = rng.normal(size=(1, p_big))
      cases.append((f"correlated_T{t}_P{p_big}_{rep}", shared + 0.5 * rng.normal(size=(t, p_big))))
  return cases


def degenerate_cases(rng):
  g = rng.normal(size=5)
  h = rng.normal(size=5)
  angles = np.deg2rad([90.0, 210.0, 330.0])
  return [
      ("one_head", g[None]),
      ("zero_row", np.stack([g, np.zeros(5)])),
      ("zero_first_row", np.stack([np.zeros(5), g, h])),
      ("all_zeros", np.zeros((2, 5))),
      ("all_zeros_T4", np.zeros((4, 3))),
      ("opposing", np.stack([g, -g])),
      ("opposing_2x", np.stack([g, -2 * g])),
      ("duplicate", np.stack([g, g])),
      ("duplicate_T3", np.stack([g, h, g])),
      ("fewer_columns_T6_P2", rng.normal(size=(6, 2))),
      ("one_column_T3", rng.normal(size=(3, 1))),
      ("tiny_rows", 1e-3 * np.stack([g, h]) / np.linalg.norm([g, h], axis=1, keepdims=True)),
      ("three_at_120_degrees", np.stack([np.cos(angles), np.sin(angles)], axis=1)),
      ("orthogonal", np.eye(3, 4) * np.array([[1.0], [2.0], [3.0]])),
      ("non_conflicting", np.abs(rng.normal(size=(4, 6)))),
  ]


def exact_mgda(gram):
  import quadprog

  t = gram.shape[0]
  if t == 1 or np.trace(gram) == 0:
    return np.eye(t)[0]  # every point of the simplex: torchjd's first vertex
  ridge = 1e-12 * np.trace(gram)
  q = gram + ridge * np.eye(t)
  # min 1/2 w'Qw s.t. sum w = 1 (equality first), w >= 0.
  c = np.concatenate([np.ones((t, 1)), np.eye(t)], axis=1)
  b = np.concatenate([[1.0], np.zeros(t)])
  return quadprog.solve_qp(q, np.zeros(t), c, b, meq=1)[0]


def exact_nash_alpha(gram):
  """alpha_i (G alpha)_i = 1 by damped Newton on 1/2 a'Ga - sum log a; None if none."""
  t = gram.shape[0]
  d = np.diag(gram)
  live = d > 0
  if not live.any():
    return None
  idx = np.flatnonzero(live)
  g = gram[np.ix_(idx, idx)]
  dinv = 1 / np.sqrt(np.diag(g))
  c = g * dinv[:, None] * dinv[None, :]
  f = lambda b: 0.5 * b @ c @ b - np.sum(np.log(b))
  b = np.ones(len(idx)) * np.sqrt(len(idx) / max(np.sum(c), 1e-300))
  for _ in range(500):
    if np.max(b) > 1e7:
      return None  # growing without bound: Pareto-stationary, no solution
    grad = c @ b - 1 / b
    hess = c + np.diag(1 / b**2)
    step = -np.linalg.solve(hess, grad)
    lam2 = -grad @ step
    if lam2 < 1e-28:
      break
    s = 1.0
    # Armijo backtracking far from the solution; full steps once the decrement
    # is at the level where f's rounding would stall the test (quadratic phase).
    while lam2 > 1e-10 and s > 1e-12 and (np.any(b + s * step <= 0) or f(b + s * step) > f(b) - 0.25 * s * lam2):
      s *= 0.5
    b = b + s * step
  residual = np.max(np.abs(b * (c @ b) - 1))
  if residual > 1e-9 or np.max(b) > 1e6:
    return None  # Pareto-stationary: no exact solution
  alpha = np.zeros(t)
  alpha[idx] = dinv * b
  return alpha


def polish_cagrad(gn, b, phi, w):
  """The exact minimiser on the support of Clarabel's `w`, when it is one.

  On a support S the KKT conditions of `min w'b + phi sqrt(w'Gn w)` are
  linear in `w` given `t = |g_w| / phi`: `w = w0 + t w1` from the bordered
  system `[[Gn_SS, 1], [1', 0]]`, and `t = sqrt(A / (phi^2 - C))`,
  `A = w0'Gn w0`, `C = w1'Gn w1`. Kept if it is feasible and satisfies the
  KKT conditions off S; Clarabel's interior point leaves ~1e-5 in the
  weights where the objective is flat.
  """
  t = len(w)
  s = np.flatnonzero(w > 1e-7 * w.max())
  k = np.zeros((len(s) + 1, len(s) + 1))
  k[:-1, :-1] = gn[np.ix_(s, s)]
  k[:-1, -1] = k[-1, :-1] = 1.0
  try:
    w0 = np.linalg.solve(k, np.r_[np.zeros(len(s)), 1.0])[:-1]
    w1 = np.linalg.solve(k, np.r_[-b[s], 0.0])[:-1]
  except np.linalg.LinAlgError:
    return w
  a_, c_ = w0 @ gn[np.ix_(s, s)] @ w0, w1 @ gn[np.ix_(s, s)] @ w1
  if phi**2 <= c_ or a_ < 0:
    return w
  full = np.zeros(t)
  full[s] = w0 + np.sqrt(a_ / (phi**2 - c_)) * w1
  if np.any(full < 0):
    return w
  norm = np.sqrt(full @ gn @ full)
  grad = b + phi * (gn @ full) / norm
  if np.all(grad >= grad[s].min() - 1e-12) and np.ptp(grad[s]) < 1e-12:
    return full
  return w


def exact_cagrad_weights(gram, c, norm_eps=1e-4):
  import cvxpy as cp

  t = gram.shape[0]
  tr = np.trace(gram)
  gn = np.zeros_like(gram) if tr < norm_eps else gram / tr
  u, s, _ = np.linalg.svd(gn)
  a = u * np.sqrt(np.maximum(s, 0))
  g0 = a.T @ np.ones(t) / t
  phi = c * np.linalg.norm(g0)
  w = cp.Variable(t)
  cost = (a @ g0) @ w + phi * cp.norm(a.T @ w, 2)
  prob = cp.Problem(cp.Minimize(cost), [w >= 0, cp.sum(w) == 1])
  prob.solve(
      cp.CLARABEL, tol_gap_abs=1e-13, tol_gap_rel=1e-13, tol_feas=1e-13, tol_ktratio=1e-10,
      max_iter=500,
  )
  w_opt = polish_cagrad(gn, a @ g0, phi, np.asarray(w.value))
  norm = np.linalg.norm(a.T @ w_opt)
  if norm >= norm_eps:
    return np.ones(t) / t + (phi / norm) * w_opt
  return np.zeros(t)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", type=pathlib.Path, default=OUT)
  parser.add_argument("--seed", type=int, default=0)
  args = parser.parse_args(argv)

  import torch
  from torchjd import aggregation as A

  torch.set_default_dtype(torch.float64)
  warnings.filterwarnings("ignore")  # cvxpy's DPP notice from NashMTL
  rng = np.random.default_rng(args.seed)
  cases = random_cases(rng) + degenerate_cases(rng)

  def tensor(x):
    return torch.as_tensor(np.asarray(x, np.float64))

  def vec(x):
    # 13 significant digits: far below every tolerance, and a smaller file.
    if x is None:
      return None
    return [float(f"{v:.13g}") for v in np.asarray(x, np.float64).reshape(-1)]

  records = []
  for n, (name, j) in enumerate(cases):
    j = f32(j)
    t, p = j.shape
    jt = tensor(j)
    gram = j @ j.T
    gt = tensor(gram)
    out, weights, extra, exact = {}, {}, {}, {}

    simple = {
        "mean": A.Mean(), "sum": A.Sum(), "upgrad": A.UPGrad(), "dualproj": A.DualProj(),
        "mgda": A.MGDA(), "cagrad": A.CAGrad(c=0.5), "imtl_g": A.IMTLG(),
        "aligned_mtl": A.AlignedMTL(), "aligned_mtl_median": A.AlignedMTL(scale_mode="median"),
        "aligned_mtl_rmse": A.AlignedMTL(scale_mode="rmse"), "config": A.ConFIG(),
    }
    for key, agg in simple.items():
      out[key] = vec(agg(jt))
    gramian_weightings = {
        "upgrad": A.UPGradWeighting(), "dualproj": A.DualProjWeighting(), "mgda": A.MGDAWeighting(),
        "cagrad": A.CAGradWeighting(c=0.5), "imtl_g": A.IMTLGWeighting(),
        "aligned_mtl": A.AlignedMTLWeighting(),
        "aligned_mtl_median": A.AlignedMTLWeighting(scale_mode="median"),
        "aligned_mtl_rmse": A.AlignedMTLWeighting(scale_mode="rmse"),
    }
    for key, wt in gramian_weightings.items():
      weights[key] = vec(wt(gt))

    # PCGrad: replay the T randperm draws of one call, then check torchjd's output.
    torch.manual_seed(1000 + n)
    orders = [torch.randperm(t).tolist() for _ in range(t)]
    torch.manual_seed(1000 + n)
    out["pcgrad"] = vec(A.PCGrad()(jt))
    w = np.zeros(t)
    for i in range(t):
      cw = np.zeros(t)
      cw[i] = 1.0
      for k in orders[i]:
        if k == i:
          continue
        ip = gram[k] @ cw
        if ip < 0.0:
          cw[k] -= ip / gram[k, k]
      w += cw
    assert np.allclose(w @ j, out["pcgrad"], rtol=1e-12, atol=1e-12), name
    weights["pcgrad"] = vec(w)
    extra["pcgrad_orders"] = orders

    # GradDrop: replay the one torch.rand draw.
    torch.manual_seed(2000 + n)
    u = torch.rand(p).numpy()
    torch.manual_seed(2000 + n)
    out["graddrop"] = vec(A.GradDrop()(jt))
    extra["graddrop_u"] = vec(u)
    leak = np.linspace(0.1, 0.5, t)
    torch.manual_seed(2000 + n)
    out["graddrop_leak"] = vec(A.GradDrop(leak=tensor(leak))(jt))
    extra["graddrop_leak"] = vec(leak)

    try:
      out["nash_mtl"] = vec(A.NashMTL(n_tasks=t)(jt))
    except Exception as e:  # noqa: BLE001 - torchjd raises several kinds here
      out["nash_mtl"] = None
      extra["nash_mtl_error"] = f"{type(e).__name__}: {str(e)[:80]}"

    if t >= 2:
      pref = np.linspace(1.0, 2.0, t) / t
      extra["pref"] = vec(pref)
      out["upgrad_pref"] = vec(A.UPGrad(pref_vector=tensor(pref))(jt))
      out["dualproj_pref"] = vec(A.DualProj(pref_vector=tensor(pref))(jt))
      out["aligned_mtl_pref"] = vec(A.AlignedMTL(pref_vector=tensor(pref))(jt))
      out["config_pref"] = vec(A.ConFIG(pref_vector=tensor(pref))(jt))
      out["cagrad_c0.25"] = vec(A.CAGrad(c=0.25)(jt))

    w_mgda = exact_mgda(gram)
    exact["mgda"] = vec(w_mgda)
    alpha = exact_nash_alpha(gram)
    if alpha is not None:
      norm = np.sqrt(max(alpha @ gram @ alpha, 0))
      clipped = alpha * (1.0 / norm) if norm > 1.0 else alpha
      exact["nash_mtl"] = vec(clipped)
    else:
      exact["nash_mtl"] = None
    exact["cagrad"] = vec(exact_cagrad_weights(gram, 0.5))
    exact["cagrad_c0.25"] = vec(exact_cagrad_weights(gram, 0.25)) if t >= 2 else None

    records.append({
        # Shortest float32 digits: float32(entry) is exactly the J used here.
        "name": name, "T": t, "P": p, "J": [[float(str(np.float32(v))) for v in row] for row in j],
        "outputs": out, "weights": weights, "exact": exact, "extra": extra,
    })

  meta = {
      "generator": "tests/reference/make_torchjd_aggregation_vectors.py",
      "seed": args.seed,
      "versions": {
          pkg: importlib.metadata.version(pkg)
          for pkg in ("torch", "torchjd", "quadprog", "cvxpy", "clarabel", "ecos", "numpy")
      },
      "dtype": "float64 (J entries are float32 numbers)",
  }
  args.out.parent.mkdir(parents=True, exist_ok=True)
  text = json.dumps({"meta": meta, "cases": records}, separators=(",", ":"), allow_nan=False)
  args.out.write_text(text + "\n")
  print(f"wrote {len(records)} cases to {args.out} ({len(text) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
