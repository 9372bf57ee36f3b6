"""The train job's options: one frozen ``TrainOptions`` holding the ``TrainConfig`` the workers
train with (which holds the ``SATLossConfig``), the flat setting names the flags of
``jobs/train_sat.py`` are derived from, and the checks and resolutions the driver makes
before anything starts."""
from __future__ import annotations

import hashlib
import json
import typing
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, NamedTuple


from model.factory import model_kwargs as resolve_model_kwargs
from model.factory import PRETRAINED_BACKBONES, split_name
from model.losses import SATLossConfig
from model.precision import resolve_precision
from pipeline.data.preprocess import train_resize_size
from pipeline.train.loader import auto_loader_workers, parse_loader_workers
from pipeline.train.loop import TrainConfig
from pipeline.evaluation.threshold import THRESHOLD_METRICS

# Options that may change between a run and its resumption; all others must match.
RESUMABLE_CHANGES = {"num_workers", "use_gpu", "max_failures", "output", "threshold_metric",
                     "stop_after_epochs", "verbose", "ray_temp_dir", "name", "storage_path",
                     "cpus_per_worker", "ray_log_level", "recipe", "loader_workers"}

# TrainConfig fields the job sets itself: the class count from the shards, the precision
# from TrainOptions.precision and the device, mean/std from the model's preprocessing.
JOB_SET_FIELDS = ("num_classes", "precision", "mean", "std")
# The SAT loss settings a run chooses (the smoothing kernel is the official one, fixed).
LOSS_SETTINGS = ("alpha", "area_weight", "norm_weight", "area_mode")


@dataclass(frozen=True)
class TrainOptions:
    """Everything ``jobs/train_sat.py`` takes: the data and outputs, the training config
    (``train``), the requests the job resolves into it, and how the job runs.

    The flags are the flat setting names with dashes (``--lr``, ``--alpha``, ``--num-workers``);
    ``from_settings`` builds options from those names and ``settings`` gives them back.
    In ``train``, ``num_classes`` and ``precision`` are placeholders: the job sets them from
    the shards and from ``precision`` below (``auto`` needs the device).
    """

    train_shards: str
    val_shards: str
    output: str
    storage_path: str
    train: TrainConfig = field(default_factory=TrainConfig)
    name: str | None = None  # default: derived from the options, so a rerun resumes
    recipe: str | None = None  # the --recipe these settings came from (recorded, not applied here)
    # Requests resolved into the TrainConfig the workers get (run_config):
    method: str | None = None  # sat|cam: replaces the model name's method prefix
    img_size: int | None = None  # into model_kwargs
    precision: str = "auto"  # bf16 on CUDA and native-bf16 CPUs, else fp32 (model.precision)
    # The job:
    images_per_class: int | None = None
    num_workers: int = 2
    use_gpu: bool = False
    threshold_metric: str = "gt_known"
    max_failures: int = 0
    shuffle_buffer: int = 1000
    val_batch_size: int = 64
    stop_after_epochs: int | None = None  # tests only: fail on purpose after this many epochs
    verbose: bool = True
    ray_temp_dir: str | None = None  # for an in-process cluster started here
    cpus_per_worker: float | None = None  # Ray's default (1) unless set; torch uses as many threads
    # Decode-and-augment processes per worker: "auto" (pipeline.train.loader.auto_loader_workers:
    # CPUs - 1 on a GPU worker, CPUs // 4 on a CPU one) or a count; 0 decodes in a thread.
    loader_workers: str | int = "auto"
    ray_log_level: str = "WARNING"  # Ray Train's own logs (INFO shows every report)

    @classmethod
    def from_settings(cls, **settings: Any) -> "TrainOptions":
        """Options from flat settings named as the flags are (``lr=1e-4, alpha=0.25,
        num_workers=8``), as recipes and the command line give them. A bare backbone as
        ``model`` gets the ``sat_`` prefix (``method`` can still replace it)."""
        loss = {k: settings.pop(k) for k in LOSS_SETTINGS if k in settings}
        train = {k: settings.pop(k) for k in train_setting_names() if k in settings}
        if "model" in train:
            train["model"] = resolve_model_name(train["model"], None)
        return cls(**settings, train=TrainConfig(**train, loss=SATLossConfig(**loss)))

    def settings(self) -> dict[str, Any]:
        """The flat settings (``from_settings``'s inverse): what the run record stores."""
        train = self.train.to_dict()
        flat = {k: train[k] for k in (*train_setting_names(), *LOSS_SETTINGS)}
        flat.update({f.name: getattr(self, f.name) for f in fields(self) if f.name != "train"})
        return flat


def train_setting_names() -> tuple[str, ...]:
    """The TrainConfig fields a run chooses (flags), in declaration order."""
    return tuple(f.name for f in fields(TrainConfig) if f.name not in (*JOB_SET_FIELDS, "loss"))


class Setting(NamedTuple):
    kind: type  # int, float, str, bool or dict (``X | None`` gives X)
    default: Any
    required: bool


def setting_fields() -> dict[str, Setting]:
    """Each flat setting's type and default, read from the fields of TrainConfig,
    SATLossConfig and TrainOptions: what jobs/train_sat.py derives its flags from."""
    job = tuple(f.name for f in fields(TrainOptions) if f.name != "train")
    out: dict[str, Setting] = {}
    for cls, names in ((TrainConfig, train_setting_names()), (SATLossConfig, LOSS_SETTINGS), (TrainOptions, job)):
        hints = typing.get_type_hints(cls)
        for f in fields(cls):
            if f.name not in names:
                continue
            kinds = [k for k in typing.get_args(hints[f.name]) if k is not type(None)] or [hints[f.name]]
            required = f.default is MISSING and f.default_factory is MISSING
            default = f.default_factory() if f.default_factory is not MISSING else None if required else f.default
            out[f.name] = Setting(kinds[0], default, required)
    return out


# --- resolving and checking options ----------------------------------------------------


def resolve_model_name(model: str, method: str | None) -> str:
    """``--model`` is a create_model name or a bare backbone; ``--method`` sets the prefix."""
    if method is not None and method not in ("sat", "cam"):
        raise ValueError(f"--method must be sat or cam, got {method!r}")
    head, _, rest = model.partition("_")
    backbone = rest if head in ("sat", "cam") else model
    name = f"{method or (head if head in ('sat', 'cam') else 'sat')}_{backbone}"
    split_name(name)
    return name


def run_config(options: TrainOptions, num_classes: int) -> TrainConfig:
    """The TrainConfig the workers get: ``options.train`` with the requests resolved."""
    name = resolve_model_name(options.train.model, options.method)
    kwargs = dict(options.train.model_kwargs)
    if options.img_size is not None:
        kwargs["img_size"] = options.img_size
    resolve_model_kwargs(name, **kwargs)  # unknown combinations fail here, with the flag's words
    precision = resolve_precision(options.precision, "cuda" if options.use_gpu else "cpu")
    return replace(options.train, model=name, num_classes=num_classes, model_kwargs=kwargs, precision=precision)


def input_size(cfg: TrainConfig) -> int:
    size = resolve_model_kwargs(cfg.model, **cfg.model_kwargs)["img_size"]
    return int(size if isinstance(size, int) else size[0])


def is_deit_size(model: str) -> bool:
    """A full-size backbone meant to start from pretrained weights (DeiT, DINOv2, DeiT III)."""
    return split_name(model)[1] in PRETRAINED_BACKBONES


def option_warnings(options: TrainOptions) -> list[str]:
    """Settings that run but are most likely a mistake."""
    name = resolve_model_name(options.train.model, options.method)
    if is_deit_size(name) and not options.train.pretrained:
        return [f"{name} is trained from random weights (no --pretrained): SAT fine-tunes pretrained "
                "weights (DESIGN §5: DeiT; or DINOv2 / DeiT III); from scratch it does not beat CAM. Give "
                "--pretrained deit_small.pth (or a timm hub name) unless this is on purpose"]
    return []


def resolved_settings(options: TrainOptions, cfg: TrainConfig) -> dict[str, Any]:
    """The hyper-parameters a run trains with, after the recipe, the flags and ``auto``:
    printed by the job and kept in the checkpoint's training info."""
    kwargs = resolve_model_kwargs(cfg.model, **cfg.model_kwargs)
    size = input_size(cfg)
    return {
        "recipe": options.recipe, "model": cfg.model, "pretrained": cfg.pretrained, "img_size": size,
        "drop_path_rate": kwargs.get("drop_path_rate"), "epochs": cfg.epochs, "batch_size": cfg.batch_size,
        "optimizer": "AdamW", "lr": cfg.lr, "schedule": cfg.schedule, "warmup_epochs": cfg.warmup_epochs,
        "weight_decay": cfg.weight_decay, "alpha": cfg.loss.alpha, "area_weight": cfg.loss.area_weight,
        "norm_weight": cfg.loss.norm_weight, "area_mode": cfg.loss.area_mode, "spatial_loss_start": cfg.spatial_loss_start,
        "spatial_loss_ramp": cfg.spatial_loss_ramp, "backbone_lr_scale": cfg.backbone_lr_scale,
        "freeze": cfg.freeze, "augment": f"Resize {train_resize_size(size)}x{train_resize_size(size)}, "
                                      f"RandomCrop {size}, horizontal flip",
        "precision": cfg.precision, "precision_requested": options.precision,
    }


def format_settings(s: dict[str, Any]) -> str:
    precision = s["precision"]
    if s["precision_requested"] != precision:
        precision += f" (from {s['precision_requested']})"
    source = f"recipe {s['recipe']}" if s["recipe"] else "no --recipe; --recipe cub|imagenet gives the paper's"
    return (
        f"settings ({source}): "
        f"{s['model']} from {s['pretrained'] or 'random weights'}, {s['img_size']} px, drop path "
        f"{s['drop_path_rate']:g}; AdamW lr {s['lr']:g} {s['schedule']} (warm-up {s['warmup_epochs']:g} "
        f"epochs), weight decay {s['weight_decay']:g}; global batch {s['batch_size']}, {s['epochs']} epochs; "
        f"alpha {s['alpha']:g}, area/norm weights {s['area_weight']:g}/{s['norm_weight']:g}; "
        f"{s['augment']}; precision {precision}"
    )


def check_options(options: TrainOptions) -> None:
    """Option errors that need no data, named by their flag."""
    if options.num_workers < 1:
        raise ValueError(f"--num-workers must be >= 1, got {options.num_workers}")
    batch_size = options.train.batch_size
    if batch_size < options.num_workers or batch_size % options.num_workers:
        raise ValueError(
            f"--batch-size {batch_size} is the global batch: it must be a multiple of "
            f"--num-workers {options.num_workers}"
        )
    if options.threshold_metric not in THRESHOLD_METRICS:
        raise ValueError(f"--threshold-metric must be one of {THRESHOLD_METRICS}, got {options.threshold_metric!r}")
    resolve_loader_workers(options)  # --loader-workers auto or a count >= 0
    if options.cpus_per_worker is not None and options.cpus_per_worker <= 0:
        raise ValueError(f"--cpus-per-worker must be positive, got {options.cpus_per_worker}")
    if options.max_failures < -1:
        raise ValueError(f"--max-failures must be >= 0 (or -1 for unlimited), got {options.max_failures}")
    cfg = options.train
    if cfg.spatial_loss_start < 0 or cfg.spatial_loss_ramp < 0:
        raise ValueError("--spatial-loss-start and --spatial-loss-ramp must be >= 0 epochs")
    if not 0 < cfg.backbone_lr_scale <= 1e3:
        raise ValueError(f"--backbone-lr-scale must be positive, got {cfg.backbone_lr_scale}")
    run_config(options, num_classes=2)  # model name, overrides, precision


def resolve_loader_workers(options: TrainOptions) -> int:
    """``--loader-workers`` as a count: ``auto`` follows ``--cpus-per-worker`` (1 if unset) and
    ``--use-gpu``."""
    requested = parse_loader_workers(options.loader_workers)
    if requested is not None:
        return requested
    return auto_loader_workers(options.cpus_per_worker or 1, options.use_gpu)


def default_run_name(options: TrainOptions) -> str:
    """A name that is the same for the same training options (so a rerun resumes)."""
    digest = hashlib.sha256(json.dumps(run_fingerprint(options), sort_keys=True).encode()).hexdigest()
    return f"{resolve_model_name(options.train.model, options.method)}-{digest[:10]}"


def run_fingerprint(options: TrainOptions) -> dict[str, Any]:
    """The flat settings a resumed run must share with its start (the run record)."""
    return {k: v for k, v in options.settings().items() if k not in RESUMABLE_CHANGES}
