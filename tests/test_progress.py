"""Progress of a training: Lightning's bar on a terminal, a plain line with an ETA in a log."""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import genlab.progress
from genlab.config import EvaluatorParams, TrainerParams, parse_params
from genlab.data.datasets import Split
from genlab.evaluation.evaluator import train_evaluator
from genlab.evaluation.likelihood import per_image_nll
from genlab.models import MODELS
from genlab.training import train_family

LINE = re.compile(
    r"^train vae \(seed 0\): epoch [12]/2, batch [1-8]/8 \(\d+%\), train/loss -?[\d.e+-]+, "
    r"\d+ img/s, elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)$"
)


def _params(tmp: Path, tiny_vae_kwargs: dict):
    return {
        "families": ["vae"],
        "trainer": {"sample_every_n_epochs": 1000, "log_every_n_steps": 1},
        "models": {"vae": tiny_vae_kwargs | {"max_epochs": 2, "batch_size": 250}},
        "tracking": {"uri": f"sqlite:///{tmp / 'mlflow.db'}", "system_metrics_every_s": None},
    }


def _train(params: dict, prepared: Path, root: Path):
    return train_family(
        parse_params(params),
        "vae",
        seed=0,
        prepared_dir=prepared,
        out_dir=root / "model",
        checkpoint_root=root / "checkpoints",
    )


@pytest.mark.parametrize("every_s", [0.0, 3600.0])
def test_a_training_in_a_log_writes_a_plain_line_with_an_eta(
    every_s: float,
    tmp_path: Path,
    prepared_digits: Path,
    tiny_vae_kwargs: dict,
    capsys: pytest.CaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """stderr is not a terminal here: no bar, one line per EVERY_S (every batch at 0) and one at
    the end, each with the epoch, the batch of all, the loss, img/s, elapsed and the ETA."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setattr(genlab.progress, "EVERY_S", every_s)
    _train(_params(tmp_path, tiny_vae_kwargs), prepared_digits, tmp_path)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train vae")]
    assert all(LINE.match(line) for line in lines), lines
    assert len(lines) == (8 + 1 if every_s == 0 else 1), lines  # 2 epochs x 4 batches, the end
    assert lines[-1].startswith("train vae (seed 0): epoch 2/2, batch 8/8 (100%)")
    assert lines[-1].endswith("ETA 0:00:00")
    assert "\r" not in err and "it/s]" not in err  # no bar


def test_a_training_on_a_terminal_shows_lightnings_bar(
    tmp_path: Path, prepared_digits: Path, tiny_vae_kwargs: dict
) -> None:
    """The same training with stderr a pseudo-terminal: Lightning's TQDM bar, no plain lines."""
    import yaml

    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(tmp_path, tiny_vae_kwargs)))
    code = (
        "import sys, yaml; from pathlib import Path; from genlab.config import parse_params; "
        "from genlab.training import train_family; root = Path(sys.argv[2]); "
        "train_family(parse_params(yaml.safe_load((root / 'params.yaml').read_text())), 'vae', "
        "seed=0, prepared_dir=sys.argv[1], out_dir=root / 'model', "
        "checkpoint_root=root / 'checkpoints')"
    )
    main, child = pty.openpty()
    env = {k: x for k, x in os.environ.items() if not k.startswith("MLFLOW_")}
    process = subprocess.Popen(
        [sys.executable, "-c", code, str(prepared_digits), str(tmp_path)],
        stdin=subprocess.DEVNULL,
        stdout=child,
        stderr=child,
        env=env | {"OMP_NUM_THREADS": "1", "COLUMNS": "120"},
    )
    os.close(child)
    out = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    os.close(main)
    assert process.wait(timeout=300) == 0, out.decode(errors="replace")[-3000:]
    text = out.decode(errors="replace")
    assert "Epoch 1/1" in text or "Epoch 1:" in text, text[-3000:]
    assert "it/s" in text and "\r" in text  # a bar, redrawn in place
    assert "ETA" not in text  # and no plain lines


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


STEP_LINE = re.compile(
    r"^evaluate vae \(seed 0\): sampling (\d+)/12 batches \((\d+)%\), "
    r"elapsed \d+:\d\d:\d\d, ETA \d+:\d\d:\d\d$"
)


def test_a_loop_in_a_log_writes_a_line_every_every_s_and_a_closing_one(monkeypatch) -> None:
    """Every item at EVERY_S = 0 (its count of all, the share, elapsed, ETA), then one closing
    line at 12/12 with ETA 0; the scope starts the line; nothing is lost from the iterable."""
    monkeypatch.setattr(genlab.progress, "EVERY_S", 0.0)
    log = io.StringIO()
    with genlab.progress.scope("evaluate vae (seed 0)"):
        got = list(genlab.progress.steps(range(12), "sampling", stream=log))
    assert got == list(range(12))
    lines = log.getvalue().splitlines()
    assert len(lines) == 12 + 1, lines
    counts = [int(STEP_LINE.match(line).group(1)) for line in lines]
    assert counts == [*range(1, 13), 12]
    assert lines[-1].endswith("12/12 batches (100%), elapsed 0:00:00, ETA 0:00:00")


def test_a_loop_shorter_than_every_s_writes_nothing_and_a_quiet_rank_never_writes(
    monkeypatch,
) -> None:
    log = io.StringIO()
    assert list(genlab.progress.steps(iter(range(3)), "scoring", stream=log)) == [0, 1, 2]
    assert log.getvalue() == ""  # 3 quick items: under EVERY_S
    monkeypatch.setattr(genlab.progress, "EVERY_S", 0.0)
    for stream in (io.StringIO(), _Terminal()):
        assert list(genlab.progress.steps(range(3), "x", quiet=True, stream=stream)) == [0, 1, 2]
        assert stream.getvalue() == ""
    # An iterable without a length: the total is unknown, the line says '?', no ETA.
    log = io.StringIO()
    list(genlab.progress.steps(iter(range(2)), "scoring", stream=log))
    assert log.getvalue().splitlines()[0] == "scoring 1/? batches, elapsed 0:00:00, ETA ?"


def test_a_loop_on_a_terminal_shows_a_tqdm_bar() -> None:
    screen = _Terminal()
    with genlab.progress.scope("evaluate vae (seed 0)"):
        assert list(genlab.progress.steps(range(5), "likelihood", stream=screen)) == [0, 1, 2, 3, 4]
    text = screen.getvalue()
    assert "\r" in text and "evaluate vae (seed 0): likelihood:   0%" in text and "0/5 [" in text
    assert "ETA" not in text  # the bar, not the plain line


def test_the_evaluations_likelihood_reports_progress(tiny: dict, monkeypatch, capsys) -> None:
    """A real `per_image_nll` pass reports its batches (here every batch, EVERY_S = 0) on stderr,
    under the stage's scope."""
    monkeypatch.setattr(genlab.progress, "EVERY_S", 0.0)
    model = MODELS["vae"](image_shape=(1, 8, 8), levels=17, num_classes=10, **tiny["vae"])
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 17, (40, 1, 8, 8), generator=g, dtype=torch.uint8)
    split = Split(x=x, y=torch.arange(40) % 10)
    with genlab.progress.scope("evaluate vae (seed 0)"):
        per_image_nll(model, split, batch_size=10, seed=0)
    lines = [x for x in capsys.readouterr().err.splitlines() if "likelihood" in x]
    assert all(x.startswith("evaluate vae (seed 0): likelihood (1 draws) ") for x in lines)
    shares = [line.split(" draws) ")[1].split(",")[0] for line in lines]
    assert shares == [f"{i}/4 batches ({25 * i}%)" for i in (1, 2, 3, 4, 4)]


def test_the_evaluators_training_in_a_log_writes_a_plain_line_with_an_eta(
    prepared_digits: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    """The evaluator's fit (minutes on MNIST) reports like a family's: here every batch of its
    one epoch (EVERY_S = 0), then the closing line, each with the loss, img/s and the ETA."""
    monkeypatch.setattr(genlab.progress, "EVERY_S", 0.0)
    params = EvaluatorParams(max_epochs=1, batch_size=250, width=4, feature_dim=8)
    train_evaluator(
        prepared_digits, tmp_path / "e.pt", params=params, trainer=TrainerParams(), seed=0
    )
    lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("train evaluator")]
    line = re.compile(
        r"^train evaluator: epoch 1/1, batch ([1-4])/4 \(\d+%\), train/loss [\d.e+-]+, "
        r"\d+ img/s, elapsed \d+:\d\d:\d\d, ETA (\d+:\d\d:\d\d|\?)$"
    )
    assert all(line.match(x) for x in lines), lines
    assert [line.match(x).group(1) for x in lines] == ["1", "2", "3", "4", "4"]
