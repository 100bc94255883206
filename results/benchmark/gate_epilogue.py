"""The gate kernels with their short products made on chip (issue 29, part 1), against the form
before them, in one run on one GPU, at one layer of the default recipe (R = 8 x 512 rows, d = 256,
h = 4, n = 32,768, dropout 0.1):

    forward   before: u = LN(a) Dy by cuBLAS (R x n written), then _gate_kernel reads x and u, writes y
              now:    fused_parallel.gate: u made tile by tile in the kernel, x read, y written
    backward  before: u and g_y = g_z E^T by cuBLAS, then _gate_grad_kernel writes y, g_u and g_x
              now:    fused_parallel.gate_grad: u and g_y made in the kernel

The earlier form comes from --before (fused_parallel.py of an earlier commit, e.g. 74ab83d's). Sweeps
the new kernels' tiles (GateTiles: rows, pairs, the products' step over d, warps, stages); prints ms,
the ratio to the earlier form and the largest relative error against it.

    python3 results/benchmark/gate_epilogue.py --before .gpu/prev74/dragon_hatchling/fused_parallel.py \
        --out $OUT/gate_epilogue.json
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling import fused_parallel as fp  # noqa: E402
from dragon_hatchling.devices import cuda_time  # noqa: E402

SEED = 7


def module_from_file(path: str, name: str):
    """Import the Python file at path as module `name` (an earlier fused_parallel.py)."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # a module's dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def operands(R: int, D: int, H: int, M: int) -> dict:
    """x, g_z (R x n, R x d), ahat (h, R, d, layer-normed rows), Dy (h, d, M), E (n, d), bf16, at the
    model's scales."""
    g = torch.Generator(device="cuda").manual_seed(0)

    def draw(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, device="cuda") * scale).to(torch.bfloat16)

    return dict(
        x=draw(R, H * M), ahat=draw(H, R, D), Dy=draw(H, D, M, scale=0.02), gz=draw(R, D, scale=1e-3),
        E=draw(H * M, D, scale=0.02),
    )  # fmt: skip


def before_forms(old, t: dict, p_drop: float) -> dict:
    """The earlier module's forward and backward gates, through cuBLAS products and its kernels."""
    x, ahat, Dy, gz, E = t["x"], t["ahat"], t["Dy"], t["gz"], t["E"]
    (H, _, M), R = Dy.shape, x.shape[0]
    grid, tiles = old._grid(R, H, M), dict(HAS_DROPOUT=p_drop > 0, BR=old.BR, BP=old.BP)

    def forward():
        u, y = ahat @ Dy, torch.empty_like(x)
        old._gate_kernel[grid](x, u, y, R, M, H, p_drop, SEED, **tiles)
        return y

    def backward():
        u, gy = ahat @ Dy, gz @ E.mT
        y, gu = torch.empty_like(x), torch.empty_like(x)
        old._gate_grad_kernel[grid](x, u, gy, y, gu, gy, R, M, H, p_drop, SEED, **tiles)
        return y, gu, gy

    return {"forward": forward, "backward": backward}


def now_forms(t: dict, p_drop: float) -> dict:
    """This checkout's gates as functions of their tiles."""
    x, ahat, Dy, gz, E = t["x"], t["ahat"], t["Dy"], t["gz"], t["E"]
    return {
        "forward": lambda tiles: fp.gate(x, ahat, Dy, p_drop, SEED, tiles),
        "backward": lambda tiles: fp.gate_grad(x, ahat, Dy, gz, E, p_drop, SEED, tiles),
    }


def error(got, want) -> float:
    """The largest relative error over the outputs (a tensor or a tuple of them), where both keep a
    neuron (the two forms draw their dropout differently when --before predates the four-pair draw)."""
    pairs = zip(got, want, strict=True) if isinstance(got, tuple) else [(got, want)]
    errs = []
    for a, b in pairs:
        both = (a != 0) & (b != 0)
        errs.append(((a.float() - b.float())[both].abs().max() / b.float().abs().max()).item())
    return max(errs)


TILES = [fp.GateTiles(*t) for t in itertools.product((64, 128), (32, 64), (32, 64), (4, 8), (3, 4))]


def sweep(name: str, before, now, tiles_list: list) -> dict:
    """The earlier form's time and each tile's (ms; None: the default), with the ratio and the error."""
    want = before()
    out = {"before": cuda_time(before, 20, 5) / 20 * 1e3}
    print(f"{name}: before (cuBLAS and the gate kernel) {out['before']:.3f} ms")
    for tiles in tiles_list:
        t = tiles or fp.GATE_TILES
        key = f"{t.BR} {t.BP} {t.BK} {t.num_warps} {t.num_stages}"
        try:
            err = error(now(tiles), want)
            out[key] = cuda_time(lambda: now(tiles), 20, 5) / 20 * 1e3  # noqa: B023
        except Exception as e:  # a tile that asks for more shared memory than there is
            print(f"  {key}: {type(e).__name__}")
            continue
        ratio = out["before"] / out[key]
        print(f"  BR BP BK warps stages {key}: {out[key]:.3f} ms, {ratio:.2f}x, error {err:.1e}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", required=True, help="an earlier fused_parallel.py (u and g_y by cuBLAS)")
    p.add_argument("--out", default=None, help="write the results here as JSON")
    args = p.parse_args()
    old = module_from_file(args.before, "fused_parallel_before")
    t = operands(8 * 512, 256, 4, 8192)
    out = {"device": torch.cuda.get_device_name(), "R": 8 * 512, "ms": {}}
    for p_drop in (0.1, 0.0):  # the default dropout's tiles swept; without dropout, the default tiles
        before, now = before_forms(old, t, p_drop), now_forms(t, p_drop)
        for name in ("forward", "backward"):
            key = f"{name} dropout {p_drop}"
            out["ms"][key] = sweep(key, before[name], now[name], [None] if p_drop == 0 else TILES)
            if args.out:
                Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
