"""Time the grouped-GEMM kernels on CUDA against the hardware floor and a torch loop of matmuls.

Shapes are Mixtral-like by default: hidden K=4096, expert width N=14336, 8 experts, T tokens routed
top-2 uniformly at random (so 2T rows). Each op is checked against its torch twin before it is timed.

  floor  = max(bytes / HBM bandwidth, FLOPs / GEMM rate), both measured here: a large device copy
           and a large torch.matmul in the benchmark dtype. Bytes = x + the used experts' weights + y.
  loop   = one torch.matmul per non-empty group into slices of a preallocated output, with the group
           offsets already on the host (the loop is not charged for reading them back).

Ops: gemm (x[2T,4096] @ w_up-like [8,14336,4096]), swiglu (fused gate+up, two such stacks), down
(h[2T,14336] @ [8,4096,14336]). Usage: python scripts/bench_kernels.py [--tokens 16 256 ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def median_ms(fn) -> float:
    import triton.testing

    ms = triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=[0.5])
    return float(ms[0] if isinstance(ms, (list, tuple)) else ms)


def measure_bandwidth(device) -> float:
    """Device-to-device copy rate in bytes/s, counting bytes read plus bytes written."""
    free, _ = torch.cuda.mem_get_info(device)
    n_bytes = min(2 << 30, free // 8)  # well past any L2; leave room for the benchmark itself
    src = torch.empty(n_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    del src, dst
    return 2 * n_bytes / (ms * 1e-3)


def measure_gemm_rate(device, dtype) -> float:
    """FLOP/s of a large square torch.matmul on random data (zeros would flatter the rate)."""
    n = 8192
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    ms = median_ms(lambda: torch.matmul(a, b))
    return 2 * n**3 / (ms * 1e-3)


def route_uniform(tokens: int, experts: int, top_k: int, gen: torch.Generator) -> list[int]:
    """Rows per expert when every token picks top_k distinct experts uniformly at random."""
    choice = torch.rand(tokens, experts, generator=gen).topk(top_k, dim=1).indices
    return torch.bincount(choice.flatten(), minlength=experts).tolist()


def make_problem(op, tokens, args, dtype, device, gen):
    sizes = route_uniform(tokens, args.experts, args.top_k, gen)
    rows = sum(sizes)
    K, N = (args.ffn, args.hidden) if op == "down" else (args.hidden, args.ffn)
    offsets = [0]
    for s in sizes:
        offsets.append(offsets[-1] + s)
    x = torch.randn(rows, K, generator=gen).to(device, dtype)
    n_weights = 2 if op == "swiglu" else 1
    # Built on the device one stack at a time: a CPU randn of 2 GB stacks would dominate the run.
    dev_gen = torch.Generator(device=device).manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    ws = [torch.randn(args.experts, N, K, generator=dev_gen, device=device, dtype=dtype) / K**0.5
          for _ in range(n_weights)]  # fmt: skip
    return dict(
        sizes=sizes, offsets=offsets, rows=rows, K=K, N=N, x=x, ws=ws,
        group_offsets=torch.tensor(offsets, dtype=torch.int32, device=device),
        group_slots=torch.arange(args.experts, dtype=torch.int32, device=device),
        out=torch.empty(rows, N, device=device, dtype=dtype),
    )  # fmt: skip


def triton_call(op, p):
    from offbatch.kernels import grouped_gemm_triton as tk

    if op == "swiglu":
        return lambda: tk.grouped_swiglu(p["x"], p["ws"][0], p["ws"][1], p["group_offsets"], p["group_slots"], out=p["out"])
    return lambda: tk.grouped_gemm(p["x"], p["ws"][0], p["group_offsets"], p["group_slots"], out=p["out"])


def twin_call(op, p):
    from offbatch.kernels import reference

    if op == "swiglu":
        return reference.grouped_swiglu(p["x"], p["ws"][0], p["ws"][1], p["group_offsets"], p["group_slots"])
    return reference.grouped_gemm(p["x"], p["ws"][0], p["group_offsets"], p["group_slots"])


def loop_call(op, p):
    x, ws, out, offs = p["x"], p["ws"], p["out"], p["offsets"]
    groups = [(g, offs[g], offs[g + 1]) for g in range(len(offs) - 1) if offs[g + 1] > offs[g]]

    def run():
        for g, s, e in groups:
            if op == "swiglu":
                out[s:e] = F.silu(x[s:e] @ ws[0][g].T) * (x[s:e] @ ws[1][g].T)
            else:
                torch.matmul(x[s:e], ws[0][g].T, out=out[s:e])

    return run


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[16, 256, 1024, 4096])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--ffn", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--ops", nargs="+", default=["gemm", "swiglu", "down"], choices=["gemm", "swiglu", "down"])
    ap.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("bench_kernels: needs a CUDA GPU (the Triton kernels are only timed there)", file=sys.stderr)
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)

    bandwidth = measure_bandwidth(device)
    rate = measure_gemm_rate(device, dtype)
    print(f"device: {torch.cuda.get_device_name(device)} | torch {torch.__version__} | "
          f"triton {__import__('triton').__version__} | {args.dtype}")  # fmt: skip
    print(f"measured: copy {bandwidth / 1e9:.0f} GB/s (read+write), matmul {rate / 1e12:.0f} TFLOP/s "
          f"(8192^3 {args.dtype})")  # fmt: skip
    print(f"shape: hidden {args.hidden}, expert width {args.ffn}, {args.experts} experts, top-{args.top_k}, uniform routing")
    header = f"{'op':<7}{'tokens':>7}{'rows':>7}{'K':>7}{'N':>7}{'ms':>9}{'TFLOP/s':>9}{'GB/s':>8}{'floor ms':>10}{'of floor':>9}{'loop ms':>9}{'vs loop':>8}{'rel err':>9}"
    print(header)
    print("-" * len(header))
    failed = False
    for op in args.ops:
        for tokens in args.tokens:
            p = make_problem(op, tokens, args, dtype, device, gen)
            fn = triton_call(op, p)
            fn()  # autotunes on first call
            got = fn().float()
            ref = twin_call(op, p).float()
            err = ((got - ref).norm() / ref.norm()).item()
            ok = err <= (8e-3 if dtype == torch.bfloat16 else 2e-3)
            failed |= not ok
            if not ok:
                print(f"{op:<7}{tokens:>7}{p['rows']:>7}  MISMATCH vs torch twin: rel err {err:.2e}; not timed")
                continue
            del got, ref
            ms = median_ms(fn)
            loop_ms = median_ms(loop_call(op, p))
            elem = torch.empty((), dtype=dtype).element_size()
            used = sum(1 for s in p["sizes"] if s > 0)
            n_w = len(p["ws"])
            bytes_moved = elem * (p["rows"] * p["K"] + n_w * used * p["N"] * p["K"] + p["rows"] * p["N"])
            flops = 2 * n_w * p["rows"] * p["N"] * p["K"]
            floor_ms = max(bytes_moved / bandwidth, flops / rate) * 1e3
            print(f"{op:<7}{tokens:>7}{p['rows']:>7}{p['K']:>7}{p['N']:>7}{ms:>9.3f}{flops / ms / 1e9:>9.1f}"
                  f"{bytes_moved / ms / 1e6:>8.0f}{floor_ms:>10.3f}{floor_ms / ms:>9.2f}{loop_ms:>9.3f}"
                  f"{loop_ms / ms:>8.2f}{err:>9.1e}")  # fmt: skip
            del p
            torch.cuda.empty_cache()
    print("of floor: floor ms / measured ms (1.00 = at the floor); vs loop: loop ms / triton ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
