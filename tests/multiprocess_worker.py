"""A few AlexNet train steps on fixed global batches, shared by tests/test_towers.py: imported
there to run them in the test's one process, and run as a script (one process of a job that
launch/processes.sh starts) to run them across processes. Process 0 prints the losses as
one JSON line.

Every process builds the same global batch and hands in only its own rows
(`jax.make_array_from_process_local_data`), so the job sees exactly the batches the single
process does, whatever the number of processes.
"""

import json
import os
import sys

import numpy as np

STEPS = 3
BATCH = 8
SIDE = 64  # AlexNet's smallest input
# Towers of 12/32/48/48/32 maps, fc 1024: the structure, not the size. Wide enough that every
# stride-1 convolution stays one (XLA:CPU-specific rewrites in cnn_jax.models.ops turn
# convolutions over <= 16 maps into dot products), which test_towers reads in the HLO.
WIDTH_DIVISOR = 4


def config(mesh_model: int = 2, **groups):
    """The reduced AlexNet every multi-device test trains; `groups` override fields, as
    mesh={"spmd": "pmap"}."""
    from cnn_jax import defaults

    c = defaults.get_default_config("alexnet")
    c.model.width_divisor = WIDTH_DIVISOR
    c.model.dropout_rate = 0.0  # dropout masks depend on the data axis's size (docs)
    c.data.name = "synthetic"
    c.data.num_classes = 10
    c.data.synthetic_train_size = 64
    c.data.synthetic_eval_size = 16
    c.input.image_size = SIDE
    c.input.preprocess = "scale_to_unit"
    c.input.batch_size = BATCH
    c.mesh.model = mesh_model
    c.optim.learning_rate = 0.01
    c.optim.momentum = 0.9
    c.optim.weight_decay = 5e-4
    c.run.progress_bar = False
    for group, fields in groups.items():
        c[group].update(fields)
    return c


def global_batches():
    rng = np.random.default_rng(0)
    for _ in range(STEPS):
        yield {
            "image": rng.normal(size=(BATCH, SIDE, SIDE, 3)).astype(np.float32),
            "label": rng.integers(0, 10, BATCH).astype(np.int32),
        }


def this_process_rows(batch: dict) -> dict:
    import jax

    per_process = BATCH // jax.process_count()
    rows = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
    return {k: v[rows] for k, v in batch.items()}


def initial_state(trainer):
    """The state every run here starts from, on the trainer's mesh: parameters drawn with
    NumPy (N(0, 0.01) weights, biases 0.1), so it is the same in every process and on every
    mesh without compiling an init (threefry random numbers compile slowly on a CPU;
    Trainer.init_state itself is what the end-to-end runs use)."""
    import jax

    from cnn_jax import parallel, train

    abstract = jax.eval_shape(trainer.init_state)
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map_with_path(
        lambda path, s: np.full(s.shape, 0.1, np.float32) if path[-1].key == "bias"
        else rng.normal(0.0, 0.01, s.shape).astype(np.float32), abstract.params,
    )  # fmt: skip
    host = train.TrainState(
        step=np.zeros((), np.int32), params=params, batch_stats={},
        opt_state=jax.device_get(jax.jit(trainer.tx.init)(params)),
        rng=np.asarray(jax.random.key_data(jax.random.key(0))),
    )  # fmt: skip
    shardings = parallel.shardings(trainer.mesh, trainer._specs)
    # Every process holds the whole host value and hands each of its devices its block.
    state = jax.tree.map(
        lambda x, sharding: jax.make_array_from_callback(
            np.shape(x), sharding, lambda index: np.asarray(x)[index]
        ),
        host, shardings,
    )  # fmt: skip
    return state.replace(rng=jax.random.wrap_key_data(state.rng))


def run_steps(trainer, state, step_fn=None):
    """STEPS train steps; returns the final state and each step's metrics."""
    import jax

    from cnn_jax import parallel

    sharding = parallel.batch_sharding(trainer.mesh)
    step_fn = step_fn or trainer.train_step
    metrics = []
    for batch in global_batches():
        local = this_process_rows(batch)
        batch = {k: jax.make_array_from_process_local_data(sharding, v, (BATCH, *v.shape[1:]))
                 for k, v in local.items()}  # fmt: skip
        state, m = step_fn(state, batch)
        metrics.append({k: float(v) for k, v in jax.device_get(m).items()})
    return state, metrics


def main():
    from cnn_jax import cli

    cli.setup_runtime()  # joins the job launch/processes.sh describes in the environment
    import jax

    from cnn_jax import train

    trainer = train.build_trainer(config())
    _, metrics = run_steps(trainer, initial_state(trainer))
    if jax.process_index() == 0:
        print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                          "mesh": dict(trainer.mesh.shape), "metrics": metrics}))  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
