"""The typed sections of the config tree (one dataclass per YAML section), each with its validation.

Every ``validate(p)`` gets the section's name ``p`` and raises a :class:`ConfigError` naming
``p.field``, the value and what is allowed. The root :class:`~dda_ray.config.Config`, loading and
overrides live in :mod:`dda_ray.config` (which re-exports every name here); the ``tune`` section in
:mod:`dda_ray.config.space`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..progress import MODES as PROGRESS_MODES

MODES = ("dda", "inversion", "real_kd")
DATASETS = ("cifar10", "cifar100", "imagefolder", "tiny_imagenet")
AUGMENT_BACKENDS = ("local_prior", "sd_img2img", "sd_image_variations")
DTYPES = ("float32", "float16", "bfloat16")
SYNTHESIS_METHODS = ("dda", "cmi", "fast")
# the classifier architectures models/classifiers.py registers by name (tests/models/test_models.py keeps the two equal)
ARCHITECTURE_NAMES = ("resnet18", "resnet34", "wrn16_1", "wrn16_2", "wrn40_1", "wrn40_2", "vgg11", "mobilenetv2")
ADV_TERMS = ("rotation", "kl")  # synthesis.adv_term: what the generator fools in rounds with the student
# Each method's reference values (its reference code's scripts for CIFAR WRN pairs) for the fields a config
# leaves null: DDA (SLGSP/DDA), CMI (zju-vipa/CMI, cmi_cifar10.sh), Fast-Datafree (zju-vipa/Fast-Datafree, fast_cifar.sh).
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "dda": {"adv": 10.0, "bn": 1.0, "oh": 1.0, "adv_term": "rotation"},
    "cmi": {"adv": 0.5, "bn": 1.0, "oh": 1.0, "adv_term": "kl"},
    "fast": {"adv": 1.1, "bn": 10.0, "oh": 0.4, "adv_term": "kl"},
}
# The KD loss each method's reference trains with (DDA's datafree_kd.py: CE on the round's targets and the
# feature term for --method dda only, KL alone otherwise); real_kd keeps the full loss on the real labels.
KD_TERMS: dict[str, dict[str, float]] = {"dda": {"ce": 1.0, "fea": 30.0}, "cmi": {"ce": 0.0, "fea": 0.0}, "fast": {"ce": 0.0, "fea": 0.0}}
PRIOR_SOURCES = ("bank", "folder", "photos")  # what the local prior trains on (dda_ray/augment/prior_sources.py)
MIX_MODES = ("none", "cutmix", "mixup")  # distill.mix: batch mixing of the KD rows
AMP_MODES = ("none", "bf16", "fp16")  # distill.amp: autocast dtype of the KD forward passes
PRIOR_LABELS = ("teacher", "none")  # class labels of folder/photos crops (bank: its own labels, or none)


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type, or out of range."""


def _check(cond: bool, name: str, value: Any, allowed: str) -> None:
    if not cond:
        raise ConfigError(f"{name} = {value!r} is not allowed; expected {allowed}")



def is_import_path(arch: str) -> bool:
    """An architecture given as ``package.module:factory`` (any classifier), not a registered name."""
    return ":" in arch

@dataclass
class RunConfig:
    """Where a run writes, which pipeline it runs, and its seed."""

    name: str = "smoke"
    output_dir: str = "outputs"  # each run writes to <output_dir>/<name>/
    mode: str = "dda"  # dda | inversion | real_kd
    engine: str = "ray"  # ray (Data actor pools + Train) | local (one process, no Ray)
    seed: int = 0
    resume: bool = False  # required to reuse an existing run directory
    stream_log: bool = False  # per-batch timestamps/ids of the Ray stream under <run_dir>/stream
    # Ray's own INFO logs (driver, actors, Train controller), Ray Data's progress bars and the Ray
    # backend's warnings; false (the default, or no --verbose): Ray prints warnings and errors only
    verbose: bool = False
    # progress: bars (tqdm) on a terminal, plain lines elsewhere (a job's log: one per 10 % / 30 s at most); or force bars | lines
    progress: str = "auto"

    def validate(self, p: str) -> None:
        _check(self.mode in MODES, f"{p}.mode", self.mode, f"one of {MODES}")
        _check(self.progress in PROGRESS_MODES, f"{p}.progress", self.progress, f"one of {PROGRESS_MODES}")
        _check(self.engine in ("ray", "local"), f"{p}.engine", self.engine, "ray or local")
        _check(bool(self.name) and "/" not in self.name, f"{p}.name", self.name, "a non-empty name without '/'")


@dataclass
class DataConfig:
    """The real dataset: used to train the teacher, for real_kd, and for evaluation only."""

    dataset: str = "imagefolder"  # cifar10 | cifar100 | imagefolder | tiny_imagenet
    path: str = "../shared/data/cifar10-jpg.tar.gz"
    cache_dir: str = "~/.cache/dda_ray"
    num_classes: int = 10
    image_size: int = 32
    eval_subset: int | None = None  # evaluate on a random subset of the test split (None: all)
    train_subset: int | None = None  # real_kd / teacher training on a subset (None: all)
    download: bool = True
    skip_corrupt: bool = False  # leave undecodable images out with a warning (default: stop, naming the file)
    # cifar10 | cifar100 | null: when data.path is absent, read the official dataset from data.path's
    # folder instead, downloaded there first (data.download) if it is not there yet
    fallback: str | None = None

    def validate(self, p: str) -> None:
        _check(self.dataset in DATASETS, f"{p}.dataset", self.dataset, f"one of {DATASETS}")
        _check(self.fallback in (None, "cifar10", "cifar100"), f"{p}.fallback", self.fallback, "null, cifar10 or cifar100")
        _check(self.num_classes >= 2, f"{p}.num_classes", self.num_classes, "an integer >= 2")
        _check(self.image_size >= 8, f"{p}.image_size", self.image_size, "an integer >= 8")
        for n in ("eval_subset", "train_subset"):
            v = getattr(self, n)
            _check(v is None or v > 0, f"{p}.{n}", v, "null or a positive integer")


@dataclass
class ModelConfig:
    """A classifier: registry name (wrn16_2, resnet18, ...) or ``package.module:factory``."""

    arch: str = "wrn16_1"
    checkpoint: str | None = None  # project checkpoint dir/json, or a community .pth

    def validate(self, p: str) -> None:
        _check(
            self.arch in ARCHITECTURE_NAMES or is_import_path(self.arch),
            f"{p}.arch",
            self.arch,
            f"one of {sorted(ARCHITECTURE_NAMES)} or 'package.module:factory'",
        )


@dataclass
class TeacherConfig(ModelConfig):
    """The teacher: its architecture, checkpoint and the input normalisation it expects.

    The teacher sees ``(x * input_scale - mean) / std`` for images ``x`` in [0, 1].
    """

    arch: str | None = None  # None: the architecture the checkpoint's meta.json names (required for .pth files and teacher training)
    checkpoint: str | None = "checkpoints/cifar10_wrn16_2"  # project checkpoint dir/json, or a .pth/.pt/.safetensors state dict
    mean: list[float] | None = None  # per-channel, in input_scale units; None: meta.json's, else the dataset's standard values
    std: list[float] | None = None  # per-channel, in input_scale units; None: meta.json's, else the dataset's standard values
    input_scale: float = 1.0  # the model's pixel range: 1.0 for [0, 1] inputs, 255.0 for raw 0-255 (mean/std then default to 0/1)

    def validate(self, p: str) -> None:
        if self.arch is not None:
            super().validate(p)
        for n in ("mean", "std"):
            v = getattr(self, n)
            _check(v is None or len(v) == 3, f"{p}.{n}", v, "null or a list of 3 numbers (one per RGB channel)")
        _check(self.std is None or all(s > 0 for s in self.std), f"{p}.std", self.std, "positive numbers")
        scale_meaning = "a positive number (1.0 for [0, 1] inputs, 255.0 for raw pixels)"
        _check(self.input_scale > 0, f"{p}.input_scale", self.input_scale, scale_meaning)


@dataclass
class TeacherTrainingConfig:
    """Supervised training of the teacher on real data (jobs/train_teacher.py)."""

    epochs: int = 20
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    warmup_epochs: float = 1.0

    def validate(self, p: str) -> None:
        _check(self.epochs >= 1, f"{p}.epochs", self.epochs, "an integer >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a positive number")
        _check(0 <= self.label_smoothing < 1, f"{p}.label_smoothing", self.label_smoothing, "a number in [0, 1)")


@dataclass
class SynthesisConfig:
    """Model inversion: generator + latents optimised against the teacher (and student).

    Fields left null take the method's reference value (``METHOD_DEFAULTS``) when the config is built.
    """

    # dda: DDA's synthesizer (a freshly initialised generator per round; rounds with the student fool a
    # rotation head on the student); cmi: CMI (the same, plus a contrastive term over a memory bank of
    # teacher features, and a masked-KL adversarial term); fast: Fast-Datafree's meta-generator, kept
    # across rounds and meta-learned (first-order MAML) from each round's few inner steps
    method: str = "dda"
    batch_size: int = 400  # images per synthesis round
    g_steps: int = 200  # optimisation steps per round (fast: a few, e.g. 2-10)
    lr_g: float = 1e-3  # generator learning rate (dda, cmi: the latents' too; cmi: its projection head's)
    lr_z: float = 0.01  # fast: latent learning rate
    bn_momentum: float = 0.9  # fast: momentum of the BN-statistics target across rounds, [0, 1); 0 turns it off
    meta_lr: float | None = None  # fast: meta-optimiser learning rate; None: lr_g * the round's g_steps (Fast's lr_g * iterations)
    nz: int = 256  # latent size
    ngf: int = 64  # generator width
    bn: float | None = None  # BatchNorm-statistics loss weight (null: dda 1, cmi 1, fast 10)
    oh: float | None = None  # one-hot cross-entropy weight (null: dda 1, cmi 1, fast 0.4)
    adv: float | None = None  # adversarial weight in rounds with the student (null: dda 10, cmi 0.5, fast 1.1)
    # the adversarial term: rotation = the student's rotation head's CE, maximised (DDA); kl = the KL between
    # teacher and student, maximised on the images both classify alike (CMI, Fast). null: the method's
    adv_term: str | None = None
    cr: float | None = None  # cmi: contrastive weight (CMI's scripts: 0.8); required for cmi
    cr_t: float = 0.2  # cmi: contrastive temperature (CMI's cr_T)
    cmi_bank_size: int = 40960  # cmi: memory bank of (local, global) teacher features, rows
    cmi_negatives: int = 4096  # cmi: negatives drawn from the memory bank per step
    cmi_head_dim: int = 256  # cmi: output size of the projection head
    init_rounds: int = 400  # rounds of the initial bank (no student, adv = 0; fast: its warm-up, no KD)
    init_batch_size: int = 200
    init_g_steps: int = 500
    rounds_per_epoch: int = 1  # synthesis rounds with the student per distillation epoch
    rotation_lr: float = 0.1  # rotation head SGD learning rate (DDA: the KD lr, 0.1; momentum 0.9, wd 1e-4)
    rotation_every: int = 1  # the rotation head takes an SGD step every k-th KD step (1: every step, as DDA; CPU budgets may thin it)
    # rotations of each KD image the head's step sees: 4 = all four (DDA); 1-3 = that many, drawn at random
    # per image (the same loss in expectation for views/4 of the student forward the step costs)
    rotation_views: int = 4
    bank_dir: str | None = None  # initial bank location (shared between runs); None: <run_dir>/bank

    def resolve(self) -> None:
        """Fill the fields left null with the method's reference values (an unknown method is left for validate)."""
        for name, value in METHOD_DEFAULTS.get(self.method, {}).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def validate(self, p: str) -> None:
        _check(self.method in SYNTHESIS_METHODS, f"{p}.method", self.method, f"one of {SYNTHESIS_METHODS}")
        if self.method == "cmi" and self.cr is None:
            raise ConfigError(
                f"{p}.method = 'cmi' now names CMI (contrastive model inversion), which needs {p}.cr (its scripts: 0.8); "
                f"the synthesizer this name meant before (a generator per round, rotation-adversarial head) is {p}.method = 'dda'"
            )
        self.resolve()
        for n in ("batch_size", "g_steps", "nz", "ngf", "init_batch_size", "init_g_steps", "cmi_bank_size", "cmi_negatives", "cmi_head_dim"):
            _check(getattr(self, n) >= 1, f"{p}.{n}", getattr(self, n), "an integer >= 1")
        _check(self.rotation_every >= 1, f"{p}.rotation_every", self.rotation_every, "an integer >= 1")
        _check(self.rotation_views in (1, 2, 3, 4), f"{p}.rotation_views", self.rotation_views, "1, 2, 3 or 4")
        for n in ("init_rounds", "rounds_per_epoch"):
            _check(getattr(self, n) >= 0, f"{p}.{n}", getattr(self, n), "an integer >= 0")
        for n in ("bn", "oh", "adv"):
            _check(getattr(self, n) >= 0, f"{p}.{n}", getattr(self, n), "a number >= 0")
        _check(self.adv_term in ADV_TERMS, f"{p}.adv_term", self.adv_term, f"null (the method's) or one of {ADV_TERMS}")
        _check(self.cr is None or self.cr >= 0, f"{p}.cr", self.cr, "null or a number >= 0 (cmi: required)")
        _check(self.cr is None or self.method == "cmi", f"{p}.cr", self.cr, "null unless method = 'cmi' (the contrastive term is CMI's)")
        _check(self.cr_t > 0, f"{p}.cr_t", self.cr_t, "a positive number")
        _check(self.lr_g > 0, f"{p}.lr_g", self.lr_g, "a positive number")
        _check(self.lr_z > 0, f"{p}.lr_z", self.lr_z, "a positive number")
        _check(0 <= self.bn_momentum < 1, f"{p}.bn_momentum", self.bn_momentum, "a number in [0, 1) (0 turns it off)")
        _check(self.meta_lr is None or self.meta_lr > 0, f"{p}.meta_lr", self.meta_lr, "null (lr_g * g_steps) or a positive number")


_STRENGTH_MEANING = {  # what augment.strength means, per backend (validation messages)
    "sd_image_variations": "below 1 SDEdits the original's VAE latent (this project's extension); 1 is the stock "
    "image-variation pipeline from pure noise, the paper's setting (with augment.guidance=3, augment.steps=25)",
    "": "the fraction of the noise schedule the original is pushed into before it is denoised back (SDEdit img2img; 1 is the maximum)",
}


@dataclass
class AugmentConfig:
    """Diffusion augmentation of synthetic images (DDA)."""

    backend: str = "local_prior"  # local_prior | sd_img2img | sd_image_variations
    model: str = "outputs/prior"  # from_pretrained path or hub id
    # (0, 1]. Below 1: SDEdit, the fraction of the noise schedule the image is pushed into before denoising (our extension
    # for sd_image_variations). 1: local_prior / sd_img2img: img2img's maximum, from the schedule's first timestep;
    # sd_image_variations: the stock image-variation pipeline from pure noise = the paper's setting (with guidance 3, steps 25).
    strength: float = 0.3
    guidance: float = 2.0  # classifier-free guidance scale (1 = no guidance)
    num_variations: int = 2
    steps: int = 10  # denoising steps for the full schedule
    seed: int = 0
    batch_size: int = 32
    dtype: str = "float32"  # float16 / bfloat16 on GPU
    device: str = "auto"  # auto | cpu | cuda
    xformers: bool = False
    prompt_template: str = "a photo of a {label}"
    cache_dir: str | None = None  # variation cache root; None: <run.output_dir>/cache/augment (shared by runs and trials)
    image_resolution: int | None = None  # SD backends: resize to this (None: the pipeline's)
    revision: str | None = None  # hub revision/branch of augment.model (None: the default branch)
    # Training of the local prior (jobs/train_prior.py; dda_ray/augment/prior.py, dda_ray/augment/prior_sources.py). Never data.path:
    # the synthetic bank, an unlabeled image folder, or photographs shipped inside installed packages.
    prior_source: str = "bank"  # bank (prior_bank) | folder (prior_folder) | photos (packaged natural photos)
    prior_bank: str | None = None  # synthetic bank directory to train on (or jobs/train_prior.py --bank DIR)
    prior_folder: str | None = None  # folder or .tar/.tar.gz/.tgz/.zip of unlabeled images (or jobs/train_prior.py --folder DIR)
    prior_labels: str = "teacher"  # folder/photos: teacher (its argmax on each crop) | none (null class: unconditional); bank: its labels | none
    prior_crop_scale: list[float] = field(default_factory=lambda: [0.02, 0.5])  # folder/photos: crop area as a fraction of the image's, [min, max]
    prior_color_jitter: float = 0.1  # folder/photos: brightness/contrast/saturation factors drawn from [1 - j, 1 + j] (0: off)
    prior_steps: int = 1000  # optimiser steps
    prior_batch_size: int = 64
    prior_lr: float = 5e-4  # AdamW, linear warm-up over the first 5 % of the steps, then constant
    prior_weight_decay: float = 0.0
    prior_channels: list[int] = field(default_factory=lambda: [32, 64, 64])  # UNet2DModel block widths
    prior_layers_per_block: int = 1
    prior_attention: bool = False  # self-attention at the second resolution (about 1.7x slower on CPU)
    prior_label_dropout: float = 0.1  # labels replaced by the null class: trains the unconditional branch of CFG
    prior_ema: float = 0.999  # EMA decay of the saved weights (0 disables EMA)
    prior_train_timesteps: int = 1000
    prior_hflip: bool = True  # random horizontal flips of the training images
    prior_log_every: int = 25  # steps between loss-log lines

    def validate(self, p: str) -> None:
        _check(self.backend in AUGMENT_BACKENDS, f"{p}.backend", self.backend, f"one of {AUGMENT_BACKENDS}")
        meaning = _STRENGTH_MEANING.get(self.backend, _STRENGTH_MEANING[""])
        _check(0 < self.strength <= 1, f"{p}.strength", self.strength, f"a number in (0, 1]: {meaning}")
        _check(0 <= self.guidance <= 50, f"{p}.guidance", self.guidance, "a number in [0, 50]")
        _check(self.num_variations >= 1, f"{p}.num_variations", self.num_variations, "an integer >= 1")
        _check(self.steps >= 1, f"{p}.steps", self.steps, "an integer >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.dtype in DTYPES, f"{p}.dtype", self.dtype, f"one of {DTYPES}")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"), f"{p}.device", self.device, "auto, cpu or cuda[:N]")
        _check(self.image_resolution is None or self.image_resolution >= 8, f"{p}.image_resolution", self.image_resolution, "null or an integer >= 8")
        _check("{label}" in self.prompt_template, f"{p}.prompt_template", self.prompt_template, "a string containing '{label}'")
        for n in ("prior_steps", "prior_batch_size", "prior_layers_per_block", "prior_train_timesteps", "prior_log_every"):
            _check(getattr(self, n) >= 1, f"{p}.{n}", getattr(self, n), "an integer >= 1")
        _check(self.prior_lr > 0, f"{p}.prior_lr", self.prior_lr, "a positive number")
        _check(self.prior_weight_decay >= 0, f"{p}.prior_weight_decay", self.prior_weight_decay, "a number >= 0")
        _check(0 <= self.prior_label_dropout < 1, f"{p}.prior_label_dropout", self.prior_label_dropout, "a number in [0, 1)")
        _check(0 <= self.prior_ema < 1, f"{p}.prior_ema", self.prior_ema, "a number in [0, 1) (0 disables EMA)")
        _check(self.prior_source in PRIOR_SOURCES, f"{p}.prior_source", self.prior_source, f"one of {PRIOR_SOURCES}")
        _check(self.prior_labels in PRIOR_LABELS, f"{p}.prior_labels", self.prior_labels, f"one of {PRIOR_LABELS}")
        scale = self.prior_crop_scale
        _check(
            len(scale) == 2 and 0 < scale[0] <= scale[1] <= 1,
            f"{p}.prior_crop_scale",
            scale,
            "[min, max] with 0 < min <= max <= 1 (fractions of the image area, e.g. [0.02, 0.5])",
        )
        _check(0 <= self.prior_color_jitter < 1, f"{p}.prior_color_jitter", self.prior_color_jitter, "a number in [0, 1) (0: off)")
        _check(
            len(self.prior_channels) >= 2 and all(c >= 4 and c % 4 == 0 for c in self.prior_channels),
            f"{p}.prior_channels",
            self.prior_channels,
            "a list of >= 2 block widths, each a multiple of 4 (e.g. [32, 64, 64])",
        )


@dataclass
class FilterConfig:
    """Cosine-similarity filter on teacher embeddings (variation vs its original)."""

    threshold: float = 0.8  # keep iff cos >= threshold; -1 keeps everything
    on_all_rejected: str = "warn"  # warn | error
    reference: str = "auto"  # auto: the bank's teacher_embedding when present, else recompute | recompute: always recompute
    grid_batches: int = 1  # image grids (original | variations, kept/rejected, score) per filter actor and epoch
    hist_bins: int = 10  # score histogram bins over [-1, 1] in the per-batch report

    def validate(self, p: str) -> None:
        _check(-1 <= self.threshold <= 1, f"{p}.threshold", self.threshold, "a number in [-1, 1]")
        _check(self.on_all_rejected in ("warn", "error"), f"{p}.on_all_rejected", self.on_all_rejected, "warn or error")
        _check(self.reference in ("auto", "recompute"), f"{p}.reference", self.reference, "auto or recompute")
        _check(self.hist_bins >= 1, f"{p}.hist_bins", self.hist_bins, "an integer >= 1")


@dataclass
class DistillConfig:
    """Knowledge distillation of the student (KL at temperature T + CE + feature alignment)."""

    epochs: int = 200
    steps_per_epoch: int | None = 2000  # None: exactly one pass over the training rows per epoch
    batch_size: int = 128
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4
    temperature: float = 20.0
    # KD loss = KL * T^2 + ce * CE(student, row labels) + fea * MSE(align(student map), teacher map), with the
    # reference's terms for the method that made the rows when null (KD_TERMS: dda CE 1 + feature 30, as DDA's
    # datafree_kd.py; cmi and fast KL only, as theirs); real_kd: CE 1 on the real labels + feature 30
    ce: float | None = None  # cross-entropy weight (labels = the synthesis targets, or the real labels)
    fea: float | None = None  # feature-alignment weight (the reference's layer: see models.ModelOutput.feature_map)
    # Mixing of each KD batch with a shuffled copy of itself (the teacher labels the mixed images):
    # none | cutmix (a box pasted from the partner) | mixup (a pixel blend); the CE term mixes the two labels.
    mix: str = "none"
    mix_alpha: float = 1.0  # the mixing ratio ~ Beta(alpha, alpha) (1: uniform)
    mix_prob: float = 1.0  # fraction of KD steps whose batch is mixed
    # Bank-format directories (round-*.parquet, e.g. photo crops from dda_ray.augment.crops.write_crop_bank)
    # whose rows join the KD pool every epoch beside the synthetic bank; in dda mode they are augmented too.
    extra_banks: list[str] = field(default_factory=list)
    # Speed switches of the KD step (same results up to float rounding):
    # NHWC memory format for the models and batches: what tensor cores want; ~1.3x faster on CPU but its CPU
    # convolution gradients are ~4x less precise, which cost the bench preset ~2 points (docs/BENCHMARKS.md)
    channels_last: bool = False
    amp: str = "none"  # none | bf16 | fp16: autocast of the forward passes (fp16 adds a gradient scaler); GPU runs
    compile: bool = False  # torch.compile the student (training) and teacher (labelling) forward passes
    compile_backend: str = "inductor"  # torch.compile backend (inductor needs a C++ compiler on CPU)

    def validate(self, p: str) -> None:
        _check(self.amp in AMP_MODES, f"{p}.amp", self.amp, f"one of {AMP_MODES}")
        _check(bool(self.compile_backend), f"{p}.compile_backend", self.compile_backend, "a torch.compile backend name")
        _check(self.mix in MIX_MODES, f"{p}.mix", self.mix, f"one of {MIX_MODES}")
        _check(self.mix_alpha > 0, f"{p}.mix_alpha", self.mix_alpha, "a positive number")
        _check(0 <= self.mix_prob <= 1, f"{p}.mix_prob", self.mix_prob, "a number in [0, 1]")
        _check(self.epochs >= 1, f"{p}.epochs", self.epochs, "an integer >= 1")
        _check(self.steps_per_epoch is None or self.steps_per_epoch >= 1, f"{p}.steps_per_epoch", self.steps_per_epoch, "null (one pass) or an integer >= 1")
        _check(self.batch_size >= 1, f"{p}.batch_size", self.batch_size, "an integer >= 1")
        _check(self.lr > 0, f"{p}.lr", self.lr, "a positive number")
        _check(self.temperature > 0, f"{p}.temperature", self.temperature, "a positive number")
        for n in ("ce", "fea"):
            _check(getattr(self, n) is None or getattr(self, n) >= 0, f"{p}.{n}", getattr(self, n), "null (the method's) or a number >= 0")
        _check(self.weight_decay >= 0, f"{p}.weight_decay", self.weight_decay, "a number >= 0")

    def resolve(self, mode: str, method: str) -> None:
        """Fill ``ce`` / ``fea`` left null with the reference's terms for the rows' maker (``KD_TERMS``)."""
        terms = KD_TERMS["dda"] if mode == "real_kd" else KD_TERMS.get(method, KD_TERMS["dda"])
        for name, value in terms.items():
            if getattr(self, name) is None:
                setattr(self, name, value)


@dataclass
class ResourcesConfig:
    """How work maps onto the Ray cluster. Pools are always bounded."""

    num_workers: int = 0  # Ray Train workers; 0 = local mode (no DDP, one process)
    use_gpu: bool = False
    cpus_per_worker: float = 0.5
    augment_actors: int = 1
    augment_gpus: float = 0.0  # GPUs per augmentation actor
    augment_cpus: float = 0.25
    filter_actors: int = 1
    filter_gpus: float = 0.0
    filter_cpus: float = 0.25
    # Host memory (GiB) Ray reserves per augment / filter actor, so a node gets no more actors than fit
    # (and Ray Data does not warn that they use more than they asked for). null: 2 GiB per augment
    # actor with the local prior, 10 with a Stable Diffusion backend; 1.5 GiB per filter actor.
    # read_memory_gb: per task reading the epoch's pool (the bank's Parquet rounds) into the stream.
    augment_memory_gb: float | None = None
    filter_memory_gb: float | None = None
    read_memory_gb: float = 1.0
    synthesis_tasks: int = 0  # initial bank: concurrent Ray tasks (0: in the driver, one round after another)
    synthesis_cpus: float = 1.0  # per synthesis task
    synthesis_gpus: float = 0.0  # per synthesis task
    fused_stages: bool = False  # one actor pool running augment then filter (stages.FusedStage), sized by augment_*
    # Custom Ray resources per augment/filter actor and per train worker, to pin each stage to its node
    # type (cluster/gpu.yaml: augment_gpu nodes offer {augment: 1}, train_gpu nodes {train: 4}).
    augment_resources: dict = field(default_factory=dict)  # e.g. {augment: 1}; the fused pool uses these too
    filter_resources: dict = field(default_factory=dict)
    worker_resources: dict = field(default_factory=dict)  # e.g. {train: 1}
    torch_threads: int = 0  # 0: leave torch's default
    max_failures: int = 1  # Ray Train restarts from the last checkpoint after a worker failure
    max_concurrent_trials: int | None = None  # Tune; None: derived from the above

    def validate(self, p: str) -> None:
        _check(self.num_workers >= 0, f"{p}.num_workers", self.num_workers, "an integer >= 0")
        for n in ("augment_actors", "filter_actors"):
            _check(1 <= getattr(self, n) <= 1024, f"{p}.{n}", getattr(self, n), "an integer in [1, 1024] (pools are bounded)")
        _check(0 <= self.synthesis_tasks <= 1024, f"{p}.synthesis_tasks", self.synthesis_tasks, "an integer in [0, 1024] (0: in the driver)")
        for n in ("cpus_per_worker", "augment_gpus", "augment_cpus", "filter_gpus", "filter_cpus", "synthesis_cpus", "synthesis_gpus"):
            _check(getattr(self, n) >= 0, f"{p}.{n}", getattr(self, n), "a number >= 0")
        for n in ("augment_memory_gb", "filter_memory_gb", "read_memory_gb"):
            v = getattr(self, n)
            _check(v is None or v > 0, f"{p}.{n}", v, "null (a default for the backend) or a number of GiB > 0")
        for n in ("augment_resources", "filter_resources", "worker_resources"):
            for key, amount in getattr(self, n).items():
                _check(
                    isinstance(key, str) and key not in ("CPU", "GPU", "memory"),
                    f"{p}.{n}",
                    key,
                    "custom resource names (CPU/GPU are set by the *_cpus / *_gpus / use_gpu fields)",
                )
                _check(
                    isinstance(amount, (int, float)) and not isinstance(amount, bool) and amount >= 0,
                    f"{p}.{n}.{key}",
                    amount,
                    "a number >= 0",
                )


@dataclass
class TrackingConfig:
    """MLflow tracking. ``uri=None`` uses MLFLOW_TRACKING_URI or a sqlite store in output_dir."""

    enabled: bool = True
    uri: str | None = None
    experiment: str = "dda_ray"
    on_unreachable: str = "fail"  # fail | warn
    register_as: str | None = None  # model registry name for the job's MLflow Model (student; teacher; tune: best trial's)

    def validate(self, p: str) -> None:
        _check(self.on_unreachable in ("fail", "warn"), f"{p}.on_unreachable", self.on_unreachable, "fail or warn")
        name = self.register_as
        _check(name is None or bool(str(name).strip()), f"{p}.register_as", name, "null or a non-empty name")
