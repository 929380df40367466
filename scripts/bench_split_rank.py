"""Issue 18 on ONE GPU: what one rank of `run --split-stream N` does, measured alone, against the plain run of
the whole job in the same call.

The rank's partners are replaced by zeros: their chunks of every module are zero-filled on the device (a
memset on the gather stream) instead of gathered over NVLink, and the lockstep's control calls answer for
this rank alone. Everything else is the rank's own: it plans as `run --split-stream N` plans (its share of
the prompts and of host memory, 1/N of the weights over its link), holds and reads only its share of each
module from the folder, copies that share over PCIe, and decodes its share of the prompts (dealt round
robin) with its own wave. What is missing is the gather and the wait for the partners: the rank's process
time is a bound on the split run's, not the two-GPU measurement (scripts/bench_scale.py --split on the
2-GPU machine). The tokens are not the model's (half of every weight is zero); the work is.

  python scripts/bench_split_rank.py --out $OUT/split-rank.json        # Mixtral 8 layers, 2048 x 256 + 64, 8 GiB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_scale import env, offbatch, run, write_folder, write_prompts  # noqa: E402


def lone_rank_class():
    from offbatch.offload.shard_group import ShardGroup

    class LoneRank(ShardGroup):
        """Rank `rank` of `world` with no partner: the others' chunks are zeros, and it decides alone."""

        def gather(self, buf, n):
            c = self.chunk(n)
            for r in range(self.world):
                if r != self.rank:
                    buf[r * c : (r + 1) * c].zero_()
            return None

        def any_work(self, mine: bool) -> bool:
            return mine

    return LoneRank


def rank_main(folder: str, prompts: str, world: int, gpu_memory: str | None, out: str, device: str) -> None:
    """One rank alone, in its own process (timed from outside as a process, like a run)."""
    t_start = time.monotonic()
    from offbatch.cli.options import byte_size
    from offbatch.engine.api import GenRequest, SamplingParams
    from offbatch.engine.build import engine_for_folder
    from offbatch.engine.split import host_share, rank_workload
    from offbatch.planner.workload import Workload
    from offbatch.models.tokenizer import load_tokenizer

    rows = [json.loads(line) for line in open(prompts)]
    cap = byte_size(gpu_memory, "--gpu-memory") if gpu_memory else None
    lens, gens = [len(r["prompt"]) for r in rows], [r["max_tokens"] for r in rows]
    workload = rank_workload(Workload.from_lengths(lens, gens), world)
    plan = engine_for_folder(folder, device=device, gpu_memory=cap, cpu_memory=host_share(None, world),
                             workload=workload, num_requests=workload.num_requests, max_len=workload.max_len,
                             split_stream=world, plan_only=True)
    tok = load_tokenizer(folder)
    t0 = time.monotonic()
    eng = engine_for_folder(folder, device=device, gpu_memory=cap, plan=plan, group=lone_rank_class()(0, world, device),
                            eos_token_ids=tok.eos_token_ids)
    load_s = time.monotonic() - t0
    reqs = [GenRequest(i, r["prompt"], SamplingParams(max_tokens=r["max_tokens"], ignore_eos=True))
            for i, r in enumerate(rows) if i % world == 0]
    t1 = time.monotonic()
    outs = list(eng.generate(reqs))
    gen_s = time.monotonic() - t1
    tokens = sum(len(o.token_ids) for o in outs)
    steps = eng.pf.stats.per_step_bytes
    decode = [b for b, k in zip(steps, eng.step_kinds) if k == "decode"]
    report = {"plan": plan.describe(), "summary": plan.summary(), "requests": len(reqs), "tokens": tokens,
              "errors": sum(o.finish_reason == "error" for o in outs), "load_s": load_s, "generation_s": gen_s,
              "gen_tok_s": tokens / gen_s, "startup": dict(eng.startup), "host_weight_bytes": eng.store.host_bytes(),
              "model_bytes": eng.store.total_bytes, "decode_steps": len(decode),
              "decode_link_bytes_mean": sum(decode) / max(1, len(decode)),
              "decode_wall_s": eng.times.decode_wall_s, "decode_tokens": eng.times.decode_tokens,
              "peak_gpu_bytes": eng.stats.peak_gpu_reserved_bytes, "in_process_s": time.monotonic() - t_start}
    eng.close()
    Path(out).write_text(json.dumps(report, indent=1) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synth", default="mixtral-8x7b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=2048)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--gpu-memory", default="8GiB")
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--no-plain", action="store_true")
    ap.add_argument("--dir", type=Path, default=Path("/tmp/offbatch-bench-scale"))
    ap.add_argument("--timeout", type=int, default=200)
    ap.add_argument("--run-args", default="")
    ap.add_argument("--device", default="cuda", help="cpu: a smoke test of this script (then --run-args \"--engine streaming --device cpu\")")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    folder, prompts = args.dir / f"model-{args.synth}-{args.layers}", args.dir / "prompts.jsonl"
    report = {"synth": args.synth, "layers": args.layers, "prompts": args.prompts, "prompt_len": args.prompt_len,
              "gen_len": args.gen_len, "gpu_memory": args.gpu_memory, "world": args.world}

    def save():
        if args.out:
            args.out.write_text(json.dumps(report, indent=1) + "\n")

    report["synth_s"] = write_folder(folder, args.synth, args.layers)
    write_prompts(prompts, folder, args.prompts, args.prompt_len, args.gen_len)
    print(f"folder written in {report['synth_s']:.0f}s; {args.prompts} prompts x {args.prompt_len} + {args.gen_len}",
          flush=True)
    plan = subprocess.run(offbatch("plan", folder, "--num-prompts", args.prompts, "--prompt-len", args.prompt_len,
                                   "--gen-len", args.gen_len, "--gpu-memory", args.gpu_memory, "--split-stream",
                                   args.world, "--device", args.device, "--json"), env=env(), capture_output=True, text=True, timeout=args.timeout)
    if plan.returncode == 0:
        report["predicted"] = json.loads(plan.stdout)["split_stream"]
        p = report["predicted"]
        print(f"predicted: --split-stream {args.world} {p['job_e2e_tok_s']:,.0f} gen tok/s against "
              f"{p['one_gpu_e2e_tok_s']:,.0f}: {p['speedup']:.2f}x (load not counted)", flush=True)
    save()
    if not args.no_plain:
        plain = run("plain", folder, prompts, args.dir / "out-plain.jsonl", [], argparse.Namespace(
            gpu_memory=args.gpu_memory, run_args=args.run_args, timeout=args.timeout))
        report["plain"] = plain
        print(f"plain: {plain.get('process_s', 0):.1f}s end to end (load {plain.get('load_s', 0):.1f}s, generation "
              f"{plain.get('generation_s', 0):.1f}s, {plain.get('gen_tok_s', 0):,.0f} gen tok/s)"
              if "error" not in plain else f"plain: {plain['error']}", flush=True)
        save()
    out = args.dir / "rank.json"
    out.unlink(missing_ok=True)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, __file__, "rank", str(folder), str(prompts), str(args.world), args.gpu_memory,
                        str(out), args.device], env=env(), capture_output=True, text=True, timeout=args.timeout)
    wall = time.monotonic() - t0
    if r.returncode != 0 or not out.exists():
        report["rank"] = {"error": f"exit {r.returncode}: {r.stderr.strip()[-1500:]}"}
        print(report["rank"]["error"], flush=True)
        save()
        return
    rank = json.loads(out.read_text())
    rank["process_s"] = wall
    report["rank"] = rank
    print(f"rank 0 of {args.world} alone: {wall:.1f}s as a process (load {rank['load_s']:.1f}s, generation "
          f"{rank['generation_s']:.1f}s, {rank['gen_tok_s']:,.0f} gen tok/s for its {rank['requests']} prompts; "
          f"{rank['decode_link_bytes_mean'] / 1e9:.2f} GB of weights over its link a decode step; host weights "
          f"{rank['host_weight_bytes'] / 2**30:.2f} of {rank['model_bytes'] / 2**30:.2f} GiB; {rank['errors']} error "
          f"records)\n   {rank['summary'].splitlines()[0][:300]}", flush=True)
    if "plain" in report and "error" not in report["plain"]:
        p = report["plain"]
        report["bound"] = {"end_to_end": p["process_s"] / wall, "generation": p["generation_s"] / rank["generation_s"]}
        print(f"plain / one rank alone: {report['bound']['end_to_end']:.2f}x end to end, "
              f"{report['bound']['generation']:.2f}x generation (a bound on --split-stream {args.world}: no gather, "
              "no partner to wait for)", flush=True)
    save()


if __name__ == "__main__":
    if len(sys.argv) == 8 and sys.argv[1] == "rank":
        rank_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] or None, sys.argv[6], sys.argv[7])
    else:
        main()
