"""Can the architecture learn to copy? A synthetic probe on the CPU, small models, minutes.

Each window is a random string of lowercase letters, a "|", the same string again and a newline.
Nothing predicts the first copy (ln 26 = 3.26 nats a letter); the second is free to a model that
copies what it has read. Each model trains on fresh windows (AdamW, the same steps and seed for
all) and is scored every --eval_every steps on the same held-out windows: its loss on the second
copy's letters after the first (the first letter of a copy is as free as the rest once "|" is seen,
but is left out as rare_words.py's copy_pairs leaves it out). BDH with and without decay, against a
GPT of about the same size.

    uv run python results/tbptt/copy_probe.py --out results/tbptt/copy_probe.json
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: model.py

from dragon_hatchling.cli import Parser, UsageError, out_file, positive_float, positive_int, run_command  # noqa: E402
from dragon_hatchling.gpt import GPT, GPTConfig  # noqa: E402
from model import BDH, BDHConfig  # noqa: E402

LETTERS = torch.tensor(list(b"abcdefghijklmnopqrstuvwxyz"))
NAMES = ("bdh", "bdh-decay", "gpt")  # models()'s keys


def models(d: int, block: int) -> dict[str, torch.nn.Module]:
    """The contenders, each of about 0.2M parameters at d = 64 (no dropout: the task has none to fear)."""
    bdh = dict(n_embd=d, n_head=4, n_neurons=16 * d, n_layer=4, dropout=0.0)
    return {
        "bdh": BDH(BDHConfig(**bdh)),
        "bdh-decay": BDH(BDHConfig(**bdh, half_lives=[8.0, 32.0, 128.0, 256.0])),
        "gpt": GPT(GPTConfig(n_layer=4, n_embd=d, n_head=4, block_size=block, dropout=0.0)),
    }


def windows(n: int, length: int, g: torch.Generator) -> torch.Tensor:
    """n windows (n, 2 length + 2): a random string, "|", the string again, a newline."""
    s = LETTERS[torch.randint(0, 26, (n, length), generator=g)]
    bar, nl = torch.full((n, 1), ord("|")), torch.full((n, 1), ord("\n"))
    return torch.cat([s, bar, s, nl], dim=1)


def copy_loss(model: torch.nn.Module, w: torch.Tensor, length: int) -> tuple[float, float]:
    """The mean loss (nats) on the first string's letters after its first, and on the copy's."""
    logits = model(w[:, :-1])[0]  # R, T - 1, V: position i predicts byte i + 1
    losses = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="none").view(w.shape[0], -1)
    first = losses[:, : length - 1]  # bytes 1 .. length - 1
    copy = losses[:, length + 1 : 2 * length]  # bytes length + 2 .. 2 length: the copy after its first
    return first.mean().item(), copy.mean().item()


def train(name: str, model: torch.nn.Module, args, held_out: torch.Tensor) -> list[dict]:
    """Trains on fresh windows; the held-out losses every --eval_every steps."""
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    curve, t0 = [], time.time()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0 or step == args.steps:  # score before each block of steps
            model.eval()
            with torch.no_grad():
                first, copy = copy_loss(model, held_out, args.length)
            curve.append({"step": step, "first": first, "copy": copy, "s": round(time.time() - t0, 1)})
            print(f"{name:10s} step {step:5d}  first {first:.3f}  copy {copy:.3f}", flush=True)
            model.train()
        if step == args.steps:
            break
        w = windows(args.batch_size, args.length, g)
        loss = F.cross_entropy(model(w[:, :-1])[0].flatten(0, 1), w[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return curve


LIMITS = {"length": 256, "batch_size": 256, "n_embd": 512}  # a probe for a CPU, not a training run


def check_sizes(args) -> None:
    """A UsageError naming the flag for sizes a CPU probe should not take (memory grows with batch x
    window^2), or a d the models' 4 heads do not divide."""
    for name, most in LIMITS.items():
        if getattr(args, name) > most:
            raise UsageError(f"--{name}: expected at most {most}, got {getattr(args, name)}")
    if args.n_embd % 4:
        raise UsageError(f"--n_embd: expected a multiple of 4 (the models' heads), got {args.n_embd}")


def main(argv: list[str] | None = None) -> None:
    """The command: one-line errors (exit 2) for bad flags."""
    run_command(run, argv, errors=(UsageError, ValueError))


def run(argv: list[str] | None) -> None:
    """Parse the flags, then train, score and write."""
    p = Parser(description=__doc__)
    p.add_argument("--steps", type=positive_int, default=3000, help="training steps of each model")
    p.add_argument("--batch_size", type=positive_int, default=32, help="windows a step")
    p.add_argument("--length", type=positive_int, default=12, help="letters of each random string")
    p.add_argument("--n_embd", type=positive_int, default=64, help="d of every model")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="AdamW's learning rate (constant)")
    p.add_argument("--eval_every", type=positive_int, default=500, help="steps between scorings")
    p.add_argument("--seed", type=positive_int, default=1, help="the windows' and the models' seed")
    p.add_argument("--only", choices=NAMES, default=None, help="one model alone")
    p.add_argument("--out", type=out_file, default=None, help="write the curves here as JSON")
    args = p.parse_args(argv)
    check_sizes(args)
    held_out = windows(256, args.length, torch.Generator().manual_seed(10**6 + args.seed))
    torch.manual_seed(args.seed)
    contenders = models(args.n_embd, 2 * args.length + 1)
    result = {"args": vars(args), "chance": math.log(26), "models": {}}
    for name, model in contenders.items():
        if args.only in (None, name):
            params = sum(p.numel() for p in model.parameters())
            result["models"][name] = {"params": params, "curve": train(name, model, args, held_out)}
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
