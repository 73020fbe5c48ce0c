"""Real-model coverage (issue 12): standard models that used to leave the fast path.

Each model: the structured kernel against the float64 oracle, and explain() saying what
was decided: the per-example path where the model is per-example, and no dense fallback
for the primitives this issue covers (`tile`, custom primitives registered once).
"""

import warnings

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

import ntk_compiler as nc
from ntk_compiler import RuleResult, Structure
from oracle import assert_matches, oracle_ntk
from tiers import full

RTOL = 1e-10


def rand(*shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=shape))


def check(f, params, x1, x2=None, per_example=True, no_fallback=(), method="structured"):
  """The kernel against the oracle; explain()'s batch decision; no use of a leaf named
  in `no_fallback` (all leaves for True) falls back to a dense Jacobian."""
  ntk_fn = nc.compile_ntk(f, method=method)
  explanation = ntk_fn.explain(params, x1)
  assert explanation.batch_independent == per_example, explanation.batch.reason
  for leaf in explanation.leaves:
    if no_fallback is True or any(name in leaf.path for name in no_fallback):
      assert not any(u.fallback or u.dense for u in leaf.uses), (leaf.path, leaf.uses)
  assert_matches(ntk_fn(params, x1, x2), oracle_ntk(f, params, x1, x2), RTOL)
  return explanation


# A ViT-style model: patches embedded, a class token tiled over the batch
# (`jnp.tile(cls, [n, 1, 1])`, as the standard ViT writes it), one attention layer.

def vit(p, x, attention=True):
  n = x.shape[0]
  h = x @ p["embed"] + p["pos"]
  h = jnp.concatenate([jnp.tile(p["cls"], [n, 1, 1]), h], axis=1)
  if attention:
    q, k, v = h @ p["q"], h @ p["k"], h @ p["v"]
    att = jax.nn.softmax(jnp.einsum("ntd,nsd->nts", q, k) / 2.0, axis=-1)
    h = h + jnp.einsum("nts,nsd->ntd", att, v)
  return jnp.tanh(h[:, 0] + h[:, 1]) @ p["head"]


VIT = {"embed": rand(6, 4), "pos": rand(3, 4, seed=1), "cls": rand(1, 1, 4, seed=2),
       "q": rand(4, 4, seed=3), "k": rand(4, 4, seed=4), "v": rand(4, 4, seed=5),
       "head": rand(4, 2, seed=6)}


def test_class_token_tiled():
  params = {k: VIT[k] for k in ("embed", "pos", "cls", "head")}
  e = check(lambda p, x: vit(p, x, attention=False), params, rand(3, 3, 6, seed=7),
            no_fallback=True)
  cls, = [leaf for leaf in e.leaves if "cls" in leaf.path]
  assert any("tile" in u.steps for u in cls.uses), cls.uses


@full
def test_vit_tiled_class_token():
  check(vit, VIT, rand(3, 3, 6, seed=7), rand(2, 3, 6, seed=8), no_fallback=True)


def test_tile_of_a_parameter_along_other_axes():
  f = lambda p, x: jnp.tanh(x * jnp.tile(p["w"], (2, 3)).reshape(-1)) @ p["v"]
  params = {"w": rand(2, 2), "v": rand(24, 2, seed=1)}
  check(f, params, rand(3, 24, seed=2), no_fallback=True)
  g = lambda p, x: jnp.tanh(x * jnp.tile(p["w"], (3, 2)).reshape(-1)) @ p["v"]
  check(g, {"w": rand(1, 2), "v": rand(12, 2, seed=1)}, rand(3, 12, seed=2),
        no_fallback=True)


def test_tile_along_the_batch_axis_mixes():
  f = lambda p, x: jnp.tile(x @ p, (2, 1))[1:3]
  check(f, rand(3, 2), rand(2, 3, seed=1), per_example=False)


# Primitives without a batch rule of the package: JAX's batching rule proves them.

def spectral(p, x):
  """A Fourier layer: rfft, a complex multiplier wr + i wi on the low modes, irfft."""
  w = p["wr"] + 1j * p["wi"]
  xf = jnp.fft.rfft(x @ p["lift"], axis=1)
  y = jnp.fft.irfft(xf[:, :3] * w, n=x.shape[1], axis=1)
  return jnp.tanh(y).reshape(x.shape[0], -1) @ p["proj"]


SPECTRAL = {"lift": rand(1, 2), "wr": rand(3, 2, seed=1), "wi": rand(3, 2, seed=2),
            "proj": rand(16, 2, seed=3)}


@full
def test_spectral_conv_is_per_example():
  """Per-example (fft's batch fact is JAX's), and no fallback: `lift` is cut before the
  fft with no loss (its rule's DFT block is dense); the complex weights wr + 1j wi go
  on through the complex multiply and are cut before the zero padding (a placement
  into a larger array) ahead of the irfft."""
  e = check(spectral, SPECTRAL, rand(3, 8, 1, seed=4), rand(2, 8, 1, seed=5),
            no_fallback=True)
  lift, = [leaf for leaf in e.leaves if "lift" in leaf.path]
  assert all("before fft" in u.reason for u in lift.uses), lift.uses
  for name in ("wr", "wi"):
    w, = [leaf for leaf in e.leaves if name in leaf.path]
    assert all("convert_element_type" in u.steps and "mul" in u.steps
               for u in w.uses), w.uses


# An FNO block in 2-D (as the Fourier Neural Operator's SpectralConv2d): rfft2, two
# corners of low modes multiplied by complex weights (einsum), written into a zero
# spectrum, irfft2, plus a pointwise skip path.

M1, M2, FNO_C = 2, 2, 3


def fno2d(p, x):
  h = x @ p["lift"]
  hf = jnp.fft.rfft2(h, axes=(1, 2))
  w1 = p["w1r"] + 1j * p["w1i"]
  w2 = jax.lax.complex(p["w2r"], p["w2i"])
  out = jnp.zeros(hf.shape, hf.dtype)
  out = out.at[:, :M1, :M2].set(jnp.einsum("nxyi,xyio->nxyo", hf[:, :M1, :M2], w1))
  out = out.at[:, -M1:, :M2].set(jnp.einsum("nxyi,xyio->nxyo", hf[:, -M1:, :M2], w2))
  y = jnp.fft.irfft2(out, s=x.shape[1:3], axes=(1, 2))
  y = jax.nn.gelu(y + h @ p["skip"])
  return y.mean((1, 2)) @ p["proj"]


FNO = {"lift": rand(2, FNO_C), "skip": rand(FNO_C, FNO_C, seed=5),
       "proj": rand(FNO_C, 2, seed=6),
       **{k: rand(M1, M2, FNO_C, FNO_C, seed=i) for i, k in enumerate(
           ("w1r", "w1i", "w2r", "w2i"), 1)}}


def _contracting(monkeypatch, how):
  """Every leaf's term contracted pairwise ("pair") or materialised ("mat")."""
  from ntk_compiler import emit
  structured_ntk = emit.structured_ntk

  def forced(*args):
    leaves = frozenset(range(len(args[2])))
    return structured_ntk(*args[:9], frozenset() if how == "pair" else leaves)
  monkeypatch.setattr(emit, "structured_ntk", forced)


@full
@pytest.mark.parametrize("how", ["auto", "pair", "mat"])
def test_fno_2d_complex_weights(monkeypatch, how):
  """The complex weights' terms are Σ_w Re(U1) Re(U2) of complex products U, by both
  contractions, per example and whole batch, with x2 given and omitted."""
  if how != "auto":
    _contracting(monkeypatch, how)
  x1, x2 = rand(3, 6, 6, 2, seed=7), rand(2, 6, 6, 2, seed=8)
  e = check(fno2d, FNO, x1, x2, no_fallback=True)
  for name in ("w1r", "w1i", "w2r", "w2i"):
    w, = [leaf for leaf in e.leaves if name in leaf.path]
    assert all("dot_general" in u.steps for u in w.uses), w.uses
  for x, y in ((x1, None), (x1, x2)):
    ntk_fn = nc.compile_ntk(fno2d, method="structured", batch_independent=False)
    assert_matches(ntk_fn(FNO, x, y), oracle_ntk(fno2d, FNO, x, y), RTOL)


@full
def test_fno_2d_symmetric_blocks(monkeypatch):
  """Θ(x, x) contracted in blocks of example pairs (the conjugated side is sliced too)."""
  from ntk_compiler import emit
  monkeypatch.setattr(emit, "SYMMETRIC_BLOCKS_FROM", 2)
  x = rand(4, 4, 4, 2, seed=9)
  ntk_fn = nc.compile_ntk(fno2d, method="structured", trace_axes=())
  assert_matches(ntk_fn(FNO, x), oracle_ntk(fno2d, FNO, x, trace_axes=()), RTOL)


def _complex(*shape, seed=0):
  return rand(*shape, seed=seed) + 1j * rand(*shape, seed=seed + 1)


COMPLEX_RULES = {
    "mul": (jax.lax.mul_p, lambda a, b: a * b, (_complex(3, 2), _complex(1, 2, seed=2)), 0),
    "mul_broadcast": (jax.lax.mul_p, lambda a, b: a * b,
                      (_complex(3, 2), _complex(1, 2, seed=2)), 1),
    "to_complex": (jax.lax.convert_element_type_p, lambda a: a.astype(jnp.complex128),
                   (rand(3, 2),), 0),
    "complex_im": (jax.lax.complex_p, jax.lax.complex, (rand(3, 2), rand(3, 2, seed=1)), 1),
    "dot": (jax.lax.dot_general_p, lambda a, b: a @ b,
            (_complex(3, 2), _complex(2, 4, seed=2)), 1),
    "fft": (jax.lax.fft_p, jnp.fft.fft, (_complex(3, 4),), 0),
    "ifft2": (jax.lax.fft_p, jnp.fft.ifft2, (_complex(3, 4),), 0),
    "window": (jax.lax.scatter_p, lambda z, u: z.at[:, -2:, :2].set(u),
               (_complex(2, 5, 4), _complex(2, 2, 2, seed=2)), 1),
}


@pytest.mark.parametrize("name", list(COMPLEX_RULES))
def test_complex_linear_rules(name):
  """Complex Jacobians compared whole (real and imaginary parts), no ComplexWarning."""
  primitive, f, args, argnum = COMPLEX_RULES[name]
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    check_ = nc.check_rule(primitive, f, *args, argnum=argnum)
  assert check_.structure is not None and check_.max_error < 1e-12


@pytest.mark.parametrize("name", ["real", "imag", "conj", "irfft", "to_real"])
def test_not_complex_linear(name):
  from ntk_compiler.rules import NOT_COMPLEX_LINEAR, registry
  primitive, f = {"real": (jax.lax.real_p, jnp.real), "imag": (jax.lax.imag_p, jnp.imag),
                  "conj": (jax.lax.conj_p, jnp.conj),
                  "irfft": (jax.lax.fft_p, jnp.fft.irfft),
                  "to_real": (jax.lax.convert_element_type_p,
                              lambda z: jax.lax.convert_element_type(z, jnp.float64))}[name]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # JAX's own warning on a complex -> real cast
    closed = jax.make_jaxpr(f)(_complex(3, 4))
  eqn, = _eqns_of(closed.jaxpr, primitive)
  info = nc.EqnInfo(eqn.primitive, eqn.params, tuple(a.aval for a in eqn.invars),
                    tuple(v.aval for v in eqn.outvars))
  assert registry()[primitive](info, 0) is NOT_COMPLEX_LINEAR


def _eqns_of(jaxpr, primitive):
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive is primitive:
      found.append(eqn)
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found += _eqns_of(sub, primitive)
  return found


def test_check_rule_sees_the_imaginary_part():
  """A factor that drops the imaginary part is caught (it used to pass, with a
  ComplexWarning, because the Jacobians were compared as float64)."""
  wrong = lambda eqn, operand: RuleResult(Structure(diagonal=((0, 0), (1, 1))),
                                          lambda a, b: jnp.real(b), reads=(1,))
  with pytest.raises(nc.RuleCheckError, match="factor is wrong"):
    nc.check_rule(jax.lax.mul_p, lambda a, b: a * b, _complex(3, 2),
                  _complex(3, 2, seed=2), rule=wrong)


@pytest.mark.parametrize("mode", ["clip", "fill"])
def test_one_window_scatter(mode):
  """A window written at a dynamic start; out of bounds it is clamped or dropped."""
  dn = jax.lax.ScatterDimensionNumbers(update_window_dims=(0, 1, 2),
                                       inserted_window_dims=(),
                                       scatter_dims_to_operand_dims=(1, 2))
  for start in ([1, 0], [4, 1], [-1, 2]):
    f = lambda z, u: jax.lax.scatter(z, jnp.array(start), u, dn, mode=mode)
    check_ = nc.check_rule(jax.lax.scatter_p, f, rand(2, 5, 4), rand(2, 2, 3, seed=1),
                           argnum=1)
    assert check_.structure == Structure(trace=((0, 0),)) and check_.max_error == 0


@pytest.mark.parametrize("shape, axes", [((2, 6), (-1,)), ((3, 5), (-1,)),
                                         ((2, 4, 6), (-2, -1))])
def test_real_fft_rule(shape, axes):
  """The rule's DFT block, expanded by its structure, is jax.jacfwd's (complex)."""
  from ntk_compiler.rules import EqnInfo, linear
  x = rand(*shape)
  f = lambda x: jnp.fft.rfftn(x, axes=axes)
  closed = jax.make_jaxpr(f)(x)
  eqn, = [e for e in closed.jaxpr.eqns[0].params["jaxpr"].eqns]
  info = EqnInfo(eqn.primitive, eqn.params, tuple(a.aval for a in eqn.invars),
                 tuple(v.aval for v in eqn.outvars))
  result = linear.fft_rule(info, 0)
  assert result.dense
  dense = result.structure.expand(result.factor(x), info.out_aval.shape, shape)
  np.testing.assert_allclose(dense, jax.jacfwd(f)(x), atol=1e-12)


@full
def test_linear_solve_is_per_example():
  f = lambda p, x: jnp.linalg.solve(p["a"] + 4 * jnp.eye(3), x.T).T @ p["v"]
  params = {"a": rand(3, 3), "v": rand(3, 2, seed=1)}
  check(f, params, rand(4, 3, seed=2), rand(2, 3, seed=3))


@full
def test_cholesky_per_example():
  def f(p, x):
    a = jnp.einsum("ni,nj->nij", x @ p, x @ p) + 3 * jnp.eye(2)
    return jnp.linalg.cholesky(a).reshape(x.shape[0], -1)
  check(f, rand(3, 2), rand(3, 3, seed=1))


# A custom primitive, registered once: its structure rule; its batch fact comes from the
# batching rule JAX already needs for vmap.

row_scale_p = Primitive("row_scale")  # y[..., c] = x[..., c] * s[c]


def row_scale(x, s):
  return row_scale_p.bind(x, s)


row_scale_p.def_impl(lambda x, s: x * s)
row_scale_p.def_abstract_eval(lambda x, s: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(row_scale_p, mlir.lower_fun(lambda x, s: x * s,
                                                   multiple_results=False))


def _row_scale_jvp(primals, tangents):
  (x, s), (tx, ts) = primals, tangents
  tx = jnp.zeros_like(x) if type(tx) is ad.Zero else tx
  ts = jnp.zeros_like(s) if type(ts) is ad.Zero else ts
  return row_scale(x, s), row_scale(tx, s) + row_scale(x, ts)


def _row_scale_transpose(ct, x, s):
  if ad.is_undefined_primal(x):
    return row_scale(ct, s), None
  return None, jnp.sum(ct * x, axis=tuple(range(ct.ndim - 1)))


def _row_scale_batch(args, dims):
  (x, s), (bx, bs) = args, dims
  if bs is not None:
    raise NotImplementedError("a batch of scales")
  return row_scale(jnp.moveaxis(x, bx, 0), s), 0


ad.primitive_jvps[row_scale_p] = _row_scale_jvp
ad.primitive_transposes[row_scale_p] = _row_scale_transpose
batching.primitive_batchers[row_scale_p] = _row_scale_batch


def row_scale_rule(eqn, operand):
  last = len(eqn.out_aval.shape) - 1
  if operand == 1:
    return RuleResult(Structure(diagonal=((last, 0),)), lambda x, s: x, reads=(0,))
  pairs = tuple((a, a) for a in range(last))
  return RuleResult(Structure(trace=pairs, diagonal=((last, last),)),
                    lambda x, s: s, reads=(1,))


def scaled_mlp(p, x):
  return jnp.tanh(row_scale(jnp.tanh(x @ p["w"]), p["s"])) @ p["v"]


SCALED = {"w": rand(3, 4), "s": rand(4, seed=1), "v": rand(4, 2, seed=2)}


def test_custom_primitive_registered_once():
  with nc.rules_overlay({row_scale_p: row_scale_rule}):
    e = check(scaled_mlp, SCALED, rand(4, 3, seed=3), rand(2, 3, seed=4),
              no_fallback=True)
  assert "proven" in e.batch.reason


@full
def test_custom_primitive_batching_rule_that_moves_the_batch():
  """A batching rule that moves the batch elsewhere proves nothing: whole batch."""
  f = lambda p, x: row_scale(jnp.tanh(x @ p["w"]).T, p["s2"]).T @ p["v"]
  params = {"w": rand(3, 4), "s2": rand(4, seed=1), "v": rand(4, 2, seed=2)}
  with nc.rules_overlay({row_scale_p: row_scale_rule}):
    e = check(f, params, rand(4, 3, seed=3), per_example=False, no_fallback=True)
  assert "row_scale" in e.batch.reason, e.batch.reason


# Flax's nn.RNN with seq_lengths.

def _flax_rnn(**kwargs):
  nn = pytest.importorskip("flax.linen")
  cell = nn.GRUCell(3, param_dtype=jnp.float64, dtype=jnp.float64)
  rnn = nn.RNN(cell, **kwargs)
  x = rand(3, 4, 2)
  variables = rnn.init(jax.random.PRNGKey(0), x, seq_lengths=jnp.array([4, 2, 1]))
  return rnn, variables, x


@full
def test_flax_rnn_with_seq_lengths():
  rnn, variables, x = _flax_rnn()

  def f(p, x):
    lengths = jnp.sum(jnp.abs(x[..., 0]) > 0.3, axis=1)
    return rnn.apply(p, x, seq_lengths=lengths)[:, -1]
  check(f, variables, x, no_fallback=True)


@full
@pytest.mark.parametrize("kind", ["reverse", "bidirectional"])
def test_flax_reverse_rnn_with_seq_lengths(kind):
  """Reverse and Bidirectional nn.RNN with seq_lengths flip each sequence within its
  length (flip_sequences: take_along_axis, which JAX gathers differently at batch
  size 1): per-example."""
  nn = pytest.importorskip("flax.linen")
  x = rand(3, 4, 2)
  cell = lambda: nn.GRUCell(3, param_dtype=jnp.float64, dtype=jnp.float64)
  rnn = (nn.RNN(cell(), reverse=True, keep_order=True) if kind == "reverse" else
         nn.Bidirectional(nn.RNN(cell()), nn.RNN(cell())))
  variables = rnn.init(jax.random.PRNGKey(0), x, seq_lengths=jnp.array([4, 2, 1]))

  def f(p, x):
    lengths = jnp.sum(jnp.abs(x[..., 0]) > 0.3, axis=1)
    return rnn.apply(p, x, seq_lengths=lengths)[:, 0]
  e = check(f, variables, x, rand(2, 4, 2, seed=1), no_fallback=True)
  assert "proven" in e.batch.reason, e.batch.reason


def test_size_one_gather_in_batching_form():
  """take_along_axis at batch size 1 (reshape + a window gather) is analysed as the
  batching gather it is at N, and that form computes the same array."""
  from ntk_compiler import batching
  f = lambda x, lengths: jnp.take_along_axis(
      x, ((jnp.arange(3, -1, -1)[None] + lengths[:, None]) % 4)[..., None], axis=1)
  x, lengths = rand(1, 4, 2), jnp.array([2])
  closed = jax.make_jaxpr(f)(x, lengths)
  canonical = batching._canonical_trace(closed)
  assert canonical is not closed
  count = lambda j, p: sum(e.primitive is p for e in batching.compat.open_jaxpr(
      j.eqns[-1].params["jaxpr"]).eqns)
  assert count(canonical.jaxpr, jax.lax.reshape_p) == count(closed.jaxpr,
                                                             jax.lax.reshape_p) - 1
  out = jax.core.eval_jaxpr(canonical.jaxpr, canonical.consts, x, lengths)
  np.testing.assert_array_equal(out[0], f(x, lengths))
  d = decide(lambda p, x: jnp.tanh(f(x @ p, (jnp.abs(x[:, :, 0]) > 0.3).sum(1))),
             rand(2, 3), rand(3, 4, 2, seed=1))
  assert d.independent, d.reason


@full
def test_flax_rnn_last_carry_at_seq_lengths():
  """return_carry with seq_lengths picks carries[len - 1, arange(N)]: per-example."""
  rnn, variables, x = _flax_rnn(return_carry=True)

  def f(p, x):
    lengths = jnp.sum(jnp.abs(x[..., 0]) > 0.3, axis=1)
    return rnn.apply(p, x, seq_lengths=lengths)[0]
  check(f, variables, x, rand(2, 4, 2, seed=1))


# Positions along the batch axis: x[arange(N), idx] is per-example; other uses of
# positions or of the batch size as a value are not.

def decide(f, params, x):
  from ntk_compiler import batching, trace

  def trace_at(n):
    shaped = jax.ShapeDtypeStruct((n,) + x.shape[1:], x.dtype)
    return trace.trace_program(f, params, shaped, per_example=False)
  return batching.infer(trace_at, len(jax.tree.leaves(params)), x.shape[0])


def _cube(p, x):
  return jnp.tanh(x @ p)[:, :, None] * x[:, None, :]  # (N, 4, 3)


def _ids(h):
  return (jnp.abs(h[:, 0]) * 7).astype(jnp.int32) % h.shape[1]


POSITIONAL = {
    "own_row": (lambda p, x: jnp.tanh(x @ p)[jnp.arange(x.shape[0]), _ids(x @ p)], True),
    "own_row_time_major": (lambda p, x: jnp.swapaxes(jnp.tanh(x @ p)[:, :, None] * x[:, None],
                                                     0, 1)[_ids(x), jnp.arange(x.shape[0])],
                           True),
    "reversed_rows": (lambda p, x: (x @ p)[jnp.arange(x.shape[0])[::-1], _ids(x)], False),
    "next_row": (lambda p, x: (x @ p)[(jnp.arange(x.shape[0]) + 1) % x.shape[0],
                                      _ids(x)], False),
    "own_row_on_axis_1": (lambda p, x: jnp.swapaxes(_cube(p, x), 0, 1)[
        _ids(x), jnp.arange(x.shape[0])], True),
    "positions_index_features": (lambda p, x: _cube(p, x)[
        _ids(x).astype(jnp.uint32), jnp.arange(x.shape[0], dtype=jnp.uint32)], False),
    "positions_as_values": (lambda p, x: (x @ p) * jnp.arange(x.shape[0])[:, None], False),
    "two_positions": (lambda p, x: _cube(p, x)[jnp.arange(x.shape[0]),
                                               jnp.arange(x.shape[0])], False),
    "positions_in_output": (lambda p, x: (x @ p, jnp.stack([jnp.arange(x.shape[0]),
                                                           _ids(x)], 1) * 1.0), False),
}


@pytest.mark.parametrize("name", list(POSITIONAL))
def test_positions_along_the_batch_axis(name):
  f, independent = POSITIONAL[name]
  d = decide(f, rand(3, 4), rand(5, 3, seed=1))
  assert d.independent == independent, d.reason


@full
def test_positional_lookup_against_the_oracle():
  f, _ = POSITIONAL["own_row"]
  check(lambda p, x: f(p, x)[:, None], rand(3, 4), rand(5, 3, seed=1), rand(2, 3, seed=2))


# A gather indexing two axes at once (`table[i, j]`), and take_along_axis in 2-D.

def _ids2(x, n, column):
  return (jnp.abs(x[..., column]) * 5).astype(jnp.int32) % n


def table_2d(p, x):
  h = p["t"][_ids2(x, 5, 0), _ids2(x, 6, 1)]          # (N, T, D)
  return jnp.tanh(h.sum(1) * x[:, 0, 2:]) @ p["v"]


def along_axis(p, x):
  t = jnp.broadcast_to(p["t2"], (x.shape[0],) + p["t2"].shape)  # (N, 5, 6)
  h = jnp.take_along_axis(t, _ids2(x, 6, 1)[:, None, :2].repeat(5, 1), axis=2)
  return jnp.tanh(h.reshape(x.shape[0], -1)) @ p["v2"]


TABLES = {"t": rand(5, 6, 2), "v": rand(2, 2, seed=1), "t2": rand(5, 6, seed=2),
          "v2": rand(10, 2, seed=3)}


@pytest.mark.full
def test_two_axis_lookup():
  params = {k: TABLES[k] for k in ("t", "v")}
  e = check(table_2d, params, rand(4, 3, 3, seed=4), rand(2, 3, 3, seed=5),
            no_fallback=True)
  t, = [leaf for leaf in e.leaves if "'t'" in leaf.path]
  assert all("gather" in u.steps for u in t.uses), t.uses


@full
def test_take_along_axis_2d():
  """No dense fallback, and per-example: at batch size 1 JAX's reshape of the indices
  drops the batch axis while it adds the index vector axis ((1, 5, 2) -> (5, 2, 1)),
  which the batch analysis reads back into the batching form the gather has at N
  (test_batching_gathers.py)."""
  params = {k: TABLES[k] for k in ("t2", "v2")}
  e = check(along_axis, params, rand(4, 3, 3, seed=4), rand(2, 3, 3, seed=5),
            no_fallback=True)
  assert "proven" in e.batch.reason, e.batch.reason


@pytest.mark.parametrize("mode", [None, "clip", "fill"])
def test_two_axis_lookup_rule(mode):
  table = jnp.arange(60.).reshape(5, 6, 2)
  ids = (jnp.array([0, 4, 4, 2, 7, -1]), jnp.array([5, 0, 5, 1, 1, 9]))
  f = (lambda t, i, j: t[i, j]) if mode is None else (
      lambda t, i, j: t.at[i, j].get(mode=mode))
  check_ = nc.check_rule(jax.lax.gather_p, f, table, *ids)
  assert check_.structure == Structure(trace=((1, 2),)) and check_.max_error == 0


@pytest.mark.parametrize("name", ["spectral", "solve", "solve_rows"])  # rows: vmapped
def test_batch_facts_of_jax_primitives(name):
  """The batch decisions of the full-tier models above, without their kernels."""
  a = rand(3, 3) + 4 * jnp.eye(3)
  f, params, x = {
      "spectral": (spectral, SPECTRAL, rand(3, 8, 1, seed=4)),
      "solve": (lambda p, x: jnp.linalg.solve(p, x.T).T, a, rand(4, 3, seed=2)),
      "solve_rows": (lambda p, x: jax.vmap(lambda b: jnp.linalg.solve(p, b))(x), a,
                     rand(4, 3, seed=2)),
  }[name]
  d = decide(f, params, x)
  assert d.independent, d.reason


def test_solve_across_examples_mixes():
  """x.T as the matrix: the solve runs along the batch axis."""
  f = lambda p, x: jnp.linalg.solve(x[:, :2].T @ x[:, :2] + p, x[:2].T).T
  d = decide(f, 4 * jnp.eye(2), rand(4, 3, seed=2))
  assert not d.independent, d.reason


# custom_jvp calls: followed through the JVP rule's tangent program, never the primal
# body (a gradient-reversal layer's body is the identity, its JVP negates).

@jax.custom_jvp
def custom_matmul(x, w):
  return x @ w


@custom_matmul.defjvp
def _custom_matmul_jvp(primals, tangents):
  (x, w), (tx, tw) = primals, tangents
  return custom_matmul(x, w), tx @ w + x @ tw


@jax.custom_jvp
def reversed_matmul(x, w):
  """x @ w whose derivative is negated (gradient reversal fused into a layer)."""
  return x @ w


@reversed_matmul.defjvp
def _reversed_matmul_jvp(primals, tangents):
  (x, w), (tx, tw) = primals, tangents
  return reversed_matmul(x, w), -(tx @ w + x @ tw)


@jax.custom_jvp
def reverse_gradient(x):
  return x


@reverse_gradient.defjvp
def _reverse_gradient_jvp(primals, tangents):
  return primals[0], -tangents[0]


@jax.custom_jvp
def squared_tangent(x, w):
  return x @ w


@squared_tangent.defjvp
def _squared_tangent_jvp(primals, tangents):  # not linear in the tangents
  (x, w), (tx, tw) = primals, tangents
  return squared_tangent(x, w), (x @ tw) * (x @ tw)


def custom_jvp_model(p, x):
  h = jnp.tanh(custom_matmul(x, p["w"]) + p["b"])
  h = jnp.tanh(reverse_gradient(h @ p["v"]))
  return jnp.tanh(reversed_matmul(h, p["r"])) @ p["o"]


CUSTOM_JVP = {"w": rand(3, 4), "b": rand(4, seed=1), "v": rand(4, 4, seed=2),
              "r": rand(4, 4, seed=3), "o": rand(4, 2, seed=4)}


def test_custom_jvp_linear_layers():
  """The custom matmuls are structured (their JVP's dot_generals), with the JVP's
  sign; the elementwise gradient reversal is cut before, with its own derivative."""
  e = check(custom_jvp_model, CUSTOM_JVP, rand(4, 3, seed=5), rand(2, 3, seed=6),
            no_fallback=True)
  for name in ("'w'", "'r'"):
    leaf, = [leaf for leaf in e.leaves if name in leaf.path]
    assert all("dot_general" in u.steps for u in leaf.uses), leaf.uses


@full
def test_custom_jvp_inside_jit_and_whole_batch():
  f = jax.jit(custom_jvp_model)
  check(f, CUSTOM_JVP, rand(4, 3, seed=5), no_fallback=True)
  ntk_fn = nc.compile_ntk(f, method="structured", batch_independent=False)
  x1, x2 = rand(4, 3, seed=5), rand(2, 3, seed=6)
  assert_matches(ntk_fn(CUSTOM_JVP, x1, x2), oracle_ntk(f, CUSTOM_JVP, x1, x2), RTOL)


def test_custom_jvp_left_opaque():
  """A JVP not linear in the tangents, elementwise calls, a user's rule for
  custom_jvp_call: the program is not rewritten."""
  from ntk_compiler import trace
  from ntk_compiler.rules import custom_jvp, registry
  cases = [(lambda p, x: squared_tangent(x, p), registry()),
           (lambda p, x: reverse_gradient(jax.nn.relu(x @ p)), registry()),
           (lambda p, x: custom_matmul(x, p),
            registry({custom_jvp.CUSTOM_JVP_CALL: lambda eqn, operand: None}))]
  for f, rules in cases:
    program = trace.trace_program(f, rand(3, 2), rand(4, 3, seed=1), per_example=False)
    assert custom_jvp.follow_linear_jvps(program.jaxpr, program.consts, 1, rules) is None
  program = trace.trace_program(lambda p, x: custom_matmul(x, p), rand(3, 2),
                                rand(4, 3, seed=1), per_example=False)
  assert custom_jvp.follow_linear_jvps(program.jaxpr, program.consts, 1,
                                       registry()) is not None


# Adaptive loops vmapped over examples (an ODE solve with a step size that depends on
# the state, as diffrax's adaptive solvers have): JAX's batching rule makes a while
# whose condition gives one entry per example, each example stepping only while its
# own entry holds. Reverse mode needs the loop inside a custom_vjp (here: the
# backward pass replays the steps as a masked scan, a checkpointed loop).

_MAX_STEPS = 24


def _ode_step(w, t, y):
  dt = jnp.minimum(0.1 + 0.05 * jnp.tanh(jnp.sum(y * y)), 1.0 - t)
  return t + dt, y + dt * jnp.tanh(y @ w)


def _ode_while(w, y0):
  def body(c):
    t, y, n = c
    return (*_ode_step(w, t, y), n + 1)
  return lax.while_loop(lambda c: c[0] < 1.0, body, (0.0, y0, 0))


def _ode_replay(w, y0, n):
  def body(c, k):
    new = _ode_step(w, *c)
    return jax.tree.map(lambda a, b: jnp.where(k < n, a, b), new, c), None
  return lax.scan(body, (0.0, y0), jnp.arange(_MAX_STEPS))[0][1]


@jax.custom_vjp
def ode_solve(w, y0):
  return _ode_while(w, y0)[1]


def _ode_fwd(w, y0):
  _, y, n = _ode_while(w, y0)
  return y, (w, y0, n)


def _ode_bwd(res, g):
  w, y0, n = res
  return jax.vjp(lambda w, y0: _ode_replay(w, y0, n), w, y0)[1](g)


ode_solve.defvjp(_ode_fwd, _ode_bwd)


def ode_model(p, x):
  return jax.vmap(lambda xi: ode_solve(p["w"], xi) @ p["o"])(x)


ODE = {"w": rand(3, 3) / 2, "o": rand(3, 2, seed=1)}


def _ode_forward_only(p, x):
  """The loop as written (not reverse-differentiable): the analysis alone."""
  def body(c):
    return _ode_step(p["w"], *c)
  one = lambda xi: lax.while_loop(lambda c: c[0] < 1.0, body, (0.0, xi))[1] @ p["o"]
  return jax.vmap(one)(x)


def test_vmapped_adaptive_while_is_per_example():
  d = decide(_ode_forward_only, ODE, rand(4, 3, seed=2))
  assert d.independent, d.reason
  d = decide(jax.vmap(_ode_forward_only, in_axes=(None, 0)), ODE,
             rand(4, 2, 3, seed=2))  # nested vmaps: a condition of shape (N, 2)
  assert d.independent, d.reason
  d = decide(jax.vmap(_ode_forward_only, in_axes=(None, 1), out_axes=1), ODE,
             rand(4, 2, 3, seed=2))  # a condition of shape (2, N): batched on axis 1
  assert d.independent, d.reason


def test_ode_solve_per_example():
  e = check(jax.jit(ode_model), ODE, 2 * rand(3, 3, seed=2), rand(2, 3, seed=3),
            method="jacobian")  # jit: the oracle runs compiled
  assert "proven" in e.batch.reason


@full
@pytest.mark.parametrize("method", ["structured", "jacobian"])
@pytest.mark.parametrize("with_x2", [False, True])
def test_ode_solve_per_example_all(method, with_x2):
  x2 = rand(3, 3, seed=3) if with_x2 else None
  e = check(ode_model, ODE, 2 * rand(4, 3, seed=2), x2, method=method)
  assert "proven" in e.batch.reason


def _while_cases():
  def body(w, c):
    return _ode_step(w, *c)

  def whole_batch_cond(p, x):  # one loop over the batch, until the batch's norm is big
    cond = lambda c: jnp.sum(c[1] * c[1]) < 50.0
    return lax.while_loop(cond, lambda c: (c[0] + 1.0, c[1] + jnp.tanh(c[1] @ p["w"])),
                          (0.0, x))[1] @ p["o"]

  def cond_reads_batch_sum(p, x):
    one = lambda xi: lax.while_loop(lambda c: c[0] < jnp.tanh(jnp.sum(x)) + 1.0,
                                    lambda c: body(p["w"], c), (0.0, xi))[1]
    return jax.vmap(one)(x) @ p["o"]

  def body_mixes(p, x):  # each step adds the mean over examples
    def step(c):
      t, y = body(p["w"], c)
      return t, y + lax.pmean(y, "b")
    one = lambda xi: lax.while_loop(lambda c: c[0] < 1.0, step, (0.0, xi))[1]
    return jax.vmap(one, axis_name="b")(x) @ p["o"]

  def body_reads_batch_mean(p, x):
    def step(c):
      t, y = body(p["w"], c)
      return t, y + 0.1 * jnp.mean(x, 0)
    one = lambda xi: lax.while_loop(lambda c: c[0] < 1.0, step, (0.0, xi))[1]
    return jax.vmap(one)(x) @ p["o"]

  def cond_reads_other_example(p, x):
    def cond(c):
      first = lax.all_gather(c[1], "b")[0]  # example 0's state
      return c[0] < 1.0 + 0.5 * jnp.tanh(jnp.sum(first))
    one = lambda xi: lax.while_loop(cond, lambda c: body(p["w"], c), (0.0, xi))[1]
    return jax.vmap(one, axis_name="b")(x) @ p["o"]

  return {"whole_batch_cond": whole_batch_cond,
          "cond_reads_batch_sum": cond_reads_batch_sum, "body_mixes": body_mixes,
          "body_reads_batch_mean": body_reads_batch_mean,
          "cond_reads_other_example": cond_reads_other_example}


@pytest.mark.parametrize("name", sorted(_while_cases()))
def test_batched_while_that_mixes(name):
  f = _while_cases()[name]
  d = decide(f, ODE, rand(4, 3, seed=2))
  assert not d.independent, d.reason
  assert "while" in d.reason, d.reason


@full
def test_flax_vmapped_while_is_per_example():
  """Flax's lifted `nn.while_loop` in a module `nn.vmap`ped over the examples."""
  nn = pytest.importorskip("flax.linen")

  class Solver(nn.Module):
    @nn.compact
    def __call__(self, y):  # one example
      dense = nn.Dense(y.shape[-1], use_bias=False, param_dtype=jnp.float64)
      dense(y)  # its params, created outside the loop

      def body(mdl, c):
        t, y = c
        dt = jnp.minimum(0.1 + 0.05 * jnp.tanh(jnp.sum(y * y)), 1.0 - t)
        return t + dt, y + dt * jnp.tanh(dense(y))
      _, y = nn.while_loop(lambda mdl, c: c[0] < 1.0, body, self, (0.0, y),
                           broadcast_variables="params")
      return nn.Dense(2, param_dtype=jnp.float64)(y)

  model = nn.vmap(Solver, variable_axes={"params": None}, split_rngs={"params": False})()
  x = rand(4, 3, seed=2)
  variables = model.init(jax.random.PRNGKey(0), x)
  d = decide(model.apply, variables, x)
  assert d.independent, d.reason
