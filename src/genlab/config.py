"""Strict, typed models of `params.yaml`, the one source of hyperparameters.

Every stage loads the whole file through `load_params`, so a bad key anywhere fails every stage the
same way: one line naming the key, a non-zero exit, nothing written (model sections: every stage
after `prepare`, the first being `evaluator`).

A family's section (`models.<family>`) is not written out here: its schema is the family's
constructor (typed, defaulted keyword arguments, STYLE.md rule 3) plus the training keys every
family has. Adding a family therefore needs no change in this file. Checking a section imports the
family's code (and with it torch and Lightning), so a command that reads no model (`genlab
prepare`) loads params with `check_models=False`; importing this module imports neither.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import typing
from functools import cache, lru_cache
from pathlib import Path, PurePath
from typing import TYPE_CHECKING, Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    create_model,
    field_validator,
    model_validator,
)

from genlab.errors import ConfigError
from genlab.families import FAMILIES

if TYPE_CHECKING:
    import torch

# Constructor arguments that come from the prepared data (meta.json), never from params.
DATA_ARGS = ("image_shape", "levels", "num_classes")

PositiveInt = Annotated[int, Field(gt=0)]
# Lightning's seed_everything warns and picks a *random* seed above 2^32 - 1.
MAX_SEED = 2**32 - 1
Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
# Images per sample set: 50 000 is the size FID is published at; more only costs memory.
MAX_SAMPLES = 50_000


class Strict(BaseModel):
    # strict: "16" is not an int and "yes" is not a bool; an int is still a valid float.
    # allow_inf_nan: `.inf`, `.nan` and `1e400` are no value (an infinite step size or guidance
    # scale samples garbage that would then be scored).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


Fraction = Annotated[float, Field(gt=0, lt=1)]


class DatasetParams(Strict):
    """Which dataset `prepare` reads, and how.

    Every key is always present (params.yaml switches dataset with `name` alone); a loader reads
    only the keys named in its signature (data/datasets.py), and the others are ignored.
    """

    # digits ships inside scikit-learn (no download); mnist, fashion_mnist and cifar10 come
    # through torchvision; folder is any directory of images with one sub-folder per class.
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "folder"] = "digits"
    # mnist, fashion_mnist, cifar10: torchvision's files are read from (and downloaded into) root.
    root: str = "data/raw"
    download: bool = True  # false: never use the network; missing files are an error
    val_size: PositiveInt = 5000  # validation: the last val_size images of the official train set
    # folder: the directory of class sub-folders, and what its images become.
    path: str | None = None
    image_size: Annotated[int, Field(ge=8, le=64)] = 32  # short side resized, center-cropped
    channels: Literal[1, 3] = 3  # 1: grayscale, 3: RGB
    corrupt: Literal["skip", "error"] = "error"  # an unreadable image: skip (logged) or stop
    val_fraction: Fraction = 0.1  # of each class (stratified split)
    test_fraction: Fraction = 0.1
    split_seed: Annotated[int, Field(ge=0)] = 0  # not `seed`: a new training seed keeps the data

    @model_validator(mode="after")
    def _folder_keys(self) -> DatasetParams:
        if self.name == "folder" and self.path is None:
            raise ValueError(
                "dataset.path is required when dataset.name is folder: set it to a directory "
                "with one sub-folder of images per class"
            )
        if self.val_fraction + self.test_fraction >= 1:
            raise ValueError(
                "dataset.val_fraction + dataset.test_fraction must be below 1 (the rest trains)"
            )
        return self


class TrainerParams(Strict):
    """Lightning Trainer settings shared by every family."""

    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = "cpu"
    devices: PositiveInt | Literal["auto"] = 1  # per node
    num_nodes: PositiveInt = 1
    # auto: DDP when devices or num_nodes ask for more than one process; ddp: always.
    strategy: Literal["auto", "ddp"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true", "64-true"] = "32-true"
    log_every_n_steps: PositiveInt = 50
    # A grid of samples is logged to MLflow every this many epochs (and after the last one).
    sample_every_n_epochs: PositiveInt = 25
    sample_grid_size: Annotated[int, Field(ge=1, le=256)] = 64
    # torch.compile each network of the family in place (checkpoints keep their keys): a
    # compilation at the start of every fit, repaid by long GPU runs; rarely worth it on CPU.
    compile: bool = False
    # channels_last memory format for the networks: faster convolutions on GPUs with tensor
    # cores (bf16-mixed/16-mixed), and on a CPU (oneDNN): 3-epoch fits of the digits' default
    # families gained EBM 12%, diffusion 4%, PixelCNN, flow and GAN 3%, VAE nothing (2 cores,
    # 2026-12-07). Evaluation and scoring on a CPU use it whatever this says
    # (evaluation.evaluate.for_inference: 11-25% faster there).
    channels_last: bool = True
    # Every family stops once its training has used this many FLOPs (genlab.compute: forward,
    # backward and optimiser steps, all processes), within its max_epochs and max_steps: the
    # families compared at equal training compute. null: no FLOP budget.
    budget_flops: Annotated[float, Field(gt=0, le=1e30)] | None = None
    # Images drawn at 1/16, 1/8, 1/4, 1/2 and the whole of each training (genlab.compute
    # .CurveSamples: the same seeded draws each time); the evaluate stage scores each set by its
    # FID against the validation split: sample quality against training compute, for every
    # family. A cheap FID, biased upwards at this n: compare it along the curve and between
    # families (the same n), not with eval/fid. 0: none.
    curve_samples: Literal[0] | Annotated[int, Field(ge=16, le=4096)] = 256

    @property
    def multi_process(self) -> bool:
        """Whether training and evaluation run as DDP processes (or may: devices "auto")."""
        return self.strategy == "ddp" or self.devices != 1 or self.num_nodes > 1

    @property
    def eval_device(self) -> torch.device:
        """Where evaluation and scoring run: the GPU when asked for and present, else the CPU."""
        import torch

        if self.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")


class EvaluatorParams(Strict):
    """The small classifier whose features define FID/KID/precision-recall for this dataset."""

    seed: Annotated[int, Field(ge=0, le=MAX_SEED)] = 0  # the instrument's own seed

    max_epochs: PositiveInt = 40
    batch_size: PositiveInt = 64
    lr: Annotated[float, Field(gt=0, le=1)] = 2e-3
    width: PositiveInt = 32
    feature_dim: PositiveInt = 128
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.2
    # Training augmentation (random small rotations, scalings, shifts; all 0: none).
    augment_degrees: Annotated[float, Field(ge=0, le=45)] = 10.0
    augment_scale: Annotated[float, Field(ge=0, lt=1)] = 0.1
    augment_shift: Annotated[float, Field(ge=0, le=8)] = 1.0  # pixels


class EvaluateParams(Strict):
    """The evaluation protocol: identical for every family so their numbers compare."""

    # The held-out split every evaluation number is measured on: `test` for the final
    # evaluation, `val` for tuning (then nothing reads the test split, and the held-out real row,
    # which needs images outside both train and the reference split, is absent).
    split: Literal["test", "val"] = "test"
    # Images per sample set: as many as the validation split holds, the size at which the
    # held-out real images (the validation split) are compared with the reference split, so that
    # every row of the comparison is measured at one size, and at most this many (null: no
    # bound), so that one profile serves a folder of any size. With split: val (no held-out
    # row) it is the size itself. genlab.evaluation.sizes.set_size.
    num_samples: Annotated[int, Field(ge=2, le=MAX_SAMPLES)] | None = None
    # Independent sample sets per family (seeds derived from `seed`): the metrics are their
    # mean, and their spread is the samples' part of every interval.
    sample_seeds: Annotated[int, Field(ge=2, le=100)] = 5
    # Bootstrap draws of the reference images: the reference's part of every interval.
    bootstrap: Annotated[int, Field(ge=10, le=10000)] = 100
    confidence: Annotated[float, Field(gt=0.5, lt=1)] = 0.95  # of every interval
    # The data-copying test C_T (Meehan et al. 2020): k-means cells of the training features,
    # and the least share of a set's samples a cell must hold to count.
    copying_cells: Annotated[int, Field(ge=1, le=100)] = 5
    copying_tau: Annotated[float, Field(ge=0, lt=1)] = 0.05
    batch_size: PositiveInt = 250
    seed: Seed = 1234
    kid_subset_size: Annotated[int, Field(ge=2, le=MAX_SAMPLES)] = 200
    kid_subsets: Annotated[int, Field(ge=1, le=10_000)] = 100
    prc_neighborhood: PositiveInt = 3
    isc_splits: PositiveInt = 10
    # Images of the held-out and validation splits that the per-image passes score (likelihood
    # and its training-image gap, classification, OOD detection, each OOD set made from them,
    # the representation probe's held-out side): a
    # seeded draw, the same for every family; null: the whole splits. The passes cost a network
    # evaluation per image, draw and class (a conditional diffusion scores 50 terms per image): a
    # full-size split on a CPU needs a bound, and the standard errors say what it costs.
    scored_images: Annotated[int, Field(ge=2)] | None = None
    # The feature space of FID/KID/precision-recall/IS: `evaluator`, the dataset's own classifier
    # (models/evaluator.pt), or `inception`, torch-fidelity's Inception-v3 (`inception-v3-compat`,
    # images upscaled to 299x299): the standard FID that published numbers use.
    feature_extractor: Literal["evaluator", "inception"] = "evaluator"
    # The Inception weights file; null: torch's hub cache, where torch-fidelity itself looks
    # ($TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth). Never downloaded.
    inception_weights: str | None = None
    # The sha256 that file must have (default: the file torch-fidelity publishes).
    inception_sha256: Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")] = (
        "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
    )


OodSet = Literal["noise", "inverted", "hflip", "vflip", "rot90", "natural"]


class PredictionParams(Strict):
    """Out-of-distribution detection, generative classification and `genlab score`."""

    # Monte Carlo samples per image when a family's likelihood is a bound (IWAE k for the VAE,
    # dequantization draws for a flow, bound terms for diffusion) in OOD detection and `genlab
    # score`; exact families ignore it. Diffusion on the digits' validation split (2026-12-06):
    # 20 draws give flip AUROCs 0.875 / 0.819 in 0.7x the time of 30 (0.882 / 0.835), tied.
    bound_samples: PositiveInt = 20
    # Draws per image of Bayes' rule (classification, the conditional marginal); null: the
    # bound_samples. Ranking ten classes needs more than detection's one score: diffusion on
    # val, 30 draws: accuracy 0.991 [0.975, 0.997], 20: 0.986, 10: 0.94 (an earlier model).
    classification_samples: PositiveInt | None = 30
    # A conditional bound family scores every class with a fifth of the draws, then only this
    # many best classes with all of them (successive elimination); null: every class, all draws.
    # Diffusion on digits, 30 draws: 3 kept the accuracy (0.980) and the marginal NLL (+0.04
    # nats) at 2.3x less time, 2 cost 0.5 points of accuracy. OOD detection's log p(x) gives
    # the best class alone every draw (`predict.detection_shortlist`); null: every class there too.
    shortlist: PositiveInt | None = 3
    # Fraction of the validation split that the in-distribution threshold may reject.
    fpr: Annotated[float, Field(gt=0, lt=1)] = 0.05
    # The statistic behind the verdict: log p(x) itself, or its distance from the validation
    # mean (a per-image typicality test, Nalisnick et al. 2019).
    statistic: Literal["likelihood", "typicality"] = "likelihood"
    # Out-of-distribution sets, each as large as the test split (see evaluation/ood.py).
    ood_sets: Annotated[list[OodSet], Field(min_length=1)] = [
        "noise",
        "inverted",
        "hflip",
        "vflip",
        "rot90",
        "natural",
    ]

    @property
    def classifying_samples(self) -> int:
        """Draws per image of Bayes' rule: `classification_samples`, else `bound_samples`."""
        chosen = self.classification_samples
        return self.bound_samples if chosen is None else chosen


class RepresentationParams(Strict):
    """Linear probe and latent-space grids of the families that encode."""

    probe_c: Annotated[float, Field(gt=0)] = 1.0  # inverse L2 strength of the logistic probe
    interpolation_pairs: Annotated[int, Field(ge=1, le=32)] = 8  # rows of the grid
    interpolation_steps: Annotated[int, Field(ge=3, le=32)] = 10  # columns, endpoints included
    traversal_dims: Annotated[int, Field(ge=1, le=32)] = 8  # rows: latent dims by variance
    traversal_steps: Annotated[int, Field(ge=3, le=32)] = 9  # columns, from -2.5 to +2.5 std
    # Training images the probes are fitted on (a seeded draw, the same for every family and
    # the raw-pixel probe); null: the whole training split. Encoding is a network pass per image
    # (a diffusion model's DDIM encoder: 50), about 0.17 s an image for MNIST's on 2 cores.
    probe_images: Annotated[int, Field(ge=10)] | None = None


class TrackingParams(Strict):
    # MLflow tracking URI. null: runs go to the local store, a SQLite file `mlflow.db` at the
    # repository root, alone; sqlite:///<file>: that file is the local store; http(s)://...: a
    # team server, which gets a copy of every run (genlab.sync) next to the local store.
    # The environment variable MLFLOW_TRACKING_URI, when set, wins over this.
    uri: str | None = None
    # MLflow's system metrics (CPU, memory, disk, network; GPU with pynvml) during training,
    # sampled this often (seconds); null: none.
    system_metrics_every_s: Annotated[float, Field(ge=1, le=3600)] | None = 10.0
    # MLflow experiment name. null: the dataset's name (one experiment per dataset), and
    # folder-<its name> for a folder dataset.
    experiment: str | None = None


class FamilyParams(Strict):
    """Training keys every family has; the rest of a family's section is its constructor."""

    max_epochs: PositiveInt
    batch_size: PositiveInt
    # Stop after this many optimiser steps (a GAN's batch counts once), within max_epochs;
    # null: no step budget. The part-epoch is validated and checkpointed like a whole one.
    max_steps: PositiveInt | None = None
    # Stop when the validation likelihood has not improved for this many epochs (families with
    # a likelihood); null: train for max_epochs. The best-validation checkpoint is kept either way.
    early_stopping_patience: PositiveInt | None = None

    def model_kwargs(self) -> dict[str, Any]:
        return self.model_dump(exclude=set(FamilyParams.model_fields))


@cache
def family_params_model(family: str) -> type[FamilyParams]:
    """Build the params schema of `models.<family>` from the family's constructor signature."""
    from genlab.models import MODELS

    cls = MODELS[family]
    hints = typing.get_type_hints(cls.__init__, include_extras=True)
    fields: dict[str, Any] = {}
    for name, p in inspect.signature(cls.__init__).parameters.items():
        if name == "self" or name in DATA_ARGS:
            continue
        if p.kind is not inspect.Parameter.KEYWORD_ONLY or p.default is inspect.Parameter.empty:
            raise TypeError(
                f"{cls.__name__}.__init__: '{name}' must be keyword-only with a default"
            )
        fields[name] = (hints[name], p.default)
    defaults = getattr(cls, "training_defaults", {"max_epochs": 50, "batch_size": 64})
    fields["max_epochs"] = (PositiveInt, defaults["max_epochs"])
    fields["batch_size"] = (PositiveInt, defaults["batch_size"])
    return create_model(f"{cls.__name__}Params", __base__=FamilyParams, **fields)


@lru_cache(maxsize=64)
def _family_section(family: str, section_json: str) -> FamilyParams:
    """`models.<family>` (given as JSON, so that it can be a cache key) checked against the
    family's schema, defaults filled in."""
    return family_params_model(family).model_validate(json.loads(section_json))


Family = Literal[FAMILIES]  # type: ignore[valid-type]


class Params(Strict):
    # Training seeds: every family trains once per seed (DVC matrix stages train@<family>-<seed>),
    # and the report gives mean +- sd over seeds next to each seed's intervals.
    seeds: Annotated[list[Seed], Field(min_length=1)] = [0]
    dataset: DatasetParams = Field(default_factory=DatasetParams)
    # The families `dvc repro` trains and evaluates (stages train@<family>, evaluate@<family>).
    families: Annotated[list[Family], Field(min_length=1)]
    trainer: TrainerParams = Field(default_factory=TrainerParams)
    evaluator: EvaluatorParams = Field(default_factory=EvaluatorParams)
    # models.<family>: the family's constructor arguments and training keys, as written; `family()`
    # gives a section checked against the family's schema, defaults filled in.
    models: dict[Family, dict[str, Any]] = Field(default_factory=dict)
    evaluate: EvaluateParams = Field(default_factory=EvaluateParams)
    prediction: PredictionParams = Field(default_factory=PredictionParams)
    representation: RepresentationParams = Field(default_factory=RepresentationParams)
    tracking: TrackingParams = Field(default_factory=TrackingParams)

    @field_validator("families")
    @classmethod
    def _families_unique(cls, families: list[str]) -> list[str]:
        if len(set(families)) != len(families):
            raise ValueError("a family is listed twice")
        return families

    @field_validator("seeds")
    @classmethod
    def _seeds_unique(cls, seeds: list[int]) -> list[int]:
        if len(set(seeds)) != len(seeds):
            raise ValueError("a seed is listed twice")
        return seeds

    def family(self, name: str) -> FamilyParams:
        """`models.<name>` checked against the family's constructor, defaults filled in (a
        ValidationError names keys inside the section; `parse_params` turns it into a
        ConfigError naming `models.<name>.<key>`)."""
        return _family_section(name, json.dumps(self.models.get(name, {}), sort_keys=True))

    def resolved(self) -> dict[str, Any]:
        """Every key with its value, each family's section with its defaults (what MLflow logs)."""
        return self.model_dump() | {"models": {f: self.family(f).model_dump() for f in FAMILIES}}

    @property
    def experiment_name(self) -> str:
        if self.tracking.experiment:
            return self.tracking.experiment
        if self.dataset.name == "folder":  # one experiment per folder, not one for all folders
            return f"folder-{PurePath(self.dataset.path).name}"
        return self.dataset.name

    def training_config(self, family: str, seed: int) -> dict[str, Any]:
        """Everything that determines a family's training with `seed` (what its checkpoints are
        keyed by)."""
        return {
            "seed": seed,
            # The data's contents join the key as its sha256 (training.py); where it was read
            # from (root, download) must not re-key a training.
            "dataset": {"name": self.dataset.name},
            "trainer": self.trainer.model_dump(),
            "family": family,
            "model": self.family(family).model_dump(),
        }


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def _describe(error: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in error["loc"]) or "(top level)"
    if error["type"] == "extra_forbidden":
        if key == "seed":  # the one training seed of earlier versions
            return "seed: unknown key; training seeds are a list now: seeds: [0]"
        return f"{key}: unknown key; remove it or check its spelling"
    if error["type"] == "missing":
        return f"{key}: required key is missing"
    got = repr(error.get("input"))
    got = got if len(got) <= 60 else got[:57] + "..."
    return f"{key}: {error['msg']} (got {got})"


def parse_params(raw: Any, source: str = "params.yaml", *, check_models: bool = True) -> Params:
    """Params from a parsed YAML document; with `check_models`, every family's section is checked
    against its constructor too (which imports the families' code)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of keys at the top level")
    try:
        params = Params.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_first_problem(exc)}") from None
    for family in FAMILIES if check_models else ():
        try:
            params.family(family)
        except ValidationError as exc:
            raise ConfigError(f"{source}: {_first_problem(exc, ('models', family))}") from None
    return params


def _first_problem(exc: ValidationError, within: tuple[str, ...] = ()) -> str:
    errors = exc.errors()
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return _describe({**errors[0], "loc": (*within, *errors[0]["loc"])}) + more


class _ReadsDifferently(yaml.YAMLError):
    """A scalar or mapping that PyYAML (YAML 1.1) and DVC (YAML 1.2) would read differently."""

    def __init__(self, node: yaml.Node, problem: str) -> None:
        super().__init__(problem)
        self.line = node.start_mark.line + 1
        self.problem = problem


class _Yaml12Loader(yaml.SafeLoader):
    """params.yaml as DVC (YAML 1.2) reads it, or an error where PyYAML's YAML 1.1 would read it
    otherwise: `1e-3` is a float (1.1: a string); `yes`/`no`/`on`/`off` (1.1: booleans),
    `1:30` (1.1: 90), `0755` (1.1: octal), `1_000` are refused rather than guessed, and so is a
    key written twice (1.1 and DVC both keep the last one, silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise _ReadsDifferently(key_node, f"key {key!r} is written twice; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_bool(self, node: yaml.ScalarNode) -> bool:
        if node.value.lower() not in ("true", "false"):
            raise _ReadsDifferently(
                node,
                f"{node.value!r} is a boolean in YAML 1.1 but a string in YAML 1.2 (DVC); "
                "write true or false, or quote it",
            )
        return super().construct_yaml_bool(node)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        text = node.value.lstrip("+-")
        octal = len(text) > 1 and text[0] == "0" and text[1] not in "xo"
        if "_" in text or ":" in text or text.startswith("0b") or octal:
            raise _number_differs(node)
        return super().construct_yaml_int(node)

    def construct_yaml_float(self, node: yaml.ScalarNode) -> float:
        if "_" in node.value or ":" in node.value:
            raise _number_differs(node)
        return super().construct_yaml_float(node)


def _number_differs(node: yaml.ScalarNode) -> _ReadsDifferently:
    return _ReadsDifferently(
        node,
        f"{node.value!r} is read as a number by YAML 1.1 but not the same way by YAML 1.2 (DVC); "
        "write it in plain decimal, or quote it",
    )


_Yaml12Loader.add_constructor("tag:yaml.org,2002:bool", _Yaml12Loader.construct_yaml_bool)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)
_Yaml12Loader.add_constructor("tag:yaml.org,2002:float", _Yaml12Loader.construct_yaml_float)
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def read_yaml(text: str, source: str | Path) -> Any:
    """A params-style YAML document as DVC (YAML 1.2) reads it; ConfigError naming `source` and
    the line where it is not valid YAML or YAML 1.1 would read it otherwise."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)
    except _ReadsDifferently as exc:
        raise ConfigError(f"{source}: line {exc.line}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{source}: not valid YAML{where}; fix the syntax") from None


def load_params(path: str | Path = "params.yaml", *, check_models: bool = True) -> Params:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: file not found; run genlab from the repository root")
    raw = read_yaml(path.read_text(), path)
    return parse_params(raw, str(path), check_models=check_models)
