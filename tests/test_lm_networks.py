"""Our LLaDA / Dream networks against the hub code of the ../shared/models snapshots, and the block KV cache.

Tests marked ``needs_hub_code`` run the hub code itself (transformers 4.56-4.57) on ../shared's
snapshots; on transformers 5 the recorded hub logits pin the same parity (tests/test_lm_checkpoint_model.py).
The cache and decoding tests run on the suite's own hub-layout checkpoints (``hub_models``).
"""

from __future__ import annotations

import json
import math
import types
from pathlib import Path

import pytest
import torch

from dipod.lm.networks import load_network, make_cached_forward, native_network
from dipod.lm.networks.cache import BlockCachedForward
from dipod.lm.networks.transformer import Network

from hub_snapshots import MODELS, needs_hub_code  # noqa: E402

SNAPSHOTS = ("tiny-llada", "tiny-dream")  # ../shared/models, for the hub code
FAMILIES = ("llada", "dream")  # the suite's own checkpoints (hub_models)
TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.bfloat16: dict(rtol=1.6e-2, atol=2e-2)}


def _snapshot(name: str) -> Path:
    path = MODELS / name
    if not (path / "model.safetensors").is_file():
        pytest.skip(f"the hub code's snapshot {path} is absent")
    return path


def _hub(name: str, dtype=torch.float32):
    from transformers import AutoModel

    return AutoModel.from_pretrained(_snapshot(name), trust_remote_code=True, dtype=dtype,
                                     local_files_only=True).eval()


def _lm(hub):
    # native_network reads only lm.model (a MaskedDiffusionLM or anything holding the hub model).
    return types.SimpleNamespace(model=hub)


def _ids(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def _left_padded(rows: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], attn[i, width - len(r):] = r, 1
    return ids, attn


@needs_hub_code
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", SNAPSHOTS)
def test_logits_equal_the_hub_code(name, dtype):
    hub = _hub(name, dtype)
    ids = _ids(3, 21)
    with torch.no_grad():
        expected = hub(input_ids=ids).logits.float()
        shared = native_network(_lm(hub))(ids)
        from_safetensors = load_network(_snapshot(name), dtype)(ids)
    assert expected.abs().max() > 1.0  # real, non-degenerate logits
    torch.testing.assert_close(shared, expected, **TOL[dtype])
    torch.testing.assert_close(from_safetensors, expected, **TOL[dtype])


@needs_hub_code
@pytest.mark.parametrize("name", SNAPSHOTS)
def test_masked_padding_equals_the_prompt_without_padding(name):
    """Keys at padding are masked and positions stay absolute; RoPE being relative, each row's real
    positions get the logits of that row run alone (the hub code on the unpadded row)."""
    hub = _hub(name)
    rows = [_ids(1, n, seed=n)[0] for n in (9, 14, 5)]
    ids, attn = _left_padded(rows, pad_id=97)
    with torch.no_grad():
        ours = native_network(_lm(hub))(ids, attn)
        for i, row in enumerate(rows):
            alone = hub(input_ids=row[None]).logits.float()[0]
            torch.testing.assert_close(ours[i, ids.shape[1] - len(row):], alone, **TOL[torch.float32])


@needs_hub_code
def test_dream_padding_matches_dreams_own_masked_call():
    """Dream's generate() passes a 4-D boolean mask and position ids restarting at the first real token."""
    hub = _hub("tiny-dream")
    rows = [_ids(1, n, seed=n)[0] for n in (12, 7)]
    ids, attn = _left_padded(rows, pad_id=97)
    positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)
    mask_4d = attn.bool()[:, None, None, :] & attn.bool()[:, None, :, None]
    with torch.no_grad():
        expected = hub(input_ids=ids, attention_mask=mask_4d, position_ids=positions).logits.float()
        ours = native_network(_lm(hub))(ids, attn)
    real = attn.bool()
    torch.testing.assert_close(ours[real], expected[real], **TOL[torch.float32])


@needs_hub_code
def test_shared_modules_follow_weight_updates_and_lora():
    from dipod.lm.model import LoraSettings, apply_lora

    hub = _hub("tiny-llada")
    ids = _ids(2, 10)
    model = apply_lora(hub, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=("q_proj", "ff_proj")))
    net = native_network(_lm(model))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # LoRA starts as a no-op; make the adapters matter
                param.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
        model.get_base_model().model.transformer.blocks[1].attn_out.weight.mul_(3.0)
        expected = model(input_ids=ids).logits.float()
        torch.testing.assert_close(net(ids), expected, **TOL[torch.float32])
        assert (expected - load_network(_snapshot("tiny-llada"))(ids)).abs().max() > 0.1  # the edits did change it


def _full_block_logits(net: Network, ids, attn, lo: int, hi: int) -> torch.Tensor:
    """The uncached reference: full forward, re-aligned for shifted families."""
    shift = 1 if net.spec.shifted else 0
    return net(ids, attn)[:, lo - shift:hi - shift]


def _padded_sequence(mask_id: int = 120):
    rows = [_ids(1, n, seed=n)[0] for n in (6, 9)]
    prompt, prompt_attn = _left_padded(rows, pad_id=97)
    completion = torch.full((2, 12), mask_id)
    completion[:, :4] = _ids(2, 4, seed=7)  # one finished block of 4 before the current one
    ids = torch.cat([prompt, completion], dim=1)
    attn = torch.cat([prompt_attn, torch.ones_like(completion)], dim=1)
    lo = prompt.shape[1] + 4
    return ids, attn, lo, lo + 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("family", FAMILIES)
def test_cached_forward_is_exact_at_the_first_step_and_while_nothing_changed(hub_models, family, mode, dtype):
    net = load_network(hub_models[family], dtype)
    ids, attn, lo, hi = _padded_sequence()
    forward = BlockCachedForward(net, mode)
    with torch.no_grad():
        expected = _full_block_logits(net, ids, attn, lo, hi)
        torch.testing.assert_close(forward(ids, attn, lo, hi, new_block=True), expected, **TOL[dtype])
        # Same tokens: the cached keys/values are the current ones, so a cached step is exact too.
        torch.testing.assert_close(forward(ids, attn, lo, hi, new_block=False), expected, **TOL[dtype])


@pytest.mark.parametrize("family", FAMILIES)
def test_cache_staleness_is_exactly_what_fast_dllm_describes(hub_models, family):
    """After tokens of the block are revealed, a one-layer network's keys/values of the unchanged
    prefix (and, for dual, the unchanged suffix) are still exact, so both caches equal the full
    forward there; with two layers they go stale (they saw the old block) and differ."""
    full = load_network(hub_models[family])
    one_layer = Network(full.spec, full.embed, list(full.layers[:1]), full.final_norm, full.head)
    ids, attn, lo, hi = _padded_sequence()
    revealed = ids.clone()
    revealed[:, lo:lo + 2] = _ids(2, 2, seed=3)
    with torch.no_grad():
        for mode in ("prefix", "dual"):
            for net, exact in ((one_layer, True), (full, False)):
                forward = BlockCachedForward(net, mode)
                forward(ids, attn, lo, hi, new_block=True)
                cached = forward(revealed, attn, lo, hi, new_block=False)
                expected = _full_block_logits(net, revealed, attn, lo, hi)
                if exact:
                    torch.testing.assert_close(cached, expected, **TOL[torch.float32])
                else:
                    assert (cached - expected).abs().max() > 1e-4


def test_prefix_cache_recomputes_the_suffix_dual_does_not(hub_models):
    net = load_network(hub_models["llada"])
    one_layer = Network(net.spec, net.embed, list(net.layers[:1]), net.final_norm, net.head)
    ids, attn, lo, hi = _padded_sequence()
    changed = ids.clone()
    changed[:, hi:hi + 3] = _ids(2, 3, seed=5)  # the suffix changes (a one-layer net's prefix stays exact)
    with torch.no_grad():
        expected = _full_block_logits(one_layer, changed, attn, lo, hi)
        results = {}
        for mode in ("prefix", "dual"):
            forward = BlockCachedForward(one_layer, mode)
            forward(ids, attn, lo, hi, new_block=True)
            results[mode] = forward(changed, attn, lo, hi, new_block=False)
    torch.testing.assert_close(results["prefix"], expected, **TOL[torch.float32])
    assert (results["dual"] - expected).abs().max() > 1e-4


def test_bad_use_is_a_clear_error(hub_models):
    net = load_network(hub_models["dream"])
    ids, attn, lo, hi = _padded_sequence()
    with pytest.raises(ValueError, match="choose one of"):
        BlockCachedForward(net, "suffix")
    forward = BlockCachedForward(net, "dual")
    with pytest.raises(RuntimeError, match="new_block=True"):
        forward(ids, attn, lo, hi, new_block=False)
    with pytest.raises(ValueError, match="shifted family"):
        forward(ids, attn, 0, 4, new_block=True)
    gpt2 = types.SimpleNamespace(model=types.SimpleNamespace(config=types.SimpleNamespace(model_type="gpt2")))
    with pytest.raises(ValueError, match=r"'gpt2' has no native network.*\['dream', 'llada', 'modernbert'\]"):
        make_cached_forward(gpt2, "prefix")


@pytest.mark.parametrize("family", FAMILIES)
def test_decoding_with_cache_and_threshold_through_the_sampler(hub_models, family):
    from dipod.lm.model import load_masked_lm
    from dipod.lm.sampler import SamplerSettings, decode

    lm = load_masked_lm(hub_models[family])
    prompts, prompt_attn = _left_padded([_ids(1, n, seed=n)[0] for n in (7, 4, 6)], pad_id=lm.pad_id)
    base = dict(gen_length=16, block_length=8, steps=8)
    for mode in ("prefix", "dual"):
        # A threshold every proposal passes reveals a block in its first (exact) step: same tokens as uncached.
        one_step = [decode(lm, prompts, prompt_attn, SamplerSettings(**base, confidence_threshold=1e-9, kv_cache=kv))
                    for kv in (None, mode)]
        assert torch.equal(one_step[0].completion_bg, one_step[1].completion_bg)
        assert one_step[1].forward_passes == len(SamplerSettings(**base).resolved(lm.family.sampler_defaults).blocks())
        # Many steps per block: the cached forward is the one the sampler calls, and every row is finished.
        settings = SamplerSettings(**base, confidence_threshold=0.3, kv_cache=mode)
        calls = []
        cached = make_cached_forward(lm, mode)
        counted = decode(lm, prompts, prompt_attn, settings,
                         forward=lambda *args: calls.append(args[-1]) or cached(*args))
        wired = decode(lm, prompts, prompt_attn, settings)
        assert torch.equal(counted.completion_bg, wired.completion_bg)
        assert len(calls) == counted.forward_passes > one_step[1].forward_passes
        assert (counted.order_bg >= 0).all() and not (counted.completion_bg == lm.mask_id).any()
        # Padding keys are masked, so a row decodes as it does alone (the hub LLaDA code would attend to padding).
        width = prompts.shape[1]
        for i in range(len(prompts)):
            real = prompt_attn[i].bool()
            alone = decode(lm, prompts[i:i + 1, real], prompt_attn[i:i + 1, real], settings)
            assert torch.equal(alone.completion_bg[0], counted.completion_bg[i]), (mode, i, width)


def test_reveal_confidence_is_the_samplers_own_score_when_decoding_exactly(hub_models):
    """Greedy, uncached: the replayed probability of each revealed token is the low-confidence score the
    sampler ranked it by (recorded from the sampler's own forward calls)."""
    from dipod.lm.model import load_masked_lm
    from dipod.lm.rollout_mismatch import reveal_confidence
    from dipod.lm.sampler import SamplerSettings, decode, full_forward

    lm = load_masked_lm(hub_models["llada"])
    prompts, prompt_attn = _left_padded([_ids(1, n, seed=n)[0] for n in (5, 8)], pad_id=lm.pad_id)
    settings = SamplerSettings(gen_length=8, block_length=4, steps=4, fill_after_eos=False)
    records, inner = [], full_forward(lm)

    def recording(x_bt, attn_bt, lo, hi, new_block):
        logits = inner(x_bt, attn_bt, lo, hi, new_block)
        records.append((lo - prompts.shape[1], logits.clone()))
        return logits
    out = decode(lm, prompts, prompt_attn, settings, forward=recording)
    expected = torch.zeros(2, 8, dtype=torch.float64)
    for step, (start, logits) in enumerate(records):
        logits = logits.clone()  # made under inference_mode
        logits[..., lm.mask_id] = float("-inf")
        probs = torch.softmax(logits.double(), dim=-1)
        for b in range(2):
            for j in range(logits.shape[1]):
                if out.order_bg[b, start + j] == step:
                    expected[b, start + j] = probs[b, j, out.completion_bg[b, start + j]]
    got = reveal_confidence(lm, prompts, prompt_attn, out.completion_bg, out.order_bg)
    torch.testing.assert_close(got, expected.mean(dim=1))
    assert (got > 0).all() and (got < 1).all()


def test_rollout_mismatch_of_fast_against_reference_decoding(hub_models):
    from dipod.lm.model import load_masked_lm
    from dipod.lm.proxies import ProxySettings
    from dipod.lm.rollout_mismatch import reference_settings, rollout_mismatch
    from dipod.lm.sampler import SamplerSettings

    lm = load_masked_lm(hub_models["llada"])
    prompts, prompt_attn = _left_padded([_ids(1, n, seed=n)[0] for n in (5, 8, 6)], pad_id=lm.pad_id)
    fast = SamplerSettings(gen_length=16, block_length=8, steps=16, confidence_threshold=0.05, kv_cache="dual",
                           temperature=1.0)
    reference = reference_settings(fast)
    assert reference.confidence_threshold is None and reference.kv_cache is None and reference.temperature == 1.0
    score = lambda completion: (completion == 85).double().mean(dim=1)  # noqa: E731  (a reward with spread)
    proxy = ProxySettings(block_length=8)
    same = rollout_mismatch(lm, prompts, prompt_attn, reference, reference, score, proxy, seed=3)
    for key in ("reward", "elbo_per_token", "confidence", "forwards"):
        assert same[f"{key}_fast"] == same[f"{key}_reference"]
    assert same["same_tokens"] == 1.0 and same["forwards_reference"] == 16
    diff = rollout_mismatch(lm, prompts, prompt_attn, fast, reference, score, proxy, seed=3)
    assert diff["forwards_fast"] < diff["forwards_reference"]
    assert diff["elbo_per_token_fast"] < 0 and 0 < diff["confidence_fast"] < 1
    assert diff == rollout_mismatch(lm, prompts, prompt_attn, fast, reference, score, proxy, seed=3)  # seeded


def test_rl_run_with_fast_rollouts_logs_the_mismatch(hub_models, tmp_path):
    from dipod.lm.train_config import TrainConfig
    from dipod.lm.trainer import train

    cfg = TrainConfig(model=str(hub_models["llada"]), task="sudoku4", prompt_style="compact",
                      lora_r=0, dtype="float32", prompts_per_step=2, num_generations=2, gradient_accumulation_steps=1,
                      gen_length=16, block_length=8, diffusion_steps=8, num_iterations=1, max_steps=1, save_steps=0,
                      eval_steps=0, eval_examples=2, gap_monitor_steps=0, num_draws=2, masking="random", dipod_unscored_eos=True,
                      tensorboard=False, progress_bar=False, save_final_model=False, output_dir=str(tmp_path),
                      temperature=1.0, confidence_threshold=0.2, kv_cache="dual", rollout_mismatch_steps=1)
    row = next(r for r in train(cfg).history if r.get("step") == 1 and "reward" in r)
    # fixed schedule: 8 steps; threshold: one forward per block at best, one per token at worst
    assert row["mismatch/forwards_reference"] == 8 and 2 <= row["mismatch/forwards_fast"] <= 16
    for key in ("reward", "elbo_per_token", "confidence"):
        assert math.isfinite(row[f"mismatch/{key}_fast"]) and math.isfinite(row[f"mismatch/{key}_reference"])
    assert 0.0 <= row["mismatch/same_tokens"] <= 1.0


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """Our tiny ModernBERT (local attention every 3rd layer, window 128) with weights that are not near zero."""
    from dipod.lm.model import build_tiny_model, load_masked_lm

    path = build_tiny_model(tmp_path_factory.mktemp("bert") / "m", hidden_size=32, num_layers=4, num_heads=2,
                            intermediate_size=64, max_positions=256)
    config = json.loads((path / "config.json").read_text())
    # every 3rd layer global (transformers 4.x reads global_attn_every_n_layers, 5.x reads layer_types)
    config["layer_types"] = ["full_attention", "sliding_attention", "sliding_attention", "full_attention"]
    (path / "config.json").write_text(json.dumps({**config, "global_attn_every_n_layers": 3, "local_attention": 128}))
    lm = load_masked_lm(path)
    with torch.no_grad():
        for param in lm.model.parameters():
            param.mul_(4.0)  # sharper predictions, so that parity is tested on large logits
    return lm


def test_modernbert_logits_and_cache_equal_the_hub_code(tiny_bert):
    lm = tiny_bert
    net = native_network(lm)
    assert net.layer_kinds[1][0] == 64 and net.layer_kinds[0][0] is None  # sequences below exceed the window
    ids = torch.randint(4, 90, (3, 150), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :40], attn[1, :3] = 0, 0
    with torch.no_grad():
        expected = lm.model(input_ids=ids, attention_mask=attn).logits.float()
        real = attn.bool()
        assert expected.abs().max() > 5.0
        torch.testing.assert_close(net(ids, attn)[real], expected[real], **TOL[torch.float32])
        for mode in ("prefix", "dual"):
            forward = BlockCachedForward(net, mode)
            torch.testing.assert_close(forward(ids, attn, 100, 116, new_block=True), expected[:, 100:116],
                                       **TOL[torch.float32])
            torch.testing.assert_close(forward(ids, attn, 100, 116, new_block=False), expected[:, 100:116],
                                       **TOL[torch.float32])


def test_modernbert_decoding_with_cache(tiny_bert):
    from dipod.lm.sampler import SamplerSettings, decode

    lm = tiny_bert
    prompts = torch.randint(4, 90, (2, 10), generator=torch.Generator().manual_seed(1))
    attn = torch.ones_like(prompts)
    attn[0, :4] = 0
    base = dict(gen_length=16, block_length=8, steps=16)
    exact = [decode(lm, prompts, attn, SamplerSettings(**base, confidence_threshold=1e-9, kv_cache=kv))
             for kv in (None, "dual")]
    assert torch.equal(exact[0].completion_bg, exact[1].completion_bg) and exact[1].forward_passes == 2
    cached = decode(lm, prompts, attn, SamplerSettings(**base, kv_cache="prefix"))
    assert cached.forward_passes == 16 and not (cached.completion_bg == lm.mask_id).any()
