"""Which modules stay on the device. Every streamed byte crosses PCIe once per step, whatever the
wave, so a resident byte saves the same copy time wherever it sits; a dense module is used every step,
an expert only when a token of the step is routed to it. So: most valuable bytes first (dense before
experts when steps are small), large modules before small ones (less left over). A kind whose every
module becomes resident gives its device slots back.

Within a kind, the order: "spread" (the default) takes modules evenly over the step, so each resident
module computes while the copy stream loads the streamed ones after it; "layer" takes the lowest layers
first, which makes the start of every step one resident stretch whose compute the copies cannot hide
(they run only a slot ring ahead; the cost model charges that stretch's compute less one ring fill).
On the H200 the two orders ran within run-to-run noise of each other (Mixtral, Llama-3-8B)."""

from __future__ import annotations

from dataclasses import dataclass, field

from offbatch.models.catalogue import DEFAULT_SLOTS, ModuleKey
from offbatch.planner.shape import ModelShape


RESIDENCY_ORDERS = ("layer", "spread")


def spread_indices(count: int, n: int):
    """n of range(count), evenly spaced over it, ascending (a generator: callers may stop early)."""
    if n >= count:
        yield from range(count)
        return
    for i in range(max(0, n)):
        yield (2 * i + 1) * count // (2 * n)


def spread_pick(keys: list, n: int) -> list:
    """n of keys, evenly spaced over them (deterministic; keys in use order)."""
    return [keys[i] for i in spread_indices(len(keys), n)]


def spread_order(n: int) -> list[int]:
    """0..n-1 in van der Corput order: every prefix of it is spread evenly over the range."""
    out, seen, i = [], set(), 0
    while len(out) < n and i < 4 * n + 8:
        x, f, k = 0.0, 0.5, i
        while k:
            x, k, f = x + f * (k & 1), k >> 1, f / 2
        j = int(x * n)
        if j not in seen:
            seen.add(j)
            out.append(j)
        i += 1
    return out + [j for j in range(n) if j not in seen]


def expert_use(tokens: float, top_k: int, num_experts: int) -> float:
    """Chance that a given expert receives at least one of `tokens` tokens (uniform routing)."""
    if num_experts == 0 or tokens <= 0:
        return 0.0
    return 1.0 - (1.0 - top_k / num_experts) ** tokens


@dataclass
class Residency:
    resident: set[ModuleKey]
    slots: dict[str, int]  # device slots per streamed kind
    slot_bytes: int
    resident_bytes: int
    fixed_bytes: int  # routers: tiny, needed by every token, always resident
    streamed_dense_bytes: int  # attention, dense FFN, shared experts, head
    streamed_experts: int  # how many experts stream (each used by a step with some chance)
    expert_bytes: int  # one expert
    head_streamed: bool
    streamed_by_kind: dict[str, int] = field(default_factory=dict)
    # Layers computed before the step's first streamed module (the head aside): the resident stretch at
    # the start of every step, during which the copies can only fill the slot rings.
    lead_layers: int = 0


def first_gap(picked) -> int:
    """The smallest index that `picked` (ascending, distinct, from 0; any iterable) leaves out."""
    i = 0
    for j in picked:
        if j != i:
            return i
        i += 1
    return i


class ResidencyChooser:
    """Built once per (model, slot policy); `choose(left)` is O(kinds), not O(modules)."""

    def __init__(self, shape: ModelShape, slots_per_kind: dict[str, int] | None = None):
        self.shape = shape
        policy = dict(DEFAULT_SLOTS, **(slots_per_kind or {}))
        kinds = shape.kinds()
        self.fixed_keys = set(kinds.pop("router", []))
        self.fixed_bytes = sum(shape.nbytes[k] for k in self.fixed_keys)
        self.groups = []  # (kind, keys, sizes, uniform size or None, slots, slot size)
        for kind, keys in kinds.items():
            sizes = [shape.nbytes[k] for k in keys]
            uniform = sizes[0] if len(set(sizes)) == 1 else None
            self.groups.append((kind, keys, sizes, uniform, policy.get(kind, 2), max(sizes)))
        self.all_slot_bytes = sum(g[4] * g[5] for g in self.groups)
        self.device_bytes = self.fixed_bytes + sum(sum(g[2]) for g in self.groups)
        self.totals = {g[0]: sum(g[2]) for g in self.groups}
        self.expert_bytes = next((g[3] or g[5] for g in self.groups if g[0] == "expert"), 0)
        m = shape.spec.moe
        self.top_k, self.num_experts = (m.top_k, m.num_experts) if m else (0, 0)

    def _all_resident(self, with_keys: bool) -> Residency:
        keys = set(self.fixed_keys)
        if with_keys:
            for g in self.groups:
                keys.update(g[1])
        return Residency(resident=keys, slots={}, slot_bytes=0, resident_bytes=self.device_bytes,
                         fixed_bytes=self.fixed_bytes, streamed_dense_bytes=0, streamed_experts=0,
                         expert_bytes=0, head_streamed=False)

    def weights_minimum(self) -> int:
        """Device bytes the weights need at least: all of them, or routers plus a set of slots."""
        return min(self.device_bytes, self.fixed_bytes + self.all_slot_bytes)

    def choose(self, left: int, step_tokens: float, max_resident_bytes: int | None = None,
               with_keys: bool = True, order: str = "layer") -> Residency | None:
        """Residency for `left` device bytes beyond the transients; None when they do not hold even
        the routers and one set of slots. Without keys, only the byte summary (the search's need)."""
        cap = max_resident_bytes if max_resident_bytes is not None else 1 << 62
        if left >= self.device_bytes and cap >= self.device_bytes - self.fixed_bytes:
            return self._all_resident(with_keys)
        if left < self.fixed_bytes + self.all_slot_bytes:
            return None
        left -= self.fixed_bytes + self.all_slot_bytes
        use = expert_use(step_tokens, self.top_k, self.num_experts)

        def value(g):
            kind = g[0]
            return (-(use if kind == "expert" else 1.0), -(g[3] or g[5]), kind)

        resident: set[ModuleKey] = set(self.fixed_keys)
        slots: dict[str, int] = {}
        slot_bytes = resident_bytes = 0
        streamed: dict[str, int] = {}
        lead = self.shape.spec.num_layers
        for g in sorted(self.groups, key=value):
            kind, keys, sizes, uniform, n_slots, slot_size = g
            total = self.totals[kind]
            # The whole kind, its slots given back: worth it as soon as it fits.
            if total - n_slots * slot_size <= left and total <= cap:
                if with_keys:
                    resident.update(keys)
                left -= total - n_slots * slot_size
                cap -= total
                resident_bytes += total
                continue
            if uniform is not None:
                n = max(0, min(len(keys), min(left, cap) // uniform))
                taken = (keys[:n] if order == "layer" else spread_pick(keys, n)) if with_keys else ()
                taken_bytes = n * uniform
                gap = n if order == "layer" else first_gap(spread_indices(len(keys), n))
            else:
                taken, taken_bytes, picked = [], 0, []
                pairs = list(enumerate(zip(keys, sizes)))
                if order == "spread":  # greedily, in an order whose every prefix is spread out
                    pairs = [pairs[j] for j in spread_order(len(pairs))]
                for j, (k, size) in pairs:
                    if size <= left - taken_bytes and size <= cap - taken_bytes:
                        taken.append(k)
                        picked.append(j)
                        taken_bytes += size
                gap = first_gap(sorted(picked))
            if kind != "head" and gap < len(keys):
                lead = min(lead, keys[gap][0])
            resident.update(taken)
            left -= taken_bytes
            cap -= taken_bytes
            resident_bytes += taken_bytes
            slots[kind] = n_slots
            slot_bytes += n_slots * slot_size
            streamed[kind] = total - taken_bytes
        n_experts = streamed.get("expert", 0) // self.expert_bytes if self.expert_bytes else 0
        return Residency(
            resident=resident, slots=slots, slot_bytes=slot_bytes, resident_bytes=resident_bytes + self.fixed_bytes,
            fixed_bytes=self.fixed_bytes,
            streamed_dense_bytes=sum(v for k, v in streamed.items() if k != "expert"),
            streamed_experts=n_experts, expert_bytes=self.expert_bytes, head_streamed=streamed.get("head", 0) > 0,
            streamed_by_kind=streamed, lead_layers=lead,
        )


def residency_of(shape: ModelShape, resident: set[ModuleKey], slots_per_kind: dict[str, int] | None = None) -> Residency:
    """The Residency summary of a given resident set (a pinned plan, a recorded run)."""
    policy = dict(DEFAULT_SLOTS, **(slots_per_kind or {}))
    kinds = shape.kinds()
    fixed = set(kinds.pop("router", []))
    resident = set(resident) | fixed
    slots, slot_bytes, streamed = {}, 0, {}
    expert_bytes = 0
    lead = shape.spec.num_layers
    for kind, keys in kinds.items():
        out = [k for k in keys if k not in resident]
        if out and kind != "head":
            lead = min(lead, out[0][0])
        if kind == "expert":
            expert_bytes = max(shape.nbytes[k] for k in keys)
        if out:
            slots[kind] = policy.get(kind, 2)
            slot_bytes += slots[kind] * max(shape.nbytes[k] for k in out)
            streamed[kind] = sum(shape.nbytes[k] for k in out)
    n_experts = sum(1 for k in shape.kinds().get("expert", []) if k not in resident)
    return Residency(
        resident=resident, slots=slots, slot_bytes=slot_bytes,
        resident_bytes=sum(shape.nbytes[k] for k in resident if k in shape.nbytes),
        fixed_bytes=sum(shape.nbytes[k] for k in fixed),
        streamed_dense_bytes=sum(v for k, v in streamed.items() if k != "expert"), streamed_experts=n_experts,
        expert_bytes=expert_bytes, head_streamed="head" in streamed, streamed_by_kind=streamed,
        lead_layers=lead)
