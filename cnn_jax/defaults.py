"""The one default configuration every config file in `configs/` starts from.

Every field here can be overridden on the command line (`--config.FIELD=VALUE`), so a field
exists only if some code reads it. Config files change values, never the set of fields, so a
typo on the command line fails loudly instead of being ignored.
"""

import ml_collections


def get_default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    # --- Model -------------------------------------------------------------------------------
    # One of cnn_jax.models.MODELS: lenet5, lenet5_modern, alexnet, alexnet_single_tower, vgg.
    c.model = "lenet5"
    # VGG configuration of the paper's Table 1: A, A-LRN, B, C, D, E (only read when model=vgg).
    c.vgg_variant = "D"
    c.batch_norm = False  # VGG only: the modern batch-norm variants (not in the paper).
    c.dropout_rate = 0.5
    # AlexNet and VGG: every conv and FC width divided by this (1, 2, 4, 8, 16); 1 is the paper.
    # For tests and quick CPU runs (AlexNet at 8: towers of 6/16/24/24/16 maps, FC 512; VGG at
    # 16: 4..32 maps, FC 256).
    c.width_divisor = 1
    # Classes of synthetic data. Real datasets define their own and overwrite this field when
    # the run starts (config.json records the value used).
    c.num_classes = 10
    # Loss over the model's output scores: cross_entropy, or lenet_map (LeNet-5 paper eq. 9).
    c.loss = "cross_entropy"
    c.lenet_map_j = 1.0  # the positive constant j of LeNet-5's MAP criterion (paper, Sec. II-C).
    # Path of a trained VGG-A checkpoint directory to warm-start a deeper VGG from (paper Sec. 3.1).
    c.warm_start_from = ""

    # --- Data --------------------------------------------------------------------------------
    # bundled_digits (ships with the package), mnist, cifar10, imagenette, imagenet2012,
    # image_folder, synthetic. See cnn_jax/data/datasets.py.
    c.dataset = "bundled_digits"
    c.data_dir = ""  # TFDS data_dir; empty: $TFDS_DATA_DIR or ~/tensorflow_datasets.
    c.manual_dir = ""  # TFDS manual_dir (imagenet2012) or the root of an image_folder dataset.
    c.image_size = 32  # the model's input side in pixels.
    c.preprocess = "lenet"  # a name in cnn_jax.data.preprocess.PREPROCESSORS.
    c.lenet_distortions = False  # LeNet-5's random affine distortions (the paper's 0.8% run).
    # preprocess=vgg: training scale S, the shorter side before the 224 crop, drawn per image
    # from [min, max] (VGG Sec. 3.1 scale jittering: 256, 512); equal values train at a fixed S
    # (the paper's 256 or 384). Sides are quoted at a 224 crop and scaled with image_size.
    c.train_scale_min = 256
    c.train_scale_max = 512
    # preprocess=alexnet/vgg: standard deviation of AlexNet's PCA colour shift (Sec. 4.1: 0.1);
    # 0 turns it off.
    c.pca_lighting_std = 0.1
    c.cache = True  # cache decoded examples in memory (small datasets).
    c.shuffle_buffer = 0  # 0: the whole (per-process) training split.
    c.synthetic_train_size = 1024
    c.synthetic_channels = 3
    c.synthetic_eval_size = 256

    # --- Optimisation ------------------------------------------------------------------------
    c.batch_size = 128  # global batch, split over the mesh's data axis.
    c.num_epochs = 10.0
    c.num_train_steps = -1  # > 0 overrides num_epochs.
    c.optimizer = "sgd"  # sgd (with momentum), adam.
    c.learning_rate = 0.01
    c.momentum = 0.9
    c.nesterov = False
    c.weight_decay = 0.0
    # constant, step (x step_factor at each step_epochs), cosine, plateau (x0.1 when eval
    # accuracy stops improving for plateau_patience evals, at most plateau_max_drops times).
    c.lr_schedule = "constant"
    c.step_epochs = (10.0, 20.0, 30.0)
    c.step_factor = 0.1
    c.warmup_epochs = 0.0
    c.plateau_patience = 2
    c.plateau_max_drops = 3
    c.plateau_min_delta = 1e-4
    # bfloat16 compute with float32 master weights and loss. Unset (None): resolved when the
    # run starts, True on GPU/TPU, False on CPU (no bfloat16 arithmetic on most CPUs: there it
    # only adds conversions; README, Performance). config.json records the value used.
    c.half_precision = ml_collections.config_dict.placeholder(bool)

    # --- Parallelism -------------------------------------------------------------------------
    # The mesh is (data, model). model=2 splits AlexNet's towers over devices; 0 chooses per
    # machine: a device per tower where the device count and batch allow, else 1, and the
    # run says which (configs/alexnet.py). data=-1 uses every remaining device.
    c.mesh_data = -1
    c.mesh_model = 1
    # CPU-only runs: how many XLA devices the cores are split into (the mesh's devices).
    # 1: one device whose operations use every core (best for big layers: AlexNet);
    # 0: one device per core, as many as divide batch_size (best for small ones: LeNet-5).
    # XLA_FLAGS=--xla_force_host_platform_device_count=N, where set, takes precedence.
    c.cpu_devices = 1
    c.spmd = "shard_map"  # shard_map, or pmap (the classic path; must agree).

    # --- Loop, logging and checkpoints -------------------------------------------------------
    c.seed = 0
    c.log_every_steps = 50
    c.eval_every_epochs = 1.0
    c.checkpoint_every_steps = 500
    c.keep_checkpoints = 3
    c.progress_bar = True
    # Evaluate the latest checkpoint in workdir, write metrics.jsonl and eval_results.json, stop.
    c.eval_only = False
    # center: one centre crop. ten_crop: AlexNet Sec. 4.1, four corner and the centre crops
    # and their mirror images, softmax averaged. dense: VGG Sec. 3.2, the net applied
    # convolutionally at each eval_scales Q and mirrored, softmax averaged (cnn_jax/evaluate.py).
    c.eval_mode = "center"
    c.eval_scales = (256, 384, 512)  # dense: VGG's test scales Q (quoted at a 224 crop).
    c.debug_inject_nan_at_step = -1  # fault testing: make the loss NaN at this step.
    return c
