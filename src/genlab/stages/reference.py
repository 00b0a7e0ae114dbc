"""Stage `reference`: the real data's features under the evaluation protocol, data/reference/.

Computed once per protocol and cached by DVC: every evaluate@<family>-<seed> stage and the
baselines stage read them instead of extracting them again.
"""

from genlab import paths
from genlab.config import Params
from genlab.data.prepared import read_meta
from genlab.evaluation.protocol import compute_reference, measurement, save_reference


def main(params: Params) -> None:
    meta = read_meta(paths.PREPARED)
    extractor, protocol = measurement(params.evaluate, paths.EVALUATOR, meta)
    reference = compute_reference(
        paths.PREPARED,
        extractor,
        protocol,
        batch_size=params.evaluate.batch_size,
        device=params.trainer.eval_device,
    )
    path = save_reference(reference, paths.REFERENCE, protocol)
    heldout = "" if reference.heldout is None else f", {len(reference.heldout)} held-out"
    print(
        f"reference: {extractor.name} features of {len(reference.reference)} "
        f"{protocol.reference_split}, {len(reference.train)} train{heldout} images -> {path}"
    )
