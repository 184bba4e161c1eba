"""The decoding benchmarks' models: the published configs' shapes and quirks (hard-coded: nothing is
downloaded), random-initialised on the device, and the timing helpers the benchmarks share."""

from __future__ import annotations

import gc

import torch

from distill.decoding.eager import _cache_kwarg
from distill.decoding.step import contrastive_scores


# The published configs' shapes and quirks (hard-coded: nothing is downloaded), random-initialised.
_LLAMA31_ROPE = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                 "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
CONFIGS = {
    "mistral-7b": dict(arch="mistral", vocab_size=32768, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336),  # Mistral-7B-v0.3 (no sliding window)
    "llama3.1-8b": dict(arch="llama", vocab_size=128256, hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=14336, rms_norm_eps=1e-5,
                        max_position_embeddings=131072, rope_parameters=_LLAMA31_ROPE),
    "qwen3-8b": dict(arch="qwen3", vocab_size=151936, hidden_size=4096, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, intermediate_size=12288, rms_norm_eps=1e-6,
                     max_position_embeddings=40960, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "tiny": dict(arch="mistral", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, intermediate_size=128),
    # the same families' quirks at tiny sizes: a CPU smoke run of --compare-configs
    "tiny-llama3.1": dict(arch="llama", vocab_size=512, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=128, max_position_embeddings=131072,
                          rope_parameters=_LLAMA31_ROPE),
    "tiny-qwen3": dict(arch="qwen3", vocab_size=512, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=32, intermediate_size=96,
                       rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}


def build_model(name: str, device: str, dtype, seed: int):
    import transformers
    from transformers import AutoModelForCausalLM

    spec = dict(CONFIGS[name])
    cls = {"mistral": "MistralConfig", "llama": "LlamaConfig", "qwen3": "Qwen3Config"}[spec.pop("arch")]
    extra = {"sliding_window": None} if cls == "MistralConfig" else {}
    spec.setdefault("max_position_embeddings", 4096)
    cfg = getattr(transformers, cls)(**spec, **extra, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                                     pad_token_id=0)
    try:  # skip HF's weight init: ours below is one normal_ per tensor, on the device
        from transformers.initialization import no_init_weights
    except ImportError:
        from contextlib import nullcontext as no_init_weights
    with torch.device(device), no_init_weights():
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    torch.manual_seed(seed)
    with torch.no_grad():  # our own quick init on the device (same for every model)
        for name_, p in model.named_parameters():
            if name_.endswith("norm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02)
    model.eval()
    model.generation_config.eos_token_id = None  # EOS ignored: every row runs to --new-tokens
    model.generation_config.pad_token_id = 0
    return model


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_gib(device):
    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else float("nan")


def reset_peak(device):
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def prompts(batch, length, vocab, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (batch, length), generator=g)


def weight_bytes_per_step(model) -> int:
    """Bytes of weights one decode step reads: every parameter once, except the input embedding
    table, of which a step gathers only the batch's rows (tied to the LM head, it is read whole)."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())  # shared parameters once
    emb, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    if emb is not head:  # HF ties by sharing the Parameter
        total -= emb.numel() * emb.element_size()
    return total


class AmateurContrast:
    """The usual way: a LogitsProcessor that runs the amateur with its own DynamicCache."""

    def __init__(self, amateur, attention_mask, alpha=0.01, beta=1.0):
        from transformers import DynamicCache

        self.amateur, self.alpha, self.beta = amateur, alpha, beta
        self.mask = attention_mask
        self.cache = DynamicCache()
        self.seen = 0

    @torch.no_grad()
    def __call__(self, input_ids, scores):
        new = input_ids[:, self.seen:]
        if self.seen:
            self.mask = torch.cat([self.mask, self.mask.new_ones(new.shape)], dim=1)
        positions = (self.mask.cumsum(-1) - 1).clamp(min=0)[:, -new.shape[1]:]
        out = self.amateur(input_ids=new, attention_mask=self.mask, position_ids=positions,
                           use_cache=True, logits_to_keep=1, **{_cache_kwarg(self.amateur): self.cache})
        self.seen = input_ids.shape[1]
        return contrastive_scores(scores, out.logits[:, -1], self.alpha, self.beta)


def check_levers_compiled():
    """A line whose compiled levers fell back to eager kernels would measure something else: fail it."""
    from distill.decoding.compiled import fell_back_to_eager

    if fell_back_to_eager():
        raise RuntimeError(f"torch.compile fell back to eager for {', '.join(fell_back_to_eager())} "
                           "(see the warning above)")
