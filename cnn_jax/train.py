"""Training: the TrainState pytree, pure per-device steps, and the host loop with resume.

    train_step(state, batch) -> (state, metrics)     per device; pmean over 'data'

It is compiled once over the mesh by cnn_jax.parallel, as are the evaluators' steps
(cnn_jax.evaluate). The loop around them only moves batches in, decides when to evaluate and
checkpoint (`itstime`), and writes what happened.
"""

import contextlib
import functools
import gc
import itertools
import json
import threading
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
    cli,
    divergence,
    errors,
    evaluate,
    finetune,
    losses,
    models,
    parallel,
    paths,
    reporting,
    validation,
)
from cnn_jax import experiment as experiment_lib
from cnn_jax.data import pipeline
from cnn_jax.errors import UserError
from cnn_jax.parallel import DATA_AXIS


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    batch_stats: Any  # {} for models without batch norm
    opt_state: Any
    rng: jax.Array  # base key; each step folds in its step number (no hidden RNG state)


def train_step(
    state: TrainState, batch: dict, *, model, tx, loss, nan_at_step: int = -1, trainable=None
):
    """One SGD step on this device's part of the global batch -> (state, metrics).

    Parameters arrive replicated (unvarying over 'data'). They are cast to varying first so
    that the gradient is this device's own; without the cast, shard_map's autodiff already
    sums it over 'data', and the pmean below would scale it by the data-axis size.

    Over 'model' (AlexNet's towers, each device holding its tower's parameters) nothing more
    is needed: the model's all-gather before its classifier is invariant, so the scores and
    the loss are one replicated computation whose gradient reaches each tower once.

    `trainable` (fine-tuning: the optimiser's mask, False where a parameter is frozen): frozen
    layers are fixed functions (finetune.frozen_batch_norms), their gradients are not averaged
    (nothing uses them, so XLA does not compute them), and their variables come out as they
    went in, bit for bit (finetune.keep_frozen).
    """
    step_rng = jax.random.fold_in(
        jax.random.fold_in(state.rng, state.step), lax.axis_index(DATA_AXIS)
    )
    has_stats = bool(state.batch_stats)

    def objective(params):
        scores, new_vars = model.apply(
            evaluate.variables(state.replace(params=params)),
            batch["image"],
            train=True,
            rngs={"dropout": step_rng},
            mutable=["batch_stats"] if has_stats else [],
        )
        value = jnp.mean(loss(scores, batch["label"]))
        if nan_at_step >= 0:  # fault testing: this step's loss is NaN
            value = jnp.where(state.step == nan_at_step, jnp.nan, value)
        return value, (scores, new_vars)

    varying = jax.tree.map(lambda p: lax.pcast(p, DATA_AXIS, to="varying"), state.params)
    with finetune.frozen_batch_norms(trainable):
        (value, (scores, new_vars)), grads = jax.value_and_grad(objective, has_aux=True)(varying)
    if trainable is not None:
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros(g.shape, g.dtype), grads, trainable)
    grads = lax.pmean(grads, DATA_AXIS)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    batch_stats = lax.pmean(new_vars["batch_stats"], DATA_AXIS) if has_stats else {}
    params = finetune.keep_frozen(params, state.params, trainable)
    batch_stats = finetune.keep_frozen(batch_stats, state.batch_stats, trainable)

    metrics = {
        "loss": lax.pmean(value, DATA_AXIS),
        "accuracy": lax.pmean(jnp.mean(losses.topk_correct(scores, batch["label"], 1)), DATA_AXIS),
        # The norm of all gradients, also those split over the towers' devices.
        "grad_norm": parallel.global_norm(grads, models.param_specs(model, grads)),
    }
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    return new_state, metrics


def state_specs(state: TrainState, model, tx) -> TrainState:
    """PartitionSpecs of the state: every array replicated over 'data'; over 'model', each
    parameter and the optimiser's buffers for it where the model puts it (AlexNet's tower
    layers split, see models.param_specs), everything else replicated."""
    params = models.param_specs(model, state.params)
    opt_state = optax.tree_map_params(
        tx,
        lambda _, spec: spec,
        state.opt_state,
        params,
        transform_non_params=lambda _: P(),
        is_leaf=lambda x: isinstance(x, P),
    )
    replicated = lambda tree: jax.tree.map(lambda _: P(), tree)
    return TrainState(
        step=P(),
        params=params,
        batch_stats=replicated(state.batch_stats),
        opt_state=opt_state,
        rng=P(),
    )


def state_init(model, tx, input_shape):
    """The new state as a function of a PRNG key. JAX traces a function once for given
    shapes: a caller that keeps it (Trainer) traces the model's initialisation once, for the
    state's layout and for its program."""

    def init(rng):
        init_rng, state_rng = jax.random.split(rng)
        dummy = jnp.zeros(input_shape, jnp.float32)
        variables = model.init({"params": init_rng, "dropout": init_rng}, dummy, train=False)
        params = variables["params"]
        return TrainState(
            step=jnp.zeros([], jnp.int32),
            params=params,
            batch_stats=variables.get("batch_stats", {}),
            opt_state=tx.init(params),
            rng=state_rng,
        )

    return init


def create_train_state(seed: int, model, tx, mesh, input_shape, init=None) -> TrainState:
    """Initialise the state directly into its sharding on the mesh (no host copy); `init`:
    state_init's function for these, where the caller keeps one."""
    init = init or state_init(model, tx, input_shape)
    abstract = jax.eval_shape(init, jax.random.key(0))
    out_shardings = parallel.shardings(mesh, state_specs(abstract, model, tx))
    return jax.jit(init, out_shardings=out_shardings)(jax.random.key(seed))


def itstime(step: int, every: int, total: int) -> bool:
    """After `step` steps: is it time for what happens every `every` steps (and at the end)?"""
    return step % every == 0 or step == total


class Trainer:
    """A built experiment on its mesh: the state's layout and the compiled steps."""

    def __init__(self, experiment: experiment_lib.Experiment):
        self.experiment = experiment
        self.config = experiment.config  # the resolved copy
        self.record = experiment.config.to_dict()  # what config.json records
        self.model = experiment.model
        self.tx = experiment.optimizer.tx
        self.mesh = parallel.make_mesh(*experiment.mesh_shape)
        self.steps_per_epoch = experiment.loop.steps_per_epoch
        self.total_steps = experiment.loop.total_steps
        self.input_shape = experiment.input_shape
        self.batch_size = experiment.batch_size
        self._init = state_init(self.model, self.tx, self.input_shape)
        self.evaluators = tuple(
            e.bind(self._compile_eval_step, self._eval_batches) for e in experiment.evaluators
        )

    def init_state(self) -> TrainState:
        seed = self.experiment.loop.seed
        mesh, shape = self.mesh, self.input_shape
        return create_train_state(seed, self.model, self.tx, mesh, shape, init=self._init)

    @functools.cached_property
    def _specs(self):
        abstract = jax.eval_shape(self._init, jax.random.key(0))  # init_state's trace
        return state_specs(abstract, self.model, self.tx)

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
        x = self.experiment
        step = functools.partial(
            train_step,
            model=self.model,
            tx=self.tx,
            loss=x.loss,
            nan_at_step=x.nan_at_step,
            trainable=x.optimizer.trainable,
        )
        batch_spec = {"image": P(DATA_AXIS), "label": P(DATA_AXIS)}
        in_specs, out_specs = (self._specs, batch_spec), (self._specs, P())
        return parallel.compile_per_device(
            step, self.mesh, in_specs, out_specs, donate_argnums=0, spmd=x.spmd
        )

    def _compile_eval_step(self, step, batch_keys):
        in_specs = (self._specs, {k: P(DATA_AXIS) for k in batch_keys})
        return parallel.compile_per_device(
            step, self.mesh, in_specs, P(), spmd=self.experiment.spmd
        )

    def _eval_batches(self, views):
        ds = self.experiment.eval_batches(views)
        return pipeline.global_batches(ds, parallel.batch_sharding(self.mesh), self.batch_size)

    def train_batches(self, start_step: int):
        ds = self.experiment.train_batches(start_step)
        return pipeline.global_batches(ds, parallel.batch_sharding(self.mesh), self.batch_size)

    def train_batch_spec(self) -> dict:
        """The shapes, dtypes and sharding of every batch train_batches yields (the pipeline's
        float32 images and int32 labels; tests/test_compile_cache.py compares a real batch)."""
        sharding = parallel.batch_sharding(self.mesh)
        shapes = {"image": (self.batch_size, *self.input_shape[1:]), "label": (self.batch_size,)}
        dtypes = {"image": jnp.float32, "label": jnp.int32}
        return {k: jax.ShapeDtypeStruct(shapes[k], dtypes[k], sharding=sharding) for k in shapes}

    def compile_train_step(self, state: TrainState) -> None:
        """Compile the train step for `state` and train_batch_spec() before the first batch
        exists (jit keeps the program, so the first call runs it at once); the pmap path
        (mesh.spmd='pmap') compiles at its first call instead."""
        if hasattr(self.train_step, "trace"):
            self.train_step.trace(state, self.train_batch_spec()).lower().compile()

    def evaluate(self, state: TrainState) -> list[tuple[str, dict]]:
        """(name, metrics) of every evaluator, the first being the one the schedule follows."""
        return [(e.name, e.run(state)) for e in self.evaluators]


def build_trainer(config: ml_collections.ConfigDict, workdir: str | None = None) -> Trainer:
    """The Trainer of a user's config on this machine's devices (resolved, built, checked),
    printing the one-line notes a run gives about its mesh and its images' channels.
    `workdir`: the run's, whose checkpoints may record the mean RGB they expect."""
    devices, processes = jax.device_count(), jax.process_count()
    resolved = experiment_lib.resolve(config, devices, processes, workdir=workdir)
    built = experiment_lib.build(resolved, devices, processes)
    cli.keep_cache_only_if_it_reloads()  # checked: from here on, compiling is allowed
    if jax.process_index() == 0:
        for note in (
            experiment_lib.mesh_notice(built.model_name, built.mesh_shape[1], devices),
            pipeline.channel_note(built.source, built.prep),  # grey -> RGB, RGB -> luminance
            built.trainable and built.trainable.note(),  # fine-tuning: what trains
        ):
            if note:
                print(note)
    return Trainer(built)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
    """Train per config into workdir, resuming from its newest good checkpoint if it has one.

    A rerun of the same command after a kill continues to the same final parameters; SIGTERM
    saves the current step and returns; Ctrl-C saves it too and raises errors.Interrupted
    (exit status 130); a NaN/Inf stops the run without saving it (cnn_jax.checkpoint,
    cnn_jax.divergence; docs/failures.md). The workdir is locked for the whole run: a second
    run on it is refused (cnn_jax.paths).
    """
    with _loaded_modules_frozen(), paths.locked_workdir(workdir) as workdir:  # before compiling
        trainer = build_trainer(config, workdir)
        loop = trainer.experiment.loop
        ckpt = checkpoint.Checkpointer(
            paths.checkpoints_dir(workdir),
            keep=loop.keep_checkpoints,
        )
        try:
            _check_same_run(trainer.record, ckpt, workdir)  # before anything compiles
            if loop.eval_only:  # evaluate the latest checkpoint, write the results, stop
                return _evaluate_checkpoint(trainer, ckpt, workdir)
            return _train(trainer, ckpt, workdir)
        finally:
            ckpt.close()  # waits for a save in flight: the last good checkpoint lands whole


@contextlib.contextmanager
def _loaded_modules_frozen():
    """What the process holds so far (the loaded modules of TensorFlow, JAX, Flax and Orbax:
    about 500,000 objects) kept out of the garbage collector's full passes until the run
    ends. They live as long as the process, so those passes only walk them, and one of them
    came in the middle of tracing the first step: 0.5 s of a 2 s warm start
    (docs/performance.md). Unfrozen afterwards, so that a caller's garbage is collected."""
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _check_same_run(record: dict, ckpt: checkpoint.Checkpointer, workdir: str) -> None:
    """Refuse a workdir whose checkpoints were made with a config that gives them another
    meaning (validation.RESUME_FIXED_FIELDS); `record` is this run's config.json."""
    saved = checkpoint.saved_config(workdir) if ckpt.all_steps() else None
    if saved is not None:
        validation.check_resume_config(record, saved, workdir)


def _evaluate_checkpoint(trainer: Trainer, ckpt: checkpoint.Checkpointer, workdir: str):
    """eval_only: evaluate the latest checkpoint that restores (a corrupt newest one is
    reported and skipped), append the results to metrics.jsonl and write eval_results.json."""
    state = ckpt.restore_newest(trainer.abstract_state())
    if state is None:
        raise UserError(
            f"--config.eval.only=True but {paths.checkpoints_dir(workdir)} holds "
            "no checkpoint: train first (the same command without eval.only)"
        )
    step = int(state.step)
    results = trainer.evaluate(state)
    with reporting.Reporter(workdir, total_steps=step, start_step=step, progress_bar=False) as r:
        evaluate.report(r, step, results)
    x = trainer.experiment
    facts = {
        "model": x.model_name,
        "dataset": x.source.name,
        "evaluators": [name for name, _ in results],
        "num_examples": x.source.num_examples("eval"),
        **evaluate.settings(trainer.evaluators),
    }
    evaluate.write_eval_results(workdir, step, results[0][1], facts)
    return state


def _start_state(trainer: Trainer, ckpt: checkpoint.Checkpointer) -> tuple[TrainState, bool]:
    """The newest good checkpoint's state, or a new one: from trained weights where asked
    (run.init_from, VGG's warm start), which a run that has checkpoints never reads again."""
    fresh = trainer.init_state()
    restored = ckpt.restore_newest(fresh)
    if restored is not None:
        return restored, True
    init_from = trainer.experiment.loop.init_from
    if init_from is not None:
        fresh, note = finetune.start_from(fresh, init_from)
        if jax.process_index() == 0:
            print(note)
    return fresh, False


def _train(trainer: Trainer, ckpt: checkpoint.Checkpointer, workdir: str) -> TrainState:
    began = time.perf_counter()  # the first step's line counts from here
    loop, optimizer = trainer.experiment.loop, trainer.experiment.optimizer
    early = _EarlyBatches(trainer, ckpt.latest_step() or 0, loop.total_steps)
    state, resumed = _start_state(trainer, ckpt)
    start, total = int(state.step), loop.total_steps
    if start >= total:
        record = reporting.last_record(workdir, "eval")
        shown = "" if record is None else f"; last eval: {json.dumps(record)}"
        print(f"Training already finished at step {start} in {workdir}{shown}")
        return state
    trainer.compile_train_step(state)  # while the first batches are made
    checkpoint.write_config(trainer.record, workdir)
    reporter = reporting.Reporter(
        workdir, total_steps=total, start_step=start, progress_bar=loop.progress_bar
    )
    if start:
        reporter.message(f"Resuming from checkpoint at step {start} of {total}")
    batches = early.batches(start)
    window = _Window(trainer.batch_size, last_saved=start if resumed else None)
    replicated = parallel.replicated(trainer.mesh)
    # Ctrl-C before the first step is done (compiling it, filling the shuffle buffer) ends the
    # run at once (cnn_jax.cli); from then on it saves the current step first (StopSignal).
    # The reporter closes its progress bar on the way out, before any error line is printed.
    with checkpoint.StopSignal() as stop, reporter:
        for step in range(start, total):
            if optimizer.before_epoch is not None and optimizer.before_epoch.due(step):
                state, batches = _before_epoch(optimizer, state, batches)
            state, metrics = trainer.train_step(state, next(batches))
            if step == start:  # compiled and running: Ctrl-C now saves, not aborts
                stop.catch_interrupts()
                _first_step_done(reporter, metrics, began)
            window.add(metrics)
            done = step + 1
            reporter.advance()
            if itstime(done, loop.log_every_steps, total):
                summary = window.summary(done)
                summary["learning_rate"] = optimizer.learning_rate(step, state.opt_state)
                reporter.write(done, "train", summary)
                reporter.advance(
                    0, loss=f"{summary['loss']:.4f}", img_s=f"{summary['images_per_sec']:.0f}"
                )
            if itstime(done, loop.eval_every_steps, total):
                state = _evaluate(trainer, state, reporter, done, replicated)
                window.restart()  # evaluation time is not training throughput
            stopping = stop.requested(done)  # SIGTERM or Ctrl-C: save this step and stop
            if itstime(done, loop.checkpoint_every_steps, total) or stopping:
                window.save(ckpt, done, state)
            if stopping:
                _stop(ckpt, stop, reporter, done, total)
                break
        ckpt.wait()
    if stop.reason == "Ctrl-C":
        raise errors.Interrupted(
            f"interrupted (Ctrl-C) at step {done} of {total}; its checkpoint is saved: rerun "
            "the same command to continue"
        )
    return state


class _EarlyBatches:
    """The training batches from step `start`, the first of them fetched on a thread of its
    own from the start of training on: tf.data's work for it (the shuffle buffer filled, the
    split's images read and decoded) runs while the state is initialised or restored and the
    train step compiles. The pipeline is built before, on the calling thread: that is Python
    (tracing the preprocessing), which on a thread would only contend with JAX's tracing for
    the interpreter (on 2 busy cores the first step came 0.4 s later that way,
    docs/performance.md). `start` is where the run is expected to resume (its newest
    checkpoint's step); batch s depends on s alone, so a run that starts elsewhere (a newest
    checkpoint that does not restore) gets a pipeline built at its own step instead."""

    def __init__(self, trainer: Trainer, start: int, total: int):
        self.trainer, self.start = trainer, start
        self._first: list = []  # [the batches, their first] or [the exception raised]
        self._thread = None
        if start < total:  # else: training is finished, nothing to fetch
            batches = trainer.train_batches(start)
            self._thread = threading.Thread(target=self._fetch_first, args=(batches,))
            self._thread.daemon = True  # an error elsewhere ends the run without waiting
            self._thread.start()

    def _fetch_first(self, batches) -> None:
        try:
            self._first = [batches, next(batches)]
        except BaseException as e:  # raised where the batches are asked for
            self._first = [e]

    def batches(self, start: int):
        """The batches from step `start`: the early ones if they start there."""
        if self._thread is None or start != self.start:
            return self.trainer.train_batches(start)
        self._thread.join()
        if len(self._first) == 1:
            raise self._first[0]
        rest, first = self._first
        return itertools.chain([first], rest)


def _before_epoch(optimizer, state: TrainState, batches):
    """The optimiser's work at the start of a pass (SDLM's curvature estimate, which reads
    the pass's first batches and hands them back)."""
    opt_state, batches = optimizer.before_epoch(state, batches)
    return state.replace(opt_state=opt_state), batches


def _first_step_done(reporter, metrics, began: float) -> None:
    jax.block_until_ready(metrics)  # the state, the first batch, compiling and the step
    reporter.message(f"first step after {time.perf_counter() - began:.1f} s (compiling included)")


def _evaluate(trainer: Trainer, state: TrainState, reporter, done: int, replicated):
    """Every evaluator's metrics written down; the plateau rule (if any) fed the first's."""
    results = trainer.evaluate(state)
    evaluate.report(reporter, done, results)
    plateau = trainer.experiment.optimizer.plateau
    if plateau is None:
        return state
    opt_state = plateau.after_eval(state.opt_state, results[0][1]["accuracy"], replicated)
    return state.replace(opt_state=opt_state)


def _stop(ckpt, stop, reporter, done: int, total: int) -> None:
    ckpt.wait()
    if stop.reason == "SIGTERM":
        reporter.message(
            f"Stopped by SIGTERM at step {done} of {total}; its checkpoint is saved: rerun "
            "the same command to continue"
        )


class _Window:
    """The device metrics since the last log, fetched together (and checked for NaN) when
    logged or saved: no per-step host sync."""

    def __init__(self, batch_size: int, last_saved: int | None):
        self.batch_size, self.last_saved = batch_size, last_saved
        self.pending: list[dict] = []
        self.restart()

    def restart(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def add(self, metrics: dict) -> None:
        self.pending.append(metrics)
        self.steps += 1

    def summary(self, done: int) -> dict:
        fetched = jax.device_get(self.pending)
        divergence.check_metrics(fetched, done - len(fetched), self.last_saved)
        elapsed = time.perf_counter() - self.start
        summary = {k: sum(m[k] for m in fetched) / len(fetched) for k in fetched[0]}
        summary["images_per_sec"] = self.steps * self.batch_size / elapsed
        self.pending = []
        self.restart()
        return summary

    def save(self, ckpt: checkpoint.Checkpointer, done: int, state: TrainState) -> None:
        """Save step `done`; a checkpoint never holds a non-finite state (cnn_jax.divergence)."""
        pending = jax.device_get(self.pending)
        divergence.check_metrics(pending, done - len(pending), self.last_saved)
        divergence.check_state(state, done, self.last_saved)
        ckpt.save(done, state)
        self.last_saved = done
