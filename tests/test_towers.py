"""AlexNet's two-GPU split as device sharding over the ('data', 'model') mesh (8 emulated CPU
devices): the split forward and backward against one device, train steps on 4x2, 8x1 and one
device, shard_map against pmap, where parameters live, what the compiled step communicates,
and two processes against one. A reduced width (multiprocess_worker.config) throughout: these
properties are about the structure, not the size."""

import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import multiprocess_worker as worker
import numpy as np
import pytest
from jax import lax
from jax.sharding import PartitionSpec as P
from test_alexnet import host_params

from cnn_jax import losses, models, parallel, train
from cnn_jax.models import alexnet

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _close(actual, expected, rtol=1e-5):
    """Equal to f32 rounding: relative 1e-5, with an absolute floor at 1e-5 of the largest
    entry (gradients cross zero)."""
    for a, b in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        np.testing.assert_allclose(a, b, rtol=rtol, atol=rtol * float(np.abs(b).max() or 1.0))


def test_split_forward_and_backward_equal_one_device_with_dropout():
    """The tower-split module under shard_map on 4x2 (dropout on) gives the scores, loss and
    gradients of the one-device module with the same parameters: each data shard draws its
    dropout key from its index, and both towers of a shard draw the same whole-layer mask."""
    kwargs = dict(num_classes=10, width_divisor=worker.WIDTH_DIVISOR, dropout_rate=0.5)
    one, split = alexnet.AlexNet(**kwargs), alexnet.AlexNet(tower_axis="model", **kwargs)
    params = host_params(one)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 64, 64, 3)).astype(np.float32)
    y = rng.integers(0, 10, 8).astype(np.int32)
    key = jax.random.key(3)
    mesh = jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)

    def loss(model, params, x, y, key):
        scores = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
        return jnp.mean(losses.cross_entropy(scores, y)), scores

    def per_device(params, x, y):
        shard_key = jax.random.fold_in(key, lax.axis_index("data"))
        params = jax.tree.map(lambda p: lax.pcast(p, "data", to="varying"), params)
        (value, scores), grads = jax.value_and_grad(loss, 1, has_aux=True)(
            split, params, x, y, shard_key
        )
        return lax.pmean(value, "data"), scores, lax.pmean(grads, "data")

    specs = split.param_partition_specs(params)
    in_specs, out_specs = (specs, P("data"), P("data")), (P(), P("data"), specs)
    sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=in_specs, out_specs=out_specs))

    @jax.jit
    def reference(params, x, y):
        def mean_over_shards(params):
            shard = lambda d: (x[2 * d : 2 * d + 2], y[2 * d : 2 * d + 2])
            parts = [loss(one, params, *shard(d), jax.random.fold_in(key, d)) for d in range(4)]
            return sum(v for v, _ in parts) / 4, jnp.concatenate([s for _, s in parts])

        (value, scores), grads = jax.value_and_grad(mean_over_shards, has_aux=True)(params)
        return value, scores, grads

    got, want = sharded(params, x, y), reference(params, x, y)
    _close(got[:2], want[:2])
    _close(got[2], want[2])


# --- Train steps on several meshes, from the same state and batches ---------------------------


def _trainer(mesh_model, devices=None, **overrides):
    """overrides by group, as mesh={"spmd": "pmap"} (multiprocess_worker.config)."""
    trainer = train.build_trainer(worker.config(mesh_model, **overrides))
    if devices is not None:  # a smaller mesh than all 8 devices (the one-device reference)
        trainer.mesh = parallel.make_mesh(len(devices), 1, devices)
    return trainer


@pytest.fixture(scope="module")
def runs():
    """worker.STEPS steps on 4x2 (shard_map and pmap), 8x1 and one device. Each starts from
    the one initial state (a checkpoint serves every mesh) and keeps its compiled HLO."""
    trainers = {
        "4x2": _trainer(2),
        "4x2 pmap": _trainer(2, mesh={"spmd": "pmap"}),
        "8x1": _trainer(1),
        "1 device": _trainer(1, devices=jax.devices()[:1]),
    }
    results = {}
    for name, trainer in trainers.items():
        state = worker.initial_state(trainer)
        step, hlo = trainer.train_step, None
        if trainer.config.mesh.spmd == "shard_map":  # compile ahead of time to read its HLO
            batch = next(iter(worker.global_batches()))
            batch = jax.device_put(batch, parallel.batch_sharding(trainer.mesh))
            step = trainer.train_step.lower(state, batch).compile()
            hlo = step.as_text()
        state, metrics = worker.run_steps(trainer, state, step)
        results[name] = {"state": state, "metrics": metrics, "hlo": hlo, "trainer": trainer}
    return results


def test_meshes_give_the_same_losses_and_parameters(runs):
    reference = runs["1 device"]
    for name in ("4x2", "8x1"):
        curve = lambda run: [[m["loss"], m["grad_norm"]] for m in run["metrics"]]
        _close(curve(runs[name]), curve(reference))
        params = jax.device_get(runs[name]["state"].params)
        _close(params, jax.device_get(reference["state"].params))
    losses_seen = [m["loss"] for m in reference["metrics"]]
    assert len(set(losses_seen)) == len(losses_seen)  # the steps did change something


def test_pmap_and_shard_map_agree(runs):
    pmapped, sharded = runs["4x2 pmap"], runs["4x2"]
    _close([m["loss"] for m in pmapped["metrics"]], [m["loss"] for m in sharded["metrics"]])
    _close(jax.device_get(pmapped["state"].params), jax.device_get(sharded["state"].params))
    _close(jax.device_get(pmapped["state"].opt_state), jax.device_get(sharded["state"].opt_state))


def test_tower_parameters_and_their_momentum_live_on_their_towers_devices(runs):
    state, trainer = runs["4x2"]["state"], runs["4x2"]["trainer"]
    mesh = trainer.mesh
    momentum = state.opt_state[1].trace  # chain: decay, trace (SGD momentum), lr, plateau
    for tree in (state.params, momentum):
        kernel = tree["conv2"]["kernel"]  # global (5, 5, 12, 64): two towers of 32 maps
        whole = np.asarray(jax.device_get(kernel))
        for shard in kernel.addressable_shards:
            (_, m) = (int(i[0]) for i in np.nonzero(mesh.devices == shard.device))
            assert shard.data.shape == (5, 5, 12, 32)
            np.testing.assert_array_equal(shard.data, whole[..., 32 * m : 32 * (m + 1)])
        assert tree["fc8"]["kernel"].sharding.is_fully_replicated
        assert tree["conv3"]["kernel"].sharding.spec == P(None, None, None, "model")


# --- What the compiled 4x2 step communicates -----------------------------------------------------

_SHAPE = re.compile(r"\b(?:f32|bf16|s32|u32|pred)\[([\d,]*)\]")
_ITEMSIZE = 4


def _collectives(hlo: str):
    """(kind, replica groups, result shapes) of every collective in the compiled HLO."""
    found = []
    for line in hlo.splitlines():
        kinds = "all-gather|reduce-scatter|all-reduce|collective-permute|all-to-all"
        match = re.search(rf"= (.*?) ({kinds})(?:-start)?\(", line)
        if not match:
            continue
        groups = re.search(r"replica_groups=(\{[\d,{}]*\})", line)
        shapes = [tuple(int(d) for d in s.split(",") if d) for s in _SHAPE.findall(match[1])]
        found.append((match[2], groups[1] if groups else "", shapes))
    return found


def _groups(mesh, axis):
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    rows = ids if axis == "model" else ids.T
    return "{" + ",".join("{" + ",".join(map(str, r)) + "}" for r in rows) + "}"


def _bytes(shapes):
    return sum(int(np.prod(s)) * _ITEMSIZE for s in shapes)


def test_compiled_step_gathers_exactly_where_the_paper_talks_across_gpus(runs):
    """Forward: one all-gather over each tower pair before conv3, fc6, fc7 and fc8; backward:
    a reduce-scatter at conv3, fc6 and fc7 (fc8's transposes to a local slice). Across the
    model axis nothing else but the gradient norm's scalars; the gradients are averaged over
    'data'. The bytes match alexnet.model_axis_bytes_per_image, the README's figures."""
    mesh = runs["4x2"]["trainer"].mesh
    found = _collectives(runs["4x2"]["hlo"])
    model_pairs, data_groups = _groups(mesh, "model"), _groups(mesh, "data")
    gathers = [c for c in found if c[0] == "all-gather"]
    scatters = [c for c in found if c[0] == "reduce-scatter"]
    assert len(gathers) == 4 and all(g == model_pairs for _, g, _ in gathers)
    assert len(scatters) == 3 and all(g == model_pairs for _, g, _ in scatters)
    assert not [c for c in found if c[0] in ("collective-permute", "all-to-all")]
    over_model = [c for c in found if c[0] == "all-reduce" and c[1] == model_pairs]
    assert all(shape == () for _, _, shapes in over_model for shape in shapes)
    over_data = [c for c in found if c[0] == "all-reduce" and c[1] == data_groups]
    assert any(shape for _, _, shapes in over_data for shape in shapes)  # the gradients

    per_image = alexnet.model_axis_bytes_per_image(worker.SIDE, worker.WIDTH_DIVISOR)
    local_batch = worker.BATCH // mesh.shape["data"]
    # An all-gather brings in the other half of its result; a reduce-scatter the other
    # device's contribution to this device's half, the size of its result.
    received_forward = sum(_bytes(shapes) // 2 for _, _, shapes in gathers)
    received_backward = sum(_bytes(shapes) for _, _, shapes in scatters)
    assert received_forward == per_image["forward"] * local_batch
    assert received_backward == per_image["backward"] * local_batch


def _forward_conv_kernels(hlo: str) -> dict:
    """Layer name -> kernel shapes of its forward convolutions in the compiled HLO."""
    shapes = {
        m[1]: tuple(int(d) for d in m[2].split(",") if d)
        for m in re.finditer(r"%(\S+) = \w+\[([\d,]*)\]", hlo)
    }
    kernels = {}
    for line in hlo.splitlines():
        conv = re.search(r"convolution\(%(\S+), %(\S+)\)", line)
        layer = re.search(r'op_name="[^"]*?/jvp\(AlexNet\)/(conv\d)/', line)
        if conv and layer and "transpose(" not in line:
            kernels.setdefault(layer[1], []).append(shapes[conv[2]])
    return kernels


def test_each_device_convolves_one_towers_kernel_without_grouping(runs):
    """4x2: each device's program has one convolution per layer with one tower's kernel
    (width_divisor=4: towers of 12/32/48/48/32 maps) and no grouped convolution anywhere, so
    XLA did not gather kernels back to full width. On 8x1 each device runs both towers'
    conv2/4/5: a grouped convolution, or one per tower (cnn_jax.models.ops splits them)."""
    kernels = _forward_conv_kernels(runs["4x2"]["hlo"])
    assert kernels == {
        "conv1": [(11, 11, 3, 12)],
        "conv2": [(5, 5, 12, 32)],
        "conv3": [(3, 3, 64, 48)],  # both towers' 2 x 32 maps in, this tower's 48 out
        "conv4": [(3, 3, 48, 48)],
        "conv5": [(3, 3, 48, 32)],
    }
    assert "feature_group_count" not in runs["4x2"]["hlo"]
    both_towers = _forward_conv_kernels(runs["8x1"]["hlo"])
    one_tower_maps = {"conv2": (12, 32), "conv4": (48, 48), "conv5": (48, 32)}
    for layer, (maps_in, maps_out) in one_tower_maps.items():
        assert {k[2] for k in both_towers[layer]} == {maps_in}, layer  # one tower's maps in
        assert sum(k[3] for k in both_towers[layer]) == 2 * maps_out, layer  # both towers out


# --- Two processes, four devices each ------------------------------------------------------------


def test_two_processes_give_the_losses_of_one(runs, tmp_path):
    """launch/processes.sh starts two processes with 4 CPU devices each, joined through
    jax.distributed on a loopback coordinator; their 4x2 mesh spans both processes (the
    data axis crosses them) and gives the one-process 4x2 run's losses."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = REPO
    launcher = os.path.join(REPO, "launch", "processes.sh")
    options = ["-n", "2", "--cpu-devices", "4", "--log-dir", str(tmp_path)]
    worker_script = os.path.join(REPO, "tests", "multiprocess_worker.py")
    command = [launcher, *options, "--", sys.executable, worker_script]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:] + (tmp_path / "process_1.log").read_text()
    result = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert (result["processes"], result["devices"]) == (2, 8)
    assert result["mesh"] == {"data": 4, "model": 2}
    _close([m["loss"] for m in result["metrics"]], [m["loss"] for m in runs["4x2"]["metrics"]])
    _close(
        [m["grad_norm"] for m in result["metrics"]],
        [m["grad_norm"] for m in runs["4x2"]["metrics"]],
    )


def test_param_specs_split_only_tower_layers():
    build = lambda model_axis: models.build_model(
        "alexnet",
        num_classes=10,
        dtype=jnp.float32,
        model_axis=model_axis,
        width_divisor=worker.WIDTH_DIVISOR,
    )
    model = build(2)
    params = jax.eval_shape(
        lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), train=False)
    )["params"]
    specs = models.param_specs(model, params)
    assert specs["conv1"]["kernel"] == P(None, None, None, "model")
    assert specs["fc7"]["bias"] == P("model")
    assert specs["fc8"]["kernel"] == P()
    one_device = models.param_specs(build(1), params)
    assert all(s == P() for s in jax.tree.leaves(one_device, is_leaf=lambda x: isinstance(x, P)))
