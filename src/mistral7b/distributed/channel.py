"""The driver-to-worker channel of tensor parallelism: the scheduler runs once (rank 0), the workers execute.

Each step, rank 0 broadcasts the step's plan (engine/model_runner.StepPlan: spans, token ids, block tables;
plain Python values between our own processes) over a gloo group, so the control messages never wait on the
GPU stream; then every rank runs the same model step, meeting in its all-reduces. `None` tells the workers
to stop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch.distributed as dist

from mistral7b.errors import WorkerError


class StepChannel:
    def __init__(self, group: Any, alive: Callable[[], bool] | None = None):
        """`alive`: False once a worker this process started has exited (a send to a dead peer can block in
        gloo until the timeout instead of failing)."""
        self.group, self.alive = group, alive

    def send(self, message: Any) -> None:
        if self.alive is not None and not self.alive():
            raise WorkerError("a tensor-parallel worker stopped or cannot be reached")
        try:
            dist.broadcast_object_list([message], src=0, group=self.group)
        except RuntimeError:  # a worker died: say so in one line (the engine then stops; the server 503s)
            raise WorkerError("a tensor-parallel worker stopped or cannot be reached") from None

    def recv(self) -> Any:
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]
