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
from metagan_dist.options import above, any_value, at_least, below_one, check_section, not_empty, one_of, opt

ENGINES = ("torch", "deepspeed")
SHORT_TASK_POLICIES = ("skip", "error")
OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "linear", "cosine")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ModelConfig:
    arch: str = opt("mlp", "generator/discriminator pair: mlp (the seed's) | dcgan (32x32 or 64x64) | latent (MLP "
                           "heads on a frozen autoencoder of the pool's meta-train images, trained and cached on "
                           "first use: G writes a code its decoder draws, D judges its encoder's code)",
                    check=one_of(ARCHITECTURES))
    z_dim: int = opt(64, "noise dimension of the generator", check=at_least(1))
    width: int = opt(0, "MLP hidden size of G (D gets half; also the latent pair's heads) or DCGAN base channels; "
                        "0 = default (256 / 64)",
                     check=at_least(0, " (0 = the architecture's default)"))
    g_norm: str = opt("auto", "generator normalisation, per sample: none | layer | group | auto (mlp: none, "
                              "dcgan: group)", check=one_of(("auto", *NORMS)))
    d_norm: str = opt("auto", "discriminator normalisation, per sample: none | layer | group | auto (none)",
                      check=one_of(("auto", *NORMS)))
    support_dim: int = opt(0, "support-conditioned generator: G also sees the mean of an encoding of its task's "
                              "shots, this many features (encoder: D's architecture, meta-learned and adapted with G); "
                              "0 = G sees only noise",
                           check=at_least(0, " (0 = a generator that sees only noise; else at least 2)"))
    g_smooth: float = opt(0.0, "σ in pixels of a fixed Gaussian blur of G's output before its tanh; it removes the "
                               "pixel-sized noise that inner Adam steps write into samples; 0 = off",
                          check=at_least(0, " (0 = off)"))
    sample_median: int = opt(0, "radius in pixels of a median filter that samples (grids, adapt, evaluate) go "
                                "through, never the inner loop's fakes: it removes the isolated pixels that inner "
                                "Adam steps write and keeps strokes; 0 = off", check=at_least(0, " (0 = off)"))
    code_dim: int = opt(64, "arch=latent: code size of the autoencoder (cached as POOL/autoencoder-codeN-epochsM.pt)",
                        check=at_least(2))
    code_noise: float = opt(0.0, "arch=latent: σ of a fixed projection of G's noise added to its layer-normed code "
                                 "before the decoder, so samples spread around the adapted code; 0 = off",
                            check=at_least(0, " (0 = off)"))
    shot_mix: float = opt(0.0, "arch=latent with support_dim > 0: σ of a spread of G's code over its shots' fonts, "
                               "σ·Σ_j w_j (c_j − c̄) with c_j the encoder's code of shot j and w = softmax(6·z[:k]) − "
                               "1/k, so each sample leans towards one shot's font; 0 = off",
                          check=at_least(0, " (0 = off)"))
    autoencoder_epochs: int = opt(12, "arch=latent: epochs the autoencoder trains for on the pool's meta-train "
                                      "images when its cache is missing or was trained otherwise",
                                  check=at_least(1))

    def __post_init__(self) -> None:
        check_section("model", self)
        if self.support_dim == 1:
            raise ValueError("model.support_dim must be 0 (G sees only noise) or at least 2: the layer-normed code of "
                             "one feature is always 0")

    def build(self, image_shape: tuple[int, int, int]) -> tuple[nn.Module, nn.Module]:
        """The (generator, discriminator) pair this config describes, for images of `image_shape`."""
        chosen = (self.g_norm, self.d_norm)
        norms = tuple(default if norm == "auto" else norm for norm, default in zip(chosen, DEFAULT_NORMS[self.arch]))
        return build_pair(self.arch, self.z_dim, image_shape, self.width or None, norms, self.support_dim,
                          self.g_smooth, self.sample_median, self.code_dim, self.code_noise, self.shot_mix)


@dataclass
class DataConfig:
    pool: str = opt("glyphs", "task pool: 'glyphs' (embedded, built on first use) or a folder holding index.json",
                    check=not_empty())
    shots: int = opt(8, "k support images per task the inner loop adapts on in meta-training (meta-test k may be "
                            "smaller: run.sample_shots, evaluate --shots)", check=at_least(1))
    queries: int = opt(4, "q query images per task (the meta-objective is evaluated on these)", check=at_least(1))
    tasks_per_rank: int = opt(8, "T tasks each rank adapts per meta-step", check=at_least(1))
    batches_per_epoch: int = opt(100, "meta-steps per epoch of the task stream (the same on every rank)",
                                 check=at_least(1))
    workers: int = opt(1, "DataLoader worker processes per rank (0 = load in the training process)", check=at_least(0))
    skip_corrupt: bool = opt(False, "leave out shards found damaged at start-up (logged) instead of stopping",
                             check=any_value())
    short_tasks: str = opt("skip", "tasks with fewer than k+q images: skip (and count) | error",
                           check=one_of(SHORT_TASK_POLICIES))
    sample_tasks: int = opt(6, "meta-test tasks shown in the sample grids (meta-train tasks if the pool has no "
                               "test split)", check=at_least(1))

    def __post_init__(self) -> None:
        check_section("data", self)


@dataclass
class OptimConfig:
    name: str = opt("adam", "outer optimizer of both engines: adam (AdamW: Adam with decoupled weight decay) | "
                            "sgd (plain SGD, no momentum; with reptile: θ ← θ + lr·(mean θ_i − θ))",
                    check=one_of(OPTIMIZERS))
    lr: float = opt(3e-4, "outer learning rate β (ε for sgd), for the meta-parameters and Meta-SGD's rates",
                    check=above(0))
    schedule: str = opt("constant", "outer learning rate over the run: constant | linear (to 0 at run.steps) | "
                                    "cosine (to 0 at run.steps)", check=one_of(SCHEDULES))
    beta1: float = opt(0.5, "Adam β1 of the outer optimizer (0.5 is the usual GAN choice)", check=below_one())
    beta2: float = opt(0.999, "Adam β2 of the outer optimizer", check=below_one())
    weight_decay: float = opt(0.0, "decoupled weight decay of θ_G and θ_D (θ ← θ − lr·wd·θ), not of Meta-SGD's rates",
                              check=at_least(0))
    grad_clip: float = opt(0.0, "clip the global norm of the meta-gradient to this; 0 = off (the norm before "
                                "clipping is logged as meta_grad_norm)", check=at_least(0, " (0 turns it off)"))

    def __post_init__(self) -> None:
        check_section("optim", self)


@dataclass
class RunConfig:
    out_dir: str = opt("runs/quickstart", "run folder: config, logs, samples, checkpoints; reused to resume",
                       check=not_empty())
    steps: int = opt(600, "meta-steps to train", check=at_least(1))
    seed: int = opt(0, "seed of the meta-parameters, the task streams and the noise", check=at_least(0))
    device: str = opt("auto", "auto (cuda:LOCAL_RANK if CUDA is available, else cpu) | cpu | cuda",
                      check=one_of(DEVICES))
    threads: int = opt(0, "torch CPU threads per rank; 0 = CPU cores / ranks on this node",
                       check=at_least(0, " (0 = CPU cores / ranks on this node)"))
    log_every: int = opt(10, "write metrics.jsonl and TensorBoard scalars every N steps", check=at_least(1))
    sample_every: int = opt(100, "write a sample grid every N steps (and at the end)", check=at_least(1))
    sample_shots: int = opt(4, "k shots the sample grids adapt on (meta-test k; may differ from data.shots)",
                            check=at_least(1))
    sample_steps: int = opt(10, "inner steps the sample grids adapt for before drawing (meta-test S; may differ "
                                "from meta.inner_steps)", check=at_least(1))
    checkpoint_every: int = opt(100, "checkpoint every N steps (and at exit)", check=at_least(1))
    keep_checkpoints: int = opt(3, "checkpoints kept in out_dir/checkpoints (older ones are deleted, except "
                                   "the best)", check=at_least(1))
    select_tasks: int = opt(60, "score every checkpoint as evaluate.py does (recognizability after run.sample_steps "
                                "steps from run.sample_shots shots, 20-way) on the pool's first N meta-train tasks; "
                                "checkpoints/BEST names the best, which adapt.py and evaluate.py read from a run "
                                "folder. Meta-training is chaotic: checkpoints 100 steps apart differ by up to 0.3. "
                                "0 = off (a run folder means its latest checkpoint)",
                            check=at_least(0, " (0 = off)"))
    check_every: int = opt(50, "verify every N steps that all ranks hold identical meta-parameters", check=at_least(1))
    max_skipped_steps: int = opt(20, "stop with an error after more than this many consecutive non-finite steps",
                                 check=at_least(0))

    def __post_init__(self) -> None:
        check_section("run", self)


@dataclass
class EngineConfig:
    name: str = opt("torch", "outer step: torch (the optim.* optimizer; meta-gradient all-reduced in buckets) | "
                             "deepspeed (the same optimizer inside a ZeRO engine from deepspeed_config)",
                    check=one_of(ENGINES))
    deepspeed_config: str = opt("launch/configs/deepspeed_zero2.json", "DeepSpeed JSON config (engine=deepspeed)",
                                check=not_empty())
    bucket_mb: float = opt(25.0, "all-reduce bucket size in MiB for the meta-gradient (engine=torch)", check=above(0))

    def __post_init__(self) -> None:
        check_section("engine", self)


@dataclass
class TrainConfig:
    # The recipe chosen by benchmarks/few_shot_quality.py (README, "The recipe"): a support-conditioned G,
    # first-order MAML with a per-task Adam (β1 = 0) for 10 inner steps, two D steps per G step, G read out
    # as the average of its iterates (β = 0.7). The library's ModelConfig() stays unconditioned and its
    # MetaConfig() stays MAML.
    model: ModelConfig = field(default_factory=lambda: ModelConfig(support_dim=64))
    data: DataConfig = field(default_factory=DataConfig)
    meta: MetaConfig = field(default_factory=lambda: MetaConfig(
        algorithm="fomaml", inner_rule="adam", inner_lr=0.01, inner_beta1=0.0, inner_steps=10, d_steps=2,
        g_average=0.7))
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)


SECTIONS = tuple(f.name for f in dataclasses.fields(TrainConfig))

# Keys that may change when a run resumes; any other difference makes the checkpoint incompatible.
RESUMABLE_CHANGES = (
    "run.steps", "run.log_every", "run.sample_every", "run.sample_shots", "run.sample_steps", "run.checkpoint_every",
    "run.keep_checkpoints", "run.select_tasks", "run.check_every", "run.max_skipped_steps", "run.threads", "run.device",
    "run.out_dir", "data.skip_corrupt", "data.sample_tasks", "data.workers", "engine.bucket_mb",
    "meta.task_chunk", "meta.compile",  # how the step computes, not what: the same meta-gradient
)

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
            merged = OmegaConf.merge(merged, _sections_only(OmegaConf.to_container(load()), where))
        except OmegaConfBaseException as err:
            key = getattr(err, "full_key", None) or "?"
            if isinstance(err, ConfigKeyError):
                raise ValueError(f"unknown config key '{key}' in {where}; see --help for the options") from None
            reason = str(err.msg).splitlines()[0]
            raise ValueError(f"bad value for config key '{key}' in {where}: {reason}") from None
    return OmegaConf.to_object(merged)


def _sections_only(values: Any, where: str) -> dict[str, Any]:
    """The loaded values, checked to be {section: {key: value}}; a ValueError naming what is not."""
    if values is None:  # an empty YAML file
        return {}
    if not isinstance(values, dict):
        raise ValueError(f"{where} must hold sections ({', '.join(SECTIONS)}) with their keys, "
                         f"not a {type(values).__name__}")
    for name, section in values.items():
        if name in SECTIONS and not isinstance(section, (dict, type(None))):
            raise ValueError(f"config key '{name}' in {where} is a section, not a value ({section!r}): "
                             f"set its keys instead, e.g. {name}.<key>=<value> (see --help)")
    return {name: section for name, section in values.items() if section is not None}


# Keys added after checkpoints were first written, each with the value that reproduces what a checkpoint
# saved without it ran (its default today is the newer recipe's): a saved config lacking one gets this.
ABSENT_IN_OLDER_CHECKPOINTS = {
    "model.support_dim": 0, "model.g_smooth": 0.0, "model.sample_median": 0, "meta.inner_rule": "sgd",
    "meta.d_steps": 1, "meta.g_average": 0.0,
}


def from_dict(values: dict[str, Any], where: str) -> TrainConfig:
    """A TrainConfig from nested dicts (a checkpoint's saved config); unknown keys are errors naming `where`.

    Keys the saved config lacks take today's defaults, except ABSENT_IN_OLDER_CHECKPOINTS.
    """
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    values = {section: dict(keys) if isinstance(keys, dict) else keys for section, keys in values.items()}
    for dotted, value in ABSENT_IN_OLDER_CHECKPOINTS.items():
        section, key = dotted.split(".")
        if isinstance(values.get(section), dict):
            values[section].setdefault(key, value)
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
