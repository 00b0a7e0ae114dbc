"""Stage `prepare`: dataset -> data/prepared/{train,val,test}.pt + meta.json."""

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import prepare
from genlab.evaluation.sizes import check_sizes, set_size


def main(params: Params) -> None:
    # A dataset too small for the evaluation fails here, before anything is written or trained.
    meta = prepare(params.dataset, paths.PREPARED, check=lambda n: check_sizes(params.evaluate, n))
    counts = {name: int(info["n"]) for name, info in meta.splits.items()}
    sizes = ", ".join(f"{name} {n}" for name, n in counts.items())
    # The set size the protocol will use: evaluate.num_samples is a bound, so say what it gave.
    print(
        f"prepared {meta.dataset}: {sizes}; shape {meta.shape}, {meta.levels} levels; "
        f"sample sets of {set_size(params.evaluate, counts)} images"
    )
