"""The `genlab` command is an ordinary process that imports what the command needs, no more."""

from __future__ import annotations

import gc
import importlib
import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from genlab import paths
from genlab.cli import STAGE_MODULES, main
from genlab.families import FAMILIES
from genlab.models import MODELS

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "lightning", "mlflow", "torch_fidelity", "torchvision", "matplotlib")


def _imported_by(argv: list[str], cwd: Path) -> list[str]:
    """Run `genlab.cli.main(argv)` in a fresh interpreter in `cwd`: which of HEAVY it imported
    (the command's exit code must be 0)."""
    code = (
        "import json, sys\n"
        "from genlab.cli import main\n"
        "try:\n"
        f"    code = main({argv!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        "assert code == 0, code\n"
        f"print(json.dumps(sorted(m for m in {HEAVY!r} if m in sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.splitlines()[-1])


def test_the_console_script_is_the_cli_itself() -> None:
    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "genlab"]
    assert script.value == "genlab.cli:entry"
    genlab = shutil.which("genlab", path=str(Path(sys.executable).parent))
    result = subprocess.run([genlab, "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    assert all(family in result.stdout for family in ("prepare", "train", "score", "sync"))


def test_help_imports_no_torch(tmp_path: Path) -> None:
    assert _imported_by(["--help"], tmp_path) == []
    assert _imported_by(["score", "--help"], tmp_path) == []


def test_prepare_imports_no_lightning(tmp_path: Path) -> None:
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert _imported_by(["prepare"], tmp_path) == ["torch"]
    assert (tmp_path / paths.PREPARED / "meta.json").is_file()


def test_the_light_family_names_are_the_registry() -> None:
    assert tuple(MODELS) == FAMILIES


@pytest.mark.parametrize("module", ["genlab.config", "genlab.paths", "genlab.families"])
def test_names_and_params_import_no_torch(module: str) -> None:
    code = f"import sys, {module}; print(any(m in sys.modules for m in {HEAVY!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_a_dataset_too_small_for_the_evaluation_fails_at_prepare_and_writes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Two validation images cannot make sample sets for a 3-nearest-neighbour precision and
    recall: `genlab prepare` says so, before anything is written or trained."""
    _folder_project(tmp_path, 20, {})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "would hold 2 images but the evaluation needs at least 4" in err
    assert not (tmp_path / paths.PREPARED).exists()


def test_prepare_says_the_set_size_that_num_samples_bounds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """evaluate.num_samples is a bound: above the validation split's size it gives that size,
    and `genlab prepare` prints the size the evaluation will use."""
    _folder_project(tmp_path, 100, {"num_samples": 500})
    monkeypatch.chdir(tmp_path)
    assert main(["prepare"]) == 0
    out = capsys.readouterr().out
    assert "train 80, val 10, test 10" in out and out.rstrip().endswith("sample sets of 10 images")


def _folder_project(tmp_path: Path, n: int, evaluate: dict) -> None:
    """params.yaml over a folder dataset of n random 8x8 grey images in one class."""
    import numpy as np
    from PIL import Image

    (tmp_path / "images" / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8)).save(
            tmp_path / "images" / "a" / f"{i}.png"
        )
    params = {
        "families": ["vae"],
        "dataset": {"name": "folder", "path": str(tmp_path / "images"), "image_size": 8},
        "evaluate": evaluate,
    }
    (tmp_path / "params.yaml").write_text(json.dumps(params))  # JSON is YAML


@pytest.mark.parametrize("command", sorted(STAGE_MODULES))
def test_each_command_runs_its_stage_module_with_the_collector_back_on(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each command's module (`cli.STAGE_MODULES`) has the entry point `cli.run` calls, and the
    garbage collector, paused while a command loads its params and imports its module
    (`cli._collector_paused`), is on again after it, also when that part fails: here a params
    file that fails the check, so the command stops with its one-line error."""
    module = importlib.import_module(STAGE_MODULES[command])
    assert callable(getattr(module, "run_score" if command == "score" else "main"))
    (tmp_path / "params.yaml").write_text("seeds: [0]\nnot_a_key: 1\n")
    monkeypatch.chdir(tmp_path)
    argv = {"train": ["train", "vae"], "evaluate": ["evaluate", "vae"]}
    argv |= {"score": ["score", "vae", "x.npy"]}
    assert gc.isenabled()
    assert main(argv.get(command, [command])) == 1
    assert gc.isenabled()


# A command that registers an exit handler (as MLflow and torch do), leaves an object whose
# finaliser only the interpreter's teardown would run, prints without a newline (buffered in a
# pipe) and returns status 3.
_COMMAND = """
import atexit, sys
import genlab.cli

class Teardown:
    def __del__(self):
        print("teardown ran", file=sys.stderr)

def command(argv=None):
    atexit.register(lambda: print("exit handler ran", file=sys.stderr))
    genlab.cli.LEFT = Teardown()
    sys.stdout.write("output")
    return 3

genlab.cli.main = command
genlab.cli.entry()
"""


def test_a_command_ends_after_its_exit_handlers_without_the_interpreter_teardown() -> None:
    """`genlab` (`cli.entry`) ends with the command's status once every exit handler has run,
    its output flushed, and skips the teardown (a second or more per stage process): an object
    left in a module is never finalised. Importing the CLI registers no exit handler, so the
    one `entry` registers is the first and runs last."""
    code = "import atexit, genlab.cli; print(atexit._ncallbacks())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "0"
    result = subprocess.run([sys.executable, "-c", _COMMAND], capture_output=True, text=True)
    assert (result.returncode, result.stdout) == (3, "output")
    assert result.stderr == "exit handler ran\n"
    # Without `entry`, the same command goes through the teardown.
    plain = _COMMAND.replace("genlab.cli.entry()", "sys.exit(genlab.cli.main())")
    result = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True)
    assert result.returncode == 3
    assert result.stderr == "exit handler ran\nteardown ran\n"


def test_an_argparse_exit_and_an_uncaught_exception_keep_their_status() -> None:
    """--help exits 0 and a usage error 2 through `entry`; an exception escaping the command
    is Python's own exit (traceback, status 1)."""
    for argv, status in ((["--help"], 0), (["no-such-command"], 2)):
        code = f"import sys, genlab.cli; sys.argv[1:] = {argv!r}; genlab.cli.entry()"
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert result.returncode == status, result.stderr
    failing = _COMMAND.replace("return 3", 'raise RuntimeError("boom")')
    result = subprocess.run([sys.executable, "-c", failing], capture_output=True, text=True)
    assert result.returncode == 1
    assert "RuntimeError: boom" in result.stderr and "teardown ran" in result.stderr
