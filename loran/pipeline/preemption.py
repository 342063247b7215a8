"""Save and stop on SIGTERM, SIGINT (Ctrl-C), SIGUSR1 or SIGUSR2 (SLURM sends SIGTERM before preempting;
submitit 1.5 asks SLURM for SIGUSR2 before the time limit, older setups use SIGUSR1), then hand over.
A second Ctrl-C stops at once, without a checkpoint.

``PreemptionCallback.install()`` replaces the signal handlers with one that only sets a flag; at the end of
the current optimizer step the Trainer saves a checkpoint and stops. ``run_cell`` then calls
``handover()``: under submitit the previous handler is submitit's, which requeues the job (the requeued
job runs the same command and resumes from that checkpoint); anywhere else it raises ``Preempted``, and
running the same command again resumes. During an evaluation (``requested()`` is read before each generation batch)
the signal stops it between batches and is handed over the same way, with no record: the same command redoes the
evaluation from the final checkpoint.
"""
from __future__ import annotations

import logging
import signal
from typing import Any

from transformers import TrainerCallback

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(RuntimeError):
    """Training stopped on a signal after saving a checkpoint; run the same command to resume."""

    def __init__(self, message: str, signum: int = signal.SIGTERM) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


class PreemptionCallback(TrainerCallback):
    """Turns a termination signal into "save a checkpoint and stop" at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.previous: dict[int, Any] = {}

    def install(self) -> "PreemptionCallback":
        for sig in SIGNALS:
            self.previous[sig] = signal.getsignal(sig)
            signal.signal(sig, self._on_signal)
        return self

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        self.previous.clear()

    def _on_signal(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: the user does not want to wait for the checkpoint
        log.warning("received %s: saving a checkpoint at the end of this step, then stopping",
                    signal.Signals(signum).name)
        self.signum = signum

    def requested(self) -> bool:
        """Whether a termination signal has arrived (the run should stop at the next safe point)."""
        return self.signum is not None

    def on_step_end(self, args, state, control, **kwargs):
        if self.signum is not None:
            control.should_save = True
            control.should_training_stop = True
        return control

    def handover(self, checkpoint: str | None, during: str | None = None) -> None:
        """After training (or the `during` evaluation) stopped on a signal: let submitit requeue, else raise
        Preempted."""
        signum, previous = self.signum, self.previous.get(self.signum)
        self.restore()
        # submitit's handler: checkpoint() -> requeue with the same arguments (Ctrl-C is never handed over)
        if callable(previous) and previous is not signal.default_int_handler:
            log.warning("handing %s over to the launcher (checkpoint %s)", signal.Signals(signum).name, checkpoint)
            previous(signum, None)
        name = signal.Signals(signum).name
        if during is None:
            raise Preempted(f"stopped on {name} after saving {checkpoint}; run the same command again to resume",
                            signum)
        again = f"it resumes from {checkpoint}" if checkpoint else "no checkpoint yet, so it starts from the beginning"
        raise Preempted(f"stopped on {name} during the {during} (nothing recorded); run the same command again to "
                        f"redo it: {again}", signum)
