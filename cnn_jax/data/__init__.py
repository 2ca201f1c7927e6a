"""Input: TFDS -> tf.data -> per-process batches -> global jax.Array (see pipeline.py)."""
