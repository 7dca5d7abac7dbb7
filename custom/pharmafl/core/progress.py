"""Progress of a training loop as a person sees it: step/total, loss and seconds, at most every few seconds."""

from __future__ import annotations

import math
import time
from collections.abc import Callable

TASK_FAILED = "task failed:"  # the start of the log line of a task a site could not run (simulate reports it)
PROGRESS_TAG = "progress:"  # the start of a training progress line (simulate shows it on the console)
StepCallback = Callable[[int, int, float], None]  # (steps done, steps in this call, loss of the last step)


class StepReporter:
    """A ``StepCallback`` that passes a line to ``say`` every ``interval`` seconds and at the last step.

    It also keeps the mean loss of the steps it saw (``mean_loss``), for TensorBoard.
    """

    def __init__(self, say: Callable[[str], None], prefix: str = "", interval: float = 10.0):
        self.say, self.prefix, self.interval = say, prefix, interval
        self.started = self.last = time.perf_counter()
        self.losses: list[float] = []

    def __call__(self, done: int, total: int, loss: float) -> None:
        self.losses.append(loss)
        now = time.perf_counter()
        if done == total or now - self.last >= self.interval:
            self.last = now
            self.say(f"{self.prefix}step {done}/{total}, loss {loss:.4f}, {now - self.started:.0f} s")

    @property
    def mean_loss(self) -> float:
        finite = [loss for loss in self.losses if math.isfinite(loss)]
        return sum(finite) / len(finite) if finite else float("nan")
