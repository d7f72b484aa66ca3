"""jheads.aggregation against torchjd 0.18 (tests/data/torchjd_aggregation.json), the
methods' optimality conditions, the degenerate inputs of the design, and the
protocol: jit, vmap, pytree Jacobians, dtypes, state, as_optax, devices, bad input.

The reference file holds Jacobians with T = 1..10 and 40 heads (its generator
is tests/reference/make_torchjd_aggregation_vectors.py); no torch at test
time. The Gramian methods run, as the public functions do, on Gramians padded
to `bucket(T)` heads (T itself up to 4, then 16 or a multiple of 8), so all
the cases of a bucket go through one compiled core per method. Compilation is most of this
file's time.

A deviation is `max |ours - ref| / scale` over the update's entries,
`scale = max(|ref|_inf, |J|_inf)`. The issue's bounds: closed forms to 1e-4,
iterative solvers to 1e-3; in float64 everything but CAGrad (torchjd's
Clarabel stops about 1e-5 short) matches torchjd to 1e-7 (most to 1e-12). A
float32 Gramian of condition k (that of the Jacobian, squared) is rounded by
about k * 1.2e-7 relative to its smallest eigenvalue: in float32 the bound is
the larger of the issue's and 4 k eps (`float32_floor`; 5e-4 at k = 1e3), and the
`very_ill_` (k = 1e6) and `wide_scaled_` (head norms 1e4 apart) cases are
compared in float64 only (in float32 they must be finite).
"""

from __future__ import annotations

import functools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax.experimental import aggregating

import jheads.aggregation as aggregation
from jheads.aggregation import _aligned_mtl
from jheads.aggregation import _base
from jheads.aggregation import _cagrad
from jheads.aggregation import _config
from jheads.aggregation import _dualproj
from jheads.aggregation import _graddrop
from jheads.aggregation import _imtl_g
from jheads.aggregation import _mgda
from jheads.aggregation import _nash_mtl
from jheads.aggregation import _pcgrad
from jheads.aggregation import _solvers
from jheads.aggregation import _upgrad

DATA = json.loads((pathlib.Path(__file__).parent / "data" / "torchjd_aggregation.json").read_text())
CASES = DATA["cases"]
BY_NAME = {c["name"]: c for c in CASES}
FLOAT64_ONLY = ("very_ill_", "wide_scaled_")


def first(prefix, t):
  """The name of the first case of a family with `t` heads."""
  return next(c["name"] for c in CASES if c["name"].startswith(prefix) and c["T"] == t)


def jac(case, dtype=np.float64):
  return np.asarray(case["J"], np.float32).astype(dtype)  # float32 entries, exactly


def deviation(ours, ref, case):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  scale = max(np.max(np.abs(ref), initial=0.0), np.max(np.abs(jac(case)), initial=0.0), 1e-30)
  return float(np.max(np.abs(ours - ref), initial=0.0) / scale)


def update_of(weights, case):
  return np.asarray(weights, np.float64) @ jac(case)


def nash_clip(alpha, case, max_norm=1.0):
  norm = np.linalg.norm(update_of(alpha, case))
  return alpha * (max_norm / norm) if norm > max_norm else alpha


# ----------------------------------------------------------------------------
# Every method's core on every case. The cores are jitted at module level and
# take Gramians padded to `bucket(T)`: one compilation per core, bucket and
# dtype serves every case and every eager call of the public functions below.

# output key in the file -> (core(g, mask, pref), preference)
METHODS = {
    "upgrad": (functools.partial(_upgrad.upgrad_core, norm_eps=1e-4, reg_eps=1e-4), "mean"),
    "dualproj": (functools.partial(_dualproj.dualproj_core, norm_eps=1e-4, reg_eps=1e-4), "mean"),
    "mgda": (lambda g, m, p: _mgda.mgda_core(g, m, exact=True, epsilon=1e-3, max_iters=100), None),
    "mgda_fw": (lambda g, m, p: _mgda.mgda_core(g, m, exact=False, epsilon=1e-3, max_iters=100), None),
    "cagrad": (lambda g, m, p: _cagrad.cagrad_core(g, m, c=0.5, norm_eps=1e-4), None),
    "cagrad_c0.25": (lambda g, m, p: _cagrad.cagrad_core(g, m, c=0.25, norm_eps=1e-4), None),
    "imtl_g": (lambda g, m, p: _imtl_g.imtl_g_core(g, m), None),
    "aligned_mtl": (functools.partial(_aligned_mtl.aligned_mtl_core, scale_mode=0), "mean"),
    "aligned_mtl_median": (functools.partial(_aligned_mtl.aligned_mtl_core, scale_mode=1), "mean"),
    "aligned_mtl_rmse": (functools.partial(_aligned_mtl.aligned_mtl_core, scale_mode=2), "mean"),
    "config": (_config.config_core, "ones"),
    "nash_mtl": (lambda g, m, p: _nash_mtl.nash_alpha(g, max_steps=40), None),
}
for _key in ("upgrad", "dualproj", "aligned_mtl", "config"):
  METHODS[_key + "_pref"] = (METHODS[_key][0], "given")
CLOSED_FORMS = {"imtl_g", "config", "config_pref", "pcgrad", "graddrop", "graddrop_leak", "mean", "sum"}
CLOSED_FORMS |= {k for k in METHODS if k.startswith("aligned")}
ALL_KEYS = list(METHODS) + ["pcgrad", "graddrop", "graddrop_leak", "mean", "sum"]
P_PAD = 64  # GradDrop's columns, padded: zero columns give 0 whatever the draw


@functools.lru_cache(maxsize=None)
def results(dtype_name):
  """{method: {case: weights}} (Nash: alpha before clipping), float32 or float64."""
  dtype = np.float32 if dtype_name == "float32" else np.float64
  out = {key: {} for key in ALL_KEYS}
  with jax.enable_x64(dtype_name == "float64"):
    for case in CASES:
      t, name = case["T"], case["name"]
      tp = _base.bucket(t)
      j = jnp.asarray(jac(case, dtype))
      g, mask, _ = _base.pad(aggregation.gramian(j))
      real = np.arange(tp) < t
      given = np.zeros(tp)
      given[:t] = case["extra"].get("pref", np.full(t, 1 / t))
      prefs = {
          "mean": jnp.asarray(np.where(real, 1 / t, 0), dtype), "given": jnp.asarray(given, dtype),
          "ones": jnp.asarray(real, dtype), None: None,
      }
      for key, (core, pref) in METHODS.items():
        out[key][name] = np.asarray(core(g, mask, prefs[pref]), np.float64)[:t]
      orders = np.tile(np.arange(tp), (tp, 1))
      orders[:t, :t] = case["extra"]["pcgrad_orders"]
      out["pcgrad"][name] = np.asarray(_pcgrad.pcgrad_weights(g, mask, jnp.asarray(orders)), np.float64)[:t]
      out["mean"][name] = np.full(t, 1 / t)
      out["sum"][name] = np.ones(t)
      jp = jnp.zeros((tp, P_PAD), dtype).at[:t, : case["P"]].set(j)
      u = jnp.zeros((P_PAD,), dtype).at[: case["P"]].set(jnp.asarray(case["extra"]["graddrop_u"], dtype))
      for key, leak in (("graddrop", np.zeros(t)), ("graddrop_leak", case["extra"]["graddrop_leak"])):
        lk = jnp.zeros((tp,), dtype).at[:t].set(jnp.asarray(leak, dtype))
        out[key][name] = np.asarray(_graddrop.graddrop_combine(jp, u, lk), np.float64)[: case["P"]]
  return out


def output(res, key, case):
  """Our update for `key` on `case`, comparable to the file's `outputs[key]`."""
  w = res[key][case["name"]]
  if key.startswith("graddrop"):
    return w
  if key == "nash_mtl":
    w = nash_clip(w, case)
  return update_of(w, case)


def compared(key, dtype_name):
  """(case, reference) pairs that `key` is compared on, and the bound."""
  exact_ref = {"mgda": "mgda", "nash_mtl": "nash_mtl"}  # torchjd stops short: the exact solution
  pairs = []
  for case in CASES:
    if dtype_name == "float32" and case["name"].startswith(FLOAT64_ONLY):
      continue
    if key in exact_ref:
      ref = case["exact"][exact_ref[key]]
      ref = None if ref is None else update_of(ref, case)
    elif key == "mgda_fw":
      ref = case["outputs"]["mgda"]
    else:
      ref = case["outputs"].get(key)
    if ref is not None:
      pairs.append((case, ref))
  if dtype_name == "float64":
    # torchjd's Clarabel stops about 1e-5 short on CAGrad; the rest is
    # exact, up to the rounding of rank-deficient (noise-level) outputs.
    bound = 1e-4 if key.startswith("cagrad") else 1e-7
  else:
    bound = 1e-4 if key in CLOSED_FORMS or key == "mgda_fw" else 1e-3
  return pairs, bound


def float32_floor(case):
  """`eps32 * condition` of the case's Gramian over its numerical range: the
  accuracy a float32 Gramian allows (each entry is rounded by eps32)."""
  lam = np.linalg.eigvalsh(jac(case) @ jac(case).T)
  top = lam.max(initial=0.0)
  if top <= 0:
    return 0.0
  return float(4 * np.finfo(np.float32).eps * top / lam[lam > 1e-10 * top].min())


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_against_torchjd(dtype_name):
  res = results(dtype_name)
  failures = []
  for key in ALL_KEYS:
    pairs, bound = compared(key, dtype_name)
    assert pairs, key
    for case, ref in pairs:
      d = deviation(output(res, key, case), ref, case)
      b = bound if dtype_name == "float64" else max(bound, float32_floor(case))
      if not d <= b:
        failures.append(f"{key} on {case['name']}: {d:.2e} > {b:.1e}")
  assert not failures, "\n".join(failures)


def test_float32_extreme_cases_are_finite():
  res = results("float32")
  for key in ALL_KEYS:
    for case in CASES:
      assert np.all(np.isfinite(res[key][case["name"]])), (key, case["name"])


def test_cagrad_is_the_exact_optimum():
  # torchjd's Clarabel stops short; the reference solved at 1e-12 tolerances.
  res = results("float64")
  for key, ref_key in (("cagrad", "cagrad"), ("cagrad_c0.25", "cagrad_c0.25")):
    for case in CASES:
      ref = case["exact"].get(ref_key)
      if ref is None:
        continue
      assert deviation(update_of(res[key][case["name"]], case), update_of(ref, case), case) < 1e-9, (
          key, case["name"])


def test_cagrad_two_heads_closed_form_is_the_root_search():
  # Two heads skip the root search (`_solvers.cagrad_two`); on Gramians
  # conflicting, aligned, collinear and opposed, both give the same optimum.
  rng = np.random.default_rng(0)
  with jax.enable_x64(True):
    closed, search = jax.jit(_solvers.cagrad_two), jax.jit(_solvers.cagrad_direction)
    for i in range(60):
      j = rng.normal(size=(2, 3))
      if i % 4 == 1:
        j[1] = -rng.uniform(0.1, 3) * j[0]
      elif i % 4 == 2:
        j[1] = rng.uniform(0.1, 3) * j[0]
      q = j @ j.T / np.trace(j @ j.T)
      b = q.sum(1) / 2
      phi = rng.uniform(0.05, 2) * np.sqrt(max(b.sum() / 2, 1e-12))
      w2, n2 = closed(jnp.asarray(q), jnp.asarray(b), phi)
      ws, ns = search(jnp.asarray(q), jnp.asarray(b), phi)

      def objective(w):
        return float(w @ b + phi * np.sqrt(max(w @ q @ w, 0.0)))

      assert np.all(np.asarray(w2) >= 0) and abs(float(np.sum(w2)) - 1) < 1e-12
      assert objective(np.asarray(w2)) <= objective(np.asarray(ws)) + 1e-8, i
      quad = max(float(np.asarray(w2) @ q @ np.asarray(w2)), 0.0)  # 0 for opposed heads
      np.testing.assert_allclose(n2, np.sqrt(quad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["upgrad", "dualproj", "mgda", "cagrad", "nash_mtl"])
def test_solver_loops_leave_checkify_no_effect(name):
  # The train steps' value checks run through checkify; its while-loop rule
  # adds an effect that sends every jit call down the Python dispatch path.
  # The solvers' loops are staged past it (`_solvers.while_loop`).
  from jax.experimental import checkify

  agg = getattr(aggregation, name)()
  for t in (2, 10):
    fn = checkify.checkify(lambda g: agg.weights(g, agg.init(t))[0], errors=checkify.user_checks)
    assert jax.make_jaxpr(fn)(jnp.eye(t)).effects == set(), (name, t)


def test_while_loop_under_vmap_jvp_and_checkify():
  def solve(q, x):
    return _solvers.while_loop(lambda c: c[1] < 5, lambda c: (c[0] * q + 1, c[1] + 1), (x, 0))[0]

  def expected(q, x):
    for _ in range(5):
      x = x * q + 1
    return x

  q, x = jnp.array([0.5, 0.25]), jnp.ones((2, 3))
  np.testing.assert_allclose(jax.vmap(solve)(q, x), jax.vmap(expected)(q, x), rtol=1e-6)
  np.testing.assert_allclose(jax.vmap(solve, (None, 0))(q[0], x), expected(q[0], x), rtol=1e-6)
  _, tangent = jax.jvp(lambda a: solve(a, x[0]), (q[0],), (jnp.float32(1.0),))
  _, expected_tangent = jax.jvp(lambda a: expected(a, x[0]), (q[0],), (jnp.float32(1.0),))
  np.testing.assert_allclose(tangent, expected_tangent, rtol=1e-6)


# ----------------------------------------------------------------------------
# Optimality conditions, on the float32 solutions of every case.


def test_mgda_kkt():
  for case in CASES:
    w = results("float64")["mgda"][case["name"]]
    g = jac(case) @ jac(case).T
    gw = g @ w
    norm2 = w @ gw
    scale = max(np.max(np.diag(g)), 1e-300)
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12, case["name"]
    # (G w)_i >= |d|^2 everywhere (no vertex lowers the norm), = on the support.
    assert np.all(gw >= norm2 - 1e-9 * scale), case["name"]
    assert np.all(np.abs(gw[w > 1e-9] - norm2) <= 1e-9 * scale), case["name"]


def _cagrad_inner(weights, case, c=0.5):
  """(w*, gradient of the inner objective at w*) recovered from CAGrad's weights."""
  g = jac(case) @ jac(case).T
  t = case["T"]
  gn = g / np.trace(g)
  b = gn @ np.full(t, 1 / t)
  phi = c * np.sqrt(b.sum() / t)
  x = weights - 1 / t  # = (phi / |g_w|) w*
  w = x / x.sum()
  s = np.sqrt(w @ gn @ w)
  return w, b + phi * (gn @ w) / s


def test_cagrad_kkt():
  for dtype_name, tol in (("float64", 1e-9), ("float32", 2e-5)):
    res = results(dtype_name)
    for case in CASES:
      if case["T"] < 2 or case["name"].startswith(FLOAT64_ONLY):
        continue
      weights = res["cagrad"][case["name"]]
      if not np.any(weights) or abs(np.sum(weights) - 1) < 1e-9:  # 0 (on the front), or the mean
        continue
      w, grad = _cagrad_inner(weights, case)
      support = w > 1e-6
      level = grad[support].min()
      assert np.all(w >= -1e-7) and np.all(grad >= level - tol), (dtype_name, case["name"])
      assert np.all(np.abs(grad[support] - level) <= tol), (dtype_name, case["name"])


def test_nash_solves_its_equation():
  for dtype_name, tol in (("float64", 1e-9), ("float32", 1e-3)):
    res = results(dtype_name)
    for case in CASES:
      if case["exact"]["nash_mtl"] is None or case["name"].startswith(FLOAT64_ONLY):
        continue
      alpha = res["nash_mtl"][case["name"]]
      g = jac(case) @ jac(case).T
      live = np.diag(g) > 0
      assert np.all(alpha[~live] == 0)
      bound = tol if dtype_name == "float64" else max(tol, float32_floor(case))
      np.testing.assert_allclose((alpha * (g @ alpha))[live], 1.0, atol=bound, err_msg=case["name"])


@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_dual_cone_qps_kkt(dtype_name):
  # Each of UPGrad's T projections and DualProj's one: v >= u, Gh v >= 0,
  # (v - u) . Gh v = 0 (Gh in the solver's dtype), on every case.
  dtype = np.float32 if dtype_name == "float32" else np.float64
  tol = 1e-6 if dtype_name == "float32" else 1e-13
  with jax.enable_x64(dtype_name == "float64"):
    for case in CASES:
      if dtype_name == "float32" and case["name"].startswith(FLOAT64_ONLY):
        continue
      t = case["T"]
      g, mask, _ = _base.pad(aggregation.gramian(jnp.asarray(jac(case, dtype))))
      gh = np.asarray(_base.normalize(g, 1e-4), np.float64) + 1e-4 * np.eye(g.shape[0])
      u = np.where(np.asarray(mask), 1 / t, 0)
      for uu, v in ((np.diag(u), _qps(g, jnp.asarray(np.diag(u), dtype))),
                    (u[None], results(dtype_name)["dualproj"][case["name"]][None])):
        v = np.zeros_like(uu) + np.pad(np.asarray(v, np.float64), ((0, 0), (0, uu.shape[1] - np.shape(v)[1])))
        gv = v @ gh
        scale = np.abs(gh).max() * max(np.abs(v).max(), 1e-30)
        assert np.all(v >= uu - tol * max(np.abs(v).max(), 1)), case["name"]
        assert np.all(gv >= -tol * scale), case["name"]
        assert np.all(np.abs(np.sum((v - uu) * gv, axis=1)) <= tol * scale), case["name"]


@jax.jit
def _qps(g, u):
  return _upgrad.dual_cone_weights(g, u, 1e-4, 1e-4)


def _solver_gramian(t, kind, seed=0):
  """benchmarks/aggregation_solvers.py's Gramians: P = 700 Gaussian, or singular values 1..1e-1."""
  rng = np.random.default_rng(seed)
  if kind == "well":
    j = rng.normal(size=(t, 700)) / np.sqrt(700)
  else:
    u, _, vt = np.linalg.svd(rng.normal(size=(t, 700)), full_matrices=False)
    j = (u * np.logspace(0, -1, t)) @ vt
  return j @ j.T


def _upgrad_qps(gram, dtype):
  t = gram.shape[0]
  gh = jnp.asarray(gram / np.trace(gram) + 1e-4 * np.eye(t), dtype)
  return gh, jnp.eye(t, dtype=dtype) / t @ gh


@pytest.mark.parametrize("kind", ["well", "ill"])
def test_upgrad_float32_is_float64_to_1e5_at_40_heads(kind):
  # Issue 11: the float32 solve (block pivoting, `_solvers._pivot`, not its
  # active-set fallback) within 1e-5 of the float64 solution at T = 40.
  gram = _solver_gramian(40, kind)
  a = aggregation.upgrad()
  w32 = np.asarray(jax.jit(lambda g: a.weights(g, a.init(40))[0])(jnp.asarray(gram, jnp.float32)))
  with jax.enable_x64(True):
    w64 = np.asarray(jax.jit(lambda g: a.weights(g, a.init(40))[0])(jnp.asarray(gram)))
    ref = _upgrad.dual_cone_weights(jnp.asarray(gram), jnp.eye(40) / 40, 1e-4, 1e-4)
    exact = np.asarray(_solvers.nonneg_qp(*_upgrad_qps(gram, jnp.float64), max_iters=0))
  np.testing.assert_allclose(w32, w64, atol=1e-5, rtol=0)
  # float64 pivoting is the active-set method's solution, to rounding.
  np.testing.assert_allclose(np.asarray(ref) - np.eye(40) / 40, exact, atol=1e-12, rtol=0)
  _, done, iters = jax.jit(functools.partial(_solvers._pivot, max_iters=352, cg_steps=84))(
      *_upgrad_qps(gram, jnp.float32)
  )
  assert bool(jnp.all(done)) and int(iters) < 100, int(iters)


def test_nonneg_qp_pivoting_safeguards_and_fallback():
  # Every path of `_pivot` ends at the active-set method's solution: with no
  # repeated full exchanges (Murty's single ones as soon as the count of
  # infeasible indices does not drop), with exact solves before every
  # exchange, and, when the pivoting is cut short, through the fallback.
  with jax.enable_x64(True):
    gh, q = _upgrad_qps(_solver_gramian(12, "ill", seed=3), jnp.float64)
    exact = np.asarray(_solvers.nonneg_qp(gh, q, max_iters=0))
    assert np.sum(exact > 0) >= 12  # a problem with exchanges to make
    pivot = functools.partial(_solvers._pivot, max_iters=200, cg_steps=28)
    for kwargs in ({}, {"backup": 0}, {"loose": 0.0}, {"loose": 0.5, "backup": 0}):
      x, done, _ = jax.jit(functools.partial(pivot, **kwargs))(gh, q)
      assert bool(jnp.all(done)), kwargs
      np.testing.assert_allclose(np.asarray(x), exact, atol=1e-13, rtol=0, err_msg=str(kwargs))
    _, done, iters = jax.jit(functools.partial(_solvers._pivot, max_iters=3, cg_steps=28))(gh, q)
    assert int(iters) == 3 and not bool(jnp.all(done))
    cut = jax.jit(functools.partial(_solvers.nonneg_qp, max_iters=3))(gh, q)
    np.testing.assert_allclose(np.asarray(cut), exact, atol=1e-13, rtol=0)
    batched = jax.vmap(functools.partial(_solvers.nonneg_qp, max_iters=3))(jnp.stack([gh, gh]), jnp.stack([q, q]))
    np.testing.assert_allclose(np.asarray(batched), np.stack([exact, exact]), atol=1e-13, rtol=0)


# ----------------------------------------------------------------------------
# Degenerate inputs: the design's table.


def _out(key, name, dtype_name="float32"):
  case = BY_NAME[name]
  return output(results(dtype_name), key, case)


def test_one_head():
  g = jac(BY_NAME["one_head"])[0]
  for key in ALL_KEYS:
    expected = {"cagrad": 1.5 * g, "cagrad_c0.25": 1.25 * g, "nash_mtl": g / np.linalg.norm(g)}.get(key, g)
    if key in ("graddrop_leak",):
      continue
    np.testing.assert_allclose(_out(key, "one_head"), expected, rtol=1e-5, atol=1e-6, err_msg=key)


def test_zero_row():
  g1 = jac(BY_NAME["zero_row"])[0]
  half = ("mean", "upgrad", "dualproj", "aligned_mtl")
  whole = ("sum", "pcgrad", "config", "imtl_g")
  for key in half:
    np.testing.assert_allclose(_out(key, "zero_row"), g1 / 2, rtol=1e-3, atol=1e-6, err_msg=key)
  for key in whole:
    np.testing.assert_allclose(_out(key, "zero_row"), g1, rtol=1e-5, atol=1e-6, err_msg=key)
  for key in ("mgda", "cagrad"):  # 0 is in the hull
    np.testing.assert_allclose(_out(key, "zero_row"), 0, atol=1e-6, err_msg=key)
  np.testing.assert_allclose(_out("nash_mtl", "zero_row"), g1 / np.linalg.norm(g1), rtol=1e-5)
  assert results("float32")["nash_mtl"]["zero_row"][1] == 0


@pytest.mark.parametrize("name", ["all_zeros", "all_zeros_T4"])
def test_all_zeros(name):
  for dtype_name in ("float32", "float64"):
    res = results(dtype_name)
    for key in ALL_KEYS:
      w = res[key][name]
      assert np.all(np.isfinite(w)), key
      np.testing.assert_array_equal(output(res, key, BY_NAME[name]), 0, err_msg=key)
  np.testing.assert_array_equal(results("float32")["mgda"][name][0], 1.0)  # torchjd's [1, 0]


def test_opposing_and_duplicate_rows():
  g = jac(BY_NAME["opposing"])[0]
  for key in ALL_KEYS:
    out = _out(key, "opposing")
    assert np.all(np.isfinite(out)), key
    if key not in ("graddrop", "graddrop_leak") and not key.endswith("_pref"):
      np.testing.assert_allclose(out, 0, atol=1e-4 * np.abs(g).max(), err_msg=key)
  w = results("float64")["upgrad"]["opposing"]
  np.testing.assert_allclose(w, 0.9999, atol=1e-4)  # the reg_eps, as torchjd
  np.testing.assert_allclose(_out("imtl_g", "opposing_2x", "float64"), -5 * g, rtol=1e-6)
  np.testing.assert_array_equal(results("float32")["mgda"]["duplicate"], [1.0, 0.0])
  for key in ("imtl_g", "upgrad", "aligned_mtl", "nash_mtl", "mean"):
    d = jac(BY_NAME["duplicate"])[0]
    expected = d / np.linalg.norm(d) if key == "nash_mtl" else d
    np.testing.assert_allclose(_out(key, "duplicate"), expected, rtol=1e-3, err_msg=key)


def test_three_heads_at_120_degrees_and_tiny_rows():
  for key in ALL_KEYS:
    for name in ("three_at_120_degrees", "tiny_rows", "fewer_columns_T6_P2"):
      assert np.all(np.isfinite(_out(key, name))), (key, name)
  np.testing.assert_allclose(_out("config", "three_at_120_degrees"), 0, atol=1e-6)
  # tr(G) = 2e-6 < norm_eps: CAGrad gives 0, UPGrad and DualProj the mean (torchjd's thresholds).
  np.testing.assert_array_equal(_out("cagrad", "tiny_rows"), 0)
  np.testing.assert_allclose(_out("upgrad", "tiny_rows"), _out("mean", "tiny_rows"), rtol=1e-3)


# ----------------------------------------------------------------------------
# The public functions: jit, pytrees, dtypes, state, vmap, devices, optax.

KEY = jax.random.key(0)
FACTORIES = {
    "mean": lambda: aggregation.mean(),
    "sum": lambda: aggregation.sum(),
    "upgrad": lambda: aggregation.upgrad(),
    "dualproj": lambda: aggregation.dualproj(),
    "mgda": lambda: aggregation.mgda(),
    "pcgrad": lambda: aggregation.pcgrad(key=KEY),
    "cagrad": lambda: aggregation.cagrad(),
    "imtl_g": lambda: aggregation.imtl_g(),
    "aligned_mtl": lambda: aggregation.aligned_mtl(),
    "nash_mtl": lambda: aggregation.nash_mtl(),
    "config": lambda: aggregation.config(),
    "graddrop": lambda: aggregation.graddrop(key=KEY),
    "gradnorm": lambda: aggregation.gradnorm(),
}


def _pytree_case():
  """A T = 3 reference case's J split into a pytree of three leaves of different shapes."""
  case = BY_NAME[first("gauss_", 3)]
  j = jac(case, np.float32)
  tree = {"w": j[:, :6].reshape(3, 2, 3), "b": j[:, 6:10], "deep": {"k": j[:, 10:].reshape(3, -1, 1)}}
  return case, tree


def _flatten(tree):
  return np.concatenate([np.asarray(tree["w"]).reshape(-1), np.asarray(tree["b"]).reshape(-1),
                         np.asarray(tree["deep"]["k"]).reshape(-1)])


@pytest.mark.parametrize("name", sorted(FACTORIES))
def test_public_update_on_a_pytree(name):
  # Eager: the cores compiled for the reference cases serve these calls.
  case, tree = _pytree_case()
  a = FACTORIES[name]()
  state = a.init(3)
  losses = jnp.array([1.0, 2.0, 3.0])
  update, new_state = a.update(tree, state, losses=losses)
  assert jax.tree.structure(update) == jax.tree.structure(jax.tree.map(lambda x: x[0], tree))
  for leaf, ref_leaf in zip(jax.tree.leaves(update), jax.tree.leaves(tree)):
    assert leaf.shape == ref_leaf.shape[1:] and leaf.dtype == jnp.float32
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  flat = _flatten(update)
  ref_key = {"aligned_mtl": "aligned_mtl", "nash_mtl": "nash_mtl"}.get(name, name)
  if name in ("pcgrad", "graddrop", "gradnorm"):
    assert np.all(np.isfinite(flat))
  elif name in ("mgda", "cagrad"):
    np.testing.assert_allclose(flat, update_of(case["exact"][name], case), rtol=1e-4, atol=1e-5)
  else:
    np.testing.assert_allclose(flat, case["outputs"][ref_key], rtol=1e-4, atol=1e-5)
  if a.weights is not None:
    w, _ = a.weights(aggregation.gramian(tree), state, losses=losses)
    np.testing.assert_allclose(flat, update_of(w, case), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["upgrad", "nash_mtl", "pcgrad", "graddrop"])
def test_public_update_under_jit(name):
  case, tree = _pytree_case()
  a = FACTORIES[name]()
  state = a.init(3)
  update, new_state = jax.jit(a.update)(tree, state)
  eager, eager_state = a.update(tree, state)
  for x, y in zip(jax.tree.leaves((update, new_state)), jax.tree.leaves((eager, eager_state))):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


def test_gramian_and_combine_are_per_leaf():
  case, tree = _pytree_case()
  j = jac(case)
  np.testing.assert_allclose(aggregation.gramian(tree), j @ j.T, rtol=1e-6)
  w = jnp.array([0.5, -1.0, 2.0])
  np.testing.assert_allclose(_flatten(aggregation.combine(w, tree)), np.asarray(w) @ j, rtol=1e-6, atol=1e-6)
  # bf16 leaves: the Gramian accumulates in float32, the update keeps bf16.
  bf = jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), tree)
  assert aggregation.gramian(bf).dtype == jnp.float32
  assert aggregation.combine(w, bf)["b"].dtype == jnp.bfloat16
  # Every jheads method keeps one row per head: [T, ...] leaves only.
  with pytest.raises(ValueError, match="same leading number of heads"):
    aggregation.gramian({"a": jnp.ones((2, 3)), "b": jnp.ones((3, 3))})
  with pytest.raises(ValueError, match=r"shape \(3,\)"):
    aggregation.combine(jnp.ones(2), tree)


def test_random_methods_carry_their_key():
  _, tree = _pytree_case()
  for make in (FACTORIES["pcgrad"], FACTORIES["graddrop"]):
    a = make()
    step = a.update
    s0 = a.init(jax.tree.leaves(tree)[0].shape[0])
    u1, s1 = step(tree, s0)
    u1b, _ = step(tree, s0)  # same state: same draw
    u2, _ = step(tree, s1)  # next state: a new draw
    for x, y in zip(jax.tree.leaves(u1), jax.tree.leaves(u1b)):
      np.testing.assert_array_equal(x, y)
    assert not np.array_equal(jax.random.key_data(s0.key), jax.random.key_data(s1.key))
    del u2


def test_pcgrad_two_heads_is_order_free():
  for name in (first("gauss_", 2), "opposing", "zero_row", "duplicate"):
    case = BY_NAME[name]
    a = aggregation.pcgrad(key=jax.random.key(3))
    update, _ = a.update(jnp.asarray(jac(case, np.float32)), a.init(2))
    np.testing.assert_allclose(update, case["outputs"]["pcgrad"], rtol=1e-5, atol=1e-6)


def test_nash_state_reuses_alpha():
  case, tree = _pytree_case()
  g = aggregation.gramian(tree)
  a = aggregation.nash_mtl(update_weights_every=2)
  s = a.init(3)
  w1, s = a.weights(g, s)
  w2, s = a.weights(2 * g, s)  # reused alpha, clipped with the new Gramian
  w3, s = a.weights(2 * g, s)  # solved again: 1/sqrt(2) of the first
  np.testing.assert_allclose(w2, w1 / np.sqrt(2), rtol=1e-5)
  np.testing.assert_allclose(w3, w1 / np.sqrt(2), rtol=1e-4)
  assert int(s.step) == 3
  norm = np.linalg.norm(_flatten(aggregation.combine(w1, tree)))
  np.testing.assert_allclose(norm, 1.0, rtol=1e-5)  # min(max_norm, sqrt(T))
  w, _ = aggregation.nash_mtl(max_norm=0.0).weights(g, a.init(3))
  np.testing.assert_allclose(np.linalg.norm(_flatten(aggregation.combine(w, tree))), np.sqrt(3), rtol=1e-4)


def test_gradnorm_balances_the_weighted_norms():
  j = jnp.array([[1.0, 0.0], [0.0, 10.0]])
  a = aggregation.gradnorm(optimizer=optax.adam(0.1))
  s = a.init(2)
  step = jax.jit(lambda s, losses: a.weights(aggregation.gramian(j), s, losses=losses))
  for _ in range(200):
    w, s = step(s, jnp.array([1.0, 1.0]))
  np.testing.assert_allclose(w.sum(), 2.0, rtol=1e-5)
  np.testing.assert_allclose(w[0] * 1.0, w[1] * 10.0, rtol=0.05)  # equal rates: equal |w_i g_i|
  np.testing.assert_array_equal(s.initial_losses, [1.0, 1.0])
  with pytest.raises(ValueError, match="gradnorm: needs the per-head losses"):
    a.weights(aggregation.gramian(j), a.init(2))


def test_vmap_over_gramians():
  cases = [BY_NAME[first(f, 3)] for f in ("gauss_", "ill_", "scaled_")]
  gs = jnp.stack([aggregation.gramian(jnp.asarray(jac(c, np.float32))) for c in cases])
  a = aggregation.upgrad()
  w = jax.vmap(lambda g: a.weights(g, a.init(3))[0])(gs)
  for wi, case in zip(np.asarray(w), cases):
    np.testing.assert_allclose(update_of(wi, case), case["outputs"]["upgrad"], rtol=1e-4, atol=1e-5)


def test_shard_map_replicated_weights_are_the_same_on_every_device():
  # The train step psums the Jacobian, then every device solves the same problem.
  mesh = jax.make_mesh((jax.device_count(),), ("d",))
  case, tree = _pytree_case()
  a = aggregation.pcgrad(key=KEY)
  state = a.init(3)

  def per_device(tree, state):
    update, _ = a.update(tree, state)
    return jax.tree.map(lambda x: x[None], update)

  f = jax.shard_map(per_device, mesh=mesh, in_specs=(jax.P(), jax.P()), out_specs=jax.P("d"))
  out = jax.jit(f)(tree, state)
  for leaf in jax.tree.leaves(out):
    assert np.all(np.asarray(leaf) == np.asarray(leaf)[:1])


def test_as_optax():
  case, tree = _pytree_case()
  opt = aggregating.process(
      optax.identity(), aggregation.as_optax(aggregation.dualproj(), 3), optax.sgd(1.0)
  )
  params = jax.tree.map(lambda x: jnp.zeros(x.shape[1:]), tree)
  state = opt.init(params)
  updates, state = opt.update(tree, state, params)
  np.testing.assert_allclose(-_flatten(updates), case["outputs"]["dualproj"], rtol=1e-4, atol=1e-5)
  agg = aggregation.as_optax(aggregation.gradnorm(), 3)
  s = agg.init(params)
  _, s = agg.update(tree, s, params, losses=jnp.ones(3))
  assert int(s.count) == 1
  with pytest.raises(ValueError, match="3 heads"):
    aggregation.as_optax(aggregation.mean(), 3).update(jnp.ones((2, 4)), optax.EmptyState())


def test_float64_when_x64_is_on():
  case = BY_NAME[first("gauss_", 40)]
  with jax.enable_x64(True):
    w, _ = aggregation.upgrad().weights(jnp.asarray(jac(case) @ jac(case).T), optax.EmptyState())
    assert w.dtype == jnp.float64
  assert deviation(update_of(np.asarray(w), case), case["outputs"]["upgrad"], case) < 1e-12


def test_bad_input():
  with pytest.raises(ValueError, match="aggregation.upgrad: pref_vector has 2 entries but there are 3"):
    aggregation.upgrad(pref_vector=[1.0, 2.0]).init(3)
  with pytest.raises(ValueError, match="aggregation.upgrad: reg_eps must be >= 0"):
    aggregation.upgrad(reg_eps=-1.0)
  with pytest.raises(ValueError, match="aggregation.mgda: epsilon must be > 0"):
    aggregation.mgda(epsilon=0.0)
  with pytest.raises(ValueError, match="aggregation.mgda: max_iters must be an int >= 1"):
    aggregation.mgda(max_iters=0)
  with pytest.raises(ValueError, match="aggregation.aligned_mtl: scale_mode"):
    aggregation.aligned_mtl(scale_mode="max")
  with pytest.raises(ValueError, match="aggregation.pcgrad: key must be"):
    aggregation.pcgrad(key=0)
  with pytest.raises(ValueError, match="aggregation.graddrop: leak has 3 entries but there are 2"):
    aggregation.graddrop(key=KEY, leak=[0.1, 0.2, 0.3]).init(2)
  with pytest.raises(ValueError, match="aggregation.nash_mtl: update_weights_every"):
    aggregation.nash_mtl(update_weights_every=0)
  with pytest.raises(ValueError, match="aggregation.cagrad: c must be >= 0"):
    aggregation.cagrad(c=-0.5)
  with pytest.raises(ValueError, match=r"aggregation.imtl_g: the Gramian must be a square \[T, T\]"):
    aggregation.imtl_g().weights(jnp.ones((2, 3)), optax.EmptyState())
  with pytest.raises(ValueError, match="aggregation.nash_mtl: the Gramian is 2 x 2 but the state has 3"):
    a = aggregation.nash_mtl()
    a.weights(jnp.eye(2), a.init(3))
  with pytest.raises(ValueError, match="aggregation.mean: n_heads must be a positive int"):
    aggregation.mean().init(0)
  with pytest.raises(ValueError, match="aggregation.sum: every Jacobian leaf must be a floating"):
    aggregation.sum().update({"a": jnp.ones((2, 3), jnp.int32)}, optax.EmptyState())
