"""Speed of BDH-GPU's forms on one GPU: training steps of the plain path (eager and compiled) and the
fused Triton path (and its step with a state carried from the step before, --carry_state), a
long-context step through the chunked form, and generation (recurrent against
recomputing the prefix). Prints a table of speed-ups over the compiled plain path and writes JSON.

    uv run python -m dragon_hatchling.benchmark --device cuda --out results/benchmark/h200.json
    uv run python -m dragon_hatchling.benchmark --parts generate --model_path <trained checkpoint>
    uv run torchrun --standalone --nproc_per_node 2 -m dragon_hatchling.benchmark --parts ddp --out ddp2.json

--parts ddp times fused training steps at each --shapes batch per GPU, through DistributedDataParallel
under torchrun (plain steps in one process), and the all-reduce of a gradient-sized float32 buffer.

Every number is measured in this run (CUDA events around warm steps, median of repeats), so ratios
between paths are comparable; absolute rates depend on the machine.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from datetime import date
from pathlib import Path

import torch

from dragon_hatchling.carried import Carried
from dragon_hatchling.cli import Parser, UsageError, fail, half_lives, out_file, positive_int
from dragon_hatchling.devices import cuda_time, resolve_device
from dragon_hatchling.distributed import (
    Ranks,
    all_reduce,
    exit_with,
    rank_device,
    ranks_from_env,
    start,
    stop,
)
from dragon_hatchling.files import write_json
from dragon_hatchling.hub_client import HubUnreachable
from dragon_hatchling.loading import load_model
from dragon_hatchling.sampling import generate, generate_recompute
from dragon_hatchling.step_speed import latency_fit, measure_steps, previous_step
from dragon_hatchling.stopping import interruptible
from model import BDH, BDHConfig

PATHS = ("plain eager", "plain compiled", "fused", "fused carried")  # carried: --carry_state's step
PARTS = ("train", "long", "generate", "latency", "ddp")


def subset_of(allowed: tuple[str, ...]):
    """An argparse type: a comma-separated, non-empty subset of `allowed`, as a list."""

    def parse(text: str) -> list[str]:
        items = [t for t in text.split(",") if t]
        if not items or not set(items) <= set(allowed):
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated subset of {','.join(allowed)}, got {text!r}"
            )
        return items

    return parse


def shape_list(text: str) -> list[tuple[int, int]]:
    """--shapes: BATCHxWINDOW pairs, comma-separated."""
    try:
        shapes = [tuple(int(n) for n in s.split("x")) for s in text.split(",")]
        if all(len(s) == 2 and min(s) > 0 for s in shapes):
            return shapes
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(f"expected BATCHxWINDOW pairs like 32x128,8x2048, got {text!r}")


PROMPT = (
    b" = Valkyria Chronicles III = \n\n Senj\xc5\x8d no Valkyria 3 : Unrecorded Chronicles is a tactical "
    b"role @-@ playing video game developed by Sega and Media.Vision for the PlayStation Portable . "
)


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__)
    p.add_argument("--device", default="cuda", help="cuda (the numbers mean little elsewhere)")
    p.add_argument("--out", type=out_file, default=None, help="write the results here as JSON")
    p.add_argument(
        "--parts",
        type=subset_of(PARTS),
        default="train,long,generate",
        help="comma-separated: train, long, generate, latency (step_speed.latency_fit), ddp (torchrun)",
    )
    p.add_argument(
        "--shapes", type=shape_list, default="32x128,32x512,8x2048", help="training shapes, BATCHxWINDOW,..."
    )
    p.add_argument("--steps", type=positive_int, default=10, help="timed training steps per repeat")
    p.add_argument("--repeats", type=positive_int, default=3, help="timed repeats (the median is kept)")
    p.add_argument("--warmup", type=positive_int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--long_T", type=positive_int, default=16384, help="window of the long-context step")
    p.add_argument("--chunk_size", type=positive_int, default=1024, help="chunk of the long-context step")
    p.add_argument("--new_bytes", type=positive_int, default=1000, help="bytes to generate")
    p.add_argument("--n_layer", type=positive_int, default=6, help="layers (default model: 6)")
    p.add_argument(
        "--paths",
        type=subset_of(PATHS),
        default=",".join(PATHS),
        help=f"training paths to time, comma-separated subset of {','.join(PATHS)} (all)",
    )
    p.add_argument(
        "--half_lives",
        type=half_lives,
        default=None,
        metavar="H1,H2,...",
        help="also time every path of --paths (training) and generation of the model with this attention "
        "decay, and the fused path with decay against today's fused path at 32 x 128 without decay",
    )
    p.add_argument(
        "--model_path",
        default=None,
        help="generate from this checkpoint (default: a freshly initialised model; a trained one has "
        "sparser neurons, which the fused step skips)",
    )
    p.add_argument(
        "--previous_step",
        default=None,
        help="also time generation through this copy of fused_recurrent.py (e.g. an earlier commit's, "
        "from git show), as the ratios named previous",
    )
    return p


def train_step_fn(model: BDH, path: str, B: int, T: int, device: torch.device, chunk_size: int = 0):
    """One AdamW training step (bf16, dropout on, gradient clipping) on random bytes."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    idx = torch.randint(0, 256, (B, T), device=device)
    targets = torch.randint(0, 256, (B, T), device=device)
    compiled = torch.compile(model) if path == "plain compiled" else model
    if path.startswith("fused"):
        from dragon_hatchling.fused_parallel import Fused, fused_forward  # imports Triton

        carried = Carried(Fused(model))  # the state of the step before, every step

    def loss_of():
        if path == "fused":
            return fused_forward(model, idx, targets)[1]
        if path == "fused carried":
            return carried(idx, targets)[1]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if path.startswith("chunked"):
                return model.forward_chunked(idx, targets, chunk_size=chunk_size, checkpoint=True)[1]
            return compiled(idx, targets)[1]

    def step():
        loss = loss_of()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure_train(
    cfg: BDHConfig, path: str, B: int, T: int, args, device, chunk_size: int = 0, label: str | None = None
) -> dict:
    torch.manual_seed(0)
    model = BDH(cfg).to(device).train()
    row = {"path": label or path, "batch": B, "window": T}
    try:
        step = train_step_fn(model, path, B, T, device, chunk_size)
        for _ in range(args.warmup):
            step()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        sec = cuda_time(step, args.steps, args.repeats)
        row.update(
            bytes_per_s=B * T * args.steps / sec, peak_gb=torch.cuda.max_memory_allocated(device) / 1e9
        )
    except torch.OutOfMemoryError:
        row.update(bytes_per_s=None, peak_gb=None, error="out of memory")
    finally:
        del model
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    print(
        f"  {row['path']:>16} B={B:<3} T={T:<6} {fmt_rate(row.get('bytes_per_s'))}",
        file=sys.stderr,
        flush=True,
    )
    return row


def fmt_rate(x: float | None) -> str:
    return "-" if x is None else f"{x:,.0f} B/s"


def timed_model(cfg: BDHConfig, device, trained: BDH | None = None) -> BDH:
    """The model that generation is timed on: the trained one, else a fresh one of cfg (seed 0);
    in bf16 on the device, in eval mode."""
    torch.manual_seed(0)
    return (trained if trained is not None else BDH(cfg)).to(device).to(torch.bfloat16).eval()


def measure_generation(cfg: BDHConfig, args, device, trained: BDH | None = None) -> dict:
    model = timed_model(cfg, device, trained)
    prompt = torch.tensor([list(PROMPT)], device=device)
    out = {"prompt_bytes": prompt.shape[1], "new_bytes": args.new_bytes, "batch": 1, "dtype": "bfloat16"}
    out["model"] = args.model_path or "freshly initialised (seed 0)"
    from dragon_hatchling.fused_recurrent import FusedStep  # imports Triton

    out["step_tiles"] = {"attention": FusedStep.ATTENTION_TILES, "gate": FusedStep.GATE_TILES}
    sampled = lambda n: generate(  # noqa: E731
        model, prompt, n, temperature=1.0, top_k=40, generator=torch.Generator(device).manual_seed(0)
    )
    runs = {
        "recurrent (CUDA graph)": lambda n: generate(model, prompt, n, temperature=0.0),
        "recurrent (CUDA graph), sampled": sampled,  # temperature 1, top-k 40: sampling in the graph too
        "recurrent (eager)": lambda n: generate(model, prompt, n, temperature=0.0, cuda_graph=False),
        "recompute prefix": lambda n: generate_recompute(model, prompt, n, temperature=0.0),
    }
    out["runs"] = list(runs)
    texts = {}
    for name, fn in runs.items():
        fn(8)  # warm up: kernels, cuBLAS handles, the graph's capture
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        texts[name] = fn(args.new_bytes)
        torch.cuda.synchronize()
        out[name] = {"seconds": time.perf_counter() - t0}
        out[name]["bytes_per_s"] = args.new_bytes / out[name]["seconds"]
        print(f"  {name:>33} {out[name]['seconds']:.3f} s", file=sys.stderr, flush=True)
    base = out["recompute prefix"]["seconds"]
    for name in runs:
        out[name]["speedup_over_recompute"] = base / out[name]["seconds"]
    # greedy bytes agree until bf16 rounding first tips an argmax one way or the other
    a, b = texts["recurrent (CUDA graph)"][0], texts["recompute prefix"][0]
    differ = (a != b).nonzero()
    out["greedy_bytes_identical_before_first_difference"] = int(
        (differ[0, 0] - prompt.shape[1]) if len(differ) else args.new_bytes
    )
    previous = Path(args.previous_step) if args.previous_step else None
    out["steps"] = measure_steps(model, PROMPT, args.new_bytes, previous)
    return out


def measure_latency(cfg: BDHConfig, args, device, trained: BDH | None = None) -> dict:
    """step_speed.latency_fit around the model (--model_path's, else a fresh one of cfg), in bf16."""
    model = timed_model(cfg, device, trained)
    out = {"model": args.model_path or "freshly initialised (seed 0)", "dtype": "bfloat16", "batch": 1}
    return {**out, **latency_fit(model, PROMPT, args.new_bytes)}


def measure_ddp(cfg: BDHConfig, B: int, T: int, args, device, ranks: Ranks) -> dict:
    """Fused training steps at B x T bytes per GPU on every rank (DistributedDataParallel with several,
    plain with one), their bytes/s over all ranks, and the time to all-reduce the gradients' size."""
    import torch.distributed as tdist
    from torch.nn.parallel import DistributedDataParallel

    from dragon_hatchling.fused_parallel import Fused

    torch.manual_seed(0)
    model = BDH(cfg).to(device).train()
    net = Fused(model)
    if ranks.several:
        net = DistributedDataParallel(net, device_ids=[device.index])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    gen = torch.Generator(device).manual_seed(ranks.rank)
    idx, targets = torch.randint(0, 256, (2, B, T), device=device, generator=gen)

    def step():
        net(idx, targets)[1].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        step()
    torch.cuda.synchronize()
    sec = float(all_reduce([cuda_time(step, args.steps, args.repeats)], "max")[0])  # the slowest rank
    row = {"world_size": ranks.world, "batch_per_gpu": B, "window": T, "step_s": sec / args.steps}
    row["bytes_per_s"] = ranks.world * B * T * args.steps / sec
    if ranks.several:  # the gradients' all-reduce alone, as DDP does it (float32, NCCL)
        flat = torch.ones(model.num_params(), device=device)
        row["allreduce_bytes"] = flat.numel() * 4
        row["allreduce_s"] = cuda_time(lambda: tdist.all_reduce(flat), 10, args.repeats) / 10
    if ranks.main:
        print(
            f"  ddp x{ranks.world} B={B} T={T}: {fmt_rate(row['bytes_per_s'])}", file=sys.stderr, flush=True
        )
    return row


DECAY = ", decay"  # what a path's label ends with for the model with decay
DECAY_PATH = "fused" + DECAY


def decay_ratios(rows: list[dict], args, device) -> dict[str, float]:
    """bytes/s of the fused path with decay at each shape over today's fused path at 32 x 128 without
    decay (measured in this run, or now if the shapes left it out)."""
    today = next((r for r in rows if r["path"] == "fused" and (r["batch"], r["window"]) == (32, 128)), None)
    if today is None:
        today = measure_train(BDHConfig(n_layer=args.n_layer), "fused", 32, 128, args, device)
        rows.append(today)
    if not today.get("bytes_per_s"):
        return {}
    return {
        f"{r['batch']}x{r['window']}": r["bytes_per_s"] / today["bytes_per_s"]
        for r in rows
        if r["path"] == DECAY_PATH and r.get("bytes_per_s")
    }


def table(results: list[dict]) -> str:
    """Every training row against the compiled plain path at its shape (with or without decay)."""
    lines = [
        "| batch x window | path | bytes/s | vs compiled plain | peak memory |",
        "|---|---|---:|---:|---:|",
    ]

    def key(r: dict) -> tuple:
        return r["batch"], r["window"], r["path"].endswith(DECAY)

    base = {key(r): r["bytes_per_s"] for r in results if r["path"].removesuffix(DECAY) == "plain compiled"}
    for r in results:
        ref = base.get(key(r))
        speed = f"{r['bytes_per_s'] / ref:.2f}x" if r.get("bytes_per_s") and ref else "-"
        mem = f"{r['peak_gb']:.1f} GB" if r.get("peak_gb") else r.get("error", "-")
        rate = fmt_rate(r.get("bytes_per_s")) if r.get("bytes_per_s") else r.get("error", "-")
        lines.append(f"| {r['batch']} x {r['window']} | {r['path']} | {rate} | {speed} | {mem} |")
    return "\n".join(lines)


def save(path: str | None, report: dict) -> None:
    """Write what has been measured so far (a later crash or timeout keeps it)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_json(path, report)


def configs(args: argparse.Namespace) -> tuple[BDHConfig, BDHConfig | None]:
    """The default model, and with --half_lives the same with that decay (one number: every head)."""
    cfg = BDHConfig(n_layer=args.n_layer)
    if not args.half_lives:  # None, or [] (none)
        return cfg, None
    lives = args.half_lives * cfg.n_head if len(args.half_lives) == 1 else args.half_lives
    try:
        return cfg, BDHConfig(n_layer=args.n_layer, half_lives=lives)
    except ValueError as e:
        raise UsageError(f"--half_lives: {e}") from None


def gpu(args: argparse.Namespace) -> tuple[torch.device, Ranks]:
    """This process's GPU (under torchrun, its rank's) and its place among the ranks."""
    ranks = ranks_from_env()
    device = resolve_device(args.device)
    if device.type != "cuda":
        raise UsageError(f"--device: the benchmark times CUDA kernels, got {args.device!r}")
    start(ranks, 600)
    return rank_device(ranks, device), ranks


def header(argv: list[str] | None, device: torch.device, cfg: BDHConfig, decay: BDHConfig | None) -> dict:
    """What the report says of how it was measured."""
    report = {
        "command": "python " + " ".join([sys.argv[0]] + (argv if argv is not None else sys.argv[1:])),
        "date": date.today().isoformat(),
        "device": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "config": cfg.to_dict(),
        "decay_config": decay.to_dict() if decay is not None else None,
        "train": [],
    }
    try:
        import triton

        report["triton"] = triton.__version__
    except ImportError:
        pass
    return report


def time_training(report: dict, cfg: BDHConfig, decay: BDHConfig | None, args, device) -> None:
    """Every path at every shape, with and without decay, into report["train"] (saved as it goes)."""
    for B, T in args.shapes:
        for model, suffix in ((cfg, ""), (decay, DECAY)):
            for path in args.paths if model is not None else ():
                report["train"].append(measure_train(model, path, B, T, args, device, label=path + suffix))
                save(args.out, report)
    if decay is not None:
        report["decay_vs_fused_32x128"] = decay_ratios(report["train"], args, device)
    report["carried_vs_fused"] = carried_ratios(report["train"])


def carried_ratios(rows: list[dict]) -> dict[str, float]:
    """bytes/s of the carried fused step over the fused step at each shape (and decay) of this run."""
    fused = {(r["batch"], r["window"], r["path"].endswith(DECAY)): r.get("bytes_per_s") for r in rows
             if r["path"].removesuffix(DECAY) == "fused"}  # fmt: skip
    out = {}
    for r in rows:
        key = (r["batch"], r["window"], r["path"].endswith(DECAY))
        if r["path"].removesuffix(DECAY) == "fused carried" and r.get("bytes_per_s") and fused.get(key):
            out[f"{r['batch']}x{r['window']}" + DECAY * key[2]] = r["bytes_per_s"] / fused[key]
    return out


def time_long_context(report: dict, cfg: BDHConfig, args, device) -> None:
    """One training step on a --long_T window: the chunked form against the plain parallel one."""
    T, C = args.long_T, args.chunk_size
    few = argparse.Namespace(**{**vars(args), "warmup": 1, "steps": 1, "repeats": 2})  # seconds a step
    report["train"].append(measure_train(cfg, f"chunked C={C}", 1, T, few, device, C))
    report["train"].append(measure_train(cfg, "plain eager", 1, T, few, device))
    save(args.out, report)


def summary(report: dict) -> str:
    """The tables and ratios, as printed."""
    lines = [table(report["train"])] if report["train"] else []
    for shape, ratio in report.get("decay_vs_fused_32x128", {}).items():
        lines.append(f"fused {shape} with decay against today's fused path at 32 x 128: {ratio:.2f}x")
    for shape, ratio in report.get("carried_vs_fused", {}).items():
        lines.append(f"fused {shape}, state carried, against the fused step without: {ratio:.2f}x")
    for key in ("generation", "generation_decay"):
        if key in report:
            g = report[key]
            lines.append(
                f"\n{key} of {g['new_bytes']} bytes after a {g['prompt_bytes']}-byte prompt, batch 1:"
            )
            for name in g["runs"]:
                lines.append(
                    f"  {name:>33}: {g[name]['seconds']:.3f} s, {g[name]['speedup_over_recompute']:.1f}x"
                )
            lines += [f"  {name:>40}: {rate:,.0f} B/s" for name, rate in g["steps"]["rates"].items()]
            lines += [f"  {k}: {v:.2f}" for k, v in g["steps"].items() if "_over_" in k]
    if "latency" in report:
        lines.append(latency_lines(report["latency"]))
    return "\n".join(lines)


def latency_lines(fit: dict) -> str:
    """latency_fit's points and line, as printed."""
    lines = ["\nbatch-1 step of fresh models by n: seconds against the bytes it must move"]
    model = {**fit["model"], "n_neurons": f"{fit['model']['n_neurons']} (the model)"}
    for p in [*fit["points"], model]:
        mb, us = p["bytes_per_byte"] / 1e6, 1e6 * p["seconds_a_step"]
        lines.append(f"  n {p['n_neurons']:>14}: {mb:8.1f} MB, {us:8.1f} us")
    fixed, tbs = 1e6 * fit["fixed_seconds_a_step"], fit["bytes_per_s"] / 1e12
    share = fit["model"]["fixed_share"]
    lines.append(
        f"  fit: {fixed:.1f} us fixed + bytes at {tbs:.2f} TB/s; fixed is {share:.0%} of the model's step"
    )
    return "\n".join(lines)


def trained_model(model_path: str) -> BDH:
    """--model_path's model, refused at once if the fused recurrent step cannot run it (a GPT, or a
    BDH with shifted heads), rather than after the timings before it."""
    model = load_model(model_path)[0]
    if not getattr(model, "has_fused_step", False):
        raise UsageError(
            f"--model_path {model_path}: the benchmark times fused_recurrent.FusedStep, which takes no "
            "GPT and no shifted heads"
        )
    return model


def check_parts(args: argparse.Namespace) -> None:
    """The flags of generation want it among --parts (--model_path: generate or latency)."""
    if args.model_path is not None and not {"generate", "latency"} & set(args.parts):
        raise UsageError(
            "--model_path applies to generation: add generate or latency to --parts, or leave it out"
        )
    if args.previous_step is not None and "generate" not in args.parts:
        raise UsageError("--previous_step applies to generation: add generate to --parts, or leave it out")


@interruptible("before it finished (--out has what was measured by then)")
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_parts(args)
        trained = trained_model(args.model_path) if args.model_path else None
        cfg, decay = configs(args)
        if args.previous_step is not None:
            previous_step(Path(args.previous_step))  # imports it: a bad file is refused before any work
        device, ranks = gpu(args)
    except (UsageError, HubUnreachable) as e:
        fail(str(e))
    torch.backends.cuda.matmul.allow_tf32 = True
    report = header(argv, device, cfg, decay)
    if "train" in args.parts:
        time_training(report, cfg, decay, args, device)
    if "long" in args.parts:
        time_long_context(report, cfg, args, device)
    if "ddp" in args.parts:
        report["ddp"] = [measure_ddp(cfg, B, T, args, device, ranks) for B, T in args.shapes]
        stop()
        if not ranks.main:
            return 0
    if "generate" in args.parts:
        report["generation"] = measure_generation(cfg, args, device, trained)
        if decay is not None:
            report["generation_decay"] = measure_generation(decay, args, device)
    if "latency" in args.parts:
        report["latency"] = measure_latency(cfg, args, device, trained)
    print(summary(report))
    save(args.out, report)
    print(json.dumps({k: v for k, v in report.items() if k not in ("train", "generation", "config")}))
    return 0


if __name__ == "__main__":
    exit_with(main)  # --parts ddp under torchrun: the ranks end as experiment.py's do
