#!/usr/bin/env bash
# A/B of this checkout against a baseline checkout (BASE, e.g. a `git worktree` of the commit before a
# change) on one shape: each side plans the job on this machine (one probe, cached, shared by both),
# the two plans are compared, then each side benches under its own plan, alternating, ROUNDS times.
# With PLAN=FILE both sides bench under that one plan file instead (it must be in a format both read).
# Usage (GPU machine, repo root): BASE=.base bash scripts/ab_commits.sh NAME ROUNDS BENCH-SHAPE-ARGS...
# e.g.  BASE=.base bash scripts/ab_commits.sh mixtral 2 --synth mixtral-8x7b --layers 8 --gpu-memory 8GiB \
#         --prompts 1024 --prompt-len 256 --gen-len 64
set -u
name=$1; rounds=$2; shift 2
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
plan_args=$(echo "$@" | sed 's/--prompts/--num-prompts/')
for side in base new; do
  dir=$PWD; [ "$side" = base ] && dir=$BASE
  (cd "$dir" && PYTHONPATH=$PWD timeout 200 python -m offbatch.cli.main plan $plan_args --json > "/tmp/plan-$name-$side.json") \
    || echo "$side: plan failed"
done
python - "/tmp/plan-$name-base.json" "/tmp/plan-$name-new.json" <<'PY'
import json, sys
def knobs(path):
    d = json.load(open(path)); p = d.get("plan", d)
    att = p.get("attention") or {("gpu", "gpu"): "device-kv", ("host", "gpu"): "host-kv-gpu",
                                 ("host", "cpu"): "host-kv-cpu"}[(p["kv_placement"], p["decode_attention"])]
    return {"attention": att, **{k: p[k] for k in ("wave_size", "prefill_tokens", "attn_micro_batch", "ffn_micro_tokens",
            "slots", "resident", "disk", "max_len")}}, p["predicted"]["e2e_tok_s"]
(a, ea), (b, eb) = knobs(sys.argv[1]), knobs(sys.argv[2])
print("plans", "EQUAL" if a == b else "DIFFER", {k: (a[k], b[k]) for k in a if k != "resident"},
      f"resident {len(a['resident'])}/{len(b['resident'])}", f"predicted e2e {ea:.1f} / {eb:.1f}")
PY
for r in $(seq 1 "$rounds"); do
  for side in base new; do
    dir=$PWD; [ "$side" = base ] && dir=$BASE
    (cd "$dir" && PYTHONPATH=$PWD timeout 240 python -m offbatch.cli.main bench "$@" --plan "${PLAN:-/tmp/plan-$name-$side.json}" \
       --out "$OUT/ab-$name-$side-$r.json" > "/tmp/ab-$name-$side-$r.log" 2>&1) || { echo "$side round $r failed"; tail -5 "/tmp/ab-$name-$side-$r.log"; }
    python - "$OUT/ab-$name-$side-$r.json" "$name $side" "$r" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], sys.argv[3], "no report", e); raise SystemExit
m = d.get("measured", d)
print(f"{sys.argv[2]:>12} round {sys.argv[3]}: e2e {m.get('e2e_tok_s', 0):8.1f} tok/s  decode {m.get('decode_tok_s', 0):8.1f}  "
      f"prefill {m.get('prefill_tok_s', 0):9.1f}  peak reserved {m.get('peak_gpu_reserved_bytes', 0) / 2**30:.2f} GiB")
PY
  done
done
