"""One line of a KV-format comparison from a `bench --json` report: plan, bytes per step, rates, floor."""

import json
import sys

try:
    r = json.load(open(sys.argv[1]))
except (OSError, ValueError) as e:  # the run failed: its .err says why
    print(f"{sys.argv[2]:22s} no report ({e})")
    sys.exit(1)
p = r["plan"]
pred = p.get("predicted", {})
print(f"{sys.argv[2]:22s} {p['attention']:11s} kv {p['kv_format']:5s} {p.get('hgca') or '':28s} wave {p['wave_size']:5d} "
      f"GB/step {r['decode_bytes_per_step'] / 1e9:6.2f} + KV copied {r['decode_kv_copied_bytes_per_step'] / 1e9:6.2f} "
      f"decode {r['decode_tok_s']:8.0f} e2e {r['e2e_tok_s']:8.0f} prefill {r['prefill_tok_s']:8.0f} "
      f"ach/floor(kv) {r['decode_achieved_over_floor_with_kv_copies']:.2f} pred decode {pred.get('decode_tok_s', 0):8.0f} "
      f"peak {r['peak_gpu_reserved_bytes'] / 2**30:.2f} GiB mb {p['attn_micro_batch']}"
      + (f" step {st['median'] * 1e3:.0f}/{st['max'] * 1e3:.0f} ms (+{st['beyond_twice_median']:.1f} s)"
         if (st := r.get("decode_step_s")) else ""), flush=True)
