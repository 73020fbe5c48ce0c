"""The cost model and the cut placement of the performance issue (9): the backend's
measured rates, auto's choice by estimated time, fan-outs cut once (diamonds, residual
stacks, attention blocks: uses linear in the program), each against the oracle."""

import dataclasses
import time

import jax
import jax.numpy as jnp
import pytest

import ntk_compiler as nc
from ntk_compiler import cost, planner
from oracle import assert_matches, oracle_ntk
from tiers import full


def _normal(shape, seed):
  return jax.random.normal(jax.random.PRNGKey(seed), shape)


def test_calibration_measures_positive_rates_and_caches_them(tmp_path, monkeypatch):
  monkeypatch.setenv("NTK_COMPILER_CACHE", str(tmp_path))
  monkeypatch.setenv("NTK_COMPILER_CALIBRATE", "1")
  monkeypatch.setattr(cost, "_MACHINES", {})
  monkeypatch.setattr(cost, "_others_share", lambda *a: 0.0)  # a quiet machine
  measured = cost.machine("cpu")
  assert measured.measured and measured.backend == "cpu"
  for name in cost._RATES:
    assert 1e6 < getattr(measured, name) < 1e16, name
  assert len(list(tmp_path.iterdir())) == 1
  monkeypatch.setattr(cost, "_MACHINES", {})
  monkeypatch.setattr(cost, "_calibrate", lambda backend: pytest.fail("not cached"))
  assert cost.machine("cpu") == measured  # read back from the disk cache


def test_rates_measured_beside_other_work_are_not_cached(tmp_path, monkeypatch):
  """Other processes used over BUSY_SHARE of the CPU while the rates were measured:
  this process uses them, the next one measures again."""
  monkeypatch.setenv("NTK_COMPILER_CACHE", str(tmp_path))
  monkeypatch.setenv("NTK_COMPILER_CALIBRATE", "1")
  monkeypatch.setattr(cost, "_MACHINES", {})
  shares = []
  real = cost._others_share
  monkeypatch.setattr(cost, "_others_share", lambda *a: shares.append(real(*a)) or 0.5)
  measured = cost.machine("cpu")
  assert measured.measured and list(tmp_path.iterdir()) == []
  assert shares[0] is None or 0.0 <= shares[0] <= 1.0
  assert cost.machine("cpu") is measured  # kept in memory for this process


def test_others_share_from_cpu_ticks():
  assert cost._others_share((100, 50, 10), (200, 120, 20)) == pytest.approx(0.2)
  assert cost._others_share((100, 50, 10), (200, 150, 60)) == 0.0
  assert cost._others_share(None, (200, 150, 60)) is None


def test_defaults_when_calibration_is_off(monkeypatch):
  monkeypatch.setenv("NTK_COMPILER_CALIBRATE", "0")
  monkeypatch.setattr(cost, "_MACHINES", {})
  rates = cost.machine("cpu")
  assert not rates.measured
  assert rates.seconds(rates.flops_per_s, rates.bytes_per_s) == pytest.approx(2.0)


def test_family_flops_split_dots_convs_and_the_rest():
  def f(w, k, x):
    y = jax.lax.conv_general_dilated(x, k, (1, 1), "SAME")
    return jnp.tanh(y.reshape(x.shape[0], -1) @ w)
  x, k, w = jnp.ones((2, 3, 8, 8)), jnp.ones((4, 3, 3, 3)), jnp.ones((256, 5))
  flops = cost.jaxpr_family_flops(jax.make_jaxpr(f)(w, k, x))
  assert flops["conv"] == 2 * 2 * 4 * 8 * 8 * 27
  assert flops["dot"] == 2 * 2 * 5 * 256
  assert flops["other"] == 2 * 4 * 8 * 8 + 2 * 5  # one per output entry: reshape, tanh
  assert cost.jaxpr_flops(jax.make_jaxpr(f)(w, k, x)) == sum(flops.values())


def _mlp(params, x):
  h = jnp.tanh(x @ params["w0"])
  return h @ params["w1"]


@pytest.mark.parametrize("trace_axes", [(-1,), pytest.param((), marks=full)])
def test_auto_picks_the_lowest_estimated_time(trace_axes):
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), _normal((4, 6), 3)
  ntk_fn = nc.compile_ntk(_mlp, trace_axes=trace_axes)
  plan = ntk_fn.plan(params, x1, x2)
  seconds = plan.estimate.seconds
  assert set(seconds) == {"jacobian", "ntk_vp", "structured"}
  lowest = min(seconds, key=seconds.get)
  assert plan.method == ("structured" if seconds["structured"] <= (
      planner.STRUCTURED_MARGIN * seconds[lowest]) else lowest)
  assert all(plan.estimate.bytes[m] > 0 for m in seconds)
  explained = str(ntk_fn.explain(params, x1, x2))
  assert "seconds" in explained and "bytes" in explained
  assert_matches(ntk_fn(params, x1, x2),
                 oracle_ntk(_mlp, params, x1, x2, trace_axes=trace_axes), 1e-10)


def _diamonds(depth):
  def f(p, x):
    h = x @ p["w0"]
    for _ in range(depth):
      h = h + jnp.flip(h, -1)  # a linear diamond: two paths from h that meet again
    return jnp.tanh(h) @ p["w1"]
  return f


def test_diamonds_give_one_use_per_leaf_and_plan_in_linear_time():
  params = {"w0": _normal((4, 6), 0) / 2, "w1": _normal((6, 3), 1) / 3}
  x1, x2 = _normal((3, 4), 2), _normal((2, 4), 3)
  times = {}
  for depth in (4, 16):
    f = _diamonds(depth)
    ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
    start = time.perf_counter()
    plan = ntk_fn.plan(params, x1, x2)
    times[depth] = time.perf_counter() - start
    # Without cuts at fan-outs w0 had 2**depth uses.
    assert [len(plan.engine.uses_of(leaf)) for leaf in range(2)] == [1, 1]
    assert_matches(ntk_fn(params, x1, x2),
                   oracle_ntk(f, params, x1, x2, trace_axes=()), 1e-10)
  assert times[16] < 10 * times[4] + 1.0  # linear, not 2**12 times as long


@full
def test_a_residual_stack_has_uses_linear_in_its_depth():
  depth = 50
  params = {"w": [_normal((8, 8), i) / 8 for i in range(depth)],
            "b": [jnp.zeros(8) for _ in range(depth)]}

  def f(p, x):
    for w, b in zip(p["w"], p["b"]):
      x = x + jnp.tanh(x @ w + b)
    return x

  x = _normal((3, 8), 99)
  ntk_fn = nc.compile_ntk(f, method="structured")
  start = time.perf_counter()
  plan = ntk_fn.plan(params, x)
  assert time.perf_counter() - start < 30  # seconds, even on a busy machine
  assert len(plan.engine.uses) <= 2 * 2 * depth
  assert_matches(ntk_fn(params, x), oracle_ntk(f, params, x), 1e-10)


def test_a_view_stops_before_a_weight_once_it_carries_a_per_example_factor():
  """A layer-norm gain's view (a per-example factor, x̂) meets the next layer's weight:
  its cotangent is taken before that matmul, which the backward pass applies once,
  instead of applying the weight to every use's per-example terms. Exact both ways."""
  params = {"g": 1 + _normal((6,), 0) / 10, "w": _normal((6, 16), 1) / 3,
            "out": _normal((16, 3), 2) / 4}

  def f(p, x):
    xhat = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return jnp.tanh((xhat * p["g"]) @ p["w"]) @ p["out"]

  x1, x2 = _normal((4, 6), 3), _normal((3, 6), 4)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  (use,) = ntk_fn.plan(params, x1, x2).engine.uses_of(0)  # leaves: g, out, w
  assert "weight" in use.reason and use.cut.shape == (1, 6), (use.reason, use.cut.shape)
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2, trace_axes=()),
                 1e-10)


def _leaky(z):
  return jnp.where(z > 0, z, 0.1 * z)


def _tangled(z):  # an intermediate of the activation is also read outside it
  t = jnp.tanh(z)
  return z * t, t


_ACTIVATIONS = {
    "tanh-gelu": (lambda z: jax.nn.gelu(z, approximate=True), True),
    "erf-gelu": (lambda z: jax.nn.gelu(z, approximate=False), True),
    "silu": (jax.nn.silu, True),   # a jit call: linearised whole
    "leaky": (_leaky, True),       # comparison + select inside the region
    "square": (lambda z: z * z + jnp.tanh(z), True),  # one equation reads z twice
    "tangled": (_tangled, False),  # two values leave: no region, cut at z
}


@pytest.mark.parametrize("name", [
    n if n in ("tanh-gelu", "tangled", "square") else pytest.param(n, marks=full)
    for n in _ACTIVATIONS])
def test_a_composite_activation_before_a_pool_is_one_diagonal_factor(name):
  """A per-token MLP whose activation reads its input several times (a fan-out into an
  elementwise region), then a down-projection and a mean over tokens: the first
  weight's view goes through the region as one per-example diagonal factor (its JVP)
  to f's output, instead of stopping at the fan-out. Exact against the oracle either
  way; a region with two values read outside it is not one."""
  act, linearised = _ACTIVATIONS[name]
  params = {"w1": _normal((5, 12), 0) / 2, "b1": _normal((12,), 1) / 4,
            "w2": _normal((12, 4), 2) / 3, "out": _normal((4, 3), 3) / 2}

  def f(p, x):
    h = act(x @ p["w1"] + p["b1"])
    h, extra = h if isinstance(h, tuple) else (h, jnp.zeros_like(h))
    pooled = (h @ p["w2"]).mean(axis=1) + jnp.sum(extra, axis=(1, 2))[:, None]
    return pooled @ p["out"]

  x1, x2 = _normal((3, 8, 5), 4), _normal((2, 8, 5), 5)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  plan = ntk_fn.plan(params, x1, x2)
  (use,) = plan.engine.uses_of(2)  # leaves: b1, out, w1, w2
  assert (use.reason == "at an output of f") == linearised, use.reason
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2, trace_axes=()),
                 1e-10)


def test_an_output_layer_is_no_pooling_head():
  """An MLP's last hidden layer meets only the output weight (a shrinking product, no
  sum or slice): its view stops before the nonlinearity as before (linearising it cost
  an MLP's tiles 15x the FLOPs)."""
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}

  def f(p, x):
    return jax.nn.relu(x @ p["w0"]) @ p["w1"]

  x1 = _normal((4, 6), 2)
  (use,) = nc.compile_ntk(f, method="structured").plan(params, x1).engine.uses_of(0)
  assert use.reason != "at an output of f", use.reason


@pytest.mark.parametrize("x2_given", [True, pytest.param(False, marks=full)])
def test_a_class_token_slice_is_a_pooling_head(x2_given):
  """A ViT's last MLP (tanh-GELU, down-projection, residual) read only at its class
  token, then layer-normed: the first MLP weight's view reaches the token's slice
  through the GELU region, and the kernel is exact with x2 given or omitted."""
  params = {"w1": _normal((4, 10), 0) / 2, "w2": _normal((10, 4), 1) / 3,
            "g": 1 + _normal((4,), 2) / 10, "out": _normal((4, 3), 3) / 2}

  def f(p, x):
    h = x + jax.nn.gelu(x @ p["w1"], approximate=True) @ p["w2"]
    t = h[:, 0]
    t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, keepdims=True) + 1e-5)
    return (t * p["g"]) @ p["out"]

  x1, x2 = _normal((3, 9, 4), 4), _normal((2, 9, 4), 5) if x2_given else None
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  (use,) = ntk_fn.plan(params, x1, x2).engine.uses_of(2)  # leaves: g, out, w1, w2
  steps = use.view.steps
  assert any("elementwise region" in s for s in steps) and "slice" in steps, steps
  assert use.cut.shape == (1, 4), use.cut.shape  # the class token, past the slice
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2, trace_axes=()),
                 1e-10)


@jax.custom_jvp
def _cumulative(z):  # keeps the shape, mixes elements
  return jnp.tanh(jnp.cumsum(z, axis=-1))


@_cumulative.defjvp
def _cumulative_jvp(primals, tangents):
  y = _cumulative(primals[0])
  return y, (1 - y ** 2) * jnp.cumsum(tangents[0], axis=-1)


@jax.custom_vjp
def _halved(z):  # an elementwise custom_vjp: no forward mode
  return jnp.tanh(z)


_halved.defvjp(lambda z: (jnp.tanh(z), jnp.tanh(z)),
               lambda y, g: (0.5 * g * (1 - y ** 2),))


@pytest.mark.parametrize("act, diagonal", [(_cumulative, False), (_halved, True)])
def test_a_custom_derivative_before_a_pool_is_linearised_only_if_diagonal(act, diagonal):
  """A custom-derivative call that keeps its operand's shape is linearised before a
  pooling head only when its own derivative rule is elementwise (its VJP program,
  traced, is): a custom_jvp cumulative sum is cut before instead (its diagonal would
  be wrong), and a custom_vjp activation is linearised by a VJP (no forward mode)."""
  params = {"w": _normal((5, 12), 0) / 3, "v": _normal((12, 3), 1)}

  def f(p, x):
    return act(x @ p["w"]).sum(axis=1)[:, None] * p["v"][0, :]

  x1, x2 = _normal((3, 5), 2), _normal((2, 5), 3)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  (use,) = ntk_fn.plan(params, x1, x2).engine.uses_of(1)  # leaves: v, w
  assert (use.reason == "at an output of f") == diagonal, use.reason
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2, trace_axes=()),
                 1e-10)


@pytest.mark.parametrize("x2_given, per_example", [
    (True, True), pytest.param(False, True, marks=full),
    pytest.param(True, False, marks=full)])
def test_materialised_traced_terms_contract_each_gradient_in_its_own_order(
    monkeypatch, x2_given, per_example):
  """A traced layout's materialised term takes each side's gradient in the order its
  einsum produces it and contracts the two whole (emit._natural_gram): exact against
  the oracle for every leaf of a CNN, materialised all, per example or whole batch."""
  from ntk_compiler import emit
  taken = []
  natural, structured_ntk = emit._natural_gram, emit.structured_ntk
  monkeypatch.setattr(emit, "_natural_gram",
                      lambda *a: taken.append(natural(*a)) or taken[-1])
  monkeypatch.setattr(emit, "structured_ntk", lambda *a: structured_ntk(
      *a[:9], frozenset(range(len(a[2])))))
  params = {"k1": _normal((3, 3, 2, 4), 0) / 3, "k2": _normal((3, 3, 4, 4), 1) / 5,
            "out": _normal((4, 3), 2) / 2}

  def f(p, x):
    dn = ("NHWC", "HWIO", "NHWC")
    h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME",
                                              dimension_numbers=dn))
    h = jax.lax.conv_general_dilated(h, p["k2"], (1, 1), "SAME", dimension_numbers=dn)
    return jnp.tanh(h).mean((1, 2)) @ p["out"]

  x1, x2 = _normal((3, 5, 5, 2), 3), _normal((2, 5, 5, 2), 4) if x2_given else None
  ntk_fn = nc.compile_ntk(f, method="structured",
                          batch_independent=None if per_example else False)
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2), 1e-10)
  assert any(t is not None for t in taken)


@pytest.mark.parametrize("threshold", [0, 2**40])
def test_large_weights_take_x1_and_x2_through_f_as_one_batch(monkeypatch, threshold):
  """Past emit.MERGE_SIDES_FROM_BYTES of weights, one pass over x1 and x2 stacked gives
  both sides (the program has one "sides" scope, not "side1"/"side2"); exact either way,
  with batches of different sizes."""
  from ntk_compiler import emit
  monkeypatch.setattr(emit, "MERGE_SIDES_FROM_BYTES", threshold)
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), _normal((4, 6), 3)
  ntk_fn = nc.compile_ntk(_mlp, method="structured", trace_axes=())
  text = ntk_fn.lower(params, x1, x2).as_text(debug_info=True)
  assert ("ntk/sides" in text) == (threshold == 0)
  assert ("ntk/side2" in text) == (threshold != 0)
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(_mlp, params, x1, x2, trace_axes=()),
                 1e-10)


@full
def test_an_attention_block_cuts_each_shared_value_once():
  """Layer-norm parameters and the residual stream fan out to q, k, v and the skip:
  each leaf's uses stay few, and the kernel is exact."""
  d, s = 8, 5
  keys = iter(range(100))
  params = {"g": 1 + _normal((d,), next(keys)) / 10, "b": _normal((d,), next(keys)) / 10,
            "qkv": _normal((d, 3 * d), next(keys)) / d ** .5,
            "proj": _normal((d, d), next(keys)) / d ** .5,
            "out": _normal((d, 2), next(keys)) / d ** .5}

  def f(p, x):
    mu = x.mean(-1, keepdims=True)
    h = (x - mu) / jnp.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * p["g"] + p["b"]
    q, k, v = jnp.split(h @ p["qkv"], 3, axis=-1)
    att = jax.nn.softmax(jnp.einsum("nsd,ntd->nst", q, k) / d ** .5)
    x = x + jnp.einsum("nst,ntd->nsd", att, v) @ p["proj"]
    return x.mean(1) @ p["out"]

  x1, x2 = _normal((3, s, d), 50), _normal((2, s, d), 51)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=())
  plan = ntk_fn.plan(params, x1, x2)
  assert max(len(plan.engine.uses_of(leaf)) for leaf in range(5)) <= 3
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2, trace_axes=()),
                 1e-10)


def test_a_signature_is_planned_once():
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), _normal((4, 6), 3)
  ntk_fn = nc.compile_ntk(_mlp)
  first = ntk_fn.plan(params, x1, x2)
  again = ntk_fn.plan(params, x1 + 1, x2)  # same signature, other values
  assert again.engine is first.engine and again.estimate is first.estimate
  assert again.problem.x1 is not first.problem.x1
  other = ntk_fn.plan(params, x1[:3], x2)  # another signature: planned anew
  assert other.engine is not first.engine
  assert ntk_fn.plan(params, x1).problem.symmetric
  jitted = jax.jit(ntk_fn)(params, x1, x2)  # under jit: tracers are not kept
  assert_matches(jitted, oracle_ntk(_mlp, params, x1, x2), 1e-10)
  assert_matches(ntk_fn(params, x1 + 1, x2), oracle_ntk(_mlp, params, x1 + 1, x2), 1e-10)


@pytest.mark.parametrize("split_again", [None, 8])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_symmetric_kernels_contract_half_the_pairs_exactly(monkeypatch, trace_axes,
                                                           split_again):
  """x2 omitted, N >= emit.SYMMETRIC_BLOCKS_FROM: pairwise terms from three blocks of
  example pairs (one mirrored), materialised ones whole (here the table and the last
  weight, forced); odd N splits unevenly. With halves of emit.SYMMETRIC_SPLIT_AGAIN_FROM
  examples or more (lowered to 8), the diagonal blocks are split again, twice here."""
  from ntk_compiler import emit
  if split_again is not None:
    monkeypatch.setattr(emit, "SYMMETRIC_SPLIT_AGAIN_FROM", split_again)
  halves, structured_ntk = emit._halves_term, emit.structured_ntk
  sizes = []
  monkeypatch.setattr(emit, "_halves_term", lambda *a: sizes.append(a[5][0][0]) or halves(*a))
  monkeypatch.setattr(emit, "structured_ntk", lambda *a: structured_ntk(
      *a[:9], frozenset({1, 3})))  # leaves in key order: b0, table, w0, w1
  n = emit.SYMMETRIC_BLOCKS_FROM + 1
  params = {"w0": _normal((6, 16), 0) / 3, "b0": _normal((16,), 4) / 3,
            "w1": _normal((16, 3), 1) / 4, "table": _normal((7, 16), 5)}

  def f(p, x):
    h = jnp.tanh(x @ p["w0"] + p["b0"] + p["table"][(x[:, 0] > 0).astype(int)])
    return h @ p["w1"]

  x = _normal((n, 6), 2)
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=trace_axes)
  assert ntk_fn.plan(params, x).batch.independent
  assert_matches(ntk_fn(params, x), oracle_ntk(f, params, x, trace_axes=trace_axes), 1e-10)
  # 33 examples: halves of 16 and 17, each split again (8 | 8, 8 | 9) down to halves
  # of 4 and 5, three levels deep
  assert sizes == ([n] if split_again is None else [n, 16, 8, 8, 17, 8, 9])


def test_explain_shows_the_memory_estimate_and_tiling():
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x = _normal((5, 6), 2)
  ntk_fn = nc.compile_ntk(_mlp, max_memory="1GB")
  text = str(ntk_fn.explain(params, x))
  assert str(ntk_fn.estimate(params, x)) in text and "in one piece" in text
  tiled = nc.compile_ntk(_mlp, block_size=2)
  assert "tiles of 2 x 2 examples" in str(tiled.explain(params, x))


def test_pair_term_estimates_follow_the_emitted_groups():
  """A pair term is emitted as one einsum per group of operands joined by summed labels
  (the input Gram, the cotangent Gram), multiplied at the end; its estimate counts the
  same. An output layer's term as one einsum of all its operands (scalars included)
  took an order of n1 * n2 * 10 * 10 * 512 at 2048 examples: 80x too high, so the cost
  model materialised it and the program ran 3x slower. Estimated on shapes: quadratic
  in N, as the emitted term is."""
  sizes = [32, 512, 512, 512, 10]
  params = [(jax.ShapeDtypeStruct((a, b), jnp.float32), jax.ShapeDtypeStruct(
      (b,), jnp.float32)) for a, b in zip(sizes[:-1], sizes[1:])]

  def f(p, x):
    for w, b in p[:-1]:
      x = jnp.tanh(x @ w + b)
    return x @ p[-1][0] + p[-1][1]

  ntk_fn = nc.compile_ntk(f, method="structured")
  flops = {}
  for n in (256, 2048):
    x = jax.ShapeDtypeStruct((n, 32), jnp.float32)
    estimate = ntk_fn.plan(params, x, x).estimate
    assert estimate.kinds[6] == "pairwise"  # the output weight
    flops[n] = estimate.pairwise_flops[6]
  assert 60 <= flops[2048] / flops[256] <= 66
  assert flops[2048] < 2048 ** 2 * (2 * 512 + 4 * 10 * 10)


@pytest.mark.parametrize("seconds, chosen", [
    ({"jacobian": 1.0, "ntk_vp": 5.0, "structured": 1.2}, "structured"),
    ({"jacobian": 1.0, "ntk_vp": 5.0, "structured": 1.3}, "jacobian"),
    ({"jacobian": 5.0, "ntk_vp": 1.0, "structured": 1.3}, "ntk_vp")])
def test_auto_keeps_structured_within_the_margin(monkeypatch, seconds, chosen):
  """auto takes another method only when it is estimated STRUCTURED_MARGIN times
  faster than structured, and says why."""
  estimate = planner._estimate

  def fixed(*args):
    return dataclasses.replace(estimate(*args), seconds=dict(seconds))
  monkeypatch.setattr(planner, "_estimate", fixed)
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), _normal((4, 6), 3)
  ntk_fn = nc.compile_ntk(_mlp)
  plan = ntk_fn.plan(params, x1, x2)
  assert plan.method == chosen
  assert ("within 1.25x" in plan.reason) == (chosen == "structured")
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(_mlp, params, x1, x2), 1e-10)


def _scan_rnn(p, x):
  def step(h, xt):
    h = jnp.tanh(h @ p["rec"] + xt @ p["inp"])
    return h, None
  h, _ = jax.lax.scan(step, jnp.zeros((x.shape[0], 8)), jnp.swapaxes(x, 0, 1))
  return h @ p["out"]


def test_loop_reads_count_each_parameter_read_in_a_scan_body():
  """The weights a scan body reads are read once per step (a reverse pass adds their
  cotangents each step); the head, outside the loop, once. The Jacobian method's
  estimated traffic grows with the steps by 8 bytes per looped entry and output entry."""
  params = {"inp": _normal((3, 8), 0), "out": _normal((8, 2), 1), "rec": _normal((8, 8), 2)}
  nbytes = {}
  for steps in (5, 9):
    x = _normal((4, steps, 3), 3)
    jaxpr = jax.make_jaxpr(_scan_rnn)(params, x)
    assert cost.loop_reads(jaxpr, 3) == {0: steps, 2: steps}  # inp, rec; not out
    nbytes[steps] = nc.compile_ntk(_scan_rnn).plan(params, x).estimate.bytes["jacobian"]
  looped = (8 * 8 + 3 * 8) * 4  # entries of rec and inp, more steps
  entries = 4 * 2  # outputs of one side (x2 omitted)
  assert nbytes[9] - nbytes[5] >= 8 * looped * entries


@pytest.mark.parametrize("kernel", ["trace", "full"])
def test_materialised_estimates_match_xla_flops(monkeypatch, kernel):
  """Per leaf, materialised minus pairwise FLOPs in the estimate equals the change in
  XLA's FLOP count of the compiled program when that leaf alone is materialised (the
  Gram of the gradients counts a multiply and an add per term, as the pairwise
  einsums do)."""
  from ntk_compiler import emit
  params = {"w0": _normal((6, 32), 0) / 3, "w1": _normal((32, 32), 1) / 6,
            "w2": _normal((32, 4), 2) / 6}

  def f(p, x):
    return jnp.tanh(jnp.tanh(x @ p["w0"]) @ p["w1"]) @ p["w2"]

  x1, x2 = _normal((24, 6), 3), _normal((20, 6), 4)
  trace_axes = (-1,) if kernel == "trace" else ()
  structured_ntk = emit.structured_ntk

  def xla_flops(materialise):
    monkeypatch.setattr(emit, "structured_ntk", lambda *a: structured_ntk(
        *a[:9], frozenset(materialise)))
    ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=trace_axes)
    analysis = ntk_fn.lower(params, x1, x2).compile().cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    return analysis["flops"]

  estimate = nc.compile_ntk(f, method="structured", trace_axes=trace_axes).plan(
      params, x1, x2).estimate
  base = xla_flops(())
  for leaf in (1, 2):  # w1, w2 (w0's factor is the input: both ways cheap)
    measured = xla_flops({leaf}) - base
    estimated = estimate.materialised_flops[leaf] - estimate.pairwise_flops[leaf]
    assert abs(estimated - measured) <= 0.1 * abs(measured), (leaf, estimated, measured)


@pytest.mark.parametrize("x2_given", [True, False])
@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_structured_estimate_counts_shared_grams_once(trace_axes, x2_given):
  """A bias and its layer's weight share the cotangents' Gram in the program (emit's
  memo); the structured estimate counts it once and, with x2 omitted, only the share
  of example pairs contracted (emit.symmetric_pair_share: 3/4 here), landing within
  15% of XLA's FLOP count (counted per leaf it was 1.6-1.9x too high here)."""
  params = [(_normal((6, 32), 0) / 3, _normal((32,), 1)),
            (_normal((32, 32), 2) / 6, _normal((32,), 3)),
            (_normal((32, 4), 4) / 6, _normal((4,), 5))]

  def f(p, x):
    for w, b in p[:-1]:
      x = jnp.tanh(x @ w + b)
    return x @ p[-1][0] + p[-1][1]

  x1, x2 = _normal((96, 6), 6), _normal((80, 6), 7) if x2_given else None
  ntk_fn = nc.compile_ntk(f, method="structured", trace_axes=trace_axes)
  estimate = ntk_fn.plan(params, x1, x2).estimate
  assert set(estimate.kinds.values()) == {"pairwise"}
  analysis = ntk_fn.lower(params, x1, x2).compile().cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  assert abs(estimate.flops["structured"] / analysis["flops"] - 1) < 0.15


@pytest.mark.parametrize("trace_axes", [(-1,), ()])
def test_a_leaf_is_priced_by_what_its_pairwise_term_adds(trace_axes):
  """A weight whose cotangents' Gram its bias's term contracts already (emit's memo)
  is priced pairwise by what its own term adds: the input Gram and the product. Priced
  whole, a transformer's qkv weight (trace kernel, N=8) was materialised and the
  kernel ran 1.4x slower."""
  from ntk_compiler import analysis
  params = [(_normal((6, 32), 0) / 3, _normal((32,), 1)),
            (_normal((32, 4), 2) / 6, _normal((4,), 3))]

  def f(p, x):
    return jnp.tanh(x @ p[0][0] + p[0][1]) @ p[1][0] + p[1][1]

  x1, x2 = _normal((12, 6), 4), _normal((10, 6), 5)
  plan = nc.compile_ntk(f, method="structured", trace_axes=trace_axes).plan(
      params, x1, x2)
  problem, engine = plan.problem, plan.engine
  (layout,), (s1,), (s2,) = problem.layouts, problem.shapes1, problem.shapes2

  def shared(leaves):
    return analysis.shared_pair_flops(engine, plan.engine2 or engine, leaves, layout, s1,
                                      s2, problem.batch_independent, problem.symmetric)
  for bias, weight in ((1, 0), (3, 2)):
    assert plan.estimate.kinds[bias] == plan.estimate.kinds[weight] == "pairwise"
    added = shared([bias, weight]) - shared([bias])
    assert added < shared([weight])  # the Gram they share is not counted twice
    assert plan.estimate.pairwise_flops[weight] == added


@pytest.mark.parametrize("trace_axes, traced", [((-1,), True), ((), False)])
def test_traced_pair_terms_are_priced_at_their_own_rate(monkeypatch, trace_axes, traced):
  """A pairwise term with every output axis traced has no pairs of output entries
  (two Grams, multiplied and summed: 2-3x the rate of an untraced term on a CPU); it is
  priced at the calibrated traced-term rate, an untraced one at the pair rate."""
  rates = cost.machine("cpu")
  fast = dataclasses.replace(rates, trace_pair_flops_per_s=1e30)
  monkeypatch.setattr(cost, "_MACHINES", {"cpu": fast})
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), _normal((4, 6), 3)
  estimate = nc.compile_ntk(_mlp, method="structured", trace_axes=trace_axes).plan(
      params, x1, x2).estimate
  for leaf in (0, 1):
    assert estimate.pairwise_flops[leaf] > 0
    assert (estimate.pairwise_seconds[leaf] < 1e-20) == traced


@pytest.mark.parametrize("trace_axes, x2_given, relaid", [
    ((-1,), True, "x2"), ((), True, "both"), ((), False, "x1")])
def test_materialised_bytes_count_the_grams_relayouts(monkeypatch, trace_axes, x2_given,
                                                      relaid):
  """A materialised term's traffic: each example's gradient written and read (8 bytes
  an entry) and re-laid out for the Gram, XLA's dot taking one operand
  contraction-major: x2's side when traced, both sides untraced (the output axes come
  apart in the product's order), x1's alone with x2 omitted (one array). Profiled on a
  transformer's qkv weight and a ResNet's convolutions; priced at 8 bytes an entry the
  qkv term was estimated at 1.4 ms against 2.3 measured and chosen over a pairwise
  term 9% faster in the whole kernel (the ResNet's last convolution: 9%)."""
  rates = cost.machine("cpu")
  bytes_only = dataclasses.replace(rates, flops_per_s=1e30, bytes_per_s=1.0)
  monkeypatch.setattr(cost, "_MACHINES", {"cpu": bytes_only})
  params = {"w0": _normal((6, 16), 0) / 3, "w1": _normal((16, 3), 1) / 4}
  x1, x2 = _normal((5, 6), 2), (_normal((4, 6), 3) if x2_given else None)
  estimate = nc.compile_ntk(_mlp, method="structured", trace_axes=trace_axes).plan(
      params, x1, x2).estimate
  rows1, rows2 = 5 * 3, (4 * 3 if x2_given else 0)
  extra = {"x1": rows1, "x2": rows2, "both": rows1 + rows2}[relaid]
  for leaf, entries in ((0, 6 * 16), (1, 16 * 3)):
    assert estimate.materialised_seconds[leaf] == pytest.approx(
        8 * entries * (rows1 + rows2 + extra))
