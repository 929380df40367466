"""The hybrid FFN backend (PowerInfer): a layer's hot neurons resident on the GPU and computed for every
token there; its cold neurons left in host memory and computed on the host threads, for each token only
where the layer's predictor marks them active; the two partial sums added (ffn/hybrid_mlp.py has the
arithmetic and why it is exact with an oracle on ReLU FFNs).

Per layer and step (small steps: at most the plan's `hybrid_tokens` tokens):
  GPU: norm -> predictor -> the step's inputs and predicted activity go to pinned host buffers -> the hot
       partial sum, while the host works -> the host's partial sum comes back and is added;
  host (one worker thread, torch's intra-op threads under it): the union of the tokens' active cold
       neurons, their rows of up (and gate) and their rows of down^T gathered, two small GEMMs, the
       activations masked per token.
A step of at least the plan's `hybrid_fetch_tokens` tokens takes the other cold path (ffn/hybrid_fetch.py): the
GPU reads the union's rows from pinned host memory itself and multiplies them there, no host work.
A large step (prefill: its union is every neuron, far too much for the host threads) streams the layer's
whole FFN module as the dense backend does: the engine schedules the FFN modules of a step only when it
is large (`StreamingEngine.step`). Layers whose FFN module the plan keeps resident run dense always.

With an oracle (NeuronStats.oracle) the host computes every cold neuron and keeps those truly active: on a
ReLU FFN that is the dense FFN (tests: the engine's tokens equal the dense engine's).
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F

from offbatch.errors import OffbatchError
from offbatch.ffn.base import FFNBackend, register_ffn
from offbatch.ffn.dense import DenseFFN, mlp_chunked
from offbatch.ffn.hybrid_fetch import ColdFetcher, FetchLayer
from offbatch.offload.pinned import pin_in_place, unpin_in_place
from offbatch.ffn.neurons import NeuronStats
from offbatch.models import layers as L
from offbatch.models.spec import ModelSpec


def neuron_bytes(spec: ModelSpec, dsize: int) -> int:
    """Bytes of one FFN neuron: its row of up (and gate), its column of down, its biases."""
    rows = 3 if spec.gated_ffn else 2
    bias = spec.mlp_bias or spec.family == "opt"
    return rows * spec.hidden_size * dsize + (rows - 1) * dsize * int(bias)


def _activations(h: torch.Tensor, up: torch.Tensor, up_b, gate, gate_b, spec: ModelSpec) -> torch.Tensor:
    a = F.linear(h, up, up_b)
    if spec.gated_ffn:
        return L.activation(spec.activation, F.linear(h, gate, gate_b)) * a
    return L.activation(spec.activation, a)


class HotPart:
    """A layer's hot neurons on the device, with the FFN's norm and down bias."""

    def __init__(self, w, hot: torch.Tensor, spec: ModelSpec, device, dtype, down_hot: torch.Tensor):
        """w: the layer's FFN weights (host); down_hot [hidden, hot]: down's hot columns (split_down)."""
        def dev(t):
            return None if t is None else t.to(device=device, dtype=dtype).contiguous()

        self.spec = spec
        self.norm = {k: dev(t) for k, t in w.items() if k.startswith("ffn_norm")}
        self.up, self.up_b = dev(w["up.weight"][hot]), dev(_rows(w.get("up.bias"), hot))
        self.gate = dev(w["gate.weight"][hot]) if spec.gated_ffn else None
        self.gate_b = dev(_rows(w.get("gate.bias"), hot)) if spec.gated_ffn else None
        self.down = dev(down_hot)
        self.down_b = dev(w.get("down.bias"))
        self.count = int(hot.numel())
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.up, self.up_b, self.gate, self.gate_b, self.down)
                          if t is not None)

    def partial(self, h: torch.Tensor) -> torch.Tensor:
        """The hot neurons' sum for every token, plus the down bias: [T, hidden]."""
        if self.count:
            y = F.linear(_activations(h, self.up, self.up_b, self.gate, self.gate_b, self.spec), self.down)
        else:
            y = h.new_zeros(h.shape[0], self.spec.hidden_size)
        return y if self.down_b is None else y + self.down_b


class Workspace:
    """Host buffers the cold part gathers into, grown to the largest union seen and reused: a fresh tens-of-MB
    tensor per call costs its page faults every time (3x the gather itself on the CPU we measured)."""

    def __init__(self):
        self.bufs: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols:
            buf = self.bufs[key] = torch.empty(max(rows, 1), cols, dtype=dtype)
        return buf[:rows]


class ColdPart:
    """A layer's cold neurons in host memory: up (and gate) read in place from the packed weights by neuron,
    down kept transposed (a neuron's column of down is then one contiguous row to gather)."""

    def __init__(self, w, cold: torch.Tensor, spec: ModelSpec, down_t: torch.Tensor, threshold: float = 0.0,
                 workspace: Workspace | None = None, compute_dtype: torch.dtype = torch.float32):
        """down_t [cold, hidden]: down's cold columns as rows (split_down). compute_dtype: what the host
        multiplies in (float32: weights converted after the gather; or the weights' own dtype where the CPU
        multiplies that fast)."""
        self.spec, self.cold, self.threshold = spec, cold, threshold
        self.up, self.up_b = w["up.weight"], w.get("up.bias")
        self.gate, self.gate_b = (w["gate.weight"], w.get("gate.bias")) if spec.gated_ffn else (None, None)
        self.down_t = down_t
        self.count = int(cold.numel())
        self.ws = workspace or Workspace()
        self.compute_dtype = compute_dtype

    def _gather(self, name: str, src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """src's rows idx, in the compute dtype, in workspace buffers."""
        rows = torch.index_select(src, 0, idx, out=self.ws.get(name, idx.numel(), src.shape[1], src.dtype))
        if rows.dtype == self.compute_dtype:
            return rows
        return self.ws.get(name + "_c", idx.numel(), src.shape[1], self.compute_dtype).copy_(rows)

    def partial(self, h: torch.Tensor, active: torch.Tensor | None) -> tuple[torch.Tensor, int]:
        """(sum over the cold neurons of h_j(x) down_j for each token where active [T, cold] says - None: the
        oracle, where the activation is truly non-zero (ReLU) or above the profile's threshold - float32
        [T, hidden]; how many neurons were computed)."""
        cd = self.compute_dtype
        h = h.to(cd)
        if active is None:
            used = torch.arange(self.count)
        else:
            used = active.any(dim=0).nonzero().squeeze(1)
        if used.numel() == 0:
            return torch.zeros(h.shape[0], self.spec.hidden_size), 0
        idx = self.cold[used]
        # [U, T] products with the gathered weight as the left operand: the BLAS's fast orientation for a few
        # tokens (5x F.linear's at 8 tokens on the CPU we measured).
        a = torch.mm(self._gather("up", self.up, idx), h.t())
        if self.up_b is not None:
            a += self.up_b[idx].to(cd)[:, None]
        if self.gate is not None:
            g = torch.mm(self._gather("gate", self.gate, idx), h.t())
            if self.gate_b is not None:
                g += self.gate_b[idx].to(cd)[:, None]
            a = L.activation(self.spec.activation, g) * a
        else:
            a = L.activation(self.spec.activation, a)
        keep = a.abs() > self.threshold if active is None else active[:, used].t()
        a = torch.where(keep, a, torch.zeros((), dtype=a.dtype))
        y = torch.mm(a.t(), self._gather("down", self.down_t, used))
        return y.float(), int(used.numel())


def choose_host_dtype(part: ColdPart, tokens: int, weights_dtype: torch.dtype) -> tuple[torch.dtype, dict]:
    """float32 or the weights' dtype for the host's products, whichever this CPU runs faster on a layer's cold
    part (some CPUs multiply bf16 natively, others emulate it 100x slower); with the times measured."""
    import time as _time

    if weights_dtype == torch.float32:
        return torch.float32, {}
    g = torch.Generator().manual_seed(0)
    used = max(1, part.count // 8)
    active = torch.zeros(tokens, part.count, dtype=torch.bool)
    active[:, torch.randperm(part.count, generator=g)[:used]] = True
    h = torch.randn(tokens, part.spec.hidden_size, generator=g)
    times = {}
    for dt in (torch.float32, weights_dtype):
        part.compute_dtype = dt
        part.partial(h, active)
        t0 = _time.perf_counter()
        part.partial(h, active)
        times[str(dt).replace("torch.", "")] = _time.perf_counter() - t0
    best = min((torch.float32, weights_dtype), key=lambda d: times[str(d).replace("torch.", "")])
    part.compute_dtype = best
    return best, times


class DownSplitter:
    """Splits each layer's down weight into its hot columns (on the device) and its cold columns as rows (in
    host memory). A column gather is strided; on a GPU it runs there, a block of down's rows at a time,
    through scratch allocated once for every layer: fresh per-block temporaries fragmented the capped
    allocator until a 48-layer OPT-30B build ran out of memory with 1.5 GiB reserved but free."""

    def __init__(self, device, block_rows: int = 256):
        self.device, self.block_rows = torch.device(device), block_rows
        self.block = self.cold_block = None

    def _scratch(self, name: str, rows: int, cols: int, dtype) -> torch.Tensor:
        buf = getattr(self, name)
        if buf is None or buf.numel() < rows * cols or buf.dtype != dtype:
            setattr(self, name, None)
            buf = torch.empty(rows * cols, dtype=dtype, device=self.device)
            setattr(self, name, buf)
        return buf[: rows * cols].view(rows, cols)

    def split(self, down: torch.Tensor, hot: torch.Tensor, cold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(down's hot columns [hidden, hot] on the device, its cold columns as rows [cold, hidden] on the host)."""
        if self.device.type != "cuda":
            return down[:, hot].contiguous(), down.t()[cold].contiguous()
        dev = self.device
        hot_d, cold_d = hot.to(dev), cold.to(dev)
        hot_cols = torch.empty(down.shape[0], hot.numel(), dtype=down.dtype, device=dev)
        cold_rows = torch.empty(cold.numel(), down.shape[0], dtype=down.dtype)
        for r0 in range(0, down.shape[0], self.block_rows):
            n = min(self.block_rows, down.shape[0] - r0)
            blk = self._scratch("block", self.block_rows, down.shape[1], down.dtype)[:n]
            blk.copy_(down[r0 : r0 + n])
            torch.index_select(blk, 1, hot_d, out=hot_cols[r0 : r0 + n])
            part = self._scratch("cold_block", self.block_rows, cold.numel(), down.dtype)[:n]
            torch.index_select(blk, 1, cold_d, out=part)
            cold_rows[:, r0 : r0 + n] = part.cpu().t()  # contiguous to the host, transposed there
        return hot_cols, cold_rows

    def close(self) -> None:
        self.block = self.cold_block = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()  # the scratch's segments back, before the KV store is allocated


def split_down(down: torch.Tensor, hot: torch.Tensor, cold: torch.Tensor, device,
               block_rows: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """One layer's split (DownSplitter.split with its own scratch)."""
    splitter = DownSplitter(device, block_rows)
    try:
        return splitter.split(down, hot, cold)
    finally:
        splitter.close()


def _rows(t, idx):
    return None if t is None else t[idx]


def _f32(t):
    return None if t is None else t.float()


class DevicePredictor:
    """A layer's predictor over its cold neurons only, on the device in the compute dtype."""

    def __init__(self, predictor, cold: torch.Tensor, device, dtype):
        self.a = predictor.a.to(device=device, dtype=dtype).contiguous()
        self.b = predictor.b[cold].to(device=device, dtype=dtype).contiguous()
        c = getattr(predictor, "c", None)
        self.c = None if c is None else c.to(device=device, dtype=dtype)
        self.cut = float(predictor.cut)
        self.nbytes = self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()

    def active(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(torch.relu(F.linear(h.to(self.a.dtype), self.a, self.c)), self.b) > self.cut


@register_ffn
class HybridFFN(FFNBackend):
    name = "hybrid"

    @staticmethod
    def modules(spec: ModelSpec, layer: int) -> list[str]:
        return ["ffn"]  # what a large step streams (the dense path)

    @classmethod
    def applies(cls, spec: ModelSpec, dtype) -> bool:
        return spec.moe is None or any(not spec.is_moe_layer(i) for i in range(spec.num_layers))

    def __init__(self, spec: ModelSpec, modules, micro_tokens: int, store=None, neurons: NeuronStats | None = None,
                 hot_neurons: int = 0, hybrid_tokens: int = 0, resident=frozenset(), device="cpu", dtype=None,
                 fetch_tokens: int = 0):
        """store: the packed weights (dense format: the host views are the cold neurons' home); neurons:
        activity and predictors; hot_neurons: per hybrid layer; hybrid_tokens: steps of at most this many
        tokens run hybrid; resident: the plan's resident modules (their layers run dense); fetch_tokens:
        hybrid steps of at least this many tokens (0: none) fetch their cold union to the device
        (ffn/hybrid_fetch.py) in place of the host threads."""
        super().__init__(spec, modules, micro_tokens)
        if store is None or neurons is None:
            raise OffbatchError("the hybrid FFN needs the packed weights and the model's neuron statistics")
        if store.format.name != "dense":
            raise OffbatchError(f"the hybrid FFN splits dense weights by neuron; these are {store.format.name}: "
                                "run it on the dense model")
        neurons.check(spec)
        self.device, self.dtype = torch.device(device), dtype or store.dtype
        self.hybrid_tokens = hybrid_tokens
        self.fetch_tokens = fetch_tokens
        self.neurons = neurons
        self.layers = [i for i in range(spec.num_layers) if not spec.is_moe_layer(i) and (i, "ffn") not in resident]
        self.hot: dict[int, HotPart] = {}
        self.cold: dict[int, ColdPart] = {}
        self.pred: dict[int, DevicePredictor] = {}
        thresholds = neurons.thresholds
        self.workspace = Workspace()  # one worker thread computes every layer's cold part: one set of buffers
        splitter = DownSplitter(self.device)
        for i in self.layers:
            w = store.host_views((i, "ffn"))
            hot, cold = neurons.hot_cold(i, hot_neurons)
            down_hot, down_t = splitter.split(w["down.weight"], hot, cold)
            self.hot[i] = HotPart(w, hot, spec, self.device, self.dtype, down_hot)
            self.cold[i] = ColdPart(w, cold, spec, down_t, thresholds.get(i, 0.0), self.workspace)
            del down_hot
            if not neurons.oracle:
                self.pred[i] = DevicePredictor(neurons.predictors[i], cold, self.device, self.dtype)
        splitter.close()
        self.fetcher, self.fetch_layers, self._registered = None, {}, []
        if fetch_tokens:
            if self.device.type == "cuda":  # the GPU reads the cold rows in place: their memory must be page-locked
                for c in self.cold.values():
                    if pin_in_place(c.down_t):
                        self._registered.append(c.down_t)
                    if not c.up.is_pinned():
                        raise OffbatchError("the hybrid FFN's fetch path needs the weights in pinned host memory")
            self.fetcher = ColdFetcher(spec, self.device, self.dtype)
            self.fetch_layers = {i: FetchLayer(c, self.device, self.dtype) for i, c in self.cold.items()}
        self.device_bytes = (sum(p.nbytes for p in self.hot.values()) + sum(p.nbytes for p in self.pred.values())
                             + (self.fetcher.nbytes if self.fetcher is not None else 0))
        self.host_bytes = sum(c.down_t.numel() * c.down_t.element_size() for c in self.cold.values())
        # The host's product dtype, measured on this CPU (float32 on the CPU as compute device: exact tests).
        self.host_dtype, self.host_dtype_times = torch.float32, {}
        if self.device.type == "cuda" and self.cold:
            first = self.cold[self.layers[0]]
            self.host_dtype, self.host_dtype_times = choose_host_dtype(first, max(1, min(hybrid_tokens, 8)), store.dtype)
            for c in self.cold.values():
                c.compute_dtype = self.host_dtype
        self.use_hybrid = False  # this step (the engine sets it)
        self.stats = {"calls": 0, "tokens": 0, "cold_neurons": 0, "cold_count": 0, "host_s": 0.0, "wait_s": 0.0,
                      "fetch_calls": 0, "fetch_s": 0.0}
        self._cuda = self.device.type == "cuda"
        if self._cuda:
            t, h = max(1, hybrid_tokens), spec.hidden_size
            widest = max((c.count for c in self.cold.values()), default=1)
            self._h = torch.empty(t, h, dtype=self.dtype, pin_memory=True)
            self._mask = torch.empty(t * max(1, widest), dtype=torch.bool, pin_memory=True)  # [T, cold] rows packed
            self._out = [torch.empty(t, h, dtype=torch.float32, pin_memory=True) for _ in range(2)]
            self._out_free = [None, None]  # the event after which each output buffer may be written again
            self._turn = 0
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="offbatch-cold-ffn")

    def close(self) -> None:
        if self._cuda:
            self._pool.shutdown(wait=True)
            torch.cuda.synchronize(self.device)  # no kernel may still read a buffer unregistered below
        for t in self._registered:
            unpin_in_place(t)
        self._registered = []

    def forward(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        if not self.use_hybrid or layer not in self.hot:
            return self._dense(layer, x)
        spec = self.spec
        hot = self.hot[layer]
        h = L.norm(x, hot.norm, "ffn_norm", spec) if spec.pre_norm else x
        pred = self.pred.get(layer)
        active = pred.active(h) if pred is not None else None
        st = self.stats
        st["calls"] += 1
        st["tokens"] += h.shape[0]
        st["cold_count"] += self.cold[layer].count
        if self.fetcher is not None and h.shape[0] >= self.fetch_tokens:
            t0 = time.perf_counter()
            y, n = self.fetcher.partial(self.fetch_layers[layer], h, active)
            st["fetch_s"] += time.perf_counter() - t0  # to the union's synchronisation; the rest is queued
            st["fetch_calls"] += 1
            st["cold_neurons"] += n
            return hot.partial(h) + y
        if not self._cuda:
            t0 = time.perf_counter()
            y, n = self.cold[layer].partial(h, active)
            st["host_s"] += time.perf_counter() - t0
            st["cold_neurons"] += n
            return hot.partial(h) + y.to(h.dtype)
        return self._overlapped(layer, h, active)

    def _overlapped(self, layer: int, h: torch.Tensor, active: torch.Tensor | None) -> torch.Tensor:
        """The host's cold part beside the device's hot part (see the module's docstring)."""
        T = h.shape[0]
        if T > self._h.shape[0]:
            raise OffbatchError(f"a hybrid FFN step of {T} tokens is larger than the plan's {self._h.shape[0]}")
        cold = self.cold[layer]
        self._h[:T].copy_(h, non_blocking=True)
        mask = self._mask[: T * cold.count].view(T, cold.count)
        if active is not None:
            mask.copy_(active, non_blocking=True)
        ready = torch.cuda.Event()
        ready.record()
        turn = self._turn
        self._turn ^= 1
        out, free = self._out[turn], self._out_free[turn]

        def job():
            ready.synchronize()
            if free is not None:
                free.synchronize()  # the copy out of this buffer two layers ago is done
            t0 = time.perf_counter()
            y, n = cold.partial(self._h[:T], None if active is None else mask)
            out[:T].copy_(y)
            return n, time.perf_counter() - t0

        fut = self._pool.submit(job)
        y = self.hot[layer].partial(h)  # queued on the device while the host works
        t0 = time.perf_counter()
        n, host_s = fut.result()
        st = self.stats
        st["wait_s"] += time.perf_counter() - t0
        st["host_s"] += host_s
        st["cold_neurons"] += n
        y = y + out[:T].to(self.device, non_blocking=True).to(y.dtype)
        done = torch.cuda.Event()
        done.record()
        self._out_free[turn] = done
        return y

    def _dense(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        return DenseFFN.forward(self, layer, x)


__all__ = ["HybridFFN", "HotPart", "ColdPart", "DevicePredictor", "Workspace", "choose_host_dtype", "neuron_bytes",
           "mlp_chunked"]
