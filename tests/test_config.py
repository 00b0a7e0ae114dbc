"""params.yaml: strict typed models; every bad input is one line naming the key, nothing written."""

from __future__ import annotations

import inspect
import os
from pathlib import Path

import pytest
import yaml

from genlab.cli import main
from genlab.config import (
    DATA_ARGS,
    Params,
    config_hash,
    family_params_model,
    load_params,
    parse_params,
)
from genlab.errors import ConfigError
from genlab.models import MODELS

REPO_PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"
TRAINING_KEYS = {"max_epochs", "batch_size", "early_stopping_patience", "max_steps"}

# (id, params.yaml text, the key the one-line error must name)
BAD_PARAMS = [
    ("unknown-top-level-key", "families: [vae]\nbogus: 1\n", "bogus"),
    (
        "unknown-nested-key",
        "families: [vae]\nmodels:\n  vae:\n    latnt_dim: 3\n",
        "models.vae.latnt_dim",
    ),
    (
        "string-for-int",
        "families: [vae]\nmodels:\n  vae:\n    latent_dim: sixteen\n",
        "models.vae.latent_dim",
    ),
    ("string-for-float", "families: [vae]\nevaluator:\n  lr: fast\n", "evaluator.lr"),
    ("string-for-list", "families: vae\n", "families"),
    (
        "latent-dim-zero",
        "families: [vae]\nmodels:\n  vae:\n    latent_dim: 0\n",
        "models.vae.latent_dim",
    ),
    ("num-samples-one", "families: [vae]\nevaluate:\n  num_samples: 1\n", "evaluate.num_samples"),
    ("unknown-family", "families: [vea]\n", "families.0"),
    ("duplicate-family", "families: [vae, vae]\n", "families"),
    ("empty-families", "families: []\n", "families"),
    ("missing-families", "seeds: [0]\n", "families"),
    ("unknown-dataset", "families: [vae]\ndataset:\n  name: imagenet\n", "dataset.name"),
    # Training seeds: a list of distinct seeds in 0..2^32 - 1 replaces the one `seed`.
    ("old-seed-key", "families: [vae]\nseed: 0\n", "seed"),
    ("seeds-not-a-list", "families: [vae]\nseeds: 0\n", "seeds"),
    ("empty-seeds", "families: [vae]\nseeds: []\n", "seeds"),
    ("duplicate-seed", "families: [vae]\nseeds: [0, 0]\n", "seeds"),
    ("negative-seed", "families: [vae]\nseeds: [-1]\n", "seeds.0"),
    ("seed-above-2-32", "families: [vae]\nseeds: [0, 4294967296]\n", "seeds.1"),
    ("negative-evaluator-seed", "families: [vae]\nevaluator:\n  seed: -1\n", "evaluator.seed"),
    ("unknown-split", "families: [vae]\nevaluate:\n  split: train\n", "evaluate.split"),
    ("one-sample-set", "families: [vae]\nevaluate:\n  sample_seeds: 1\n", "evaluate.sample_seeds"),
    # No value is infinite or NaN (a float with only a lower bound would otherwise take it).
    ("infinite-lr", "families: [vae]\nmodels:\n  vae:\n    lr: .inf\n", "models.vae.lr"),
    ("overflowing-float", "families: [vae]\nevaluator:\n  lr: 1e400\n", "evaluator.lr"),
    ("nan-float", "families: [vae]\nevaluator:\n  dropout: .nan\n", "evaluator.dropout"),
    # Sizes that would exhaust memory after training are refused before it.
    (
        "huge-sample-set",
        "families: [vae]\nevaluate:\n  num_samples: 10000000\n",
        "evaluate.num_samples",
    ),
    ("huge-eval-seed", "families: [vae]\nevaluate:\n  seed: 4294967296\n", "evaluate.seed"),
]
# Errors that are not about one key: (id, text, what the line must say instead).
BAD_FILES = [
    ("yaml-syntax-error", "families: [vae\nseeds: [0]\n", "not valid YAML at line"),
    ("top-level-list", "- vae\n", "top level"),
    ("empty-file", "", "top level"),
    # What PyYAML (YAML 1.1) and DVC (YAML 1.2) would read differently is refused, with its line.
    (
        "yaml-1.1-boolean",
        "families: [vae]\nmodels:\n  vae:\n    conditional: yes\n",
        "line 4: 'yes'",
    ),
    ("yaml-1.1-off", "families: [vae]\ntrainer:\n  compile: off\n", "line 3: 'off' is a boolean"),
    ("sexagesimal", "families: [vae]\nmodels:\n  vae:\n    max_epochs: 1:30\n", "line 4: '1:30'"),
    ("octal", "families: [vae]\nmodels:\n  vae:\n    max_epochs: 0755\n", "line 4: '0755'"),
    ("underscores", "families: [vae]\nmodels:\n  vae:\n    max_epochs: 1_000\n", "'1_000'"),
    (
        "duplicate-key",
        "families: [vae]\nseeds: [0]\nseeds: [1]\n",
        "line 3: key 'seeds' is written twice",
    ),
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def _config_error(path: Path) -> str:
    with pytest.raises(ConfigError) as info:
        load_params(path)
    return str(info.value)


@pytest.mark.parametrize(
    ("text", "key"),
    [pytest.param(text, key, id=case) for case, text, key in BAD_PARAMS],
)
def test_load_params_error_is_one_line_starting_with_the_key(
    tmp_path: Path, text: str, key: str
) -> None:
    path = _write(tmp_path, text)
    message = _config_error(path)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}:"), message


def test_duplicate_family_is_rejected_in_one_line(tmp_path: Path) -> None:
    message = _config_error(_write(tmp_path, "families: [vae, vae]\n"))
    assert "\n" not in message
    assert "families: Value error, a family is listed twice" in message


@pytest.mark.parametrize(
    ("text", "says"), [case[1:] for case in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_load_params_bad_file_is_one_line(tmp_path: Path, text: str, says: str) -> None:
    path = _write(tmp_path, text)
    message = _config_error(path)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    assert says in message


def test_load_params_missing_file(tmp_path: Path) -> None:
    message = _config_error(tmp_path / "nope.yaml")
    assert "\n" not in message
    assert message.startswith(f"{tmp_path / 'nope.yaml'}: file not found")


@pytest.mark.parametrize(
    ("text", "says"),
    [case[1:] for case in BAD_PARAMS + BAD_FILES],
    ids=[case[0] for case in BAD_PARAMS + BAD_FILES],
)
def test_cli_bad_params_exits_non_zero_with_one_line_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture, text, says
) -> None:
    monkeypatch.chdir(tmp_path)
    path = _write(tmp_path, text)
    # prepare reads no model section, so it does not check them (that imports every family's
    # code): every other command does, the evaluator first.
    command = "evaluator" if says.startswith("models.") else "prepare"
    assert main(["--params", str(path), command]) != 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith(f"genlab {command}: error: ")
    assert says in err
    assert sorted(os.listdir(tmp_path)) == ["params.yaml"]


def test_cli_missing_params_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["--params", "nope.yaml", "prepare"]) != 0
    _, err = capsys.readouterr()
    assert err.count("\n") == 1
    assert err.startswith("genlab prepare: error: nope.yaml: file not found")
    assert os.listdir(tmp_path) == []


def test_repository_params_yaml_loads_and_lists_every_key() -> None:
    """Every resolved key is written in params.yaml, so DVC can track each one a stage reads."""
    params = load_params(REPO_PARAMS)
    assert params.families
    assert params.model_dump() == yaml.safe_load(REPO_PARAMS.read_text())


def test_defaults_round_trip_through_yaml(tmp_path: Path) -> None:
    params = Params(families=list(MODELS))
    assert parse_params(params.model_dump()) == params
    path = _write(tmp_path, yaml.safe_dump(params.model_dump()))
    assert load_params(path) == params


@pytest.mark.parametrize("family", sorted(MODELS))
def test_family_schema_is_the_constructor(family: str) -> None:
    signature = inspect.signature(MODELS[family].__init__)
    ctor = {
        name: p.default
        for name, p in signature.parameters.items()
        if name != "self" and name not in DATA_ARGS
    }
    schema = family_params_model(family)
    assert set(schema.model_fields) == set(ctor) | TRAINING_KEYS
    # Defaults of the params section are the constructor's defaults, and model_kwargs is
    # exactly what the constructor takes.
    assert schema().model_kwargs() == ctor


def test_family_schema_rejects_constructor_without_defaults(monkeypatch) -> None:
    class Positional(MODELS["vae"]):
        def __init__(self, width: int, *, image_shape, levels, num_classes) -> None: ...

    monkeypatch.setitem(MODELS, "positional", Positional)
    # (A raising call is not cached, so the cache is left as it was.)
    with pytest.raises(TypeError, match="'width' must be keyword-only with a default"):
        family_params_model("positional")


def test_family_accessor_returns_the_section() -> None:
    params = parse_params({"families": ["vae"], "models": {"vae": {"latent_dim": 3}}})
    assert params.family("vae").model_kwargs()["latent_dim"] == 3
    assert TRAINING_KEYS.isdisjoint(params.family("vae").model_kwargs())


def test_config_hash_is_stable_and_tracks_hyperparameters() -> None:
    a = parse_params({"families": ["vae"]}).training_config("vae", 0)
    b = parse_params({"families": ["vae"]}).training_config("vae", 0)
    assert config_hash(a) == config_hash(b)
    assert len(config_hash(a)) == 16 and int(config_hash(a), 16) >= 0
    # Independent of key order.
    assert config_hash(dict(reversed(list(a.items())))) == config_hash(a)
    changed = parse_params({"families": ["vae"], "models": {"vae": {"latent_dim": 3}}})
    assert config_hash(changed.training_config("vae", 0)) != config_hash(a)
    # Each training seed is its own training; the list of seeds is not part of any one.
    params = parse_params({"families": ["vae"], "seeds": [0, 1]})
    assert config_hash(params.training_config("vae", 1)) != config_hash(a)
    assert config_hash(params.training_config("vae", 0)) == config_hash(a)
    # The evaluation protocol does not change what training produces.
    protocol = parse_params({"families": ["vae"], "evaluate": {"num_samples": 10}})
    assert config_hash(protocol.training_config("vae", 0)) == config_hash(a)


@pytest.mark.parametrize(
    ("seeds", "key", "says"),
    [
        ([0, 0], "seeds", "a seed is listed twice"),
        ([3, 1, 3], "seeds", "a seed is listed twice"),
        ([-1], "seeds.0", "greater than or equal to 0"),
        ([2**32], "seeds.0", f"less than or equal to {2**32 - 1}"),
        ([0, 2**32], "seeds.1", f"less than or equal to {2**32 - 1}"),
        ([], "seeds", "at least 1 item"),
        ([True], "seeds.0", "valid integer"),  # strict: a bool is not a seed
    ],
)
def test_bad_seeds_are_one_clear_error_naming_seeds(seeds: list, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"families": ["vae"], "seeds": seeds})
    message = str(info.value)
    assert "\n" not in message and "more problem" not in message, message  # one error
    assert message.startswith(f"params.yaml: {key}: "), message
    assert says in message, message


def test_seeds_keep_their_order_and_each_is_its_own_training() -> None:
    assert parse_params({"families": ["vae"]}).seeds == [0]  # the default: one seed
    top = parse_params({"families": ["vae"], "seeds": [2**32 - 1]})
    assert top.seeds == [2**32 - 1]
    params = parse_params({"families": ["vae"], "seeds": [5, 0, 2]})
    assert params.seeds == [5, 0, 2]
    for seed in params.seeds:
        assert params.training_config("vae", seed)["seed"] == seed
    assert "seeds" not in params.training_config("vae", 5)


@pytest.mark.parametrize(
    ("evaluate", "key"),
    [
        ({"split": "train"}, "evaluate.split"),
        ({"sample_seeds": 1}, "evaluate.sample_seeds"),
        ({"sample_seeds": 101}, "evaluate.sample_seeds"),
        ({"bootstrap": 5}, "evaluate.bootstrap"),
        ({"bootstrap": 10001}, "evaluate.bootstrap"),
        ({"confidence": 1.0}, "evaluate.confidence"),
        ({"confidence": 0.5}, "evaluate.confidence"),
        ({"copying_cells": 0}, "evaluate.copying_cells"),
        ({"copying_cells": 101}, "evaluate.copying_cells"),
        ({"copying_tau": -0.1}, "evaluate.copying_tau"),
        ({"copying_tau": 1.0}, "evaluate.copying_tau"),
        ({"num_samples": "all"}, "evaluate.num_samples"),
        ({"num_samples": 1}, "evaluate.num_samples"),
    ],
)
def test_the_protocol_keys_validate(evaluate: dict, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_params({"families": ["vae"], "evaluate": evaluate})
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"params.yaml: {key}: "), message


def test_the_protocol_defaults_and_bounds_parse() -> None:
    default = parse_params({"families": ["vae"]}).evaluate
    assert (default.split, default.num_samples, default.sample_seeds) == ("test", None, 5)
    assert 0.5 < default.confidence < 1 and default.bootstrap >= 10
    edges = {
        "split": "val",
        "num_samples": None,  # null: the validation split's size
        "sample_seeds": 2,
        "bootstrap": 10,
        "confidence": 0.99,
        "copying_cells": 1,
        "copying_tau": 0.0,
    }
    parsed = parse_params({"families": ["vae"], "evaluate": edges}).evaluate
    assert {k: getattr(parsed, k) for k in edges} == edges
    top = {"sample_seeds": 100, "bootstrap": 10000, "copying_cells": 100, "num_samples": 2}
    parsed = parse_params({"families": ["vae"], "evaluate": top}).evaluate
    assert {k: getattr(parsed, k) for k in top} == top


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("families: [vae]\nmodels:\n  vae:\n    latent_dim: '16'\n", "models.vae.latent_dim"),
        ("families: [vae]\nmodels:\n  vae:\n    latent_dim: 16.0\n", "models.vae.latent_dim"),
        ("families: [vae]\nmodels:\n  vae:\n    conditional: 'yes'\n", "models.vae.conditional"),
    ],
)
def test_strict_types_do_not_coerce(tmp_path: Path, text: str, key: str) -> None:
    message = _config_error(_write(tmp_path, text))
    assert f": {key}: " in message


def test_exponent_floats_read_as_yaml_1_2(tmp_path: Path) -> None:
    """PyYAML reads `1e-3` as a string (YAML 1.1); params must read it as DVC -S writes it."""
    params = load_params(_write(tmp_path, "families: [vae]\nmodels:\n  vae:\n    lr: 3e-4\n"))
    assert params.family("vae").lr == pytest.approx(3e-4)
    params = load_params(_write(tmp_path, "families: [vae]\nmodels:\n  vae:\n    lr: 1\n"))
    assert params.family("vae").lr == 1.0
