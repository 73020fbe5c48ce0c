"""Scale: tiles under a budget, out=, progress, devices, estimate() and matvec()."""

import os
import subprocess
import sys
import textwrap
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import models
import models_structured
import ntk_compiler as nc
from ntk_compiler import scale
from oracle import apply_layouts, assert_matches, full_kernel
from tiers import full

RTOL = 1e-10
METHODS = ("structured", "jacobian", "ntk_vp")
LAYOUTS = [((-1,), ()), ((), ()), ((), (0,)), ((0,), ()), ((), (1,))]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


N1 = N2 = 5  # x2 as large as x1: the batch axis may be diagonal or traced


def _draw(model):
  return model.draw(0, N1, N2, jnp.float64)


_FULL = {}


def _oracle(model, x2, trace=(-1,), diagonal=()):
  """The float64 oracle's kernel of `model` at its draw, x2 None or the draw's x2 (the
  full kernels computed once per model and side, then laid out)."""
  key = (model.name, x2 is None)
  if key not in _FULL:
    params, x1, x2_drawn = _draw(model)
    _FULL[key] = full_kernel(model.f, params, x1, None if x2 is None else x2_drawn)
  return apply_layouts(*_FULL[key], trace, diagonal)


def _paired(layout):
  return 0 in layout[0] + layout[1]


# --- max_memory -------------------------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    (1000, 1000), ("2GB", 2 * 10**9), ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29),
    ("64k", 64 * 1024), (None, None), (2.5e9, 2_500_000_000)])
def test_parse_bytes(value, expected):
  assert scale.parse_bytes(value) == expected


@pytest.mark.parametrize("value, error", [
    ("2 parsecs", ValueError), ("", ValueError), (-1, ValueError), ("0GB", ValueError),
    (True, TypeError), ([1], TypeError)])
def test_parse_bytes_refuses(value, error):
  with pytest.raises(error, match="max_memory"):
    nc.compile_ntk(lambda p, x: x @ p, max_memory=value)


@pytest.mark.parametrize("kwargs, error, match", [
    ({"block_size": 0}, ValueError, "block_size"),
    ({"block_size": 2.0}, ValueError, "block_size"),
    ({"devices": "cpu"}, TypeError, "devices"),
    ({"devices": []}, TypeError, "devices"),
    ({"progress": "yes"}, TypeError, "progress")])
def test_bad_scale_arguments(kwargs, error, match):
  with pytest.raises(error, match=match):
    nc.compile_ntk(lambda p, x: x @ p, **kwargs)


def test_default_budget_is_a_share_of_memory():
  budget = scale.default_budget(jax.local_devices()[:1])
  assert 2**20 < budget < os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


# --- tiles equal the kernel in one piece ------------------------------------------------

def _quick(grid, kept):
  """The grid's params, all but `kept` in the full tier only."""
  return [pytest.param(*p, marks=[] if p in kept else [full]) for p in grid]


@pytest.mark.parametrize("method, symmetric", _quick(
    [(m, s) for m in METHODS for s in (True, False)],
    [("structured", True), ("jacobian", False)]))
def test_tiles_match_oracle_mlp(method, symmetric):
  model = models.mlp()
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  ntk_fn = nc.compile_ntk(model.f, method=method, block_size=2)
  kernel = ntk_fn(params, x1, x2)
  assert isinstance(kernel, np.ndarray)
  assert_matches(kernel, _oracle(model, x2), RTOL)


def _layout_grid():
  grid = [(m, t, d, s) for m in METHODS for t, d in LAYOUTS for s in (True, False)]
  return _quick(grid, [("structured", (), (0,), True), ("ntk_vp", (0,), (), False)])


@pytest.mark.parametrize("method, trace, diagonal, symmetric", _layout_grid())
def test_tiles_every_layout(method, trace, diagonal, symmetric):
  model = models.sequence()
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  ntk_fn = nc.compile_ntk(model.f, method=method, trace_axes=trace,
                          diagonal_axes=diagonal, block_size=2)
  assert_matches(ntk_fn(params, x1, x2),
                 _oracle(model, x2, trace, diagonal), RTOL)


ARCHITECTURES = [models.cnn(), models_structured.transformer(2, causal=True),
                 models.multi_output(), models.pytree_params()]


@pytest.mark.parametrize("model, method, symmetric", _quick(
    [(m, meth, s) for m in ARCHITECTURES for meth in METHODS for s in (True, False)
     if m in ARCHITECTURES[:2] or meth == "structured"],
    [(ARCHITECTURES[0], "structured", True)]),
    ids=lambda v: getattr(v, "name", str(v)))
def test_tiles_architectures(model, method, symmetric):
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  ntk_fn = nc.compile_ntk(model.f, method=method, block_size=3)
  assert_matches(ntk_fn(params, x1, x2), _oracle(model, x2), RTOL)


def _recording_blocks(monkeypatch):
  """Records the `_Blocks` runner of each tiled call (its `evaluations`: sides
  computed)."""
  made = []
  original = scale._blocks

  def record(*args, **kwargs):
    made.append(original(*args, **kwargs))
    return made[-1]
  monkeypatch.setattr(scale, "_blocks", record)
  return made


# (method, x2 omitted, max_memory) -> sides computed for 3 blocks of x1 (and 3 of x2):
# each block's once when the budget keeps them all; with room for two only (the row's
# and the column's), jacobian keeps the row's for its whole row of tiles and snakes,
# so the next row starts on a kept column (x2 given: 3 rows + 9 columns - 2 kept),
# and ntk_vp goes column by column. Recomputed for every tile it would be 9 (x2
# omitted: 3 diagonal tiles x 1 + 3 others x 2) and 18 (9 tiles x 2); ntk_vp's x1
# side is the inputs (f linearised in the tile).
REUSE = [("jacobian", True, None, 3), ("jacobian", False, None, 6),
         ("jacobian", True, 1000, 4), ("jacobian", False, 1000, 10),
         ("ntk_vp", True, 1000, 3), ("ntk_vp", False, 1000, 3),
         ("structured", True, None, 3)]


@pytest.mark.parametrize("method, symmetric, memory, computed", _quick(
    REUSE, [REUSE[0], REUSE[3], REUSE[4]]))
def test_tiles_compute_each_block_once(monkeypatch, method, symmetric, memory,
                                       computed):
  made = _recording_blocks(monkeypatch)
  monkeypatch.setattr(scale, "REUSE_MIN_SIDE_SHARE", 0.0)  # kept however cheap
  model = models.mlp()
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  ntk_fn = nc.compile_ntk(model.f, method=method, block_size=2, max_memory=memory)
  est = ntk_fn.estimate(params, x1, x2)
  assert est.tiling.block1 == 2 and "computed once and kept" in est.reuse, est
  with warnings.catch_warnings():
    warnings.simplefilter("ignore", ResourceWarning)
    kernel = ntk_fn(params, x1, x2)
  assert_matches(kernel, _oracle(model, x2), RTOL)
  (blocks,) = made
  assert blocks.evaluations == computed


@full
def test_sides_kept_only_where_they_cost(monkeypatch):
  """jacobian keeps the sides of a conv net (per-example conv weight gradients cost
  far more than the contraction) but not of a wide MLP's large blocks (the
  contraction is nearly all of a tile: a second program would only add)."""
  made = _recording_blocks(monkeypatch)
  cnn = models.cnn()
  params, x1, _ = _draw(cnn)
  kernel = nc.compile_ntk(cnn.f, method="jacobian", block_size=2)(params, x1)
  assert made[-1] is not None and made[-1].evaluations == 3
  assert_matches(kernel, _oracle(cnn, None), RTOL)
  wide = [jnp.ones((8, 256)) / 8, jnp.ones((256, 256)) / 16, jnp.ones((256, 4)) / 16]
  f = lambda p, x: jnp.tanh(jnp.tanh(x @ p[0]) @ p[1]) @ p[2]
  x = jnp.ones((64, 8))
  ntk_fn = nc.compile_ntk(f, method="jacobian", block_size=32)
  ntk_fn(wide, x)
  assert made[-1] is None  # each tile in one program
  assert "each tile recomputes its blocks' per-example Jacobians" in str(
      ntk_fn.explain(wide, x))


def test_budget_tiles_the_call():
  model = models.mlp()
  params, x1, _ = _draw(model)
  ntk_fn = nc.compile_ntk(model.f, max_memory=11_000)
  est = ntk_fn.estimate(params, x1)
  assert not est.fits and est.tiling.split and est.peak_bytes_per_tile <= 11_000
  assert est.tiling.tiles == count_upper(N1, est.tiling.block1)
  assert "tiles of" in str(est)
  assert_matches(ntk_fn(params, x1), _oracle(model, None), RTOL)
  roomy = nc.compile_ntk(model.f, max_memory="1GB")
  assert roomy.estimate(params, x1).fits
  assert isinstance(roomy(params, x1), jax.Array)  # one piece: the plain program


def count_upper(n, b):
  t = -(-n // b)
  return t * (t + 1) // 2


def test_estimate_grows_with_examples():
  model = models.mlp()
  params, x1, _ = _draw(model)
  ntk_fn = nc.compile_ntk(model.f)
  small = ntk_fn.estimate(params, x1)
  big = ntk_fn.estimate(params, jnp.tile(x1, (8, 1)))
  assert big.peak_bytes > small.peak_bytes and big.flops > small.flops > 0
  assert big.kernel_bytes == 64 * small.kernel_bytes


def test_example_mixing_model_is_not_split():
  model = models.batch_mixing()
  params, x1, x2 = _draw(model)
  ntk_fn = nc.compile_ntk(model.f, max_memory=1000)
  assert ntk_fn.estimate(params, x1).tiling.mode == "whole"
  with pytest.warns(ResourceWarning, match="mixes the examples"):
    kernel = ntk_fn(params, x1, x2)  # in one piece: the plain program
  out = np.empty((N1, N2))
  with pytest.warns(ResourceWarning, match="mixes the examples"):
    ntk_fn(params, x1, x2, out=out)
  np.testing.assert_array_equal(out, kernel)


def test_under_jit_computes_in_one_piece():
  model = models.mlp()
  params, x1, _ = _draw(model)
  ntk_fn = nc.compile_ntk(model.f, block_size=2)
  kernel = jax.jit(ntk_fn)(params, x1)
  assert_matches(kernel, _oracle(model, None), RTOL)
  with pytest.raises(TypeError, match="out= needs concrete arrays"):
    jax.jit(lambda p, x: ntk_fn(p, x, out=np.zeros((5, 5))))(params, x1)


# --- out= -------------------------------------------------------------------------------

def test_out_memmap(tmp_path, monkeypatch):
  monkeypatch.setattr(scale, "RELEASE_BYTES", 1)  # pages dropped after every tile
  model = models.mlp()
  params, x1, x2 = _draw(model)
  ntk_fn = nc.compile_ntk(model.f, trace_axes=(), max_memory=20_000)
  path = tmp_path / "kernel.npy"
  out = np.lib.format.open_memmap(path, mode="w+", dtype=np.float64,
                                  shape=(N1, N2, 4, 4))
  assert ntk_fn(params, x1, x2, out=out) is out
  out.flush()
  del out
  expected = _oracle(model, x2, ())
  assert_matches(np.load(path), expected, RTOL)


def test_out_pytree_and_errors():
  model = models.multi_output()
  params, x1, _ = _draw(model)
  ntk_fn = nc.compile_ntk(model.f)
  out = {"logits": np.empty((N1, N1)), "aux": [np.empty((N1, N1))]}
  assert ntk_fn(params, x1, out=out) is out
  assert_matches(out, jax.tree_util.tree_map(np.asarray, ntk_fn(params, x1)), 1e-14)
  with pytest.raises(ValueError, match="one array but f returns 2 output leaves"):
    ntk_fn(params, x1, out=np.empty((N1, N1)))
  with pytest.raises(ValueError, match="pytree structure"):
    ntk_fn(params, x1, out={"logits": np.empty((N1, N1))})
  with pytest.raises(ValueError, match="out leaf 1 has shape"):
    ntk_fn(params, x1, out={"logits": np.empty((N1, 3)), "aux": [np.empty((N1, N1))]})
  with pytest.raises(ValueError, match="dtype float32 but the kernel has dtype float64"):
    ntk_fn(params, x1, out={"logits": np.empty((N1, N1), np.float32),
                            "aux": [np.empty((N1, N1))]})
  with pytest.raises(TypeError, match="writable NumPy arrays"):
    ntk_fn(params, x1, out={"logits": jnp.zeros((N1, N1)), "aux": [np.empty((N1, N1))]})
  frozen = np.empty((N1, N1))
  frozen.flags.writeable = False
  with pytest.raises(ValueError, match="read-only"):
    ntk_fn(params, x1, out={"logits": frozen, "aux": [np.empty((N1, N1))]})


# --- progress ---------------------------------------------------------------------------

def test_progress_callback():
  model = models.mlp()
  params, x1, x2 = _draw(model)
  seen = []
  ntk_fn = nc.compile_ntk(model.f, block_size=2,
                          progress=lambda done, total, elapsed: seen.append(
                              (done, total, elapsed)))
  ntk_fn(params, x1, x2)
  assert [d for d, _, _ in seen] == list(range(1, 10))
  assert {t for _, t, _ in seen} == {9}
  assert all(e >= 0 for _, _, e in seen)


@full
def test_progress_line(capsys, monkeypatch):
  monkeypatch.setattr(scale.Progress, "_tqdm", staticmethod(lambda total: None))
  model = models.mlp()
  params, x1, _ = _draw(model)
  nc.compile_ntk(model.f, block_size=2, progress=True)(params, x1)
  err = capsys.readouterr().err
  assert "6/6 tiles" in err and "elapsed" in err
  nc.compile_ntk(model.f, block_size=2)(params, x1)  # not a terminal: silent
  assert capsys.readouterr().err == ""


# --- Θ·v --------------------------------------------------------------------------------

def _kernel_times(kernel, layout, v):
  s1, s2, result = layout.indices()
  v_labels = [l for a, l in enumerate(s2) if a not in layout.trace]
  out = [l for a, l in enumerate(s1) if a not in layout.trace]
  return np.einsum(kernel, result, v, v_labels, out)


def _vector(shape, trace, seed=0):
  nd = len(shape)
  traced = {a % nd for a in trace}
  return np.random.default_rng(seed).normal(
      size=[n for a, n in enumerate(shape) if a not in traced])


def _matvec_grid():
  grid = [(t, d, s, b) for t, d in LAYOUTS for s in (True, False) for b in (None, 2)]
  return _quick(grid, [((-1,), (), True, 2), ((), (0,), False, None)])


@pytest.mark.parametrize("trace, diagonal, symmetric, block", _matvec_grid())
def test_matvec_matches_kernel_times_v(trace, diagonal, symmetric, block):
  model = models.sequence()
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  ntk_fn = nc.compile_ntk(model.f, trace_axes=trace, diagonal_axes=diagonal,
                          block_size=block)
  kernel = _oracle(model, x2, trace, diagonal)
  layout = ntk_fn.plan(params, x1, x2).outputs[0].layout
  v = _vector(model.f(params, x1 if x2 is None else x2).shape, trace)
  result = ntk_fn.matvec(params, x1, x2, v)
  assert_matches(result, _kernel_times(kernel, layout, v), RTOL)


@full
def test_matvec_example_mixing_and_pytrees():
  for model in (models.batch_mixing(), models.multi_output()):
    params, x1, x2 = _draw(model)
    ntk_fn = nc.compile_ntk(model.f, trace_axes=(), block_size=2)
    kernels = _oracle(model, x2, ())
    plan = ntk_fn.plan(params, x1, x2)
    outs = jax.tree_util.tree_leaves(model.f(params, x2))
    vs = [_vector(o.shape, (), seed=i) for i, o in enumerate(outs)]
    v = plan.out_tree.unflatten(vs)
    expected = plan.out_tree.unflatten([
        _kernel_times(k, o.layout, vi) for k, o, vi in
        zip(jax.tree_util.tree_leaves(kernels), plan.outputs, vs)])
    assert_matches(ntk_fn.matvec(params, x1, x2, v), expected, RTOL)


def test_matvec_under_jit_and_compiled_once():
  model = models.mlp()
  params, x1, _ = _draw(model)
  ntk_fn = nc.compile_ntk(model.f, block_size=2)
  kernel = _oracle(model, None)
  v = np.arange(N1, dtype=np.float64)
  assert_matches(jax.jit(ntk_fn.matvec)(params, x1, None, v), kernel @ v, RTOL)
  ntk_fn.matvec(params, x1, None, v)
  programs = [p for key, p in ntk_fn._scale_cache.items() if key[0] == "matvec"]
  sizes = [len(p) for p in programs]
  assert_matches(ntk_fn.matvec(params, x1, None, 2 * v), 2 * kernel @ v, RTOL)
  assert [len(p) for p in programs] == sizes  # no new programs for a new v


def test_matvec_refuses_wrong_shape():
  model = models.mlp()
  params, x1, x2 = _draw(model)
  ntk_fn = nc.compile_ntk(model.f)
  with pytest.raises(ValueError, match=r"traced axes \(1,\) left out\): \(5,\)"):
    ntk_fn.matvec(params, x1, x2, np.ones((3, 4)))


# --- devices ----------------------------------------------------------------------------

_SHARDED = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py
    sys.path.insert(0, "tests")
    import models, models_structured
    import ntk_compiler as nc
    from oracle import assert_matches, oracle_ntk
    assert len(jax.devices()) == 8, jax.devices()
    cases = {cases}
    zoo = {{"mlp": models.mlp(), "cnn": models.cnn(),
           "transformer": models_structured.transformer(2, causal=True)}}
    for name, method, trace, diagonal, symmetric, kwargs in cases:
      model = zoo[name]
      if kwargs.get("devices") == "mesh":  # a 2-D mesh: tiles split over both axes
        kwargs = dict(kwargs, devices=jax.make_mesh((4, 2), ("a", "b")))
      elif isinstance(kwargs.get("devices"), int):
        kwargs = dict(kwargs, devices=jax.devices()[:kwargs["devices"]])
      paired = 0 in trace + diagonal
      params, x1, x2 = model.draw(0, 11, 11 if paired else 5, jnp.float64)
      x2 = None if symmetric else x2
      ntk_fn = nc.compile_ntk(model.f, method=method, trace_axes=trace,
                              diagonal_axes=diagonal, **kwargs)
      est = ntk_fn.estimate(params, x1, x2)
      # block_size, devices or a small budget: tiles over the devices, NumPy; else
      # one piece on one device, a JAX array, as on a machine with one device.
      tiled = bool(kwargs)
      want = (ntk_fn.devices.devices.size if hasattr(ntk_fn.devices, "devices")
              else len(ntk_fn.devices or jax.devices())) if tiled else 1
      assert est.tiling.devices == want, est
      assert est.tiling.split or "max_memory" not in kwargs, est
      kernel = ntk_fn(params, x1, x2)
      assert isinstance(kernel, np.ndarray if tiled else jax.Array), type(kernel)
      if not tiled:
        assert len(kernel.devices()) == 1, kernel.sharding
      assert_matches(kernel, oracle_ntk(model.f, params, x1, x2, trace, diagonal), 1e-10)
      v = np.random.default_rng(0).normal(size=jax.eval_shape(
          model.f, params, x1 if x2 is None else x2).shape[:-1])
      if trace == (-1,) and not diagonal and len(v.shape) == 1:
        k = np.asarray(kernel)
        assert_matches(ntk_fn.matvec(params, x1, x2, v), k @ v, 1e-10)
    print("OK", len(cases))
""")


def _run_sharded(cases):
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  done = subprocess.run([sys.executable, "-c", _SHARDED.format(cases=cases)], cwd=ROOT,
                        env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert f"OK {len(cases)}" in done.stdout


@pytest.mark.parametrize("mode", [((-1,), (), True), ((0,), (), False)])
def test_mesh_of_one_device(mode):
  """The shard_map path in this process (one device): an explicit Mesh uses it."""
  trace, diagonal, symmetric = mode
  model = models.mlp()
  params, x1, x2 = _draw(model)
  x2 = None if symmetric else x2
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()[:1]), ("examples",))
  ntk_fn = nc.compile_ntk(model.f, method="jacobian", trace_axes=trace,
                          diagonal_axes=diagonal, devices=mesh, block_size=2)
  assert_matches(ntk_fn(params, x1, x2), _oracle(model, x2, trace, diagonal), RTOL)


@full
def test_sharded_on_8_devices():
  _run_sharded([("mlp", "structured", (-1,), (), True, {}),
                ("mlp", "jacobian", (-1,), (), False, {"block_size": 4}),
                ("mlp", "ntk_vp", (-1,), (), True, {"max_memory": 20_000})])


@full
def test_sharded_grid_on_8_devices():
  cases = [("mlp", method, (-1,), (), symmetric, {"block_size": 8})
           for method in METHODS for symmetric in (True, False)]
  cases += [("cnn", "structured", (-1,), (), False, {"block_size": 8}),
            ("transformer", "jacobian", (-1,), (), True, {"block_size": 8})]
  cases += [("mlp", "structured", (0,), (), True, {"block_size": 8}),
            ("mlp", "structured", (), (1,), False, {"block_size": 8}),
            ("mlp", "jacobian", (), (0,), False, {}),
            ("mlp", "ntk_vp", (), (0,), True, {"block_size": 8}),
            ("cnn", "structured", (-1,), (), True, {"devices": 2}),
            ("mlp", "ntk_vp", (-1,), (), False, {"devices": "mesh"})]
  _run_sharded(cases)


_KEPT = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py
    sys.path.insert(0, "tests")
    import models, models_structured
    import ntk_compiler as nc
    from ntk_compiler import scale
    from oracle import assert_matches, oracle_ntk
    assert len(jax.devices()) == 8, jax.devices()
    directory = sys.argv[1]
    made = []
    original = scale._blocks
    def record(*args, **kwargs):
      made.append(original(*args, **kwargs))
      return made[-1]
    scale._blocks = record
    zoo = {{"mlp": models.mlp(), "cnn": models.cnn(),
           "transformer": models_structured.transformer(2, causal=True)}}
    for name, method, n1, n2, share, intensity, memory, computed in {cases}:
      scale.REUSE_MIN_SIDE_SHARE = share
      scale.MESH_MIN_FLOPS_PER_BYTE["cpu"] = intensity
      model = zoo[name]
      params, x1, x2 = model.draw(0, n1, n2 or n1, jnp.float64)
      x2 = None if n2 is None else x2
      ntk_fn = nc.compile_ntk(model.f, method=method, block_size=8, max_memory=memory)
      est = ntk_fn.estimate(params, x1, x2)
      assert est.tiling.devices == 8 and est.tiling.block1 == 8, est
      made.clear()
      kernel = ntk_fn(params, x1, x2)
      assert_matches(kernel, oracle_ntk(model.f, params, x1, x2, (-1,), ()), 1e-10)
      (blocks,) = made
      if (name, method) == ("mlp", "jacobian"):  # the same tiles into a .npy memmap
        out = np.lib.format.open_memmap(f"{{directory}}/kernel.npy", mode="w+",
                                        dtype=kernel.dtype, shape=kernel.shape)
        assert ntk_fn(params, x1, x2, out=out) is out
        np.testing.assert_array_equal(np.load(f"{{directory}}/kernel.npy"), kernel)
      if isinstance(computed, str):  # recomputed per tile; the estimate says why
        assert blocks is None and "recomputes" in est.reuse, est.reuse
        assert computed in est.reuse, est.reuse
        continue
      assert "computed once, split over the 8 devices" in est.reuse, est.reuse
      assert blocks.evaluations == computed, (name, method, blocks.evaluations)
      # What is kept is split by examples: each device holds its examples' share.
      for side in blocks.cache.values():
        _, split = blocks.layout(1 if method != "ntk_vp" else 2)
        for leaf, by_examples in zip(jax.tree_util.tree_leaves(side), split):
          want = ((leaf.shape[0] // 8,) + leaf.shape[1:] if by_examples
                  else leaf.shape)
          assert {{s.data.shape for s in leaf.addressable_shards}} == {{want}}
    print("OK", len({cases}))
""")

# (model, method, n1, n2 (None: x2 omitted), REUSE_MIN_SIDE_SHARE,
# MESH_MIN_FLOPS_PER_BYTE on CPU, max_memory, sides computed (or recomputed per tile:
# the reason estimate() gives)). Blocks of 8 examples, one per device: 3 blocks of x1 (x2 given: 3 of x2, 7
# examples padded to 8), so 9 tiles (6 with x2 omitted), which would compute 18 (9)
# sides without keeping them. The test models are small: their sides cost a few FLOPs
# per byte, so most cases lower the thresholds to test the mechanism.
KEPT_CASES = [("mlp", "jacobian", 24, None, 0.0, 0.0, None, 3),
              ("mlp", "jacobian", 24, 20, 0.0, 0.0, None, 6),
              ("mlp", "ntk_vp", 24, None, 0.0, 0.0, None, 3),
              ("mlp", "ntk_vp", 24, 20, 0.0, 0.0, None, 3),
              ("mlp", "structured", 24, None, 0.5, 0.0, None, 3),
              ("mlp", "structured", 24, 20, 0.5, 0.0, None, 6),
              ("cnn", "jacobian", 16, None, 0.5, 0.0, None, 2),
              ("cnn", "ntk_vp", 16, 12, 0.0, 0.0, None, 2),
              ("transformer", "structured", 16, 12, 0.5, 0.0, None, 4),
              ("transformer", "ntk_vp", 16, None, 0.0, 0.0, None, 2),
              # the cost rule: a side too cheap against the contraction is recomputed
              ("mlp", "jacobian", 16, None, 1e9, 0.0, None, "REUSE_MIN_SIDE_SHARE"),
              # an MLP's Jacobians (~1 FLOP per byte): recomputing beats gathering
              ("mlp", "jacobian", 16, None, 0.0, 8.0, None, "beats all-gathering"),
              # the budget: one block's side gathered does not fit, so recomputed
              ("mlp", "structured", 16, None, 0.5, 0.0, 1000, "exceed the budget")]


@full
def test_sharded_sides_computed_once_on_8_devices(tmp_path):
  """On 8 devices each block's side (Jacobians, cotangents) is computed once, split
  by examples over the devices, and all-gathered in the tiles that need it; kernels
  equal the float64 oracle's, also written into a memmap (out=); below the cost rule
  or over the budget each tile recomputes its own, and estimate() says which and
  why."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="8",
             XLA_FLAGS=os.environ.get("XLA_FLAGS", ""))
  done = subprocess.run([sys.executable, "-c", _KEPT.format(cases=KEPT_CASES),
                         str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-4000:]
  assert f"OK {len(KEPT_CASES)}" in done.stdout


# --- several processes (hosts) ----------------------------------------------------------

_PROCESS = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_disable_most_optimizations", True)  # as tests/conftest.py
    process, port, directory = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    jax.distributed.initialize(coordinator_address=f"localhost:{{port}}",
                               num_processes=2, process_id=process)
    import numpy as np
    sys.path.insert(0, "tests")
    import models
    import ntk_compiler as nc
    from ntk_compiler import scale
    # The test MLP's sides cost a few FLOPs per byte: kept and all-gathered anyway.
    scale.MESH_MIN_FLOPS_PER_BYTE["cpu"] = 0.0
    assert jax.process_count() == 2 and len(jax.devices()) == 4, jax.devices()
    assert len(jax.local_devices()) == 2
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("examples",))
    model = models.mlp()
    params, x1, x2 = model.draw(0, 11, 11, np.float64)
    for name, method, trace, diagonal, symmetric in {cases}:
      ntk_fn = nc.compile_ntk(model.f, method=method, trace_axes=trace,
                              diagonal_axes=diagonal, devices=mesh, block_size=4)
      est = ntk_fn.estimate(params, x1)
      assert est.tiling.devices == 4
      # A grid of tiles keeps each block's side, all-gathered across the processes.
      assert name != "pairs" or "computed once" in est.reuse, est
      # One .npy for both processes (created by the test): each writes its rows.
      out = np.lib.format.open_memmap(f"{{directory}}/{{name}}.npy", mode="r+")
      assert ntk_fn(params, x1, None if symmetric else x2, out=out) is out
      out.flush()
    ntk_fn = nc.compile_ntk(model.f, devices=mesh, block_size=4)
    v = np.arange(11.0)
    np.save(f"{{directory}}/matvec{{process}}.npy", ntk_fn.matvec(params, x1, None, v))
    # Without out=: the whole kernel on every process (gathered across processes).
    scale.REUSE_MIN_SIDE_SHARE = 0.0  # kept sides, all-gathered across the processes
    for name, method, trace, diagonal, symmetric in {cases}:
      ntk_fn = nc.compile_ntk(model.f, method=method, trace_axes=trace,
                              diagonal_axes=diagonal, devices=mesh, block_size=4)
      result = ntk_fn(params, x1, None if symmetric else x2)
      np.save(f"{{directory}}/{{name}}_whole{{process}}.npy", result)
    mixing = models.batch_mixing()  # not split: each process computes it whole
    mp, mx1, mx2 = mixing.draw(0, 11, 11, np.float64)
    np.save(f"{{directory}}/mixing{{process}}.npy",
            nc.compile_ntk(mixing.f, devices=mesh)(mp, mx1, mx2))
    scale.HOST_FRACTION = 1e-12  # no host memory: refused before any tile runs
    try:
      ntk_fn(params, x1, x2)
    except MemoryError as error:
      assert "Pass out=" in str(error), error
    else:
      raise AssertionError("no MemoryError")
    print("OK", process)
""")

MULTI_PROCESS_CASES = [("pairs", "structured", (-1,), (), True),
                       ("full", "jacobian", (), (), False),
                       ("traced", "jacobian", (0,), (), False),
                       ("diagonal", "ntk_vp", (), (0,), True)]


def _free_port() -> int:
  import socket
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


@full
def test_two_processes(tmp_path):
  """jax.distributed over two local processes (two CPU devices each, gloo collectives):
  the kernel on a Mesh of the 4 global devices, written by both processes into one
  memmap, returned whole to each process without out= (blocks' sides kept and
  all-gathered across the processes), and matvec read by each, equal the float64
  oracle's; without out= a kernel over the host's share of memory is refused."""
  model = models.mlp()
  params, x1, x2 = model.draw(0, 11, 11, jnp.float64)
  expected = {}
  for name, _, trace, diagonal, symmetric in MULTI_PROCESS_CASES:
    x2_case = None if symmetric else x2
    expected[name] = np.asarray(apply_layouts(
        *full_kernel(model.f, params, x1, x2_case), trace, diagonal))
    np.lib.format.open_memmap(tmp_path / f"{name}.npy", mode="w+",
                              dtype=np.float64, shape=expected[name].shape)
  env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", XLA_FLAGS=os.environ.get(
      "XLA_FLAGS", ""))
  script = _PROCESS.format(cases=MULTI_PROCESS_CASES)
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", script, str(i), port, str(tmp_path)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outputs = []
  try:
    for proc in procs:
      outputs.append(proc.communicate(timeout=300))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  for i, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
    assert proc.returncode == 0 and f"OK {i}" in stdout, stderr[-4000:]
  for name in expected:
    assert_matches(np.load(tmp_path / f"{name}.npy"), expected[name], RTOL)
  kernel = np.asarray(apply_layouts(*full_kernel(model.f, params, x1), (-1,), ()))
  for i in range(2):
    assert_matches(np.load(tmp_path / f"matvec{i}.npy"), kernel @ np.arange(11.0), RTOL)
    for name in expected:
      assert_matches(np.load(tmp_path / f"{name}_whole{i}.npy"), expected[name], RTOL)
  mixing = models.batch_mixing()
  mp, mx1, mx2 = mixing.draw(0, 11, 11, jnp.float64)
  mixed = np.asarray(apply_layouts(*full_kernel(mixing.f, mp, mx1, mx2), (-1,), ()))
  for i in range(2):
    assert_matches(np.load(tmp_path / f"mixing{i}.npy"), mixed, RTOL)
