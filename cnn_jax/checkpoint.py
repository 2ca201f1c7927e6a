"""Orbax checkpoints of the whole TrainState in WORKDIR/checkpoints.

The state holds everything a resumed run needs (parameters, optimiser state with the
plateau factor, step, RNG key); the data position is a function of the step
(cnn_jax.data.pipeline), so a checkpoint is one pytree and nothing else.
"""

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Async, keep-N CheckpointManager; every process takes part in each save."""

    def __init__(self, directory: str, *, keep: int, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
            enable_async_checkpointing=async_save,
        )
        self._manager = ocp.CheckpointManager(directory, options=options, item_names=("state",))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state) -> None:
        self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)))

    def restore(self, step: int, like):
        """Restore `step` into arrays with the shapes, dtypes and shardings of `like`."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        restored = self._manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        )
        return restored["state"]

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
