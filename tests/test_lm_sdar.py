"""SDAR (block-causal masked diffusion) in our own network and the block-causal process.

Pins, on ../shared/models/tiny-sdar (or, where ../shared is absent, dipod's tiny SDAR of the same sizes):
- on the default install: the snapshot loads into our network (no hub code); attention is block-causal
  (a later block never changes an earlier block's logits, a block sees itself bidirectionally); a
  left-padded row's logits equal the row alone; a batch decodes as its rows one at a time; the prompt's
  last block is completed before the next starts;
- where SDAR's hub code runs (transformers 4.52-4.53 with the CPU flash-attn stand-in of
  ../shared/models; e.g. a separate venv): our logits equal the hub code's to 1e-5 in float32, padded
  rows included, and our greedy block decoding is token-identical to the authors' block sampler
  (``block_diffusion_generate`` in SDAR's generate.py, re-implemented here from its description:
  prefill the prompt's whole blocks into the KV cache, then denoise one block at a time reading the
  cache, confidence-ordered unmasking, store the finished block).
"""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch

pytest.importorskip("transformers")

from block_models import HUB, has_hub, padded_batch, sdar_snapshot, transformers_in  # noqa: E402, F401
from hub_snapshots import MODELS  # noqa: E402

from dipod.config import ConfigError  # noqa: E402
from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.networks.transformer import block_causal_mask, row_positions  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

BLOCK = 4
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lm(sdar_snapshot):
    return load_masked_lm(sdar_snapshot)


def _batch(lm, seed: int = 0, width: int = 9, pads=(0, 2, 5)):
    return padded_batch(seed, width, pads, pad_id=lm.pad_id)


def test_loads_into_our_network_with_the_models_ids(lm):
    from dipod.lm.networks.checkpoint_model import CheckpointNetwork

    assert isinstance(lm.model, CheckpointNetwork) and lm.family.name == "sdar"
    assert lm.mask_id == lm.tokenizer.mask_token_id and lm.eos_id == lm.tokenizer.eos_token_id
    assert lm.model.spec.block_size == BLOCK


def test_attention_is_block_causal(lm):
    ids, attn = _batch(lm, pads=(0, 0, 0))
    with torch.no_grad():
        base = lm.logits(ids, attn)
        later = ids.clone()
        later[:, 8:] = (later[:, 8:] + 1) % 96  # the third block
        changed = lm.logits(later, attn)
        inside = ids.clone()
        inside[:, 7] = (inside[:, 7] + 1) % 96  # the last position of the second block
        changed_inside = lm.logits(inside, attn)
    assert torch.equal(changed[:, :8], base[:, :8])  # earlier blocks never see a later one
    assert not torch.allclose(changed[:, 8:], base[:, 8:])
    assert torch.equal(changed_inside[:, :4], base[:, :4])
    assert (changed_inside[:, 4:7] - base[:, 4:7]).abs().amax() > 1e-4  # a block sees itself both ways


def test_a_left_padded_row_computes_as_it_would_alone(lm):
    ids, attn = _batch(lm)
    with torch.no_grad():
        batch = lm.logits(ids, attn)
        for n in range(ids.shape[0]):
            real = attn[n].bool()
            alone = lm.logits(ids[n:n + 1, real], attn[n:n + 1, real])
            torch.testing.assert_close(batch[n:n + 1, real], alone, rtol=0, atol=1e-5)


@pytest.mark.parametrize("threshold", [None, 0.03])
def test_a_batch_decodes_as_its_rows_alone_and_completes_the_prompts_block_first(lm, threshold):
    ids, attn = _batch(lm, seed=1)
    settings = SamplerSettings(gen_length=8, block_length=BLOCK, steps=8, fill_after_eos=False,
                               confidence_threshold=threshold)
    out = decode(lm, ids, attn, settings)
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        alone = decode(lm, ids[n:n + 1, real], attn[n:n + 1, real], settings)
        assert torch.equal(alone.completion_bg, out.completion_bg[n:n + 1])
        # the masks completing the prompt's last block are revealed before any later position
        tail = (-int(real.sum())) % BLOCK
        if tail:
            assert int(alone.order_bg[0, :tail].max()) < int(alone.order_bg[0, tail:].min())


def test_block_length_other_than_the_models_is_refused(lm):
    ids, attn = _batch(lm)
    with pytest.raises(ConfigError, match="block_length=4"):
        decode(lm, ids, attn, SamplerSettings(gen_length=8, block_length=8, steps=8))


def test_estimators_that_read_mean_field_log_probs_are_refused(lm):
    from types import SimpleNamespace

    from dipod.lm.processes.registry import process_of

    with pytest.raises(ConfigError, match="mean-field"):
        process_of(lm).check_estimator(SimpleNamespace(estimator="d1"))
    for name in ("fpo", "fpo++", "spg"):
        process_of(lm).check_estimator(SimpleNamespace(estimator=name))


# --- against SDAR's own code (transformers 4.52-4.53 + the flash-attn stand-in) -------------------------------

def _hub_code_runs() -> bool:
    stand_in = MODELS / "flash_attn_cpu_stand_in.py"
    return (has_hub("sdar") and transformers_in((4, 52), (4, 54)) and stand_in.is_file()
            and importlib.util.find_spec("einops") is not None)


needs_hub_code = pytest.mark.skipif(not _hub_code_runs(), reason="SDAR's hub code (../shared/models/tiny-sdar) runs "
                                    "on transformers 4.52-4.53 with einops, triton and the flash-attn stand-in only")


@pytest.fixture(scope="module")
def hub():
    sys.path.insert(0, str(MODELS))
    import flash_attn_cpu_stand_in
    from transformers import AutoModelForCausalLM

    flash_attn_cpu_stand_in.activate()
    return AutoModelForCausalLM.from_pretrained(HUB["sdar"], trust_remote_code=True, torch_dtype=torch.float32).eval()


@needs_hub_code
def test_logits_equal_the_hub_codes_padding_included(lm, hub):
    ids, attn = _batch(lm, width=14, pads=(0, 3, 6))
    with torch.no_grad():
        theirs = hub(ids, attention_mask=block_causal_mask(attn, BLOCK), position_ids=row_positions(attn)).logits
        ours = lm.logits(ids, attn)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def reference_block_generate(hub, prompt_1p, mask_id: int, gen_length: int, steps: int, rule: str,
                             threshold: float = 0.85, top_k: int = 0):
    """The authors' block sampler, batch of one, deterministic: proposals are the argmax, their confidence
    the (top-k filtered) softmax probability. ``rule``: ``static`` (the ``k``-th step reveals the ``k``-th
    share of the block, most confident first) or ``dynamic`` (every mask above ``threshold``, or that share
    when fewer pass). Returns the ``gen_length`` tokens after the prompt."""
    from transformers.cache_utils import DynamicCache

    prompt_len = prompt_1p.shape[1]
    blocks = -(-(prompt_len + gen_length) // BLOCK)
    x = torch.full((1, blocks * BLOCK), mask_id, dtype=torch.long)
    x[:, :prompt_len] = prompt_1p
    visible = torch.ones(blocks, blocks).tril().repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[None]
    positions = torch.arange(blocks * BLOCK)[None]
    cache = DynamicCache()
    done = prompt_len // BLOCK
    share = [BLOCK // steps + (1 if i < BLOCK % steps else 0) for i in range(steps)]

    def run(lo: int, hi: int, store: bool):
        return hub(x[:, lo:hi], attention_mask=visible[:, lo:hi, :hi], position_ids=positions[:, lo:hi],
                   past_key_values=cache, use_cache=True, store_kv=store).logits

    with torch.no_grad():
        if done:
            run(0, done * BLOCK, True)
        for b in range(done, blocks):
            lo, hi = b * BLOCK, (b + 1) * BLOCK
            for step in range(steps + 1):
                masked = x[0, lo:hi] == mask_id
                if not masked.any():
                    run(lo, hi, True)
                    break
                logits = run(lo, hi, False)[0]
                if top_k:
                    kth = logits.topk(top_k, -1).values[..., -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = logits.softmax(-1)
                x0 = probs.argmax(-1)
                confidence = torch.where(masked, probs.gather(-1, x0[:, None])[:, 0], -torch.inf)
                high = confidence > threshold
                if rule == "dynamic" and int(high.sum()) >= share[step]:
                    reveal = high
                else:
                    reveal = torch.zeros_like(masked)
                    reveal[confidence.topk(share[step]).indices] = True
                x[0, lo:hi] = torch.where(reveal, x0, x[0, lo:hi])
    return x[:, prompt_len:prompt_len + gen_length]


@needs_hub_code
@pytest.mark.parametrize("case", [
    dict(rule="static", ours={}),
    dict(rule="dynamic", threshold=0.03, ours={"confidence_threshold": 0.03}),
    # the authors' "greedy" (temperature 1, top_k 1): every filtered confidence is 1, a block in one step
    dict(rule="dynamic", top_k=1, ours={"confidence_threshold": 0.85, "top_k": 1}),
])
def test_greedy_block_decoding_is_token_identical_to_the_authors_sampler(lm, hub, case):
    ids, attn = _batch(lm, seed=2, width=10, pads=(0, 1, 3))
    settings = SamplerSettings(gen_length=8, block_length=BLOCK, steps=8, fill_after_eos=False,
                               remasking="low_confidence", **case["ours"])
    ours = decode(lm, ids, attn, settings).completion_bg
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        theirs = reference_block_generate(hub, ids[n:n + 1, real], lm.mask_id, 8, steps=BLOCK, rule=case["rule"],
                                          threshold=case.get("threshold", 0.85), top_k=case.get("top_k", 0))
        assert torch.equal(ours[n:n + 1], theirs)


@pytest.mark.parametrize("estimator,extra,reads", [("fpo", [], ("elbo",)),
                                                   ("spg", ["--spg_negative_proxy", "mix"], ("elbo", "eubo"))])
@pytest.mark.parametrize("dipod_beta", [0.05, 0.0])
def test_rl_with_and_without_dipod_trains_a_block_causal_model(sdar_snapshot, tmp_path, estimator, extra, reads,
                                                               dipod_beta):
    import math

    from rl_smoke import smoke_flags

    from dipod.lm.trainer import main
    from dipod.runlog import read_metrics

    flags = smoke_flags(sdar_snapshot, tmp_path, estimator, *extra, block_length=BLOCK, diffusion_steps=16,
                        dipod_beta=dipod_beta)
    assert main(flags) == 0
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in (*reads, "loss", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
        assert row["skipped_updates"] == 0.0 and ("dipod_loss" in row) == (dipod_beta > 0)
        # without DiPOD a step whose groups all earned equal rewards (a random model) has no gradient at all
        assert (row["grad_norm"] > 0) == (dipod_beta > 0 or row["frac_reward_zero_std"] < 1)
