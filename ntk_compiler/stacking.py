"""Backward convolutions before a pooled head, stacked over the output basis.

A side's backward pass is one VJP vmapped over a basis of the output space (K rows).
Through a convolution y = conv(x, W) whose output reaches f's outputs only through
elementwise equations, a reduce_sum over every axis but the features (a global pool)
and a linear head with weight coefficients, the cotangent of row k is

    ct_y[k] = D ∘ broadcast(u_k),  D = ∂(Σ pooled)/∂y (per example),  u_k = ∂out_k/∂pool,

and ⟨D ∘ u_k, conv(x, W)⟩ = ⟨D, conv(x, W ∘ u_k)⟩: the K data-gradient convolutions of
one example are one convolution with the K scaled kernels stacked along its output
features. vmapped over k, JAX's batching of a convolution whose kernel alone is batched
makes exactly that (K·C_in output channels instead of K times the batch), which XLA's
CPU convolution runs 1.5-2x faster. The rest of the backward pass is unchanged: the
convolution's input edge is cut off (stop_gradient) and the stacked cotangent enters
there, in the same vmapped VJP (f's cotangent is linear: the paths through that edge
and the other paths add up).

Only the form of the proof matters for exactness (the chain's derivative is diagonal
and the pool sums every non-feature axis); the head's linearity with weight
coefficients only decides speed (a per-example u_k would stack per-example kernels).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import primitives as prims

from ntk_compiler import analysis, compat

# Equations a pooled value may pass through to f's outputs while its cotangent stays
# independent of the example: linear in it, any other operand a weight or a constant.
_LINEAR = frozenset(getattr(lax, f"{n}_p") for n in (
    "add", "sub", "neg", "reshape", "squeeze", "broadcast_in_dim", "transpose",
    "convert_element_type", "reduce_sum", "slice", "concatenate", "expand_dims")
    if hasattr(lax, f"{n}_p")) | {prims.add_jaxvals_p}
_SCALING = frozenset({lax.dot_general_p, lax.mul_p})
_CHAIN_MAX = 16  # elementwise equations between the convolution and the pool


@dataclasses.dataclass(frozen=True, eq=False)
class Stacked:
  """A top-level convolution whose backward pass is stacked: its equation index, the
  elementwise chain to the pool (the pool's reduce_sum last), the head's equations
  after it, and the variables their replay reads."""
  conv: int
  chain: tuple[int, ...]
  head: tuple[int, ...]
  reads: tuple  # top-level variables whose forward values the seed reads

  def describe(self, jaxpr, outputs: int) -> str:
    eqn = jaxpr.eqns[self.conv]
    lhs = eqn.invars[0].aval.shape[eqn.params["dimension_numbers"].lhs_spec[1]]
    return (f"the backward pass through conv_general_dilated (equation {self.conv}) "
            f"before a pooled head: one convolution per example for all {outputs} "
            f"output rows, their kernels stacked ({outputs} x {lhs} channels)")


def find(plan: analysis.Plan) -> tuple[Stacked, ...]:
  """The convolutions of `plan`'s top level whose backward pass can be stacked."""
  jaxpr = plan.jaxpr
  readers = analysis._readers(jaxpr)
  dep = analysis.dependence(jaxpr, [i >= plan.num_params
                                    for i in range(len(jaxpr.invars))])
  cut = _cut_dependence(jaxpr, plan.edge_cuts)
  found = []
  for i, eqn in enumerate(jaxpr.eqns):
    if not _stackable_conv(eqn, dep, cut):
      continue
    tail = _pooled_chain(jaxpr, eqn, readers, dep)
    if tail is None:
      continue
    chain, pool = tail
    head = _linear_head(jaxpr, pool, dep)
    if head is None:
      continue
    steps = [jaxpr.eqns[j] for j in chain + head]
    computed = {v for e in steps for v in e.outvars} | {eqn.outvars[0]}
    reads = tuple(dict.fromkeys(
        [a for e in steps for a in e.invars
         if not isinstance(a, compat.Literal) and a not in computed]
        + [eqn.outvars[0], pool]))
    found.append(Stacked(i, tuple(chain), tuple(head), reads))
  return tuple(found)


def _stackable_conv(eqn, dep: dict, cut: set) -> bool:
  if eqn.primitive is not lax.conv_general_dilated_p:
    return False
  lhs, rhs = eqn.invars
  return (eqn.params["feature_group_count"] == 1 and eqn.params["batch_group_count"] == 1
          and not isinstance(lhs, compat.Literal) and lhs in cut
          and not isinstance(rhs, compat.Literal) and not dep.get(rhs, False)
          and all(jnp.issubdtype(v.aval.dtype, jnp.floating) for v in (lhs, rhs))
          and lhs.aval.dtype == rhs.aval.dtype == eqn.outvars[0].aval.dtype)


def _pooled_chain(jaxpr, conv, readers: dict, dep: dict):
  """(chain equation indices, the pool's output var) when conv's output reaches f only
  through elementwise equations (each its value's only reader, or a region a value
  fans out into: tanh-GELU) and reshapes adding or dropping unit axes, then a
  reduce_sum keeping only the feature axis (and unit axes); else None."""
  index = {id(e): j for j, e in enumerate(jaxpr.eqns)}
  regions = analysis._Regions(jaxpr, readers, dep)
  var = conv.outvars[0]
  shape = tuple(var.aval.shape)
  feature = conv.params["dimension_numbers"].out_spec[1]
  if shape[feature] == 1:
    return None
  chain = []
  for _ in range(_CHAIN_MAX + 1):
    found = list({id(e): e for e in readers.get(var, [])}.values())  # y * y: one reader
    if None in found or not found:
      return None
    if len(found) > 1:  # a fan-out: stacked through a whole elementwise region only
      region = regions.of(var)
      if region is None:
        return None
      chain += regions.taken[var]
      var = region[0]
      continue
    eqn = found[0]
    chain.append(index[id(eqn)])
    if eqn.primitive is lax.reduce_sum_p:
      kept = [a for a in range(len(shape)) if a not in eqn.params["axes"]]
      if feature not in kept or any(shape[a] != 1 for a in kept if a != feature):
        return None
      return chain, eqn.outvars[0]
    if eqn.primitive in _UNIT_RESHAPES and len(eqn.outvars) == 1:
      feature = _unit_reshaped(shape, tuple(eqn.outvars[0].aval.shape), feature)
      if feature is None:
        return None
      var = eqn.outvars[0]
      shape = tuple(var.aval.shape)
      continue
    if not _elementwise(eqn, var, shape):
      return None
    var = eqn.outvars[0]
  return None


_UNIT_RESHAPES = frozenset({lax.reshape_p, lax.squeeze_p, lax.expand_dims_p}
                           if hasattr(lax, "expand_dims_p") else
                           {lax.reshape_p, lax.squeeze_p})


def _unit_reshaped(shape, new, feature):
  """Where axis `feature` of `shape` goes in `new` when the reshape only adds or drops
  unit axes (Equinox's conv output: [1, C, H, W] <-> [1, 1, C, H, W]); else None."""
  old_axes = [a for a, n in enumerate(shape) if n != 1]
  new_axes = [a for a, n in enumerate(new) if n != 1]
  if [shape[a] for a in old_axes] != [new[a] for a in new_axes]:
    return None
  return new_axes[old_axes.index(feature)]


def _elementwise(eqn, var, shape) -> bool:
  """Whether `eqn` maps `var` (of `shape`) to one array of `shape` elementwise (its
  other operands may be broadcast along unit axes: a bias)."""
  if analysis._pointwise(eqn, shape):
    return True
  def broadcast(a):
    return len(a) == len(shape) and all(n in (m, 1) for n, m in zip(a, shape))
  return (eqn.primitive in analysis._ELEMENTWISE and len(eqn.outvars) == 1
          and tuple(eqn.outvars[0].aval.shape) == shape
          and all(tuple(a.aval.shape) == shape for a in eqn.invars if a is var)
          and all(broadcast(tuple(getattr(a.aval, "shape", ()))) or not a.aval.shape
                  for a in eqn.invars))


def _linear_head(jaxpr, pooled, dep: dict) -> list[int] | None:
  """The equations from the pooled value to f's outputs, when each is linear in it with
  coefficients independent of the example; else None."""
  reached, head = {pooled}, []
  for j, eqn in enumerate(jaxpr.eqns):
    if not analysis._carries_derivative(eqn) or not any(
        a in reached for a in eqn.invars if not isinstance(a, compat.Literal)):
      continue
    others = [a for a in eqn.invars
              if not isinstance(a, compat.Literal) and a not in reached]
    if eqn.primitive in _SCALING:
      if any(dep.get(a, True) for a in others) or sum(
          not isinstance(a, compat.Literal) and a in reached for a in eqn.invars) != 1:
        return None
    elif eqn.primitive is lax.div_p:
      divisor = eqn.invars[1]
      if (not isinstance(divisor, compat.Literal) and divisor in reached
          or any(dep.get(a, True) for a in others)):
        return None
    elif eqn.primitive not in _LINEAR:
      return None
    head.append(j)
    reached.update(eqn.outvars)
  if not any(v in reached for v in jaxpr.outvars if not isinstance(v, compat.Literal)):
    return None
  return head


def _cut_dependence(jaxpr, edge_cuts: dict) -> set:
  """Top-level variables a cut's perturbation reaches (its backward pass goes there)."""
  perturbed = {edge[0][0] for edge in edge_cuts if edge[0] != "out" and edge[0]}
  reached: set = set()
  for j, eqn in enumerate(jaxpr.eqns):
    if j in perturbed or any(a in reached for a in eqn.invars
                             if not isinstance(a, compat.Literal)):
      reached.update(eqn.outvars)
  return reached


def _replay(jaxpr, indices, env: dict, start, value):
  """The equations `indices` of `jaxpr` with `start` set to `value`, the rest of their
  operands read from `env`: the values they compute, by variable."""
  local = {start: value}
  for j in indices:
    eqn = jaxpr.eqns[j]
    vals = [a.val if isinstance(a, compat.Literal) else local.get(a, env.get(a))
            for a in eqn.invars]
    local.update(zip(eqn.outvars, compat.bind_eqn(eqn, vals)))
  return local


def seed(jaxpr, stacked: Stacked, reads: list, lhs, rhs, row):
  """The cotangent at the convolution's input for one output-basis `row` (vmap it over
  the rows: the kernel alone is batched, so the K convolutions stack).

  `reads`: the forward values of `stacked.reads`; `lhs`, `rhs`: the convolution's
  operands as read; `row`: cotangents of f's outputs."""
  env = dict(zip(stacked.reads, reads))
  conv = jaxpr.eqns[stacked.conv]
  y = conv.outvars[0]
  pool = jaxpr.eqns[stacked.chain[-1]].outvars[0]

  def pooled(value):
    return _replay(jaxpr, stacked.chain, env, y, value)[pool]

  def head(value):  # f's outputs as functions of the pooled value (others: constants)
    local = _replay(jaxpr, stacked.head, env, pool, value)
    return [local[v] if not isinstance(v, compat.Literal) and v in local
            else jnp.zeros(v.aval.shape, v.aval.dtype) for v in jaxpr.outvars]

  _, pull = jax.vjp(pooled, env[y])
  (diagonal,) = pull(jnp.ones_like(env[pool]))
  outs, pull_head = jax.vjp(head, env[pool])
  (u,) = pull_head([r.astype(o.dtype) for r, o in zip(row, outs)])
  rhs_spec = conv.params["dimension_numbers"].rhs_spec
  scale = [1] * rhs.ndim
  scale[rhs_spec[0]] = math.prod(u.shape)
  kernel = rhs * u.reshape(scale).astype(rhs.dtype)
  _, pull_conv = jax.vjp(lambda x: compat.bind_eqn(conv, [x, kernel])[0], lhs)
  return pull_conv(diagonal)[0]
