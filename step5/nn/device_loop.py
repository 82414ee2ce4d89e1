"""The epoch loop (docs/training.md, "Two loops, one arithmetic"): one early-stopping bookkeeping
kept on the device, in two modes over :class:`~step5.nn.trainer.TrainingPass`'s arithmetic.
``host`` plans each epoch for the models still training (the CPU's loop, and the kill switch
for graphs); ``graph`` fixes every shape for the pass, so on CUDA an epoch is one replayable
program, and on the CPU it runs uncaptured, bit-identical to ``host``."""
from __future__ import annotations

import logging
import math
import os
from typing import TYPE_CHECKING, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from step5.devices import TRAIN_LOOP_ENV

if TYPE_CHECKING:  # the trainer imports this module; the pass type is only annotated here
    from step5.nn.trainer import TrainingPass

logger = logging.getLogger(__name__)

#: ``auto``: ``graph`` on CUDA, ``host`` elsewhere; ``host`` is also the kill switch for graphs.
TRAIN_LOOPS = ("auto", "host", "graph")


def device_backend(device: torch.device, hip_version: str | None = torch.version.hip) -> str:
    """``cuda``, ``rocm`` or ``cpu``: what trains on ``device``. A ROCm build of torch calls its
    GPUs ``cuda`` too; only the build (``torch.version.hip``) tells them apart."""
    if device.type == "cuda":
        return "rocm" if hip_version else "cuda"
    return "cpu"


_warned_blocked_capture = False


def resolve_train_loop(
    loop: str | None, device: torch.device, environ: Mapping[str, str] | None = None,
    *, hip_version: str | None = torch.version.hip,
) -> str:
    """``host`` or ``graph`` for this pass: ``loop``, else ``STEP5_TRAIN_LOOP``, else ``auto``;
    ``host`` (warned once per process) on a ROCm build: capture is proven on CUDA only, not on
    HIP graphs and the rigs' gfx1032 (an unofficial target via HSA_OVERRIDE_GFX_VERSION)."""
    global _warned_blocked_capture
    env = os.environ if environ is None else environ
    choice = loop if loop is not None else (env.get(TRAIN_LOOP_ENV) or "auto")
    if choice not in TRAIN_LOOPS:
        source = "loop" if loop is not None else TRAIN_LOOP_ENV
        raise ValueError(f"{source} must be one of {list(TRAIN_LOOPS)}, got {choice!r}")
    if choice == "auto":
        choice = "graph" if device.type == "cuda" else "host"
    if choice == "graph" and device_backend(device, hip_version) == "rocm":
        if not _warned_blocked_capture:
            _warned_blocked_capture = True
            logger.warning("the graph epoch loop is not available: torch is a ROCm build (HIP %s); Step 5 captures "
                           "epochs as graphs on CUDA only, so this worker trains with the host loop (same results, "
                           "one sync per epoch)", hip_version)
        return "host"
    return choice


class EpochLoop:
    """Train a :class:`~step5.nn.trainer.TrainingPass` with the ``host`` or ``graph`` loop
    (:func:`resolve_train_loop`); ``graph`` captures its epoch on CUDA only."""

    def __init__(self, p: TrainingPass, kind: str) -> None:
        self.p = p
        device, M = p.device, p.n_models
        self.fixed = kind == "graph"
        self.capture = self.fixed and device.type == "cuda"
        self._plan([True] * M)  # the graph loop's plan of every epoch
        # Early-stopping state, updated in place (a replayed graph reads and writes these).
        self.epoch = torch.zeros((), dtype=torch.long, device=device)
        self.stopped = torch.zeros(M, dtype=torch.bool, device=device)
        self.all_stopped = torch.zeros((), dtype=torch.bool, device=device)
        self.best_val = torch.full((M,), float("inf"), dtype=torch.float32, device=device)
        self.best_epoch, self.stale, self.epochs_run, self.diverged_at, self.stat_updates, self.best_stat_updates = (
            torch.zeros(M, dtype=torch.long, device=device) for _ in range(6))
        self.patience = torch.tensor([s.patience for s in p.specs], dtype=torch.long, device=device)
        self.restore_best = torch.tensor([s.restore_best for s in p.specs], dtype=torch.bool, device=device)

    def _plan(self, active: Sequence[bool]) -> None:
        """The steps of an epoch for the ``active`` models: rows per model per step, and in mini
        mode an index buffer of each model's shuffled rows (padding indexes row 0) and row masks."""
        p, B = self.p, self.p.batch_size
        if p.mode == "full":
            self.step_rows = [[n if a else 0 for n, a in zip(p.n_train, active)]]
        else:
            n_steps = max(math.ceil(n / B) for n, a in zip(p.n_train, active) if a)
            self.step_rows = [[max(0, min(B, n - s * B)) if a else 0 for n, a in zip(p.n_train, active)]
                              for s in range(n_steps)]
        self.rows_t = torch.tensor(self.step_rows, dtype=torch.float32, device=p.device)  # (S, M)
        self.stat_rows = [rows >= 2 for rows in self.rows_t]  # (M,) per step
        self.index: Tensor | None = None
        self.step_masks: list[Tensor] = []
        if p.mode == "mini":
            self.index = torch.zeros(p.n_models, len(self.step_rows) * B, dtype=torch.long, device=p.device)
            arange = torch.arange(B, device=p.device)[None, :]
            self.step_masks = [(arange < rows[:, None]).to(torch.float32) for rows in self.rows_t]

    def _shuffle(self, models: Iterable[int]) -> None:
        """Mini mode: a fresh row order for each of ``models``, one ``randperm`` from its own
        generator (eager, before the epoch runs)."""
        if self.index is not None:
            for m in models:
                n = self.p.n_train[m]
                self.index[m, :n] = torch.randperm(n, generator=self.p.generators[m], device=self.index.device)

    def _epoch(self) -> None:
        """One epoch: every step, the early-stopping MSE and the bookkeeping; no host sync."""
        p = self.p
        self.epoch.add_(1)
        active = ~self.stopped  # (M,)
        p.model.train()
        nonfinite = torch.zeros_like(self.stopped)
        for s, rows in enumerate(self.step_rows):
            if self.index is None:
                x, y, mask = p.Xtr, p.ytr, p.mask_tr
            else:
                x, y = p.batch(self.index, s)
                mask = self.step_masks[s]
            loss = p.train_step(x, y, mask, rows, self.rows_t[s], active)
            nonfinite |= ~torch.isfinite(loss)
            self.stat_updates.add_((self.stat_rows[s] & active).to(torch.long))
        val = p.stop_mse()  # (M,)
        bad = active & (nonfinite | ~torch.isfinite(val))
        ok = active & ~bad
        # restore_best=False: the "best" is always the latest epoch (no selection)
        improved = ok & ((val < self.best_val) | ~self.restore_best)
        self.epochs_run.copy_(torch.where(active, self.epoch, self.epochs_run))
        self.diverged_at.copy_(torch.where(bad, self.epoch, self.diverged_at))
        self.best_val.copy_(torch.where(improved, val, self.best_val))
        self.best_epoch.copy_(torch.where(improved, self.epoch, self.best_epoch))
        self.best_stat_updates.copy_(torch.where(improved, self.stat_updates, self.best_stat_updates))
        self.stale.copy_(torch.where(improved, torch.zeros_like(self.stale),
                                     torch.where(ok, self.stale + 1, self.stale)))
        patience_out = ok & ~improved & (self.patience > 0) & (self.stale >= self.patience)
        self.stopped |= bad | patience_out
        self.all_stopped.copy_(self.stopped.all())
        p.keep_best(improved)

    def run(self) -> tuple[np.ndarray, ...]:
        """Per model (arrays (M,)): epochs trained before stopping or diverging, the 1-based
        epoch of the weights in best_state, the epoch whose loss became non-finite (0: never),
        and the BatchNorm updates up to the best epoch (num_batches_tracked)."""
        epochs = self.p.config.epochs
        if self.capture:
            self._run_captured(epochs)
        elif self.fixed:
            self._run_eager(0, epochs)
        else:
            for _ in range(epochs):
                active = ~self.stopped.cpu().numpy()  # the host loop's one sync per epoch
                if not active.any():
                    break
                self._plan(active)
                self._shuffle(np.flatnonzero(active).tolist())
                self._epoch()
        return tuple(t.cpu().numpy() for t in (self.epochs_run, self.best_epoch, self.diverged_at,
                                               self.best_stat_updates))

    def _run_eager(self, done: int, epochs: int) -> None:
        """Epochs ``done + 1 ..`` without capture, checking after each (a sync: free on a CPU)."""
        while done < epochs and not (done > 0 and bool(self.all_stopped)):
            self._shuffle(range(self.p.n_models))
            self._epoch()
            done += 1

    def _run_captured(self, epochs: int) -> None:
        device = self.p.device
        key = str(device)
        main = torch.cuda.current_stream(device)
        if key not in _CAPTURE_STREAMS:
            _CAPTURE_STREAMS[key] = torch.cuda.Stream(device)
        side = _CAPTURE_STREAMS[key]
        flags = torch.zeros(2, dtype=torch.bool, pin_memory=True)
        done = [torch.cuda.Event(), torch.cuda.Event()]

        def flag_stopped(epoch: int) -> None:  # after an epoch: has every model stopped?
            flags[epoch % 2].copy_(self.all_stopped, non_blocking=True)
            done[epoch % 2].record(main)

        first = 1
        if key not in _WARM_DEVICES:
            # The process's first capture on this device: epoch 1 runs eagerly on the
            # capture stream first, the warm-up a capture needs (library handles, the
            # stream's cuBLAS workspace, autograd's device threads). It is a real epoch.
            self._shuffle(range(self.p.n_models))
            side.wait_stream(main)
            with torch.cuda.stream(side):
                self._epoch()
            main.wait_stream(side)
            flag_stopped(1)
            first = 2
        if first > epochs:
            return
        graph = self._capture(side, main)
        if graph is None:
            self._run_eager(first - 1, epochs)
            return
        _WARM_DEVICES.add(key)
        for e in range(first, epochs + 1):
            if e >= 3:
                # Had every model stopped by epoch e-2? Read one epoch late, so that
                # epoch e-1 keeps the device busy meanwhile.
                done[e % 2].synchronize()
                if bool(flags[e % 2]):
                    break
            self._shuffle(range(self.p.n_models))
            graph.replay()
            flag_stopped(e)

    def _capture(self, side: torch.cuda.Stream, main: torch.cuda.Stream) -> torch.cuda.CUDAGraph | None:
        """The epoch as a CUDA graph, or None (logged) if this pass's epoch cannot be
        captured: it then trains uncaptured, with the same results."""
        graph = torch.cuda.CUDAGraph()
        for g in self.p.generators:
            graph.register_generator_state(g)
        # capture_begin/end directly: torch.cuda.graph() would also gc.collect() and empty
        # the cache, once per pass. Capturing records kernels without running them, so a
        # failed capture leaves every tensor as it was.
        side.wait_stream(main)
        try:
            with torch.cuda.stream(side):
                graph.capture_begin()
                try:
                    self._epoch()
                finally:
                    graph.capture_end()
        except RuntimeError as exc:
            logger.warning("CUDA graph capture failed, this pass trains without it: %s", exc)
            torch.cuda.synchronize(self.p.device)
            return None
        main.wait_stream(side)
        return graph


#: Devices on which this process has captured an epoch: later passes skip the warm-up.
_WARM_DEVICES: set[str] = set()
#: One capture stream per device, reused by every pass (its library state stays warm).
_CAPTURE_STREAMS: dict[str, torch.cuda.Stream] = {}
