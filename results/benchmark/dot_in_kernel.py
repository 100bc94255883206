"""A product inside a Triton kernel against cuBLAS, at the fused layer's shapes (issue 29, part 1):
the gate a kernel that keeps the neurons on chip must pass first (about 85% of cuBLAS).

The default model at the default recipe's 8 x 512 (R = B*T = 4,096 rows), d = 256, h = 4, n/h =
8,192; bf16 operands, float32 sums:

    encoder   x = v Dx       (R x d) @ (d x n/h), a head each      K = 256: a short sum
    decoder   z = y E        (R x n) @ (n x d)                     K = 32,768: long, few outputs
    gradient  dDx = v^T dx   (d x R) @ (R x n/h), a head each      K = 4,096

For each, torch.matmul (cuBLAS) and one Triton kernel over a sweep of tiles, warps and stages, with
programs a tile each or persistent (one a multiprocessor, looping over tiles), loads by pointers or
through tensor descriptors (Hopper's bulk tensor copy, TMA), and split over K where the outputs are
few (partial sums in float32, then added: deterministic). Timed in one run (CUDA events, the median
of repeats); prints TFLOP/s and the ratio to cuBLAS, writes JSON.

    python3 results/benchmark/dot_in_kernel.py --out $OUT/dot_in_kernel.json
    python3 results/benchmark/dot_in_kernel.py --check   # each variant against torch at a tiny size
                                                         # (on a CPU, in Triton's interpreter)
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

if "--check" in sys.argv and not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before Triton is imported
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.tools.tensor_descriptor import TensorDescriptor  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser, out_file  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402


@triton.jit
def _tile_of(tile, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """(batch, row tile, column tile) of a linear tile number; GROUP_M row tiles side by side share
    their columns of B while they are in L2."""
    per_batch = tiles_m * tiles_n
    b, t = tile // per_batch, tile % per_batch
    group = GROUP_M * tiles_n
    first = (t // group) * GROUP_M
    rows = tl.minimum(tiles_m - first, GROUP_M)
    return b, first + (t % group) % rows, (t % group) // rows


@triton.jit
def _epilogue(acc, c_ptr, part, b, pm, pn, scs, scb, scm, scn, BM: tl.constexpr, BN: tl.constexpr,
              STORE: tl.constexpr):  # fmt: skip
    """Write the tile (STORE "f32" or "bf16", C's dtype), or, "relu-sum", what a fused layer would keep
    of it: relu and a sum over its columns, a column of C per column tile (BM floats, not BM x BN)."""
    rm = pm * BM + tl.arange(0, BM)
    if STORE == "relu-sum":
        tl.store(c_ptr + part * scs + b * scb + rm * scm + pn * scn, tl.sum(tl.maximum(acc, 0.0), 1))
    else:
        rn = pn * BN + tl.arange(0, BN)
        c = c_ptr + part * scs + b * scb + rm[:, None] * scm + rn[None, :] * scn
        tl.store(c, acc.to(c_ptr.dtype.element_ty))


@triton.jit
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, K, sab, sam, sak, sbb, sbk, sbn, scs, scb, scm, scn, tiles_m, tiles_n, tiles,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    PERSISTENT: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """C[s, b] = A[b] B[b] over the s-th of SPLIT_K parts of K (every size a multiple of its tile).
    Axis 0: tiles (or, PERSISTENT, a program a multiprocessor striding over them); axis 1: the parts."""
    part = tl.program_id(1)
    k_part = K // SPLIT_K
    first = tl.program_id(0)
    last = tiles if PERSISTENT else first + 1
    stride = tl.num_programs(0) if PERSISTENT else 1
    for tile in range(first, last, stride):
        b, pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP_M)
        rm = pm * BM + tl.arange(0, BM)
        rn = pn * BN + tl.arange(0, BN)
        rk = part * k_part + tl.arange(0, BK)
        a = a_ptr + b * sab + rm[:, None] * sam + rk[None, :] * sak  # BM, BK
        w = b_ptr + b * sbb + rk[:, None] * sbk + rn[None, :] * sbn  # BK, BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for _ in range(0, k_part, BK):
            acc = tl.dot(tl.load(a), tl.load(w), acc)
            a += BK * sak
            w += BK * sbk
        _epilogue(acc, c_ptr, part, b, pm, pn, scs, scb, scm, scn, BM, BN, STORE)


@triton.jit
def _gemm_tma_kernel(
    a_desc, b_desc, c_ptr, K, scs, scb, scm, scn, tiles_m, tiles_n, tiles,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
    PERSISTENT: tl.constexpr, A_T: tl.constexpr, STORE: tl.constexpr,
):  # fmt: skip
    """_gemm_kernel with its tiles loaded through tensor descriptors: A one (M, K) matrix for every
    batch (A_T: stored as (K, M), its tile transposed on chip), B the batches' (K, N) stacked."""
    part = tl.program_id(1)
    k_part = K // SPLIT_K
    first = tl.program_id(0)
    last = tiles if PERSISTENT else first + 1
    stride = tl.num_programs(0) if PERSISTENT else 1
    for tile in range(first, last, stride):
        b, pm, pn = _tile_of(tile, tiles_m, tiles_n, GROUP_M)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k in range(part * k_part, (part + 1) * k_part, BK):
            a = tl.trans(a_desc.load([k, pm * BM])) if A_T else a_desc.load([pm * BM, k])  # BM, BK
            acc = tl.dot(a, b_desc.load([b * K + k, pn * BN]), acc)  # BK, BN
        _epilogue(acc, c_ptr, part, b, pm, pn, scs, scb, scm, scn, BM, BN, STORE)


@dataclass(frozen=True)
class Tiles:
    BM: int
    BN: int
    BK: int
    num_warps: int
    num_stages: int
    split_k: int = 1
    persistent: bool = False
    tma: bool = False
    store: str = "f32"  # or "bf16", or "relu-sum" (no tile written: the fused layer's case)


def gemm(a: torch.Tensor, b: torch.Tensor, t: Tiles) -> torch.Tensor:
    """a (batch or 1, M, K) @ b (batch, K, N) -> (batch, M, N) in float32 or bf16, through _gemm_kernel;
    store "relu-sum": (batch, M, N / BN), relu(a @ b) summed over each tile's columns."""
    batch, (M, K), N = b.shape[0], a.shape[-2:], b.shape[-1]
    assert M % t.BM == 0 and N % t.BN == 0 and K % (t.BK * t.split_k) == 0, (M, N, K, t)
    assert t.split_k == 1 or t.store == "f32", "partial sums are float32 tiles"
    tiles_m, tiles_n = M // t.BM, N // t.BN
    width, dtype = (tiles_n, torch.float32) if t.store == "relu-sum" else (N, STORES[t.store])
    out = torch.empty((t.split_k, batch, M, width), device=a.device, dtype=dtype)
    tiles = tiles_m * tiles_n * batch
    programs = tiles
    if t.persistent:
        sms = torch.cuda.get_device_properties(a.device).multi_processor_count if a.is_cuda else 4
        programs = min(tiles, max(1, sms // t.split_k))
    if t.tma:
        _launch_tma(a, b, out, t, (programs, t.split_k), tiles_m, tiles_n, tiles)
        return out[0] if t.split_k == 1 else out.sum(0)
    sab = a.stride(0) if a.shape[0] > 1 else 0  # one A for every batch: the encoder's v
    _gemm_kernel[(programs, t.split_k)](
        a, b, out, K, sab, a.stride(-2), a.stride(-1), b.stride(0), b.stride(1), b.stride(2),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), tiles_m, tiles_n, tiles,
        BM=t.BM, BN=t.BN, BK=t.BK, GROUP_M=8, SPLIT_K=t.split_k, PERSISTENT=t.persistent, STORE=t.store,
        num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip
    return out[0] if t.split_k == 1 else out.sum(0)


STORES = {"f32": torch.float32, "bf16": torch.bfloat16}


def _launch_tma(a, b, out, t: Tiles, grid, tiles_m: int, tiles_n: int, tiles: int) -> None:
    """_gemm_tma_kernel over one A (1, M, K), row- or column-major, and B (batch, K, N) contiguous."""
    assert a.shape[0] == 1 and b.is_contiguous(), "descriptors: one A, a contiguous B"
    a_t = a.stride(-1) != 1  # stored as (K, M): the gradient's v^T
    a2 = a[0].mT if a_t else a[0]
    a_desc = TensorDescriptor.from_tensor(a2.contiguous(), [t.BK, t.BM] if a_t else [t.BM, t.BK])
    b_desc = TensorDescriptor.from_tensor(b.reshape(-1, b.shape[-1]), [t.BK, t.BN])
    _gemm_tma_kernel[grid](
        a_desc, b_desc, out, b.shape[1], out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        tiles_m, tiles_n, tiles, BM=t.BM, BN=t.BN, BK=t.BK, GROUP_M=8, SPLIT_K=t.split_k,
        PERSISTENT=t.persistent, A_T=a_t, STORE=t.store, num_warps=t.num_warps, num_stages=t.num_stages,
    )  # fmt: skip


def operands(R: int, d: int, h: int, m: int, device, dtype) -> dict:
    """The three products' operands (A, B) and their FLOPs, A and B as gemm takes them."""
    g = torch.Generator(device="cpu").manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g).to(device, dtype)  # noqa: E731
    v, Dx, y, E, dx = rand(1, R, d), rand(h, d, m), rand(1, R, h * m), rand(1, h * m, d), rand(h, R, m)
    return {
        "encoder x = v Dx": (v, Dx, 2 * R * d * h * m),
        "decoder z = y E": (y, E, 2 * R * h * m * d),
        "gradient dDx = v^T dx": (v.mT, dx, 2 * d * R * h * m),
    }


SWEEP = [  # Hopper's usual shapes for bf16 tl.dot (wgmma), and smaller ones
    Tiles(128, 256, 64, 8, 3), Tiles(256, 128, 64, 8, 3), Tiles(128, 128, 64, 8, 4),
    Tiles(128, 128, 64, 4, 4), Tiles(128, 128, 128, 8, 3), Tiles(64, 256, 64, 4, 4), Tiles(128, 64, 64, 4, 4),
]  # fmt: skip


def variants(name: str) -> list[Tiles]:
    """The sweep, persistent or not, by pointers or descriptors, each tile written as float32; the
    decoder (few outputs: R x d) split over K as well, at five of the tiles; the encoder and the
    gradient (many outputs) also written as bf16 (as cuBLAS writes them) or not written at all."""
    like = lambda t, **kw: Tiles(**{**asdict(t), **kw})  # noqa: E731
    stores = ("f32",) if name.startswith("decoder") else ("f32", "bf16", "relu-sum")
    out = [like(t, persistent=p, tma=m, store=w) for w in stores for m in (False, True) for p in (False, True)
           for t in SWEEP]  # fmt: skip
    if name.startswith("decoder"):
        out += [
            like(t, split_k=s, tma=m)
            for m in (False, True)
            for t in SWEEP[:3] + SWEEP[4:6]
            for s in (4, 8, 16)
        ]
    return out


def seconds(fn, calls: int = 20, repeats: int = 5) -> float:
    """Median seconds of one call (devices.cuda_time over `calls` calls, after two untimed ones)."""
    fn(), fn()
    return cuda_time(fn, calls, repeats) / calls


def reference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.matmul(a, b)


def expected(product: torch.Tensor, t: Tiles) -> torch.Tensor:
    """What gemm(a, b, t) returns, from the product a @ b."""
    if t.store != "relu-sum":
        return product
    return product.clamp(min=0).unflatten(-1, (-1, t.BN)).sum(-1)


def measure(name: str, a, b, flops: int) -> dict:
    """cuBLAS and every variant that fits the shape: TFLOP/s, ratio, the largest error."""
    want = reference(a, b).float()
    rows = {"cuBLAS": {"tflops": flops / seconds(lambda: reference(a, b)) / 1e12}}
    for t in variants(name):
        M, K, N = a.shape[-2], a.shape[-1], b.shape[-1]
        if M % t.BM or N % t.BN or K % (t.BK * t.split_k):
            continue
        try:
            exp = expected(want, t)
            err = (gemm(a, b, t).float() - exp).abs().max().item() / exp.abs().max().item()
            tflops = flops / seconds(lambda t=t: gemm(a, b, t)) / 1e12
        except Exception as e:  # e.g. out of shared memory: recorded, the sweep goes on
            rows[str(t)] = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
            continue
        rows[str(t)] = {"tflops": tflops, "over_cublas": tflops / rows["cuBLAS"]["tflops"], "rel_error": err}
    best = {}  # by store: cuBLAS writes bf16; "relu-sum" writes no tile
    for key, r in rows.items():
        if key != "cuBLAS" and "tflops" in r:
            store = key.split("store='")[1].split("'")[0]
            best[store] = max(best.get(store, 0.0), r["over_cublas"])
    return {"flops": flops, "rows": rows, "best_over_cublas": best}


def check() -> None:
    """Every variant against torch at a tiny size (the interpreter's speed), all three products."""
    small = [
        Tiles(16, 16, 16, 4, 1),
        Tiles(16, 32, 16, 4, 2, split_k=2),
        Tiles(32, 16, 16, 4, 1, persistent=True),
        Tiles(16, 16, 16, 4, 1, tma=True),
        Tiles(16, 32, 16, 4, 2, split_k=2, tma=True),
        Tiles(32, 16, 16, 4, 1, persistent=True, tma=True),
        Tiles(16, 16, 16, 4, 1, store="bf16"),
        Tiles(16, 16, 16, 4, 1, tma=True, store="relu-sum"),
        Tiles(32, 16, 16, 4, 1, persistent=True, store="relu-sum"),
    ]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for name, (a, b, _) in operands(64, 32, 2, 64, device, torch.float32).items():
        for t in small:
            got = gemm(a, b, t).float()
            tol = 1e-2 if t.store == "bf16" else 1e-4  # bf16: 8 bits of mantissa
            torch.testing.assert_close(got, expected(reference(a, b), t), rtol=tol, atol=10 * tol)
        print(f"{name}: {len(small)} variants match torch")


def main() -> None:
    p = Parser(description=__doc__)
    p.add_argument("--out", type=out_file, default=None, help="write the results here as JSON")
    p.add_argument("--check", action="store_true", help="check the kernels against torch, tiny, and stop")
    args = p.parse_args()
    if args.check:
        return check()
    if not torch.cuda.is_available():
        sys.exit("error: the measurement needs a CUDA GPU (--check runs anywhere)")
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
    }
    for name, (a, b, flops) in operands(4096, 256, 4, 8192, "cuda", torch.bfloat16).items():
        report[name] = measure(name, a, b, flops)
        rows = report[name]["rows"]
        print(f"{name}: cuBLAS {rows['cuBLAS']['tflops']:.0f} TFLOP/s")
        for store in report[name]["best_over_cublas"]:
            ranked = sorted(
                (r["tflops"], k) for k, r in rows.items() if f"store='{store}'" in k and "tflops" in r
            )
            for tflops, key in ranked[::-1][:3]:
                print(f"  {tflops:6.0f} TFLOP/s  {tflops / rows['cuBLAS']['tflops']:.2f}x  {key}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
