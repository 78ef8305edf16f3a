"""One measurement point: jobs run by the load processes on a shared window of the wall clock.

The load processes (bench/load.py) are started once (spawn) and handed one job per point. Before a
point the bench waits for the machine to settle, so that other work does not share the window; in
the window it records the CPU of the server, of the load processes and of everything else.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.process
import os
import queue
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import load, profiling
from bench.common import proc_cpu_seconds, proc_read_bytes
from bench.load import Job, Result
from bench.options import Options
from bench.records import Window
from bench.servers import Server


class Pool:
    """Load processes started once (spawn), each running one job per measurement point."""

    def __init__(self, loaders: int, subscribers: int) -> None:
        context = multiprocessing.get_context("spawn")
        self._results: Any = context.Queue()
        self._queues: list[Any] = []
        self._processes: list[multiprocessing.process.BaseProcess] = []
        for index in range(loaders + subscribers):
            jobs: Any = context.Queue()
            process = context.Process(
                target=load.worker_main, args=(index, jobs, self._results), name=f"bench-load-{index}"
            )
            process.daemon = True
            process.start()
            self._queues.append(jobs)
            self._processes.append(process)
        self.loaders = list(range(loaders))
        self.subscribers = list(range(loaders, loaders + subscribers))
        ids = [self.submit(index, {"kind": "ping"}) for index in range(len(self._queues))]
        self.collect(ids, timeout=120)

    def submit(self, worker: int, job: Job) -> str:
        job_id = uuid.uuid4().hex
        self._queues[worker].put({**job, "job_id": job_id, "worker_index": worker})
        return job_id

    def collect(self, job_ids: list[str], timeout: float) -> list[Result]:
        wanted = set(job_ids)
        results: list[Result] = []
        deadline = time.monotonic() + timeout
        while wanted:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"load processes did not answer in {timeout:.0f} s")
            try:
                result = self._results.get(timeout=remaining)
            except queue.Empty:
                continue
            if result.get("job_id") in wanted:
                wanted.discard(result["job_id"])
                if "failed" in result:
                    raise RuntimeError(f"load process {result['worker']} failed:\n{result['failed']}")
                results.append(result)
        return results

    def close(self) -> None:
        for jobs in self._queues:
            jobs.put(None)
        for process in self._processes:
            process.join(timeout=10)
            if process.is_alive():
                process.terminate()


@dataclass(frozen=True)
class Measured:
    results: list[Result]  # one per job
    window: Window
    hotspots: dict[str, Any] | None = None  # with py-spy attached: profiling.Profile.as_dict()


def measure(
    pool: Pool,
    options: Options,
    server: Server,
    jobs: list[tuple[int, Job]],
    *,
    lead: float = 0.6,
    profile_to: Path | None = None,
) -> Measured:
    """Runs the jobs (worker, job) on one shared window, `lead` seconds after handing them out; with
    `profile_to`, py-spy records the server meanwhile into that file."""
    mode = options.mode
    busy_before = wait_quiet(patience=options.patience)
    start_at = time.time() + lead + mode.warmup
    common = {
        "target": server.address,
        "start_at": start_at,
        "warmup": mode.warmup,
        "duration": mode.duration,
        "tag": uuid.uuid4().hex[:8],
        "subscriber_client": options.subscriber_client,
    }
    profiler = None
    if profile_to is not None:
        profiler = profiling.Profiler(server.pid, mode.warmup + mode.duration + lead, profile_to)
    ids = [pool.submit(worker, {**common, **job}) for worker, job in jobs]
    _sleep_until(start_at)
    cpu0, busy0, read0 = proc_cpu_seconds(server.pid), machine_busy(), proc_read_bytes(server.pid)
    _sleep_until(start_at + mode.duration)
    cpu1, busy1, read1 = proc_cpu_seconds(server.pid), machine_busy(), proc_read_bytes(server.pid)
    results = pool.collect(ids, timeout=mode.warmup + mode.duration + lead + 120)
    server_pct = 100 * (cpu1 - cpu0) / mode.duration
    client_pct = 100 * sum(r.get("client_cpu_s", 0.0) for r in results) / mode.duration
    busy_pct = 100 * (busy1 - busy0) / mode.duration
    window = Window(
        server_cpu_pct=server_pct,
        client_cpu_pct=client_pct,
        machine_busy_pct=busy_pct,
        other_cpu_pct=busy_pct - server_pct - client_pct,
        busy_before_pct=busy_before,
        server_disk_read_mb_s=(read1 - read0) / mode.duration / 1e6,
    )
    hotspots = None
    if profiler is not None:
        errors = profiler.wait()
        if profiler.output.exists():
            hotspots = profiling.summarise(profiler.output).as_dict()
        else:
            print(f"  py-spy failed: {errors.strip()[-500:]}", flush=True)
    return Measured(results, window, hotspots)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or iowait), from /proc/stat."""
    fields = [float(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields) - idle) / os.sysconf("SC_CLK_TCK")


def wait_quiet(limit_pct: float = 25.0, patience: float = 120.0) -> float:
    """Waits (up to `patience` s) until the machine is nearly idle, so that other work (another
    test run) does not share the window; the busy share (% of one core) last seen."""
    deadline = time.monotonic() + patience
    warned = False
    while True:
        before = machine_busy()
        time.sleep(0.5)
        busy = 100 * (machine_busy() - before) / 0.5
        if busy < limit_pct or time.monotonic() > deadline:
            if busy >= limit_pct:
                print(
                    f"  (machine still {busy:.0f}% busy after {patience:.0f} s: measuring anyway)", flush=True
                )
            return busy
        if not warned:
            print(f"  (machine {busy:.0f}% busy with other work: waiting for it to settle)", flush=True)
            warned = True
        time.sleep(1.0)


def _sleep_until(epoch: float) -> None:
    delay = epoch - time.time()
    if delay > 0:
        time.sleep(delay)
