"""Training configuration: dataclasses with defaults, YAML files, dotted command-line overrides.

    python launch/train.py --config launch/configs/cpu_quickstart.yaml meta.algorithm=reptile run.steps=500

Precedence: dataclass defaults < YAML file < command line. An unknown key or a value of the wrong
type is an error naming the key and where it came from; values are validated before training.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from metagan_dist.meta import MetaConfig
from metagan_dist.models import ARCHITECTURES, DEFAULT_NORMS, NORMS, build_pair
from metagan_dist.options import opt

ENGINES = ("torch", "deepspeed")
SHORT_TASK_POLICIES = ("skip", "error")


@dataclass
class ModelConfig:
    arch: str = opt("mlp", "generator/discriminator pair: mlp (the seed's) | dcgan (32x32 or 64x64)")
    z_dim: int = opt(64, "noise dimension of the generator")
    width: int = opt(0, "MLP hidden size of G (D gets half) or DCGAN base channels; 0 = default (256 / 64)")
    g_norm: str = opt("auto", "generator normalisation, per sample: none | layer | group | auto (mlp: none, dcgan: group)")
    d_norm: str = opt("auto", "discriminator normalisation, per sample: none | layer | group | auto (none)")

    def __post_init__(self) -> None:
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"unknown model.arch {self.arch!r}; expected one of {ARCHITECTURES}")
        _positive("model.z_dim", self.z_dim)
        for name in ("g_norm", "d_norm"):
            if getattr(self, name) not in ("auto", *NORMS):
                raise ValueError(f"unknown model.{name} {getattr(self, name)!r}; expected auto or one of {NORMS}")

    def build(self, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
        """The (generator, discriminator) pair this config describes, for images of `image_shape`."""
        defaults = DEFAULT_NORMS[self.arch]
        norms = tuple(default if chosen == "auto" else chosen for chosen, default in zip((self.g_norm, self.d_norm), defaults))
        return build_pair(self.arch, self.z_dim, image_shape, self.width or None, norms)


@dataclass
class DataConfig:
    pool: str = opt("glyphs", "task pool: 'glyphs' (embedded, built on first use) or a folder holding index.json")
    shots: int = opt(5, "k support images per task (the inner loop adapts on these)")
    queries: int = opt(5, "q query images per task (the meta-objective is evaluated on these)")
    tasks_per_rank: int = opt(8, "T tasks each rank adapts per meta-step")
    batches_per_epoch: int = opt(100, "meta-steps per epoch of the task stream (the same on every rank)")
    workers: int = opt(1, "DataLoader worker processes per rank (0 = load in the training process)")
    skip_corrupt: bool = opt(False, "skip unreadable shards with a logged count instead of stopping")
    short_tasks: str = opt("skip", "tasks with fewer than k+q images: skip (and count) | error")
    sample_tasks: int = opt(6, "meta-test tasks shown in the sample grids")

    def __post_init__(self) -> None:
        for name in ("shots", "queries", "tasks_per_rank", "batches_per_epoch", "sample_tasks"):
            _positive(f"data.{name}", getattr(self, name))
        if self.workers < 0:
            raise ValueError(f"data.workers must be >= 0, got {self.workers}")
        if self.short_tasks not in SHORT_TASK_POLICIES:
            raise ValueError(f"unknown data.short_tasks {self.short_tasks!r}; expected one of {SHORT_TASK_POLICIES}")


@dataclass
class OptimConfig:
    lr: float = opt(1e-3, "outer learning rate β (Adam), for the meta-parameters and Meta-SGD's rates")
    beta1: float = opt(0.5, "Adam β1 of the outer optimizer (0.5 is the usual GAN choice)")
    beta2: float = opt(0.999, "Adam β2 of the outer optimizer")
    weight_decay: float = opt(0.0, "decoupled weight decay of the outer optimizer")
    grad_clip: float = opt(0.0, "clip the global norm of the meta-gradient; 0 = off")

    def __post_init__(self) -> None:
        _positive("optim.lr", self.lr)


@dataclass
class RunConfig:
    out_dir: str = opt("runs/quickstart", "run folder: config, logs, samples, checkpoints; reused to resume")
    steps: int = opt(2000, "meta-steps to train")
    seed: int = opt(0, "seed of the meta-parameters, the task streams and the noise")
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda")
    threads: int = opt(0, "torch CPU threads per rank; 0 = CPU cores / ranks on this node")
    log_every: int = opt(10, "write metrics.jsonl and TensorBoard scalars every N steps")
    sample_every: int = opt(250, "write a sample grid every N steps (and at the end)")
    sample_steps: int = opt(5, "inner steps the sample tasks are adapted with before generating")
    checkpoint_every: int = opt(500, "checkpoint every N steps (and at exit)")
    keep_checkpoints: int = opt(3, "checkpoints kept in out_dir/checkpoints (older ones are deleted)")
    check_every: int = opt(50, "verify every N steps that all ranks hold identical meta-parameters")
    max_skipped_steps: int = opt(20, "stop with an error after this many consecutive non-finite steps")

    def __post_init__(self) -> None:
        for name in ("steps", "log_every", "sample_every", "checkpoint_every", "keep_checkpoints", "check_every"):
            _positive(f"run.{name}", getattr(self, name))
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"unknown run.device {self.device!r}; expected auto, cpu or cuda")


@dataclass
class EngineConfig:
    name: str = opt("torch", "outer optimizer: torch (Adam) | deepspeed (ZeRO from deepspeed_config)")
    deepspeed_config: str = opt("launch/configs/deepspeed_zero2.json", "DeepSpeed JSON config (engine=deepspeed)")
    bucket_mb: float = opt(25.0, "all-reduce bucket size in MiB for the meta-gradient (engine=torch)")

    def __post_init__(self) -> None:
        if self.name not in ENGINES:
            raise ValueError(f"unknown engine.name {self.name!r}; expected one of {ENGINES}")
        _positive("engine.bucket_mb", self.bucket_mb)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    # The CPU quick-start trains Reptile: first order, so ~2x the meta-steps of MAML in the same minutes.
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(algorithm="reptile", inner_steps=5, inner_lr=0.05))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


# Keys that may change when a run resumes; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = (
    "run.steps", "run.log_every", "run.sample_every", "run.sample_steps", "run.checkpoint_every",
    "run.keep_checkpoints", "run.check_every", "run.max_skipped_steps", "run.threads", "run.device",
    "run.out_dir", "data.skip_corrupt", "data.sample_tasks", "engine.bucket_mb",
)


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file, then `key=value` overrides; validated TrainConfig."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

    merged = OmegaConf.structured(TrainConfig)
    sources = []
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"config file {path} does not exist")
        sources.append((f"config file {path}", lambda: OmegaConf.load(path)))
    if overrides:
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ValueError(f"command-line overrides must look like key=value, got {bad[0]!r}")
        sources.append(("the command line", lambda: OmegaConf.from_dotlist(list(overrides))))
    for where, load in sources:
        try:
            merged = OmegaConf.merge(merged, load())
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            if isinstance(err, ConfigKeyError):
                raise ValueError(f"unknown config key '{key}' in {where}; see --help for the options") from None
            reason = str(err.msg).splitlines()[0]
            raise ValueError(f"bad value for config key '{key}' in {where}: {reason}") from None
    return OmegaConf.to_object(merged)


def from_dict(values: dict[str, Any], where: str) -> TrainConfig:
    """A TrainConfig from nested dicts (a checkpoint's saved config); unknown keys are errors naming `where`."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TrainConfig), values))
    except OmegaConfBaseException as err:
        raise ValueError(f"{where}: its config does not fit this version of metagan_dist: {err.msg.splitlines()[0]}") from None


def to_dict(config: TrainConfig) -> dict[str, Any]:
    """The config as nested plain dicts (for YAML, checkpoints and comparisons)."""
    return dataclasses.asdict(config)


def save_config(config: TrainConfig, path: Path) -> None:
    """Write the resolved config as YAML (the run folder's record of what ran)."""
    import yaml

    path.write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def flatten_keys(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_keys(value, name + "."))
        else:
            flat[name] = value
    return flat


def incompatible_keys(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """Dotted keys whose values differ between two configs, except those a resume may change."""
    a, b = flatten_keys(saved), flatten_keys(current)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in RESUMABLE_CHANGES)


def describe_options() -> str:
    """Every option as `section.key (default): help`, for --help."""
    lines = []
    for section in dataclasses.fields(TrainConfig):
        lines.append(f"\n{section.name}:")
        for f in dataclasses.fields(section.default_factory()):
            default = getattr(section.default_factory(), f.name)
            lines.append(f"  {section.name}.{f.name} (default {default!r})\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
