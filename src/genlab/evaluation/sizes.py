"""How many images the evaluation protocol needs from each split, checked when the data is
prepared: a dataset too small for it fails at `genlab prepare`, in one line naming the split and
the key to change, instead of in the evaluate stage after every family has trained.

Pure Python (no torch): `genlab prepare` imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from genlab.config import EvaluateParams
from genlab.errors import DataError

NO_SPLIT = "none"


def heldout_split(reference_split: str) -> str:
    """The held-out real split for a reference split (`NO_SPLIT` when there is none)."""
    return "val" if reference_split == "test" else NO_SPLIT


def set_size(params: EvaluateParams, splits: Mapping[str, int]) -> int:
    """Images per sample set: the validation split's size, at most `num_samples` (null: no
    bound). With a held-out real row the validation split is that row's one set of images, and
    every row is compared at one size; a bound lets one profile serve folders of any size (the
    mnist and folder profiles bound it at 500). Without one (tuning on val) `num_samples` is
    the size itself, with the validation split's size as its default."""
    val = int(splits["val"])
    if params.num_samples is None:
        return val
    if heldout_split(params.split) == NO_SPLIT:
        return params.num_samples
    return min(params.num_samples, val)


def check_sizes(params: EvaluateParams, splits: Mapping[str, int]) -> None:
    """DataError unless every split is large enough for the protocol: sample
    sets and the reference split larger than the precision/recall neighbourhood (k-NN radii),
    the training split holding the data-copying cells and a second neighbour for the
    nearest-neighbour ratio."""
    k = params.prc_neighborhood
    n = set_size(params, splits)
    need = {
        "the sample sets (evaluate.num_samples, or the validation split)": (n, k + 1),
        f"the reference split ({params.split})": (int(splits[params.split]), k + 1),
        "the training split": (int(splits["train"]), max(params.copying_cells, 3)),
    }
    for what, (have, least) in need.items():
        if have < least:
            raise DataError(
                f"{what} would hold {have} images but the evaluation needs at least {least} "
                f"(evaluate.prc_neighborhood {k}, evaluate.copying_cells "
                f"{params.copying_cells}): add images, change the split fractions, or lower "
                "those keys"
            )
