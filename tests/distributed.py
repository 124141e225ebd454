"""Run a function in N processes as torchrun would start them, and collect what each returns.

Processes come from a forkserver that has imported torch and megatron once, so each test
pays for the imports only the first time. `fn` must be a module-level function (it is
pickled by name); its return value must be picklable. A failing rank's traceback is raised
here; a rank still running at the deadline (a hung collective) fails the test instead of
hanging it. Children use one thread each: the machines running the tests are small.
Children see the calling test's environment (as it is when run_distributed is called) plus
the torchrun variables.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback
from typing import Any, Callable

PRELOAD = ["torch", "illada.model.build", "illada.parallel"]


class DistributedTestError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _context():
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 120) -> list[Any]:
    """fn(rank, *args) in world_size processes; returns the results in rank order.

    A one-rank job gets no torchrun environment, so it rendezvouses without a port. A
    larger one picks a free port, which another process may take before rank 0 listens on
    it: that one race is retried with a fresh port."""
    for attempt in range(3):
        try:
            return _run_once(fn, world_size, args, timeout)
        except DistributedTestError as e:
            if "EADDRINUSE" not in str(e) or attempt == 2:
                raise
    raise AssertionError("unreachable")


def _run_once(fn: Callable[..., Any], world_size: int, args: tuple, timeout: float) -> list[Any]:
    ctx = _context()
    results = ctx.Queue()
    port = free_port() if world_size > 1 else None
    # Plain pickle bytes both ways: torch's multiprocessing pickler would pass tensors as
    # shared-memory handles, which die with the child that made them.
    call = pickle.dumps((fn, args, dict(os.environ)))
    procs = [ctx.Process(target=_child, args=(call, rank, world_size, port, results), daemon=False) for rank in range(world_size)]
    for p in procs:
        p.start()
    try:
        return _collect(procs, results, world_size, time.monotonic() + timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join(5)


def _child(call: bytes, rank: int, world_size: int, port: int | None, results) -> None:
    fn, args, environ = pickle.loads(call)
    os.environ.clear()
    os.environ.update(environ)
    if port is not None:
        os.environ.update(
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
        )
    import torch

    torch.set_num_threads(1)
    try:
        results.put((rank, True, pickle.dumps(fn(rank, *args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _collect(procs, results, world_size: int, deadline: float) -> list[Any]:
    done: dict[int, Any] = {}
    while len(done) < world_size:
        try:
            rank, ok, value = results.get(timeout=0.5)
        except queue.Empty:
            _check_alive(procs, done, results, deadline)
            continue
        if not ok:
            raise DistributedTestError(f"rank {rank} failed:\n{value}")
        done[rank] = pickle.loads(value)
    return [done[r] for r in range(world_size)]


def _check_alive(procs, done: dict, results, deadline: float) -> None:
    for rank, p in enumerate(procs):
        if rank not in done and p.exitcode is not None:
            time.sleep(1)  # a result written just before exiting may still be in flight
            if results.empty():
                raise DistributedTestError(f"rank {rank} exited with code {p.exitcode} without a result")
            return
    if time.monotonic() > deadline:
        waiting = [r for r in range(len(procs)) if r not in done]
        raise DistributedTestError(f"ranks {waiting} did not finish in time (a hung collective?)")
