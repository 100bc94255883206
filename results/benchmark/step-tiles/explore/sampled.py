"""Sampled generation (temperature 1, top-k 40) before and after the sampling moved into the CUDA
graph: generate() of commit 28eaf3e (torch.multinomial outside the graph, which waits for the GPU
every byte) against the working tree's, alternating three times in one run, on the trained model.
Ad-hoc, from the repository root:

    git show 28eaf3e:model.py > .gpu/model_28eaf3e.py
    python3 results/benchmark/step-tiles/explore/sampled.py .gpu/model_28eaf3e.py
"""

import sys
import time

import torch

sys.path.insert(0, "results/benchmark")
sys.path.insert(0, ".")
import step_tiles  # noqa: E402

import benchmark  # noqa: E402
from hub import load_model  # noqa: E402

before = step_tiles.module_from_file(sys.argv[1], "model_before")
model, _ = load_model(".gpu/model")
model = model.cuda().to(torch.bfloat16).eval()
prompt = torch.tensor([list(benchmark.PROMPT)], device="cuda")
runs = {
    "before (28eaf3e)": lambda *a, **k: before.BDH.generate(model, *a, **k),
    "working tree": model.generate,
}
for _ in range(3):
    for name, generate in runs.items():
        generate(prompt, 8, temperature=1.0, top_k=40)  # warm up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(prompt, 1000, 1.0, 40, torch.Generator("cuda").manual_seed(0))
        torch.cuda.synchronize()
        print(f"{name}: {time.perf_counter() - t0:.3f} s for 1,000 sampled bytes", flush=True)
print(bytes(out[0, prompt.shape[1] :].tolist()).decode("utf-8", "replace")[:300])
