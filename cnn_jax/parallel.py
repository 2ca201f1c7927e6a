"""The device mesh ('data', 'model') and how per-device functions are compiled over it.

Every step in cnn_jax is written as a *per-device* function with explicit collectives
(`lax.pmean` over 'data', `lax.all_gather` over 'model'). This module compiles such a function
for the mesh with `jax.jit(jax.shard_map(...))` (mesh.spmd='shard_map', the default) or
`jax.pmap` (mesh.spmd='pmap', the classic path; see `_compile_pmap`). Nothing else in the
project needs to know how devices are arranged.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnn_jax.errors import UserError

DATA_AXIS = "data"
MODEL_AXIS = "model"
MESH_AXES = (DATA_AXIS, MODEL_AXIS)


# config.mesh.model = AUTO_MODEL_AXIS: the model axis is chosen per machine (auto_model_axis).
AUTO_MODEL_AXIS = 0


def auto_model_axis(
    towers: int, *, num_devices: int, batch_size: int, mesh_data: int = -1, process_count: int = 1
) -> int:
    """The model axis an automatic mesh gets for a model of `towers` towers: one device per
    tower (the paper's split of AlexNet over two GPUs) wherever the devices form whole tower
    groups that split the batch and the processes evenly; otherwise 1, every device running
    all the towers. Either gives the same parameters and, up to float rounding, the same
    numbers (tests/test_towers.py)."""
    if towers > 1 and num_devices % towers == 0:
        data = num_devices // towers
        fits = mesh_data in (-1, data) and batch_size % data == 0 and data % process_count == 0
        if fits:
            return towers
    return 1


def mesh_shape(data: int, model: int, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes of the mesh (config.mesh; data=-1 fills the devices); raises
    UserError if they do not fit. An automatic model axis (0) must have been chosen first
    (cnn_jax.experiment.resolve)."""
    if model < 1:
        raise UserError(f"--config.mesh.model={model} must be >= 1 (or 0: chosen per machine)")
    asked, data = data, data if data != -1 else num_devices // model
    if data < 1 or data * model != num_devices:
        raise UserError(
            f"mesh data={asked} x model={model} does not fit the {num_devices} "
            f"available devices (data x model must equal {num_devices}; data=-1 fills it"
            + ("; --config.mesh.model=1 runs both towers on every device)" if model > 1 else ")")
        )
    return data, model


def make_mesh(data: int, model: int, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    data, model = mesh_shape(data, model, len(devices))
    # Auto axes: the host loop hands plain jit code global arrays; explicit collectives live
    # inside shard_map where the axis types do not matter.
    axis_types = (jax.sharding.AxisType.Auto,) * 2
    if len(devices) == len(jax.devices()):
        return jax.make_mesh((data, model), (DATA_AXIS, MODEL_AXIS), axis_types=axis_types)
    return Mesh(
        np.asarray(devices).reshape(data, model), (DATA_AXIS, MODEL_AXIS), axis_types=axis_types
    )


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Batches are split over 'data' and replicated over 'model' (each tower sees the batch)."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def shardings(mesh: Mesh, specs):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def compile_per_device(
    fn, mesh: Mesh, in_specs, out_specs, donate_argnums=(), spmd: str = "shard_map"
):
    """fn runs on every device and sees its device's shard of each argument; the result takes
    and returns global arrays. spmd='shard_map': jit(shard_map(fn)); 'pmap': `_compile_pmap`."""
    if spmd == "pmap":
        return _compile_pmap(fn, mesh, in_specs, out_specs)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(mapped, donate_argnums=donate_argnums)


def _axes_of(spec: P) -> tuple[str, ...]:
    """The mesh axes a PartitionSpec splits an array over."""
    return tuple(
        n
        for entry in spec
        if entry is not None
        for n in (entry if isinstance(entry, tuple) else (entry,))
    )


def global_norm(tree, specs) -> jax.Array:
    """Per device: the L2 norm of the whole global tree whose leaves may be split over mesh
    axes (AlexNet's towers): each leaf's sum of squares is summed over the axes it is split
    along, so every device gets the same, complete norm."""
    total = jnp.zeros([], jnp.float32)
    spec_leaves = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(tree), spec_leaves, strict=True):
        squares = jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        total += lax.psum(squares, _axes_of(spec)) if _axes_of(spec) else squares
    return jnp.sqrt(total)


# --- The classic path: jax.pmap ---------------------------------------------------------------
# JAX 0.10 implements pmap with shard_map, and a pmap nested in another pmap fails ("The context
# mesh AbstractMesh('data': ...) should match the mesh passed to shard_map Mesh('model': ...)"),
# so "nested over data x model" is pmap over 'data' with a named vmap over 'model' inside: the
# same per-device function and collectives, but on a model axis > 1 the towers of one data
# shard run on one device (vectorised), not on two. Arguments and results keep the global
# layout (so the loop, checkpoints and shard_map interoperate); each call restacks them into
# pmap's per-device layout [data, model, *local shape] and back, a copy shard_map does not make.


def _names_per_dim(spec: P, ndim: int) -> list[tuple[str, ...]]:
    entries = tuple(spec) + (None,) * (ndim - len(spec))
    return [() if e is None else (e if isinstance(e, tuple) else (e,)) for e in entries]


def _to_per_device(x: jax.Array, spec: P, sizes: dict) -> jax.Array:
    """Global array -> [data, model, *local]: each device's block, replicated where the spec
    does not split."""
    split_shape, position = [], {}
    for dim, names in zip(x.shape, _names_per_dim(spec, x.ndim), strict=True):
        for name in names:
            position[name] = len(split_shape)
            split_shape.append(sizes[name])
        split_shape.append(dim // math.prod(sizes[n] for n in names))
    y = jnp.reshape(x, split_shape)
    lead = [position[n] for n in MESH_AXES if n in position]
    y = jnp.transpose(y, lead + [i for i in range(y.ndim) if i not in lead])
    for k, name in enumerate(MESH_AXES):
        if name not in position:
            y = jnp.expand_dims(y, k)
            y = jnp.broadcast_to(y, (*y.shape[:k], sizes[name], *y.shape[k + 1 :]))
    return y


def _from_per_device(y: jax.Array, spec: P, sizes: dict) -> jax.Array:
    """[data, model, *local] -> the global array (replicated copies: the first one)."""
    names_per_dim = _names_per_dim(spec, y.ndim - len(MESH_AXES))
    split = [n for n in MESH_AXES if any(n in names for names in names_per_dim)]
    for k in reversed(range(len(MESH_AXES))):
        if MESH_AXES[k] not in split:
            y = jnp.take(y, 0, axis=k)
    order, shape = [], []
    for i, names in enumerate(names_per_dim):
        order += [split.index(n) for n in names]
        order.append(len(split) + i)
        shape.append(y.shape[len(split) + i] * math.prod(sizes[n] for n in names))
    return jnp.reshape(jnp.transpose(y, order), shape)


def _map_with_specs(fn, specs, tree):
    """fn(leaf, spec) over a tree whose specs are given as a tree prefix."""
    return jax.tree.map(
        lambda spec, sub: jax.tree.map(lambda leaf: fn(leaf, spec), sub),
        specs,
        tree,
        is_leaf=lambda x: isinstance(x, P),
    )


def _compile_pmap(fn, mesh: Mesh, in_specs, out_specs):
    sizes = dict(mesh.shape)
    data_devices = list(mesh.devices[:, 0])  # pmap's devices; each runs all model positions
    per_device = jax.pmap(
        jax.vmap(fn, axis_name=MODEL_AXIS), axis_name=DATA_AXIS, devices=data_devices
    )
    # [data, model, ...] blocks: first where the mesh keeps them (each device restacks its own
    # block, no transfer), then on pmap's devices.
    blocks_on_mesh = NamedSharding(mesh, P(DATA_AXIS, MODEL_AXIS))
    blocks_on_pmap = NamedSharding(Mesh(np.array(data_devices), (DATA_AXIS,)), P(DATA_AXIS))

    @functools.partial(jax.jit, out_shardings=blocks_on_mesh)
    def restack(args):
        return _map_with_specs(lambda x, s: _to_per_device(x, s, sizes), in_specs, args)

    @functools.partial(jax.jit, out_shardings=shardings(mesh, out_specs))
    def unstack(outs):
        return _map_with_specs(lambda y, s: _from_per_device(y, s, sizes), out_specs, outs)

    def run(*args):
        outs = per_device(*jax.device_put(restack(args), blocks_on_pmap))
        return unstack(jax.device_put(outs, blocks_on_mesh))

    return run
