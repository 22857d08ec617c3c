"""Layout arguments of the block-sparse layers: parsing, generation and JSON form.

A layer's ``layout`` argument may be

- an explicit layout: a 2-D 0/1 array of shape (C/bs, K/bs), a ``scipy.sparse`` matrix, or
  the JSON form ``{"shape": [CB, KB], "coords": [[c, k], ...]}`` (what ``get_config`` writes);
- a generator spec: the name of a generator of :mod:`blocksparse_tf.layouts` (a string), or
  a dict ``{"generator": name, **params}``.  The layer supplies the size arguments (``n``,
  or ``rows``/``cols``); ``density`` is turned into the generator's own parameters (``k``,
  ``m``, ``bandwidth`` ...) with ``layouts.params_for_density``; ``p`` defaults to 0.1 and
  ``seed`` to 0 where the generator takes them;
- None: the layer's default small-world layout.

The seed defaults to 0 rather than to fresh entropy because every process of a data-parallel
job builds its own copy of the layer: they must all get the same layout.
"""

import inspect
import numbers

import numpy as np
import scipy.sparse

from blocksparse_tf import layouts

#: Generators that make square (n x n) layouts from ``n``.
SQUARE_GENERATORS = ("banded", "barabasi_albert", "watts_strogatz", "watts_strogatz_2d")
#: Generators that make rectangular (rows x cols) layouts.
RECT_GENERATORS = ("dense", "random", "balanced_random", "bipartite_small_world")
GENERATORS = SQUARE_GENERATORS + RECT_GENERATORS
DEFAULT_P = 0.1
DEFAULT_SEED = 0
DEFAULT_DENSITY = 0.125


def normalize_spec(layout):
    """Checks a layer's ``layout`` argument and returns a JSON-serialisable form of it.

    Explicit layouts become ``{"shape", "coords"}``; generator specs become
    ``{"generator": name, ...}``; None stays None.
    """
    if layout is None:
        return None
    if isinstance(layout, str):
        layout = {"generator": layout}
    if isinstance(layout, dict):
        if "generator" in layout:
            return _check_generator_spec(layout)
        if set(layout) == {"shape", "coords"}:
            # Not cast to integers here: the core's check refuses floats and bools, which a
            # cast would truncate to other blocks.
            coords = np.asarray(layout["coords"])
            return _coords_form(_explicit_coords((coords.reshape(-1, 2) if coords.size else
                                                  coords, layout["shape"])))
        raise ValueError("a layout dict must be a generator spec {'generator': name, ...} or "
                         f"{{'shape': [CB, KB], 'coords': [...]}}; got keys {sorted(layout)}")
    return _coords_form(_explicit_coords(layout))


def _check_generator_spec(spec):
    spec = dict(spec)
    name = spec["generator"]
    if name not in GENERATORS:
        raise ValueError(f"unknown layout generator {name!r}; expected one of {GENERATORS}")
    allowed = set(inspect.signature(getattr(layouts, name)).parameters) - {"sparse"}
    allowed = (allowed | {"generator", "density"}) - {"n", "rows", "cols"}
    unknown = set(spec) - allowed
    if unknown:
        raise ValueError(f"layout generator {name!r} does not take {sorted(unknown)}; "
                         f"it takes {sorted(allowed - {'generator'})} (the layer sets the size)")
    if "density" in spec:
        density = spec["density"]
        if (isinstance(density, bool) or not isinstance(density, numbers.Real)
                or not 0.0 < density <= 1.0):
            raise ValueError(f"layout density must be a number in (0, 1]; got {density!r}")
    return spec


def _explicit_coords(layout):
    """(coords (blocks, 2), (CB, KB)) of an explicit layout, with the core's checks."""
    from blocksparse_tf.matmul import BlocksparseMatMul  # the one place that validates layouts

    if isinstance(layout, (list, tuple)) and not isinstance(layout, np.ndarray):
        if not (len(layout) == 2 and np.ndim(layout[1]) == 1):
            layout = np.asarray(layout)
    elif not scipy.sparse.issparse(layout):
        layout = np.asarray(layout)
    bsmm = BlocksparseMatMul(layout, block_size=1)
    return bsmm.coords, (bsmm.CB, bsmm.KB)


def _coords_form(coords_shape):
    coords, shape = coords_shape
    return {"shape": [int(shape[0]), int(shape[1])], "coords": np.asarray(coords).tolist()}


def spec_for_outputs(layout, width, block_size, name):
    """``normalize_spec(layout)``, after checking that an explicit layout's block columns give
    ``width`` outputs (``name`` is the argument that set the width: units, filters ...)."""
    spec = normalize_spec(layout)
    shape = shape_of(spec)
    if shape is not None and shape[1] * block_size != width:
        raise ValueError(f"layout has {shape[1]} block columns, which is {shape[1] * block_size} "
                         f"{name} at block_size={block_size}, not {name}={width}")
    return spec


def shape_of(spec):
    """(CB, KB) of an explicit (coords form) spec, else None."""
    if isinstance(spec, dict) and "coords" in spec:
        return tuple(spec["shape"])
    return None


def resolve(spec, rows, cols, default):
    """The layout of ``spec`` for a (rows, cols) block grid, in coords form.

    ``default`` is the generator spec used when ``spec`` is None.
    """
    if spec is None:
        spec = default
    if "coords" in spec:
        if tuple(spec["shape"]) != (rows, cols):
            raise ValueError(f"layout has shape {tuple(spec['shape'])} in blocks but this layer "
                             f"needs (input blocks, output blocks) = ({rows}, {cols})")
        return spec
    return _coords_form(_explicit_coords(generate(spec, rows, cols)))


def generate(spec, rows, cols, default_density=DEFAULT_DENSITY):
    """Runs the generator of ``spec`` for a (rows, cols) block grid.

    Without ``density`` or the generator's own size parameter (``k``, ``m``, ``bandwidth``)
    the density is ``default_density``.
    """
    spec = _check_generator_spec(spec)
    name = spec.pop("generator")
    fn = getattr(layouts, name)
    takes = inspect.signature(fn).parameters
    if name in SQUARE_GENERATORS and rows != cols:
        raise ValueError(f"layout generator {name!r} makes square layouts, but this layer needs "
                         f"{rows} x {cols} blocks; use one of {RECT_GENERATORS} instead")
    density = spec.pop("density", None)
    if name == "dense" and density not in (None, 1, 1.0):
        raise ValueError(f"layout generator 'dense' has density 1; got density={density}")
    if density is None and name != "dense" and not {"k", "m", "bandwidth"} & set(spec):
        density = default_density  # a bare generator name: the layer's default density
    if density is not None and name != "dense":
        size, _ = layouts.params_for_density(name, rows, density,
                                             cols=None if name in SQUARE_GENERATORS else cols)
    elif name in SQUARE_GENERATORS:
        size = {"n": rows}
    else:
        size = {"rows": rows, "cols": cols}
    chosen = (set(size) - {"n", "rows", "cols"}) & set(spec) if density is not None else set()
    if chosen:  # the spec's value would silently win over the density's
        raise ValueError(f"layout generator {name!r}: give 'density' or {sorted(chosen)}, not "
                         "both (the density sets them)")
    params = {**size, **spec}
    if "p" in takes:
        params.setdefault("p", DEFAULT_P)
    if "seed" in takes:
        params.setdefault("seed", DEFAULT_SEED)
    missing = [p for p, v in takes.items()
               if v.default is inspect.Parameter.empty and p not in params]
    if missing:
        raise ValueError(f"layout generator {name!r} needs {missing} (or a 'density')")
    return fn(**params)


def default_rect(density):
    """Default for a (rows, cols) weight: a bipartite small world of the given density."""
    return {"generator": "bipartite_small_world", "density": density}


def default_square(n, density):
    """Default for an n x n recurrent weight: Watts-Strogatz (dense below 3 blocks)."""
    if n < 3:
        return {"generator": "dense"}
    return {"generator": "watts_strogatz", "density": density}


def density_of(spec):
    """Density of a coords-form layout."""
    return len(spec["coords"]) / float(spec["shape"][0] * spec["shape"][1])


#: The entry beside a layer's weights (save_weights, .keras files) that records its layouts.
WEIGHTS_LAYOUT_KEY = "block_layouts"


def _layouts_record(matmuls):
    """The layouts of the BlocksparseMatMuls as one int64 array of (2,) rows: per layout
    (CB, KB), (block_size, blocks), then its block coordinates."""
    rows = []
    for bsmm in matmuls:
        rows += [[bsmm.CB, bsmm.KB], [bsmm.block_size, bsmm.blocks]]
        rows += bsmm.coords.tolist()
    return np.asarray(rows, dtype=np.int64).reshape(-1, 2)


class LayoutCheckedWeights:
    """Mixin for layers whose kernels are stored as blocks: saving the weights also saves the
    blocks' layouts, and loading weights saved by a layer of another layout raises.  Their
    (blocks, bs, bs) arrays alone would load into a layer with as many blocks at other places
    and compute something else without a word.  Weights saved without the record (by earlier
    versions) load as before.  ``set_weights`` takes bare arrays: it cannot check.

    The layer defines ``_weight_layouts()``: its BlocksparseMatMuls, in a fixed order, None
    for one it has not made (not built yet, or not used)."""

    def save_own_variables(self, store):
        super().save_own_variables(store)
        if self._built_layouts():  # an unbuilt layer has neither weights nor layouts
            store[WEIGHTS_LAYOUT_KEY] = _layouts_record(self._built_layouts())

    def _built_layouts(self):
        return [bsmm for bsmm in self._weight_layouts() if bsmm is not None]

    def load_own_variables(self, store):
        keys = list(store.keys())
        if WEIGHTS_LAYOUT_KEY in keys:
            saved = np.asarray(store[WEIGHTS_LAYOUT_KEY])
            mine = _layouts_record(self._built_layouts())
            if saved.shape != mine.shape or not np.array_equal(saved, mine):
                raise ValueError(
                    f"the weights being loaded into layer {self.name!r} were saved by a layer "
                    "of another block layout (other block positions, grid or block size); "
                    "build this layer with the saved layer's layout (its get_config()"
                    "['layout'])")
            store = {key: store[key] for key in keys if key != WEIGHTS_LAYOUT_KEY}
        super().load_own_variables(store)
