"""cnn_jax: LeNet-5, AlexNet and VGG in JAX/Flax, faithful to their papers."""

__version__ = "0.1.0"
