#!/usr/bin/env bash
# A/B of the engine against a baseline checkout under one pinned plan, alternating runs in one call.
# Usage (GPU machine, repo root, the baseline checked out in BASE): BASE=.base bash scripts/ab_bench.sh PLAN.json ROUNDS BENCH-ARGS...
set -u
plan=$1; rounds=$2; shift 2
OUT=${OUT:-/tmp/out}
for r in $(seq 1 "$rounds"); do
  for side in base new; do
    dir=$PWD; [ "$side" = base ] && dir=$BASE
    (cd "$dir" && PYTHONPATH=$PWD timeout 200 python -m offbatch.cli.main bench "$@" --plan "$plan" \
       --out "$OUT/ab-$side-$r.json" > "/tmp/ab-$side-$r.log" 2>&1) || { echo "$side round $r failed"; tail -5 "/tmp/ab-$side-$r.log"; }
    python - "$OUT/ab-$side-$r.json" "$side" "$r" <<'PY'
import json, sys
try:
    d = json.load(open(sys.argv[1]))
except Exception as e:
    print(sys.argv[2], sys.argv[3], "no report", e); raise SystemExit
m = d.get("measured", d)
print(f"{sys.argv[2]:>4} round {sys.argv[3]}: e2e {m.get('e2e_tok_s', 0):8.1f} tok/s  decode {m.get('decode_tok_s', 0):8.1f}  "
      f"prefill {m.get('prefill_tok_s', 0):9.1f}  peak reserved {m.get('peak_gpu_reserved_bytes', 0) / 2**30:.2f} GiB")
PY
  done
done
