"""The runs of tools/bench/compare_algorithms.py, several at a time, each in a process of its own.

A run is `megatron_rpg.train.main(argv)` (exactly what `python -m megatron_rpg.train ARGV` runs) in a
child forked from the study process, which imported the trainer (torch, megatron-core, matplotlib)
once: a fresh interpreter per run spends ~8 s of a ~20 s tiny run importing them. The child has
its own process group (a file rendezvous, no port), RNGs and model, and exits when its run ends;
nothing of one run reaches another. Where fork is missing, each run is a `python -m
megatron_rpg.train` subprocess instead.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), PYTHONWARNINGS="ignore")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, env.get("PYTHONPATH", "")) if p)
    return env


def run_tool(command: list[str], log: str) -> None:
    """One tool (model build, SFT, conversion) as a subprocess; its output to `log`."""
    with open(log, "w", encoding="utf-8") as f:
        done = subprocess.run(command, cwd=ROOT, env=_env(), stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} exited {done.returncode}; its output ends:\n{_tail(log)}")


def _tail(log: str) -> str:
    with open(log, encoding="utf-8", errors="replace") as f:
        return f.read()[-3000:]


def preload_trainer() -> None:
    """Import what every run imports, once, before the first fork."""
    os.environ.update({k: v for k, v in _env().items() if k in ("OMP_NUM_THREADS", "PYTHONWARNINGS")})
    import megatron_rpg.plot  # noqa: F401  (matplotlib: the run's own PNG)
    import megatron_rpg.train  # noqa: F401  (torch, megatron-core, the loop)


def _child(argv: list[str], log: str) -> None:
    """In the forked child: the run's output to `log`, then the trainer's entry point; never returns."""
    code = 1
    try:
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.chdir(ROOT)
        sys.argv = ["megatron_rpg.train", *argv]
        from megatron_rpg.train import main

        code = main(argv)
    except SystemExit as done:
        code = done.code if isinstance(done.code, int) else 1
    except BaseException:  # noqa: BLE001  (a crash is this run's failure, written to its log)
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def run_all(jobs: list[tuple[list[str], str, object]], parallel: int, on_done) -> None:
    """Runs each (argv, log, key), at most `parallel` at a time; `on_done(key, error_or_None, wall_s)`
    in the study process as each ends (error: the command and the tail of its log)."""
    fork = hasattr(os, "fork")
    if fork:
        preload_trainer()
    queue, running = list(jobs), {}
    while queue or running:
        while queue and len(running) < parallel:
            argv, log, key = queue.pop(0)
            if fork:
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    _child(argv, log)
                handle = pid
            else:
                handle = subprocess.Popen([sys.executable, "-m", "megatron_rpg.train", *argv], cwd=ROOT, env=_env(),
                                          stdout=open(log, "w", encoding="utf-8"), stderr=subprocess.STDOUT)
            running[handle if fork else handle.pid] = (handle, argv, log, key, time.perf_counter())
        if fork:
            pid, status = os.wait()
            code = os.waitstatus_to_exitcode(status)
        else:
            pid, code = _wait_any(running)
        _, argv, log, key, start = running.pop(pid)
        error = None if code == 0 else (f"python -m megatron_rpg.train {' '.join(argv)} exited {code}; "
                                        f"its output ends:\n{_tail(log)}")
        on_done(key, error, time.perf_counter() - start)


def _wait_any(running: dict) -> tuple[int, int]:
    while True:
        for pid, (handle, *_rest) in running.items():
            if handle.poll() is not None:
                handle.stdout.close()
                return pid, handle.returncode
        time.sleep(0.2)
