"""The training machinery: per-device steps against single-device references, the input
pipeline's determinism, and whole runs of train_and_evaluate with resume."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cnn_jax import defaults, losses, train
from cnn_jax.errors import UserError


def tiny_config(tfds_dir, **groups):
    """LeNet-5 on the bundled digits, 6 steps; `groups` override fields: run={"seed": 1}."""
    c = defaults.get_default_config("lenet5")
    c.loss.name = "lenet_map"
    c.data.name = "bundled_digits"
    c.data.data_dir = tfds_dir
    c.input.image_size = 32
    c.input.preprocess = "lenet"
    c.input.batch_size = 64
    c.optim.learning_rate = 0.005
    c.run.num_train_steps = 6
    c.run.log_every_steps = 2
    c.eval.every_epochs = 1000.0  # only at the end
    c.run.checkpoint_every_steps = 3
    c.run.progress_bar = False
    for group, fields in groups.items():
        c[group].update(fields)
    return c


@pytest.fixture(scope="module")
def trainer(tfds_dir):
    return train.build_trainer(tiny_config(tfds_dir))


def _first_batch(trainer, start_step=0):
    return next(trainer.train_batches(start_step))


def test_train_step_lowers_the_loss(trainer):
    state = trainer.init_state()
    batch = _first_batch(trainer)
    losses_seen = []
    for _ in range(5):
        state, metrics = trainer.train_step(state, batch)
        losses_seen.append(float(metrics["loss"]))
    assert losses_seen[-1] < losses_seen[0] - 1.0, losses_seen
    assert int(state.step) == 5


def test_sharded_step_equals_single_device_reference(trainer):
    """8-way data parallel step == plain jax.grad over the whole batch on one device."""
    assert trainer.mesh.shape["data"] == 8
    state = trainer.init_state()
    batch = _first_batch(trainer)
    params0 = jax.device_get(state.params)
    images, labels = np.asarray(batch["image"]), np.asarray(batch["label"])

    def loss_fn(p):
        scores = trainer.model.apply({"params": p}, images)
        return jnp.mean(losses.lenet_map(scores, labels, j=1.0))

    loss, grads = jax.value_and_grad(loss_fn)(params0)
    updates, _ = trainer.tx.update(grads, trainer.tx.init(params0), params0)
    want = optax.apply_updates(params0, updates)

    new_state, metrics = trainer.train_step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
        jax.device_get(new_state.params),
        want,
    )


def test_batches_are_a_function_of_the_step(trainer):
    """A pipeline started at step k yields what an uninterrupted one yields at step k, also
    across an epoch boundary (62 steps per epoch here)."""
    from_zero = trainer.train_batches(0)
    seen = [next(from_zero) for _ in range(64)]
    for k in (1, 61, 63):
        resumed = _first_batch(trainer, k)
        np.testing.assert_array_equal(resumed["image"], seen[k]["image"])
        np.testing.assert_array_equal(resumed["label"], seen[k]["label"])
    # and epochs are shuffled differently
    assert not np.array_equal(seen[0]["label"], seen[62]["label"])


def test_eval_sees_every_example_once(trainer):
    ds = trainer.experiment.eval_batches({"image": None})
    masks = np.concatenate([b["mask"] for b in ds.as_numpy_iterator()])
    labels = np.concatenate([b["label"] for b in ds.as_numpy_iterator()])
    assert masks.sum() == 1000 and len(masks) % trainer.batch_size == 0
    np.testing.assert_array_equal(np.bincount(labels[masks == 1]), [100] * 10)


def test_inputs_follow_the_papers_scaling(trainer):
    image = np.asarray(_first_batch(trainer)["image"])
    assert image.shape == (64, 32, 32, 1)
    np.testing.assert_allclose(image.min(), -0.1, atol=1e-6)  # background, padding included
    np.testing.assert_allclose(image.max(), 1.175, atol=1e-2)  # ink
    np.testing.assert_allclose(image[:, :2, :, :], -0.1, atol=1e-6)  # the 28 -> 32 pad


def _read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_train_and_evaluate_writes_everything_and_resumes(tfds_dir, tmp_path):
    workdir = str(tmp_path / "run")
    config = tiny_config(tfds_dir, run={"num_train_steps": 4})
    train.train_and_evaluate(config, workdir)
    records = _read_metrics(workdir)
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4]
    train_line = next(r for r in records if r["split"] == "train")
    assert {"loss", "accuracy", "images_per_sec", "learning_rate"} <= set(train_line)
    eval_line = next(r for r in records if r["split"] == "eval")
    assert eval_line["step"] == 4 and 0.0 <= eval_line["accuracy"] <= 1.0
    assert "top5_accuracy" in eval_line
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["name"] == "lenet5"
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
    assert any(f.startswith("events.out") for f in os.listdir(os.path.join(workdir, "tensorboard")))

    # The same command with a later end continues from step 4 instead of restarting.
    resumed = train.train_and_evaluate(tiny_config(tfds_dir, run={"num_train_steps": 8}), workdir)
    steps = [r["step"] for r in _read_metrics(workdir) if r["split"] == "train"]
    assert steps == [2, 4, 6, 8]

    # ... and ends with the parameters of an uninterrupted 8-step run.
    straight = train.train_and_evaluate(
        tiny_config(tfds_dir, run={"num_train_steps": 8}), str(tmp_path / "straight")
    )
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
                 jax.device_get(straight.params))  # fmt: skip

    # A finished run rerun only reports.
    before = len(_read_metrics(workdir))
    again = train.train_and_evaluate(tiny_config(tfds_dir, run={"num_train_steps": 8}), workdir)
    assert int(again.step) == 8 and len(_read_metrics(workdir)) == before


def test_missing_dataset_without_network_is_one_clear_error(tmp_path):
    config = tiny_config(str(tmp_path), data={"name": "mnist"})
    with pytest.raises(UserError, match="bundled_digits"):
        train.build_trainer(config)


def test_unknown_model_names_the_choices(tfds_dir):
    with pytest.raises(UserError, match=r"unknown model 'lenet7'.*lenet5"):
        train.build_trainer(tiny_config(tfds_dir, model={"name": "lenet7"}))
