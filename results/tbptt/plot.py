"""The table and the figure of results/tbptt/README.md, from the runs' own metrics files (and the
long-context row's, in results/long-context/runs/default).

uv run python results/tbptt/plot.py     # prints the table, writes loss_by_position.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository
from dragon_hatchling.cli import Parser  # noqa: E402
from dragon_hatchling.plots import bucket_middles, plt, save  # noqa: E402 (matplotlib off screen, atomic writes)

HERE = Path(__file__).parent
RUNS = {  # name: its folder
    "long-context": HERE.parent / "long-context" / "runs" / "default",
    "tbptt-2048": HERE / "runs" / "tbptt-2048",
    "tbptt-512": HERE / "runs" / "tbptt-512",
    "gptxl": HERE / "runs" / "gptxl",
    "tbptt-512-reset": HERE / "runs" / "tbptt-512-reset",  # round 2: the RoPE fix, resets at articles
    "tbptt-512-recipe-lives": HERE / "runs" / "tbptt-512-recipe-lives",
    "lc-2048-lives": HERE / "runs" / "lc-2048-lives",  # round 2: not carried, longer windows and lives
    "lc-1024-lives": HERE / "runs" / "lc-1024-lives",
    "tbptt-512-shuffled": HERE / "runs" / "tbptt-512-shuffled",  # round 3: articles shuffled each epoch
    "lc-1024-lr2e-3": HERE / "runs" / "lc-1024-lr2e-3",  # round 3: lc-1024-lives at twice the peak lr
    "tbptt-512-shuffled-long-lr2e-3": HERE / "runs" / "tbptt-512-shuffled-long-lr2e-3",  # round 4: both gains
    "lc-1024-lr3e-3": HERE / "runs" / "lc-1024-lr3e-3",  # round 5: lc-1024-lr2e-3 at 3e-3
    "lc-1024-h8": HERE / "runs" / "lc-1024-h8",  # round 6: lc-1024-lr2e-3 with 8 heads, half-lives 8-8,192
    "lc-1024-learned": HERE / "runs" / "lc-1024-learned",  # round 7: lc-1024-lr2e-3, half-lives learned
    "lc-1024-learned-nodrop": HERE / "runs" / "lc-1024-learned-nodrop",  # and without dropout
    "lc-1024-learned-copy": HERE / "runs" / "lc-1024-learned-copy",  # round 9: a span copied a window
    "lc-2048-learned-copy": HERE / "runs" / "lc-2048-learned-copy",  # and in 2 x 2,048-byte windows
    "lc-1024-learned-copy-fill": HERE / "runs" / "lc-1024-learned-copy-fill",  # round 10: <unk> filled
    "gptxl-r11": HERE / "runs" / "gptxl-r11",  # round 11: gptxl again, alone, for its byte losses
    "lc-1024-learned-copy-shift2": HERE / "runs" / "lc-1024-learned-copy-shift2",  # and 2 heads shifted
    "lc-2048-learned-copy-shift2": HERE / "runs" / "lc-2048-learned-copy-shift2",  # round 12: 2 x 2,048
    "lc-2048-learned-copy-shift2-seed2": HERE / "runs" / "lc-2048-learned-copy-shift2-seed2",  # seed 2
}
SHARED = {
    "tbptt-2048": 3,
    "tbptt-512": 3,
    "gptxl": 3,
    "tbptt-512-reset": 2,
    "tbptt-512-recipe-lives": 2,
}  # runs a GPU
BUCKETS = ["256-511", "512-1023", "1024-2047", "2048-4095"]
LONG = ["4096-8191", "8192-16383"]


def metrics(run: str, folder: str = "") -> dict | None:
    path = RUNS[run] / folder / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else None


def recipe(run: str) -> str:
    m = metrics(run)
    args, shape = m["args"], f"{m['args']['batch_size']} x {m['args']['seq_len']}"
    if m.get("arch") == "gpt":
        return f"GPT, {shape}, memory {args['memory']}, ALiBi"
    lives = ", ".join(f"{t:g}" for t in args["half_lives"]) if args["half_lives"] else "none"
    carried = ", carried" + (f", reset at each {args['reset_state']}" if args.get("reset_state") else "")
    carried += ", articles shuffled" if args.get("article_order") == "shuffled" else ""
    rest = f", lr {args['lr']:g}" if args["lr"] != 1e-3 else ""  # and every other flag that differs
    heads = f", {args['n_head']} heads" if args.get("n_head", 4) != 4 else ""
    lives += " (learned from there)" if args.get("learn_decay") else ""
    rest += f", seed {args['seed']}" if args.get("seed", 1337) != 1337 else ""
    rest += ", dropout 0" if args.get("dropout") == 0 else ""
    rest += f", copy spans in {args['copy_spans']:.0%} of windows" if args.get("copy_spans") else ""
    rest += ", unknowns filled" if args.get("fill_unk") else ""
    rest += f", the last {args['shifted_heads']} heads shifted" if args.get("shifted_heads") else ""
    return f"BDH, {shape}{heads}, half-lives {lives}" + (carried if args.get("carry_state") else "") + rest


def loss(run: str, folder: str) -> str:
    m = metrics(run, folder)
    return "-" if m is None else f"{m['loss']:.4f}"


def rise(by_position: dict | None) -> str:
    """2048-4095 minus 256-511: below zero where the loss falls with context."""
    return "-" if by_position is None else f"{by_position['2048-4095'] - by_position['256-511']:+.4f}"


def speed(run: str) -> str:
    """Training bytes/s and the card, with how many runs shared it (rounds 1 and 2)."""
    m = metrics(run)
    card = "H100" if "H100" in m["device"] else "H200" if "H200" in m["device"] else m["device"]
    shared = f", 1 of {SHARED[run]} runs on it" if run in SHARED else ""
    return f"{m['bytes_per_s'] / 1000:.0f}k ({card}{shared})"


def row(run: str) -> list[str]:
    m = metrics(run)
    w4096 = (metrics(run, "eval-valid-raw-4096") or {}).get("loss_by_position")
    shifted = (metrics(run, "eval-valid-raw-4096-shifted") or {}).get("loss_by_position")
    w16k = (metrics(run, "eval-valid-raw-16384") or {}).get("loss_by_position", {})
    return [
        f"`{run}`",
        recipe(run),
        f"{m['steps']:,} of {m['total_steps']:,}",
        speed(run),
        loss(run, "eval-valid-raw-128"),
        loss(run, "eval-valid-raw-stream"),
        loss(run, "eval-valid-tokens-128"),
        loss(run, "eval-valid-tokens-stream"),
        *(f"{w4096[b]:.4f}" if w4096 else "-" for b in BUCKETS),
        rise(w4096),
        rise(shifted),
        *(f"{w16k[b]:.4f}" if b in w16k else "-" for b in LONG),
    ]


def table() -> str:
    head = ["run", "recipe", "steps", "bytes/s", "raw 128", "raw whole", "tokens 128", "tokens whole",
            *BUCKETS, "2048-4095 minus 256-511", "shifted", *(f"16k: {b}" for b in LONG)]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * (len(head) - 3)]
    return "\n".join(lines + ["| " + " | ".join(row(run)) + " |" for run in RUNS])


def colour(i: int) -> tuple:
    """The i-th run's colour: 40 runs before one repeats."""
    return plt.cm.tab20(i) if i < 20 else plt.cm.tab20b(i - 20)


def plot(path: Path) -> None:
    fig, ax = plt.subplot_mosaic("abc;kkk", figsize=(15, 6.5), height_ratios=(3, 1))  # k: the legend
    axes = [ax["a"], ax["b"], ax["c"]]
    for panel, folder, title in (
        (axes[0], "eval-valid-raw-4096", "4,096-byte windows"),
        (axes[1], "eval-valid-raw-4096-shifted", "4,096-byte windows, --shifts 16 (same text per bucket)"),
        (axes[2], "eval-valid-raw-16384", "16,384-byte windows"),
    ):
        for i, run in enumerate(RUNS):
            m = metrics(run, folder)
            if m is None:  # a run not scored so (shifts came in round 3; long-context has no 16 KB)
                continue
            middles, losses = bucket_middles(m["loss_by_position"])
            panel.plot(middles, losses, "o-", ms=3, color=colour(i), label=run)  # the recipe: the table
        panel.set_xscale("log")
        panel.set(title=title, xlabel="position in the window (bytes)", ylim=(1.0, 1.45))
        panel.title.set_fontsize(9)
        panel.grid(alpha=0.3, which="both")
    axes[0].set(ylabel="loss on wiki.valid.raw (nats/byte)")
    ax["k"].axis("off")
    handles = {  # every run once, whichever panels it has
        label: h for panel in axes for h, label in zip(*panel.get_legend_handles_labels(), strict=True)
    }
    ax["k"].legend(handles.values(), handles.keys(), loc="center", ncol=4, fontsize=8)
    fig.suptitle(
        "Reference budget of wiki.train.tokens (round 1's tbptt-2048 and tbptt-512 cut at 88-89%); "
        "one H200 (rounds 5, 6 and 9-13: one H100)",
        fontsize=10,
    )
    save(fig, path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    Parser(description=__doc__).parse_args(argv)  # no flags: --help prints the docstring, others are refused
    print(table())


if __name__ == "__main__":
    main()
    plot(HERE / "loss_by_position.png")
