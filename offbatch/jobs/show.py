"""`python -m offbatch.jobs.show RESULTS.jsonl`: print each result's id and text, whatever its shape
(`make demo` uses it to show the answers)."""

from __future__ import annotations

import json
import sys

from offbatch.jobs.results import result_text


def show(path: str, out=None) -> int:
    out = out or sys.stdout
    failed = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            rec = json.loads(line)
            rid = rec.get("custom_id", rec.get("id"))
            if rec.get("error"):
                failed += 1
                print(f"\n### {rid}  (error, line {rec['error'].get('line')})\n{rec['error'].get('message')}", file=out)
            else:
                print(f"\n### {rid}\n{(result_text(rec) or '').strip()}", file=out)
    return 1 if failed else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m offbatch.jobs.show RESULTS.jsonl")
    sys.exit(show(sys.argv[1]))
