"""Rules for the contractions: `dot_general`, `conv_general_dilated`, and `fft` (the
real FFT of a real array, the complex FFT and IFFT), whose Jacobian is a dense DFT
block."""

from __future__ import annotations

import functools
import math

import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_compiler.rules import NOT_COMPLEX_LINEAR, EqnInfo, RuleResult, register_rule
from ntk_compiler.structure import Structure


def _free(ndim, contract, batch):
  return tuple(d for d in range(ndim) if d not in contract and d not in batch)


@register_rule(lax.dot_general_p)
def dot_general_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """w on either side: its free axes are traced, batch axes diagonal, contracting axes
  meet the other operand, which (rearranged) is the factor."""
  (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
  lhs_nd, rhs_nd = (len(a.shape) for a in eqn.in_avals[:2])
  lf, rf = _free(lhs_nd, lc, lb), _free(rhs_nd, rc, rb)
  nb = len(lb)
  if operand == 1:
    w_contract, w_batch, w_free = rc, rb, rf
    o_contract, o_batch, o_free = lc, lb, lf
    w_out_start = nb + len(lf)
  else:
    w_contract, w_batch, w_free = lc, lb, lf
    o_contract, o_batch, o_free = rc, rb, rf
    w_out_start = nb
  structure = Structure(
      trace=tuple((w_out_start + i, d) for i, d in enumerate(w_free)),
      diagonal=tuple((i, d) for i, d in enumerate(w_batch)))
  # Factor axes: other's free axes, batch axes, then contracting axes in w's axis order.
  by_w_axis = sorted(range(len(w_contract)), key=lambda k: w_contract[k])
  perm = tuple(o_free) + tuple(o_batch) + tuple(o_contract[k] for k in by_w_axis)
  other = 1 - operand
  return RuleResult(structure, lambda *ops: jnp.transpose(ops[other], perm),
                    reads=(other,))


def _conv_kwargs(eqn: EqnInfo) -> dict:
  p = eqn.params
  return dict(window_strides=p["window_strides"], padding=p["padding"],
              lhs_dilation=p["lhs_dilation"], rhs_dilation=p["rhs_dilation"],
              precision=lax.Precision.HIGHEST)  # exact values, not TF32-rounded ones


def _patches(eqn: EqnInfo, x, filter_shape):
  """P[n, f..., i, s...]: the lhs entry that kernel entry (i, f...) meets at output
  (n, s...). Padding (and lhs dilation, as interior padding) once, then one strided
  slice per filter offset: memory traffic only, where a depthwise conv with an identity
  kernel (conv_general_dilated_patches) runs as a slow grouped convolution on CPU."""
  lhs_spec = eqn.params["dimension_numbers"].lhs_spec
  nsp = len(filter_shape)
  x = jnp.transpose(x, lhs_spec)  # (n, i, spatial...)
  pads = [(0, 0, 0)] * 2 + [(lo, hi, d - 1) for (lo, hi), d in
                            zip(eqn.params["padding"], eqn.params["lhs_dilation"])]
  x = lax.pad(x, jnp.zeros((), x.dtype), pads)
  strides, rhs_dilation = eqn.params["window_strides"], eqn.params["rhs_dilation"]
  out_sp = [max(0, (x.shape[2 + j] - (filter_shape[j] - 1) * rhs_dilation[j] - 1)
                 // strides[j] + 1) for j in range(nsp)]
  if 0 in out_sp:  # an empty output (a sequence of length 0): no window to slice
    return jnp.zeros((x.shape[0], *filter_shape, x.shape[1], *out_sp), x.dtype)
  taps = []
  for offset in np.ndindex(*filter_shape):
    start = [0, 0] + [o * d for o, d in zip(offset, rhs_dilation)]
    limit = list(x.shape[:2]) + [s + (m - 1) * st + 1
                                 for s, m, st in zip(start[2:], out_sp, strides)]
    taps.append(lax.slice(x, start, limit, (1, 1, *strides)))
  out = jnp.stack(taps, axis=1)  # (n, k, i, s...): the (filter offset, channel) rows
  return out.reshape(x.shape[0], *filter_shape, x.shape[1], *out_sp)


def _named_transpose(x, names, order):
  return jnp.transpose(x, tuple(names.index(n) for n in order))


def _by_out_feature(p, groups, batch_groups, cout, cg):
  """Patches P[n, i, ...] -> per output feature o, the lhs channels (feature groups:
  [n, o, i, ...]) or the lhs batch slice (batch groups: [o, n, i, ...]) of o's group."""
  group = jnp.arange(cout) // (cout // max(groups, batch_groups))
  if groups > 1:
    return jnp.take(p, group[:, None] * cg + jnp.arange(cg), axis=1)
  return jnp.take(p.reshape(batch_groups, -1, *p.shape[1:]), group, axis=0)


def _conv_kernel_rule(eqn: EqnInfo) -> RuleResult | None:
  dn = eqn.params["dimension_numbers"]
  groups, batch_groups = eqn.params["feature_group_count"], eqn.params["batch_group_count"]
  if groups > 1 and batch_groups > 1:
    return None
  w_shape = eqn.in_avals[1].shape
  nsp = len(w_shape) - 2
  sp = [f"s{j}" for j in range(nsp)]
  fs = [f"f{j}" for j in range(nsp)]
  y_names = dict(zip(dn.out_spec, ["n", "o", *sp]))
  w_names = dict(zip(dn.rhs_spec, ["o", "i", *fs]))
  y_free = [y_names[a] for a in sorted(y_names) if a != dn.out_spec[1]]
  w_free = [w_names[b] for b in sorted(w_names) if b != dn.rhs_spec[0]]
  pair = ((dn.out_spec[1], dn.rhs_spec[0]),)
  filter_shape = tuple(w_shape[d] for d in dn.rhs_spec[2:])
  cout, cg = w_shape[dn.rhs_spec[0]], w_shape[dn.rhs_spec[1]]
  dtype = eqn.out_aval.dtype
  grouped = groups > 1 or batch_groups > 1

  def factor(x, w):
    p, names = _patches(eqn, x, filter_shape), ["n", *fs, "i", *sp]
    if grouped:
      p = _named_transpose(p, names, ["n", "i", *fs, *sp])
      p = _by_out_feature(p, groups, batch_groups, cout, cg)
      names = (["n", "o"] if groups > 1 else ["o", "n"]) + ["i", *fs, *sp]
    order = y_free + ["o"] * grouped + w_free
    return _named_transpose(p, names, order).astype(dtype)

  structure = Structure(diagonal=pair) if grouped else Structure(trace=pair)
  return RuleResult(structure, factor, reads=(0,))


def _conv_input_rule(eqn: EqnInfo) -> RuleResult | None:
  if eqn.params["batch_group_count"] != 1:
    return None
  dn = eqn.params["dimension_numbers"]
  x_shape = eqn.in_avals[0].shape
  free = [a for a in range(len(x_shape)) if a != dn.lhs_spec[0]]
  free_shape = tuple(x_shape[a] for a in free)
  m = math.prod(free_shape)
  dtype = eqn.out_aval.dtype

  def factor(x, w):
    # One batch element per lhs entry, a one-hot each: the batch of outputs is ∂y/∂x.
    basis = jnp.eye(m, dtype=x.dtype).reshape(m, *free_shape)
    out = lax.conv_general_dilated(
        jnp.moveaxis(basis, 0, dn.lhs_spec[0]), w, dimension_numbers=dn,
        feature_group_count=eqn.params["feature_group_count"],
        preferred_element_type=eqn.params.get("preferred_element_type"),
        **_conv_kwargs(eqn))
    out = jnp.moveaxis(out, dn.out_spec[0], -1)
    return out.reshape(out.shape[:-1] + free_shape).astype(dtype)

  return RuleResult(Structure(trace=((dn.out_spec[0], dn.lhs_spec[0]),)), factor,
                    reads=(1,), dense=True)


@register_rule(lax.conv_general_dilated_p)
def conv_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """w as kernel: its out-feature axis is traced against y's (diagonal under feature or
  batch groups), the factor is the lhs patches. w as lhs: its batch axis is traced, the
  factor is one example's dense Jacobian; None under batch groups."""
  if operand == 1:
    return _conv_kernel_rule(eqn)
  return _conv_input_rule(eqn)


def _dft(n_out: int, n_in: int, sign: float = -1.0) -> np.ndarray:
  """(n_out, n_in): entry (k, j) = exp(sign 2πi k j / n_in), the DFT's first rows."""
  k, j = np.arange(n_out)[:, None], np.arange(n_in)[None, :]
  return np.exp(sign * 2j * np.pi * ((k * j) % n_in) / n_in)


@register_rule(lax.fft_p)
def fft_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """The real FFT of a real operand, and the complex FFT / IFFT: leading axes trace;
  the transformed axes carry the outer product of DFT matrices (RFFT: the last one cut
  to n // 2 + 1 rows; IFFT: conjugate, divided by n). A dense block, so the engine takes
  the cotangent at the operand instead, which loses nothing: it is no larger than the
  one at the output. IRFFT (complex -> real) is not complex-linear: NOT_COMPLEX_LINEAR,
  the cotangent at its complex operand."""
  kind = lax.FftType(eqn.params["fft_type"])
  complex_in = jnp.issubdtype(eqn.in_avals[0].dtype, jnp.complexfloating)
  if kind == lax.FftType.IRFFT:
    return NOT_COMPLEX_LINEAR if complex_in else None
  if complex_in != (kind != lax.FftType.RFFT):
    return None
  x_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  m = len(eqn.params["fft_lengths"])
  lead = len(x_shape) - m
  sign = 1.0 if kind == lax.FftType.IFFT else -1.0
  mats = [_dft(y_shape[a], x_shape[a], sign) / (x_shape[a] if sign > 0 else 1)
          for a in range(lead, len(x_shape))]
  factor = functools.reduce(np.multiply.outer, mats, np.ones((), complex))
  factor = factor.transpose(tuple(range(0, 2 * m, 2)) + tuple(range(1, 2 * m, 2)))
  dtype = eqn.out_aval.dtype
  return RuleResult(Structure(trace=tuple((a, a) for a in range(lead))),
                    lambda *ops: jnp.asarray(factor, dtype), dense=True)
