"""Run a test's worker on several CPU processes (gloo) and collect what each rank saved."""
from __future__ import annotations

import datetime
from pathlib import Path
from typing import Callable

import pytest
import torch
import torch.multiprocessing as mp


def run_ranks(worker: Callable, args: tuple, world: int, out_dir: Path, seconds: float = 240) -> list:
    """worker(rank, *args) on `world` spawned processes; each saves out_dir/rank{r}.pt. Fails the
    test past `seconds` and kills what is left."""
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    try:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=seconds)
        while not context.join(timeout=2):
            if datetime.datetime.now() > deadline:
                pytest.fail("distributed workers did not finish in time")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [torch.load(Path(out_dir) / f"rank{r}.pt", weights_only=False) for r in range(world)]
