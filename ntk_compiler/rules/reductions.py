"""Rules for the linear reductions: `reduce_sum`, `reduce_window_sum` and `cumsum`.

Their factors depend on shapes and params only (0/1 matrices), never on values.
"""

from __future__ import annotations

import itertools

import jax.numpy as jnp
from jax import lax

from ntk_compiler.rules import EqnInfo, RuleResult, register_rule
from ntk_compiler.structure import Structure, selection_matrix


@register_rule(lax.reduce_sum_p)
def reduce_sum_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Kept axes traced, summed axes w_tiled; the factor is the scalar 1."""
  axes = tuple(eqn.params["axes"])
  kept = [d for d in range(len(eqn.in_avals[0].shape)) if d not in axes]
  dtype = eqn.out_aval.dtype
  return RuleResult(Structure(trace=tuple(enumerate(kept)), w_tiled=axes),
                    lambda *ops: jnp.ones((), dtype))


def _window_matrix(n_in, n_out, window, stride, pad_lo, base, dilation, dtype):
  """M[j, i] = 1 where tap t of output window j lands on input i:
  j * stride + t * dilation == pad_lo + i * base."""
  pairs = [(j, (j * stride + t * dilation - pad_lo) // base)
           for j, t in itertools.product(range(n_out), range(window))
           if (j * stride + t * dilation - pad_lo) % base == 0]
  return selection_matrix(n_out, n_in, [(j, i) for j, i in pairs if 0 <= i < n_in], dtype)


@register_rule(lax.reduce_window_sum_p)
def reduce_window_sum_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Axes with a trivial window traced; every other axis a free y and a free w axis
  with a 0/1 window matrix; the factor is the outer product of those matrices."""
  p = eqn.params
  x_shape, y_shape = eqn.in_avals[0].shape, eqn.out_aval.shape
  axes = list(zip(range(len(x_shape)), p["window_dimensions"], p["window_strides"],
                  p["padding"], p["base_dilation"], p["window_dilation"]))
  trivial = [d for d, w, s, pad, b, _ in axes if (w, s, tuple(pad), b) == (1, 1, (0, 0), 1)]
  dtype = eqn.out_aval.dtype
  mats = [_window_matrix(x_shape[d], y_shape[d], w, s, pad[0], b, wd, dtype)
          for d, w, s, pad, b, wd in axes if d not in trivial]

  def factor(*ops):
    k = len(mats)
    args = [x for i, m in enumerate(mats) for x in (m, [i, k + i])]
    return jnp.einsum(*args, list(range(2 * k))) if k else jnp.ones((), dtype)

  return RuleResult(Structure(trace=tuple((d, d) for d in trivial)), factor)


@register_rule(lax.cumsum_p)
def cumsum_rule(eqn: EqnInfo, operand: int) -> RuleResult | None:
  """Other axes traced; the summed axis a free y and w axis with a triangular 0/1 matrix
  (lower, or upper when `reverse`)."""
  axis, reverse = eqn.params["axis"], eqn.params.get("reverse", False)
  ndim, n = len(eqn.out_aval.shape), eqn.out_aval.shape[axis]
  dtype = eqn.out_aval.dtype

  def factor(*ops):
    lower = jnp.tri(n, dtype=dtype)
    return lower.T if reverse else lower

  return RuleResult(Structure(trace=tuple((d, d) for d in range(ndim) if d != axis)), factor)
