"""One DDP training step of the diffusion U-Net on the GPU(s) at hand, in two processes.

With two or more GPUs each process takes its own (NCCL); with one, both share it (gloo, which
moves CUDA tensors through the host: NCCL refuses two ranks on one device). Each rank draws its
half of one batch, takes a forward, backward and optimiser step through torch's
DistributedDataParallel, and the ranks then compare their parameters: after the all-reduced
step they must be identical. Prints the step time and the check.

    uv run python benchmarks/ddp_step.py             # CIFAR-sized images (3x32x32, 256 levels)
    uv run python benchmarks/ddp_step.py --cpu       # the same on the CPU (gloo), anywhere
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_main(rank: int, port: int, cpu: bool, batch: int, result: mp.SimpleQueue) -> None:
    from genlab.models import MODELS

    # training_step logs through self.log; with no Trainer here Lightning only warns, each step.
    warnings.filterwarnings("ignore", message=r"You are trying to `self.log\(\)`")
    gpus = 0 if cpu else torch.cuda.device_count()
    device = torch.device("cpu") if cpu else torch.device("cuda", rank % gpus)
    backend = "nccl" if gpus >= WORLD else "gloo"
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    dist.init_process_group(backend, rank=rank, world_size=WORLD)
    torch.manual_seed(0)  # the same initial weights on every rank
    model = MODELS["diffusion"](image_shape=(3, 32, 32), levels=256, num_classes=10).to(device)
    # The U-Net the family trains, behind DDP: the family's loss calls it, so its forward is
    # the wrapper's and the backward all-reduces the gradients.
    model.net = torch.nn.parallel.DistributedDataParallel(
        model.net, device_ids=None if cpu else [device.index]
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(1 + rank)  # each rank its own half of the batch
    x = torch.randint(0, 256, (batch // WORLD, 3, 32, 32), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (batch // WORLD,), generator=g)
    x, y = x.to(device), y.to(device)
    times = []
    for _ in range(3):  # the first is warm-up
        if not cpu:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss = model.training_step((x, y), 0)  # the family's own objective
        loss.backward()
        optimizer.step()
        if not cpu:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()]).cpu()
    gathered = [torch.zeros_like(flat) for _ in range(WORLD)]
    dist.all_gather(gathered, flat.to(device) if backend == "nccl" else flat)
    same = all(torch.equal(gathered[0].cpu(), t.cpu()) for t in gathered[1:])
    if rank == 0:
        result.put((backend, str(device), min(times[1:]), same))
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="two CPU processes (gloo)")
    parser.add_argument("--batch", type=int, default=128, help="images of the global batch")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("ddp_step: no GPU here; --cpu runs the same step on the CPU")
        return 1
    context = mp.get_context("spawn")
    result = context.SimpleQueue()
    port = _free_port()
    mp.start_processes(
        rank_main, args=(port, args.cpu, args.batch, result), nprocs=WORLD, start_method="spawn"
    )
    backend, device, seconds, same = result.get()
    print(
        f"ddp_step: {WORLD} processes, {backend}, rank 0 on {device}: one step of "
        f"{args.batch} images in {seconds * 1e3:.1f} ms; parameters identical after the step: "
        f"{'yes' if same else 'NO'}"
    )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
