"""What a run tells the person (or the cron log) watching it; everything goes to stderr, since stdout
may be the results themselves (`-o -`).

Modes: "rich" (a live bar on a terminal), "text" or "json" (one line per interval, for logs), "quiet"
(errors only). Counters are plain attributes; the rich bar and the log ticker read them from their own
threads, which is safe for ints and floats; the rate samples have a lock.

What the numbers mean, so that they tell the truth:
- work done is generated tokens of finished requests. Error records (bad lines, written in a burst at
  the start, and requests the engine failed) are counted apart (`failed`), never in rates or the ETA;
- rates are given over the whole run and over the last `window` seconds (what the run does now);
- the ETA is in tokens: remaining requests x mean generated tokens per finished request, less the tokens
  of requests in flight, over the recent rate; before any request has finished, the job's max_tokens
  over the plan's predicted rate (the streaming engine's) or the measured one;
- every JSON line carries "ts", an ISO-8601 UTC timestamp; the summary gives the model's load time and
  the device ("cpu (N threads)" or the GPU's name).
"""

from __future__ import annotations

import collections
import datetime
import json
import sys
import threading
import time

import psutil

from offbatch.units import format_bytes

MAX_LISTED_ERRORS = 20
RECENT_WINDOW_S = 30.0


def utc_timestamp() -> str:
    """Now as ISO-8601 UTC with milliseconds: 2026-01-05T12:34:56.789Z."""
    now = datetime.datetime.now(datetime.timezone.utc)
    return now.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def describe_device(device: str) -> str:
    """"cpu (N threads)" for the CPU (the threads torch computes with), the GPU's name for cuda[:N]."""
    import torch

    if not str(device).startswith("cuda"):
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    try:
        return f"{torch.cuda.get_device_name(torch.device(device))} ({device})"
    except Exception:  # noqa: BLE001 - a label is not worth failing a run for
        return str(device)


def pick_mode(log_format: str, quiet: bool, stream=None) -> str:
    if quiet:
        return "quiet"
    if log_format in ("text", "json"):
        return log_format
    stream = stream or sys.stderr
    return "rich" if getattr(stream, "isatty", lambda: False)() else "text"


def peak_host_bytes(samples: int = 0) -> int:
    """The larger of the sampled RSS and the kernel's own high-water mark (ru_maxrss, where it exists)."""
    peak = max(samples, psutil.Process().memory_info().rss)
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        peak = max(peak, maxrss if sys.platform == "darwin" else maxrss * 1024)
    except (ImportError, OSError):
        pass
    return peak


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def startup_words(st: dict) -> str:
    """The streaming engine's start-up (StreamingEngine.startup) in a few words; "" without one."""
    if "total_s" not in st:
        return ""
    fill = st["total_s"] - st["alloc_s"]  # read (and converted where the format does)
    rate = st.get("bytes", 0) / max(fill, 1e-9) / 1e9
    return (f"weights: {st['alloc_s']:.1f}s allocating host buffers, {fill:.1f}s reading at {rate:.1f} GB/s; "
            f"{st.get('resident_s', 0):.1f}s resident weights and slots, {st.get('kv_s', 0):.1f}s KV")


class Progress:
    def __init__(self, mode: str, interval: float = 10.0, stream=None, live_tokens=None,
                 clock=time.monotonic, window: float = RECENT_WINDOW_S):
        self.mode = mode
        self.interval = interval
        self.stream = stream or sys.stderr
        # live_tokens() -> (prompt, generated) tokens processed so far, finished or not; from the
        # generator's stats, so rates move between finishes. Falls back to finished counts.
        self.live_tokens = live_tokens
        self.clock = clock
        self.window = window
        self.total = self.done = self.ok = self.failed = self.skipped = 0
        # Tokens of successful results (the work done); a failed generation's tokens are kept apart.
        self.prompt_tokens = self.completion_tokens = 0
        self.failed_completion_tokens = 0
        self.errors_listed = 0
        self.started = clock()
        self.rss_peak = 0
        self.peak_gpu_bytes = 0  # set by the runner from the generator's stats
        self.device: str | None = None  # "cpu (N threads)" or the GPU's name: see use_device
        self._device_to_name: str | None = None  # a cuda device, named once the model is loaded
        self.load_s: float | None = None  # seconds make_generator took (see load)
        self.planned_tokens: int | None = None  # the job's max_tokens, summed: the ETA before any finish
        self.predicted_gen_tok_s: float | None = None  # the plan's end-to-end prediction, if any
        self._samples: collections.deque = collections.deque()  # (time, prompt, generated tokens)
        self._at_start = (0, 0)  # live tokens when start() ran: rates count from there
        self._lock = threading.Lock()
        self._bar = self._task = None
        self._stop = threading.Event()
        self._ticker = None

    # ---- messages ---------------------------------------------------------------------------
    def emit(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def emit_json(self, record: dict) -> None:
        """One JSON log line, stamped with the time ("ts" first)."""
        self.emit(json.dumps({"ts": utc_timestamp(), **record}))

    def info(self, message: str, **fields) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "json":
            self.emit_json({"event": "info", "message": message, **fields})
        else:
            self.emit(message)

    def warn(self, message: str) -> None:
        """Printed even with --quiet: something the user must act on."""
        if self.mode == "json":
            self.emit_json({"event": "warning", "message": message})
        else:
            self.emit(f"offbatch: warning: {message}")

    def line_error(self, line: int, rid, message: str) -> None:
        self.errors_listed += 1
        if self.mode == "json":
            self.emit_json({"event": "line_error", "line": line, "id": rid, "message": message})
        elif self.errors_listed <= MAX_LISTED_ERRORS:
            self.emit(f"offbatch: line {line} (id {json.dumps(rid)}): {message}")
        elif self.errors_listed == MAX_LISTED_ERRORS + 1:
            self.emit("offbatch: further line errors are only in the error records")

    # ---- the model load ---------------------------------------------------------------------
    def use_device(self, device: str) -> None:
        """The device the run computes on ("cpu", "cuda", "cuda:1"). A GPU is named after the model has
        loaded: asking CUDA for a name before the engine has set its memory cap would start CUDA early."""
        if str(device).startswith("cuda"):
            self.device, self._device_to_name = str(device), str(device)
        else:
            self.device = describe_device(device)

    def load(self, make, *args, **kwargs):
        """make(*args, **kwargs) (the runner's make_generator), timed: the summary reports load_s."""
        t0 = self.clock()
        generator = make(*args, **kwargs)
        self.load_s = self.clock() - t0
        if self._device_to_name is not None:
            self.device, self._device_to_name = describe_device(self._device_to_name), None
        where = f" on {self.device}" if self.device else ""
        startup = getattr(generator, "startup", None) or {}
        parts = startup_words(startup)
        self.info(f"model loaded in {self.load_s:.1f}s{where}{f' ({parts})' if parts else ''}", load_s=round(self.load_s, 2),
                  device=self.device, **({"startup": {k: round(v, 3) for k, v in startup.items()}} if startup else {}))
        return generator

    # ---- counting ---------------------------------------------------------------------------
    def start(self, total: int, skipped: int = 0, planned_tokens: int | None = None,
              predicted_gen_tok_s: float | None = None) -> None:
        self.total, self.skipped = total, skipped
        if planned_tokens is not None:
            self.planned_tokens = planned_tokens
        if predicted_gen_tok_s:
            self.predicted_gen_tok_s = float(predicted_gen_tok_s)
        self.started = self.clock()
        self._at_start = (0, 0)
        self._at_start = self._live()
        with self._lock:
            self._samples.clear()
            self._samples.append((self.started, 0, 0))
        if self.mode == "rich":
            self._start_bar(total)
        elif self.mode in ("text", "json"):
            self._ticker = threading.Thread(target=self._tick_loop, name="offbatch-progress", daemon=True)
            self._ticker.start()

    def _start_bar(self, total: int) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, ProgressColumn, TextColumn
        from rich.text import Text

        progress = self

        class Rates(ProgressColumn):  # read live at every refresh, not only when a result lands
            def render(self, task):
                p, g = progress.recent_rates()
                return Text(f"tok/s {p:,.0f} in {g:,.0f} out")

        class Eta(ProgressColumn):  # ours, in tokens: rich's own counts error records as work done
            def render(self, task):
                eta = progress.eta()
                return Text("ETA " + ("?" if eta is None else _duration(eta)))

        self._bar = Bar(
            TextColumn("[bold]generating"), BarColumn(bar_width=24), MofNCompleteColumn(), Rates(), Eta(),
            console=Console(file=self.stream), transient=False, refresh_per_second=4,
        )
        self._bar.start()
        self._task = self._bar.add_task("generating", total=max(total, 1))

    def add(self, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.done += 1
        if ok:
            self.ok += 1
            self.prompt_tokens += prompt_tokens or 0
            self.completion_tokens += completion_tokens or 0
        else:  # counted apart: an error record is no work done
            self.failed += 1
            self.failed_completion_tokens += completion_tokens or 0
        self._sample()
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def _live(self) -> tuple[int, int]:
        """(prompt, generated) tokens processed since start(), finished or not."""
        p, g = self.live_tokens() if self.live_tokens is not None else (self.prompt_tokens, self.completion_tokens)
        return p - self._at_start[0], g - self._at_start[1]

    def _sample(self) -> tuple[float, int, int]:
        """Record (now, prompt, generated tokens) for the recent window; samples are at least window/60
        apart (a bounded deque, however fast results come), and the oldest kept is the last one at or
        before the window's start."""
        now = self.clock()
        p, g = self._live()
        with self._lock:
            if not self._samples or now - self._samples[-1][0] >= self.window / 60:
                self._samples.append((now, p, g))
            while len(self._samples) > 1 and self._samples[1][0] <= now - self.window:
                self._samples.popleft()
        return now, p, g

    def rates(self) -> tuple[float, float]:
        """(prompt, generated) tokens per second over the whole run."""
        elapsed = max(self.clock() - self.started, 1e-9)
        p, g = self._live()
        return p / elapsed, g / elapsed

    def recent_rates(self) -> tuple[float, float]:
        """(prompt, generated) tokens per second over the last `window` seconds (the whole run while it is
        shorter)."""
        now, p, g = self._sample()
        with self._lock:
            t0, p0, g0 = self._samples[0]
        if now - t0 <= 0:
            return self.rates()
        return (p - p0) / (now - t0), (g - g0) / (now - t0)

    def eta(self) -> float | None:
        """Seconds left, from tokens (see the module doc); None while nothing gives a rate."""
        remaining = self.total - self.done
        if remaining <= 0:
            return 0.0
        _, generated = self._live()
        if self.ok:
            per_request = max(self.completion_tokens / self.ok, 1.0)
            in_flight = max(generated - self.completion_tokens - self.failed_completion_tokens, 0)
            tokens_left = remaining * per_request - in_flight
            rate = self.recent_rates()[1] or self.rates()[1]
        elif self.planned_tokens is not None:
            tokens_left = self.planned_tokens - generated
            rate = self.predicted_gen_tok_s or self.recent_rates()[1] or self.rates()[1]
        else:
            return None
        if rate <= 0:
            return None
        return max(tokens_left, 0.0) / rate

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        self.rss_peak = max(self.rss_peak, psutil.Process().memory_info().rss)
        p, g = self.rates()
        rp, rg = self.recent_rates()
        eta = self.eta()
        elapsed = self.clock() - self.started
        if self.mode == "json":
            self.emit_json({
                "event": "progress", "elapsed_s": round(elapsed, 1), "done": self.done, "total": self.total,
                "ok": self.ok, "failed": self.failed, "prompt_tok_s": round(p, 1), "gen_tok_s": round(g, 1),
                "recent_prompt_tok_s": round(rp, 1), "recent_gen_tok_s": round(rg, 1), "window_s": self.window,
                "eta_s": None if eta is None else round(eta, 1),
            })
        elif self.mode == "text":
            self.emit(
                f"[{_duration(elapsed)}] {self.done}/{self.total} requests ({self.failed} failed), "
                f"{rp:,.0f} prompt tok/s, {rg:,.1f} gen tok/s over the last {self.window:.0f}s "
                f"({g:,.1f} gen tok/s overall), ETA {'?' if eta is None else _duration(eta)}"
            )

    # ---- end --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

    def summary(self, peak_gpu_bytes: int = 0, interrupted: str | None = None) -> dict:
        """Stop the live display, print the final summary (not with --quiet), and return it."""
        self.stop()
        wall = self.clock() - self.started
        host = peak_host_bytes(self.rss_peak)
        s = {
            "event": "summary",
            "ok": self.ok,
            "failed": self.failed,
            "already_done": self.skipped,
            "not_run": self.total - self.done,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "gen_tok_s": round(self.completion_tokens / wall, 2) if wall > 0 else 0.0,
            "prompt_tok_s": round(self.prompt_tokens / wall, 2) if wall > 0 else 0.0,
            "wall_s": round(wall, 2),
            "load_s": None if self.load_s is None else round(self.load_s, 2),
            "device": self.device,
            "peak_gpu_bytes": peak_gpu_bytes,
            "peak_host_bytes": host,
            "interrupted": interrupted,
        }
        if self.mode == "json":
            self.emit_json(s)
        elif self.mode != "quiet":
            self.emit(self._summary_line(s, wall))
        return s

    def _summary_line(self, s: dict, wall: float) -> str:
        head = f"stopped by {s['interrupted']}: " if s["interrupted"] else "done: "
        parts = [f"{self.ok} ok, {self.failed} failed"]
        if self.skipped:
            parts[0] += f", {self.skipped} already done"
        if s["not_run"]:
            parts[0] += f", {s['not_run']} not run (rerun the same command to resume)"
        parts.append(f"tokens in {self.prompt_tokens:,}, out {self.completion_tokens:,}")
        parts.append(f"{s['prompt_tok_s']:,.0f} prompt tok/s, {s['gen_tok_s']:,.1f} gen tok/s")
        load = f" + model load {self.load_s:.1f}s" if self.load_s is not None else ""
        parts.append(f"wall {_duration(wall)}{load}")
        host = format_bytes(s["peak_host_bytes"])
        if self.device is not None and self.device.startswith("cpu"):  # no GPU peak to speak of
            parts.append(f"{self.device}, peak host {host}")
        else:
            where = f"{self.device}, " if self.device else ""
            parts.append(f"{where}peak GPU {format_bytes(s['peak_gpu_bytes'])}, host {host}")
        return head + " | ".join(parts)
