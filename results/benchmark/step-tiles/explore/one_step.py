"""Four eager FusedSteps at the fastest tiles, for ncu: ncu-summary.txt. Ad-hoc, from the repository
root:

    python3 results/benchmark/step-tiles/explore/one_step.py

Ran at commit e77f3da; its attention tiles (BK, num_stages) left with 4dddd29, so
rerun it at that commit.
"""

import sys

import torch

sys.path.insert(0, ".")
import benchmark
from hub import load_model
from kernels import FusedStep

model, _ = load_model(".gpu/model")
model = model.cuda().to(torch.bfloat16).eval()
prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
byte = torch.tensor([101], device="cuda")
tiles = [
    {"BP": 32, "BK": 64, "BD": 64, "GROUP": 8, "num_warps": 2, "num_stages": 3},
    {"BN": 64, "BD": 128, "GROUP": 32, "num_warps": 2},
]
with torch.no_grad():
    _, _, s = model.forward_chunked(prompt, chunk_size=256)
    f = FusedStep(model, *tiles)
    for _ in range(4):
        f(byte, s)
    torch.cuda.synchronize()
