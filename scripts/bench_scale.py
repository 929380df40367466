"""Issue 18 on the GPU machine: one `offbatch run` job plain (one GPU, no Ray), with `--workers 1` and with
`--workers N` (a local Ray cluster, one engine per GPU), and with `--split-stream N` (one engine whose N GPUs
split the weight stream; no Ray), each timed end to end as the user sees it (the process from start to
exit), in one call, on a synthetic model folder written here.

  1. `offbatch synth PRESET DIR --layers L` writes the folder (a run's workers each load it, as they would
     a real one; the real model cannot travel to the GPU machine);
  2. a JSONL of N prompts of exactly PROMPT_LEN random token ids, max_tokens GEN_LEN, ignore_eos (every
     request generates all its tokens, so the runs do the same work);
  3. `offbatch plan` for the job (probes the machine once, so no timed run pays for the probe) with
     `--workers N`: each worker's plan and the job's predicted time;
  4. the runs, in order plain, --workers 1, --workers N: wall time of the process, the run's own summary
     (generation wall time without the load, gen tok/s), and the workers' plans;
  5. the outputs against the plain run's, record by record (greedy: id, text, token counts, finish reason),
     and the ratios: plain / workers N end to end (target >= 1.8 for N = 2), workers 1 / plain (target
     within 1.05).

JSON goes to --out after every run (a timeout loses nothing measured). On the GPU machine (ray is not on its
image; `scripts/bench_scale.py wheels DIR` here makes a carriable copy):

  python scripts/bench_scale.py --out $OUT/scale.json
  python scripts/bench_scale.py --workers '' --split 2 --out $OUT/split.json         # split stream, no Ray
  python scripts/bench_scale.py --synth mixtral --layers 2 --prompts 16 --prompt-len 8 --gen-len 4 \\
      --gpu-memory '' --run-args="--engine streaming --device cpu --gpu-memory 2MiB"      # the CPU path
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def offbatch(*args) -> list[str]:
    return [sys.executable, "-m", "offbatch.cli.main", *map(str, args)]


def env() -> dict:
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_folder(folder: Path, synth: str, layers: int | None) -> float:
    t0 = time.monotonic()
    if not (folder / "config.json").exists():
        cmd = offbatch("synth", synth, folder, "--quiet", *(["--layers", layers] if layers else []))
        subprocess.run(cmd, check=True, env=env())
    return time.monotonic() - t0


def write_prompts(path: Path, folder: Path, n: int, prompt_len: int, gen_len: int) -> None:
    from offbatch.engine.benchmark import random_prompts

    vocab = json.loads((folder / "config.json").read_text())["vocab_size"]
    with open(path, "w") as f:
        for i, ids in enumerate(random_prompts(n, prompt_len, vocab, seed=18)):
            f.write(json.dumps({"id": f"r{i}", "prompt": ids, "max_tokens": gen_len, "ignore_eos": True}) + "\n")


def plan_report(folder: Path, args, extra: list) -> dict | None:
    """`offbatch plan --json` for the job with these flags (None, said, when it fails)."""
    cmd = offbatch("plan", folder, "--num-prompts", args.prompts, "--prompt-len", args.prompt_len, "--gen-len",
                   args.gen_len, *extra, "--json", *cap_args(args), *plan_args(args))
    r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=args.timeout)
    if r.returncode != 0:
        print(f"plan failed ({r.returncode}): {r.stderr.strip()[-500:]}", flush=True)
        return None
    return json.loads(r.stdout)


def plan_split(folder: Path, args, n: int) -> dict | None:
    """The planner's view of the job with the weight stream split over n GPUs, against one GPU."""
    report = plan_report(folder, args, ["--split-stream", n])
    return report and {**report["split_stream"], "rank_plan": report["plan"], "hardware": report["hardware"]}


def plan(folder: Path, args) -> dict | None:
    """The planner's view of the job on one and on N workers (and the machine's probe, cached for the runs)."""
    report = plan_report(folder, args, ["--workers", max(args.workers)]) if args.workers else None
    if report is None:
        return None
    c = report["cluster"]
    return {"workers": c["workers"], "job_s": c["job_s"], "one_worker_s": c["one_worker"]["total_s"],
            "speedup": c["speedup"], "speedup_generation": c["speedup_run"],
            "per_worker": c["per_worker"], "one_worker": c["one_worker"]}


def cap_args(args) -> list[str]:
    return ["--gpu-memory", args.gpu_memory] if args.gpu_memory else []


def plan_args(args) -> list[str]:
    """The run arguments `plan` also takes (device, weights, kv)."""
    out, words = [], args.run_args.split()
    for i, w in enumerate(words):
        if w in ("--device", "--weights", "--kv") and i + 1 < len(words):
            out += [w, words[i + 1]]
    return out


def run(name: str, folder: Path, prompts: Path, out: Path, extra: list[str], args) -> dict:
    for p in (out, Path(str(out) + ".offbatch.json")):
        p.unlink(missing_ok=True)
    cmd = offbatch("run", folder, prompts, "-o", out, "--log-format", "json", "--log-interval", 30,
                   *cap_args(args), *args.run_args.split(), *extra)
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, env=env(), capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        return {"name": name, "error": f"timed out after {args.timeout} s"}
    wall = time.monotonic() - t0
    events = [json.loads(line) for line in r.stderr.splitlines() if line.startswith("{")]
    summary = next((e for e in reversed(events) if e.get("event") == "summary"), None)
    if r.returncode != 0 or summary is None:
        return {"name": name, "error": f"exit {r.returncode}: {r.stderr.strip()[-800:]}"}
    plans = [e["message"] for e in events if e.get("message", "").startswith(("plan ", "worker ", "model loaded"))]
    startup = [e["startup"] for e in events if "startup" in e]
    return {"name": name, "process_s": wall, "load_s": summary["load_s"], "generation_s": summary["wall_s"],
            "gen_tok_s": summary["gen_tok_s"], "e2e_gen_tok_s": summary["completion_tokens"] / wall,
            "ok": summary["ok"], "failed": summary["failed"], "device": summary["device"],
            "peak_gpu_bytes": summary["peak_gpu_bytes"], "plans": plans, "startup": startup}


def records(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        out[r["id"]] = (r.get("text"), r.get("completion_tokens"), r.get("finish_reason"), r.get("error"))
    return out


def agreement(a: dict, b: dict) -> dict:
    same = sum(1 for k in a if b.get(k) == a[k])
    return {"records": len(a), "identical": same, "missing": len(set(a) - set(b)), "extra": len(set(b) - set(a))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", default="mixtral-8x7b", help="a preset (a real shape) or a family (tiny)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--gpu-memory", default="8GiB", help="per GPU ('' for none)")
    ap.add_argument("--workers", default="1,2", help="the --workers runs after the plain one, comma-separated")
    ap.add_argument("--split", default="", help="the --split-stream runs after those, comma-separated")
    ap.add_argument("--no-plain", action="store_true", help="skip the plain run (then no ratios against it)")
    ap.add_argument("--run-args", default="", help="more `offbatch run` arguments, for every run")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offbatch-bench-scale"))
    ap.add_argument("--timeout", type=int, default=170, help="seconds for each run (the three runs and the rest fit a 10-minute call)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.workers = [int(w) for w in args.workers.split(",") if w]
    args.split = [int(w) for w in args.split.split(",") if w]

    args.dir.mkdir(parents=True, exist_ok=True)
    folder, prompts = args.dir / f"model-{args.synth}-{args.layers}", args.dir / "prompts.jsonl"
    report = {"synth": args.synth, "layers": args.layers, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "gen_len": args.gen_len, "gpu_memory": args.gpu_memory, "run_args": args.run_args, "runs": []}

    def save() -> None:
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")

    report["synth_s"] = write_folder(folder, args.synth, args.layers)
    write_prompts(prompts, folder, args.prompts, args.prompt_len, args.gen_len)
    print(f"folder {folder} written in {report['synth_s']:.0f}s; {args.prompts} prompts x {args.prompt_len} + "
          f"{args.gen_len}", flush=True)
    report["predicted"] = plan(folder, args)
    if report["predicted"]:
        p = report["predicted"]
        print(f"predicted: {p['workers']} workers {p['job_s']:.1f}s, one {p['one_worker_s']:.1f}s: {p['speedup']:.2f}x "
              f"(generation alone {p['speedup_generation']:.2f}x)", flush=True)
    report["predicted_split"] = {n: plan_split(folder, args, n) for n in args.split}
    for n, p in report["predicted_split"].items():
        if p:
            print(f"predicted: --split-stream {n} {p['job_e2e_tok_s']:,.0f} gen tok/s against {p['one_gpu_e2e_tok_s']:,.0f} "
                  f"on one GPU: {p['speedup']:.2f}x (generation, load not counted)", flush=True)
    save()

    outputs = {}
    runs = ([] if args.no_plain else [("plain", [])]) + [(f"workers{w}", ["--workers", w]) for w in args.workers]
    runs += [(f"split{n}", ["--split-stream", n]) for n in args.split]
    for name, extra in runs:
        out = args.dir / f"out-{name}.jsonl"
        result = run(name, folder, prompts, out, [str(x) for x in extra], args)
        report["runs"].append(result)
        if "error" in result:
            print(f"{name}: {result['error']}", flush=True)
        else:
            outputs[name] = records(out)
            print(f"{name}: {result['process_s']:.1f}s end to end (load {result['load_s']:.1f}s, generation "
                  f"{result['generation_s']:.1f}s, {result['gen_tok_s']:,.0f} gen tok/s) on {result['device']}",
                  flush=True)
            for line in result["plans"]:
                print("   " + line.splitlines()[0][:240], flush=True)
        save()

    base = "plain" if "plain" in outputs else next(iter(outputs), None)
    times = {r["name"]: r for r in report["runs"] if "error" not in r}
    report["agreement"] = {name: agreement(outputs[base], recs) for name, recs in outputs.items() if name != base}
    ratios = {}
    for name, r in times.items():
        if name != base and base in times:
            ratios[f"{base}/{name} end to end"] = times[base]["process_s"] / r["process_s"]
            ratios[f"{base}/{name} generation"] = times[base]["generation_s"] / r["generation_s"]
    report["ratios"] = ratios
    save()
    for name, a in report["agreement"].items():
        print(f"{name} against {base}: {a['identical']}/{a['records']} records identical"
              + (f", {a['missing']} missing, {a['extra']} extra" if a["missing"] or a["extra"] else ""), flush=True)
    for k, v in ratios.items():
        print(f"{k}: {v:.3f}", flush=True)


def wheels(target: Path) -> None:
    """Here (where pip reaches the registry): ray[data]==2.60.0 for the GPU machine's Python 3.12, which has
    pandas, pyarrow and the rest but not ray or jsonschema. Ray's wheel (79 MB) is over a call's 64 MiB: its
    Java jars and the libraries offbatch does not use (RLlib, Tune, Serve, Train, LLM, the dashboard's web
    client) are left out of a copy. On that machine:
      pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=$PWD:/tmp/site"""
    import base64
    import hashlib
    import zipfile

    target.mkdir(parents=True, exist_ok=True)
    platform = ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux_2_17_x86_64",
                "--platform", "manylinux2014_x86_64"]
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                    "--python-version", "3.12", "--implementation", "cp", *platform, "-d", str(target),
                    "ray==2.60.0", "jsonschema", "jsonschema-specifications", "referencing", "rpds-py"], check=True)
    [full] = target.glob("ray-2.60.0-*.whl")
    dropped = ("ray/jars/", "ray/rllib/", "ray/tune/", "ray/serve/", "ray/train/", "ray/llm/",
               "ray/dashboard/client/")
    slim = target / (full.name + ".slim")
    with zipfile.ZipFile(full) as src, zipfile.ZipFile(slim, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as dst:
        record_name = next(n for n in src.namelist() if n.endswith(".dist-info/RECORD"))
        kept = []
        for item in src.infolist():
            if item.filename.startswith(dropped) or item.filename == record_name:
                continue
            data = src.read(item)
            dst.writestr(item, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            kept.append(f"{item.filename},sha256={digest},{len(data)}")
        dst.writestr(record_name, "\n".join(kept + [f"{record_name},,"]) + "\n")
    slim.replace(full)
    total = sum(p.stat().st_size for p in target.glob("*.whl"))
    print(f"{target}: {total / 2**20:.1f} MiB of wheels", flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "wheels":
        wheels(Path(sys.argv[2]))
    else:
        main()
