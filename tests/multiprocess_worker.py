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


def config(**overrides):
    from cnn_jax import defaults

    c = defaults.get_default_config()
    c.model = "alexnet"
    c.dataset = "synthetic"
    c.num_classes = 10
    c.image_size = SIDE
    c.preprocess = "scale_to_unit"
    c.width_divisor = 8  # towers of 6/16/24/24/16 maps, fc 512: the structure, not the size
    c.batch_size = BATCH
    c.synthetic_train_size = 64
    c.synthetic_eval_size = 16
    c.mesh_model = 2
    c.dropout_rate = 0.0  # dropout masks depend on the data axis's size (see README)
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.weight_decay = 5e-4
    c.progress_bar = False
    for k, v in overrides.items():
        c[k] = v
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

    trainer = train.Trainer(config())
    _, metrics = run_steps(trainer, trainer.init_state())
    if jax.process_index() == 0:
        print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                          "mesh": dict(trainer.mesh.shape), "metrics": metrics}))  # fmt: skip
        sys.stdout.flush()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
