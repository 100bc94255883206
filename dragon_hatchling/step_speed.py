"""Speed of the recurrent step (generation) against the floor set by memory bandwidth, for the
benchmark's `generate` part (benchmark.py): a captured CUDA graph of the fused step replayed, at
batch 1 and batch 32 (prompts of their own lengths, each row its own position; at batch 32 also with
1 to 16 rows an attention program), with lazy decay
(the default) and with every row decaying every step (the step before lazy decay), the same weights
without decay, and the previous commit's kernels (--previous_step: a copy of its fused_recurrent.py).

The floor is the bytes a step must move (Dx whole for every layer, the state rows of live neurons
read and written, their rows of Dy and E; with every row decaying, every state row) over the device's
bandwidth, measured in the same run by a copy. The same weights without decay have their own floor
(their neurons fire differently), so lazy decay and no decay are also compared each over its own.

latency_fit (the benchmark's `latency` part) asks what the step's time is made of: fresh models of
the model's shape at several n, their seconds a step against the bytes each must move, fitted by a
line: fixed + bytes / bandwidth. fixed is what no bandwidth removes (launches, waits, dependent
reads); the line's bandwidth is what the kernels reach on bytes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dragon_hatchling.cli import UsageError, module_from_file
from dragon_hatchling.devices import cuda_time
from dragon_hatchling.sampling import GraphedStep, generate, prompt_state
from model import BDH, BDHConfig

BATCH = 32  # the batched rows
WIDTHS = (0.125, 0.25, 0.5, 1.0, 2.0)  # latency_fit's fresh models: their n over the model's
ROWS_A_PROGRAM = (1, 2, 4, 8, 16)  # the batch rows an attention program takes, swept at batch 32


def cuda_seconds(fn, calls: int, repeats: int = 3) -> float:
    """devices.cuda_time of `calls` calls of fn (all of them, not one), after one untimed call."""
    fn()
    return cuda_time(fn, calls, repeats)


def prompts(prompt: bytes, batch: int, device) -> list[torch.Tensor]:
    """batch prompts of their own lengths: the prompt less 0, 3, 6, ... bytes from its end."""
    cut = [len(prompt) - (3 * i) % (len(prompt) // 2) for i in range(batch)]
    return [torch.tensor(list(prompt[:n]), device=device) for n in cut]


def step_rate(model: BDH, rows: list[torch.Tensor], steps: int, fused=None, lazy_decay: bool = True) -> float:
    """Bytes/s of the graphed step over the state after rows (fused: the step to capture, default
    FusedStep; lazy_decay=False: every row decays every step)."""
    _, state, _ = prompt_state(model, rows, None, 256)
    graphed = GraphedStep(model, state, fused=fused, lazy_decay=lazy_decay)
    return len(rows) * steps / cuda_seconds(graphed, steps)


def generate_rate(model: BDH, rows: list[torch.Tensor], steps: int) -> float:
    """Bytes/s of generate() sampling `steps` bytes after each of rows, side by side (top-k 40)."""
    gen = torch.Generator(model.E.device).manual_seed(0)
    run = lambda: generate(model, rows, steps, temperature=1.0, top_k=40, generator=gen)  # noqa: E731
    return len(rows) * steps / cuda_seconds(run, 1)


def without_decay(model: BDH) -> BDH:
    """The same weights, without decay."""
    plain = BDH(dataclasses.replace(model.config, half_lives=None, learn_decay=False))
    plain = plain.to(model.E.device, model.E.dtype)
    plain.load_state_dict({k: w for k, w in model.state_dict().items() if k != "log2_half_lives"})
    return plain.eval()


def previous_step(path: Path):
    """FusedStep of another copy of fused_recurrent.py (e.g. `git show REV:dragon_hatchling/...`)."""
    module = module_from_file(
        path, "previous_fused_recurrent", "--previous_step", "a copy of fused_recurrent.py"
    )
    if not hasattr(module, "FusedStep"):
        raise UsageError(f"--previous_step {path}: has no FusedStep")
    return module.FusedStep


def bandwidth(device) -> float:
    """Bytes/s of a device-to-device copy of 1 GiB of float32 (read and written), the best of 5."""
    src = torch.ones(2**28, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    return max(20 * 2 * 4 * src.numel() / cuda_seconds(lambda: dst.copy_(src), 20) for _ in range(5))


def floor_bytes(model: BDH, rows: list[torch.Tensor], every_row: bool) -> dict:
    """What one step of these rows must move, from the neurons' live fractions over the prompts."""
    c = model.config
    live = [model.activation_stats(row[None]) for row in rows]
    mean = lambda key: sum(s[key] for layer in live for s in layer) / (len(live) * c.n_layer)  # noqa: E731
    row = c.n_embd * model.E.element_size()  # one row of Dy^T or E
    state = 2 * 4 * c.n_embd  # a float32 state row read and written
    per_layer = c.n_neurons * (
        c.n_embd * model.Dx.element_size() / len(rows)  # Dx, once a step for the batch (L2 serves the rest)
        + (1.0 if every_row else mean("rope_x_nonzero")) * state
        + mean("x_nonzero") * row
        + mean("y_nonzero") * row
    )
    return {"bytes_per_byte": per_layer * c.n_layer, "x_nonzero": mean("x_nonzero"),
            "rope_x_nonzero": mean("rope_x_nonzero"), "y_nonzero": mean("y_nonzero")}  # fmt: skip


def step_rates(model: BDH, one: list, many: list, steps: int, previous: Path | None) -> dict:
    """Bytes/s of every step of the module docstring, by name."""
    from dragon_hatchling.fused_recurrent import FusedStep  # imports Triton

    rates = {"batch 1": step_rate(model, one, steps), f"batch {BATCH}": step_rate(model, many, steps)}
    rates[f"generate(), {BATCH} prompts, sampled"] = generate_rate(model, many, steps)
    for rows in ROWS_A_PROGRAM:  # batch rows an attention program takes
        step = FusedStep(model, attention={"BB": rows})
        rates[f"batch {BATCH}, {rows} rows an attention program"] = step_rate(model, many, steps, step)
    decays = model.config.half_lives is not None
    if decays:
        rates["batch 1, every row decays"] = step_rate(model, one, steps, lazy_decay=False)
        rates["batch 1, same weights without decay"] = step_rate(without_decay(model), one, steps)
    if previous is not None:
        old = previous_step(previous)(model)
        rates["batch 1, previous kernels"] = step_rate(model, one, steps, old, lazy_decay=False)
        if decays:
            plain = without_decay(model)
            old = previous_step(previous)(plain)
            rates["batch 1, without decay, previous kernels"] = step_rate(plain, one, steps, old, False)
    return rates


def floors(model: BDH, one: list, many: list, rates: dict, bandwidth_bytes_per_s: float) -> dict:
    """The floor of each step that has one, and its rate over the floor."""
    out = {"batch 1": floor_bytes(model, one, False), f"batch {BATCH}": floor_bytes(model, many, False)}
    if model.config.half_lives is not None:
        out["batch 1, every row decays"] = floor_bytes(model, one, True)
        # its own neurons fire without decay, so its own floor: is a gap the kernels' or the traffic's?
        out["batch 1, same weights without decay"] = floor_bytes(without_decay(model), one, False)
    for name, floor in out.items():
        floor["floor_bytes_per_s"] = bandwidth_bytes_per_s / floor["bytes_per_byte"]
        floor["rate_over_floor"] = rates[name] / floor["floor_bytes_per_s"]
    return out


def ratios(rates: dict) -> dict:
    """The ratios the issue asks for (those whose rates were measured)."""
    program = lambda r: rates[f"batch {BATCH}, {r} rows an attention program"]  # noqa: E731
    best = max(ROWS_A_PROGRAM, key=program)
    out = {
        f"batch_{BATCH}_over_batch_1": rates[f"batch {BATCH}"] / rates["batch 1"],
        "best_rows_an_attention_program": best,
        f"batch_{BATCH}_best_rows_over_batch_1": program(best) / rates["batch 1"],
    }
    pairs = {
        "lazy_decay_over_every_row": "batch 1, every row decays",
        "lazy_decay_over_no_decay": "batch 1, same weights without decay",
        "lazy_decay_over_no_decay_previous": "batch 1, without decay, previous kernels",
    }
    out.update({key: rates["batch 1"] / rates[name] for key, name in pairs.items() if name in rates})
    return out


def floor_ratios(floors: dict) -> dict:
    """Lazy decay over no decay, each rate taken over its own floor (1: the decay costs the kernels
    nothing, and any gap in bytes/s is the bytes the two models' neurons make them move)."""
    name = "batch 1, same weights without decay"
    if name not in floors:
        return {}
    at_floor = floors["batch 1"]["rate_over_floor"] / floors[name]["rate_over_floor"]
    return {"lazy_decay_over_no_decay_at_floor": at_floor}


def measure_steps(model: BDH, prompt: bytes, steps: int, previous: Path | None) -> dict:
    """Every rate of the module docstring, their floors, and the ratios the issue asks for."""
    dev = model.E.device
    one, many = prompts(prompt, 1, dev), prompts(prompt, BATCH, dev)
    out = {"bandwidth_bytes_per_s": bandwidth(dev), "batch": BATCH}
    out["rates"] = step_rates(model, one, many, steps, previous)
    out["floors"] = floors(model, one, many, out["rates"], out["bandwidth_bytes_per_s"])
    return {**out, **ratios(out["rates"]), **floor_ratios(out["floors"])}


def width_config(config: BDHConfig, k: float) -> BDHConfig:
    """config with about k times its neurons: whole rotation pairs in every head (a multiple of 2h);
    one RoPE frequency range for all of them (a merged model's parts do not scale)."""
    unit = 2 * config.n_head
    n = max(unit, round(config.n_neurons * k / unit) * unit)
    return dataclasses.replace(config, n_neurons=n, rope_parts=None)


def line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """The least-squares line y = a + b x through (x, y) points: (a, b)."""
    x, y = torch.tensor(points, dtype=torch.float64).T
    b = ((x - x.mean()) * (y - y.mean())).sum() / ((x - x.mean()) ** 2).sum()
    return (y.mean() - b * x.mean()).item(), b.item()


def step_point(model: BDH, one: list[torch.Tensor], steps: int, rate=step_rate) -> dict:
    """One model's seconds a batch-1 step and the bytes the step must move (rate: bytes/s of it)."""
    return {
        "n_neurons": model.config.n_neurons,
        "bytes_per_byte": floor_bytes(model, one, False)["bytes_per_byte"],
        "seconds_a_step": 1 / rate(model, one, steps),
    }


def latency_fit(model: BDH, prompt: bytes, steps: int, rate=step_rate) -> dict:
    """The module docstring's fit over fresh models at WIDTHS (seed 0, the model's dtype), and the
    model's own point with the share of its step that the fit's fixed part is (rate: step_rate)."""
    dev, dtype = model.E.device, model.E.dtype
    one = prompts(prompt, 1, dev)
    points = []
    for k in WIDTHS:
        torch.manual_seed(0)
        fresh = BDH(width_config(model.config, k)).to(dev, dtype).eval()
        points.append(step_point(fresh, one, steps, rate))
    fixed, per_byte = line([(p["bytes_per_byte"], p["seconds_a_step"]) for p in points])
    own = step_point(model, one, steps, rate)
    own["fixed_share"] = fixed / own["seconds_a_step"]
    return {"points": points, "fixed_seconds_a_step": fixed, "bytes_per_s": 1 / per_byte, "model": own}
