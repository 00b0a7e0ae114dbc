"""How many images the evaluation protocol needs from each split, checked when the data is
prepared: a dataset too small for it fails at `genlab prepare`, in one line naming the split and
the key to change, instead of in the evaluate stage after every family has trained.

Pure Python (no torch): `genlab prepare` imports it.
"""

from __future__ import annotations

from collections.abc import Mapping

from genlab.config import EvaluateParams
from genlab.errors import ConfigError, DataError

NO_SPLIT = "none"


def heldout_split(reference_split: str) -> str:
    """The held-out real split for a reference split (`NO_SPLIT` when there is none)."""
    return "val" if reference_split == "test" else NO_SPLIT


def set_size(params: EvaluateParams, splits: Mapping[str, int]) -> int:
    """Images per sample set: `num_samples`, or (null) as many as the validation split holds.
    With a held-out real row, a set must not be larger than that row's one set of images."""
    val = int(splits["val"])
    n = params.num_samples if params.num_samples is not None else val
    if heldout_split(params.split) != NO_SPLIT and n > val:
        raise ConfigError(
            f"evaluate.num_samples is {n} but the held-out real images (the validation split) "
            f"are {val}: every row is compared at one size, so set evaluate.num_samples to at "
            f"most {val} (or null)"
        )
    return n


def check_sizes(params: EvaluateParams, splits: Mapping[str, int]) -> None:
    """DataError (or ConfigError) unless every split is large enough for the protocol: sample
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
