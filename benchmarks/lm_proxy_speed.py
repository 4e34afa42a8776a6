"""Speed of dipod.lm.proxies.compute_proxies (K draws in one batched forward) against a per-draw,
per-row Python loop computing the same values, on the built-in tiny model.

    python benchmarks/lm_proxy_speed.py [--batch 16] [--prompt-len 48] [--gen-length 64] [--draws 4]
                                        [--masking random] [--repeats 5] [--backward] [--json OUT]

Both paths use the same masks (dipod.lm.proxies.draw_masks with the same seed); the script
asserts that they give the same ELBO, EUBO and mean-field values before timing, then prints the
median wall time of each and the ratio loop / batched.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time

import torch

from dipod.lm.model import build_tiny_model, load_masked_lm
from dipod.lm.proxies import ProxySettings, compute_proxies, draw_masks, eubo_surrogate, live_mask


def loop_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings: ProxySettings, seed: int):
    """The same proxies, one forward per (sequence, draw): the straightforward implementation."""
    batch, gen_length = completion_ids.shape
    mask_nl = live_mask(completion_ids, lm.eos_id, settings)
    draw = draw_masks(prompt_attn, mask_nl, settings, torch.Generator().manual_seed(seed))
    logp_rows, elbo_rows, meanfield_rows = [], [], []
    for n in range(batch):
        logp_k, elbo_k = [], []
        for k in range(settings.num_draws + 1):  # draw K is the mean-field copy
            completion = completion_ids[n].clone()
            completion[draw.masked_nkl[n, k] if k < settings.num_draws else slice(None)] = lm.mask_id
            prompt = prompt_ids[n].masked_fill(draw.prompt_masked_ncp[n, k], lm.mask_id)
            ids = torch.cat([prompt, completion])[None]
            attn = torch.cat([prompt_attn[n], torch.ones(gen_length, dtype=prompt_attn.dtype)])[None]
            logits = lm.logits(ids, attn)[0, prompt_ids.shape[1]:]
            logp = logits.log_softmax(-1).gather(-1, completion_ids[n][:, None]).squeeze(-1)
            if k == settings.num_draws:
                meanfield_rows.append(logp)
                continue
            elbo_k.append(draw.weight_nk[n, k] * logp[draw.scored_nkl[n, k]].sum())
            logp_k.append(logp)
        logp_rows.append(torch.stack(logp_k))
        elbo_rows.append(torch.stack(elbo_k))
    return {"elbo_nk": torch.stack(elbo_rows),
            "eubo_n": eubo_surrogate(torch.stack(logp_rows), draw.scored_nkl, draw.weight_nk, settings.eubo_beta,
                                     mask_nl.sum(1)),
            "meanfield_logp_nl": torch.stack(meanfield_rows)}


def batched_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings: ProxySettings, seed: int):
    out = compute_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, meanfield=True)
    return {"elbo_nk": out.elbo_nk, "eubo_n": out.eubo_n, "meanfield_logp_nl": out.meanfield_logp_nl}


def timed(fn, repeats: int, backward: bool) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        if backward:
            values = fn()
            (values["elbo_nk"].sum() + values["eubo_n"].sum() + values["meanfield_logp_nl"].sum()).backward()
        else:
            with torch.no_grad():
                fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--gen-length", type=int, default=64)
    parser.add_argument("--draws", type=int, default=4)
    parser.add_argument("--masking", default="random", choices=["random", "block_random"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--backward", action="store_true", help="time forward + backward instead of no-grad")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        lm = load_masked_lm(build_tiny_model(f"{tmp}/tiny"))  # default tiny sizes
    lm.model.eval()
    g = torch.Generator().manual_seed(0)
    vocab = len(lm.tokenizer)
    prompt_ids = torch.randint(4, vocab, (args.batch, args.prompt_len), generator=g)
    prompt_lengths = torch.randint(args.prompt_len // 2, args.prompt_len + 1, (args.batch,), generator=g)
    prompt_attn = (torch.arange(args.prompt_len)[None] >= args.prompt_len - prompt_lengths[:, None]).long()
    prompt_ids = prompt_ids.masked_fill(prompt_attn == 0, lm.pad_id)  # left padding
    completion_ids = torch.randint(4, vocab, (args.batch, args.gen_length), generator=g)
    eos_at = torch.randint(args.gen_length // 2, args.gen_length + 8, (args.batch,), generator=g)
    completion_ids = completion_ids.masked_fill(torch.arange(args.gen_length)[None] >= eos_at[:, None], lm.eos_id)
    settings = ProxySettings(num_draws=args.draws, masking=args.masking, p_mask_prompt=0.15)

    def run_loop():
        return loop_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed=1)

    def run_batched():
        return batched_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed=1)

    with torch.no_grad():
        reference, fast = run_loop(), run_batched()
    for name in reference:
        if not torch.allclose(reference[name], fast[name], rtol=1e-4, atol=1e-4):
            raise AssertionError(f"{name}: batched and loop values differ by "
                                 f"{(reference[name] - fast[name]).abs().max():.3g}")
    loop_s = timed(run_loop, args.repeats, args.backward)
    batched_s = timed(run_batched, args.repeats, args.backward)
    result = {"batch": args.batch, "prompt_len": args.prompt_len, "gen_length": args.gen_length,
              "draws": args.draws, "masking": args.masking, "backward": args.backward,
              "torch_threads": torch.get_num_threads(), "loop_s": loop_s, "batched_s": batched_s,
              "speedup": loop_s / batched_s}
    mode = "forward+backward" if args.backward else "no-grad forward"
    print(f"proxies ({mode}), B={args.batch}, P={args.prompt_len}, G={args.gen_length}, K={args.draws} "
          f"+ mean-field, {args.masking}: loop {loop_s:.3f} s, batched {batched_s:.3f} s, "
          f"speedup {loop_s / batched_s:.1f}x (values equal)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
