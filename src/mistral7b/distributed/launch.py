"""Starting a tensor-parallel group: under torchrun, or launched by the process itself.

Under torchrun (RANK / WORLD_SIZE / LOCAL_RANK set), every process runs the same command; rank 0 becomes the
driver (the engine, the server) and the others turn into workers inside `LLM(...)`, returning only to exit.
Without torchrun, rank 0 starts ranks 1 .. N-1 itself as child processes (spawned, so CUDA is safe) on a free
loopback port. Either way each rank loads only its slices of the checkpoint, and the workers then loop: take
a message from the driver's channel ("setup": build the paged cache and CUDA graphs; a StepPlan: run the
step), until `None`.

NCCL carries the model's all-reduces on GPUs (gloo on CPUs); the step plans always go over a gloo group.
"""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from mistral7b.distributed.channel import StepChannel
from mistral7b.model.tensor_parallel import Shard
from mistral7b.errors import RequestError, WorkerError


# A rank that died leaves the others waiting in a collective: after this long they fail instead of hanging
# (the driver's engine then reports the failure: 503 from the server). Long enough for the first step's
# kernel compilation and CUDA graph capture.
TIMEOUT = timedelta(minutes=10)


@dataclass
class WorkerSpec:
    """What a spawned worker needs to load its shard the way the driver loads its own. `build_runner(model,
    config, num_blocks)` builds the step runner the driver's engine sets up (engine/llm_engine.py's, handed
    in by the engine: this layer does not import the engine)."""

    model_path: str
    sliding_window: Any
    dtype: torch.dtype
    device_type: str
    threads: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    build_runner: Callable[..., Any] | None = None


@dataclass
class Group:
    shard: Shard
    channel: StepChannel
    device: torch.device
    children: list[multiprocessing.process.BaseProcess] = field(default_factory=list)


_torchrun_groups: list[Group] = []  # groups this process joined as a torchrun rank, until stopped


def under_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, size: int, device_type: str) -> Group:
    backend = "nccl" if device_type == "cuda" else "gloo"
    device = torch.device("cpu")
    if device_type == "cuda":
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=size, timeout=TIMEOUT,
                                **({"device_id": device} if device_type == "cuda" else {}))
    control = dist.new_group(backend="gloo", timeout=TIMEOUT) if backend != "gloo" else dist.group.WORLD
    return Group(Shard(rank, size, dist.group.WORLD), StepChannel(control), device)


def start_group(size: int, spec: WorkerSpec) -> Group:
    """This process's place in a group of `size` ranks (torchrun's, or one it starts now as rank 0)."""
    if under_torchrun():
        world = int(os.environ["WORLD_SIZE"])
        if world != size:
            raise RequestError(f"--tensor-parallel-size {size} but torchrun started {world} processes")
        group = _init(int(os.environ["RANK"]), size, spec.device_type)
        _torchrun_groups.append(group)
        return group
    if spec.device_type == "cuda" and torch.cuda.device_count() < size:
        raise RequestError(f"tensor parallelism over {size} GPUs, but {torch.cuda.device_count()} are visible")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ["MASTER_PORT"] = str(_free_port())
    ctx = multiprocessing.get_context("spawn")
    started = ctx.Queue()
    children = []
    for rank in range(1, size):
        child = ctx.Process(target=worker_main, args=(rank, size, spec, dict(os.environ), started), daemon=True,
                            name=f"mistral7b-tp-rank{rank}")
        child.start()
        children.append(child)
    _wait_started(children, started)
    group = _init(0, size, spec.device_type)
    group.children = children
    group.channel.alive = lambda: all(c.exitcode is None for c in children)
    return group


def _wait_started(children: list, started: Any) -> None:
    """Wait until every child is about to join the group; a child that dies first is a WorkerError, not a wait
    in the rendezvous until its timeout."""
    pending = len(children)
    while pending:
        try:
            started.get(timeout=0.2)
            pending -= 1
        except queue.Empty:
            dead = [c for c in children if c.exitcode is not None]
            if dead:
                for c in children:
                    c.kill()
                raise WorkerError(f"tensor-parallel worker {dead[0].name} exited with code {dead[0].exitcode} "
                                  "while starting (its error is printed above)")


def stop_group(group: Group) -> None:
    """Tell the workers to finish and leave the group with them (NCCL's teardown waits for every rank, so the
    driver must not wait for its children first), then reap the ones this process started."""
    if group in _torchrun_groups:
        _torchrun_groups.remove(group)
    try:
        try:
            group.channel.send(None)
        except WorkerError:  # a worker is already gone: nothing to tell it
            pass
        leave()
    finally:
        for child in group.children:
            child.join(timeout=30)
            if child.is_alive():
                child.kill()


def leave() -> bool:
    """Leave the process group; False when it must be left to the process's exit: NCCL communicators that
    CUDA graphs captured collectives on neither destroy nor abort (both waited forever on 2 H200s)."""
    if not dist.is_initialized():
        return True
    if dist.get_backend() == "nccl":
        return False
    dist.destroy_process_group()
    return True


def _exit_now(code: int) -> None:
    """End a torchrun rank without interpreter finalization: there PyTorch's c10d objects are torn down in an
    order that now and then aborts the process ("terminate called without an active exception", about one exit
    in 25 on the CI machine), which torchrun reports as a failure after the work succeeded."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def end_torchrun_driver(code: int) -> None:
    """After a CLI command on rank 0 under torchrun: stop the workers and end the process with `code`.
    A no-op in any other process."""
    if not _torchrun_groups:
        return
    for group in list(_torchrun_groups):
        stop_group(group)
    _exit_now(code)


def end_torchrun_worker(group: Group) -> None:
    """A torchrun worker whose driver has finished: leave the group and end the process."""
    if group in _torchrun_groups:
        _torchrun_groups.remove(group)
    leave()
    _exit_now(0)


def serve_steps(model: torch.nn.Module, group: Group, build_runner: Callable[..., Any]) -> None:
    """A worker's loop: build what the driver builds, run every step it plans, until told to stop."""
    runner = None
    while True:
        message = group.channel.recv()
        if message is None:
            return
        if isinstance(message, tuple) and message[0] == "setup":
            _, config, num_blocks = message
            runner = build_runner(model, config, num_blocks)
        else:
            assert runner is not None, "a step came before the engine's setup"
            runner.execute(message)


def worker_main(rank: int, size: int, spec: WorkerSpec, env: dict[str, str], started: Any) -> None:
    """Entry point of a spawned rank: join the group, load the shard, serve steps."""
    os.environ.update(env)
    if spec.threads is not None:
        torch.set_num_threads(spec.threads)
    started.put(rank)
    group = _init(rank, size, spec.device_type)
    run_worker(group, spec)
    if not leave():
        os._exit(0)  # a spawned worker with NCCL: nothing is left to flush


def run_worker(group: Group, spec: WorkerSpec) -> None:
    from mistral7b.loading import open_checkpoint
    from mistral7b.model.build import build_model
    from mistral7b.model.fuse import fuse_projections

    checkpoint = open_checkpoint(spec.model_path, sliding_window=spec.sliding_window)
    model = build_model(checkpoint, spec.dtype, group.device, progress=False, shard=group.shard)
    fuse_projections(model)
    assert spec.build_runner is not None, "the engine hands its runner builder to its workers"
    serve_steps(model, group, spec.build_runner)
