"""Pricing the hybrid FFN (ffn/hybrid.py) and choosing it: how much device memory hot neurons get (taken
from the resident weights the dense plan would hold), and up to how many tokens a step runs hybrid.

A small step of a hybrid plan does not stream the FFN modules of its hybrid layers (the layers whose FFN
the plan does not keep resident); instead, per such layer, the host threads compute the cold neurons the
predictor marks active for any of the step's T tokens - their expected count U(T) is the union the profile
measured over random sets of T calibration tokens (ffn/union.py), times the predictors' predicted over true
active share (inflation); without a measured union,
    U(T) = sum over cold neurons j of 1 - (1 - q_j)^T,   q_j = min(1, p_j x inflation)
with p_j a neuron's profiled activity (tokens independent: an upper bound, as tokens share active neurons) -
and the device waits for that host work (it is in the compute chain), and for a round trip per layer.
Or, for steps of at least `fetch_tokens` tokens, the GPU fetches those U(T) neurons' rows from pinned host
memory itself (ffn/hybrid_fetch.py): their bytes cross the link beside the weight stream, and the chain
waits only for the union's synchronisation and the chunk's launches per layer. Host work grows with U(T)
times T, the fetch with U(T) alone: the host path for a few tokens, the fetch for more.
A large step streams the FFN modules as the dense plan does.

The choice is a post-pass over each attention backend's best dense plan (the solver's), with its wave and
micro-batches kept: each candidate share of the resident weight memory given to hot neurons is priced over the
whole job, and the hybrid FFN is taken only when the fastest is more than TIE_TOLERANCE faster than the dense
plan the solver chose (issue 17: the planner must never pick it where it measures slower).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import numpy as np

from offbatch.ffn.hybrid import neuron_bytes
from offbatch.ffn.hybrid_fetch import fetch_scratch_bytes
from offbatch.ffn.neurons import NeuronStats
from offbatch.ffn.union import independent_union, measured_union

HOT_SHARES = (0.0, 0.25, 0.5, 0.75, 1.0)  # of the dense plan's resident weight memory, given to hot neurons
# One hybrid layer's round trip beside its host work: inputs and activity to the host, the worker's hand-off,
# the partial sum back (two synchronisations and a thread switch). The H200 run of 2026-11-30 (OPT-30B shape,
# 24 layers) waited 2.7-5 ms a layer beyond the host's own compute, part of it the device catching up.
CALL_S = 5e-4
# The host's cold-part rate at most this share of its CPU-attention rate (both gather rows and multiply them
# on the host threads; Host.cpu_ffn_bytes_s has the measured figure).
HOST_FFN_SHARE = 0.5
# One fetched layer's chain beside its bytes: the union's nonzero (a synchronisation) and a chunk's launches.
FETCH_CALL_S = 2e-4
# The GPU's reads of scattered rows in pinned memory ran at 0.83 of a contiguous copy's rate for 1800 rows of an
# OPT-30B layer (0.78-0.91 for 512-8192 rows; scripts/bench_row_gather.py on the H200): fetched bytes count
# this much more on the link.
FETCH_LINK_EFFICIENCY = 0.83
TOKEN_CANDIDATES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclass(frozen=True)
class NeuronCosts:
    """A model's neurons as the planner sees them: the mean over layers of each rank's activity (layers
    sorted descending) and, where the profile measured it, of the union a step of T tokens needs
    (ffn/union.py); the predictors' inflation; a neuron's bytes; predictor bytes per layer."""

    curve: np.ndarray  # [intermediate] descending, the profiled activity
    neuron_bytes: int
    predictor_bytes: int  # one layer's, on the device (cold rows of B counted whole: an upper bound)
    inflation: float = 1.0
    union_table: np.ndarray | None = None  # [len(UNION_TOKENS), UNION_BUCKETS + 1], mean over layers

    @staticmethod
    def of(stats: NeuronStats, spec, dsize: int) -> "NeuronCosts":
        layers = [a.float().numpy() for _, a in sorted(stats.activity.items())]
        curve = np.mean([np.sort(a)[::-1] for a in layers], axis=0) if layers else np.zeros(spec.intermediate_size)
        pred = 0
        if not stats.oracle and stats.predictors:
            p = next(iter(stats.predictors.values()))
            pred = (p.a.numel() + p.b.numel()) * dsize
        tables = [t.float().numpy() for _, t in sorted(stats.union.items())]
        table = np.mean(tables, axis=0) if tables and len(tables) == len(layers) else None
        return NeuronCosts(curve, neuron_bytes(spec, dsize), pred, stats.inflation(), table)

    def union(self, hot: int, tokens: np.ndarray) -> np.ndarray:
        """Expected cold neurons computed per layer for steps of `tokens` tokens (any shape): the profile's
        measured union where it has one, else each token's activity taken as independent; times the
        predictors' over-prediction, at most every cold neuron."""
        cold = max(0, self.curve.shape[0] - hot)
        if self.union_table is not None:
            u = measured_union(self.union_table, self.curve, hot, tokens) * self.inflation
        else:
            u = independent_union(np.minimum(1.0, self.curve * self.inflation), hot, tokens)
        return np.minimum(u, cold)


@dataclass(frozen=True)
class HybridTerms:
    """A candidate: the device bytes hot neurons get, the step size up to which a step runs hybrid."""

    costs: NeuronCosts
    hot_bytes: int  # device bytes for hot neurons, predictors and scratch_bytes
    tokens: int = 1 << 30
    fetch_tokens: int = 0  # steps of at least this many tokens fetch their cold neurons to the device; 0: none
    scratch_bytes: int = 0  # of hot_bytes, the fetch path's device scratch (not hot neurons)

    def bind(self, res, shape) -> "BoundHybrid":
        """Its terms under a residency: which layers are hybrid (their FFN streamed), how many hot neurons each."""
        spec = shape.spec
        ffn = [k for k in shape.nbytes if k[1] == "ffn" and k[0] >= 0]
        streamed = [k for k in ffn if k not in res.resident] if res.resident else ffn
        # Without the keys (the search prices by bytes), count the streamed FFN modules from their bytes.
        per = shape.nbytes[ffn[0]] if ffn else 0
        n = round(res.streamed_by_kind.get("ffn", 0) / per) if per else 0
        if res.resident:
            n = len(streamed)
        budget = self.hot_bytes - self.scratch_bytes - n * self.costs.predictor_bytes
        hot = int(min(spec.intermediate_size, max(0, budget) // max(1, n * self.costs.neuron_bytes))) if n else 0
        return BoundHybrid(self, n, hot, n * per, n * (spec.intermediate_size - hot) * spec.hidden_size * shape.dsize,
                           n * (hot * self.costs.neuron_bytes + self.costs.predictor_bytes) + self.scratch_bytes)


@dataclass(frozen=True)
class BoundHybrid:
    terms: HybridTerms
    layers: int  # hybrid layers (their FFN module streamed in the dense plan)
    hot: int  # hot neurons per hybrid layer
    ffn_bytes: int  # the FFN bytes a small step no longer streams
    host_bytes: int  # the cold neurons' down^T copies in host memory
    device_bytes: int  # hot neurons, predictors and the fetch path's scratch

    def adjust(self, T, weight_bytes, serial, host_rate: float, fetch_tokens: int | None = None):
        """(weight bytes over the link, serial chain time) of steps of T tokens under this hybrid (fetch_tokens:
        in place of the terms' own, to price the other cold path)."""
        T = np.asarray(T)
        on = T <= self.terms.tokens
        if not self.layers:
            return weight_bytes, serial
        f = self.terms.fetch_tokens if fetch_tokens is None else fetch_tokens
        fetch = (T >= f) if f else np.zeros_like(on)
        cold = self.terms.costs.union(self.hot, T) * self.terms.costs.neuron_bytes
        host = self.layers * (cold / host_rate + CALL_S)
        moved = weight_bytes - self.ffn_bytes + np.where(fetch, self.layers * cold / FETCH_LINK_EFFICIENCY, 0.0)
        chain = serial + np.where(fetch, self.layers * FETCH_CALL_S, host)
        return np.where(on, moved, weight_bytes), np.where(on, chain, serial)


def host_cold_rate(hw) -> float:
    """Cold neuron bytes the host threads gather and multiply per second (while copies to the GPU run)."""
    return min(hw.host.cpu_ffn_bytes_s, HOST_FFN_SHARE * hw.host.cpu_attn_contended_bytes_s)


def choose_hybrid(solver, chosen, stats: NeuronStats):
    """(evaluation, solver, bound terms) of the hybrid candidate to take over every attention backend's best
    dense plan (the solver's), or None when none is more than TIE_TOLERANCE faster than the chosen dense plan.
    Each backend is tried, not only the chosen one: KV on the device may suit the dense FFN, whose streamed
    weights bound the step anyway, while the hybrid FFN's hot neurons would rather have that memory (KV in
    host memory).

    The candidates are compared at the host threads' rates less the machine's CPU-attention noise (the probe's
    rate moves that much from one probe to the next): a plan whose step waits on CPU attention is taken only
    if it wins even then, and one whose CPU part hides under the link is not held back by that noise (the
    solver's flat near-tie tolerance would keep the simpler backend at any gap under it). Near-ties (within
    TIE_TOLERANCE) go to the simplest, as the solver orders them: exact KV first, then the backend's rank."""
    from offbatch.planner.solve import TIE_TOLERANCE, backend, kv_rank

    dense_plans = list(getattr(solver, "best_by_backend", {}).values()) or [chosen]
    found = [h for h in (consider_hybrid(solver, e, stats) for e in dense_plans) if h is not None]
    if not found:
        return None
    cautious = {id(h): cautious_total_s(h[1], h[0]) for h in found}
    fastest = min(cautious.values())
    near = [h for h in found if cautious[id(h)] <= fastest * (1 + TIE_TOLERANCE)]
    best = min(near, key=lambda h: (kv_rank(h[0].knobs.kv_format), backend(h[0]).rank, backend(h[0]).name,
                                    h[0].knobs.hgca))
    return best if best[0].total_s <= chosen.total_s * (1 - TIE_TOLERANCE) else None


def cautious_total_s(trial, ev) -> float:
    """The job time of ev's knobs under trial's terms with the host threads' rates lowered by the machine's
    CPU-attention noise (the same as ev's where that is 0)."""
    noise = trial.hw.cpu_attn_noise
    if not noise:
        return ev.total_s
    slow = 1.0 - noise
    host = dataclasses.replace(trial.hw.host, cpu_attn_bytes_s=trial.hw.host.cpu_attn_bytes_s * slow,
                               cpu_attn_contended_bytes_s=trial.hw.host.cpu_attn_contended_bytes_s * slow,
                               cpu_ffn_bytes_s=trial.hw.host.cpu_ffn_bytes_s * slow)
    pessimist = copy.copy(trial)
    pessimist.hw, pessimist.cache = dataclasses.replace(trial.hw, host=host), {}
    e = pessimist.evaluate(ev.knobs)
    return e.total_s if e is not None else float("inf")


def consider_hybrid(solver, dense, stats: NeuronStats):
    """(evaluation, solver, bound terms) of the fastest hybrid candidate for the dense evaluation's knobs,
    or None when none is more than TIE_TOLERANCE faster (or none fits)."""
    from offbatch.planner.solve import TIE_TOLERANCE

    shape = solver.shape
    if not any(k[1] == "ffn" for k in shape.nbytes) or shape.weights != "dense":
        return None  # dense FFN weights only: the split is by neuron over dense rows
    costs = NeuronCosts.of(stats, shape.spec, shape.dsize)
    resident = dense.residency.resident_bytes
    best = None
    ffn_layers = sum(1 for k in shape.nbytes if k[1] == "ffn" and k[0] >= 0)
    for share in HOT_SHARES:
        # The predictors of every FFN layer, and a share of what the dense plan kept resident for hot neurons
        # (share 0: every neuron computed on the host where predicted, PowerInfer with nothing hot).
        hot_bytes = ffn_layers * costs.predictor_bytes + int(resident * share)
        e = _evaluate(solver, dense, HybridTerms(costs, hot_bytes))
        if e is None or e[0].model.hybrid is None or not e[0].model.hybrid.layers:
            continue
        # Up to how many tokens a step runs hybrid: the step sizes where a decode step is cheaper hybrid (by its
        # faster cold path) than dense, up to the first that is not (cold work grows with T, the saved copies do
        # not); and from which size the cold neurons are fetched to the device rather than computed on the host.
        tokens = fetch_from = 0
        for t in TOKEN_CANDIDATES:
            dense_s, host_s, fetch_s = e[0].model.hybrid_times(t)
            if min(host_s, fetch_s) >= dense_s:
                break
            tokens = t
            if fetch_s < host_s and not fetch_from:
                fetch_from = t
        if not tokens:
            continue
        scratch = fetch_scratch_bytes(shape.spec, shape.dsize, tokens) if fetch_from else 0
        e = _evaluate(solver, dense, HybridTerms(costs, hot_bytes + scratch, tokens, fetch_from, scratch))
        if e is None:
            continue
        ev, trial = e
        if ev.model.disk_fraction > 0:
            continue  # cold neurons are computed from host memory: not with FFN modules left on disk
        host_need = sum(ev.host.values()) + ev.model.hybrid.host_bytes
        if trial.host_budget is not None and host_need > trial.host_budget:
            continue
        if best is None or ev.total_s < best[0].total_s:
            best = (ev, trial, ev.model.hybrid)
    if best is None or best[0].total_s > dense.total_s * (1 - TIE_TOLERANCE):
        return None
    return best


def _evaluate(solver, dense, terms: HybridTerms):
    """(evaluation, solver) of the dense plan's knobs with this hybrid candidate: its hot neurons and predictors
    take device memory the residency then does without (slots included: a module that stops being resident
    needs one)."""
    trial = solver.clone(max_resident_bytes=solver.max_resident, hybrid=terms)
    if trial.usable is not None:
        trial.usable -= terms.hot_bytes
    e = trial.evaluate(dense.knobs)
    return None if e is None else (e, trial)


def apply_hybrid(plan, bound: BoundHybrid):
    """The plan with the hybrid FFN chosen."""
    memory = dict(plan.memory, hybrid_ffn=bound.device_bytes)
    host = dict(plan.host_memory, cold_neurons=bound.host_bytes)
    return dataclasses.replace(plan, dense_ffn="hybrid", hot_neurons=bound.hot, hybrid_tokens=bound.terms.tokens,
                               hybrid_fetch_tokens=bound.terms.fetch_tokens, memory=memory, host_memory=host)
