"""Typed run configuration: nested dataclasses, YAML files, `key.sub=value` overrides.

Each field carries a one-line docstring (the string right under it);
docs/configuration.md is generated from them (`python -m train.config --markdown`),
and a test keeps it current.
OmegaConf structured configs do the merging and type checking; `validate`
then checks values and ties between fields, before any work starts.
"""

from __future__ import annotations

import ast
import inspect
import sys
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.acquisition import AcquisitionRanges
from pipeline.collection import CollectionError
from pipeline.collection import parse as parse_collections


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or impossible; the message names the key."""


@dataclass
class DataConfig:
    shards: Any = "shards/covid19"
    """Shard folder or URL prefix holding manifest.json, or a list `[{path, weight, name}]` to mix (docs/pipeline)."""
    balance: str = "none"
    """Equal draws per stratum within each collection: none, class, source (from the json) or source_class."""
    epoch_samples: int | None = None
    """Draws per train epoch, shared by collection weight; null: as many as the collections hold."""
    image_size: int = 299
    """Training resolution; images are resized on the device when it differs from the shards'."""
    classes: list[str] | None = None
    """Class names in label order (null: the first collection's); collections match them by name, or are refused."""
    stored_size: int | None = None
    """Image side stored in the shards; null takes the manifest's (set it to refuse other shards)."""
    num_workers: int = 4
    """Loader processes per rank reading shards."""
    shared_memory: bool = True
    """Batch ring in /dev/shm (workers x (2 + 2) x batch x side^2 B per loader); false pickles batches instead."""
    shuffle_buffer: int = 2000
    """Streamed shards only: samples per shuffle window of a loader worker (local shards shuffle globally)."""
    drop_last: bool = False
    """Cut each train epoch to whole global batches instead of padding it with repeats."""
    cache_dir: str | None = None
    """Local folder caching remote shards, so later epochs read local disk."""
    strict: bool = False
    """Raise on a corrupt training shard instead of skipping it with a warning."""
    verify_checksums: bool = True
    """Check shards against the manifest's sha256: local ones once per run (~1 s/GB), remote ones when cached."""
    rotation_degrees: float = 10.0
    """Random rotation range (+/- degrees) of the training augmentation."""
    hflip_p: float = 0.5
    """Probability of a horizontal flip in the training augmentation."""
    mask_lungs: bool = False
    """Zero everything outside the lung mask (needs shards built with --include-masks)."""
    warp: str = "torch"
    """Flip+rotation warp of the training augmentation: torch (affine_grid + grid_sample) or kornia; same pixels."""
    crop: str = "none"
    """lungs: cut every film to a square around its lung mask's box, in training, evaluation and prediction."""
    crop_margin: float = 0.1
    """Margin of the lung crop on each side, as a fraction of the box's larger side."""
    warp_at: str = "stored"
    """Where the train warp (flip, rotation, zoom, shift) runs: stored (the stored side, then the resize) or
    training (after the resize, at data.image_size: fewer pixels, the same draws; off in the seed recipe)."""
    lung_model: str = ""
    """A lung segmenter file (python -m train.lungs fit), named in the model card: prediction on image files
    runs it for the masks that data.crop=lungs and data.mask_lungs read."""


@dataclass
class AcquisitionConfig:
    gamma: float = 0.0
    """Training only, per film (0 = off): tone curve x**gamma with gamma = exp(U(-g, g))."""
    contrast: float = 0.0
    """Contrast factor 1 + U(-c, c) about the film's mean (c < 1)."""
    brightness: float = 0.0
    """Brightness shift U(-b, b) in [0, 1] grey units."""
    blur: float = 0.0
    """Blur or sharpen: s = U(-k, k); s > 0 Gaussian blur of sigma s px, s < 0 unsharp mask of amount -s (k < 1.33)."""
    noise: float = 0.0
    """Gaussian grain of standard deviation U(0, n) in [0, 1] grey units."""
    resample: float = 0.0
    """Down-and-up resampling through a resolution factor in [1 - r, 1] (4 levels; r < 1)."""
    zoom: float = 0.0
    """Random resized crop: scale 1 + U(-z, z) about the centre, in the flip/rotation warp (z < 1)."""
    shift: float = 0.0
    """And a translation U(-t, t) times the side in x and y (t < 0.5)."""


@dataclass
class ModelConfig:
    name: str = "resnet18"
    """Any timm model name."""
    pretrained: str = "false"
    """'false', 'true' (timm hub weights; needs internet) or a path to a local .safetensors/.pth file."""
    num_classes: int | None = None
    """Output classes; null takes the manifest's class count (set it to refuse other shards)."""
    drop_rate: float = 0.0
    """Dropout before the classifier."""
    channels_last: bool = True
    """Use the channels_last memory format (faster convolutions on GPUs)."""
    compile: bool = False
    """Wrap the model in torch.compile."""


@dataclass
class OptimConfig:
    name: str = "adam"
    """Optimizer: adam, adamw or sgd."""
    lr: float = 1e-3
    """Learning rate for the global batch (scale it yourself when changing GPU count)."""
    weight_decay: float = 0.0
    """Weight decay."""
    momentum: float = 0.9
    """SGD momentum."""
    scheduler: str = "none"
    """LR schedule: none, cosine (with warmup), step or plateau."""
    warmup_epochs: int = 0
    """Linear warmup epochs for the cosine schedule (a run shorter than that stays in warmup)."""
    step_size: int = 10
    """Epochs between LR drops for the step schedule."""
    gamma: float = 0.1
    """LR factor of the step and plateau schedules."""
    class_weights: bool = False
    """Weight the loss by inverse class frequency from the manifest's train counts."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""


@dataclass
class TrainConfig:
    epochs: int = 50
    """Maximum epochs."""
    batch_size: int = 32
    """Batch size per device (global batch = batch_size x processes x grad_accum)."""
    grad_accum: int = 1
    """Gradient accumulation steps."""
    patience: int = 5
    """Early stopping: stop after this many epochs without improvement of `monitor`."""
    monitor: str = "val_loss"
    """Early stopping and best model: val_loss, val_accuracy, val_macro_f1, val_balanced_accuracy or
    val_worst_source_balanced_accuracy (the worst validation source's, sources of 10+ films; one: overall)."""
    min_delta: float = 0.0
    """Smallest change of `monitor` that counts as an improvement."""
    seed: int = 42
    """Seed of model init, shuffling and augmentation."""
    output_dir: str = "runs/default"
    """Run folder: config.yaml, metrics.jsonl, models/, reports."""
    resume: str = ""
    """'' (fresh run), 'auto' (output_dir/models/checkpoint.pth if present) or a checkpoint path."""
    mixed_precision: str = ""
    """'' (take the launcher's --mixed_precision), no, fp16 or bf16."""
    max_steps_per_epoch: int | None = None
    """Cap on training steps per epoch (quick experiments); None = a full pass."""
    checkpoint_every_steps: int = 0
    """Also checkpoint every this many steps inside an epoch, so a resume continues mid-epoch (0 = off)."""
    log_every: int = 20
    """Steps between progress-bar and TensorBoard step updates."""
    timeout_s: int = 600
    """Process-group timeout: a rank waiting longer on a dead peer exits with an error."""
    deterministic: bool = False
    """Deterministic torch kernels and no cuDNN autotuning, for bit-reproducible GPU runs (slower on GPU)."""


@dataclass
class EvalConfig:
    batch_size: int = 64
    """Batch size per device for validation, test and prediction."""
    test_at_end: bool = True
    """Evaluate the best model on the test split when training ends and write the report."""
    gradcam_per_class: int = 3
    """Grad-CAM examples per class in the report grid (0 = none)."""
    bootstrap_resamples: int = 2000
    """Stratified bootstrap resamples for the report's 95 % confidence intervals (0 = none)."""
    target_sensitivity: float = 0.95
    """Sensitivity the `target_sensitivity` operating point must reach on validation (per class)."""
    overlap_distance: int | None = 6
    """External tests: pHash bits (of 256) within which a film near-copies a training film (null: exact only)."""


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    """Write TensorBoard scalars to output_dir/tb."""
    progress: bool = True
    """Show progress bars (rank 0 only)."""


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    """Shards, loading and augmentation."""
    acquisition: AcquisitionConfig = field(default_factory=AcquisitionConfig)
    """Acquisition-robust augmentation: how another machine might have taken each training film (all off)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Network."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer, schedule and loss."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, early stopping, checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Evaluation and reports."""
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    """Logging."""


_CHOICES = {
    "optim.name": ("adam", "adamw", "sgd"),
    "optim.scheduler": ("none", "cosine", "step", "plateau"),
    "train.monitor": (
        "val_loss",
        "val_accuracy",
        "val_macro_f1",
        "val_balanced_accuracy",
        "val_worst_source_balanced_accuracy",
    ),
    "train.mixed_precision": ("", "no", "fp16", "bf16"),
    "data.warp": ("torch", "kornia"),
    "data.balance": ("none", "class", "source", "source_class"),
    "data.crop": ("none", "lungs"),
    "data.warp_at": ("stored", "training"),
}
_POSITIVE = (
    "data.image_size",
    "data.stored_size",
    "data.epoch_samples",
    "model.num_classes",
    "optim.lr",
    "train.epochs",
    "train.batch_size",
    "train.grad_accum",
    "train.patience",
    "train.log_every",
    "train.timeout_s",
    "eval.batch_size",
    "optim.step_size",
)
_NON_NEGATIVE = (
    "eval.bootstrap_resamples",
    "data.num_workers",
    "data.shuffle_buffer",
    "train.checkpoint_every_steps",
    "optim.weight_decay",
    "optim.warmup_epochs",
    "train.min_delta",
    "eval.gradcam_per_class",
    "data.rotation_degrees",
)


def _get(cfg: Config, dotted: str) -> Any:
    obj: Any = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config) -> Config:
    """Check values and ties between fields; raise ConfigError naming the key."""
    for key, choices in _CHOICES.items():
        if _get(cfg, key) not in choices:
            raise ConfigError(f"{key}={_get(cfg, key)!r} is not one of {list(choices)}")
    for key in _POSITIVE:
        if _get(cfg, key) is not None and not _get(cfg, key) > 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be > 0")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be >= 0")
    for key in (
        "data.hflip_p",
        "data.crop_margin",
        "optim.label_smoothing",
        "model.drop_rate",
        "eval.target_sensitivity",
    ):
        if not 0.0 <= _get(cfg, key) <= 1.0:
            raise ConfigError(f"{key}={_get(cfg, key)!r} must be within [0, 1]")
    if cfg.eval.overlap_distance is not None and not 0 <= cfg.eval.overlap_distance <= 256:
        raise ConfigError(
            f"eval.overlap_distance={cfg.eval.overlap_distance} must be within [0, 256] (pHash bits) or null"
        )
    try:
        acquisition_ranges(cfg)
    except ValueError as exc:
        raise ConfigError(f"acquisition.{exc}") from None
    if cfg.data.rotation_degrees > 180:
        raise ConfigError(f"data.rotation_degrees={cfg.data.rotation_degrees} must be <= 180")
    if cfg.train.max_steps_per_epoch is not None and cfg.train.max_steps_per_epoch <= 0:
        raise ConfigError("train.max_steps_per_epoch must be > 0 or null")
    pretrained = cfg.model.pretrained
    if pretrained.lower() not in ("true", "false") and not Path(pretrained).is_file():
        raise ConfigError(f"model.pretrained={pretrained!r} is neither true/false nor an existing weights file")
    if not cfg.train.output_dir:
        raise ConfigError("train.output_dir must not be empty")
    return _with_collections(cfg)


def acquisition_ranges(cfg: Config) -> AcquisitionRanges:
    """The run's acquisition augmentation ranges (ValueError naming the key when one is out of range)."""
    return AcquisitionRanges(**asdict(cfg.acquisition))


def _with_collections(cfg: Config) -> Config:
    """`data.shards` checked (names, weights, keys) and, for several collections, written out in full."""
    try:
        collections = parse_collections(cfg.data.shards)
    except CollectionError as exc:
        raise ConfigError(f"data.shards: {exc}") from None
    if isinstance(cfg.data.shards, str):
        return cfg
    shards = [{"name": c.name, "path": c.shards, "weight": c.weight} for c in collections]
    return replace(cfg, data=replace(cfg.data, shards=shards))


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides, typed and validated."""
    schema = OmegaConf.structured(Config)
    try:
        layers = [schema]
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
            layers.append(OmegaConf.load(path))
        for item in overrides:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key.sub=value")
        if overrides:
            layers.append(OmegaConf.from_dotlist(list(overrides)))
        merged = OmegaConf.merge(*layers)
        cfg = OmegaConf.to_object(merged)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None)
        reason = str(exc).splitlines()[0]
        raise ConfigError(f"{key}: {reason}" if key else reason) from None
    return validate(cfg)  # type: ignore[arg-type]


def _known(data: Any, schema: Any) -> Any:
    """`data` without the keys `schema` lacks (a config written by another version)."""
    if not isinstance(data, dict) or not is_dataclass(schema):
        return data
    names = {f.name for f in fields(schema)}
    return {k: _known(v, getattr(schema, k)) for k, v in data.items() if k in names}


def config_from_dict(data: dict) -> Config:
    """A validated Config from a saved dict (a model card's), ignoring keys this version does not know."""
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), _known(data, Config())))
    except OmegaConfBaseException as exc:
        raise ConfigError(str(exc).splitlines()[0]) from None
    return validate(cfg)  # type: ignore[arg-type]


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def field_docs(cls: type) -> dict[str, str]:
    """The attribute docstrings of a dataclass, read from its source."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(str(nxt.value.value).split())  # type: ignore[union-attr]
    return docs


def reference_markdown() -> str:
    """Markdown table of every key, default and docstring, for docs/configuration.md."""
    lines = ["| key | default | meaning |", "| --- | --- | --- |"]
    defaults = Config()
    for section in fields(Config):
        cls = type(getattr(defaults, section.name))
        docs = field_docs(cls)
        for f in fields(cls):
            value = getattr(getattr(defaults, section.name), f.name)
            shown = (
                "null"
                if value is None
                else repr(value)
                if isinstance(value, str)
                else str(value).lower()
                if isinstance(value, bool)
                else value
            )
            lines.append(f"| `{section.name}.{f.name}` | `{shown}` | {docs.get(f.name, '')} |")
    return "\n".join(lines) + "\n"


def _all_fields_documented() -> list[str]:
    missing = []
    for section in fields(Config):
        cls = section.default_factory  # type: ignore[misc]
        assert is_dataclass(cls)
        docs = field_docs(cls)  # type: ignore[arg-type]
        missing += [f"{section.name}.{f.name}" for f in fields(cls) if f.name not in docs]  # type: ignore[arg-type]
    return missing


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(reference_markdown(), end="")
    else:
        print(to_yaml(load_config(sys.argv[1] if len(sys.argv) > 1 else None, sys.argv[2:])), end="")
