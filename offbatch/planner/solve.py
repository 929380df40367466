"""The solver: the plan that the cost model predicts finishes the job soonest, under the GPU and host
budgets.

Decisions: the attention backend (offbatch.attention: where the wave's KV lives and where decode
attention runs), the wave size, the prefill token budget per step, the FFN and attention micro-batch
sizes; residency follows from what memory is left (planner.residency). Search, per backend: the wave
and the prefill budget
jointly over fixed candidate lists (the wave also over the largest that fits and the sizes that split
the requests into equal waves), then the two micro-batch sizes (each pair also with the largest wave
that fits beside it), repeated until nothing improves; every
candidate is priced by the whole job's schedule (planner.cost). The lists do not depend on the
budget, so more memory never removes a candidate. Deterministic: fixed candidate orders, exact ties
kept by the earlier (smaller) candidate, near-ties between backends by their rank.
Nothing here allocates weights.

Near-ties: the search finds each backend's fastest candidate, but the figures carry the probe's noise
(a few percent between two probes of one machine) and the model's own error, so backends predicted
within TIE_TOLERANCE of the fastest are not told apart by it; taking the fastest let noise flip the plan
between runs (two benches of Mixtral at one commit ran host KV with CPU attention, then GPU attention:
-14% end to end). So among the backends whose best is within TIE_TOLERANCE of the fastest, the solver
takes the simplest, the lowest `rank` (device-kv, then host-kv-gpu, then host-kv-cpu), with that
backend's fastest sizes. A plan that won such a near-tie says so (`Plan.near_tie`); it predicts at most
TIE_TOLERANCE slower than the fastest. Between a backend with decode attention on the CPU and one
without, the tolerance widens to the machine's CPU-attention noise (`Hardware.cpu_attn_noise`: 40% on a
probed machine, whose CPU attention rate moved up to 38% from one probe to the next; 0 on the
calibrated profiles).
Within a backend the sizes are the fastest: a fixed order there (larger or smaller micro-batches,
waves, prefill budgets) would take a size at the edge of the tolerance, exactly where noise moves a
candidate in or out, and the sizes a little noise can swap (prefill budgets or micro-batches priced
within a fraction of a percent of each other) run alike.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, replace

import torch

from offbatch.attention import ATTENTION_BACKENDS, get_attention
from offbatch.attention.hgca_setting import HGCASetting
from offbatch.errors import BudgetError, OffbatchError
from offbatch.formats import get_format
from offbatch.ffn import choose_moe
from offbatch.models.spec import ModelSpec
from offbatch.planner.cost import JobTime, StepModel, StepTime, admits_per_step, job_time
from offbatch.planner.hardware import Hardware
from offbatch.planner.memory import (SAFETY, STAGING_BUFFERS, HostTier, Knobs, choose_disk, device_transient_bytes,
                                     WeightTotals, host_bytes, host_floor, host_tier,
                                     kv_slot_bytes)
from offbatch.offload.kv import kv_format, kv_format_name
from offbatch.plan import Plan
from offbatch.planner.residency import RESIDENCY_ORDERS, Residency, ResidencyChooser, residency_of
from offbatch.planner.shape import ModelShape, shape_from_spec
from offbatch.planner.workload import Workload
from offbatch.units import format_bytes

MAX_WAVE = 4096
HOST_SHARE = 0.8  # of the host's memory, when no --cpu-memory is given
PREFILL_MULTIPLES = (1, 4, 16, 64)  # prompts per step (with 8192 tokens, the rules' budget)
# GEMM efficiency is flat beyond ~1024 rows, memory is not; the smallest sizes are for tight budgets.
FFN_CANDIDATES = (64, 1024, 2048, 4096)
ATTN_CANDIDATES = (1, 16, 64, 256, 1024)
START_MICRO_BATCHES = ((4096, 64), (1024, 256))  # (FFN tokens, attention sequences) the descents start from
HGCA_WINDOWS = (64, 128, 256, 512, 1024, 2048)  # GPU windows the solver tries for HGCA (recent keys per sequence)
TIE_TOLERANCE = 0.03  # of the predicted job time: candidates this close count as a tie
PIN_NAMES = ("wave_size", "prefill_tokens", "ffn_micro_tokens", "attn_micro_batch", "attention", "residency_order")


@dataclass
class Evaluation:
    knobs: Knobs
    residency: Residency
    model: StepModel
    job: JobTime
    transient: dict[str, int]
    host: dict[str, int]
    tier: HostTier | None = None

    @property
    def total_s(self) -> float:
        return self.job.total_s


class Solver:
    def __init__(self, shape: ModelShape, hw: Hardware, workload: Workload, device: str,
                 gpu_budget: int | None, host_budget: int | None, max_wave: int = MAX_WAVE,
                 max_resident_bytes: int | None = None, pins: dict | None = None, disk_tier: bool = True,
                 kv_formats=("dense",), hgca: HGCASetting | None = None, hgca_window_given: bool = True,
                 split: int = 1):
        """disk_tier: whether weights may stay in the model folder (not for synthetic weights, which have
        none: then every plan holds all of them in host memory, and the wave is what gives way).
        split: GPUs splitting the weight stream (offload/shard_group.py); the plan is one rank's (workload
        and host budget are its shares), and every weight stays in host memory (no disk tier)."""
        self.shape, self.hw, self.wl, self.device = shape, hw, workload, device
        self.split = max(1, int(split))
        self.disk_tier = disk_tier and self.split == 1
        # KV formats the user allows (a lossy one only when asked for), and HGCA's setting where allowed
        # (its window chosen here unless the user gave one).
        self.kv_formats = [kv_format_name(f) for f in kv_formats] or ["dense"]
        self.hgca, self.hgca_window_given = hgca, hgca_window_given
        if hgca is not None and shape.spec.sliding_window:
            raise OffbatchError(f"--hgca: this model attends a sliding window of {shape.spec.sliding_window} keys; "
                                "HGCA is for full attention")
        self.cuda = torch.device(device).type == "cuda"
        self.gpu_budget = gpu_budget
        self.usable = int(gpu_budget * SAFETY) if gpu_budget is not None else None
        self.host_budget = host_budget if self.cuda else None  # on the CPU the "device" is the host
        self.max_len = workload.max_len
        self.max_wave = max(1, min(max_wave, workload.num_requests))
        self.max_resident = max_resident_bytes
        self.pins = {k: v for k, v in (pins or {}).items() if v is not None}
        unknown = set(self.pins) - set(PIN_NAMES)
        if unknown:
            raise TypeError(f"unknown plan option(s): {', '.join(sorted(unknown))}")
        self.order = self.pins.get("residency_order", "spread")
        if self.order not in RESIDENCY_ORDERS:
            raise OffbatchError(f"residency order {self.order!r}: use {' or '.join(RESIDENCY_ORDERS)}")
        self.chooser = ResidencyChooser(shape)
        self.totals = WeightTotals.of(shape, self.cuda, self.split)
        self.kind_max = {kind: max(shape.nbytes[k] for k in keys) for kind, keys in shape.kinds().items()}
        self.cache: dict[Knobs, Evaluation | None] = {}
        self.fastest: Evaluation | None = None  # the fastest candidate found (solve)
        self.best_by_backend: dict[str, Evaluation] = {}
        self.hybrid = None  # a hybrid FFN candidate's terms (planner.hybrid_ffn), priced into every step

    def clone(self, max_resident_bytes: int | None, hybrid=None) -> "Solver":
        """The same solver with another bound on the resident weights and a hybrid FFN candidate."""
        other = copy.copy(self)
        other.max_resident, other.hybrid = max_resident_bytes, hybrid
        other.cache, other.fastest, other.best_by_backend = {}, None, {}
        return other

    # ---- candidates --------------------------------------------------------------------------------
    def backends(self) -> list[str]:
        """The attention backends to search, simplest first: every registered one that runs here (a
        GPU-only one on a GPU), or the pinned one."""
        if "attention" in self.pins:
            chosen = get_attention(self.pins["attention"])  # an unknown name fails here, with the known ones
            if chosen.lossy and self.hgca is None:
                raise OffbatchError(f"the {chosen.name} attention backend is lossy: allow it with --hgca")
            return [self.pins["attention"]]
        usable = [c for c in ATTENTION_BACKENDS.values()
                  if (self.cuda or not c.needs_gpu) and (not c.lossy or self.hgca is not None)]
        return [c.name for c in sorted(usable, key=lambda c: (c.rank, c.name))]

    def hgca_settings(self) -> list[str]:
        """HGCA's settings to search: the user's, or its window from HGCA_WINDOWS (those that leave older
        keys for the CPU in this job: a window over the whole context is full attention, dearer)."""
        if self.hgca_window_given:
            return [str(self.hgca)]
        windows = [w for w in HGCA_WINDOWS if self.hgca.sinks + w < self.max_len]
        return [str(dataclasses.replace(self.hgca, window=w)) for w in windows]

    def candidates(self) -> list[tuple[str, str, str]]:
        """(attention backend, KV format, HGCA setting) triples to search."""
        out = []
        for name in self.backends():
            settings = self.hgca_settings() if get_attention(name).lossy else [""]
            out += [(name, fmt, h) for fmt in self.kv_formats for h in settings]
        return out

    def prefill_candidates(self) -> list[int]:
        if "prefill_tokens" in self.pins:
            return [int(self.pins["prefill_tokens"])]
        p, pmax = max(1, round(self.wl.prompt_len)), self.wl.max_prompt_len
        top = max(pmax, self.wl.num_requests * p)
        return sorted({min(top, max(pmax, p * a)) for a in PREFILL_MULTIPLES} | {min(top, max(pmax, 8192))})

    def ffn_candidates(self) -> list[int]:
        if "ffn_micro_tokens" in self.pins:
            return [int(self.pins["ffn_micro_tokens"])]
        return list(FFN_CANDIDATES)

    def attn_candidates(self) -> list[int]:
        if "attn_micro_batch" in self.pins:
            return [int(self.pins["attn_micro_batch"])]
        return list(ATTN_CANDIDATES)

    def wave_candidates(self, knobs: Knobs) -> list[int]:
        if "wave_size" in self.pins:
            return [int(self.pins["wave_size"])]
        top = self.wave_max(knobs)
        if top < 1:
            return []
        n = self.wl.num_requests
        # A fixed grid (the same for every budget, so more memory never loses a candidate), the
        # largest wave that fits, and equal waves just within it (no last wave decoding alone).
        grid = {max(1, round(2 ** (i / 2))) for i in range(0, 2 * int(math.log2(MAX_WAVE)) + 1)}
        grid |= {math.ceil(n / j) for j in range(1, 9)}
        waves = math.ceil(n / top)
        grid |= {math.ceil(n / j) for j in range(waves, waves + 3)} | {top}
        # Waves under 16 only when nothing larger fits: every step streams the same weights for them.
        low = min(16, top)
        return sorted(w for w in grid if low <= w <= top)

    # ---- feasibility ---------------------------------------------------------------------------------
    def device_need(self, knobs: Knobs) -> int:
        t = device_transient_bytes(self.shape, knobs, self.wl.max_prompt_len, self.max_len)
        return sum(t.values()) + self.chooser.weights_minimum()

    def fits(self, knobs: Knobs) -> bool:
        if self.usable is not None and self.device_need(knobs) > self.usable:
            return False
        # The host side fits when KV, runtime, embedding and staging do: weights can stay on disk (where
        # there is one; else every weight is in host memory).
        return self.host_budget is None or self.host_need(knobs) <= self.host_budget

    def host_need(self, knobs: Knobs) -> int:
        """The least host memory these knobs need: with the weights it can spare on disk, or all of them."""
        if self.disk_tier:
            return host_floor(self.shape, knobs, self.max_len, self.cuda, self.totals)
        return sum(host_bytes(self.shape, knobs, self.max_len, self.cuda, weights=self.totals.all_weights).values())

    def host_split(self, knobs: Knobs, res: Residency) -> HostTier | None:
        if self.host_budget is None:
            return host_tier(self.shape, knobs, self.max_len, self.cuda, None, {}, {}, self.totals)
        resident, streamed = {}, {}
        for kind, total in self.chooser.totals.items():
            b = self.kind_max[kind]
            out = res.streamed_by_kind.get(kind, 0)
            if out:
                streamed[kind] = (round(out / b), b)
            if total - out:
                resident[kind] = (round((total - out) / b), b)
        return host_tier(self.shape, knobs, self.max_len, self.cuda, self.host_budget, resident, streamed, self.totals)

    def wave_max(self, knobs: Knobs) -> int:
        """The largest wave that fits beside these knobs (0: not even one sequence)."""
        lo, hi = 0, self.max_wave
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.fits(replace(knobs, wave=mid)):
                lo = mid
            else:
                hi = mid - 1
        return lo

    # ---- pricing --------------------------------------------------------------------------------------
    def evaluate(self, knobs: Knobs) -> Evaluation | None:
        if knobs in self.cache:
            return self.cache[knobs]
        result = None
        if self.fits(knobs):
            trans = device_transient_bytes(self.shape, knobs, self.wl.max_prompt_len, self.max_len)
            left = (self.usable - sum(trans.values())) if self.usable is not None else 1 << 62
            res = self.chooser.choose(left, knobs.wave, self.max_resident, with_keys=False, order=self.order)
            tier = self.host_split(knobs, res) if res is not None else None
            if tier is not None:
                model = StepModel(self.shape, self.hw, knobs, res, self.max_len, tier.disk_fraction, self.hybrid,
                                  self.split)
                result = Evaluation(knobs, res, model, job_time(model, self.wl), trans, tier.host, tier)
        self.cache[knobs] = result
        return result

    def _best(self, options: list[Knobs]) -> Evaluation | None:
        best = None
        for k in options:  # in candidate order: on a tie the earlier (smaller) one stays
            e = self.evaluate(k)
            if e is not None and (best is None or e.total_s < best.total_s * (1 - 1e-9)):
                best = e
        return best

    def solve_backend(self, attention: str, kv: str = "dense", hgca: str = "") -> Evaluation | None:
        """The wave and the prefill budget interact (admissions per step x generation length bound the
        wave that can be kept full), so they are searched jointly; then the two micro-batch sizes, also
        jointly (they share the activation memory); again until nothing improves. That descent can stall
        where the wave that suits one attention micro-batch is not the one that suits another (and then a
        larger budget could predict slower than a smaller one did), so it starts from small and from large
        micro-batches, and the better end wins."""
        pre = self.prefill_candidates()
        ffn = self.ffn_candidates()
        attn_mb = self.attn_candidates()
        best = None
        for f, a in START_MICRO_BATCHES:
            start = Knobs(1, pre[0], f if f in ffn else ffn[0], a if a in attn_mb else attn_mb[0], attention, kv, hgca)
            if not self.fits(start):  # start from the smallest transients instead
                start = replace(start, ffn_micro_tokens=min(ffn), attn_micro_batch=min(attn_mb))
            e = self._descend(start, pre, ffn, attn_mb)
            if e is not None and (best is None or e.total_s < best.total_s * (1 - 1e-9)):
                best = e
        return best

    def _descend(self, knobs: Knobs, pre: list[int], ffn: list[int], attn_mb: list[int]) -> Evaluation | None:
        best = None
        for _ in range(3):
            before = best
            for step in ("wave", "micro"):
                if step == "wave":
                    options = [replace(knobs, prefill_tokens=b, wave=w) for b in pre
                               for w in self.wave_candidates(replace(knobs, prefill_tokens=b))]
                else:
                    options = self.micro_options(knobs, ffn, attn_mb)
                e = self._best(options)
                if e is not None and (best is None or e.total_s < best.total_s * (1 - 1e-9)):
                    best = e
                if best is not None:
                    knobs = best.knobs
            if best is before:
                break
        return best

    def micro_options(self, knobs: Knobs, ffn: list[int], attn_mb: list[int]) -> list[Knobs]:
        """Each pair of micro-batch sizes at the current wave, and at the largest wave that fits beside it:
        smaller micro-batches free activation memory for a larger wave, and the two pay off only together
        (a descent that moved one at a time stalled where a 2% change in a rate tipped its first step:
        Qwen1.5-MoE on 6 GiB, wave 23 at 90 s against wave 32 with one sequence per attention call at 80 s)."""
        options = []
        for f in ffn:
            for a in attn_mb:
                k = replace(knobs, ffn_micro_tokens=f, attn_micro_batch=a)
                options.append(k)
                if "wave_size" not in self.pins:
                    top = self.wave_max(k)
                    if top > k.wave:
                        options.append(replace(k, wave=top))
        return options

    def solve(self) -> Evaluation:
        best = {}  # each candidate's fastest
        for name, kv, hgca in self.candidates():
            e = self.solve_backend(name, kv, hgca)
            if e is not None:
                best[(name, kv, hgca)] = e
        if not best:
            raise self.budget_error()
        self.best_by_backend = best
        self.fastest = min(best.values(), key=lambda e: e.total_s)
        # Among near-ties the simplest: exact KV first, then more bits, then the backend's rank.
        return min(self.near_ties(), key=lambda e: (kv_rank(e.knobs.kv_format), backend(e).rank, backend(e).name,
                                                     e.knobs.hgca))

    # ---- near-ties (see the module's docstring) ------------------------------------------------------
    def tie_tolerance(self, e: Evaluation) -> float:
        """How close e must come to the fastest to tie with it: TIE_TOLERANCE, or the machine's CPU
        attention noise where exactly one of the two runs decode attention on the CPU (the comparison then
        hangs on that rate)."""
        on_cpu = {backend(x).attends_on_host for x in (e, self.fastest)}
        return max(TIE_TOLERANCE, self.hw.cpu_attn_noise) if len(on_cpu) == 2 else TIE_TOLERANCE

    def near_ties(self) -> list[Evaluation]:
        """Each backend's best that is within its tie tolerance of the fastest (the fastest among them)."""
        return [e for e in self.best_by_backend.values()
                if e.total_s <= self.fastest.total_s * (1 + self.tie_tolerance(e))]

    def near_tie(self, chosen: Evaluation) -> dict | None:
        """The fastest candidate of another backend that was inside the tolerance, as the plan reports
        it; None when the chosen backend had no rival there."""
        rivals = [e for e in self.near_ties() if e.knobs.attention != chosen.knobs.attention]
        if not rivals:
            return None
        alt = min(rivals, key=lambda e: e.total_s)
        k, mine, theirs = alt.knobs, chosen.job.e2e_tok_s, alt.job.e2e_tok_s
        # The chosen backend is the simplest of the near-ties, so the rival is always a less simple one.
        tol = max(self.tie_tolerance(alt), self.tie_tolerance(chosen))
        why = "" if tol == TIE_TOLERANCE else " (this machine's CPU attention rate is that noisy from probe to probe)"
        words = (f"within {tol:.0%} of {backend(alt).words} (wave {k.wave}: {theirs:,.0f} tok/s "
                 f"predicted against {mine:,.0f}); inside {tol:.0%}{why} the planner keeps the simpler "
                 "placement, so noise in the measured rates cannot flip the choice")
        return {"attention": k.attention, "wave_size": k.wave,
                "prefill_tokens": k.prefill_tokens, "ffn_micro_tokens": k.ffn_micro_tokens,
                "attn_micro_batch": k.attn_micro_batch, "e2e_tok_s": theirs, "chosen_e2e_tok_s": mine,
                "tolerance": tol, "words": words}

    # ---- the clear minimum --------------------------------------------------------------------------
    def minimum_knobs(self, attention: str) -> Knobs:
        return Knobs(int(self.pins.get("wave_size", 1)), min(self.prefill_candidates()), min(self.ffn_candidates()),
                     min(self.attn_candidates()), attention)

    def budget_error(self) -> BudgetError:
        options = [self.minimum_knobs(name) for name in self.backends()]
        floor = self.host_need
        if self.host_budget is not None and all(floor(k) > self.host_budget for k in options):
            k = min(options, key=floor)
            if not self.disk_tier:
                return BudgetError(
                    f"--cpu-memory {format_bytes(self.host_budget)} is too small for this model: synthetic weights "
                    f"have no disk tier, so all {format_bytes(self.totals.all_weights)} of them must be in host "
                    f"memory with one sequence's KV and the runtime ({format_bytes(floor(k))}); give more "
                    "--cpu-memory, or write the model with `offbatch synth` and give its folder (whose weights can "
                    "stay on disk)")
            return BudgetError(
                f"--cpu-memory {format_bytes(self.host_budget)} is too small for this model: even with its weights "
                f"read from disk it needs {format_bytes(floor(k))} of host memory (the embedding table, "
                f"{STAGING_BUFFERS} staging buffers, KV and the runtime); give more --cpu-memory")
        k = min(options, key=self.device_need)
        need = self.device_need(k)
        t = device_transient_bytes(self.shape, k, self.wl.max_prompt_len, self.max_len)
        budget = self.gpu_budget if self.gpu_budget is not None else 0
        kv_note = ("KV in host memory" if get_attention(k.attention).kv_on_host
                   else f"one sequence's KV {format_bytes(kv_slot_bytes(self.shape, k, self.max_len))}")
        return BudgetError(
            f"--gpu-memory {format_bytes(budget)} is too small for this model: streaming needs at least "
            f"{format_bytes(math.ceil(need / SAFETY))} (weight buffers {format_bytes(self.chooser.weights_minimum())}, "
            f"{kv_note}, activations {format_bytes(t['activations'])}); give more GPU memory or shorter --max-tokens")


def kv_rank(name: str) -> tuple[bool, int]:
    """Exact KV formats before lossy ones, more bits before fewer."""
    fmt = kv_format(name, torch.float32)
    return fmt.lossy, -getattr(fmt, "bits", 16)


def backend(e: Evaluation):
    """The attention backend (class) of an evaluated candidate."""
    return get_attention(e.knobs.attention)


# ---- reports ----------------------------------------------------------------------------------------
def typical_steps(model: StepModel, wl: Workload, job: JobTime) -> tuple[StepTime, StepTime]:
    """A representative decode-only step and admitting step of the job."""
    k = model.knobs
    live = min(k.wave, wl.num_requests)
    dec_steps = job.steps - job.prefill_steps
    d = round(job.decode_tokens / dec_steps) if dec_steps > 0 else live
    gen = max(1, round(wl.gen_len))
    ctx_mean, ctx_max = wl.prompt_len + gen / 2, wl.prompt_len + gen - 1
    decode = model.step(max(d, 1), 0, wl.prompt_len, ctx_mean, ctx_max)
    a = min(admits_per_step(k.prefill_tokens, wl.prompt_len), live)
    prefill = model.step(max(0, live - a) // 2, a, wl.prompt_len, ctx_mean, ctx_max)
    return decode, prefill


BOTTLENECK_WORDS = {
    "pcie": "PCIe: {weights} of weights{kv} cross the link every decode step at {rate:.1f} GB/s ({share:.0%} of the "
            "step); more GPU memory (more resident weights, a larger wave) or a faster link helps",
    "gpu": "GPU compute: {gflop:.0f} GFLOP per decode step at the GEMM efficiency of {tokens} tokens per module "
           "({share:.0%} of the step); a larger wave raises the efficiency",
    "cpu-attention": "CPU attention: the host threads read {kvread} of KV per decode step ({share:.0%} of the "
                     "step); attention on the GPU or a smaller wave helps",
    "host": "host work: sampling and bookkeeping of {seqs} sequences per decode step ({share:.0%} of the step)",
    "disk": "disk: {diskb} of weights that do not fit the host memory budget are read from the model folder "
            "every decode step at {diskrate:.2f} GB/s ({share:.0%} of the step); more --cpu-memory helps",
}


def bottleneck_words(st: StepTime, model: StepModel) -> str:
    kind = st.bottleneck()
    share = {"pcie": max(st.copy_s, st.kv_copy_s), "gpu": st.gpu_s + st.serial_s, "cpu-attention": st.cpu_attn_s,
             "host": st.host_s, "disk": st.disk_s}[kind] / st.total_s
    kv = f" and {format_bytes(st.kv_bytes)} of KV" if st.kv_bytes else ""
    kvread = format_bytes(st.cpu_attn_s * (model.hw.host.cpu_attn_contended_bytes_s if model.streams
                                           else model.hw.host.cpu_attn_bytes_s))
    return BOTTLENECK_WORDS[kind].format(weights=format_bytes(st.weight_bytes), kv=kv,
                                         rate=model.hw.h2d_pinned_bytes_s / 1e9, share=share, gflop=st.flops / 1e9,
                                         tokens=st.tokens, kvread=kvread, seqs=st.sequences,
                                         diskb=format_bytes(st.weight_bytes * model.disk_fraction),
                                         diskrate=model.hw.host.disk_read_bytes_s / 1e9)


def prediction(model: StepModel, wl: Workload, job: JobTime) -> dict:
    decode, prefill = typical_steps(model, wl, job)
    floor = model.floor_s(decode)
    return {
        "prefill_tok_s": job.prefill_tok_s, "decode_tok_s": job.decode_tok_s, "e2e_tok_s": job.e2e_tok_s,
        "total_s": job.total_s, "prefill_s": job.prefill_s, "decode_s": job.decode_s, "steps": job.steps,
        "prefill_steps": job.prefill_steps,
        "decode_floor_tok_s": decode.sequences / floor if floor else 0.0,
        "load_s": model.shape.total_bytes / model.hw.host.disk_read_bytes_s,
        "decode_step": decode.describe(), "prefill_step": prefill.describe(),
        "bottleneck": bottleneck_words(decode, model), "bottleneck_kind": decode.bottleneck(),
    }


def to_plan(e: Evaluation, solver: Solver, chosen_by: str = "solver") -> Plan:
    k = e.knobs
    left = (solver.usable - sum(e.transient.values())) if solver.usable is not None else 1 << 62
    res = solver.chooser.choose(left, k.wave, solver.max_resident, with_keys=True, order=solver.order)  # with its modules
    disk, host = set(), e.host
    if e.tier is not None and (e.tier.disk_resident_bytes or e.tier.disk_streamed_bytes):
        chosen = choose_disk(solver.shape, res.resident, e.tier, solver.host_budget, k, solver.max_len, solver.cuda)
        if chosen is None:
            raise BudgetError(f"--cpu-memory {format_bytes(solver.host_budget)} is too small: the weights do not "
                              "split between host memory and disk under it; give more --cpu-memory")
        disk, host = chosen
    model = e.model
    if disk:  # price the modules chosen (the search priced a byte estimate of them)
        model = StepModel(solver.shape, solver.hw, k, e.residency, solver.max_len,
                          disk_fraction(solver.shape, res.resident, disk), solver.hybrid, solver.split)
        e = dataclasses.replace(e, model=model, job=job_time(model, solver.wl))
    return Plan(
        device=solver.device, dtype=solver.shape.dtype, wave_size=k.wave, max_len=solver.max_len,
        prefill_tokens=k.prefill_tokens, attn_micro_batch=min(k.attn_micro_batch, k.wave),
        ffn_micro_tokens=k.ffn_micro_tokens, slots=dict(res.slots), resident=set(res.resident),
        attention=k.attention, kv_format=k.kv_format, hgca=k.hgca, moe_ffn=moe_ffn_of(solver.shape),
        weights=solver.shape.weights,
        budget_bytes=solver.gpu_budget,
        memory={"kv": e.transient["kv"], "weight_slots": res.slot_bytes, "resident_weights": res.resident_bytes,
                "activations": e.transient["activations"]},
        host_memory=host, predicted=prediction(e.model, solver.wl, e.job), hardware=solver.hw.name,
        chosen_by=chosen_by, disk=disk, staging_buffers=STAGING_BUFFERS, residency_order=solver.order,
        near_tie=solver.near_tie(e), split_stream=solver.split,
    )


def moe_ffn_of(shape: ModelShape) -> str:
    """The FFN backend of the model's MoE layers ("" for a dense model)."""
    return choose_moe(shape.spec, shape.dtype)


def disk_fraction(shape: ModelShape, resident: set, disk: set) -> float:
    """Share of the streamed weight bytes that the disk tier holds."""
    streamed = [k for k in shape.nbytes if k[1] not in ("embed", "router") and k not in resident]
    total = sum(shape.nbytes[k] for k in streamed)
    return sum(shape.nbytes[k] for k in streamed if k in disk) / total if total else 0.0


# ---- entry points -------------------------------------------------------------------------------------
def this_cpu(profile: Hardware) -> Hardware:
    """The fixed `cpu` profile's rates (so CPU runs plan the same everywhere) with this machine's memory
    (what a cap is checked against: a CPU run may use more than the profile's 16 GiB where it is there)."""
    from offbatch.planner.probe import host_memory_bytes

    memory = host_memory_bytes()
    return dataclasses.replace(profile, gpu_memory_bytes=memory, host=dataclasses.replace(profile.host, memory_bytes=memory),
                               source="this machine's memory, the built-in cpu profile's rates")


def resolve_hardware(hardware: Hardware | str | None, device: str, model_dir=None) -> Hardware:
    """A Hardware object, a profile name or file, or None: this machine (probed once, cached); the
    engine on the CPU uses the fixed `cpu` profile so CPU runs plan the same everywhere."""
    from offbatch.planner.hardware import PROFILES, load_hardware

    if isinstance(hardware, Hardware):
        return hardware
    if hardware:
        return load_hardware(hardware)
    if torch.device(device).type != "cuda":
        return this_cpu(PROFILES["cpu"])
    from offbatch.planner.probe import probe_hardware

    return probe_hardware(device, model_dir)


def check_caps(hw: Hardware, device: str, gpu_memory: int | None, cpu_memory: int | None) -> None:
    """A cap above what the machine has is refused, not clamped: it is a typo (100GiB for 10GiB) or a plan
    for another machine, and planning with it would promise memory that is not there (the solver filled
    40 GiB on a 24 GiB profile; a 10 TiB host cap planned 155 GiB of pinned memory on 64 GiB). The
    machine is the hardware profile planned for (`--hardware`), or this one as probed."""
    here = hw.name.startswith("probed:") or hw.source.startswith("this machine")
    refuse_caps("this machine's" if here else f"the {hw.name} profile's", hw.gpu_memory_bytes, hw.host.memory_bytes,
                hw.gpu_name, device, gpu_memory, cpu_memory)


def check_caps_here(device: str, gpu_memory: int | None, cpu_memory: int | None) -> None:
    """check_caps against this machine's memory as torch and the OS report it (no probe): what `run`
    checks before it reads anything, whichever engine it runs."""
    from offbatch.planner.probe import device_memory_bytes, host_memory_bytes

    name = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"
    refuse_caps("this machine's", device_memory_bytes(device), host_memory_bytes(), name, device, gpu_memory,
                cpu_memory)


def refuse_caps(whose: str, gpu_total: int, host_total: int, gpu_name: str, device: str, gpu_memory: int | None,
                cpu_memory: int | None) -> None:
    on_cpu = torch.device(device).type != "cuda"
    if gpu_memory is not None and gpu_memory > gpu_total:
        what = "memory (the CPU computes in host memory)" if on_cpu else f"GPU memory ({gpu_name})"
        raise BudgetError(f"--gpu-memory {format_bytes(gpu_memory)} is more than {whose} {format_bytes(gpu_total)} "
                          f"of {what}: give at most that" + ("" if on_cpu else ", or plan for a larger GPU with --hardware"))
    if cpu_memory is not None and cpu_memory > host_total:
        raise BudgetError(f"--cpu-memory {format_bytes(cpu_memory)} is more than {whose} {format_bytes(host_total)} "
                          "of host memory: give at most that")


def make_plan(spec: ModelSpec, dtype: torch.dtype, device: str, gpu_memory: int | None, workload: Workload,
              hardware: Hardware | str | None = None, cpu_memory: int | None = None, max_wave: int = MAX_WAVE,
              max_resident_bytes: int | None = None, shape: ModelShape | None = None, weights: str = "dense",
              disk_tier: bool = True, kv_formats=("dense",), hgca: HGCASetting | None = None,
              hgca_window_given: bool = True, neurons=None, split_stream: int = 1, **pins) -> Plan:
    """The solver's plan for a job. `pins` fix knobs (wave_size, prefill_tokens, ffn_micro_tokens,
    attn_micro_batch, attention, residency_order); the rest is chosen. weights: the weight format the
    model is stored in (its module sizes are what the plan places and streams). disk_tier: whether
    weights may be left in the model folder (False for synthetic weights). kv_formats: the KV formats
    allowed (the solver takes the fastest within its tie tolerance, exact first); hgca: HGCA allowed with
    this setting (its window searched unless hgca_window_given). neurons: the model's neuron statistics
    and predictors (ffn.neurons.NeuronStats): the hybrid FFN is allowed, and taken where it is faster."""
    hw = resolve_hardware(hardware, device)
    check_caps(hw, device, gpu_memory, cpu_memory)
    if shape is not None and shape.weights != weights:
        raise OffbatchError(f"the model's shape is of the {shape.weights} format, not {weights}")
    shape = shape or shape_from_spec(spec, dtype, get_format(weights))
    if workload.max_len > spec.max_position:
        raise OffbatchError(f"the job needs a context of {workload.max_len} tokens; the model's is {spec.max_position}")
    if torch.device(device).type == "cuda" and gpu_memory is None:
        gpu_memory = hw.gpu_memory_bytes
    host = cpu_memory if cpu_memory is not None else int(HOST_SHARE * hw.host.memory_bytes)
    solver = Solver(shape, hw, workload, device, gpu_memory, host, max_wave, max_resident_bytes, pins, disk_tier,
                    kv_formats, hgca, hgca_window_given, split_stream)
    best = solver.solve()
    if neurons is not None and torch.device(device).type == "cuda":
        from offbatch.planner.hybrid_ffn import apply_hybrid, choose_hybrid

        hybrid = choose_hybrid(solver, best, neurons)
        if hybrid is not None:
            e, trial, bound = hybrid
            return apply_hybrid(to_plan(e, trial), bound)
    return to_plan(best, solver)


def predict(plan: Plan, shape: ModelShape, hw: Hardware, workload: Workload, neurons=None) -> dict:
    """The cost model's figures for any plan (a pinned one, the rules' one). neurons: the model's neuron
    statistics, to price a hybrid plan's FFN (without them it is priced dense)."""
    knobs = Knobs(plan.wave_size, plan.prefill_tokens, plan.ffn_micro_tokens, plan.attn_micro_batch,
                  plan.attention, plan.kv_format, plan.hgca)
    res = residency_of(shape, plan.resident, plan.slots)
    hybrid = None
    if plan.dense_ffn == "hybrid" and neurons is not None:
        from offbatch.ffn.hybrid import neuron_bytes
        from offbatch.ffn.hybrid_fetch import fetch_scratch_bytes
        from offbatch.planner.hybrid_ffn import HybridTerms, NeuronCosts

        costs = NeuronCosts.of(neurons, shape.spec, shape.dsize)
        layers = sum(1 for k in shape.nbytes if k[1] == "ffn" and k[0] >= 0 and k not in res.resident)
        hot_bytes = layers * (plan.hot_neurons * neuron_bytes(shape.spec, shape.dsize) + costs.predictor_bytes)
        scratch = fetch_scratch_bytes(shape.spec, shape.dsize, plan.hybrid_tokens) if plan.hybrid_fetch_tokens else 0
        hybrid = HybridTerms(costs, hot_bytes + scratch, plan.hybrid_tokens, plan.hybrid_fetch_tokens, scratch)
    model = StepModel(shape, hw, knobs, res, plan.max_len, disk_fraction(shape, res.resident, plan.disk), hybrid,
                      plan.split_stream)
    return prediction(model, workload, job_time(model, workload))
