"""`genlab score`: real image files and arrays on disk, a tiny PixelCNN trained once, the CLI."""

from __future__ import annotations

import csv
import math
import shutil
from pathlib import Path
from typing import NamedTuple

import lightning as L
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from genlab import paths
from genlab.cli import main
from genlab.data.prepared import Meta, load_split, read_meta
from genlab.evaluation.grids import to_uint8_pixels
from genlab.models import MODELS
from genlab.paths import MODEL_FILE
from genlab.scoring import read_images

REPO = Path(__file__).resolve().parents[1]


class Project(NamedTuple):
    root: Path  # params.yaml, data/prepared, models/<family>/seed0/model.ckpt
    meta: Meta
    test: torch.Tensor  # (N, 1, 8, 8) uint8 levels of the test split


def _fit_and_save(model: L.LightningModule, x: torch.Tensor, y: torch.Tensor, path: Path, **kw):
    trainer = L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=path.parent,
        **kw,
    )
    loader = DataLoader(TensorDataset(x, y), batch_size=32, shuffle=True)
    trainer.fit(model, loader)
    path.parent.mkdir(parents=True, exist_ok=True)
    trainer.save_checkpoint(path)


@pytest.fixture(scope="module")
def project(prepared_digits: Path, tmp_path_factory: pytest.TempPathFactory) -> Project:
    """A minimal project folder as the pipeline lays it out, with a tiny PixelCNN (exact
    likelihood) trained for a few epochs and a barely trained tiny EBM (energy only)."""
    root = tmp_path_factory.mktemp("project")
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    shutil.copytree(prepared_digits, root / "data" / "prepared")
    meta = read_meta(prepared_digits)
    train = load_split(prepared_digits, "train", meta)
    geometry = {"image_shape": meta.shape, "levels": meta.levels, "num_classes": meta.num_classes}
    torch.manual_seed(0)
    pixelcnn = MODELS["pixelcnn"](**geometry, channels=16, num_layers=3, conditional=False)
    _fit_and_save(
        pixelcnn,
        train.x,
        train.y,
        root / paths.family_model_dir("pixelcnn", 0) / MODEL_FILE,
        max_epochs=3,
    )
    ebm = MODELS["ebm"](**geometry, width=4, langevin_steps=2, sample_steps=3, buffer_size=32)
    ebm_file = root / paths.family_model_dir("ebm", 0) / MODEL_FILE
    _fit_and_save(ebm, train.x, train.y, ebm_file, max_steps=2)
    return Project(root, meta, load_split(prepared_digits, "test", meta).x)


def write_pngs(x: torch.Tensor, folder: Path, levels: int) -> list[str]:
    """Levels -> 8-bit grayscale PNG files at the pipeline's level -> pixel mapping."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, img in enumerate(to_uint8_pixels(x, levels)):  # img (1, H, W)
        names.append(f"digit_{i:03d}.png")
        Image.fromarray(img[0].numpy(), mode="L").save(folder / names[-1])
    return names


def score(project: Project, monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    """Run `genlab score ...` in the project folder: (exit code, stdout, stderr)."""
    monkeypatch.chdir(project.root)
    capsys.readouterr()
    code = main(["score", *args])
    out, err = capsys.readouterr()
    return code, out, err


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_png_and_npy_give_the_same_scores(project, tmp_path, monkeypatch, capsys):
    x = project.test[:20]
    names = write_pngs(x, tmp_path / "pngs", project.meta.levels)
    np.save(tmp_path / "digits.npy", x[:, 0].numpy().astype(np.int64))  # (N, H, W) levels

    # The PNG files read back as exactly the levels they were written from.
    assert torch.equal(read_images(tmp_path / "pngs", meta=project.meta).x, x)

    args = ["pixelcnn", str(tmp_path / "pngs"), "--out", str(tmp_path / "png.csv")]
    code, _, err = score(project, monkeypatch, capsys, *args)
    assert code == 0, err
    assert "of 20 images judged in-distribution" in err and "nats are exact" in err
    assert len(err.strip().splitlines()) == 1
    code, out, err = score(project, monkeypatch, capsys, "pixelcnn", str(tmp_path / "digits.npy"))
    assert code == 0, err
    (tmp_path / "npy.csv").write_text(out)  # without --out the CSV goes to stdout

    png, npy = read_csv(tmp_path / "png.csv"), read_csv(tmp_path / "npy.csv")
    columns = ["image", "nats", "bits_per_dim", "statistic", "in_distribution"]
    assert list(png[0]) == columns and list(npy[0]) == columns
    assert [r["image"] for r in png] == names
    assert [r["image"] for r in npy] == [str(i) for i in range(20)]
    for a, b in zip(png, npy, strict=True):
        assert a["nats"] == b["nats"] and a["in_distribution"] == b["in_distribution"]
        nats = float(a["nats"])
        assert nats > 0
        assert float(a["bits_per_dim"]) == pytest.approx(nats / (64 * math.log(2)), abs=1e-5)
        # statistic "likelihood" (params.yaml): the statistic is log p(x) = -nats
        assert float(a["statistic"]) == pytest.approx(-nats, abs=1e-5)
        assert a["in_distribution"] in ("true", "false")


def test_digits_are_in_distribution_and_noise_is_not(project, tmp_path, monkeypatch, capsys):
    levels = project.meta.levels
    noise = torch.randint(levels, (100, 8, 8), generator=torch.Generator().manual_seed(0))
    np.save(tmp_path / "test.npy", project.test.numpy())  # (N, 1, H, W)
    np.save(tmp_path / "noise.npy", noise.numpy())
    verdicts = {}
    for name in ("test", "noise"):
        out = tmp_path / f"{name}.csv"
        args = ["pixelcnn", str(tmp_path / f"{name}.npy"), "--out", str(out)]
        code, _, err = score(project, monkeypatch, capsys, *args)
        assert code == 0, err
        verdicts[name] = np.array([r["in_distribution"] == "true" for r in read_csv(out)])
    assert len(verdicts["test"]) == len(project.test)
    # The threshold rejects 5% of the validation split: about as much of the test split.
    assert verdicts["test"].mean() >= 0.85
    assert verdicts["noise"].mean() == 0.0


def test_energy_family_writes_energy_not_nats(project, tmp_path, monkeypatch, capsys):
    np.save(tmp_path / "one.npy", project.test[0, 0].numpy())  # (H, W): one image
    code, out, err = score(project, monkeypatch, capsys, "ebm", str(tmp_path / "one.npy"))
    assert code == 0, err
    rows = list(csv.DictReader(out.splitlines()))
    assert list(rows[0]) == ["image", "energy", "statistic", "in_distribution"]
    assert len(rows) == 1 and rows[0]["image"] == "0"
    assert float(rows[0]["statistic"]) == pytest.approx(-float(rows[0]["energy"]), abs=1e-5)
    assert "no nats or bits/dim" in err


def test_grey_images_in_other_modes_read_as_grey(project, tmp_path):
    """Palette, 16-bit, opaque grey+alpha and R = G = B colour files hold grey exactly."""
    x = project.test[:1]  # (1, 1, 8, 8)
    grey = to_uint8_pixels(x, project.meta.levels)[0, 0].numpy()  # (8, 8) uint8
    im = Image.fromarray(grey, mode="L")
    im.convert("P").save(tmp_path / "palette.png")
    im.convert("RGB").save(tmp_path / "rgb.bmp")
    im.convert("LA").save(tmp_path / "la.png")
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 0..65535
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    for name in ("palette.png", "rgb.bmp", "la.png", "sixteen.png"):
        assert torch.equal(read_images(tmp_path / name, meta=project.meta).x, x), name


def _bad_inputs(tmp: Path, levels: int) -> dict[str, tuple[Path, str]]:
    """Each bad input on disk, with a phrase its one-line error must contain."""
    ok = np.zeros((8, 8), np.uint8)
    (tmp / "empty").mkdir()
    (tmp / "mixed").mkdir()
    Image.fromarray(ok).save(tmp / "mixed" / "a.png")
    (tmp / "mixed" / "notes.txt").write_text("not an image")
    (tmp / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not really a png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp / "big.png")
    colour = np.zeros((8, 8, 3), np.uint8)
    colour[..., 0] = 200
    Image.fromarray(colour).save(tmp / "colour.png")
    np.save(tmp / "float.npy", np.zeros((2, 8, 8), np.float32))
    np.save(tmp / "shape.npy", np.zeros((2, 9, 9), np.int64))
    np.save(tmp / "ndim.npy", np.zeros((1, 2, 1, 8, 8), np.int64))
    np.save(tmp / "pixels.npy", np.full((2, 8, 8), 255, np.uint8))
    np.save(tmp / "none.npy", np.zeros((0, 8, 8), np.int64))
    (tmp / "notes.txt").write_text("not an image")
    return {
        "missing": (tmp / "nowhere", "not found"),
        "empty folder": (tmp / "empty", "holds no images"),
        "non-image in folder": (tmp / "mixed", "notes.txt is not an image file"),
        "corrupt image": (tmp / "corrupt.png", "cannot read image"),
        "wrong size": (tmp / "big.png", "big.png is 10x12 (HxW) but the model takes 8x8; resize"),
        "colour for grey data": (tmp / "colour.png", "colour image (mode 'RGB')"),
        "float array": (tmp / "float.npy", "float32 values; expected integer levels 0..16"),
        "wrong shape": (tmp / "shape.npy", "shape (2, 9, 9); expected levels shaped"),
        "wrong ndim": (tmp / "ndim.npy", "shape (1, 2, 1, 8, 8)"),
        "pixels not levels": (tmp / "pixels.npy", "values 255..255; expected integer levels"),
        "no images in array": (tmp / "none.npy", "holds no images"),
        "not an image file": (tmp / "notes.txt", "neither an image"),
    }


def test_bad_inputs_give_one_clear_line_and_no_output(project, tmp_path, monkeypatch, capsys):
    cases = _bad_inputs(tmp_path, project.meta.levels)
    good = tmp_path / "empty"  # any input: the family is refused first
    cases |= {
        "no checkpoint": (good, "models/flow/seed0/model.ckpt not found; "),
        "no likelihood or energy": (good, "gan cannot score images"),
    }
    for case, (path, phrase) in cases.items():
        family = {"no checkpoint": "flow", "no likelihood or energy": "gan"}.get(case, "pixelcnn")
        out = tmp_path / f"{case}.csv"
        args = [family, str(path), "--out", str(out)]
        code, stdout, err = score(project, monkeypatch, capsys, *args)
        assert code == 1, case
        assert err.startswith("genlab score: error: ") and err.count("\n") == 1, (case, err)
        assert phrase in err, (case, err)
        assert stdout == "" and not out.exists(), case
    assert (
        "uv run dvc repro train@flow-0" in score(project, monkeypatch, capsys, "flow", str(good))[2]
    )
    # Another training seed's model: its own path and stage.
    code, _, err = score(project, monkeypatch, capsys, "pixelcnn", str(good), "--seed", "1")
    assert code == 1 and "models/pixelcnn/seed1/model.ckpt not found" in err
    assert "train@pixelcnn-1" in err
    # A seed outside 0..2^32 - 1, or not a number: argparse's one line and exit code 2.
    for bad, says in (
        ("-1", "a seed is in 0..4294967295, got -1"),
        (str(2**32), f"a seed is in 0..4294967295, got {2**32}"),
        ("one", "not an integer: 'one'"),
    ):
        capsys.readouterr()
        with pytest.raises(SystemExit) as info:
            main(["score", "pixelcnn", str(good), "--seed", bad])
        assert info.value.code == 2, bad
        stdout, err = capsys.readouterr()
        assert (
            stdout == "" and err.splitlines()[-1] == f"genlab score: error: argument --seed: {says}"
        )


def test_seed_picks_that_training_seeds_model_and_defaults_to_the_first_seed(
    project, tmp_path, monkeypatch, capsys
):
    """`--seed k` scores with models/<family>/seed<k>/model.ckpt; without it, with the first of
    `seeds` in params.yaml."""
    root = tmp_path / "seeded"
    shutil.copytree(project.root, root)
    seeded = project._replace(root=root)
    meta = project.meta
    train = load_split(root / "data" / "prepared", "train", meta)
    geometry = {"image_shape": meta.shape, "levels": meta.levels, "num_classes": meta.num_classes}
    torch.manual_seed(3)
    other = MODELS["pixelcnn"](**geometry, channels=16, num_layers=3, conditional=False)
    other_file = root / paths.family_model_dir("pixelcnn", 3) / MODEL_FILE
    _fit_and_save(other, train.x, train.y, other_file, max_steps=1)
    x = project.test[:10]  # (10, 1, 8, 8)
    np.save(tmp_path / "x.npy", x.numpy())

    def nats(*args: str) -> list[float]:
        code, out, err = score(
            seeded, monkeypatch, capsys, "pixelcnn", str(tmp_path / "x.npy"), *args
        )
        assert code == 0, err
        return [float(r["nats"]) for r in csv.DictReader(out.splitlines())]

    def direct(seed: int) -> list[float]:
        file = root / paths.family_model_dir("pixelcnn", seed) / MODEL_FILE
        model = MODELS["pixelcnn"].load_from_checkpoint(file, weights_only=True).eval()
        with torch.no_grad():
            return (-model.log_prob(x).double()).tolist()

    first, third = nats("--seed", "0"), nats("--seed", "3")
    assert first == pytest.approx(direct(0), abs=1e-4)
    assert third == pytest.approx(direct(3), abs=1e-4)
    assert third != pytest.approx(first, abs=1e-2)  # another model, other numbers
    assert nats() == first  # params.yaml: seeds: [0]
    params = yaml.safe_load((root / "params.yaml").read_text()) | {"seeds": [3, 0]}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    assert nats() == third
