"""Run under `torchrun --nproc_per_node 2`: train every family with genlab's training path, one
after another in the same process group (what a multi-node job script does).

Usage: torchrun ... train_all.py PREPARED_DIR OUT_DIR PARAMS_YAML
"""

import sys
from pathlib import Path

import torch
import yaml

from genlab import paths
from genlab.config import parse_params
from genlab.training import train_family

torch.set_num_threads(1)
prepared, out, params_file = (Path(a) for a in sys.argv[1:4])
params = parse_params(yaml.safe_load(params_file.read_text()))
for family in params.families:
    for seed in params.seeds:
        train_family(
            params,
            family,
            seed=seed,
            prepared_dir=prepared,
            out_dir=out / paths.family_model_dir(family, seed),
            checkpoint_root=out / paths.family_checkpoints(family, seed),
        )
