"""FLOPs of programs and of candidate NTK computations, from shapes alone."""

from __future__ import annotations

import math

from jax import lax

from ntk_compiler import compat


def _size(aval) -> int:
  return math.prod(getattr(aval, "shape", ()))


def eqn_flops(eqn) -> int:
  """Approximate FLOPs of one equation, not counting its sub-jaxprs."""
  out = sum(_size(v.aval) for v in eqn.outvars)
  if eqn.primitive is lax.dot_general_p:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs_shape = eqn.invars[0].aval.shape
    return 2 * out * math.prod(lhs_shape[d] for d in lhs_contract)
  if eqn.primitive is lax.conv_general_dilated_p:
    rhs_shape = eqn.invars[1].aval.shape
    out_feature_dim = eqn.params["dimension_numbers"].rhs_spec[0]
    per_output = math.prod(rhs_shape) // rhs_shape[out_feature_dim]
    return 2 * out * per_output // eqn.params["batch_group_count"]
  return out


def jaxpr_flops(jaxpr) -> int:
  """Approximate FLOPs of one evaluation of a jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in compat.open_jaxpr(jaxpr).eqns:
    subs = list(compat.sub_jaxprs(eqn))
    if subs:
      # Branches: count the dearest; loops: count every trip we know of.
      total += compat.trip_count(eqn) * max(jaxpr_flops(s) for s in subs)
    else:
      total += eqn_flops(eqn)
  return total


def einsum_flops(operand_labels, result, sizes) -> int:
  """FLOPs of an einsum along the contraction order `jnp.einsum` would pick."""
  import opt_einsum  # a dependency of jax

  symbol = {l: opt_einsum.get_symbol(i) for i, l in enumerate(
      dict.fromkeys(l for labels in operand_labels for l in labels))}
  expr = ",".join("".join(symbol[l] for l in labels) for labels in operand_labels)
  expr += "->" + "".join(symbol[l] for l in result)
  shapes = [tuple(sizes[l] for l in labels) for labels in operand_labels]
  if len(shapes) == 1:
    return math.prod(shapes[0])
  _, info = opt_einsum.contract_path(expr, *shapes, shapes=True, optimize="auto")
  return int(info.opt_cost)
