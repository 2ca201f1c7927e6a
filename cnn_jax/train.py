"""Training: the TrainState pytree, pure per-device steps, and the host loop with resume.

    train_step(state, batch) -> (state, metrics)     per device; pmean over 'data'
    eval_step(state, batch) -> metric sums           per device; psum over 'data'

Both are compiled once over the mesh by cnn_jax.parallel. The loop around them only moves
batches in, decides when to evaluate and checkpoint, and writes what happened.
"""

import functools
import json
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from cnn_jax import (
    checkpoint,
    divergence,
    errors,
    evaluate,
    losses,
    models,
    optim,
    parallel,
    paths,
    reporting,
    validation,
    warm_start,
)
from cnn_jax.data import datasets, pipeline
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without batch norm
    opt_state: Any
    rng: jax.Array  # base key; each step folds in its step number (no hidden RNG state)


def _variables(state: TrainState, params) -> dict:
    variables = {"params": params}
    if state.batch_stats:
        variables["batch_stats"] = state.batch_stats
    return variables


def train_step(state: TrainState, batch: dict, *, model, tx, config) -> tuple[TrainState, dict]:
    """One SGD step on this device's part of the global batch.

    Parameters arrive replicated (unvarying over 'data'). They are cast to varying first so
    that the gradient is this device's own; without the cast, shard_map's autodiff already
    sums it over 'data', and the pmean below would scale it by the data-axis size.

    Over 'model' (AlexNet's towers, each device holding its tower's parameters) nothing more
    is needed: the model's all-gather before its classifier is invariant, so the scores and
    the loss are one replicated computation whose gradient reaches each tower once.
    """
    step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step),
                                  lax.axis_index(DATA_AXIS))  # fmt: skip
    loss_fn = losses.LOSSES[config.loss]
    has_stats = bool(state.batch_stats)

    def objective(params):
        scores, new_vars = model.apply(
            _variables(state, params),
            batch["image"],
            train=True,
            rngs={"dropout": step_rng},
            mutable=["batch_stats"] if has_stats else [],
        )
        loss = jnp.mean(loss_fn(scores, batch["label"], config=config))
        if config.debug_inject_nan_at_step >= 0:
            loss = jnp.where(state.step == config.debug_inject_nan_at_step, jnp.nan, loss)
        return loss, (scores, new_vars)

    varying = jax.tree.map(lambda p: lax.pcast(p, DATA_AXIS, to="varying"), state.params)
    (loss, (scores, new_vars)), grads = jax.value_and_grad(objective, has_aux=True)(varying)
    grads = lax.pmean(grads, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = lax.pmean(new_vars["batch_stats"], DATA_AXIS) if has_stats else {}

    metrics = {
        "loss": lax.pmean(loss, DATA_AXIS),
        "accuracy": lax.pmean(jnp.mean(losses.topk_correct(scores, batch["label"], 1)), DATA_AXIS),
        # The norm of all gradients, also those split over the towers' devices.
        "grad_norm": parallel.global_norm(grads, models.param_specs(model, grads)),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model, config) -> dict:
    """Sums over this device's examples (padding has mask 0), summed over 'data'."""
    scores = model.apply(_variables(state, state.params), batch["image"], train=False)
    mask = batch["mask"]
    loss = losses.LOSSES[config.loss](scores, batch["label"], config=config)
    sums = {
        "loss": jnp.sum(loss * mask),
        "accuracy": jnp.sum(losses.topk_correct(scores, batch["label"], 1) * mask),
        "count": jnp.sum(mask),
    }
    if config.num_classes > 5:
        sums["top5_accuracy"] = jnp.sum(losses.topk_correct(scores, batch["label"], 5) * mask)
    return lax.psum(sums, DATA_AXIS)


def state_specs(state: TrainState, model, tx) -> TrainState:
    """PartitionSpecs of the state: every array replicated over 'data'; over 'model', each
    parameter and the optimiser's buffers for it where the model puts it (AlexNet's tower
    layers split, see models.param_specs), everything else replicated."""
    params = models.param_specs(model, state.params)
    opt_state = optax.tree_map_params(
        tx, lambda _, spec: spec, state.opt_state, params,
        transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P),
    )  # fmt: skip
    replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
    return TrainState(
        step=P(), params=params, batch_stats=replicated(state.batch_stats),
        opt_state=opt_state, rng=P(),
    )  # fmt: skip


def create_train_state(config, model, tx, mesh, input_shape) -> TrainState:
    """Initialise the state directly into its sharding on the mesh (no host copy)."""

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        variables = model.init({"params": init_rng, "dropout": init_rng},
                               jnp.zeros(input_shape, jnp.float32), train=False)  # fmt: skip
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    abstract = jax.eval_shape(init, jax.random.key(0))
    out_shardings = parallel.shardings(mesh, state_specs(abstract, model, tx))
    return jax.jit(init, out_shardings=out_shardings)(jax.random.key(config.seed))


def total_train_steps(config, steps_per_epoch: int) -> int:
    if config.num_train_steps > 0:
        return config.num_train_steps
    return max(1, int(config.num_epochs * steps_per_epoch))


class Trainer:
    """Everything a run builds once from its config: mesh, model, optimiser, compiled steps."""

    def __init__(self, config: ml_collections.ConfigDict):
        paths.expand_config_paths(config)  # `~` in data_dir, manual_dir, warm_start_from
        models.resolve_half_precision(config)
        mesh_notice = models.resolve_mesh_model(config, jax.device_count(), jax.process_count())
        validation.check_config(config, jax.device_count(), jax.process_count())
        datasets.resolve_dataset_fields(config)
        validation.check_num_classes(config)  # an image folder's count is known only now
        self.config = config
        if mesh_notice and jax.process_index() == 0:
            print(mesh_notice)
        self.mesh = parallel.make_mesh(config)
        self.model = models.build_model(config)
        self.steps_per_epoch = pipeline.steps_per_epoch(config)
        if self.steps_per_epoch < 1:
            raise UserError(
                f"--config.batch_size={config.batch_size} is larger than the training split"
            )
        self.total_steps = total_train_steps(config, self.steps_per_epoch)
        self.tx = optim.make_optimizer(config, self.steps_per_epoch, self.total_steps)
        channels = pipeline.input_channels(config)
        self.input_shape = (1, config.image_size, config.image_size, channels)
        channel_note = pipeline.channel_note(config)  # grey -> RGB, RGB -> luminance
        if channel_note and jax.process_index() == 0:
            print(channel_note)

    def init_state(self) -> TrainState:
        return create_train_state(self.config, self.model, self.tx, self.mesh, self.input_shape)

    @functools.cached_property
    def _specs(self):
        return state_specs(jax.eval_shape(self.init_state), self.model, self.tx)

    def abstract_state(self) -> TrainState:
        """The state's shapes, dtypes and shardings without computing it: a restore target
        that skips compiling and running the initialisation (eval_only)."""
        shardings = parallel.shardings(self.mesh, self._specs)
        return jax.tree.map(
            lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
            jax.eval_shape(self.init_state),
            shardings,
        )

    @functools.cached_property
    def train_step(self):
        step = functools.partial(train_step, model=self.model, tx=self.tx, config=self.config)
        batch_spec = {"image": P(DATA_AXIS), "label": P(DATA_AXIS)}
        return parallel.compile_per_device(
            step, self.mesh, (self._specs, batch_spec), (self._specs, P()), donate_argnums=0,
            spmd=self.config.spmd,
        )  # fmt: skip

    @functools.cached_property
    def eval_step(self):
        # center: eval_step above; ten_crop / dense: the papers' multi-view evaluations.
        fn = evaluate.EVAL_STEPS.get(self.config.eval_mode, eval_step)
        step = functools.partial(fn, model=self.model, config=self.config)
        batch_spec = {k: P(DATA_AXIS) for k in (*evaluate.view_keys(self.config), "label", "mask")}
        return parallel.compile_per_device(
            step, self.mesh, (self._specs, batch_spec), P(), spmd=self.config.spmd
        )

    def train_batches(self, start_step: int):
        ds = pipeline.train_dataset(self.config, start_step)
        return pipeline.global_batches(
            ds, parallel.batch_sharding(self.mesh), self.config.batch_size
        )

    def evaluate(self, state: TrainState) -> dict:
        ds = pipeline.eval_dataset(self.config)
        sharding = parallel.batch_sharding(self.mesh)
        totals = None
        for batch in pipeline.global_batches(ds, sharding, self.config.batch_size):
            sums = self.eval_step(state, batch)
            totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
        totals = jax.device_get(totals)
        count = totals.pop("count")
        return {k: v / count for k, v in totals.items()}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train per config into workdir, resuming from its newest good checkpoint if it has one.

    A rerun of the same command after a kill continues to the same final parameters; SIGTERM
    saves the current step and returns; Ctrl-C saves it too and raises errors.Interrupted
    (exit status 130); a NaN/Inf stops the run without saving it (cnn_jax.checkpoint,
    cnn_jax.divergence; README "Resuming and failures"). The workdir is locked for the whole
    run: a second run on it is refused (cnn_jax.paths).
    """
    with paths.locked_workdir(workdir) as workdir:  # before anything compiles
        trainer = Trainer(config)
        ckpt = checkpoint.Checkpointer(
            os.path.join(os.path.abspath(workdir), "checkpoints"), keep=config.keep_checkpoints
        )
        try:
            _check_same_run(config, ckpt, workdir)  # before anything compiles
            if config.eval_only:  # evaluate the latest checkpoint, write the results, stop
                return evaluate.evaluate_checkpoint(trainer, ckpt, workdir)
            return _train(trainer, ckpt, workdir)
        finally:
            ckpt.close()  # waits for a save in flight: the last good checkpoint lands whole


def _check_same_run(config, ckpt: checkpoint.Checkpointer, workdir: str) -> None:
    """Refuse a workdir whose checkpoints were made with a config that gives them another
    meaning (validation.RESUME_FIXED_FIELDS)."""
    saved = checkpoint.saved_config(workdir) if ckpt.all_steps() else None
    if saved is not None:
        validation.check_resume_config(config, saved, workdir)


def _train(trainer: Trainer, ckpt: checkpoint.Checkpointer, workdir: str) -> TrainState:
    config = trainer.config
    fresh = trainer.init_state()
    restored = ckpt.restore_newest(fresh)
    if restored is None and config.warm_start_from:  # a new run: VGG's warm start (Sec. 3.1)
        fresh = warm_start.warm_start(fresh, config.warm_start_from)
    state = fresh if restored is None else restored
    start_step = int(state.step)
    total = trainer.total_steps

    if start_step >= total:
        record = reporting.last_record(workdir, "eval")
        shown = "" if record is None else f"; last eval: {json.dumps(record)}"
        print(f"Training already finished at step {start_step} in {workdir}{shown}")
        return state

    checkpoint.write_config(config, workdir)
    reporter = reporting.Reporter(
        workdir, total_steps=total, start_step=start_step, progress_bar=config.progress_bar
    )
    if start_step:
        reporter.message(f"Resuming from checkpoint at step {start_step} of {total}")
    eval_every = max(1, round(config.eval_every_epochs * trainer.steps_per_epoch))
    batches = trainer.train_batches(start_step)
    # Device metrics since the last log: fetched together (and checked for NaN), no per-step sync.
    pending: list[dict] = []
    window_start, window_steps = time.perf_counter(), 0
    last_saved = None if restored is None else start_step
    # Ctrl-C before the first step is done (compiling it, filling the shuffle buffer) ends the
    # run at once (cnn_jax.cli); from then on it saves the current step first (StopSignal).
    # The reporter closes its progress bar on the way out, before any error line is printed.
    with checkpoint.StopSignal() as stop, reporter:
        for step in range(start_step, total):
            state, metrics = trainer.train_step(state, next(batches))
            if step == start_step:  # compiled and running: Ctrl-C now saves, not aborts
                stop.catch_interrupts()
            pending.append(metrics)
            window_steps += 1
            done = step + 1
            reporter.advance()

            if done % config.log_every_steps == 0 or done == total:
                fetched = jax.device_get(pending)
                divergence.check_metrics(fetched, done - len(fetched), last_saved)
                elapsed = time.perf_counter() - window_start
                summary = {k: sum(m[k] for m in fetched) / len(fetched) for k in fetched[0]}
                summary["images_per_sec"] = window_steps * config.batch_size / elapsed
                summary["learning_rate"] = float(
                    optim.learning_rate_schedule(config, trainer.steps_per_epoch, total)(step)
                    * optim.find_plateau_state(state.opt_state).factor
                )
                reporter.write(done, "train", summary)
                reporter.advance(0, loss=f"{summary['loss']:.4f}",
                                 img_s=f"{summary['images_per_sec']:.0f}")  # fmt: skip
                pending, window_start, window_steps = [], time.perf_counter(), 0

            if done % eval_every == 0 or done == total:
                results = trainer.evaluate(state)
                reporter.write(done, "eval", results)
                if config.lr_schedule == "plateau":
                    plateau = optim.plateau_update(
                        optim.find_plateau_state(state.opt_state), results["accuracy"], config
                    )
                    plateau = jax.device_put(plateau, parallel.replicated(trainer.mesh))
                    state = state.replace(
                        opt_state=optim.replace_plateau_state(state.opt_state, plateau)
                    )
                window_start = time.perf_counter()  # evaluation time is not training throughput

            stopping = stop.requested(done)  # SIGTERM or Ctrl-C: save this step and stop
            if done % config.checkpoint_every_steps == 0 or done == total or stopping:
                # A checkpoint never holds a non-finite state (cnn_jax.divergence).
                divergence.check_metrics(jax.device_get(pending), done - len(pending), last_saved)
                divergence.check_state(state, done, last_saved)
                ckpt.save(done, state)
                last_saved = done
            if stopping:
                ckpt.wait()
                if stop.reason == "SIGTERM":
                    reporter.message(
                        f"Stopped by SIGTERM at step {done} of {total}; its checkpoint is "
                        "saved: rerun the same command to continue"
                    )
                break
        ckpt.wait()

    if stop.reason == "Ctrl-C":
        raise errors.Interrupted(
            f"interrupted (Ctrl-C) at step {done} of {total}; its checkpoint is saved: rerun "
            "the same command to continue"
        )
    return state
