"""Plan -> one JAX function: cotangents at every cut, factors, structured contractions.

For each side (x1, and x2 unless it is omitted) one forward pass evaluates f's jaxpr,
perturbing each cut by a zero `eps` and computing the factors of every view; one backward
pass, vmapped over a basis of the output space, gives ∂f/∂(cut) for every cut at once.
Then each parameter leaf contributes, per pair of its uses, one einsum of
(cotangent, factors) of side 1 with (factors, cotangent) of side 2, sharing the labels of
the parameter's axes; output axes are traced and diagonalised inside that einsum.
"""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ntk_compiler import analysis, compat, stacking
from ntk_compiler import structure as structure_lib
from ntk_compiler.analysis import Plan, Use
from ntk_compiler.axes import Layout
from ntk_compiler.methods.common import widen


def evaluate(plan: Plan, args: list, eps: dict, record: dict | None = None
             ) -> tuple[list, dict]:
  """f's jaxpr on `args`, each cut perturbed by `eps`; also every factor's value.

  Inside a scan body with cuts or factors, the scan runs a body that does the same per
  step: it takes its slice of those cuts' `eps` and stacks its factors.
  With `record`, the input edges of the stacked convolutions (`plan.stacked`) are cut
  off (their cotangents enter as seeds) and `record` receives the top level's values
  ("env") and those convolutions' operands ("operands", by equation index).
  """
  factors: dict = {}
  stop = {s.conv for s in plan.stacked} if record is not None else set()
  if record is not None:
    record["operands"] = {}

  def perturb(value, edge, eps):
    for cid in plan.edge_cuts.get(edge, ()):
      value = value + eps[cid].astype(value.dtype)
    return value

  def run(jaxpr, consts, invals, prefix, eps, factors):
    env = dict(zip(jaxpr.constvars, consts))
    env.update(zip(jaxpr.invars, invals))
    for i, eqn in enumerate(jaxpr.eqns):
      path = prefix + (i,)
      vals = [compat.read_atom(env, a) for a in eqn.invars]
      for factor, _ in plan.factors.get(path, ()):
        factors[factor.id] = jnp.asarray(factor.fn(*vals))
      vals = [perturb(v, (path, k), eps) for k, v in enumerate(vals)]
      if not prefix and i in stop:
        record["operands"][i] = list(vals)
        vals[0] = lax.stop_gradient(vals[0])
      if path in plan.inline:
        inner, inner_consts = compat.call_body(eqn)
        outs = run(inner, inner_consts, vals, path, eps, factors)
      elif path in plan.scans:
        outs = scan(eqn, vals, path, eps, factors)
      elif path in plan.conds:
        outs = cond(eqn, vals, path, eps, factors)
      else:
        outs = compat.bind_eqn(eqn, vals)
      env.update(zip(eqn.outvars, outs))
    if not prefix and record is not None:
      record["env"] = env
    return [compat.read_atom(env, v) for v in jaxpr.outvars]

  def scan(eqn, vals, path, eps, factors):
    num_consts, num_carry = compat.scan_layout(eqn)
    body = eqn.params["jaxpr"]
    inner, inner_consts = compat.open_jaxpr(body), list(getattr(body, "consts", []))
    cut_ids, factor_ids = plan.scans[path]
    consts, carry = vals[:num_consts], vals[num_consts:num_consts + num_carry]

    def step(carry, xs):
      x, eps_t = xs
      local: dict = {}
      outs = run(inner, inner_consts, consts + list(carry) + list(x), path, eps_t, local)
      outs = [perturb(o, (path + ("out",), k), eps_t) for k, o in enumerate(outs)]
      return outs[:num_carry], (outs[num_carry:], {f: local[f] for f in factor_ids})

    carry, (ys, stacked) = jax.lax.scan(
        step, carry, (vals[num_consts + num_carry:], {c: eps[c] for c in cut_ids}),
        length=eqn.params["length"], reverse=eqn.params["reverse"],
        unroll=eqn.params["unroll"])
    factors.update(stacked)
    return list(carry) + list(ys)

  def cond(eqn, vals, path, eps, factors):
    branches = eqn.params["branches"]

    def branch(b):
      inner = compat.open_jaxpr(branches[b])
      consts = list(getattr(branches[b], "consts", []))

      def fn(ops):
        local: dict = {}
        outs = run(inner, consts, list(ops), path + (b,), eps, local)
        outs = [perturb(o, (path + (b, "out"), k), eps) for k, o in enumerate(outs)]
        return outs, {f: local[f] for f in plan.conds[path][b][1]}
      return fn

    fns = [branch(b) for b in range(len(branches))]
    shapes = [jax.eval_shape(fn, vals[1:])[1] for fn in fns]

    def padded(b):  # every branch returns every branch's factors (zeros if not its own)
      def fn(ops):
        outs, mine = fns[b](ops)
        every = {f: mine[f] if c == b else jnp.zeros(a.shape, a.dtype)
                 for c, own in enumerate(shapes) for f, a in own.items()}
        return outs, every
      return fn

    outs, stacked = jax.lax.switch(vals[0], [padded(b) for b in range(len(fns))], vals[1:])
    factors.update(stacked)
    return list(outs)

  outs = run(plan.jaxpr, plan.consts, list(args), (), eps, factors)
  return [perturb(o, ("out", k), eps) for k, o in enumerate(outs)], factors


@dataclasses.dataclass
class Side:
  """One side's arrays: per output leaf, cotangents by cut id; factors by factor id."""
  cts: list[dict]
  factors: dict
  _conj: "Side | None" = dataclasses.field(default=None, repr=False, compare=False)

  def conjugate(self) -> "Side":
    """The same side with every complex array conjugated (made once, then kept: the
    pair terms' memo tells sides apart by identity)."""
    if self._conj is None:
      conj = lambda a: jnp.conj(a) if jnp.iscomplexobj(a) else a
      self._conj = Side([{c: conj(a) for c, a in cts.items()} for cts in self.cts],
                        {f: conj(a) for f, a in self.factors.items()})
    return self._conj


def side(plan: Plan, params: list, x: list, per_example: bool) -> Side:
  """Cotangents at every cut and every factor, for the inputs `x` (one pass each way)."""
  def one(params, x):
    eps0 = {c.id: jnp.zeros(c.shape, c.dtype) for c in plan.cuts}
    stacked = plan.stacked if per_example else ()
    outs, vjp, (factors, record) = jax.vjp(
        lambda eps: _evaluate_stacked(plan, params + x, eps, stacked), eps0, has_aux=True)
    sizes = [math.prod(o.shape) for o in outs[0]]
    total = sum(sizes)
    offsets = np.cumsum([0] + sizes)
    basis = [jnp.eye(total, dtype=o.dtype)[:, a:b].reshape((total,) + o.shape)
             for o, a, b in zip(outs[0], offsets[:-1], offsets[1:])]
    with jax.named_scope("ntk/cotangents"):
      seeds = [jax.vmap(lambda row, s=s, r=r: stacking.seed(plan.jaxpr, s, *r, row))(basis)
               for s, r in zip(stacked, record)]
      (cts,) = jax.vmap(vjp)((basis, seeds))
    per_leaf = [{cid: ct[a:b].reshape(o.shape + ct.shape[1:]) for cid, ct in cts.items()}
                for o, a, b in zip(outs[0], offsets[:-1], offsets[1:])]
    return per_leaf, factors

  if not per_example:
    return Side(*widen(one(params, x)))
  num_outs = len(plan.jaxpr.outvars)
  factor_axes = {f.id: (0 if f.batched else None)
                 for fs in plan.factors.values() for f, _ in fs}
  cut_axes = [{c.id: 0 for c in plan.cuts} for _ in range(num_outs)]
  cts, factors = jax.vmap(one, in_axes=(None, 0), out_axes=(cut_axes, factor_axes))(
      params, x)
  return Side(*widen((cts, factors)))


def _evaluate_stacked(plan: Plan, args: list, eps: dict, stacked: tuple):
  """evaluate(), with each stacked convolution's input as a second output (its
  cotangent, the seed, enters there) and what its seed reads as aux."""
  if not stacked:
    outs, factors = evaluate(plan, args, eps)
    return (outs, []), (factors, [])
  record: dict = {}
  outs, factors = evaluate(plan, args, eps, record)
  env = record["env"]
  seeds = [([env[v] for v in s.reads], *record["operands"][s.conv]) for s in stacked]
  return (outs, [lhs for _, lhs, _ in seeds]), (factors, seeds)


def _along(array, labels, target):
  """`array` (axes `labels`) transposed to the order of `target`, with unit axes for the
  labels of `target` it lacks."""
  labels = list(labels)
  order = [labels.index(l) for l in target if l in labels]
  return jnp.transpose(array, order).reshape(
      [array.shape[labels.index(l)] if l in labels else 1 for l in target])


def _einsum(ops, result):
  args = []
  for array, labels in ops:
    args += [array, labels]
  return jnp.einsum(*args, result)


def _contract(ops: list[analysis.Operand], sides, k: int, out: list[int],
              memo: dict | None = None) -> jax.Array:
  """einsum of `ops` (each from the side in `sides`, by operand) to the labels `out`.

  Two one-hot factors along a summed label become a comparison of their positions; a
  one-hot factor along an output label is applied by a scatter-add; any other one-hot
  factor is expanded. With a `memo`, the einsum is split into the groups of operands
  that share summed labels (a cotangent Gram, an input Gram), multiplied at the end,
  and each group is computed once for every term that has it: a bias and the weight
  of the same layer share their cotangents' Gram.
  """
  dtype = jnp.result_type(*[side.cts[k][o.id] for o, side in zip(ops, sides)
                             if o.kind == "ct"])
  where = {id(o): side for o, side in zip(ops, sides)}
  positions = lambda o: where[id(o)].factors[o.id]

  def array(o):
    if o.kind == "mask":
      pa, pb = (_along(positions(p), p.rest, o.labels) for p in o.parts)
      return ((pa == pb) & (pa >= 0)).astype(dtype)
    if o.kind == "ct":
      return where[id(o)].cts[k][o.id]
    if o.one_hot is None:
      return positions(o)
    return structure_lib.one_hot_factor(positions(o), o.one_hot, o.shape[o.one_hot], dtype)

  ops = analysis.match_one_hots(ops, set(out))
  hot = analysis.scattered_one_hot(ops, out)
  if hot is None and memo is not None and all(
      o.kind != "mask" and o.one_hot is None for o in ops):
    original = ops
    ops = analysis.without_unit_sums(ops, out)
    squeezed = {id(o): [a for a, l in enumerate(before.labels) if l not in o.labels]
                for o, before in zip(ops, original)}
    where.update({id(o): where[id(before)] for o, before in zip(ops, original)})
    parts = []
    for group in analysis.summed_groups(ops, out):
      group_out = [l for l in out if any(l in o.labels for o in group)]
      key = k, analysis.group_key(group, group_out, [id(where[id(o)]) for o in group])
      if key not in memo:
        memo[key] = _einsum([(_squeeze(array(o), squeezed[id(o)]), list(o.labels))
                             for o in group], group_out)
      parts.append((memo[key], group_out))
    return parts[0][0] if len(parts) == 1 and parts[0][1] == list(out) else _einsum(
        parts, out)
  if hot is None:
    return _einsum([(array(o), list(o.labels)) for o in ops], out)
  rest = [o for o in ops if o is not hot]
  sizes = {l: n for o in ops for l, n in zip(o.labels, o.shape)}
  inner = analysis.scatter_labels(hot, out)
  carried = [l for l in inner if any(l in o.labels for o in rest)]
  values = _einsum([(array(o), list(o.labels)) for o in rest], carried)
  shape = [sizes[l] for l in inner]
  values = jnp.broadcast_to(_along(values, carried, inner), shape)
  axis = hot.labels[hot.one_hot]
  index = jnp.broadcast_to(_along(positions(hot), hot.rest, inner), shape)
  index = jnp.where(index < 0, sizes[axis], index)  # out of range: dropped, not wrapped
  indices = tuple(index if l == axis else jax.lax.broadcasted_iota(
      jnp.int32, shape, inner.index(l)) for l in out)
  total = jnp.zeros([sizes[l] for l in out], dtype)
  return total.at[indices].add(values.astype(dtype), mode="drop")


def _squeeze(array, axes):
  return jnp.squeeze(array, tuple(axes)) if axes else array


def pair_term(plans, u: Use, v: Use, side1: Side, side2: Side, k: int, layout: Layout,
              shapes, per_example: bool, memo: dict | None = None) -> jax.Array:
  """Σ_w (ct1·∂y_u/∂w)(ct2·∂y_v/∂w)ᵀ for uses u, v of one leaf with the same base."""
  s1, s2, result = layout.indices()
  labels = analysis.Labels(layout.num_indices)
  ops1 = analysis.operands(plans[0], u, s1, shapes[0], "1", labels, per_example)
  ops2 = analysis.operands(plans[1], v, s2, shapes[1], "2", labels, per_example)
  scale = u.view.scale * v.view.scale * analysis.absent_w_size(u.view, ops1 + ops2, labels)
  term = _contract(ops1 + ops2, [side1] * len(ops1) + [side2] * len(ops2), k, result,
                   memo)
  if _complex(u) and _complex(v):
    # Complex views of a real leaf: its Jacobians are Re(U1), Re(U2), with U the complex
    # products, and Σ_w Re(U1) Re(U2) = ½ Re Σ_w U1 U2 + ½ Re Σ_w U1 conj(U2).
    conj = _contract(ops1 + ops2, [side1] * len(ops1) + [side2.conjugate()] * len(ops2),
                     k, result, memo)
    term = (term.real + conj.real) / 2
  elif _complex(u) or _complex(v):
    term = term.real  # Re(U1) U2 = Re(U1 U2) for a real U2
  return term if scale == 1.0 else term * scale


def _complex(use: Use) -> bool:
  """Whether a use's view is complex (cut at a complex value, factors maybe complex)."""
  return jnp.issubdtype(use.cut.dtype, jnp.complexfloating)


def leaf_gradients(plan: Plan, use: Use, side: Side, k: int, layout: Layout,
                   out_shape, per_example: bool) -> jax.Array:
  """ct·∂y/∂w materialised: shape (side-1 output axes) + leaf shape. The dense path."""
  side_labels = layout.indices()[0]
  labels = analysis.Labels(layout.num_indices)
  ops = analysis.operands(plan, use, side_labels, out_shape, "1", labels, per_example)
  view = use.view
  w_out = [labels(("w", i)) for i in range(len(view.base_shape))]
  used = set(itertools.chain.from_iterable(o.labels for o in ops))
  g = _contract(ops, [side] * len(ops), k, side_labels + [l for l in w_out if l in used])
  g = (g.real if _complex(use) else g) * view.scale  # a real leaf's Jacobian: Re(U)
  lead = tuple(g.shape[:len(side_labels)])
  g = g.reshape(lead + tuple(n if l in used else 1 for n, l in zip(view.base_shape, w_out)))
  g = jnp.broadcast_to(g, lead + view.base_shape)
  return _unbase(g, view.base, len(lead), plan.leaf_shapes[view.leaf])


def _unbase(g, base, lead: int, leaf_shape):
  """Undo the view's re-indexing (transposes, reshapes) on the trailing axes of g."""
  shapes = [tuple(leaf_shape)]
  for op, arg in base:
    prev = shapes[-1]
    shapes.append(tuple(prev[p] for p in arg) if op == "transpose" else tuple(arg))
  for (op, arg), prev in zip(reversed(base), reversed(shapes[:-1])):
    if op == "transpose":
      inverse = tuple(np.argsort(arg))
      g = jnp.transpose(g, tuple(range(lead)) + tuple(lead + i for i in inverse))
    else:
      g = g.reshape(g.shape[:lead] + prev)
  return g


def contract_leaf(plan1: Plan, plan2: Plan, leaf: int, side1: Side, side2: Side,
                  symmetric: bool, k: int, layout: Layout, shapes, per_example: bool,
                  materialize: bool, memo: dict | None = None):
  """The kernel term of one parameter leaf for output leaf k, or None if it is unused.

  Pairwise structured einsums when every use shares one base (indexing of the leaf);
  otherwise each side's uses are materialised as ct·∂y/∂w and summed first.
  """
  uses1, uses2 = plan1.uses_of(leaf), plan2.uses_of(leaf)
  if not uses1 or not uses2:  # f does not depend on the leaf on one side: no term
    return None
  bases = {u.view.base for u in uses1 + uses2}
  if materialize or len(bases) > 1 or len(uses1) != len(uses2):
    if NATURAL_GRAMS and len(uses1) == len(uses2) == 1:
      term = _natural_gram(plan1, plan2, uses1[0], uses2[0], side1, side2, symmetric, k,
                           layout, shapes, per_example)
      if term is not None:
        return term
    s1, s2, result = layout.indices()
    shape = plan1.leaf_shapes[leaf]
    w = list(range(layout.num_indices, layout.num_indices + len(shape)))
    g1 = sum(leaf_gradients(plan1, u, side1, k, layout, shapes[0], per_example)
             for u in uses1)
    g2 = g1 if symmetric else sum(
        leaf_gradients(plan2, u, side2, k, layout, shapes[1], per_example)
        for u in uses2)
    return jnp.einsum(g1, s1 + w, g2, s2 + w, result)
  total = None
  for i, u in enumerate(uses1):
    for j, v in enumerate(uses2):
      if symmetric and j < i:
        continue
      term = pair_term((plan1, plan2), u, v, side1, side2, k, layout, shapes,
                       per_example, memo)
      if symmetric and j > i:
        term = term + jnp.transpose(term, layout.mirror_perm())
      total = term if total is None else total + term
  return total


NATURAL_GRAMS = True


def _natural_gram(plan1, plan2, u: Use, v: Use, side1, side2, symmetric, k, layout,
                  shapes, per_example):
  """A materialised term of a traced layout (every output axis but the examples'
  summed) from each side's gradient in the order its einsum produces it: both sides'
  gradients are then contracted whole, in place. Asked for in the leaf's order, XLA
  keeps the product's order in memory and copies each gradient to contract it (on a
  ResNet: six copies of 6 MB per call). None where this does not apply."""
  s1, s2, result = layout.indices()
  if (s1[1:] != s2[1:] or result != [s1[0], s2[0]] or s1[0] == s2[0]
      or u.view.base or v.view.base or _complex(u) or _complex(v)):
    return None
  g1 = _natural_gradient(plan1, u, side1, k, layout, shapes[0], per_example)
  g2 = g1 if symmetric else _natural_gradient(plan2, v, side2, k, layout, shapes[1],
                                              per_example)
  if g1 is None or g2 is None or sorted(g1[1]) != sorted(g2[1]):
    return None
  (a, l1), (b, l2) = g1, g2
  rename = dict(zip(s1, s2))
  l2 = [rename.get(l, l) for l in l2]
  summed = [l for l in l1 if l not in result]
  out = lax.dot_general(a, b, (([l1.index(l) for l in summed],
                                [l2.index(l) for l in summed]), ((), ())))
  names = [l for l in l1 if l in result] + [l for l in l2 if l in result]
  return jnp.transpose(out, [names.index(l) for l in result])


def _natural_gradient(plan: Plan, use: Use, side: Side, k: int, layout: Layout,
                      out_shape, per_example: bool):
  """(ct·∂y/∂w, its labels) in the order the einsum gives it (side 1's output labels
  and the leaf's), or None when a leaf axis is unused or a factor is one-hot."""
  side_labels = layout.indices()[0]
  labels = analysis.Labels(layout.num_indices)
  ops = analysis.operands(plan, use, side_labels, out_shape, "1", labels, per_example)
  w_out = [labels(("w", i)) for i in range(len(use.view.base_shape))]
  used = set(itertools.chain.from_iterable(o.labels for o in ops))
  if any(l not in used for l in w_out) or any(
      o.kind == "mask" or o.one_hot is not None for o in ops):
    return None
  want = side_labels + w_out
  arrays = [(side.cts[k][o.id] if o.kind == "ct" else side.factors[o.id], list(o.labels))
            for o in ops]
  order = _einsum_order(arrays, want)
  return _einsum(arrays, order) * use.view.scale, order


def _einsum_order(arrays, want):
  """The order of the labels `want` in which jnp.einsum returns its result without a
  final transpose (found by tracing it on shapes)."""
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a, _ in arrays]
  names = [l for _, l in arrays]
  traced = jax.make_jaxpr(lambda *xs: _einsum(list(zip(xs, names)), want))(*specs)
  jaxpr = traced.jaxpr
  while len(jaxpr.eqns) == 1 and compat.call_body(jaxpr.eqns[0]) is not None:
    jaxpr = compat.call_body(jaxpr.eqns[0])[0]
  last = jaxpr.eqns[-1] if jaxpr.eqns else None
  if last is None or last.primitive is not lax.transpose_p or last.outvars[0] not in (
      jaxpr.outvars):
    return list(want)
  perm = last.params["permutation"]  # result axis i is axis perm[i] of the product
  return [want[list(perm).index(j)] for j in range(len(want))]


def structured_ntk(plan1: Plan, plan2: Plan | None, params: list, x1: list,
                   x2: list | None, layouts, shapes1, shapes2, per_example: bool,
                   materialize: frozenset = frozenset()) -> list[jax.Array]:
  """The kernel of every output leaf by structured derivatives.

  `plan2` is the plan at x2's signature (None: the same as `plan1`); x2 None means
  Θ(x1, x1), computed with each unordered pair of uses once.
  """
  symmetric = x2 is None
  merged = not symmetric and per_example and plan2 is None and _merge(params, x1, x2)
  plan2 = plan1 if plan2 is None else plan2
  if merged:
    side1, side2 = _merged_sides(plan1, params, x1, x2)
  else:
    with jax.named_scope("ntk/side1"):
      side1 = side(plan1, params, x1, per_example)
    if symmetric:
      side2 = side1
    else:
      with jax.named_scope("ntk/side2"):
        side2 = side(plan2, params, x2, per_example)
  with jax.named_scope("ntk/contract"):
    return contract_kernels(plan1, plan2, side1, side2, symmetric, layouts, shapes1,
                            shapes2, per_example, materialize)


# With weights this large (beyond the caches), x1 and x2 go through f as one batch: each
# weight is streamed from memory once per pass, not once per side (an MLP of width 2048:
# 12-15% faster). Smaller models keep two sides, which run side by side on two cores.
MERGE_SIDES_FROM_BYTES = 8 * 2**20


def _merge(params: list, x1: list, x2: list) -> bool:
  weights = sum(math.prod(jnp.shape(p)) * jnp.result_type(p).itemsize for p in params)
  return weights >= MERGE_SIDES_FROM_BYTES and all(
      a.dtype == b.dtype and a.shape[1:] == b.shape[1:] for a, b in zip(x1, x2))


def _merged_sides(plan: Plan, params: list, x1: list, x2: list) -> tuple[Side, Side]:
  """Both sides of a per-example f from one pass over x1 and x2 stacked."""
  n1, n2 = x1[0].shape[0], x2[0].shape[0]
  with jax.named_scope("ntk/sides"):
    both = side(plan, params, [jnp.concatenate([a, b]) for a, b in zip(x1, x2)], True)
  return _slice_side(plan, both, 0, n1), _slice_side(plan, both, n1, n1 + n2)


# Θ(x1, x1) of at least this many examples is contracted in two halves (three blocks
# of example pairs, the fourth mirrored) where the terms are pairwise.
SYMMETRIC_BLOCKS_FROM = 32
# Halves of at least this many examples are split again, down to blocks of 512-1023
# examples: (A, A) and (B, B) are each three blocks of their own halves. A Gram of
# 4096 x 5120 on the CPU: 1.10 s whole, 0.89 s in two halves, 0.70 s in eight blocks;
# below 512 examples a block costs more than the pairs it saves (1024 in four: 1.2x).
SYMMETRIC_SPLIT_AGAIN_FROM = 1024


def symmetric_pair_share(n: int, layout: Layout, per_example: bool) -> float:
  """The share of Θ(x, x)'s n² example pairs whose pairwise terms `contract_kernels`
  computes (the rest mirrored): 1 where it contracts them whole."""
  if not (per_example and n >= SYMMETRIC_BLOCKS_FROM
          and 0 not in layout.trace + layout.diagonal):
    return 1.0

  def halves(m: int) -> float:  # as _halves_term splits m examples
    h = m // 2
    diagonal = halves if h >= SYMMETRIC_SPLIT_AGAIN_FROM else (lambda _: 1.0)
    return (h * h * diagonal(h) + h * (m - h) + (m - h) ** 2 * diagonal(m - h)) / m ** 2

  return halves(n)


def contract_kernels(plan1: Plan, plan2: Plan, side1: Side, side2: Side, symmetric: bool,
                     layouts, shapes1, shapes2, per_example: bool,
                     materialize: frozenset = frozenset()) -> list[jax.Array]:
  """Every output leaf's kernel from both sides' cotangents and factors.

  With x2 omitted (`symmetric`), per example, the pairwise terms of N >=
  `SYMMETRIC_BLOCKS_FROM` examples are contracted for the pairs of two halves A, B:
  (A, A), (A, B) and (B, B), and (B, A) is (A, B) mirrored: 3/4 of the pair work.
  Materialised leaves contract their per-example gradients once, whole.
  """
  kernels = []
  for k, layout in enumerate(layouts):
    shapes = (shapes1[k], shapes2[k])
    n = shapes1[k][0] if shapes1[k] else 0
    blocked = (symmetric and per_example and n >= SYMMETRIC_BLOCKS_FROM
               and 0 not in layout.trace + layout.diagonal)
    leaves = range(plan1.num_params)
    whole = [l for l in leaves if not blocked or l in materialize]
    terms = _leaf_terms(plan1, plan2, whole, side1, side2, symmetric, k, layout,
                        shapes, per_example, materialize)
    if blocked:
      halves = [l for l in leaves if l not in whole]
      terms.append(_halves_term(plan1, halves, side1, k, layout, shapes, materialize))
    terms = [t for t in terms if t is not None]
    kernel = (sum(terms[1:], terms[0]) if terms
              else jnp.zeros(layout.kernel_shape(*shapes)))
    kernels.append(kernel / layout.trace_size(shapes1[k]))
  return kernels


def _leaf_terms(plan1, plan2, leaves, side1, side2, symmetric, k, layout, shapes,
                per_example, materialize) -> list:
  memo: dict = {}  # the groups of pair terms shared between leaves
  return [contract_leaf(plan1, plan2, leaf, side1, side2, symmetric, k, layout, shapes,
                        per_example, leaf in materialize, memo)
          for leaf in leaves]


def _halves_term(plan: Plan, leaves, side: Side, k: int, layout: Layout, shapes,
                 materialize):
  """Σ over `leaves` of Θ(x, x)'s terms, from the pair blocks of two halves."""
  if not leaves:
    return None
  n = shapes[0][0]
  h = n // 2
  a, b = _slice_side(plan, side, 0, h), _slice_side(plan, side, h, n)
  part = lambda m: (m,) + tuple(shapes[0][1:])

  def block(s1, s2, n1, n2, symmetric):
    terms = [t for t in _leaf_terms(plan, plan, leaves, s1, s2, symmetric, k, layout,
                                    (part(n1), part(n2)), True, materialize)
             if t is not None]
    return sum(terms[1:], terms[0]) if terms else None

  def diagonal(s, m):
    if h >= SYMMETRIC_SPLIT_AGAIN_FROM:
      return _halves_term(plan, leaves, s, k, layout, (part(m), part(m)), materialize)
    return block(s, s, m, m, True)

  aa, ab, bb = diagonal(a, h), block(a, b, h, n - h, False), diagonal(b, n - h)
  if aa is None:
    return None
  ba = jnp.transpose(ab, layout.mirror_perm())
  return jnp.concatenate([jnp.concatenate([aa, ab], axis=1),
                          jnp.concatenate([ba, bb], axis=1)], axis=0)


def _slice_side(plan: Plan, side: Side, start: int, stop: int) -> Side:
  """The examples start:stop of a per-example side (factors that do not depend on
  the example are shared)."""
  batched = {f.id: f.batched for fs in plan.factors.values() for f, _ in fs}
  cts = [{c: a[start:stop] for c, a in per_leaf.items()} for per_leaf in side.cts]
  factors = {i: a[start:stop] if batched.get(i) else a for i, a in side.factors.items()}
  return Side(cts, factors)
