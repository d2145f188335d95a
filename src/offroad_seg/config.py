"""The settings of every stage, with their defaults: the one place defaults live.

Each stage takes one frozen dataclass (`extract(ExtractConfig)`, `train(TrainConfig)`, ...).
The CLI builds them and reads its displayed defaults from here; this module imports nothing
heavy, so `offroad-seg --help` does not load torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING

from offroad_seg.errors import ConfigError

if TYPE_CHECKING:  # annotations only: storage imports zarr, which --help need not load
    from offroad_seg.core.storage import CachePath


# The seed's working size: (540/2)//14*14 x (960/2)//14*14, a 19x34 token grid of DINOv2's
# 14-pixel patches (DINOv3's 16-pixel patches default to 272x480: models.variants.DEFAULT_SIZES).
DEFAULT_SIZE = (266, 476)

# The seed's backbone (a name in models.variants.BACKBONES)
DEFAULT_BACKBONE = "dinov2_vits14"

# evaluate/predict: at most this many per-image files in one output folder; a run of more
# images nests them (data.layout: by the inputs' subfolders, then in numbered folders of
# this many), since file systems list huge folders slowly and tools choke on them.
OUTPUTS_PER_FOLDER = 10_000
# The feature cache format new caches are written in: 2 packs chunks into shards (zarr's sharding
# codec, ~64x fewer files); 1 is one file per chunk. Both are read (features/cache_format.py).
CACHE_VERSION = 2

# Inference engines of evaluate and predict (engines.py); None in a config: by the head's file
# type (torch for a .pth checkpoint, onnxruntime for an exported .onnx)
ENGINES = ("torch", "onnxruntime")


def default(config: type, name: str):
    """A config field's default value (for the CLI's option defaults)."""
    for f in fields(config):
        if f.name == name:
            return f.default
    raise KeyError(f"{config.__name__} has no field {name!r}")


@dataclass(frozen=True)
class ExtractConfig:
    data_dir: Path
    cache: CachePath
    weights: str | None = "auto"  # a file, 'auto' (the documented search order) or 'random'
    backbone: str = DEFAULT_BACKBONE  # a name in variants.BACKBONES
    # None: the backbone family's default (variants.DEFAULT_SIZES: DEFAULT_SIZE for DINOv2,
    # 272x480 for DINOv3); any size must be a multiple of the backbone's patch (14 or 16)
    size: tuple[int, int] | None = None
    layers: int = 1
    # a block cache: the tokens entering block K (block K-1's output, before the final norm;
    # class, register/storage and patch tokens) instead of the final features; None: features
    block: int | None = None
    views: tuple[str, ...] = ("identity",)
    device: str = "auto"
    batch_size: int | None = None  # None: by device (8 on CPU, 64 on CUDA)
    workers: int | None = None  # None: a sensible default for the device
    dtype: str = "float16"  # float16, float32, or int8 (per-token scales, see quantize.py)
    images_per_chunk: int = 0  # 0: ~1 MiB feature chunks
    cache_version: int = CACHE_VERSION  # 1: one file per chunk; 2: chunks packed in shards
    chunks_per_shard: int = 0  # format 2; 0: ~64 MiB of features per shard
    class_map: str | Path | None = None  # a built-in name (default, hackathon) or a JSON file
    ignore_unknown_codes: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class TrainConfig:
    caches: tuple[CachePath, ...]
    out: Path
    val_cache: CachePath | None = None
    preset: str | None = None  # a name in PRESETS: its values replace the defaults below
    # upnext (width 96, depth 2) at batch 2: the best semantic-proxy val mIoU of
    # bench/head_study.py among the heads whose cached epoch is >= 20x faster than the seed's
    # online one on a 2-core CPU (0.559 +- 0.007; pyramid w96 0.512 +- 0.006 at 12x the cost;
    # the head study in docs/heads-and-losses.md)
    head: str = "upnext"  # a name in heads.HEADS
    width: int = 0  # 0: the head's default
    depth: int = 0
    dropout: float | None = None  # None: the head's default
    epochs: int = 20
    batch_size: int = 2  # batch 8 lost 0.04-0.07 mIoU for every head in 20 epochs
    lr: float = 3e-4
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    loss: str = "ce"  # a loss.LossSpec text, e.g. "ce+0.5dice"
    focal_gamma: float = 2.0
    class_weights: str = "auto"  # "auto", "none" or comma-separated floats
    seed: int = 0
    device: str = "auto"
    memory_budget_gb: float | None = None  # None: half the free RAM (or GPU memory)
    stream: bool = False  # force streaming from zarr
    shuffle_window: int = 16  # chunks mixed together when streaming
    # early stopping: stop once val mIoU has not improved for this many epochs (0: off)
    patience: int = 0
    # an exponential moving average of the head's weights, updated after every step with
    # this decay (0: off); validation and the saved head use the averaged weights
    ema: float = 0.0
    tensorboard: Path | None = None  # a folder for TensorBoard event files (None: none)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    # Tuning the last blocks from a block cache (`extract --block K`, docs/tuning.md): None
    # trains the head alone (on a block cache: on frozen blocks K..N-1), "lora" adapters on
    # those blocks' attention and MLP layers, "full" their weights; both with the final norm
    tune: str | None = None
    lora_rank: int = 8
    lora_alpha: float = 16.0  # the adapters' update is scaled by alpha / rank
    # the tuned blocks' (and final norm's) peak learning rate; None: --lr for LoRA, a tenth of
    # it for full tuning (pretrained weights move less than new ones)
    backbone_lr: float | None = None
    checkpointing: bool = False  # recompute the tuned blocks' activations in the backward pass
    weights: str | None = None  # block caches: None for the cache's own weights file, as evaluate


TUNE_MODES = ("lora", "full")
FULL_TUNING_LR_FACTOR = 0.1  # --backbone-lr's default for --tune full, as a fraction of --lr


# The settings that make a training run what it is: a resumed run keeps them, and a preset
# sets some of them. The others say where data and outputs are and how to run on this machine.
RUN_SETTINGS = (
    "preset",
    "head",
    "width",
    "depth",
    "dropout",
    "epochs",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "loss",
    "focal_gamma",
    "class_weights",
    "seed",
    "shuffle_window",
    "tune",
    "lora_rank",
    "lora_alpha",
    "backbone_lr",
    "patience",
    "ema",
)

# Named sets of run settings. `seed` reproduces the hackathon's training: its head, batch 2,
# AdamW at 3e-4 for 20 epochs, class-weighted cross entropy (the schedule is ours: one warmup
# epoch, then cosine).
PRESETS: dict[str, dict[str, object]] = {
    "seed": {
        "head": "seed",
        "batch_size": 2,
        "lr": 3e-4,
        "epochs": 20,
        "loss": "ce",
        "class_weights": "auto",
        "dropout": 0.0,
    },
}


def apply_preset(cfg: TrainConfig) -> TrainConfig:
    """The config with its preset's values in the settings left at their defaults (a setting
    given explicitly wins over the preset)."""
    if cfg.preset is None:
        return cfg
    if cfg.preset not in PRESETS:
        raise ConfigError(f"preset {cfg.preset!r}: expected one of {', '.join(PRESETS)}")
    changes = {
        name: value
        for name, value in PRESETS[cfg.preset].items()
        if getattr(cfg, name) == default(TrainConfig, name)
    }
    return replace(cfg, **changes)


@dataclass(frozen=True)
class EvalConfig:
    head: Path
    data_dir: Path
    out: Path
    weights: str | None = None  # None: the head's own weights source when it is available
    batch_size: int | None = None  # None: by device (8 on CPU, 64 on CUDA)
    workers: int | None = None
    device: str = "auto"
    comparisons: int = 10  # comparison panels for the first N images; 0 for none
    tta: str = "none"  # "flip": average the logits of the image and its mirror
    tta_scales: tuple[float, ...] = (1.0,)  # working-size scales whose logits are averaged
    engine: str | None = None  # one of ENGINES; None: by the head's file type
    write_masks: bool = True
    class_map: str | Path | None = None  # when given (name or file), must equal the head's
    ignore_unknown_codes: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class PredictConfig:
    head: Path
    inputs: tuple[Path, ...]
    out: Path
    weights: str | None = None
    batch_size: int | None = None  # None: by device (8 on CPU, 64 on CUDA)
    workers: int | None = None
    device: str = "auto"
    tta: str = "none"
    tta_scales: tuple[float, ...] = (1.0,)
    engine: str | None = None  # one of ENGINES; None: by the head's file type
    overlays: bool = True  # overlays with a legend (images), an overlay video (videos)
    frame_stride: int = 1  # videos: predict every N-th frame
    # probs/STEM.npy per image: float16 (K, H, W) class probabilities at the image's size
    save_probs: bool = False
    overwrite: bool = False
    progress: bool = True


@dataclass(frozen=True)
class ExportConfig:
    head: Path  # a head checkpoint (.pth)
    out: Path  # the .onnx file to write
    weights: str | None = None  # None: the head's own weights source, as for evaluate
    size: tuple[int, int] | None = None  # None: the head's working size
    batch: int | None = 1  # images per call; None: dynamic (any batch size)
    argmax: bool = False  # add an `ids` output: uint8 class ids at the input size
    quantize: str = "none"  # "dynamic": int8 weights, activations quantised per call
    overwrite: bool = False


@dataclass(frozen=True)
class DemoConfig:
    out: Path = Path("offroad-seg-demo")
    train: int = 32
    val: int = 8
    width: int = 960
    height: int = 540
    size: tuple[int, int] = DEFAULT_SIZE
    epochs: int = 20
    weights: str | None = None  # None: real weights if found offline, else random
    head: str = default(TrainConfig, "head")  # a name in heads.HEADS
    seed: int = 0
    progress: bool = True


@dataclass(frozen=True)
class SweepConfig:
    """A sweep: trainings of `train` (its caches, validation cache and fixed settings) with
    the searched settings replaced per trial; `train.out` is the sweep's folder."""

    train: TrainConfig
    grid: tuple[str, ...] = ()  # "lr=1e-4,3e-4": every combination is one trial
    ranges: tuple[str, ...] = ()  # "lr=1e-5:1e-2:log", "width=32:256:int": sampled (TPE)
    choices: tuple[str, ...] = ()  # "head=convnext,pyramid": sampled categories
    trials: int | None = None  # sampled searches: how many trials in all
    prune: bool = False  # stop clearly bad trials early (median rule on val mIoU per epoch)
    storage: str | None = None  # an Optuna storage URL; default sqlite in the sweep's folder
    sampler_seed: int = 0
    overwrite: bool = False
    # > 0: bundle the best K finished trials into OUT/ensemble.pth and score it on the
    # validation cache beside the best trial (not part of the sweep's identity: a rerun of a
    # finished sweep with it only writes the ensemble)
    ensemble_top: int = 0
    # A running trial records a heartbeat in the study every `heartbeat_s`; one silent for
    # `stale_after_s` (its machine died or lost the database) is failed and retried by any
    # process of the sweep. Generous: a trial wrongly declared dead is trained twice.
    heartbeat_s: int = 30
    stale_after_s: int = 300

    @property
    def out(self) -> Path:
        return self.train.out


# Synthetic scenes (offroad-seg synth, the demo): the smallest size that fits every class.
MIN_WIDTH = 64
MIN_HEIGHT = 48


@dataclass(frozen=True)
class SynthConfig:
    """What `synthesize` writes: `out/train` and `out/val` with `train` and `val` scenes."""

    out: Path
    train: int = 24
    val: int = 8
    seed: int = 0
    width: int = 960
    height: int = 540

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.seed < 0:
            raise ConfigError(f"synthetic data: seed {self.seed} is negative")
        if self.train < 1 or self.val < 1:
            raise ConfigError(
                f"synthetic data: train={self.train} and val={self.val} must both be at least 1"
            )
        check_synth_size(self.width, self.height)


def check_synth_size(width: int, height: int) -> None:
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ConfigError(
            f"synthetic data: size {width}x{height} is too small; at least {MIN_WIDTH}x{MIN_HEIGHT}"
        )
