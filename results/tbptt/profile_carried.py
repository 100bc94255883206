"""Where the carried step's time goes: one AdamW training step of the fused path with and without a
state carried from the step before (benchmark.train_step_fn, the default model with the long-context
recipe's decay), under torch.profiler; each kernel's GPU time a step, and what the carried step
spends that the plain fused step does not.

    python3 results/tbptt/profile_carried.py --shapes 8x512,2x2048 --out $OUT/profile.json
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py

from dragon_hatchling.benchmark import configs, shape_list, train_step_fn  # noqa: E402
from dragon_hatchling.cli import Parser, UsageError, fail, half_lives, out_file, positive_int  # noqa: E402
from model import BDH, BDHConfig  # noqa: E402

STEPS = 5


def kernel_ms(path: str, B: int, T: int, cfg: BDHConfig) -> dict[str, float]:
    """Milliseconds of GPU time a step, by kernel name, over STEPS warm steps."""
    torch.manual_seed(0)
    model = BDH(cfg).cuda().train()
    step = train_step_fn(model, path, B, T, torch.device("cuda"))
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    times: dict[str, float] = defaultdict(float)
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            times[e.name[:90]] += e.device_time / 1000 / STEPS  # us -> ms, a step
    return dict(times)


def compare(plain: dict[str, float], carried: dict[str, float], top: int = 25) -> str:
    """The kernels by what the carried step spends over the plain one, largest first."""
    names = sorted(set(plain) | set(carried), key=lambda k: plain.get(k, 0) - carried.get(k, 0))
    lines = [f"{'fused':>8} {'carried':>8} {'extra':>8}  kernel (ms a step)"]
    for k in names[:top]:
        a, b = plain.get(k, 0.0), carried.get(k, 0.0)
        lines.append(f"{a:8.3f} {b:8.3f} {b - a:8.3f}  {k}")
    lines.append(f"{sum(plain.values()):8.3f} {sum(carried.values()):8.3f}  all kernels")
    return "\n".join(lines)


def main() -> int:
    p = Parser(description=__doc__)
    p.add_argument("--shapes", type=shape_list, default=[(8, 512)], help="BATCHxWINDOW pairs (8x512)")
    p.add_argument("--half_lives", type=half_lives, default=[8.0, 32.0, 128.0, 256.0], help="none: no decay")
    p.add_argument("--n_layer", type=positive_int, default=BDHConfig().n_layer, help="the model's layers")
    p.add_argument(
        "--out", type=out_file, default=None, help="JSON of every kernel's time, both paths, each shape"
    )
    args = p.parse_args()
    try:
        plain_cfg, decay_cfg = configs(args)  # as benchmark.py reads the same flags
    except UsageError as e:
        fail(str(e))
    if not torch.cuda.is_available():
        fail("profile_carried.py profiles CUDA kernels; no CUDA device here")
    cfg = decay_cfg or plain_cfg
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "config": cfg.to_dict()}
    for B, T in args.shapes:
        plain, carried = kernel_ms("fused", B, T, cfg), kernel_ms("fused carried", B, T, cfg)
        print(f"\n{B} x {T}\n{compare(plain, carried)}", flush=True)
        report[f"{B}x{T}"] = {"fused": plain, "fused carried": carried}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
