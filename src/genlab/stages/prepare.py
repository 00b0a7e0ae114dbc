"""Stage `prepare`: dataset -> data/prepared/{train,val,test}.pt + meta.json."""

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import prepare
from genlab.evaluation.sizes import check_sizes


def main(params: Params) -> None:
    # A dataset too small for the evaluation fails here, before anything is written or trained.
    meta = prepare(params.dataset, paths.PREPARED, check=lambda n: check_sizes(params.evaluate, n))
    sizes = ", ".join(f"{name} {info['n']}" for name, info in meta.splits.items())
    print(f"prepared {meta.dataset}: {sizes}; shape {meta.shape}, {meta.levels} levels")
