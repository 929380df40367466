"""What a run tells the person (or the cron log) watching it; everything goes to stderr, since stdout
may be the results themselves (`-o -`).

Modes: "rich" (a live bar on a terminal), "text" or "json" (one line per interval, for logs), "quiet"
(errors only). Counters are plain attributes; the rich bar and the log ticker read them from their own
threads, which is safe for ints and floats.
"""

from __future__ import annotations

import json
import sys
import threading
import time

import psutil

from offbatch.units import format_bytes

MAX_LISTED_ERRORS = 20


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


class Progress:
    def __init__(self, mode: str, interval: float = 10.0, stream=None, live_tokens=None):
        self.mode = mode
        self.interval = interval
        self.stream = stream or sys.stderr
        # live_tokens() -> (prompt, generated) tokens processed so far, finished or not; from the
        # generator's stats, so rates move between finishes. Falls back to finished counts.
        self.live_tokens = live_tokens
        self.total = self.done = self.ok = self.failed = self.skipped = 0
        self.prompt_tokens = self.completion_tokens = 0
        self.errors_listed = 0
        self.started = time.monotonic()
        self.rss_peak = 0
        self.peak_gpu_bytes = 0  # set by the runner from the generator's stats
        self._bar = self._task = None
        self._stop = threading.Event()
        self._ticker = None

    # ---- messages ---------------------------------------------------------------------------
    def emit(self, text: str) -> None:
        if self._bar is not None:
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self.stream, flush=True)

    def info(self, message: str, **fields) -> None:
        if self.mode == "quiet":
            return
        if self.mode == "json":
            self.emit(json.dumps({"event": "info", "message": message, **fields}))
        else:
            self.emit(message)

    def warn(self, message: str) -> None:
        """Printed even with --quiet: something the user must act on."""
        if self.mode == "json":
            self.emit(json.dumps({"event": "warning", "message": message}))
        else:
            self.emit(f"offbatch: warning: {message}")

    def line_error(self, line: int, rid, message: str) -> None:
        self.errors_listed += 1
        if self.mode == "json":
            self.emit(json.dumps({"event": "line_error", "line": line, "id": rid, "message": message}))
        elif self.errors_listed <= MAX_LISTED_ERRORS:
            self.emit(f"offbatch: line {line} (id {json.dumps(rid)}): {message}")
        elif self.errors_listed == MAX_LISTED_ERRORS + 1:
            self.emit("offbatch: further line errors are only in the error records")

    # ---- counting ---------------------------------------------------------------------------
    def start(self, total: int, skipped: int = 0) -> None:
        self.total, self.skipped = total, skipped
        self.started = time.monotonic()
        if self.mode == "rich":
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress as Bar, ProgressColumn, TextColumn
            from rich.progress import TimeRemainingColumn
            from rich.text import Text

            progress = self

            class Rates(ProgressColumn):  # read live at every refresh, not only when a result lands
                def render(self, task):
                    p, g = progress.rates()
                    return Text(f"tok/s {p:,.0f} in {g:,.0f} out")

            self._bar = Bar(
                TextColumn("[bold]generating"), BarColumn(bar_width=24), MofNCompleteColumn(), Rates(),
                TextColumn("ETA"), TimeRemainingColumn(),
                console=Console(file=self.stream), transient=False, refresh_per_second=4,
            )
            self._bar.start()
            self._task = self._bar.add_task("generating", total=max(total, 1))
        elif self.mode in ("text", "json"):
            self._ticker = threading.Thread(target=self._tick_loop, name="offbatch-progress", daemon=True)
            self._ticker.start()

    def add(self, ok: bool, prompt_tokens: int = 0, completion_tokens: int = 0) -> None:
        self.done += 1
        self.ok += ok
        self.failed += not ok
        self.prompt_tokens += prompt_tokens or 0
        self.completion_tokens += completion_tokens or 0
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def rates(self) -> tuple[float, float]:
        elapsed = max(time.monotonic() - self.started, 1e-9)
        p, g = self.live_tokens() if self.live_tokens else (self.prompt_tokens, self.completion_tokens)
        return p / elapsed, g / elapsed

    def eta(self) -> float | None:
        if not self.done:
            return None
        elapsed = time.monotonic() - self.started
        return elapsed / self.done * (self.total - self.done)

    def _tick_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.tick()

    def tick(self) -> None:
        self.rss_peak = max(self.rss_peak, psutil.Process().memory_info().rss)
        p, g = self.rates()
        eta = self.eta()
        elapsed = time.monotonic() - self.started
        if self.mode == "json":
            self.emit(json.dumps({
                "event": "progress", "elapsed_s": round(elapsed, 1), "done": self.done, "total": self.total,
                "failed": self.failed, "prompt_tok_s": round(p, 1), "gen_tok_s": round(g, 1),
                "eta_s": None if eta is None else round(eta, 1),
            }))
        elif self.mode == "text":
            self.emit(
                f"[{_duration(elapsed)}] {self.done}/{self.total} requests ({self.failed} failed), "
                f"{p:,.0f} prompt tok/s, {g:,.1f} gen tok/s, ETA {'?' if eta is None else _duration(eta)}"
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
        wall = time.monotonic() - self.started
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
            "peak_gpu_bytes": peak_gpu_bytes,
            "peak_host_bytes": host,
            "interrupted": interrupted,
        }
        if self.mode == "json":
            self.emit(json.dumps(s))
        elif self.mode != "quiet":
            head = f"stopped by {interrupted}: " if interrupted else "done: "
            parts = [f"{self.ok} ok, {self.failed} failed"]
            if self.skipped:
                parts[0] += f", {self.skipped} already done"
            if s["not_run"]:
                parts[0] += f", {s['not_run']} not run (rerun the same command to resume)"
            parts.append(f"tokens in {self.prompt_tokens:,}, out {self.completion_tokens:,}")
            parts.append(f"{s['prompt_tok_s']:,.0f} prompt tok/s, {s['gen_tok_s']:,.1f} gen tok/s")
            parts.append(f"wall {_duration(wall)}")
            parts.append(f"peak GPU {format_bytes(peak_gpu_bytes)}, host {format_bytes(host)}")
            self.emit(head + " | ".join(parts))
        return s
