"""The exact prefix KV cache of block-causal networks (dipod.lm.networks.block_cache) on SDAR and LLaDA2.

Pins: a cached window's logits equal the full forward's (float rounding); decoding with
``kv_cache=prefix`` is token-identical to decoding without it, order and forward count included,
for a left-padded batch, greedy and with threshold decoding; misuse is a clear error.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from block_models import padded_batch, tiny_snapshot  # noqa: E402

from dipod.config import ConfigError  # noqa: E402
from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.networks.block_cache import BlockCausalCachedForward  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402

BLOCKS = {"sdar": 4, "llada2_moe": 32}
pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module", params=sorted(BLOCKS))
def model(request, tmp_path_factory):
    lm = load_masked_lm(tiny_snapshot(request.param, tmp_path_factory))
    return lm, BLOCKS[request.param], lm.pad_id


def test_a_cached_window_equals_the_full_forward(model):
    lm, block, pad = model
    ids, attn = padded_batch(0, 3 * block, (0, block), pad)  # padding of whole blocks: windows align with blocks
    forward = BlockCausalCachedForward(lm.model)
    with torch.no_grad():
        full = lm.logits(ids, attn)
        for lo in range(block, 3 * block, block):  # windows after a first block of prompt
            cached = forward(ids, attn, lo, lo + block, new_block=True)
            torch.testing.assert_close(cached, full[:, lo:lo + block], rtol=0, atol=1e-5)
            again = forward(ids, attn, lo, lo + block, new_block=False)  # a later step of the same window
            torch.testing.assert_close(again, cached, rtol=0, atol=0)


@pytest.mark.parametrize("threshold", [None, 0.2])
def test_decoding_with_the_cache_is_token_identical(model, threshold):
    lm, block, pad = model
    ids, attn = padded_batch(5, 40, (0, 7, 13, 30), pad)
    settings = dict(gen_length=2 * block, block_length=block, steps=2 * block, fill_after_eos=False,
                    confidence_threshold=threshold)
    plain = decode(lm, ids, attn, SamplerSettings(**settings))
    cached = decode(lm, ids, attn, SamplerSettings(**settings, kv_cache="prefix"))
    assert torch.equal(plain.completion_bg, cached.completion_bg) and torch.equal(plain.order_bg, cached.order_bg)
    assert plain.forward_passes == cached.forward_passes


def test_misuse_is_a_clear_error(model):
    lm, block, pad = model
    ids, attn = padded_batch(1, 2 * block, (0,), pad)
    with pytest.raises(ConfigError, match="kv_cache=prefix"):
        decode(lm, ids, attn, SamplerSettings(gen_length=block, block_length=block, steps=block, kv_cache="dual"))
    with pytest.raises(RuntimeError, match="new_block=True"):
        BlockCausalCachedForward(lm.model)(ids, attn, block, 2 * block, new_block=False)


def test_a_bidirectional_network_is_refused():
    from hub_snapshots import SNAPSHOTS

    from dipod.lm.networks import load_network

    if not (SNAPSHOTS["llada"] / "model.safetensors").is_file():
        pytest.skip("../shared/models/tiny-llada is absent")
    with pytest.raises(ValueError, match="block-causal network"):
        BlockCausalCachedForward(load_network(SNAPSHOTS["llada"]))
