"""The device mesh ('data', 'model') and how per-device functions are compiled over it.

Every step in cnn_jax is written as a *per-device* function with explicit collectives
(`lax.pmean` over 'data', `lax.all_gather` over 'model'). This module compiles such a function
for the mesh with `jax.jit(jax.shard_map(...))`. Nothing else in the project needs to know how
devices are arranged.
"""

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from cnn_jax.errors import UserError

DATA_AXIS = "data"
MODEL_AXIS = "model"


def mesh_shape(config, num_devices: int) -> tuple[int, int]:
    """(data, model) sizes from the config; raises UserError if they do not fit the devices."""
    model = config.mesh_model
    if model < 1:
        raise UserError(f"--config.mesh_model={model} must be >= 1")
    data = config.mesh_data if config.mesh_data != -1 else num_devices // model
    if data < 1 or data * model != num_devices:
        raise UserError(
            f"mesh data={config.mesh_data} x model={model} does not fit the {num_devices} "
            f"available devices (data x model must equal {num_devices}; data=-1 fills it)"
        )
    return data, model


def make_mesh(config, devices=None) -> Mesh:
    devices = jax.devices() if devices is None else devices
    data, model = mesh_shape(config, len(devices))
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


def compile_per_device(fn, mesh: Mesh, in_specs, out_specs, donate_argnums=()):
    """jit(shard_map(fn)): fn sees its device's shard of each argument."""
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    return jax.jit(mapped, donate_argnums=donate_argnums)
