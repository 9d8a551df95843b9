"""Shared benchmark harness for fastloss (every family's benchmark uses it).

What it does, in order of use:

* ``environment(device)``: one dict describing where the numbers come from (device name,
  threads, torch version, fastloss ``cpu_isa``, git commit with ``-dirty``, timestamp, ...).
* ``measure_bandwidth(device)``: a STREAM-like copy (``b.copy_(a)`` on large tensors); the best
  rate, counted as read + write = 2 x bytes per copy as STREAM does, is the peak bandwidth the
  floors are compared against.
* ``measure(fn, inputs, ...)``: times ``fn(inputs[i])`` cycling through pre-built input sets
  (so a set is never re-read from a warm cache when the sets together exceed the cache), with
  warm-up calls, then as many repeats as fit a time budget; returns median/min/IQR and the peak
  extra memory of one call.
* ``Results``: collects rows, derives GB/s, fraction of the floor and speedups against the
  baselines measured in the same run, prints a table, and writes ``<name>.json`` (header with
  the environment plus the list of rows) and ``<name>.png``.

Peak extra memory
-----------------
CUDA: ``torch.cuda.reset_peak_memory_stats()``; ``max_memory_allocated()`` after one call minus
``memory_allocated()`` before it (exact for the caching allocator's tensors; excludes the
CUDA context and workspace kept by cuBLAS etc.).

CPU: process-level and approximate. Freed heap memory is first handed back to the OS
(``malloc_trim(0)``), the process peak RSS is reset by writing ``5`` to
``/proc/self/clear_refs``, one call runs, and ``VmHWM`` (peak RSS) from ``/proc/self/status``
minus ``VmRSS`` before the call is the result. Anything else the process touches at the same
time counts too, pages that are allocated but never written do not, and allocations served
from memory the allocator kept resident are invisible; for small shapes (a few MB) the figure
is therefore noisy. Without ``/proc`` the field is None ("not measured").
"""

from __future__ import annotations

import ctypes
import datetime as _dt
import json
import math
import os
import platform
import statistics
import subprocess
import time
from typing import Any, Callable, Optional, Sequence

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def loadavg() -> Optional[list[float]]:
    """1/5/15-minute load averages (other processes competing for the cores skew CPU timings)."""
    try:
        with open("/proc/loadavg") as f:
            return [float(v) for v in f.read().split()[:3]]
    except (OSError, ValueError):
        return None


def cpu_busy_fraction(interval: float = 0.5) -> Optional[float]:
    """Fraction of all cores busy during ``interval`` seconds (from /proc/stat) while this
    process sleeps: how much other processes compete for the CPU right now."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)
        return sum(v), idle
    try:
        t0, i0 = read()
        time.sleep(interval)
        t1, i1 = read()
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, 1.0 - (i1 - i0) / max(1, t1 - t0))


def wait_for_quiet(threshold: float = 0.1, max_wait_s: float = 30.0) -> Optional[float]:
    """Sleep (in 0.5 s samples) until other processes keep less than ``threshold`` of the cores
    busy, or ``max_wait_s`` passed; returns the last busy fraction."""
    t0 = time.perf_counter()
    busy = cpu_busy_fraction()
    while busy is not None and busy >= threshold and time.perf_counter() - t0 < max_wait_s:
        busy = cpu_busy_fraction()
    return busy


def _cpu_snapshot() -> Optional[tuple[int, int, int]]:
    """(all jiffies, idle jiffies, this process's jiffies) from /proc/stat and /proc/self/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        with open("/proc/self/stat") as f:
            st = f.read().rsplit(")", 1)[1].split()
        return sum(v), v[3] + (v[4] if len(v) > 4 else 0), int(st[11]) + int(st[12])
    except (OSError, ValueError, IndexError):
        return None


def others_busy_between(a, b) -> Optional[float]:
    """Fraction of all cores that other processes kept busy between two _cpu_snapshot()s."""
    if a is None or b is None or b[0] <= a[0]:
        return None
    busy = (b[0] - a[0]) - (b[1] - a[1])
    return min(1.0, max(0.0, (busy - (b[2] - a[2])) / (b[0] - a[0])))


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return cpu_model()


def git_commit() -> str:
    """Short HEAD commit, with ``-dirty`` when tracked files differ from it. The environment
    variable FASTLOSS_GIT_COMMIT overrides it: the GPU machines run on a copy of the working
    tree whose .git can be older than the files."""
    if os.environ.get("FASTLOSS_GIT_COMMIT"):
        return os.environ["FASTLOSS_GIT_COMMIT"]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout
        return head + ("-dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _fastloss_info() -> dict:
    try:
        import fastloss
        info = {"fastloss_version": getattr(fastloss, "__version__", "?"),
                "cpu_isa": fastloss.cpu_isa(),
                "fastloss_built_with_cuda": fastloss.built_with_cuda()}
        info.update(extension_fingerprint())
        return info
    except Exception as e:  # the harness itself does not need fastloss
        return {"fastloss_version": None, "cpu_isa": None, "fastloss_error": repr(e)}


def extension_fingerprint() -> dict:
    """Path, mtime and sha256 prefix of the loaded fastloss extension: the git commit says
    what the tree was, this says which build was measured."""
    try:
        import hashlib
        import fastloss._C as ext
        path = ext.__file__
        with open(path, "rb") as f:
            digest = hashlib.sha256(f.read()).hexdigest()[:16]
        mtime = _dt.datetime.fromtimestamp(os.path.getmtime(path), _dt.timezone.utc)
        return {"fastloss_extension": path, "fastloss_extension_sha256": digest,
                "fastloss_extension_mtime": mtime.isoformat(timespec="seconds")}
    except Exception as e:
        return {"fastloss_extension": None, "fastloss_extension_error": repr(e)}


def meminfo_bytes(key: str = "MemAvailable") -> Optional[int]:
    """A field of /proc/meminfo in bytes (None without /proc)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def available_memory_bytes(device: str) -> Optional[int]:
    """Memory a new allocation can still get: MemAvailable on CPU, free device memory on CUDA
    (plus what torch's caching allocator holds but does not use)."""
    if device.startswith("cuda"):
        free, _total = torch.cuda.mem_get_info(torch.device(device))
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return meminfo_bytes("MemAvailable")


def cache_bytes(device: str) -> int:
    """Size of the last-level cache (L3 on CPU, L2 on CUDA); 32 MiB / 50 MiB when unknown."""
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(torch.device(device))
        return int(getattr(props, "L2_cache_size", 0) or 50 * 2**20)
    best = 0
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for idx in os.listdir(base):
            try:
                with open(os.path.join(base, idx, "size")) as f:
                    s = f.read().strip()
                mult = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
                best = max(best, int(s.rstrip("KMG")) * mult)
            except (OSError, ValueError):
                continue
    except OSError:
        pass
    return best or 32 * 2**20


def environment(device: str) -> dict:
    env = {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "device_name": device_name(device),
        "cpu_model": cpu_model(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "timestamp": _now(),
        "loadavg_start": loadavg(),
        "cpu_busy_others_start": cpu_busy_fraction(),
        "cpu_count": os.cpu_count(),
        "mem_total_bytes": meminfo_bytes("MemTotal"),
        "last_level_cache_bytes": cache_bytes(device),
    }
    env.update(_fastloss_info())
    if _TARGET_OVERRIDE:
        env["measure_target_s"] = _TARGET_OVERRIDE
    if device.startswith("cuda"):
        env["gpu_mem_total_bytes"] = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return env


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _time_calls(fn: Callable[[Any], Any], inputs: Sequence[Any], start: int, count: int,
                device: str, after: Optional[Callable[[Any], None]]) -> list[float]:
    """Seconds of each of ``count`` calls, cycling inputs from index ``start``."""
    out = []
    n = len(inputs)
    if device.startswith("cuda"):
        for k in range(count):
            inp = inputs[(start + k) % n]
            e0 = torch.cuda.Event(enable_timing=True)
            e1 = torch.cuda.Event(enable_timing=True)
            e0.record()
            fn(inp)
            e1.record()
            e1.synchronize()
            out.append(e0.elapsed_time(e1) / 1e3)
            if after is not None:
                after(inp)
    else:
        for k in range(count):
            inp = inputs[(start + k) % n]
            t0 = time.perf_counter()
            fn(inp)
            out.append(time.perf_counter() - t0)
            if after is not None:
                after(inp)
    return out


_LIBC = None


def _malloc_trim() -> None:
    global _LIBC
    try:
        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _proc_status_kb(key: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_extra_memory(fn: Callable[[Any], Any], inp: Any, device: str,
                      after: Optional[Callable[[Any], None]] = None) -> tuple[Optional[int], float, Any]:
    """Run ``fn(inp)`` once; return (peak extra bytes or None, seconds, fn's result).

    See the module docstring for how the peak is measured on CPU and CUDA.
    """
    if device.startswith("cuda"):
        dev = torch.device(device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        res = fn(inp)
        torch.cuda.synchronize(dev)
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(dev) - before
        if after is not None:
            after(inp)
        return int(peak), dt, res
    _malloc_trim()
    rss_before = _proc_status_kb("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        ok = rss_before is not None
    except OSError:
        ok = False
    t0 = time.perf_counter()
    res = fn(inp)
    dt = time.perf_counter() - t0
    peak = None
    if ok:
        hwm = _proc_status_kb("VmHWM")
        if hwm is not None:
            peak = max(0, hwm - rss_before) * 1024
    if after is not None:
        after(inp)
    return peak, dt, res


class Timing(dict):
    """Result of :func:`measure` (a dict, so it goes straight into a JSON row)."""


# FASTLOSS_BENCH_TARGET_S: seconds of timed calls per row instead of the defaults below and of
# the benchmarks' own target_s (a short GPU visit sets it, bench/gpu_check.sh; recorded in the environment header).
_TARGET_OVERRIDE = float(os.environ.get("FASTLOSS_BENCH_TARGET_S", "0") or 0)


def measure(fn: Callable[[Any], Any], inputs: Sequence[Any], device: str = "cpu", *,
            after: Optional[Callable[[Any], None]] = None,
            warmup: int = 2, target_s: Optional[float] = None, min_repeats: Optional[int] = None,
            max_repeats: Optional[int] = None, max_measure_s: Optional[float] = None,
            slow_call_s: Optional[float] = None, memory: bool = True) -> Timing:
    """Time ``fn(inp)`` for ``inp`` cycling through ``inputs`` (a list of pre-built input sets).

    * The second warm-up call measures the peak extra memory (``memory=True``), so that
      one-time set-up in the first (lazily built library state, per-thread GEMM buffers,
      caches: 6.5 MiB in fastloss's low_memory path and 158 MiB in torch's chunked linear
      cross-entropy on the CPU at 1024 x 256 x 32000, ad hoc at 2186a1e) is not counted as the
      call's memory; before 2186a1e's runs the first call was measured. So every variant
      runs at least twice, even one slower than ``slow_call_s``. More warm-up calls follow
      until ``warmup`` calls or ``target_s`` seconds of warm-up.
    * The number of timed repeats fills ``target_s`` (between ``min_repeats`` and
      ``max_repeats``); ``min_repeats`` is lowered when it would exceed ``max_measure_s``.
    * At least one timed call always follows the warm-up, except that a warm-up call slower
      than ``slow_call_s`` is the only sample (``samples_from_warmup=True`` in the result):
      a first call can be slower than later ones (on the CPU its fresh pages come from the
      OS for the first time), so this is a last resort to bound the run time.
    * ``after(inp)`` runs after every call, outside the timed region (e.g. drop ``.grad``).

    Defaults (target: FASTLOSS_BENCH_TARGET_S when set): CPU target 0.6 s, 3..100 repeats, at most 12 s, slow call 60 s;
    CUDA target 0.3 s, 10..1000 repeats, at most 5 s, slow call 10 s.
    """
    cuda = device.startswith("cuda")
    if _TARGET_OVERRIDE:
        target_s = _TARGET_OVERRIDE
    elif target_s is None:
        target_s = 0.3 if cuda else 0.6
    if min_repeats is None:
        min_repeats = 10 if cuda else 3
    if max_repeats is None:
        max_repeats = 1000 if cuda else 100
    if max_measure_s is None:
        max_measure_s = 5.0 if cuda else 12.0
    if slow_call_s is None:
        slow_call_s = 10.0 if cuda else 60.0
    if not inputs:
        raise ValueError("measure: inputs is empty")

    n_in = len(inputs)
    snap0 = _cpu_snapshot()
    idx = 0
    peak = None
    result = None
    warm_times = []
    if memory:
        warm_times.extend(_time_calls(fn, inputs, 0, 1, device, after))
        peak, dt, result = peak_extra_memory(fn, inputs[1 % n_in], device, after)
        warm_times.append(dt)
        idx = 2
    while len(warm_times) < max(1, warmup) and sum(warm_times) < target_s:
        warm_times.extend(_time_calls(fn, inputs, idx, 1, device, after))
        idx += 1
    t_est = warm_times[-1]

    from_warmup = False
    if t_est >= slow_call_s:
        samples = [min(warm_times)]
        from_warmup = True
    else:
        reps = int(target_s / max(t_est, 1e-9))
        reps = max(min_repeats, min(max_repeats, reps))
        if reps * t_est > max_measure_s:
            reps = max(1, int(max_measure_s / max(t_est, 1e-9)))
        samples = _time_calls(fn, inputs, idx, reps, device, after)

    others = others_busy_between(snap0, _cpu_snapshot())
    s = sorted(samples)
    q1, q3 = _quantile(s, 0.25), _quantile(s, 0.75)
    value = None
    if torch.is_tensor(result) and result.numel() == 1:
        value = float(result.float())
    return Timing(median_ms=statistics.median(s) * 1e3, min_ms=s[0] * 1e3,
                  iqr_ms=(q3 - q1) * 1e3, samples=len(s), samples_from_warmup=from_warmup,
                  warmup_calls=len(warm_times), input_sets=n_in,
                  peak_extra_mem_bytes=peak, result_value=value, cpu_busy_others=others)


def _quantile(sorted_vals: Sequence[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def num_input_sets(set_bytes: int, device: str, *, big_set_bytes: int = 2**30,
                   max_sets: int = 256) -> int:
    """How many input sets to rotate through so that they together exceed ~4x the last-level
    cache: at least 2, except that one set of ``big_set_bytes`` or more (tens of times any
    cache) is used alone to save memory."""
    if set_bytes >= big_set_bytes:
        return 1
    return int(max(2, min(max_sets, math.ceil(4 * cache_bytes(device) / max(set_bytes, 1)))))


# ---------------------------------------------------------------------------------------------
# Memory bandwidth (STREAM-like copy)
# ---------------------------------------------------------------------------------------------


def measure_bandwidth(device: str = "cpu", nbytes: Optional[int] = None, repeats: int = 10) -> dict:
    """Copy bandwidth: ``b.copy_(a)`` on two ``nbytes`` float32 tensors, counted as 2 x nbytes
    per copy (read a, write b; STREAM's convention, which ignores write-allocate traffic).
    Reports the best and the median rate; the best is used as the peak."""
    cuda = device.startswith("cuda")
    if nbytes is None:
        nbytes = (1 << 30) if cuda else (256 << 20)
    n = nbytes // 4
    a = torch.ones(n, dtype=torch.float32, device=device)
    b = torch.zeros_like(a)
    b.copy_(a)
    _sync(device)
    times = _time_calls(lambda _x: b.copy_(a), [None], 0, repeats, device, None)
    del a, b
    best, med = min(times), statistics.median(times)
    return {"method": f"torch copy_ of {nbytes / 2**20:.0f} MiB float32, bytes = 2 x size "
                      f"(read + write), best of {repeats}",
            "threads": torch.get_num_threads(),
            "best_GBps": 2 * nbytes / best / 1e9, "median_GBps": 2 * nbytes / med / 1e9}


def measure_matmul_peak(device: str = "cpu", dtype: torch.dtype = torch.float32,
                        n: Optional[int] = None, repeats: int = 8) -> dict:
    """Matmul rate of torch's own GEMM (MKL / cuBLAS) on square ``n`` x ``n`` operands of
    ``dtype``: the peak that flop floors are compared against (the best of ``repeats``)."""
    cuda = device.startswith("cuda")
    n = n or (8192 if cuda else 4096)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    a @ b
    _sync(device)
    times = _time_calls(lambda _x: a @ b, [None], 0, repeats, device, None)
    del a, b
    flops = 2.0 * n ** 3
    return {"method": f"torch.mm of two {n}x{n} {str(dtype).replace('torch.', '')}, "
                      f"best of {repeats}",
            "threads": torch.get_num_threads(),
            "best_TFLOPs": flops / min(times) / 1e12,
            "median_TFLOPs": flops / statistics.median(times) / 1e12}


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def fmt_bytes(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f} {unit}"
    return f"{n:.0f} B"


class Results:
    """Rows of one benchmark run, plus its environment header.

    A row is a dict; :meth:`add` fills in the environment fields and derived numbers. Rows
    with the same ``group`` key (op + options + shape + dtype) are compared with each other:
    every row gets ``speedup_vs[<variant>] = that variant's median / this median``.
    """

    ENV_ROW_FIELDS = ("device_name", "threads", "torch", "cpu_isa", "git_commit")

    def __init__(self, name: str, device: str, out_dir: str, *, bandwidth: Optional[dict] = None,
                 notes: Sequence[str] = ()):
        self.name = name
        self.device = device
        self.out_dir = out_dir
        self.env = environment(device)
        self.bandwidth = bandwidth
        self.notes = list(notes)
        self.rows: list[dict] = []
        self.busy_end: Optional[float] = None  # set by finish()
        self.title: Optional[str] = None        # the plot's title
        self.started = time.perf_counter()
        os.makedirs(out_dir, exist_ok=True)

    @property
    def peak_GBps(self) -> Optional[float]:
        return self.bandwidth["best_GBps"] if self.bandwidth else None

    def add(self, *, op: str, variant: str, shape: Sequence[int], dtype: torch.dtype | str,
            group: str, timing: Optional[dict] = None, floor_bytes: Optional[dict] = None,
            status: str = "ok", reason: Optional[str] = None, **extra) -> dict:
        """Add a row. ``floor_bytes``: {floor name: bytes that must move}; the first entry is
        the primary one (``bytes_moved``, ``achieved_GBps``, ``fraction_of_floor``)."""
        row: dict = {"op": op, "variant": variant, "group": group,
                     "shape": list(shape), "dtype": str(dtype).replace("torch.", ""),
                     "status": status}
        if reason:
            row["reason"] = reason
        row.update(extra)
        row["device"] = self.env["device"]
        for k in self.ENV_ROW_FIELDS:
            row[k] = self.env.get(k)
        row["timestamp"] = _now()
        la = loadavg()
        row["loadavg_1min"] = la[0] if la else None
        if timing is not None:
            row.update(timing)
        med_s = row.get("median_ms", None)
        med_s = med_s / 1e3 if med_s else None
        if floor_bytes:
            for i, (fname, nb) in enumerate(floor_bytes.items()):
                row[f"floor_bytes_{fname}"] = int(nb)
                gbps = nb / med_s / 1e9 if med_s else None
                row[f"achieved_GBps_{fname}"] = gbps
                row[f"fraction_of_floor_{fname}"] = (gbps / self.peak_GBps
                                                     if gbps is not None and self.peak_GBps else None)
                if i == 0:
                    row["bytes_moved"] = int(nb)
                    row["achieved_GBps"] = gbps
                    row["fraction_of_floor"] = row[f"fraction_of_floor_{fname}"]
        row["peak_bandwidth_GBps"] = self.peak_GBps
        self.rows.append(row)
        self._update_speedups(group)
        return row

    def _update_speedups(self, group: str) -> None:
        rows = [r for r in self.rows if r["group"] == group and r.get("median_ms")]
        for r in rows:
            r["speedup_vs"] = {o["variant"]: o["median_ms"] / r["median_ms"]
                               for o in rows if o is not r}
            mem = r.get("peak_extra_mem_bytes")
            r["mem_ratio_vs"] = {o["variant"]: (o["peak_extra_mem_bytes"] / mem)
                                 for o in rows if o is not r and mem
                                 and o.get("peak_extra_mem_bytes") is not None}

    # -- output ---------------------------------------------------------------------------

    @classmethod
    def load(cls, json_path: str) -> "Results":
        """A Results object from a written JSON file (e.g. to redraw its plot: ``plot(r)``)."""
        with open(json_path) as f:
            data = json.load(f)
        self = cls.__new__(cls)
        h = data["header"]
        self.name = h["name"]
        self.env = h["environment"]
        self.device = self.env["device"]
        self.out_dir = os.path.dirname(os.path.abspath(json_path))
        self.bandwidth = h.get("memory_bandwidth")
        self.notes = h.get("notes", [])
        self.rows = data["rows"]
        self.busy_end = h.get("cpu_busy_others_end")
        self.title = h.get("title")
        self.started = time.perf_counter() - h.get("wall_time_s", 0.0)
        return self

    def finish(self) -> None:
        """Record how busy the CPU is without us at the end of the run."""
        self.busy_end = cpu_busy_fraction()

    def header(self) -> dict:
        return {"name": self.name, "title": self.title, "environment": self.env, "memory_bandwidth": self.bandwidth,
                "wall_time_s": time.perf_counter() - self.started, "loadavg_end": loadavg(),
                "cpu_busy_others_end": self.busy_end,
                "notes": self.notes}

    def write_json(self, path: Optional[str] = None, partial: bool = False) -> str:
        path = path or os.path.join(self.out_dir, self.name + (".json.tmp" if partial else ".json"))
        tmp = path + ".writing.tmp"  # *.tmp is git-ignored
        with open(tmp, "w") as f:
            json.dump({"header": self.header(), "rows": self.rows}, f, indent=1, default=str)
        os.replace(tmp, path)
        return path

    def table(self, columns: Optional[Sequence[tuple[str, Callable[[dict], str]]]] = None) -> str:
        columns = columns or default_columns()
        cells = [[title for title, _ in columns]]
        for r in self.rows:
            cells.append([get(r) for _, get in columns])
        widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
        lines = []
        for j, c in enumerate(cells):
            last = len(columns) - 1  # the first four and the last (status) columns are text
            lines.append("  ".join(v.ljust(w) if i < 4 or i == last else v.rjust(w)
                                   for i, (v, w) in enumerate(zip(c, widths))).rstrip())
            if j == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)


def base_parser(doc: str):
    """The command line every benchmark script shares: --device (default cuda when fastloss
    has it, else cpu), --quick (tiny shapes, a smoke test) and --out (default bench/results)."""
    import argparse

    import fastloss

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"],
                    default="cuda" if fastloss.cuda_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: a smoke test")
    ap.add_argument("--out", default=os.path.join(REPO_ROOT, "bench", "results"))
    return ap


def measure_row(results: "Results", call: Callable[[Any], Any], device: str, base: dict,
                columns, measure_kw: dict, derived: Optional[Callable[[dict], dict]] = None,
                inputs: Optional[Sequence[Any]] = None) -> dict:
    """Time ``call`` (on ``inputs`` in rotation; default one input set, ``None``) and add its
    row: ``base`` fields, the timing and ``derived(timing)``; or an error row saying what
    failed. Prints the row, saves the partial JSON, and returns the row."""
    try:
        timing = measure(call, list(inputs) if inputs else [None], device, **measure_kw)
        row = results.add(timing=timing, **(derived(timing) if derived else {}), **base)
    except Exception as e:  # e.g. a baseline that does not fit in memory: report, go on
        row = results.add(status="error", reason=f"error: {type(e).__name__}: {e}", **base)
    print(" | ".join(get(row) for _, get in columns), flush=True)
    results.write_json(partial=True)
    return row


def skipped_row(results: "Results", reason: str, base: dict, columns) -> dict:
    """Add and print the row of a variant that was not run; ``reason`` starts with its status
    (``"missing: ..."``, ``"skipped: ..."``)."""
    row = results.add(status=reason.split(":")[0], reason=reason, **base)
    print(" | ".join(get(row) for _, get in columns), flush=True)
    return row


def finish_run(results: "Results", columns, *, baseline: str = "eager_reference",
               colors: Optional[dict] = None, t_start: Optional[float] = None) -> str:
    """The end of a benchmark script: print the table, write ``<name>.json`` (removing the
    partial ``.json.tmp``) and the PNG, and say where they are. Returns the JSON path."""
    results.finish()
    print()
    print(results.table(columns))
    json_path = results.write_json()
    tmp = os.path.join(results.out_dir, results.name + ".json.tmp")
    if os.path.exists(tmp):
        os.remove(tmp)
    VARIANT_COLORS.update(colors or {})
    try:
        png_path = plot(results, baseline=baseline)
    except ImportError as e:  # e.g. a GPU machine without matplotlib: the JSON is what matters
        png_path = f"(no PNG: {e}; redraw with python bench/harness.py plot {json_path})"
    if t_start is not None:
        print(f"\nwall time {time.perf_counter() - t_start:.1f} s; other processes kept "
              f"{100 * (results.busy_end or 0):.0f}% of the cores busy at the end "
              f"(load average {loadavg()})")
    print(f"wrote {json_path}\nwrote {png_path}")
    return json_path


def _f(v: Optional[float], spec: str, suffix: str = "") -> str:
    return "-" if v is None else format(v, spec) + suffix


def default_columns() -> list[tuple[str, Callable[[dict], str]]]:
    def shape(r):
        return "x".join(str(s) for s in r["shape"])

    def status(r):
        s = r["status"] if r["status"] == "ok" else r.get("reason", r["status"])
        return s if len(s) <= 60 else s[:57] + "..."

    def speed(key):
        return lambda r: _f(r.get("speedup_vs", {}).get(key), ".2f", "x")

    return [
        ("op", lambda r: r["op"] + (f" [{r['options']}]" if r.get("options") else "")),
        ("shape", shape),
        ("dtype", lambda r: r["dtype"]),
        ("variant", lambda r: r["variant"]),
        ("median ms", lambda r: _f(r.get("median_ms"), ".2f")),
        ("min ms", lambda r: _f(r.get("min_ms"), ".2f")),
        ("IQR ms", lambda r: _f(r.get("iqr_ms"), ".2f")),
        ("n", lambda r: str(r.get("samples", "-"))),
        ("GB/s", lambda r: _f(r.get("achieved_GBps"), ".1f")),
        ("floor%", lambda r: _f(r.get("fraction_of_floor") and 100 * r["fraction_of_floor"], ".0f")),
        ("peak mem", lambda r: fmt_bytes(r.get("peak_extra_mem_bytes"))),
        ("vs eager", speed("eager_reference")),
        ("vs torch", speed("torch")),
        ("status", status),
    ]


# ---------------------------------------------------------------------------------------------
# Plot
# ---------------------------------------------------------------------------------------------

VARIANT_COLORS = {"fastloss": "#1f77b4", "fastloss_inplace": "#17becf",
                  "eager_reference": "#7f7f7f", "torch": "#ff7f0e",
                  "liger_kernel": "#2ca02c"}


def plot(results: "Results", path: Optional[str] = None, *, baseline: str = "eager_reference",
         title: Optional[str] = None) -> str:
    """One figure, two panels: (top) speedup of each variant over ``baseline`` per group,
    (bottom) peak extra memory of every variant per group (both log scale). Groups whose
    baseline is missing are marked "no <baseline>"."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = path or os.path.join(results.out_dir, results.name + ".png")
    rows = [r for r in results.rows if r.get("shape")]  # run-level rows have no shape
    groups: list[str] = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    variants: list[str] = []
    for r in rows:
        if r["variant"] not in variants and r.get("median_ms"):
            variants.append(r["variant"])
    by = {(r["group"], r["variant"]): r for r in rows}
    labels = [next(r.get("label", r["group"]) for r in rows if r["group"] == g)
              for g in groups]

    def by_block(g):  # groups of one (shape, dtype) are separated by a vertical line
        r = next(r for r in rows if r["group"] == g)
        return (tuple(r["shape"]), r["dtype"])

    fig_w = max(10.0, 0.55 * len(groups) + 3)
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(fig_w, 10.5), sharex=True)
    xs = list(range(len(groups)))

    others = [v for v in variants if v != baseline]

    def slots(present):
        """x offsets of the bars of one group, centred, in the order of ``present``."""
        w = 0.8 / max(1, len(present))
        return {v: (k - (len(present) - 1) / 2) * w for k, v in enumerate(present)}, w

    drawn = set()
    for i, g in enumerate(groups):
        present = [v for v in others
                   if (by.get((g, v)) or {}).get("speedup_vs", {}).get(baseline)]
        off, w = slots(present)
        for v in present:
            y = by[(g, v)]["speedup_vs"][baseline]
            ax1.bar(i + off[v], y, width=w, color=VARIANT_COLORS.get(v),
                    label=None if v in drawn else f"{v} vs {baseline}")
            drawn.add(v)
            ax1.annotate(f"{y:.2f}" if y < 10 else f"{y:.0f}", (i + off[v], y),
                         ha="center", va="bottom", fontsize=6, rotation=90,
                         xytext=(0, 2), textcoords="offset points")
    ax1.axhline(1.0, color="k", lw=0.8)
    ys = [r["speedup_vs"][baseline] for r in rows if r.get("speedup_vs", {}).get(baseline)]
    if ys:  # room for the labels above the bars and the "no baseline" notes at 1x
        ax1.set_ylim(min(0.5, min(ys) / 2), max(10.0, max(ys) * 4))
    for i, g in enumerate(groups):
        b = by.get((g, baseline))
        if not b or not b.get("median_ms"):
            # no baseline: say why, and give the speedups over the variants that did run
            extra = [f"{v} vs {o}: {sp:.1f}x" for v in others
                     for o, sp in ((by.get((g, v)) or {}).get("speedup_vs") or {}).items()
                     if v == "fastloss"]
            ax1.text(i, 1.0, "\n".join([f"no {baseline} ({(b or {}).get('status', 'missing')})"]
                                        + extra),
                     ha="center", va="bottom", fontsize=6, rotation=90, color="#b00")
    ax1.set_yscale("log")
    ax1.set_ylabel(f"speedup over {baseline} (x, log)\nforward + backward, median")
    ax1.legend(fontsize=8, loc="upper left")
    ax1.grid(axis="y", which="both", alpha=0.3)

    drawn = set()
    for i, g in enumerate(groups):
        present = [v for v in variants if (by.get((g, v)) or {}).get("peak_extra_mem_bytes")]
        off, w = slots(present)
        for v in present:
            ax2.bar(i + off[v], by[(g, v)]["peak_extra_mem_bytes"] / 2**20, width=w,
                    color=VARIANT_COLORS.get(v), label=None if v in drawn else v)
            drawn.add(v)
        if i and by_block(groups[i - 1]) != by_block(g):
            for ax in (ax1, ax2):
                ax.axvline(i - 0.5, color="k", lw=0.6, alpha=0.5)
    ax2.set_yscale("log")
    ax2.set_ylabel("peak extra memory of one call (MiB, log)")
    ax2.legend(fontsize=8, loc="upper left")
    ax2.grid(axis="y", which="both", alpha=0.3)
    ax2.set_xticks(xs)
    ax2.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)

    env = results.env
    bw = results.bandwidth
    sub = (f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, "
           f"fastloss isa {env.get('cpu_isa')}, commit {env['git_commit']}"
           + (f", copy bandwidth {bw['best_GBps']:.1f} GB/s" if bw else ""))
    fig.suptitle((title or results.title or results.name) + "\n" + sub, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_summary(results: "Results", main: str = "fastloss") -> str:
    """One Markdown row per group: each variant's median time and peak extra memory, and
    the main variant's speedups and fraction of the memory floor, as measured (for READMEs)."""
    rows = [r for r in results.rows if r.get("shape")]
    groups: list[str] = []
    for r in rows:
        if r["group"] not in groups:
            groups.append(r["group"])
    variants = [v for v in ("fastloss", "fastloss_inplace", "torch", "liger_kernel", "eager_reference")
                if any(r["variant"] == v for r in rows)]
    head = (["loss", "shape", "dtype"] + [f"{v} ms" for v in variants]
            + [f"{main} vs {v}" for v in variants if not v.startswith(main)]
            + [f"peak mem {v}" for v in variants] + [f"{main} % of floor"])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g in groups:
        by = {r["variant"]: r for r in rows if r["group"] == g}
        any_r = next(iter(by.values()))
        m = by.get(main, {})
        cells = [any_r["op"] + (f" ({any_r['options']})" if any_r.get("options") else ""),
                 "x".join(map(str, any_r["shape"])), str(any_r["dtype"]).replace("torch.", "")]
        cells += [_f(by.get(v, {}).get("median_ms"), ".1f" if (by.get(v, {}).get("median_ms") or 0) >= 10
                     else ".2f") if by.get(v, {}).get("status", "ok") == "ok" else "skipped"
                  for v in variants]
        cells += [_f(m.get("speedup_vs", {}).get(v), ".2f", "x") for v in variants
                  if not v.startswith(main)]
        cells += [fmt_bytes(by.get(v, {}).get("peak_extra_mem_bytes")) for v in variants]
        cells += [_f(m.get("fraction_of_floor") and 100 * m["fraction_of_floor"], ".0f", "%")]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


if __name__ == "__main__":  # python bench/harness.py plot|markdown bench/results/<name>.json
    import sys
    if len(sys.argv) == 3 and sys.argv[1] == "plot":
        print(plot(Results.load(sys.argv[2])))
    elif len(sys.argv) == 3 and sys.argv[1] == "markdown":
        print(markdown_summary(Results.load(sys.argv[2])))
    else:
        sys.exit("usage: python bench/harness.py plot RESULTS.json   (redraws RESULTS.png)\n"
                 "       python bench/harness.py markdown RESULTS.json   (summary table)")
