"""Attention over a wave whose KV sits in a WaveKV, on the device or in host memory.

Decode: every query attends over its own sequence's keys. The wave's KV is laid out by slot, so a
micro-batch is a contiguous range of slots read as one view (no gather copy); slots without a live
query in the step get a dummy query over one key and their output is dropped. Where the KV lives
and where the product runs are separate choices (the attention backends built on these calls):
  KV on the device (device-kv)        -> attention on the device, in place;
  KV on the host, GPU (host-kv-gpu)   -> each micro-batch's KV range is copied over (contiguous, pinned);
  KV on the host, CPU (host-kv-cpu)   -> attention on the host threads; only q and the output cross PCIe.
Prefill: a fresh prompt attends only to itself, so it uses the step's own K/V; they are then stored.
The KV is read and written only through WaveKV's methods.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from offbatch import kernels
from offbatch.attention.dense import grouped_attention, grouped_lse
from offbatch.attention.host_attention import host_decode_attention
from offbatch.offload.kv import WaveKV
from offbatch.offload.kv_fetch import RangeFetcher


@dataclass
class DecodeBatch:
    """What decode attention needs of one step's decoding sequences: the same for every layer, so it
    is built (and its index tensors copied to the devices) once per step, not once per layer."""

    slots: list[int]
    lengths: list[int]  # each sequence's KV length before this token = the new token's position
    where: torch.device  # where the attention product runs
    copy_kv: bool  # each micro-batch's KV range is copied to `where` first (host KV, device attention)
    store_slots: torch.Tensor  # slots / positions on the KV's device (synchronous stores)
    store_pos: torch.Tensor
    where_slots: torch.Tensor  # on `where`
    # With copy_kv onto a GPU and pinned host KV: the new tokens' positions on `where`, for the GPU to write
    # them into host KV itself (gpu_writes); None: the host KV writer's thread stores them.
    where_pos: torch.Tensor | None
    k_len: torch.Tensor  # [W] keys per slot (dead slots: one finite key, output dropped)
    q_pos: torch.Tensor  # [W]
    ranges: list[tuple[int, int, int]]  # micro-batches (a, b, longest live length) with a live sequence
    patches: list  # per range, with copy_kv: (rows in the range, positions, rows of q/k/v) on `where`
    # With copy_kv: the copies of each (layer, range) into buffers on `where`, reused by every range of
    # every layer of the step (offload/kv_fetch.py: on a GPU, one range ahead on a stream of their own).
    fetcher: RangeFetcher | None = None


def _index(values, device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":  # pinned + non_blocking: no wait for the device's queue
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def decode_batch(kv: WaveKV, slots: list[int], lengths: list[int], micro_batch: int, where: torch.device,
                 copy_kv: bool | None = None) -> DecodeBatch:
    """copy_kv: None decides by the devices (KV on another device type than `where`); True forces
    the copy-then-patch path (tests run it on one device)."""
    store = kv.device
    if copy_kv is None:
        copy_kv = store.type != where.type  # (one device per engine: "cuda" and "cuda:0" are the same here)
    W = kv.slots
    live_len = [0] * W
    k_len, q_pos = [1] * W, [0] * W
    for s, n in zip(slots, lengths):
        live_len[s] = n + 1
        k_len[s], q_pos[s] = n + 1, n
    ranges, patches = [], []
    for start in range(0, W, micro_batch):
        live = [s for s in range(start, min(W, start + micro_batch)) if live_len[s]]
        if not live:
            continue
        # The span of the micro-batch's live slots: slots not yet filled, or freed at the wave's end, are
        # neither copied nor attended (a micro-batch as wide as the wave would otherwise copy them all).
        a, b = live[0], live[-1] + 1
        L = max(live_len[a:b])
        ranges.append((a, b, L))
        if copy_kv:
            sel = [j for j, s in enumerate(slots) if a <= s < b]
            patches.append((_index([slots[j] - a for j in sel], where), _index([lengths[j] for j in sel], where),
                            _index(sel, where)))
        else:
            patches.append(None)
    fetcher = RangeFetcher(kv, ranges, where) if copy_kv and ranges else None
    where_pos = _index(lengths, where) if copy_kv and gpu_writes(kv, where) else None
    return DecodeBatch(slots, lengths, where, copy_kv, _index(slots, store), _index(lengths, store),
                       _index(slots, where), where_pos, _index(k_len, where), _index(q_pos, where), ranges, patches,
                       fetcher)


def gpu_writes(kv: WaveKV, where: torch.device) -> bool:
    """Whether a step's new K/V rows go from the GPU straight into host KV (a kernel writing the pinned pages
    over the bus, on the compute stream) instead of through the host KV writer's staging copy and thread.
    That thread's scatter, its Python and its waits sat on the host thread's path every layer, and a host KV
    plan with every weight resident is bound by that thread. Only for readers that copy host KV to the GPU
    after the compute stream's work (the next step's copies wait for it); OFFBATCH_KV_GPU_WRITES=0 keeps
    the writer (A/B runs)."""
    return (where.type == "cuda" and kv.device.type == "cpu" and kv.pinned
            and os.environ.get("OFFBATCH_KV_GPU_WRITES", "1") != "0")


def decode_attention(kv: WaveKV, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: DecodeBatch,
                     window: int | None = None, lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """q: [b, nh, d]; k, v: [b, nkv, d] of the new token of each of batch's sequences. Stores k/v,
    returns the attention output [b, nh, d] on q's device and, when asked, the log-sum-exp [b, nh]
    (float32) of each query's scores (the product is the same either way), else None."""
    compute, where = q.device, batch.where
    kv.settle(layer)  # earlier asynchronous writes of this layer (last step's) are in place
    if batch.copy_kv:  # packed once: the store and the patches below take the same rows
        k, v = kv.encode(k), kv.encode(v)
    if batch.where_pos is not None:
        # Written by the GPU into the pinned host KV, on the compute stream: the next step's copies of this
        # layer wait for it (their fetcher starts after this step's work), this step's ranges are patched.
        kernels.scatter_tokens(k, batch.where_slots, batch.where_pos, kv.k[layer])
        kernels.scatter_tokens(v, batch.where_slots, batch.where_pos, kv.v[layer])
    elif batch.copy_kv and kv.writer is not None:
        # The device works on a copy of each range with the new tokens patched in: the host copy of
        # this step's tokens can land later (the next step settles it first).
        kv.writer.store_tokens(layer, k, v, batch.store_slots, batch.store_pos)  # host tensors, built per step
    else:
        kv.write_tokens(layer, batch.store_slots, batch.store_pos, k, v)
    kw, vw = (k.to(where), v.to(where)) if batch.copy_kv else (None, None)

    W, (nh, d) = kv.slots, q.shape[1:]
    q_all = torch.zeros(W, nh, d, device=where, dtype=q.dtype)
    q_all[batch.where_slots] = q.to(where)
    out = torch.empty_like(q_all)
    lse_all = torch.empty(W, nh, device=where, dtype=torch.float32) if lse else None
    for r, ((a, b, L), patch) in enumerate(zip(batch.ranges, batch.patches)):
        if not batch.copy_kv:
            kk, vv = kv.read(layer, a, b, L)
        else:  # the range's copy (issued one range ahead), with this step's tokens patched in
            kk, vv = batch.fetcher.take(layer, r)
            rows, pos, sel = patch
            kk[rows, :, pos] = kw[sel]
            vv[rows, :, pos] = vw[sel]
        if kv.packed:  # the kernel reads the packed rows; it gives the log-sum-exp with the product
            o, s = packed_attention(q_all[a:b], kk, vv, batch.k_len[a:b], kv.bits, kv.group,
                                    batch.q_pos[a:b] - window + 1 if window else None)
            out[a:b] = o
            if lse:
                lse_all[a:b] = s
        else:
            qr, q_pos, k_len = q_all[a:b, :, None, :], batch.q_pos[a:b, None], batch.k_len[a:b]
            out[a:b] = grouped_attention(qr, kk, vv, q_pos, k_len, window)[:, :, 0, :]
            if lse:
                lse_all[a:b] = grouped_lse(qr, kk, q_pos, k_len, window)[:, :, 0]
        if batch.copy_kv:
            batch.fetcher.done()
    got = out[batch.where_slots].to(compute, non_blocking=True)
    return got, (lse_all[batch.where_slots].to(compute, non_blocking=True) if lse else None)


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_len: torch.Tensor, bits: int, group: int,
                     window_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over packed KV rows (offload/kv.py's packed formats): the Triton kernel on a GPU,
    the host threads' chunked version on a CPU (the kernels' dispatch would take the Triton interpreter
    wherever TRITON_INTERPRET is set). Output [S, nh, d] and log-sum-exp [S, nh]."""
    if q.is_cuda:
        return kernels.kv_decode_attention(q, k, v, k_len, bits, group, window_start)
    return host_decode_attention(q, k, v, k_len, bits, group, window_start)


def prefill_attention(kv: WaveKV, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      seqs: list[tuple[int, int]], groups: list[list[int]], window: int | None = None) -> torch.Tensor:
    """Fresh prompts. q: [T, nh, d], k/v: [T, nkv, d], rows of sequence j consecutive; seqs[j] = (slot,
    n). groups: lists of sequence indices attended together. Stores k/v at positions 0..n-1."""
    spans = [(slot, 0, n) for slot, n in seqs]
    if kv.writer is not None:  # host KV filled from the device: stored off the compute stream's path
        kv.writer.store_spans(layer, k, v, spans)
    else:
        kv.write_spans(layer, k, v, spans)
    starts, row = [], 0
    for _, n in seqs:
        starts.append(row)
        row += n
    out = torch.empty_like(q)
    nh, nkv, d = q.shape[1], k.shape[1], q.shape[2]
    for group in groups:
        tmax = max(seqs[j][1] for j in group)
        b = len(group)
        qp = q.new_zeros(b, nh, tmax, d)
        kp = k.new_zeros(b, nkv, tmax, d)
        vp = v.new_zeros(b, nkv, tmax, d)
        for g, j in enumerate(group):
            r, n = starts[j], seqs[j][1]
            qp[g, :, :n] = q[r : r + n].transpose(0, 1)
            kp[g, :, :n] = k[r : r + n].transpose(0, 1)
            vp[g, :, :n] = v[r : r + n].transpose(0, 1)
        q_pos = torch.arange(tmax, device=q.device)[None, :].expand(b, tmax)
        k_len = _index([seqs[j][1] for j in group], q.device)  # no wait for the device's queue
        o = grouped_attention(qp, kp, vp, q_pos, k_len, window)
        for g, j in enumerate(group):
            r, n = starts[j], seqs[j][1]
            out[r : r + n] = o[g, :, :n].transpose(0, 1)
    return out
