"""Step time for attention tiles BP x BD x warps (the two-kernel step before its gate rewrite):
earlier/5-two-kernels-attention-bd.log. Ad-hoc, from the repository root:

    python3 results/benchmark/step-tiles/explore/attention_bd.py
"""

import itertools
import sys

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles

import benchmark
from hub import load_model
from kernels import FusedStep

model, _ = load_model(".gpu/model")
model = model.cuda().to(torch.bfloat16).eval()
prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
byte = torch.tensor([101], device="cuda")
with torch.no_grad():
    _, _, s0 = model.forward_chunked(prompt, chunk_size=256)
    ref = model.step(byte, s0.clone()).float()
    for bp, bd, w in itertools.product([32, 64], [32, 64, 128, 256], [4, 8]):
        if bp * bd > 64 * 128 and w == 4:
            continue
        att = {**FusedStep.ATTENTION_TILES, "BP": bp, "BD": bd, "num_warps": w}
        try:
            ms, err = step_tiles.ms_per_step(model, s0, byte, FusedStep(model, att, None), ref)
            print(f"{ms:.3f} ms err {err:.1e} {att}", flush=True)
        except Exception as e:
            print("failed", att, str(e)[:200], flush=True)
