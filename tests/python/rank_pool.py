"""A pool of worker processes joined in one gloo process group, started once per test module.

Starting processes costs seconds each (torch and mxmoe import in every one), so a module starts
``world`` ranks once and runs each test's task on them. ``run(fn, *args, world=n)`` calls
``fn(Rank, *args)`` on ranks 0..n-1 (n = 2 uses a subgroup of the first two ranks) and returns
their results in rank order, or raises AssertionError with every failing rank's traceback.

Every wait is bounded: the process group's own timeout (``GROUP_TIMEOUT_S``) bounds a collective
that a peer never joins, and ``run``'s timeout bounds a task, after which the pool is killed and
the remaining tests fail fast instead of hanging CI.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import queue
import tempfile
import traceback

import torch.multiprocessing as mp

GROUP_TIMEOUT_S = 30


@dataclasses.dataclass
class Rank:
    rank: int
    world: int
    group: object  # torch.distributed.ProcessGroup of the task's world size


def _serve(rank: int, world: int, init_file: str, tasks, results) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    os.environ["MXMOE_CPU_THREADS"] = "1"
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
        # Every size 2..world as the group of the first ranks (new_group is collective).
        # (new_group's default timeout is 30 minutes, not the world group's.)
        groups = {n: dist.new_group(list(range(n)),
                                    timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))
                  for n in range(2, world)}
        groups[world] = dist.group.WORLD
        results.put((rank, True, "ready"))
    except Exception:  # reported to the test process
        results.put((rank, False, traceback.format_exc()))
        return
    while True:
        task = tasks.get()
        if task is None:
            break
        fn, n, args = task
        try:
            value = fn(Rank(rank, n, groups[n]), *args)
            results.put((rank, True, value))
        except BaseException:  # reported to the test process
            results.put((rank, False, traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    def __init__(self, world: int, start_timeout_s: float = 300):
        self.world = world
        context = mp.get_context("spawn")
        self._dir = tempfile.TemporaryDirectory()
        init_file = os.path.join(self._dir.name, "init")
        self._tasks = [context.Queue() for _ in range(world)]
        self._results = context.Queue()
        self._processes = [
            context.Process(target=_serve, args=(r, world, init_file, self._tasks[r],
                                                 self._results), daemon=True)
            for r in range(world)]
        for p in self._processes:
            p.start()
        self._broken = None
        self._collect(list(range(world)), start_timeout_s, "start")

    def _collect(self, ranks: list[int], timeout_s: float, what: str) -> list:
        got: dict[int, tuple[bool, object]] = {}
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        while len(got) < len(ranks):
            left = (deadline - datetime.datetime.now()).total_seconds()
            dead = [r for r in ranks if r not in got and not self._processes[r].is_alive()]
            if left <= 0 or dead:
                missing = [r for r in ranks if r not in got]
                self._broken = (f"{what}: ranks {missing} did not answer within {timeout_s} s"
                                + (f" (ranks {dead} exited)" if dead else ""))
                self.close()
                raise AssertionError(self._broken)
            try:
                rank, ok, value = self._results.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            got[rank] = (ok, value)
        failed = [f"rank {r}:\n{v}" for r, (ok, v) in sorted(got.items()) if not ok]
        if failed:
            raise AssertionError(f"{what} failed on {len(failed)} rank(s):\n" + "\n".join(failed))
        return [got[r][1] for r in ranks]

    def run(self, fn, *args, world: int | None = None, timeout_s: float = 120) -> list:
        """fn(Rank, *args) on ranks 0..world-1; their results in rank order."""
        if self._broken:
            raise AssertionError(f"the rank pool is unusable after an earlier failure: "
                                 f"{self._broken}")
        n = self.world if world is None else world
        for r in range(n):
            self._tasks[r].put((fn, n, args))
        return self._collect(list(range(n)), timeout_s, getattr(fn, "__name__", "task"))

    def close(self) -> None:
        for q in self._tasks:
            with contextlib.suppress(ValueError, OSError):
                q.put(None)
        for p in self._processes:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()
                p.join(timeout=5)
        self._dir.cleanup()
