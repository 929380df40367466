"""Side-by-side table of `offbatch bench --out` reports of one shape in several weight formats (the first
report is the baseline the ratios are against): plan, rates, bytes per decode step, floor, prediction.

Usage: python scripts/format_table.py REPORT.json...  (one per format, baseline first)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def row(path: Path) -> dict:
    r = json.loads(path.read_text())
    plan = r["plan"]
    return {
        "report": path.stem,
        "weights": plan.get("weights", "dense"),
        "plan": f"{plan.get('attention')} wave {plan.get('wave_size')}",
        "model_bytes": r["weights_bytes"],
        "decode_bytes_per_step": r["decode_bytes_per_step"],
        "decode_tok_s": r["decode_tok_s"],
        "prefill_tok_s": r["prefill_tok_s"],
        "e2e_tok_s": r["e2e_tok_s"],
        "floor_kv": r["decode_achieved_over_floor_with_kv_copies"],
        "predicted_decode": r.get("predicted", {}).get("decode_tok_s"),
        "decode_error": r.get("prediction_error", {}).get("decode_tok_s"),
        "e2e_error": r.get("prediction_error", {}).get("e2e_tok_s"),
        "peak_reserved_gib": r["peak_gpu_reserved_bytes"] / 2**30,
        "cap_gib": (r["gpu_memory_cap"] or 0) / 2**30,
    }


def main(paths: list[str]) -> None:
    rows = [row(Path(p)) for p in paths if Path(p).exists()]
    if not rows:
        print("no reports")
        return
    base = rows[0]
    print(f"{'report':<22} {'weights':<10} {'plan':<22} {'GB/step':>8} {'bytes/base':>10} {'decode':>9} {'x base':>7} "
          f"{'e2e':>8} {'x base':>7} {'ach/floor':>9} {'pred err':>9} {'peak GiB':>9}")
    for r in rows:
        err = f"{r['decode_error']:+.0%}" if r["decode_error"] is not None else "-"
        print(f"{r['report']:<22} {r['weights']:<10} {r['plan']:<22} {r['decode_bytes_per_step'] / 1e9:>8.2f} "
              f"{r['decode_bytes_per_step'] / max(base['decode_bytes_per_step'], 1):>10.3f} {r['decode_tok_s']:>9.0f} "
              f"{r['decode_tok_s'] / base['decode_tok_s']:>7.2f} {r['e2e_tok_s']:>8.0f} {r['e2e_tok_s'] / base['e2e_tok_s']:>7.2f} "
              f"{r['floor_kv']:>9.2f} {err:>9} {r['peak_reserved_gib']:>5.2f}/{r['cap_gib']:.0f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
