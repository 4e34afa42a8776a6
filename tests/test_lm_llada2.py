"""LLaDA2.x (mixture of experts, block-causal) in our own network (dipod.lm.networks.llada2 / moe).

Pins, on ../shared/models/tiny-llada2-moe (or, where ../shared is absent, dipod's tiny LLaDA2 of the same
sizes; layer 0 dense, layer 1 MoE: 8 experts in 4 groups, 2 groups
kept, top-2, a shared expert):
- on the default install: the routing as the model does it, recomputed by hand from the checkpoint's
  router weight and expert bias for one token (group scores = sum of the two best biased scores, best
  groups kept, top-k inside them, weights = unbiased sigmoid scores normalised, times the scaling
  factor, plus the shared expert); LoRA reaches attention, dense MLP and expert projections; a
  left-padded row computes as alone; a batch decodes as its rows alone;
- where the hub code runs (transformers 4.54-4.57): logits equal the hub code's to 1e-5 in float32,
  padded rows included, and decoding is token-identical to the model's own ``generate`` in its
  deterministic setting (``top_k=1``: every confidence is 1, so a block is revealed at once).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from block_models import HUB, has_hub, llada2_snapshot, padded_batch, transformers_in  # noqa: E402, F401

from dipod.lm.model import LoraSettings, load_masked_lm  # noqa: E402
from dipod.lm.networks.transformer import block_causal_mask, row_positions  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

BLOCK = 32
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lm(llada2_snapshot):
    return load_masked_lm(llada2_snapshot)


def _batch(lm, seed: int, width: int, pads: tuple[int, ...]):
    return padded_batch(seed, width, pads, pad_id=lm.pad_id)


def test_routing_follows_the_models_rule_by_hand(lm, llada2_snapshot):
    from safetensors.torch import load_file

    weights = load_file(str(llada2_snapshot / "model.safetensors"))
    moe = lm.model.layers[1].moe
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(0))
    scores = torch.sigmoid(x @ weights["model.layers.1.mlp.gate.weight"].T)[0]
    biased = scores + weights["model.layers.1.mlp.gate.expert_bias"]
    group_score = [sorted(biased[2 * g:2 * g + 2].tolist())[-1] + sorted(biased[2 * g:2 * g + 2].tolist())[-2]
                   for g in range(4)]
    kept = sorted(range(4), key=lambda g: -group_score[g])[:2]
    candidates = [e for e in range(8) if e // 2 in kept]
    chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:2]
    weight = {e: 2.5 * float(scores[e]) / sum(float(scores[c]) for c in chosen) for e in chosen}
    expected = sum(w * moe.experts[e](x) for e, w in weight.items()) + moe.shared_experts(x)
    experts, routed = moe.gate(x)
    assert sorted(experts[0].tolist()) == sorted(chosen)
    torch.testing.assert_close(moe(x), expected, rtol=0, atol=1e-6)
    assert abs(float(routed.sum()) - 2.5) < 1e-6


def test_lora_reaches_attention_dense_mlp_and_experts(llada2_snapshot):
    pytest.importorskip("peft")
    lm = load_masked_lm(llada2_snapshot, lora=LoraSettings(r=2, alpha=4.0, dropout=0.0))
    adapted = {name.rsplit(".lora_A", 1)[0].replace("base_model.model.", "")
               for name, _ in lm.model.named_parameters() if ".lora_A" in name}
    assert {"layers.0.qkv_proj", "layers.0.o_proj", "layers.0.gate_proj", "layers.1.moe.experts.7.down_proj",
            "layers.1.moe.shared_experts.up_proj"} <= adapted
    assert not any("gate.weight" in name or name.endswith("head") for name in adapted)


def test_a_left_padded_row_computes_as_alone_and_a_batch_decodes_as_its_rows(lm):
    ids, attn = _batch(lm, 0, 40, (0, 9, 30))
    settings = SamplerSettings(gen_length=BLOCK, block_length=BLOCK, steps=BLOCK, fill_after_eos=False,
                               confidence_threshold=0.2)
    with torch.no_grad():
        logits = lm.logits(ids, attn)
    out = decode(lm, ids, attn, settings)
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        with torch.no_grad():
            alone = lm.logits(ids[n:n + 1, real], attn[n:n + 1, real])
        torch.testing.assert_close(logits[n:n + 1, real], alone, rtol=0, atol=1e-5)
        assert torch.equal(decode(lm, ids[n:n + 1, real], attn[n:n + 1, real], settings).completion_bg,
                           out.completion_bg[n:n + 1])


needs_hub_code = pytest.mark.skipif(not (has_hub("llada2_moe") and transformers_in((4, 54), (4, 58))), reason="LLaDA2's hub code runs on transformers 4.54-4.57 "
                                    "only (on 5.x it loads but computes garbage)")


@pytest.fixture(scope="module")
def hub():
    from transformers import AutoModelForCausalLM

    # eager attention: the model's generate builds its mask in bfloat16, which SDPA refuses beside float32
    return AutoModelForCausalLM.from_pretrained(HUB["llada2_moe"], trust_remote_code=True, dtype=torch.float32,
                                                attn_implementation="eager").eval()


@needs_hub_code
def test_logits_equal_the_hub_codes_padding_included(lm, hub):
    ids, attn = _batch(lm, 1, 70, (0, 5, 37))
    additive = torch.zeros(block_causal_mask(attn, BLOCK).shape).masked_fill(~block_causal_mask(attn, BLOCK), -torch.inf)
    with torch.no_grad():  # eager attention adds the mask: 0 where a query may attend, -inf elsewhere
        theirs = hub(ids, attention_mask=additive, position_ids=row_positions(attn)).logits
        ours = lm.logits(ids, attn)
    assert theirs.abs().max() > 1.0
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


@needs_hub_code
def test_decoding_is_token_identical_to_the_models_generate(lm, hub):
    ids, attn = _batch(lm, 2, 40, (0, 9, 30))
    ours = decode(lm, ids, attn, SamplerSettings(gen_length=2 * BLOCK, block_length=BLOCK, steps=2 * BLOCK, top_k=1,
                                                 confidence_threshold=0.95)).completion_bg
    for n in range(ids.shape[0]):
        real = attn[n].bool()
        theirs = hub.generate(ids[n:n + 1, real], top_k=1, block_length=BLOCK, steps=BLOCK, gen_length=2 * BLOCK,
                              threshold=0.95, eos_id=lm.eos_id, mask_id=lm.mask_id)
        assert theirs.shape[1] >= 1 and torch.equal(ours[n:n + 1, :theirs.shape[1]], theirs)
