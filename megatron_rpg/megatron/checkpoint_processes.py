"""Megatron's checkpoint writer without processes that outlive the trainer.

megatron-core 0.16.1's torch_dist writer (dist_checkpointing/strategies/filesystem_async.py) collects
its results in a `spawn`-context `Manager().Queue()`: a server process (about 365 MB) plus
multiprocessing's resource_tracker, both started once and left running, and orphaned by a kill -9 of
the trainer. It also forks one writer process per file bucket during each save. In a synchronous
save (ours) the queue is only written and read by the trainer process itself, so an in-process
queue serves; the forked writers get PR_SET_PDEATHSIG, so they die with the process that forked them.

    writer_processes_die_with_trainer()     # once, before the first save
"""
from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading

_PR_SET_PDEATHSIG = 1
_installed = False
_forking_from_main_thread = False


def writer_processes_die_with_trainer() -> None:
    """Idempotent: the writer's result queue lives in this process, and every process forked from
    here from now on is killed (SIGKILL) when its parent dies."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if filesystem_async._results_queue is None:  # megatron makes its Manager queue lazily, at the first save
        filesystem_async._results_queue = queue.Queue()
    if hasattr(os, "register_at_fork") and _prctl() is not None:
        os.register_at_fork(before=_note_forking_thread, after_in_child=_die_with_parent)
    _installed = True


def _prctl():
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):  # not Linux: the queue change still avoids the Manager
        return None


def _note_forking_thread() -> None:
    global _forking_from_main_thread
    _forking_from_main_thread = threading.current_thread() is threading.main_thread()


def _die_with_parent() -> None:
    if not _forking_from_main_thread:  # the death signal follows the forking thread, not the process
        return
    parent = os.getppid()
    _prctl()(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the request took effect
        os._exit(1)
