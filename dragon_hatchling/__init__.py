"""dragon-hatchling's library: the support code below the three scripts (model.py, experiment.py,
evaluate.py). Nothing here is run by users except the two tools `python -m dragon_hatchling.hub`
(push a run, convert a checkpoint) and `python -m dragon_hatchling.benchmark` (speed on a GPU).

    the models        architectures.py (BDH of model.py and gpt.py: what each offers), gpt.py
    fast forms        fused_parallel.py (training: BDH.forward in Triton), fused_recurrent.py
                      (generation: BDH.step in Triton), fused_common.py, paths.py (which forward runs),
                      sampling.py (generation)
    training          run_setup.py (flags, recipes, checks, data), run_folder.py (what a run writes),
                      stopping.py (signals, failures, resuming), distributed.py (torchrun)
    measuring         scoring.py (loss in windows, over a whole text, by position; sparsity),
                      measures.py (weight tails, the neuron graph), plots.py
    data and files    data.py (Wikitext-2, windows, epochs), corpora.py (any text dataset),
                      checkpoints.py, files.py (atomic writes), loading.py (every format), hub.py and
                      hub_client.py (the Hugging Face Hub), cli.py, devices.py
"""
