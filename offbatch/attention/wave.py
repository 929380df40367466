"""Attention over a wave whose KV sits in a WaveKV, on the device or in host memory.

Decode: every query attends over its own sequence's keys. The wave's KV is laid out by slot, so a
micro-batch is a contiguous range of slots read as one view (no gather copy); slots without a live
query in the step get a dummy query over one key and their output is dropped. Where the KV lives
and where the product runs are separate choices:
  KV on the device           -> attention on the device, in place;
  KV on the host, "gpu"      -> each micro-batch's KV range is copied over (contiguous, from pinned memory);
  KV on the host, "cpu"      -> attention on the host threads; only q and the output cross PCIe.
Prefill: a fresh prompt attends only to itself, so it uses the step's own K/V; they are then stored.
"""

from __future__ import annotations

import torch

from offbatch.attention.dense import grouped_attention
from offbatch.offload.kv import WaveKV


def decode_attention(kv: WaveKV, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     slots: list[int], lengths: list[int], micro_batch: int, where: torch.device,
                     window: int | None = None) -> torch.Tensor:
    """q: [b, nh, d]; k, v: [b, nkv, d] of the new token of each sequence, at position lengths[j] of
    slot slots[j]. Stores k/v, returns attention output [b, nh, d] on q's device."""
    compute = q.device
    store = kv.k[layer].device
    slot_t = torch.tensor(slots, device=store)
    pos_t = torch.tensor(lengths, device=store)
    kv.write_decode(layer, slot_t, pos_t, k.to(store), v.to(store))

    W, (nh, d) = kv.slots, q.shape[1:]
    q_all = torch.zeros(W, nh, d, device=where, dtype=q.dtype)
    where_slots = slot_t.to(where)
    q_all[where_slots] = q.to(where)
    k_len = torch.ones(W, device=where, dtype=torch.long)  # dead slots: one (finite) key, output dropped
    k_len[where_slots] = pos_t.to(where) + 1
    q_pos = torch.zeros(W, device=where, dtype=torch.long)
    q_pos[where_slots] = pos_t.to(where)
    live_len = [0] * W
    for s, n in zip(slots, lengths):
        live_len[s] = n + 1
    out = torch.empty_like(q_all)
    for a in range(0, W, micro_batch):
        b = min(W, a + micro_batch)
        L = max(live_len[a:b])
        if L == 0:
            continue
        row = kv.k[layer][0, :, :1].numel() * kv.k[layer].element_size()  # one position of one slot
        kv.read_bytes += 2 * (b - a) * L * row
        if store.type == where.type:  # (one device per engine: "cuda" and "cuda:0" are the same here)
            kk, vv = kv.k[layer][a:b, :, :L], kv.v[layer][a:b, :, :L]
        else:  # host KV, device attention: copy the whole (contiguous) slot range, then narrow
            kk = kv.k[layer][a:b].to(where, non_blocking=True)[:, :, :L]
            vv = kv.v[layer][a:b].to(where, non_blocking=True)[:, :, :L]
            kv.copied_bytes += 2 * (b - a) * kv.max_len * row
        o = grouped_attention(q_all[a:b, :, None, :], kk, vv, q_pos[a:b, None], k_len[a:b], window)
        out[a:b] = o[:, :, 0, :]
    return out[where_slots].to(compute, non_blocking=True)


def prefill_attention(kv: WaveKV, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      seqs: list[tuple[int, int]], groups: list[list[int]], window: int | None = None) -> torch.Tensor:
    """Fresh prompts. q: [T, nh, d], k/v: [T, nkv, d], rows of sequence j consecutive; seqs[j] = (slot,
    n). groups: lists of sequence indices attended together. Stores k/v at positions 0..n-1."""
    store = kv.k[layer].device
    k_store, v_store = (k, v) if store == k.device else (k.to(store), v.to(store))
    starts, row = [], 0
    for slot, n in seqs:
        kv.write_span(layer, slot, 0, k_store[row : row + n], v_store[row : row + n])
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
        k_len = torch.tensor([seqs[j][1] for j in group], device=q.device)
        o = grouped_attention(qp, kp, vp, q_pos, k_len, window)
        for g, j in enumerate(group):
            r, n = starts[j], seqs[j][1]
            out[r : r + n] = o[g, :, :n].transpose(0, 1)
    return out
