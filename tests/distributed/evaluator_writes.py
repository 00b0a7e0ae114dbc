"""Run under `torchrun --nproc_per_node 2` in a folder holding data/prepared and params.yaml:
`genlab evaluator`'s stage with each write of its shared metrics file recorded by rank, in
writers.txt (what the test reads: every DDP rank once wrote metrics/evaluator.json).

Usage: torchrun ... evaluator_writes.py
"""

import os
from pathlib import Path

import torch

import genlab.stages.evaluator as stage
from genlab.config import load_params

torch.set_num_threads(1)
real_write = stage.write_json_atomic


def recorded_write(path, data):
    with open("writers.txt", "a") as f:
        f.write(f"{os.environ.get('RANK', '?')} {Path(path)}\n")
    real_write(path, data)


stage.write_json_atomic = recorded_write
stage.main(load_params("params.yaml", check_models=False))
