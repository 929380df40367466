"""The setting of hybrid GPU-CPU attention (HGCA): which keys a decoding query attends exactly and which
only sparsely. Plain Python, no torch: the engine's HGCA backend, the planner, the CLI and the quality
simulation (attention/lossy_reference.py) all read it.

A query at position t (it sees keys 0..t, its own last) attends
  - EXACTLY to the sink keys [0, min(sinks, t+1)) and the recent keys [max(sinks, t+1-window), t];
  - SPARSELY to the older keys [sinks, t+1-window): per query head, the top_k of them with the highest
    score q.k (all of them when there are fewer);
with one softmax over the union (in the engine: two partial attentions merged by log-sum-exp).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

_ALIASES = {"top-k": "top_k", "topk": "top_k", "k": "top_k", "sink": "sinks", "w": "window"}
_MINIMUM = {"sinks": 0, "window": 1, "top_k": 0}  # the window holds the query's own key at least


@dataclass(frozen=True)
class HGCASetting:
    sinks: int = 4
    window: int = 256
    top_k: int = 128

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"HGCA {f.name} must be a whole number, not {value!r}")
            if value < _MINIMUM[f.name]:
                raise ValueError(f"HGCA {f.name} must be at least {_MINIMUM[f.name]}, not {value}")

    @classmethod
    def parse(cls, text: str) -> "HGCASetting":
        """'window=256,top_k=128,sinks=4' (any order, any subset; the rest keep their defaults; 'default'
        or '' is all defaults). A bad key, value or repeat: a ValueError saying which."""
        text = text.strip()
        if text.lower() in ("", "default", "defaults"):
            return cls()
        given: dict[str, int] = {}
        for item in text.split(","):
            key, eq, value = item.partition("=")
            key = key.strip().lower()
            key = _ALIASES.get(key, key)
            if not eq or not key or not value.strip():
                raise ValueError(f"HGCA setting {text!r}: {item.strip()!r} is not NAME=NUMBER "
                                 "(e.g. window=256,top_k=128,sinks=4)")
            if key not in _MINIMUM:
                raise ValueError(f"HGCA setting {text!r}: unknown name {key!r} (known: sinks, window, top_k)")
            if key in given:
                raise ValueError(f"HGCA setting {text!r}: {key} is given twice")
            try:
                given[key] = int(value.strip(), 10)
            except ValueError:
                raise ValueError(f"HGCA setting {text!r}: {key}={value.strip()!r} is not a whole number") from None
        return cls(**given)

    def __str__(self) -> str:
        """The canonical spelling, which parse() reads back."""
        return f"sinks={self.sinks},window={self.window},top_k={self.top_k}"

    def words(self) -> str:
        """For reports: 'HGCA sinks 4, window 256, top-k 128'."""
        return f"HGCA sinks {self.sinks}, window {self.window}, top-k {self.top_k}"

    def short(self) -> str:
        """For a table cell: 'HGCA s4 w256 k128'."""
        return f"HGCA s{self.sinks} w{self.window} k{self.top_k}"

    def as_dict(self) -> dict[str, int]:
        return asdict(self)

    def split(self, length: int) -> tuple[int, int]:
        """For a query that sees `length` keys (0..length-1, its own last): (sink_end, recent_start). Sink
        keys are [0, sink_end), older keys (attended sparsely) [sink_end, recent_start), recent keys
        [recent_start, length)."""
        sink_end = min(self.sinks, length)
        return sink_end, max(sink_end, length - self.window)

    def exact_up_to(self) -> int:
        """The longest context (keys one query sees) in which this setting attends every key: the sinks,
        the window and top_k older keys cover it."""
        return self.sinks + self.window + self.top_k

    def check_model(self, sliding_window: int | None) -> None:
        """HGCA needs a model that attends its whole context; a sliding-window model: a ValueError."""
        if sliding_window:
            raise ValueError(f"HGCA is not applicable to a sliding-window model (sliding_window={sliding_window}): "
                             "its attention already sees only the last "
                             f"{sliding_window} keys; run it without --hgca")
