"""The default configuration every config file in `configs/` starts from.

Fields are grouped by the part of the package that owns them; cnn_jax.experiment hands each
group to its owner as arguments, so no layer, op or loss ever sees the whole config:

    model   the network: `name` (cnn_jax.models.MODELS) and that model's own fields
    data    where examples come from (cnn_jax.data.datasets.Source)
    input   how they become batches: size, preprocessing op and its parameters, shuffling
    optim   optimiser and learning-rate policy (cnn_jax.optim)
    loss    the training criterion (cnn_jax.losses)
    mesh    the (data, model) device mesh and how steps are compiled over it
    eval    which evaluators run (cnn_jax.evaluate) and how often
    run     the loop: length, seed, precision, logging, checkpoints

Every field can be overridden on the command line (`--config.GROUP.FIELD=VALUE`). Config files
change values, never the set of fields (the model group is the model's own: its fields come
from its registry entry), so a typo fails loudly instead of being ignored. A run records the
resolved copy of its config (placeholders filled, the dataset's class count) in config.json;
the user's config is never changed.
"""

import ml_collections

from cnn_jax import models

# The flat field names of cnn_jax before the groups, and where each one went (and the fields
# renamed since); an old name on the command line is one error line that names the new field
# (cnn_jax.cli).
RENAMED = {
    "model": "model.name", "vgg_variant": "model.variant", "batch_norm": "model.batch_norm",
    "dropout_rate": "model.dropout_rate", "width_divisor": "model.width_divisor",
    "warm_start_from": "model.warm_start_from", "num_classes": "data.num_classes",
    "dataset": "data.name", "data_dir": "data.data_dir", "manual_dir": "data.manual_dir",
    "synthetic_train_size": "data.synthetic_train_size",
    "synthetic_eval_size": "data.synthetic_eval_size",
    "synthetic_channels": "data.synthetic_channels", "batch_size": "input.batch_size",
    "image_size": "input.image_size", "preprocess": "input.preprocess",
    "lenet_distortions": "input.lenet_distortions", "train_scale_min": "input.train_scale_min",
    "train_scale_max": "input.train_scale_max", "pca_lighting_std": "input.pca_lighting_std",
    "cache": "input.cache", "shuffle_buffer": "input.shuffle_buffer", "optimizer": "optim.name",
    "learning_rate": "optim.learning_rate", "momentum": "optim.momentum",
    "nesterov": "optim.nesterov", "weight_decay": "optim.weight_decay",
    "lr_schedule": "optim.schedule", "step_epochs": "optim.step_epochs",
    "step_factor": "optim.step_factor", "warmup_epochs": "optim.warmup_epochs",
    "plateau_patience": "optim.plateau_patience", "plateau_max_drops": "optim.plateau_max_drops",
    "plateau_min_delta": "optim.plateau_min_delta", "loss": "loss.name",
    "lenet_map_j": "loss.lenet_map_j", "mesh_data": "mesh.data", "mesh_model": "mesh.model",
    "cpu_devices": "mesh.cpu_devices", "spmd": "mesh.spmd", "eval_mode": "eval.evaluators",
    "eval_scales": "eval.scales", "eval_every_epochs": "eval.every_epochs",
    "eval_only": "eval.only", "seed": "run.seed", "num_epochs": "run.num_epochs",
    "num_train_steps": "run.num_train_steps", "half_precision": "run.half_precision",
    "log_every_steps": "run.log_every_steps",
    "checkpoint_every_steps": "run.checkpoint_every_steps",
    "keep_checkpoints": "run.keep_checkpoints", "progress_bar": "run.progress_bar",
    "debug_inject_nan_at_step": "run.debug_inject_nan_at_step", "init_from": "run.init_from",
    "trainable": "optim.trainable",
    # Renamed within its group: dense and multi_crop share the test scales.
    "eval.dense_scales": "eval.scales",
}  # fmt: skip


def get_default_config(model: str = "lenet5") -> ml_collections.ConfigDict:
    """The defaults, with `model`'s own fields in the model group."""
    return ml_collections.ConfigDict(
        {
            # The model's name and its own fields, with their defaults (models.ModelSpec).
            "model": models.model_config(model),
            "data": _data(),
            "input": _input(),
            "optim": _optim(),
            "loss": _loss(),
            "mesh": _mesh(),
            "eval": _eval(),
            "run": _run(),
        }
    )


def _data() -> ml_collections.ConfigDict:
    d = ml_collections.ConfigDict()
    # bundled_digits (ships with the package), mnist, cifar10, imagenette, imagenet2012,
    # image_folder, synthetic (cnn_jax/data/datasets.py).
    d.name = "bundled_digits"
    d.data_dir = ""  # TFDS data_dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    d.manual_dir = ""  # TFDS manual_dir (imagenet2012), or an image_folder's root.
    # Classes of synthetic data. Real datasets have their own count, which config.json records.
    d.num_classes = 10
    d.synthetic_train_size = 1024
    d.synthetic_eval_size = 256
    d.synthetic_channels = 3
    return d


def _input() -> ml_collections.ConfigDict:
    i = ml_collections.ConfigDict()
    i.batch_size = 128  # global batch, split over the mesh's data axis.
    i.image_size = 32  # the model's input side in pixels.
    i.preprocess = "lenet"  # cnn_jax.data.preprocess.PREPROCESSORS.
    i.lenet_distortions = False  # lenet: the paper's random affine distortions (0.8% run).
    # vgg: training scale S, the shorter side before the crop, drawn per image from [min, max]
    # (VGG Sec. 3.1 scale jittering: 256, 512); equal values train at a fixed S (the paper's
    # 256 or 384). Sides are quoted at a 224 crop and scaled with image_size.
    i.train_scale_min = 256
    i.train_scale_max = 512
    # alexnet, vgg: standard deviation of AlexNet's PCA colour shift (Sec. 4.1: 0.1); 0: off.
    i.pca_lighting_std = 0.1
    # vgg: the mean RGB (0..255) subtracted from every view. Empty: the paper's (Sec. 2.1).
    # Imported weights were trained with their own mean (torchvision's 255 x (0.485, 0.456,
    # 0.406)), which an image border's zero padding keeps from folding into conv1's bias: a
    # run on an imported checkpoint takes it from the checkpoint when this is empty
    # (cnn_jax.weights, docs/weights.md).
    i.mean_rgb = ()
    i.cache = True  # keep decoded examples in memory (small datasets).
    i.shuffle_buffer = 0  # 0: the whole (per-process) training split.
    return i


def _optim() -> ml_collections.ConfigDict:
    o = ml_collections.ConfigDict()
    o.name = "sgd"  # sgd (with momentum), adam, sdlm (LeNet-5's, cnn_jax/sdlm.py).
    o.learning_rate = 0.01
    o.momentum = 0.9
    o.nesterov = False
    o.weight_decay = 0.0
    # constant, step (x step_factor at each step_epochs), cosine, plateau (x0.1 when eval
    # accuracy stops improving for plateau_patience evals, at most plateau_max_drops times).
    o.schedule = "constant"
    o.step_epochs = (10.0, 20.0, 30.0)
    o.step_factor = 0.1
    o.warmup_epochs = 0.0
    o.plateau_patience = 2
    o.plateau_max_drops = 3
    o.plateau_min_delta = 1e-4
    # What trains: all; classifier (the fully-connected layers at the end: fc6-fc8, LeNet's
    # F6); last:K (the last K layers with parameters). Fine-tuning a trained net on a small
    # folder often trains only its classifier: fewer parameters to fit, and the frozen
    # layers' features are kept (cnn_jax.finetune; the others stay bit-identical).
    o.trainable = "all"
    # sdlm: per-parameter steps eta / (sdlm_mu + h_kk), h_kk the Gauss-Newton diagonal
    # estimated on sdlm_samples examples before each pass; eta is sdlm_etas[i] for
    # sdlm_eta_passes[i] passes, the last from then on (LeNet-5 App. C); learning_rate,
    # momentum and the schedule's fields do not apply to it.
    o.sdlm_mu = 0.02
    o.sdlm_samples = 500
    o.sdlm_every_steps = 0  # re-estimate every this many steps; 0: once per pass (the paper)
    o.sdlm_etas = (0.0005, 0.0002, 0.0001, 0.00005, 0.00001)
    o.sdlm_eta_passes = (2, 3, 3, 4)
    # a batch step's eta: none (the paper's), sqrt (x sqrt(batch_size)), linear (x batch_size)
    o.sdlm_batch_scaling = "none"
    o.sdlm_scale_mu = False  # mu scaled by the same factor
    o.sdlm_warmup_passes = 0.0  # the factor reached linearly over these passes
    # more estimates in the first pass, geometrically spaced (dense in the first steps, where
    # h grows by orders of magnitude from the paper's small initial weights); 0: none
    o.sdlm_first_pass_estimates = 0
    return o


def _loss() -> ml_collections.ConfigDict:
    loss = ml_collections.ConfigDict()
    loss.name = "cross_entropy"  # or lenet_map (LeNet-5 paper eq. 9).
    loss.lenet_map_j = 1.0  # lenet_map: the positive constant j (LeNet-5 Sec. II-C).
    return loss


def _mesh() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    # The mesh is (data, model). model=2 splits AlexNet's towers over devices; 0 chooses per
    # machine: a device per tower where the device count and batch allow, else 1, and the run
    # says which (configs/alexnet.py). data=-1 uses every remaining device.
    m.data = -1
    m.model = 1
    # CPU-only runs: how many XLA devices the cores are split into (the mesh's devices).
    # 1: one device whose operations use every core (best for big layers: AlexNet);
    # 0: one device per core, as many as divide the batch (best for small ones: LeNet-5).
    # XLA_FLAGS=--xla_force_host_platform_device_count=N, where set, takes precedence.
    m.cpu_devices = 1
    m.spmd = "shard_map"  # shard_map, or pmap (the classic path; the same step).
    return m


def _eval() -> ml_collections.ConfigDict:
    e = ml_collections.ConfigDict()
    # Comma-separated names in cnn_jax.evaluate.EVALUATORS, run at every evaluation; the first
    # is the one the plateau schedule and eval_results.json follow. center: one centre crop;
    # ten_crop: AlexNet Sec. 4.1; dense, multi_crop, dense_multi_crop: VGG Sec. 3.2 and 4.3,
    # over the whole image rescaled to each of `scales`.
    e.evaluators = "center"
    # dense, multi_crop, dense_multi_crop: the test scales Q, the whole image's shorter side
    # (quoted at a 224 crop). The paper's for a net trained with S in [256, 512] (Sec. 4.2);
    # for a fixed S it used (S - 32, S, S + 32).
    e.scales = (256, 384, 512)
    # ... and how their batches group images of different shapes: by the longer side at the
    # largest scale, in steps of this many pixels (a multiple of 32). Each group is one
    # compiled program; its padding is computed and masked, so the results do not depend on
    # it. Larger: fewer programs to compile, more padding (docs/data_and_evaluation.md).
    e.shape_step = 64
    e.every_epochs = 1.0
    # Evaluate the latest checkpoint in workdir, write metrics.jsonl and eval_results.json, stop.
    e.only = False
    return e


def _run() -> ml_collections.ConfigDict:
    r = ml_collections.ConfigDict()
    r.seed = 0
    r.num_epochs = 10.0
    r.num_train_steps = -1  # > 0 overrides num_epochs.
    # bfloat16 compute with float32 master weights and loss. Unset (None): resolved when the
    # run starts, True on GPU/TPU, False on CPU (docs/performance.md).
    r.half_precision = ml_collections.config_dict.placeholder(bool)
    r.log_every_steps = 50
    r.checkpoint_every_steps = 500
    r.keep_checkpoints = 3
    r.progress_bar = True
    # JAX's persistent compilation cache, so that a rerun or a resume loads its compiled steps
    # instead of compiling them again. Empty: $CNN_JAX_COMPILATION_CACHE, else
    # $XDG_CACHE_HOME/cnn_jax/jax (~/.cache/cnn_jax/jax); "off": no cache (cnn_jax.cli).
    r.compilation_cache_dir = ""
    r.debug_inject_nan_at_step = -1  # fault testing: make the loss NaN at this step.
    # A new run starts from these trained weights: a workdir, its checkpoints/ folder or one
    # checkpoint's folder (cnn_jax's own, or `python -m cnn_jax.weights import`'s). Every
    # layer that fits is loaded; fc8 is re-initialised when the class count differs. A run
    # with checkpoints of its own resumes from them instead (cnn_jax.finetune).
    r.init_from = ""
    return r
