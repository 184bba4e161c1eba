"""Text space: contrastive decoding.

    step.py      the CoDIT step: one pure function, plausibility mask and contrast (read this first)
    engine.py    DecodingConfig and ContrastiveDecoder: batching, refill, stop sets, seeds
    eager.py     the Hugging Face engine (any architecture)
    fast.py      the static-cache / CUDA-graph engine; families.py its model families,
                 layers.py and flex.py its attention and per-layer kernels, compiled.py torch.compile
    pair.py      what an expert/amateur pair must share, and the rules for what may differ
"""

CODIT_ALPHA = 0.01  # the plausibility threshold of the paper and the public CoDIT code
