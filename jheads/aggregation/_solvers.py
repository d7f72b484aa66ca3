"""Exact solvers for the small `[T, T]` problems of the aggregators, inside jit.

Four problems, all on a Gramian-sized matrix `Q` (`T` = number of heads):

* `nonneg_qp`: `min 1/2 x'Qx + q'x` subject to `x >= 0`, for `B` linear
  terms at once (UPGrad's `T` dual-cone projections, DualProj's one), `Q`
  positive definite.
* `simplex_qp`: the same subject to `x >= 0, sum x = 1` (MGDA's min-norm
  point, CAGrad's inner problem), `Q` positive semi-definite.
* `cagrad_direction`: `min_{w in simplex} w'b + phi sqrt(w'Qw)` (CAGrad),
  by a safeguarded root search over warm-started simplex QPs.
* `nash_newton`: `min 1/2 a'Ca - sum log a` over `a > 0` (Nash-MTL's
  bargaining solution `a_i (Ca)_i = 1`), by damped Newton.

Why our own solvers and not a library: no maintained JAX QP solver is a
runtime dependency here (jaxopt is archived, qpax would be one more package),
and the problems are tiny and dense, so the cost that matters is the number
of sequential steps inside `lax.while_loop` and the kernels per step, not
flops. A first-order method (JaxJD's Nesterov PGD) needs hundreds of steps
on the ill-conditioned Gramians of conflicting heads (UPGrad's `reg_eps =
1e-4` allows a condition number of 1e4) and is never exact; an
interior-point method (qpax) needs a fresh `T x T` factorisation per step,
for UPGrad `T` of them (a batched Cholesky and solve of 40 40 x 40 matrices
takes 0.3 ms on the 2-core CPU this was measured on), for 10 to 20 steps.

The QPs use a primal active-set method (Lawson and Hanson's NNLS, 1974, ch.
23; for the simplex, Wolfe's 1976 min-norm-point algorithm has the same
structure): the passive set grows by the most violated constraint or
shrinks by the first blocking one, and on the passive set the equality-
constrained minimiser is exact. It terminates in finitely many steps (in
practice about the size of the final support, plus the drops), each step
`O(B T^2)`: the inverse of the passive block of the KKT matrix is kept
explicitly and changed by one rank-one term per step (bordering when an
index enters, the Schur-complement downdate when one leaves), which needs
only products, no factorisation and no triangular solves. Because an
updated inverse drifts, the passive solutions are refined with their own
residual (iterative refinement) at every step, whose decisions read their
signs, and again before they are returned; in float32 the weights then
agree with the float64 solution of the same Gramian to about 1e-8 on
well-conditioned Gramians (to `eps * condition` in general:
benchmarks/aggregation_solvers.py).

What a step costs on a CPU is its kernels, not its flops (T <= 100): a step
is a handful of fused kernels, with the pass over the `[B, m, m]` inverses
the largest (carried flat, `[B, m * m]`, and updated from the carry; see
`_solve`). A first version entered blocks of 4 indices per step, in a third
of the steps, but each step was several times dearer and compiled slower.

UPGrad's `T` projections (`nonneg_qp` with `B > 1`) go first through block
principal pivoting (`_pivot`), which exchanges every infeasible index at
once and solves the passive systems by conjugate gradients with the shared
`Q`: an iteration is two `[B, T] x [T, T]` products and no per-problem
matrix (13 us at T = 40 against about 60 us for an active-set step), and
at T = 40 it needs 16 iterations on the well-conditioned Gramian (the
active-set method 26 steps) and about 55 at condition 1e2. It stops only
when a freshly computed residual is at the rounding level and the KKT
conditions hold, so its solutions are as exact as the active-set method's
(float32 weights within 1e-7 of float64's on the benchmark's Gramians); a
problem it has not finished in its budget is solved by the active-set
method. Measured there first: a batched Cholesky or LU of 40 40 x 40
matrices (0.35 and 0.5 ms, LAPACK one matrix at a time) would have cost
more per pivoting iteration than the whole solve now does.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

_HI = lax.Precision.HIGHEST


def _mv(a, x):
  return jnp.matmul(a, x, precision=_HI)


def while_loop(cond, body, init):
  """`lax.while_loop`, staged so that `checkify` passes it through untouched.

  The train steps' value checks functionalize with `checkify`, whose rule
  for a while loop re-evaluates the condition inside the body under a
  `dce_sink`; that effect makes jit dispatch take its Python path on every
  call, 4 to 7 ms a step on a CPU, more than a whole small step. These
  loops hold no checks, so they are wrapped in a `custom_vmap` (which
  checkify has no rule for, and stages as it is) whose batching rule is the
  plain vmap of the loop; jvp, vmap, pmap and shard_map see an ordinary
  while loop. Values the body closes over are passed in explicitly, as
  custom_vmap needs.
  """
  flat, tree = jax.tree.flatten(init)

  def run_flat(*leaves):
    def flat_cond(c):
      return cond(jax.tree.unflatten(tree, c))

    def flat_body(c):
      return tuple(jax.tree.leaves(body(jax.tree.unflatten(tree, c))))

    return list(lax.while_loop(flat_cond, flat_body, tuple(leaves)))

  closed = jax.make_jaxpr(run_flat)(*flat)
  n_consts = len(closed.consts)

  def run(*args):
    return jax.core.eval_jaxpr(closed.jaxpr, args[:n_consts], *args[n_consts:])

  staged = jax.custom_batching.custom_vmap(run)

  @staged.def_vmap
  def _rule(axis_size, in_batched, *args):
    args = [
        x if batched else jnp.broadcast_to(x, (axis_size, *jnp.shape(x)))
        for x, batched in zip(args, in_batched)
    ]
    return jax.vmap(run)(*args), [True] * len(flat)

  return jax.tree.unflatten(tree, staged(*closed.consts, *flat))


class ActiveSet(NamedTuple):
  """Warm-startable state of the active-set QP solver, for `B` problems.

  Attributes:
    x: `[B, T]` the current feasible points.
    passive: `[B, m]` bool, the passive sets (`x_i` free), `m = T` or
      `T + 1` with the simplex's multiplier last (always passive).
    kinv: `[B, m, m]` the inverses of the passive blocks of the KKT matrix,
      embedded (zero outside the passive rows and columns).
    steps: int32 steps taken so far.
  """

  x: jax.Array
  passive: jax.Array
  kinv: jax.Array
  steps: jax.Array


class _Carry(NamedTuple):
  st: ActiveSet
  s: jax.Array  # [B, m] kinv @ h, the passive solutions, kept in step with kinv
  done: jax.Array  # [B] bool


def _kkt(q_mat, simplex):
  if not simplex:
    return q_mat
  t = q_mat.shape[0]
  ones = jnp.ones((t, 1), q_mat.dtype)
  top = jnp.concatenate([q_mat, ones], axis=1)
  bottom = jnp.concatenate([ones.T, jnp.zeros((1, 1), q_mat.dtype)], axis=1)
  return jnp.concatenate([top, bottom], axis=0)


def _rhs(q_vecs, simplex):
  if not simplex:
    return -q_vecs
  return jnp.concatenate([-q_vecs, jnp.ones(q_vecs.shape[:1] + (1,), q_vecs.dtype)], axis=1)


def _start(q_mat, q_vecs, simplex, allowed=None) -> ActiveSet:
  """Nonneg: the empty passive set at 0. Simplex: the best allowed vertex."""
  b, t = q_vecs.shape
  dtype = q_vecs.dtype
  if not simplex:
    return ActiveSet(
        jnp.zeros((b, t), dtype), jnp.zeros((b, t), bool), jnp.zeros((b, t, t), dtype), jnp.int32(0)
    )
  score = 0.5 * jnp.diagonal(q_mat) + q_vecs
  if allowed is not None:
    score = jnp.where(allowed, score, jnp.inf)
  i0 = jnp.argmin(score, axis=1)
  x = jax.nn.one_hot(i0, t, dtype=dtype)
  passive = jnp.concatenate([x > 0, jnp.ones((b, 1), bool)], axis=1)
  # The inverse of [[Q_ii, 1], [1, 0]] is [[0, 1], [1, -Q_ii]].
  e = jax.nn.one_hot(i0, t + 1, dtype=dtype)
  last = jax.nn.one_hot(jnp.full((b,), t), t + 1, dtype=dtype)
  qii = jnp.diagonal(q_mat)[i0]
  kinv = (
      e[:, :, None] * last[:, None, :]
      + last[:, :, None] * e[:, None, :]
      - qii[:, None, None] * last[:, :, None] * last[:, None, :]
  )
  return ActiveSet(x, passive, kinv, jnp.int32(0))


def _apply(kinv_flat, pending):
  """`kinv + w cw'` on the flat `[B, m * m]` inverses."""
  w, cw = pending
  nb, m = w.shape
  return kinv_flat + (w[:, :, None] * cw[:, None, :]).reshape(nb, m * m)


def _solve(q_mat, q_vecs, state, *, simplex, max_steps, allowed=None, refine=2, done=None):
  """Runs the active-set method on `B` problems from `state`; refines them.

  The problems share `q_mat` and differ in `q_vecs` (`[B, T]`): products with
  the shared matrix are `[B, T] x [T, T]` (the loop is written batched, not
  vmapped, so the finished problems cost no per-element select on them).

  Each step either drops the first blocking passive index or adds the most
  violated constraint (Lawson and Hanson's rule, which terminates): two
  products of `kinv` with a vector (a refinement step of the passive
  solutions, then the KKT column of the index entering), a gather of the
  row of the index leaving, and one rank-one change of `kinv`. A constraint
  whose pivot is at the rounding level (dependent on the passive heads) is
  refused for the rest of the solve. Indices outside `allowed` (`[T]` bool;
  padding heads) never enter. Problems marked in `done` (`[B]` bool) are
  left as they start: when all are, the loop runs no step.
  """
  nb, t = q_vecs.shape
  dtype = q_vecs.dtype
  eps = jnp.finfo(dtype).eps
  kkt = _kkt(q_mat, simplex)
  h = _rhs(q_vecs, simplex)
  m = kkt.shape[0]
  diag_max = jnp.max(jnp.abs(jnp.diagonal(q_mat)))
  abs_q = jnp.abs(q_mat)
  pivot_tol = 4 * t * eps * diag_max
  kkt_diag = jnp.diagonal(kkt)
  excluded0 = jnp.zeros((nb, t), bool) if allowed is None else jnp.broadcast_to(~allowed, (nb, t))
  heads = jnp.arange(t)

  def step(carry):
    st, s_full, done, refused, pending = carry
    st = st._replace(kinv=_apply(st.kinv, pending))
    kinv3 = st.kinv.reshape(nb, m, m)
    # One step of iterative refinement of the passive solutions, every step:
    # the decisions below read their signs, and an updated inverse drifts
    # (float32, ill-conditioned Gramians, many entries and drops).
    mask = st.passive.astype(dtype)
    r = mask * (h - jnp.matmul(s_full * mask, kkt, precision=_HI))
    s_full = s_full + jnp.einsum("bij,bj->bi", kinv3, r, precision=_HI)
    active = ~done
    prim = st.passive[:, :t]
    s = s_full[:, :t]
    blocked = prim & (s <= 0)
    infeasible = jnp.any(blocked, axis=1)

    # Leave: move towards s until the first passive x_k reaches 0; drop k.
    gap = st.x - s
    ratio = jnp.where(blocked, jnp.where(gap > 0, st.x / jnp.where(gap > 0, gap, 1), 0), jnp.inf)
    k = jnp.argmin(ratio, axis=1)
    alpha = jnp.clip(jnp.min(ratio, axis=1), 0, 1)[:, None]
    x_leave = jnp.where(prim & (heads != k[:, None]), st.x + alpha * (s - st.x), 0)

    # Enter: at x = s, the constraint with the most negative reduced gradient,
    # above the rounding level of its reduced gradient.
    x_enter = jnp.where(prim, jnp.maximum(s, 0), 0)
    grad = jnp.matmul(x_enter, q_mat, precision=_HI) + q_vecs
    noise = jnp.matmul(jnp.abs(x_enter), abs_q, precision=_HI) + jnp.abs(q_vecs)
    if simplex:
      grad = grad + s_full[:, t:]  # the passive multiplier: reduced gradient 0 there
      noise = noise + jnp.abs(s_full[:, t:])
    cand = jnp.where(prim | refused, jnp.inf, grad + 8 * eps * noise)
    j = jnp.argmin(cand, axis=1)
    wants = (jnp.min(cand, axis=1) < 0) & ~infeasible & active

    onehot_k = jax.nn.one_hot(k, m, dtype=dtype)
    onehot_j = jax.nn.one_hot(j, m, dtype=dtype)
    col = kkt[j]  # [B, m]: kkt is symmetric
    # kinv is symmetric: the column of k is its row, a gather.
    c = jnp.take_along_axis(kinv3, k[:, None, None], axis=1)[:, 0, :]
    y = jnp.einsum("bij,bj->bi", kinv3, col, precision=_HI)
    ck = jnp.take_along_axis(c, k[:, None], axis=1)[:, 0]
    schur = kkt_diag[j] - jnp.sum(col * y, axis=1)
    enters = wants & (schur > pivot_tol)
    refused = refused | ((wants & ~enters)[:, None] & (onehot_j[:, :t] > 0))

    # One rank-one change of kinv: the downdate of k, or the bordering by j.
    drop = infeasible & active
    w = jnp.where(infeasible[:, None], c, y - onehot_j)
    coef = jnp.where(
        drop, -1 / jnp.where(ck != 0, ck, 1), jnp.where(enters, 1 / jnp.where(enters, schur, 1), 0)
    )
    # kinv is carried flat, [B, m * m]: XLA's CPU loops over a [40, 40, 40]
    # array ran 3 to 4 times slower than over the same entries as [40, 1600].
    # The change is applied at the start of the next step, from the carry:
    # fused into this step, the selects making `coef` were recomputed for
    # every entry of kinv (XLA's CPU pipeline drops optimization barriers).
    pending = (w, coef[:, None] * w)
    s_full = s_full + (coef * jnp.sum(w * h, axis=1))[:, None] * w
    x = jnp.where(infeasible[:, None], x_leave, x_enter)
    x = jnp.where(active[:, None], x, st.x)
    passive = jnp.where(
        drop[:, None], st.passive & (onehot_k == 0), st.passive | (enters[:, None] & (onehot_j > 0))
    )
    done = done | (~infeasible & ~wants)
    return ActiveSet(x, passive, st.kinv, st.steps + 1), s_full, done, refused, pending

  def cond(carry):
    return ~jnp.all(carry[2]) & (carry[0].steps < max_steps)

  s0 = jnp.einsum("bij,bj->bi", state.kinv, h, precision=_HI)
  flat = state._replace(kinv=state.kinv.reshape(nb, m * m))
  none = (jnp.zeros((nb, m), dtype), jnp.zeros((nb, m), dtype))
  done0 = jnp.zeros((nb,), bool) if done is None else done
  st, s, _, _, pending = while_loop(cond, step, (flat, s0, done0, excluded0, none))
  st = st._replace(kinv=_apply(st.kinv, pending).reshape(nb, m, m))

  # Iterative refinement of the passive solutions against the drift of kinv.
  # A rolled loop: each unrolled copy is more kernels to compile.
  mask = st.passive.astype(dtype)

  def refine_once(_, y):
    r = h * mask - mask * jnp.matmul(y * mask, kkt, precision=_HI)
    return y + jnp.einsum("bij,bj->bi", st.kinv, r, precision=_HI)

  y = lax.fori_loop(0, refine, refine_once, s)
  x = jnp.where(st.passive[:, :t], jnp.maximum(y[:, :t], 0), 0)
  return st._replace(x=x), y


class _Pivot(NamedTuple):
  passive: jax.Array  # [B, T] bool, the passive set (x_i free)
  x: jax.Array  # [B, T], 0 off the passive set
  y: jax.Array  # [B, T] the gradient Qx + q (recomputed at restarts)
  noise: jax.Array  # [B, T] |Q||x| + |q| at the last restart, y's rounding level
  r: jax.Array  # [B, T] CG's residual of the passive system
  p: jax.Array  # [B, T] CG's direction
  s: jax.Array  # [B, 7] per-problem scalars (counts as exact floats), `_S`


class _S:  # the columns of `_Pivot.s`
  rr, rr0, k, best, backup, restart, done = range(7)


def _pivot(q_mat, q_vecs, *, max_iters, cg_steps, backup=3, tol=1, sign_tol=8, loose=0.03):
  """Block principal pivoting for `B` nonneg QPs, with CG on the passive systems.

  Júdice and Pires's method (1994; Portugal, Júdice and Vicente 1994 for
  least squares): on a passive set `F` solve `Q_FF x_F = -q_F` and set
  `x = 0` off it; then every passive index with `x_i < 0` and every other
  with a negative gradient `(Qx + q)_i` change sides at once. A full
  exchange that does not lower the number of infeasible indices is allowed
  `backup` times in a row; after that only the largest infeasible index
  changes side (Murty's rule, finite) until the count drops. It usually
  ends in a handful of exchanges where the active-set method adds one
  index per step (the supports of UPGrad's projections at T = 40 have 8 to
  25 heads).

  The passive systems are solved by conjugate gradients on the masked
  matrix, so an iteration is two `[B, T] x [T, T]` products (on a CPU the
  products are most of its cost), a few small ones for the row sums, and
  some `[B, T]` kernels, with no per-problem matrix. A problem is in one of
  two phases. A restart recomputes the gradient from `x` (no drift), with
  its rounding level `eps (|Q||x| + |q|)`, and finishes the problem when
  the residual on the passive set is at that level (`tol` times it, as a
  norm) and `x` meets the KKT conditions (negative gradients below
  `sign_tol` times it count as 0). A CG step exchanges (and restarts) when
  the signs are wrong once the residual has dropped by `loose` since the
  restart (an inexact solve shows most wrong signs, which halves the steps
  on ill-conditioned Gramians), and asks for the restart that checks it at
  the rounding level or after `cg_steps` steps. CG starts from the
  previous passive solution. The loop runs until the slowest problem is
  done.

  Returns:
    `(x, done, iters)`: `[B, T]` the minimisers (where `done`), `[B]` bool,
    the problems solved within `max_iters` iterations (the others are for
    the active-set method), and the iterations run.
  """
  nb, t = q_vecs.shape
  dtype = q_vecs.dtype
  eps = jnp.finfo(dtype).eps
  abs_q = jnp.abs(q_mat)
  abs_qv = jnp.abs(q_vecs)
  ones = jnp.ones((t, 1), dtype)
  ones3 = jnp.kron(jnp.eye(3, dtype=dtype), ones)  # row sums as one product
  heads = jnp.arange(t, dtype=dtype)

  def body(carry):
    c, iters = carry
    col = lambda i: c.s[:, i]  # noqa: E731
    fm = c.passive.astype(dtype)
    restart, done = col(_S.restart) > 0, col(_S.done) > 0
    rs = restart[:, None]
    # At a restart the product is with x (the fresh gradient), else with p.
    qw = jnp.matmul(jnp.where(rs, c.x, c.p), q_mat, precision=_HI)
    noise = jnp.where(rs, jnp.matmul(jnp.abs(c.x), abs_q, precision=_HI) + abs_qv, c.noise)
    pap = jnp.matmul(c.p * qw, ones, precision=_HI)[:, 0]  # p is 0 off the passive set
    rr_old = col(_S.rr)
    alpha = jnp.where(restart | (pap <= 0), 0, rr_old / jnp.where(pap > 0, pap, 1))[:, None]
    x = c.x + alpha * c.p
    y = jnp.where(rs, qw + q_vecs, c.y + alpha * qw)
    r = jnp.where(rs, -fm * y, c.r - alpha * fm * qw)
    infs = (c.passive & (x < 0)) | (~c.passive & (y < -sign_tol * eps * noise))
    sums = jnp.matmul(
        jnp.concatenate([r * r, fm * (tol * eps * noise) ** 2, infs.astype(dtype)], axis=1),
        ones3,
        precision=_HI,
    )
    rr, ninf = sums[:, 0], sums[:, 2]
    small = rr <= sums[:, 1]
    k = jnp.where(restart, 0, col(_S.k) + 1)
    solved = ~done & (small | (~restart & (k >= cg_steps)))
    rough = ~done & ~restart & (rr <= loose**2 * col(_S.rr0))
    ok = ninf == 0
    best, left = col(_S.best), col(_S.backup)
    better = ninf < best
    full = better | (left > 0)
    last = jnp.max(jnp.where(infs, heads, -1), axis=1)
    flip = infs & (full[:, None] | (heads == last[:, None]))
    exchange = (solved | rough) & ~ok
    passive = c.passive ^ (exchange[:, None] & flip)
    beta = jnp.where(restart, 0, rr / jnp.where(rr_old > 0, rr_old, 1))[:, None]
    s = jnp.stack(
        [
            rr,
            jnp.where(restart, rr, col(_S.rr0)),
            k,
            jnp.where(exchange & better, ninf, best),
            jnp.where(exchange, jnp.where(better, backup, left - 1), left),
            exchange | (solved & ok & ~restart),
            done | (restart & small & ok),
        ],
        axis=1,
    ).astype(dtype)
    x = jnp.where(done[:, None], c.x, jnp.where(passive, x, 0))
    return _Pivot(passive, x, y, noise, r, r + beta * c.p, s), iters + 1

  def cond(carry):
    c, iters = carry
    return ~jnp.all(c.s[:, _S.done] > 0) & (iters < max_iters)

  z = jnp.zeros((nb, t), dtype)
  s0 = jnp.zeros((nb, 7), dtype).at[:, _S.best].set(t + 1).at[:, _S.backup].set(backup)
  c0 = _Pivot(q_vecs < 0, z, z, z, z, z, s0.at[:, _S.restart].set(1))
  c, iters = while_loop(cond, body, (c0, jnp.int32(0)))
  return jnp.where(c.passive, jnp.maximum(c.x, 0), 0), c.s[:, _S.done] > 0, iters


def nonneg_qp(q_mat, q_vecs, *, max_steps=None, max_iters=None):
  """`argmin_{x >= 0} 1/2 x'Qx + q'x` for positive definite `Q`, `B` problems.

  For `B > 1` (UPGrad's `T` projections) block principal pivoting with CG
  solves (`_pivot`) first; a problem it has not finished within
  `max_iters` iterations (cycling, or CG stalled on an ill-conditioned
  passive block) is solved again from scratch by the active-set method,
  whose loop then runs only for those. One problem (DualProj) goes to the
  active-set method directly: its steps are cheap when `B = 1`, and their
  number does not grow with the condition number as CG's does.

  Args:
    q_mat: `[T, T]` symmetric positive definite, shared by the problems.
    q_vecs: `[B, T]`, one linear term per problem.
    max_steps: cap on active-set steps (default `4 T + 16`).
    max_iters: cap on pivoting iterations (default `8 T + 32`; 0 goes
      straight to the active-set method).

  Returns:
    `[B, T]` the minimisers.
  """
  nb, t = q_vecs.shape
  max_steps = 4 * t + 16 if max_steps is None else max_steps
  max_iters = (8 * t + 32 if nb > 1 else 0) if max_iters is None else max_iters

  def active_set(done):
    st, _ = _solve(
        q_mat, q_vecs, _start(q_mat, q_vecs, False), simplex=False, max_steps=max_steps, done=done
    )
    return st.x

  if max_iters == 0:
    return active_set(None)
  x, done, _ = _pivot(q_mat, q_vecs, max_iters=max_iters, cg_steps=2 * t + 4)
  # Under vmap the cond is a select and both branches run; the active-set
  # loop then takes steps only if some problem needs them.
  return lax.cond(
      jnp.all(done), lambda x: x, lambda x: jnp.where(done[:, None], x, active_set(done)), x
  )


def simplex_start(q_mat, q_vec, allowed=None) -> ActiveSet:
  """The initial `ActiveSet` of `simplex_qp` (one problem): the best vertex."""
  return _start(q_mat, q_vec[None], True, allowed)


def simplex_qp(q_mat, q_vec, state=None, *, allowed=None, max_steps=None):
  """`argmin 1/2 x'Qx + q'x` over the probability simplex (one problem).

  `Q` may be singular (duplicate heads, fewer parameters than heads): the
  method keeps the passive heads affinely independent, which keeps its KKT
  block invertible, and a head enters only through a positive Schur
  complement.

  Args:
    q_mat: `[T, T]` symmetric positive semi-definite.
    q_vec: `[T]`.
    state: an `ActiveSet` to warm-start from (feasible for the simplex),
      e.g. the result for a nearby `q_vec`; default `simplex_start`.
    allowed: `[T]` bool, the vertices allowed (default all; the others are
      padding and keep weight 0).
    max_steps: cap on active-set steps (default `4 T + 16`).

  Returns:
    `(x, multiplier, state)`: the `[T]` minimiser, the multiplier `nu` of
    `sum x = 1` (the reduced gradient `Qx + q + nu` is 0 on the support and
    >= 0 off it), and the final `ActiveSet`.
  """
  t = q_vec.shape[0]
  max_steps = 4 * t + 16 if max_steps is None else max_steps
  if state is None:
    state = simplex_start(q_mat, q_vec, allowed)
  state = state._replace(steps=jnp.int32(0))
  st, y = _solve(q_mat, q_vec[None], state, simplex=True, max_steps=max_steps, allowed=allowed)
  x = st.x[0] / jnp.sum(st.x[0])
  return x, y[0, t], st


# ----------------------------------------------------------------------------
# CAGrad: min_{w in simplex} w'b + phi sqrt(w'Qw).


def cagrad_direction(q_mat, b, phi, *, allowed=None, max_rounds=40):
  """The CAGrad weights `w*` and `sqrt(w*'Q w*)`.

  For `t > 0` let `w(t)` be the simplex QP minimiser of `t b'w + 1/2 w'Qw`.
  `w*` is `w(t)` at the root of `F(t) = sqrt(w(t)'Qw(t)) - phi t` (the KKT
  conditions of both problems coincide there, with `t = |g_w| / phi`). On a
  fixed support `w(t) = w0 + t w1` with `w0'Qw1 = 0`, so
  `F(t) = 0` at `t = sqrt(A / (phi^2 - C))`, `A = w0'Qw0`, `C = w1'Qw1`: each
  round solves one warm-started QP and jumps to the root of its piece, inside
  a bisection bracket `[0, max_i sqrt(Q_ii) / phi]` that keeps it safe.

  Args:
    q_mat: `[T, T]` the (normalised) Gramian.
    b: `[T]`, `Q 1 / T`.
    phi: scalar > 0, `c |g_0|`.
    allowed: `[T]` bool, the heads (default all; the others are padding).
    max_rounds: cap on QP solves.

  Returns:
    `(w, norm)`: `[T]` simplex weights and `sqrt(w'Qw)`.
  """
  t_heads = b.shape[0]
  dtype = b.dtype
  eps = jnp.finfo(dtype).eps
  smax = jnp.sqrt(jnp.max(jnp.diagonal(q_mat)))
  t_hi = smax / phi
  e_last = jnp.zeros(t_heads + 1, dtype).at[t_heads].set(1)
  b_rhs = jnp.concatenate([-b, jnp.zeros((1,), dtype)])

  def norm(w):
    return jnp.sqrt(jnp.maximum(jnp.dot(w, _mv(q_mat, w), precision=_HI), 0))

  def piece_root(st):
    w0 = _mv(st.kinv[0], e_last)[:t_heads]
    w1 = _mv(st.kinv[0], b_rhs)[:t_heads]
    a = jnp.maximum(jnp.dot(w0, _mv(q_mat, w0), precision=_HI), 0)
    c = jnp.maximum(jnp.dot(w1, _mv(q_mat, w1), precision=_HI), 0)
    den = phi**2 - c
    return jnp.where(den > 0, jnp.sqrt(a / jnp.where(den > 0, den, 1)), jnp.inf)

  class Carry(NamedTuple):
    t: jax.Array
    lo: jax.Array
    hi: jax.Array
    st: ActiveSet
    w: jax.Array
    rounds: jax.Array
    done: jax.Array

  def body(c):
    w, _, st = simplex_qp(q_mat, c.t * b, c.st, allowed=allowed)
    f = norm(w) - phi * c.t
    lo = jnp.where(f > 0, c.t, c.lo)
    hi = jnp.where(f > 0, c.hi, c.t)
    cand = piece_root(st)
    support_same = jnp.all(st.passive == c.st.passive)
    converged = (jnp.abs(f) <= 16 * eps * smax) | (hi - lo <= 4 * eps * hi)
    converged |= support_same & (c.rounds > 0) & (jnp.abs(cand - c.t) <= 16 * eps * c.t)
    inside = (cand > lo) & (cand < hi)
    t_next = jnp.where(inside, cand, 0.5 * (lo + hi))
    return Carry(t_next, lo, hi, st, w, c.rounds + 1, converged)

  def cond(c):
    return ~c.done & (c.rounds < max_rounds)

  st0 = simplex_start(q_mat, t_hi * b, allowed)
  c0 = Carry(t_hi, jnp.zeros((), dtype), t_hi, st0, st0.x[0], jnp.int32(0), jnp.bool_(False))
  c = while_loop(cond, body, c0)
  # Polish: the exact root on the final support, when it lies in the simplex.
  t_star = piece_root(c.st)
  w_piece = (_mv(c.st.kinv[0], e_last) + t_star * _mv(c.st.kinv[0], b_rhs))[:t_heads]
  ok = jnp.isfinite(t_star) & jnp.all(w_piece >= -eps)
  w = jnp.where(ok, jnp.maximum(w_piece, 0), c.w)
  w = w / jnp.sum(w)
  return w, norm(w)


def cagrad_two(q_mat, b, phi):
  """`cagrad_direction` for two heads, in closed form.

  On the segment `w = (g, 1 - g)`, `w'Qw = a g^2 + 2 c g + d` with
  `a = Q11 - 2 Q12 + Q22`, `c = Q12 - Q22`, `d = Q22`, and the objective's
  derivative is `-beta + phi (a g + c) / sqrt(w'Qw)`, `beta = b2 - b1`. Its
  second term is at most `phi sqrt(a)` in size (Cauchy-Schwarz), so when
  `phi^2 a <= beta^2` the objective is monotone and the minimiser is the
  vertex `beta` points to; otherwise the stationary point is
  `g = (-c + beta sqrt((ad - c^2) / (phi^2 a - beta^2))) / a`, clipped to
  `[0, 1]` (the objective is convex). One program of a few scalar
  operations, where the root search runs several QPs per call: what a
  two-task toy's hundred thousand steps pay.

  Args:
    q_mat: `[2, 2]` the (normalised) Gramian.
    b: `[2]`, `Q 1 / 2`.
    phi: scalar > 0.

  Returns:
    `(w, norm)`: `[2]` simplex weights and `sqrt(w'Qw)`.
  """
  dtype = b.dtype
  q11, q12, q22 = q_mat[0, 0], q_mat[0, 1], q_mat[1, 1]
  a = q11 - 2 * q12 + q22
  c = q12 - q22
  beta = b[1] - b[0]
  det = jnp.maximum(q11 * q22 - q12**2, 0)
  k = phi**2 * a - beta**2
  interior = (k > 0) & (a > 0)
  safe_k = jnp.where(interior, k, 1)
  safe_a = jnp.where(interior, a, 1)
  g_interior = (-c + beta * jnp.sqrt(det / safe_k)) / safe_a
  g_vertex = jnp.where(beta > 0, 1, jnp.where(beta < 0, 0, 0.5)).astype(dtype)
  g = jnp.clip(jnp.where(interior, g_interior, g_vertex), 0, 1)
  w = jnp.stack([g, 1 - g])
  return w, jnp.sqrt(jnp.maximum(jnp.dot(w, _mv(q_mat, w), precision=_HI), 0))


# ----------------------------------------------------------------------------
# Nash-MTL: min 1/2 a'Ca - sum log a, a > 0.


def nash_newton(corr, *, max_steps, reg):
  """The positive solution of `a_i (C a)_i = 1`, by damped Newton.

  `f(a) = 1/2 a'(C + reg I)a - sum log a` is self-concordant, so Newton's
  step damped by `1 / (1 + lambda)` (`lambda` the Newton decrement) stays
  in `a > 0` and converges from any start (Nesterov and Nemirovski 1994),
  quadratically once `lambda < 1/4`. `reg` keeps `f` bounded when the heads
  are Pareto-stationary (a nonnegative null vector of `C`: no exact
  solution), where `a` then grows like `reg ** -0.5` but stays finite.

  Args:
    corr: `[T, T]` positive semi-definite with unit diagonal.
    max_steps: cap on Newton steps.
    reg: the diagonal shift.

  Returns:
    `[T]` the solution.
  """
  t = corr.shape[0]
  dtype = corr.dtype
  eps = jnp.finfo(dtype).eps
  c = corr + reg * jnp.eye(t, dtype=dtype)
  ones = jnp.ones(t, dtype)
  # Start on the ray of ones at its exact minimiser: t* = sqrt(T / 1'C1).
  a0 = ones * jnp.sqrt(t / jnp.maximum(jnp.sum(c), eps))

  abs_c = jnp.abs(c)

  def body(carry):
    a, _, k = carry
    g = _mv(c, a) - 1 / a
    hess = c + jnp.diag(1 / a**2)
    chol = jnp.linalg.cholesky(hess)
    d = -jax.scipy.linalg.cho_solve((chol, True), g)
    lam = jnp.sqrt(jnp.maximum(-jnp.dot(g, d), 0))
    step = jnp.where(lam < 0.25, 1.0, 1 / (1 + lam))
    a_new = a + step * d
    # Guard against rounding pushing a component to 0 or below.
    a_new = jnp.where(a_new > 0, a_new, 0.5 * a)
    # Pareto-stationary heads: a grows until the Hessian is singular to
    # rounding; stop there, finite.
    ok = jnp.all(jnp.isfinite(a_new))
    a_new = jnp.where(ok, a_new, a)
    # Converged when every a_i (C a)_i - 1 is at its rounding level.
    ca = _mv(c, a_new)
    noise = 8 * eps * (1 + a_new * _mv(abs_c, a_new))
    done = ~ok | jnp.all(jnp.abs(a_new * ca - 1) <= noise)
    return a_new, done, k + 1

  def cond(carry):
    _, done, k = carry
    return ~done & (k < max_steps)

  a, _, _ = while_loop(cond, body, (a0, jnp.bool_(False), jnp.int32(0)))
  return a
