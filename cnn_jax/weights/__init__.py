"""Trained weights from other frameworks, imported exactly into cnn_jax checkpoints.

    python -m cnn_jax.weights import --from=torchvision --file=vgg16-397923af.pth \\
        --workdir=runs/vgg16_tv

Modules: pth (reads .pth state dicts, with or without torch), torchvision and keras (each
source's layout and input convention -> layout.Imported), layout (the Table 1 column a file
is, and cnn_jax's variables for it), importer (the workdir: checkpoint, config.json and
metadata), metadata (imported_weights.json and the mean RGB runs take from it). Nothing here
is imported by this package file: cnn_jax.experiment reads weights.metadata without loading
the converters. docs/weights.md has the conventions and the measured agreement.
"""
