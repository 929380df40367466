"""Experiment (issue 15, not a feature): does balancing the keys' channels before quantizing them rescue int4 KV
on models with outlier key channels? Each key channel (RoPE pairs together) is divided by a scale before the KV
format encodes it and multiplied back after decoding - the same as folding the scale into W_q and W_k, exact
without quantization. Scales: each channel's largest |k| on calibration text (the book's end, apart from the
scored window), or an estimate from the weights alone. Scores as `eval-ppl` does (LossyCacheAttention's view).

  python scripts/exp_key_balance.py MODEL_DIR int4 1 int4     # model, (unused), windows of 2048, KV formats
Results: BENCHMARKS.md, twelfth session.
"""
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
from offbatch.attention.lossy_reference import LossyCacheAttention, stored_view
from offbatch.engine.reference import ReferenceModel
from offbatch.offload.kv import kv_format
from offbatch.tools.convert import eval_windows
from offbatch.tools.quality import score, agreement_of, delta_pct

model_dir = Path(sys.argv[1]); kvname = sys.argv[2] if len(sys.argv) > 2 else "int4"
text = (Path(__file__).resolve().parents[1] / '.venv/share/offbatch/botchan.txt').read_text()
ids, wins, w = eval_windows(model_dir, text, int(sys.argv[3]) if len(sys.argv) > 3 else 1, 2048)
calib = ids[-4096:-2048]  # the end of the book: apart from the windows scored

class Rec(LossyCacheAttention):
    def __init__(self, spec):
        super().__init__(spec, "dense"); self.kmax = {}
    def attend(self, layer, q, k, v, step):
        m = k.detach().abs().amax(0).float()  # [kvh, d]
        self.kmax[layer] = torch.maximum(self.kmax[layer], m) if layer in self.kmax else m
        return super().attend(layer, q, k, v, step)

class Balanced(LossyCacheAttention):
    def __init__(self, spec, kv, scales):
        super().__init__(spec, kv); self.scales = scales
    def attend(self, layer, q, k, v, step):
        caches, lens = step
        fmt = kv_format(self.kv, k.dtype)
        s = self.scales[layer].to(k.dtype)
        k, v = stored_view(fmt, k / s) * s, stored_view(fmt, v)
        from offbatch.models import layers as L
        outs, start = [], 0
        for cache, n in zip(caches, lens):
            kk, vv = cache.extend(layer, k[start:start+n], v[start:start+n])
            outs.append(L.causal_attention(q[start:start+n], kk, vv, cache.length, self.spec.sliding_window)); start += n
        return torch.cat(outs)

base = ReferenceModel.load(model_dir, dtype="float32")
rec = ReferenceModel(base.spec, base.modules, base.device, base.dtype, attention=Rec(base.spec))
rec.forward([rec.new_cache(len(calib))], [list(calib)])
kmax = rec.attention.kmax
d = base.spec.head_dim
def pair(m):  # RoPE rotates channel c with c + d/2: one scale for both
    h = d // 2; p = torch.maximum(m[..., :h], m[..., h:]); return torch.cat([p, p], -1)
t0=time.time(); s0 = score(base, wins); print('dense', s0.perplexity, time.time()-t0, flush=True)
def run(label, att):
    ref = ReferenceModel(base.spec, base.modules, base.device, base.dtype, attention=att)
    s = score(ref, wins); print(label, round(s.perplexity,3), f"{delta_pct(s0, s):+.1f}%", round(agreement_of(s0, s),3), flush=True)

spec = base.spec
def datafree(layer):
    w = base.modules[(layer, 'attn')]
    W = w['k.weight'].float(); g = w['attn_norm.weight'].float() if 'attn_norm.weight' in w else torch.ones(W.shape[1])
    e = (W.pow(2) @ g.pow(2))
    if 'k.bias' in w: e = e + w['k.bias'].float().pow(2)
    return e.sqrt().view(spec.num_kv_heads, d)
def norm(s): return s / s.log().mean(-1, keepdim=True).exp()
cal = {l: norm(pair(m).clamp_min(1e-6)) for l, m in kmax.items()}
free = {l: norm(pair(datafree(l)).clamp_min(1e-6)) for l in kmax}
for kv in sys.argv[4].split(','):
    run(kv, LossyCacheAttention(spec, kv))
    run(f"{kv} balanced (calibrated)", Balanced(spec, kv, cal))
    run(f"{kv} balanced (from weights)", Balanced(spec, kv, free))
