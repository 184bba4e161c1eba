"""The synthesis-shaped decoding workload (`decoding_bench.py --workload mixed`): rows of mixed
lengths that stop at their own stop tokens, the HF way (batch after batch) against ours (refills)."""

from __future__ import annotations

import time

import torch

from decoding_models import AmateurContrast, check_levers_compiled, prompts, sync  # bench/, beside this script
from distill.decoding.engine import ContrastiveDecoder, DecodingConfig, Request


def stop_ids(args) -> list[int]:
    return list(range(3, 3 + max(1, round(args.vocab / args.mean_length))))


def run_hf_mixed(expert, amateur, batch, args):
    """The usual way for a synthesis run: generate + contrastive processor, batch after batch."""
    from transformers import LogitsProcessorList

    ids = prompts(args.rows, args.prompt_len, args.vocab, 1).to(args.device)
    stops, generated = stop_ids(args), 0
    sync(args.device)
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(0, args.rows, batch):
            chunk = ids[i:i + batch]
            mask = torch.ones_like(chunk)
            out = expert.generate(input_ids=chunk, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0,
                                  top_p=1.0, max_new_tokens=args.new_tokens, eos_token_id=stops, pad_token_id=0,
                                  logits_processor=LogitsProcessorList([AmateurContrast(amateur, mask)]))
            new = out[:, chunk.shape[1]:]
            is_stop = torch.isin(new, torch.tensor(stops, device=new.device))
            # a row's tokens: up to and including its first stop (generate pads after it)
            first = torch.where(is_stop.any(1), is_stop.float().argmax(1) + 1, new.shape[1])
            generated += int(first.sum())
    sync(args.device)
    seconds = time.perf_counter() - start
    return generated / seconds, seconds, 0.0


def run_ours_mixed(expert, amateur, batch, args, engine, refill_min, attention="sdpa"):
    """Continuous batching over --rows prompts. Besides the whole run, the throughput until the
    queue runs dry: after that the batch drains (the last long rows run almost alone), a
    one-off cost per dataset that dominates a short benchmark but not a 50k-prompt synthesis."""
    ids = prompts(args.rows, args.prompt_len, args.vocab, 1).tolist()
    cfg = DecodingConfig(alpha=0.01, beta=1.0, temperature=1.0, max_new_tokens=args.new_tokens, batch_size=batch,
                         engine=engine, cuda_graphs=not args.no_cuda_graphs, check_every=args.check_every,
                         refill_min=refill_min, compile_layers=args.compile_layers,
                         decode_attention=attention)
    dec = ContrastiveDecoder(expert, amateur, args.vocab, stop_ids(args), cfg)
    sync(args.device)
    start = time.perf_counter()
    finished, dry = 0, None
    for i, r in enumerate(dec.generate([Request(str(i), p, i) for i, p in enumerate(ids)])):
        finished += len(r.tokens)
        if dry is None and i + 1 == args.rows - batch:  # the last prompt is admitted right after this
            # tokens of rows still generating (one sync); rows that finished in this same check but
            # are yielded after this one count in neither, so the figure is a slight underestimate
            in_flight = int((dec.n * dec.active).sum())
            dry = (finished + in_flight, time.perf_counter() - start - dec.setup_seconds)
    sync(args.device)
    seconds = time.perf_counter() - start - dec.setup_seconds
    if dec.batch < batch:
        raise MemoryError(f"the engine capped the batch at {dec.batch} rows (GPU memory)")
    check_levers_compiled()
    extra = {"until_dry_tokens_per_s": round(dry[0] / dry[1], 1), "until_dry_share_of_time": round(dry[1] / seconds, 3)} if dry else {}
    return finished / seconds, seconds, dec.setup_seconds, extra
