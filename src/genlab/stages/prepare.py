"""Stage `prepare`: dataset -> data/prepared/{train,val,test}.pt + meta.json."""

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import prepare


def main(params: Params) -> None:
    meta = prepare(params.dataset, paths.PREPARED)
    sizes = ", ".join(f"{name} {info['n']}" for name, info in meta.splits.items())
    print(f"prepared {meta.dataset}: {sizes}; shape {meta.shape}, {meta.levels} levels")
