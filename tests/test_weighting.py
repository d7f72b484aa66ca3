"""jheads.weighting: torchjd 0.18's scalarizers to 1e-6, step by step, and the contract around them.

The reference numbers are in tests/data/torchjd_weighting.json, written by
tests/reference/make_torchjd_weighting_vectors.py in a torch + torchjd venv
(float64); these tests need neither.
"""

import collections
import functools
import json
import pathlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import jheads
from jheads import weighting

DATA = json.loads(
    (pathlib.Path(__file__).parent / "data" / "torchjd_weighting.json").read_text()
)
# float32 against torchjd's float64: relative 1e-6, and 1e-6 absolute near zero.
RTOL = ATOL = 1e-6
# Methods that learn with optax's Adam: in float32 optax computes the bias correction
# 1 - b2^t from float32(0.999), 1.3e-5 off torch's Python-float 1 - 0.999, so each step's size
# is off by 6e-6 relative. test_float32_adam_with_exact_bias_correction_matches_to_1e6 shows
# the rest is exact to 1e-6, and test_float64_matches_torchjd_to_1e12 that optax's Adam is.
ADAM_TOL = {"uncertainty": 1e-5, "famo": 1e-5}
STATE_PARAM = {"uncertainty": "log_var", "famo": "logits"}


def optimizer_from(spec):
  if spec is None:
    return None
  if spec["name"] == "adam":
    return optax.adam(spec["lr"])
  if spec["name"] == "sgd":
    return optax.sgd(spec["lr"])
  # torch's Adam(weight_decay=...) is coupled L2: the decay joins the gradient before the moments.
  return optax.chain(optax.add_decayed_weights(spec["weight_decay"]), optax.adam(spec["lr"]))


def make(case):
  kwargs = dict(case["kwargs"])
  if case.get("optimizer") is not None:
    kwargs["optimizer"] = optimizer_from(case["optimizer"])
  if case["factory"] == "fixed":
    return weighting.fixed(kwargs["weights"])
  return getattr(weighting, case["factory"])(**kwargs)


def group_key(case):
  return json.dumps(
      [case["factory"], case["kwargs"], case.get("optimizer"), case["n_heads"]], sort_keys=True
  )


GROUPS = collections.defaultdict(list)
for _case in DATA["cases"]:
  GROUPS[group_key(_case)].append(_case)


def _group_id(key):
  factory, kwargs, optimizer, n_heads = json.loads(key)
  extra = ",".join(f"{k}={v}" for k, v in sorted(kwargs.items()) if not isinstance(v, list))
  lists = ",".join(k for k, v in sorted(kwargs.items()) if isinstance(v, list))
  opt = "" if optimizer is None else "," + ",".join(f"{v}" for v in optimizer.values())
  return f"{factory}[T={n_heads}{',' if extra else ''}{extra}{',' if lists else ''}{lists}{opt}]"


def run_steps(w, n_heads, losses, losses_after=None):
  """Runs `w` over `[S, T]` losses under jit: each step's objective, weights and state."""

  def run(losses, losses_after):
    def body(state, xs):
      step_losses, step_after = xs
      value, weights = jax.value_and_grad(w.loss)(step_losses, state)
      state = w.update(step_losses, state, losses_after=step_after)
      return state, (value, weights, state)

    return jax.lax.scan(body, w.init(n_heads), (losses, losses_after))[1]

  if losses_after is None:
    losses_after = losses
  return run(losses, losses_after)


def run_stateless(w, n_heads, losses, losses_after=None):
  """`run_steps` for a stateless weighting: every step at once, no loop to compile."""
  del losses_after
  values, weights = jax.vmap(jax.value_and_grad(w.loss), in_axes=(0, None))(
      losses, w.init(n_heads)
  )
  return values, weights, None


def steps_array(steps, field):
  return np.asarray([step[field] for step in steps], np.float64)


def group_inputs(cases, dtype=jnp.float32):
  """`[seeds, steps, T]` losses (and losses after) of a group's cases."""
  losses = jnp.asarray(np.stack([steps_array(c["steps"], "losses") for c in cases]), dtype)
  if "losses_after" not in cases[0]["steps"][0]:
    return losses, None
  return losses, jnp.asarray(
      np.stack([steps_array(c["steps"], "losses_after") for c in cases]), dtype
  )


STATEFUL = ("uncertainty", "dwa", "famo")


@functools.cache
def results(n_heads):
  """Every group with `n_heads` heads under one compilation (one per group would dominate the
  file's time), each vmapped over its seeds and scanning its steps."""
  keys = [k for k in sorted(GROUPS) if json.loads(k)[3] == n_heads]
  runs = [
      jax.vmap(functools.partial(
          run_steps if json.loads(k)[0] in STATEFUL else run_stateless,
          make(GROUPS[k][0]), n_heads,
      ))
      for k in keys
  ]

  def run_all(inputs):
    return [run(*args) for run, args in zip(runs, inputs)]

  outputs = jax.jit(run_all)([group_inputs(GROUPS[k]) for k in keys])
  return dict(zip(keys, outputs))


@pytest.mark.parametrize("key", sorted(GROUPS), ids=_group_id)
def test_matches_torchjd(key):
  cases = GROUPS[key]
  factory, n_heads = cases[0]["factory"], cases[0]["n_heads"]
  values, weights, states = results(n_heads)[key]
  tol = RTOL if cases[0].get("optimizer", {}).get("name") == "sgd" else ADAM_TOL.get(factory, RTOL)
  assert_matches(cases, values, weights, states, tol)


def assert_matches(cases, values, weights, states, tol):
  factory = cases[0]["factory"]
  for i, case in enumerate(cases):
    where = f"seed {case['seed']}"
    np.testing.assert_allclose(
        values[i], steps_array(case["steps"], "value"), rtol=tol, atol=tol, err_msg=where
    )
    np.testing.assert_allclose(
        weights[i], steps_array(case["steps"], "weights"), rtol=tol, atol=tol, err_msg=where
    )
    field = STATE_PARAM.get(factory)
    if field is not None:
      np.testing.assert_allclose(
          getattr(states, field)[i], steps_array(case["steps"], field),
          rtol=tol, atol=tol, err_msg=where,
      )


def adam_with_exact_bias_correction(lr, b1=0.9, b2=0.999, eps=1e-8):
  """torch's Adam in float32, with `1 - b^t` as `-expm1(t log b)` from double-precision logs."""
  log_b1, log_b2 = np.log(b1), np.log(b2)

  def init(params):
    return jnp.zeros_like(params), jnp.zeros_like(params), jnp.zeros((), jnp.int32)

  def update(grads, state, params=None):
    del params
    mu, nu, count = state
    count = count + 1
    mu = b1 * mu + (1 - b1) * grads
    nu = b2 * nu + (1 - b2) * grads * grads
    t = count.astype(grads.dtype)
    mu_hat, nu_hat = mu / -jnp.expm1(t * log_b1), nu / -jnp.expm1(t * log_b2)
    return -lr * mu_hat / (jnp.sqrt(nu_hat) + eps), (mu, nu, count)

  return optax.GradientTransformation(init, update)


def test_float32_adam_with_exact_bias_correction_matches_to_1e6():
  keys = [
      k for k in sorted(GROUPS)
      if json.loads(k)[0] in ADAM_TOL and json.loads(k)[3] == 3
      and json.loads(k)[2]["name"] != "sgd"
  ]
  runs = []
  for key in keys:
    case = GROUPS[key][0]
    spec = case["optimizer"]
    optimizer = adam_with_exact_bias_correction(spec["lr"])
    if spec["name"] == "adam_l2":
      optimizer = optax.chain(optax.add_decayed_weights(spec["weight_decay"]), optimizer)
    w = getattr(weighting, case["factory"])(**case["kwargs"], optimizer=optimizer)
    runs.append(jax.vmap(functools.partial(run_steps, w, 3)))
  outputs = jax.jit(lambda inputs: [run(*args) for run, args in zip(runs, inputs)])(
      [group_inputs(GROUPS[k]) for k in keys]
  )
  assert len(keys) == 6
  for key, (values, weights, states) in zip(keys, outputs):
    assert_matches(GROUPS[key], values, weights, states, RTOL)


def test_reference_file_covers_the_contract():
  counts = collections.Counter((c["factory"], c["n_heads"]) for c in DATA["cases"])
  for factory in ("equal", "fixed", "uncertainty", "dwa", "geometric", "stch", "famo"):
    for n_heads in (1, 2, 3, 5):
      assert counts[factory, n_heads] >= 3, (factory, n_heads)
  famo_updates = [len(c["steps"]) for c in DATA["cases"] if c["factory"] == "famo"]
  assert min(famo_updates) >= 6
  dwa_steps = [len(c["steps"]) for c in DATA["cases"] if c["factory"] == "dwa"]
  assert min(dwa_steps) >= 4 * DATA["meta"]["dwa_steps_per_epoch"]  # past the two uniform epochs


def test_float64_matches_torchjd_to_1e12():
  # Every method at T = 3, all seeds, optax's own Adam: exact up to float64 rounding.
  keys = [k for k in sorted(GROUPS) if json.loads(k)[3] == 3]
  with jax.enable_x64(True):
    runs = [
        jax.vmap(functools.partial(
            run_steps if json.loads(k)[0] in STATEFUL else run_stateless, make(GROUPS[k][0]), 3
        ))
        for k in keys
    ]
    outputs = jax.jit(lambda inputs: [run(*args) for run, args in zip(runs, inputs)])(
        [group_inputs(GROUPS[k], jnp.float64) for k in keys]
    )
    for key, (values, weights, states) in zip(keys, outputs):
      assert values.dtype == weights.dtype == jnp.float64
      assert_matches(GROUPS[key], values, weights, states, 1e-12)


# ----------------------------------------------------------------------------
# The contract: jit, vmap, many devices, gradients.


def all_weightings(n_heads=3):
  """One of each factory, with non-default hyper-parameters where that matters."""
  return {
      "equal": weighting.equal(),
      "fixed": weighting.fixed(np.linspace(0.5, 2.0, n_heads)),
      "uncertainty": weighting.uncertainty(init_log_var=-0.5),
      "dwa": weighting.dwa(steps_per_epoch=2, temperature=0.5),
      "random": weighting.random(key=jax.random.key(3)),
      "geometric": weighting.geometric(),
      "stch": weighting.stch(mu=0.5, pref_vector=np.full(n_heads, 1 / n_heads)),
      "famo": weighting.famo(),
  }


def key_data(tree):
  """`tree` with PRNG keys as their integer data, so that it compares with numpy."""
  return jax.tree.map(
      lambda x: jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x,
      tree,
  )


def loss_sequence(n_steps=4, n_heads=3, seed=0):
  """Losses, and the losses after a step, each head's falling by its own factor."""
  rng = np.random.RandomState(seed)
  losses = np.exp(rng.normal(0.0, 0.7, (n_steps, n_heads))).astype(np.float32)
  factors = np.exp(rng.normal(-0.1, 0.2, (n_steps, n_heads))).astype(np.float32)
  return jnp.asarray(losses), jnp.asarray(losses * factors)


def test_jit_equals_eager_over_updates():
  losses, after = loss_sequence()
  weightings = all_weightings()
  jitted = jax.jit(lambda l, a: {k: run_steps(w, 3, l, a) for k, w in weightings.items()})(
      losses, after
  )
  for name, w in weightings.items():
    state, eager = w.init(3), []
    for step_losses, step_after in zip(losses, after):
      value, weights = jax.value_and_grad(w.loss)(step_losses, state)
      state = w.update(step_losses, state, losses_after=step_after)
      eager.append((value, weights, state))
    eager = jax.tree.map(lambda *xs: jnp.stack(xs), *eager)
    chex.assert_shape(jitted[name][:2], [(4,), (4, 3)])
    chex.assert_trees_all_close(
        key_data(jitted[name]), key_data(eager), rtol=1e-6, atol=1e-7, custom_message=name
    )


def test_head_weights_is_the_gradient_and_applies_by_the_chain_rule():
  # A tiny model: L_i(theta) = (a_i . theta - b_i)^2. grad_theta S(L(theta)) = sum_i h_i grad L_i.
  a = jnp.array([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0]])
  b = jnp.array([0.5, 1.0, -1.0])
  theta = jnp.array([0.2, -0.1])

  def head_losses(theta):
    return (a @ theta - b) ** 2 + 0.1

  jacobian = jax.jacobian(head_losses)(theta)
  for name, w in all_weightings().items():
    state = w.init(3)
    h = weighting.head_weights(w, head_losses(theta), state)
    np.testing.assert_allclose(h, jax.grad(w.loss)(head_losses(theta), state), err_msg=name)
    model_grad = jax.grad(lambda t: w.loss(head_losses(t), state))(theta)
    np.testing.assert_allclose(model_grad, h @ jacobian, rtol=1e-5, atol=1e-6, err_msg=name)


def test_head_weights_closed_forms():
  losses = jnp.array([0.5, 2.0, 4.0])
  uw = weighting.uncertainty(init_log_var=0.3)
  np.testing.assert_allclose(
      weighting.head_weights(uw, losses, uw.init(3)), np.full(3, 0.5 * np.exp(-0.3)), rtol=1e-6
  )
  gls = weighting.geometric()
  mean = np.exp(np.mean(np.log(losses)))
  np.testing.assert_allclose(
      weighting.head_weights(gls, losses, gls.init(3)), mean / (3 * losses), rtol=1e-6
  )
  pref = np.array([0.2, 0.3, 0.5])
  st = weighting.stch(mu=0.7, pref_vector=pref, reference=[0.1, 0.0, 0.2])
  y = pref * (np.asarray(losses) - [0.1, 0.0, 0.2])
  softmax = np.exp(y / 0.7) / np.exp(y / 0.7).sum()
  np.testing.assert_allclose(
      weighting.head_weights(st, losses, st.init(3)), pref * softmax, rtol=1e-6
  )
  np.testing.assert_allclose(st.loss(losses, None), 0.7 * np.log(np.exp(y / 0.7).sum()), rtol=1e-6)
  famo = weighting.famo(min_losses=[0.1, 0.1, 0.1])
  d = np.asarray(losses) - 0.1 + 1e-8
  np.testing.assert_allclose(  # z uniform at the start: proportional to 1 / D, summing to 1
      weighting.head_weights(famo, losses, famo.init(3)), (1 / d) / np.sum(1 / d), rtol=1e-6
  )


def test_equal_and_fixed_are_plain_weighted_sums():
  losses = jnp.array([0.25, 3.0, 1.5, 7.0])
  eq = weighting.equal()
  assert float(eq.loss(losses, eq.init(4))) == pytest.approx(float(jnp.sum(losses)), rel=1e-7)
  np.testing.assert_array_equal(weighting.head_weights(eq, losses, eq.init(4)), np.ones(4))
  w = np.array([1.0, 0.5, -2.0, 0.125])
  fx = weighting.fixed(w)
  assert float(fx.loss(losses, fx.init(4))) == pytest.approx(float(np.dot(w, losses)), rel=1e-7)
  np.testing.assert_array_equal(
      weighting.head_weights(fx, losses, fx.init(4)), w.astype(np.float32)
  )
  # What multi_head computes with the same head weights.
  head = jheads.multi_head(
      [jheads.regression_head(name=f"r{i}") for i in range(4)], head_weights=list(w)
  )
  labels = {f"r{i}": jnp.full((2, 1), float(i)) for i in range(4)}

  @jax.jit
  def both(logits):
    total, head_losses = head.losses_fn(logits, labels)
    return total, fx.loss(jnp.stack([head_losses[f"r{i}"] for i in range(4)]), fx.init(4))

  total, weighted = both(jnp.zeros((2, 4)))
  np.testing.assert_allclose(weighted, total, rtol=1e-6)
  # The state never moves.
  assert fx.update(losses, fx.init(4)) == fx.init(4)


def test_vmap_over_a_batch_of_loss_vectors():
  losses, _ = loss_sequence(n_steps=3)
  weightings = all_weightings()

  def both(losses):
    out = {}
    for name, w in weightings.items():
      state = w.init(3)
      batched = jax.vmap(functools.partial(weighting.head_weights, w), in_axes=(0, None))(
          losses, state
      )
      out[name] = batched, jnp.stack([weighting.head_weights(w, l, state) for l in losses])
    return out

  for name, (batched, one_by_one) in jax.jit(both)(losses).items():
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-6, err_msg=name)


def test_replicated_state_gives_the_same_step_on_every_device():
  n_devices = jax.device_count()
  assert n_devices == 8
  losses, after = loss_sequence(n_steps=1)
  losses, after = losses[0], after[0]
  weightings = all_weightings()
  states = {name: w.init(3) for name, w in weightings.items()}

  def step(local_losses, local_after, states):
    # Each device holds the global losses (a train step psums its shares) and the replicated state.
    return {
        name: (weighting.head_weights(w, local_losses, states[name]),
               w.update(local_losses, states[name], losses_after=local_after))
        for name, w in weightings.items()
    }

  tile = lambda x: jnp.broadcast_to(x, (n_devices, *x.shape))
  per_device = jax.pmap(step, in_axes=(0, 0, None))(tile(losses), tile(after), states)
  one_device = jax.jit(step)(losses, after, states)
  for name in weightings:
    for leaf, expected in zip(jax.tree.leaves(key_data(per_device[name])),
                              jax.tree.leaves(key_data(one_device[name]))):
      np.testing.assert_allclose(leaf, tile(expected), rtol=1e-6, err_msg=name)


def test_shard_map_on_psummed_loss_shares_equals_one_device():
  n_devices = jax.device_count()
  losses, after = loss_sequence(n_steps=1)
  losses, after = losses[0], after[0]
  rng = np.random.RandomState(1)
  # Each device's share of the losses, as a train step's shards hold them; they sum to the losses.
  split = rng.dirichlet(np.ones(n_devices), size=3).T.astype(np.float32)  # [devices, T]
  shares, after_shares = jnp.asarray(split) * losses, jnp.asarray(split) * after
  weightings = all_weightings()
  states = {name: w.init(3) for name, w in weightings.items()}

  def step(losses, losses_after, states):
    return {
        name: (weighting.head_weights(w, losses, states[name]),
               w.update(losses, states[name], losses_after=losses_after))
        for name, w in weightings.items()
    }

  def per_shard(shares, after_shares, states):
    total = lambda x: jax.lax.psum(x[0], "batch")
    return step(total(shares), total(after_shares), states)

  mesh = jax.make_mesh((n_devices,), ("batch",))
  by_device = jax.device_put((shares, after_shares), NamedSharding(mesh, P("batch")))
  sharded = jax.jit(jax.shard_map(
      per_shard, mesh=mesh, in_specs=(P("batch"), P("batch"), P()), out_specs=P()
  ))(*by_device, states)
  expected = jax.jit(step)(jnp.sum(shares, 0), jnp.sum(after_shares, 0), states)
  chex.assert_trees_all_close(key_data(sharded), key_data(expected), rtol=1e-6, atol=1e-7)


def test_bf16_losses_are_weighted_in_float32():
  losses = jnp.array([0.5, 2.0, 3.0], jnp.bfloat16)
  for name, w in all_weightings().items():
    state = w.init(3)
    assert jax.eval_shape(w.loss, losses, state).dtype == jnp.float32, name
    weights = jax.eval_shape(functools.partial(weighting.head_weights, w), losses, state)
    assert weights.dtype == jnp.bfloat16, name


# ----------------------------------------------------------------------------
# Method behaviour.


def test_dwa_is_uniform_for_two_epochs_then_t_softmax_of_the_ratios():
  w = weighting.dwa(steps_per_epoch=3, temperature=2.0)
  update = jax.jit(w.update)
  weights_of = jax.jit(functools.partial(weighting.head_weights, w))
  rng = np.random.RandomState(0)
  epochs = np.exp(rng.normal(size=(5, 3, 2))).astype(np.float32)  # [epoch, step, head]
  state = w.init(2)
  for epoch, batches in enumerate(epochs):
    for losses in batches:
      weights = weights_of(jnp.asarray(losses), state)
      if epoch < 2:
        np.testing.assert_array_equal(weights, [1.0, 1.0])
      else:
        rates = epochs[epoch - 1].mean(0) / epochs[epoch - 2].mean(0)
        expected = 2 * np.exp(rates / 2) / np.exp(rates / 2).sum()
        np.testing.assert_allclose(weights, expected, rtol=1e-6)
        assert float(weights.sum()) == pytest.approx(2.0, rel=1e-6)
      state = update(jnp.asarray(losses), state)
    assert int(state.count) == 0  # the epoch rolled inside jit
  assert int(state.n_epochs) == 2


def test_random_draws_softmax_normal_from_the_state_key():
  key = jax.random.key(7)
  w = weighting.random(key=key)
  state = w.init(4)
  losses = jnp.array([1.0, 2.0, 3.0, 4.0])
  draw_key, next_key = jax.random.split(key)
  expected = jax.nn.softmax(jax.random.normal(draw_key, (4,)))
  np.testing.assert_allclose(weighting.head_weights(w, losses, state), expected, rtol=1e-6)
  np.testing.assert_allclose(w.loss(losses, state), jnp.dot(expected, losses), rtol=1e-6)
  state = w.update(losses, state)
  np.testing.assert_array_equal(jax.random.key_data(state.key), jax.random.key_data(next_key))
  # Weights are positive, sum to 1, and average 1/T over many steps.
  def draw(state, _):
    return w.update(losses, state), weighting.head_weights(w, losses, state)

  draws = np.asarray(jax.jit(lambda s: jax.lax.scan(draw, s, length=300)[1])(state))
  assert np.all(draws > 0)
  np.testing.assert_allclose(draws.sum(1), 1.0, rtol=1e-6)
  np.testing.assert_allclose(draws.mean(0), 0.25, atol=0.02)
  # A legacy uint32 key works too.
  legacy = weighting.random(key=jax.random.PRNGKey(0))
  assert weighting.head_weights(legacy, losses, legacy.init(4)).shape == (4,)


def test_uncertainty_log_variance_tends_to_log_loss():
  w = weighting.uncertainty(optimizer=optax.adam(0.05))
  losses = jnp.array([0.1, 1.0, 20.0])
  update = jax.jit(w.update)
  state = w.init(3)
  for _ in range(600):
    state = update(losses, state)
  np.testing.assert_allclose(state.log_var, np.log(losses), atol=1e-2)
  np.testing.assert_allclose(  # the weight 1 / (2 L)
      weighting.head_weights(w, losses, state), 1 / (2 * losses), rtol=2e-2
  )


def test_famo_gives_weight_to_the_head_whose_loss_falls_slower():
  w = weighting.famo()
  state = w.init(2)
  update = jax.jit(w.update)
  losses = jnp.array([1.0, 1.0])
  for _ in range(10):  # head 0 falls by 1%, head 1 by 20% each step
    state = update(losses, state, losses_after=losses * jnp.array([0.99, 0.8]))
  z = jax.nn.softmax(state.logits)
  assert z[0] > 0.6 > z[1]
  np.testing.assert_allclose(weighting.head_weights(w, losses, state), z, rtol=1e-6)


# ----------------------------------------------------------------------------
# Degenerate inputs: one head, zeros, equal losses.


def test_one_head():
  losses = jnp.array([2.5])
  expected = {
      "equal": 1.0, "fixed": 0.5, "uncertainty": 0.5 * np.exp(0.5), "dwa": 1.0, "random": 1.0,
      "geometric": 1.0, "stch": 1.0, "famo": 1.0,
  }
  weightings = all_weightings(n_heads=1)
  outputs = jax.jit(
      lambda l: {k: run_steps(w, 1, l, l * 0.5) for k, w in weightings.items()}
  )(jnp.stack([losses, losses]))
  for name, (values, weights, states) in outputs.items():
    np.testing.assert_allclose(weights[0], [expected[name]], rtol=1e-6, err_msg=name)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(weights)), name


def test_geometric_degenerate_inputs_as_torchjd():
  w = weighting.geometric()
  for entry in (d for d in DATA["degenerate"] if d["factory"] == "geometric"):
    losses = jnp.asarray(entry["losses"], jnp.float32)
    state = w.init(losses.shape[0])
    if "raises" in entry:  # torchjd raises on a negative loss; so does jheads, eagerly
      with pytest.raises(ValueError, match="geometric: losses must be non-negative"):
        w.loss(losses, state)
      err, _ = jax.jit(jheads.checked(w.loss))(losses, state)
      with pytest.raises(Exception, match="geometric: losses must be non-negative"):
        err.throw()
      continue
    value, weights = jax.value_and_grad(w.loss)(losses, state)
    assert float(value) == entry["value"] == 0.0
    expected = np.array([np.nan if x is None else x for x in entry["weights"]])
    finite = ~np.isnan(expected)
    np.testing.assert_array_equal(np.asarray(weights)[finite], expected[finite])
    # Where torchjd has 0/0, jheads gives 0 for T >= 2 (S is flat at 0) and 1 for T = 1 (S = L).
    np.testing.assert_array_equal(
        np.asarray(weights)[~finite], 1.0 if losses.shape[0] == 1 else 0.0
    )


def test_famo_equal_log_changes_leave_the_logits():
  for entry in (d for d in DATA["degenerate"] if d["factory"] == "famo"):
    w = weighting.famo()
    losses = jnp.asarray(entry["losses"], jnp.float32)
    state = w.init(losses.shape[0])
    value, weights = jax.value_and_grad(w.loss)(losses, state)
    np.testing.assert_allclose(value, entry["value"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(weights, entry["weights"], rtol=1e-6)
    state = w.update(losses, state, losses_after=jnp.asarray(entry["losses_after"]))
    np.testing.assert_array_equal(state.logits, entry["logits"])


def test_stch_large_losses_and_small_mu_stay_finite():
  w = weighting.stch(mu=1e-3)
  losses = jnp.array([3e4, 1e4, 2.9999e4])
  value, weights = jax.value_and_grad(w.loss)(losses, w.init(3))
  assert np.isfinite(value) and np.all(np.isfinite(weights))
  np.testing.assert_allclose(value, 1e4, rtol=1e-6)
  np.testing.assert_allclose(weights, [1 / 3, 0.0, 0.0], atol=1e-6)


# ----------------------------------------------------------------------------
# Errors: ValueErrors naming the factory.


@pytest.mark.parametrize(
    "build, match",
    [
        (
            lambda: weighting.fixed([1.0, 2.0]).init(3),
            "fixed: weights has 2 entries but there are 3 heads",
        ),
        (lambda: weighting.fixed([1.0, np.inf]), "fixed: weights must be finite"),
        (lambda: weighting.fixed([[1.0, 2.0]]), "fixed: weights must be a non-empty 1-D vector"),
        (lambda: weighting.fixed([]), "fixed: weights must be a non-empty 1-D vector"),
        (lambda: weighting.equal().init(0), "equal: n_heads must be a positive int"),
        (lambda: weighting.equal().init(2.0), "equal: n_heads must be a positive int"),
        (lambda: weighting.dwa(steps_per_epoch=0), "dwa: steps_per_epoch must be a positive int"),
        (lambda: weighting.dwa(steps_per_epoch=2.5), "dwa: steps_per_epoch must be a positive int"),
        (
            lambda: weighting.dwa(steps_per_epoch=3, temperature=0.0),
            "dwa: temperature must be strictly positive",
        ),
        (
            lambda: weighting.dwa(steps_per_epoch=3, temperature=-1.0),
            "dwa: temperature must be strictly positive",
        ),
        (lambda: weighting.stch(mu=0.0), "stch: mu must be strictly positive"),
        (lambda: weighting.stch(mu=float("nan")), "stch: mu must be a finite positive number"),
        (
            lambda: weighting.stch(pref_vector=[0.5, 0.5]).init(3),
            "stch: pref_vector has 2 entries but there are 3 heads",
        ),
        (
            lambda: weighting.stch(reference=[0.0]).init(2),
            "stch: reference has 1 entries but there are 2 heads",
        ),
        (
            lambda: weighting.stch(pref_vector=[0.5, 0.5], reference=[0.0]),
            "stch: pref_vector has 2 entries but reference has 1",
        ),
        (lambda: weighting.random(key=0), "random: key must be a jax.random.key"),
        (lambda: weighting.random(key=None), "random: key must be a jax.random.key"),
        (
            lambda: weighting.uncertainty(init_log_var=float("inf")),
            "uncertainty: init_log_var must be a finite number",
        ),
        (
            lambda: weighting.uncertainty(optimizer="adam"),
            "uncertainty: optimizer must be an optax GradientTransformation",
        ),
        (
            lambda: weighting.famo(min_losses=[0.0, 0.0]).init(3),
            "famo: min_losses has 2 entries but there are 3 heads",
        ),
        (
            lambda: weighting.famo(optimizer=0.025),
            "famo: optimizer must be an optax GradientTransformation",
        ),
    ],
)
def test_bad_arguments_raise(build, match):
  with pytest.raises(ValueError, match=match):
    build()


def test_bad_losses_raise_naming_the_factory():
  for name, w in all_weightings().items():
    state = w.init(3)
    with pytest.raises(ValueError, match=f"{name}: losses must"):
      w.loss(jnp.ones((3, 1)), state)
    with pytest.raises(ValueError, match=f"{name}: losses must"):
      w.loss(jnp.ones(()), state)
  for name in ("fixed", "uncertainty", "dwa", "stch", "famo"):  # these know T from their state
    w = all_weightings()[name]
    with pytest.raises(ValueError, match=rf"{name}: losses must have shape \(3,\)"):
      jax.jit(w.loss)(jnp.ones(2), w.init(3))


def test_famo_needs_losses_after_and_losses_above_the_bound():
  w = weighting.famo(min_losses=1.0)
  assert w.needs_losses_after
  assert not any(v.needs_losses_after for k, v in all_weightings().items() if k != "famo")
  state = w.init(2)
  with pytest.raises(ValueError, match="famo: update needs losses_after"):
    w.update(jnp.array([2.0, 3.0]), state)
  with pytest.raises(ValueError, match="famo: losses must be above min_losses"):
    w.loss(jnp.array([0.5, 3.0]), state)
  with pytest.raises(ValueError, match="famo: losses_after must be above min_losses"):
    w.update(jnp.array([2.0, 3.0]), state, losses_after=jnp.array([2.0, 0.5]))
