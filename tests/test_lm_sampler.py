"""The LLaDA sampler: invariants, the reveal schedule, remasking rules, Gumbel sampling, guidance, EOS fill."""

from __future__ import annotations

import dataclasses
import math
import sys
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dipod.config import ConfigError
from dipod.lm.model import MaskedDiffusionLM, build_tiny_model, load_masked_lm
from dipod.lm.sampler import SamplerSettings, decode, generate, reveal_schedule, top_k_mask

PAD, MASK, EOS = 0, 1, 2
VOCAB = 8  # 3..7 are ordinary tokens


def toy_lm(model: nn.Module, mask_id: int | None = MASK) -> MaskedDiffusionLM:
    """A toy module behind the real wrapper, with the toy vocabulary's special ids."""
    return MaskedDiffusionLM(model=model, tokenizer=None, mask_id=mask_id, pad_id=PAD, eos_id=EOS)


class RelativeMixer(nn.Module):
    """A bidirectional toy model that depends only on relative positions and ignores masked-out keys.

    So padding a prompt more on the left changes nothing it computes (as for a RoPE transformer).
    """

    def __init__(self, seed: int = 0, dim: int = 16):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.embed = nn.Parameter(torch.randn(VOCAB, dim, generator=g, dtype=torch.float64))
        self.context = nn.Parameter(torch.randn(VOCAB, dim, generator=g, dtype=torch.float64))
        self.out = nn.Parameter(torch.randn(dim, VOCAB, generator=g, dtype=torch.float64))

    def forward(self, input_ids, attention_mask):
        pos = torch.arange(input_ids.shape[1], dtype=torch.float64)
        decay_tt = torch.exp(-(pos[:, None] - pos[None, :]).abs() / 3.0)
        weights_btt = decay_tt * attention_mask[:, None, :].double()
        hidden = self.embed[input_ids] + weights_btt @ self.context[input_ids]
        return SimpleNamespace(logits=(torch.tanh(hidden) @ self.out).float())


class FixedLogits(nn.Module):
    """Returns the same completion logits ``[G, V]`` whatever the input (prompt positions get zeros)."""

    def __init__(self, completion_logits_gv: torch.Tensor):
        super().__init__()
        self.register_buffer("completion_logits_gv", completion_logits_gv.float())
        self.seen_training = []

    def forward(self, input_ids, attention_mask):
        self.seen_training.append(self.training)
        batch, total = input_ids.shape
        gen = self.completion_logits_gv.shape[0]
        prompt_part = torch.zeros(total - gen, VOCAB)
        table_tv = torch.cat([prompt_part, self.completion_logits_gv])
        return SimpleNamespace(logits=table_tv.expand(batch, total, VOCAB).clone())


def peaked_logits(peaks: list[float], tokens: list[int]) -> torch.Tensor:
    """Logits with value ``peaks[j]`` on ``tokens[j]`` at completion position j and 0 elsewhere."""
    logits_gv = torch.zeros(len(peaks), VOCAB)
    logits_gv[torch.arange(len(peaks)), torch.tensor(tokens)] = torch.tensor(peaks)
    return logits_gv


def random_prompts(batch: int, max_len: int, seed: int = 0, min_len: int = 1):
    """Left-padded prompts of random lengths over the ordinary tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (batch,), generator=g)
    ids = torch.randint(3, VOCAB, (batch, max_len), generator=g)
    attn = (torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]).long()
    return ids.masked_fill(attn == 0, PAD), attn


def left_pad_more(ids, attn, extra: int):
    return (torch.cat([torch.full((ids.shape[0], extra), PAD), ids], dim=1),
            torch.cat([torch.zeros(ids.shape[0], extra, dtype=torch.long), attn], dim=1))


# --- invariants -------------------------------------------------------------------------------

@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_no_mask_left_and_prompt_untouched(remasking, temperature):
    lm = toy_lm(RelativeMixer())
    ids, attn = random_prompts(6, 5)
    ids_before = ids.clone()
    settings = SamplerSettings(gen_length=12, block_length=4, steps=6, temperature=temperature, remasking=remasking)
    out, order = generate(lm, ids, attn, settings, torch.Generator().manual_seed(1), return_order=True)
    assert out.shape == (6, 12) and out.dtype == torch.long
    assert not (out == MASK).any()
    assert ((out >= 0) & (out < VOCAB)).all()
    assert torch.equal(ids, ids_before)
    assert ((order >= 0) & (order < 6)).all()


def test_mask_token_is_never_proposed_even_when_the_model_prefers_it():
    logits_gv = torch.zeros(4, VOCAB)
    logits_gv[:, MASK] = 50.0
    logits_gv[:, 5] = 1.0
    lm = toy_lm(FixedLogits(logits_gv))
    ids, attn = random_prompts(3, 2)
    for temperature in (0.0, 3.0):
        out = generate(lm, ids, attn, SamplerSettings(gen_length=4, block_length=4, steps=2, temperature=temperature),
                       torch.Generator().manual_seed(0))
        assert not (out == MASK).any()
    assert (generate(lm, ids, attn, SamplerSettings(gen_length=4, block_length=4, steps=2)) == 5).all()


def test_deterministic_at_temperature_zero_and_with_a_fixed_generator():
    lm = toy_lm(RelativeMixer())
    ids, attn = random_prompts(8, 6)
    greedy = SamplerSettings(gen_length=8, block_length=4, steps=8)
    assert torch.equal(generate(lm, ids, attn, greedy), generate(lm, ids, attn, greedy))
    for remasking in ("low_confidence", "random"):
        hot = SamplerSettings(gen_length=8, block_length=4, steps=8, temperature=1.5, remasking=remasking)
        first = generate(lm, ids, attn, hot, torch.Generator().manual_seed(7), return_order=True)
        again = generate(lm, ids, attn, hot, torch.Generator().manual_seed(7), return_order=True)
        other = generate(lm, ids, attn, hot, torch.Generator().manual_seed(8), return_order=True)
        assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
        assert not (torch.equal(first[0], other[0]) and torch.equal(first[1], other[1]))


def test_model_runs_in_eval_mode_and_its_mode_is_restored():
    model = FixedLogits(peaked_logits([1.0, 2.0], [3, 4]))
    model.train()
    generate(toy_lm(model), *random_prompts(2, 3), SamplerSettings(gen_length=2, block_length=2, steps=2))
    assert model.seen_training == [False, False]
    assert model.training


# --- schedule and blocks --------------------------------------------------------------------------

def test_reveal_schedule_splits_evenly_with_the_remainder_first():
    assert reveal_schedule(5, 3) == [2, 2, 1]
    assert reveal_schedule(32, 16) == [2] * 16
    assert reveal_schedule(7, 7) == [1] * 7
    assert reveal_schedule(10, 4) == [3, 3, 2, 2]


@pytest.mark.parametrize("remasking", ["low_confidence", "random"])
def test_each_step_reveals_the_scheduled_count_and_blocks_go_left_to_right(remasking):
    lm = toy_lm(RelativeMixer(seed=3))
    ids, attn = random_prompts(5, 4, seed=2)
    settings = SamplerSettings(gen_length=10, block_length=5, steps=6, temperature=0.8, remasking=remasking)
    _, order = generate(lm, ids, attn, settings, torch.Generator().manual_seed(0), return_order=True)
    counts_bs = torch.stack([(order == s).sum(dim=1) for s in range(6)], dim=1)
    assert torch.equal(counts_bs, torch.tensor([[2, 2, 1, 2, 2, 1]] * 5))
    # block 0 is revealed in steps 0-2, block 1 in steps 3-5: every block-1 step is later
    assert (order[:, :5].max(dim=1).values < order[:, 5:].min(dim=1).values).all()
    assert ((order[:, :5] <= 2) & (order[:, 5:] >= 3)).all()


# --- which positions a step keeps --------------------------------------------------------------------

def test_low_confidence_reveals_the_most_probable_positions_first():
    # two blocks of 3, 2 steps each (reveal 2 then 1); confidence grows with the peak height
    lm = toy_lm(FixedLogits(peaked_logits([1.0, 3.0, 2.0, 5.0, 4.0, 0.5], [3, 4, 5, 6, 7, 3])))
    out, order = generate(lm, *random_prompts(2, 3), SamplerSettings(gen_length=6, block_length=3, steps=4),
                          return_order=True)
    assert torch.equal(out, torch.tensor([[3, 4, 5, 6, 7, 3]] * 2))
    assert torch.equal(order, torch.tensor([[1, 0, 0, 2, 2, 3]] * 2))


def test_low_confidence_first_step_matches_the_models_own_probabilities():
    model = RelativeMixer(seed=5)
    lm = toy_lm(model)
    ids, attn = random_prompts(16, 5, seed=4)
    settings = SamplerSettings(gen_length=8, block_length=8, steps=4)  # reveal 2 per step
    _, order = generate(lm, ids, attn, settings, return_order=True)
    start = torch.cat([ids, torch.full((16, 8), MASK)], dim=1)
    logits_bgv = lm.logits(start, torch.cat([attn, torch.ones(16, 8, dtype=torch.long)], dim=1))[:, 5:]
    logits_bgv[..., MASK] = float("-inf")
    confidence_bg = torch.softmax(logits_bgv.double(), dim=-1).max(dim=-1).values
    expected_first = top_k_mask(confidence_bg, 2)
    assert torch.equal(order == 0, expected_first)


def test_equal_confidences_go_to_the_leftmost_position():
    assert torch.equal(top_k_mask(torch.tensor([[0.5, 0.9, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]]), 2),
                       torch.tensor([[True, True, False, False], [True, True, False, False]]))
    assert torch.equal(top_k_mask(torch.tensor([[0.1, 0.5, 0.9, 0.5]]), 2), torch.tensor([[False, True, True, False]]))
    # Identical logit rows, so the confidences tie bit for bit. (Peaks on different tokens tie only in
    # exact arithmetic: the softmax sums a row in an order that depends on where its peak sits, and on
    # some CPUs the last bit then differs between positions.)
    lm = toy_lm(FixedLogits(peaked_logits([2.0] * 4, [3, 3, 3, 3])))
    _, order = generate(lm, *random_prompts(1, 2), SamplerSettings(gen_length=4, block_length=4, steps=4),
                        return_order=True)
    assert torch.equal(order, torch.tensor([[0, 1, 2, 3]]))


def test_batched_top_k_equals_a_per_row_selection_with_ties_and_blocked_positions():
    g = torch.Generator().manual_seed(0)
    score_bl = torch.randint(0, 4, (64, 12), generator=g).double()  # many ties
    score_bl[torch.rand(64, 12, generator=g) < 0.3] = float("-inf")  # already revealed positions
    for k in (1, 3, 5):
        expected = torch.zeros(64, 12, dtype=torch.bool)
        for row in range(64):
            ranked = sorted(range(12), key=lambda j: (-score_bl[row, j].item(), j))
            expected[row, ranked[:k]] = True
        assert torch.equal(top_k_mask(score_bl, k), expected)


def test_ties_go_to_the_leftmost_positions_in_rows_as_long_as_a_global_block():
    # Dream's global schedule ranks a whole completion (256+ positions) at once; a sort that is not
    # stable reorders ties at that width even on the CPU.
    score_bl = torch.randint(0, 3, (4, 512), generator=torch.Generator().manual_seed(1)).double()
    for k in (1, 100, 300):
        expected = torch.zeros_like(score_bl, dtype=torch.bool)
        for row in range(4):
            ranked = sorted(range(512), key=lambda j: (-score_bl[row, j].item(), j))
            expected[row, ranked[:k]] = True
        assert torch.equal(top_k_mask(score_bl, k), expected)


def test_random_remasking_reveals_uniformly_chosen_positions():
    # The model is very sure about position 0, but random remasking must ignore confidence.
    lm = toy_lm(FixedLogits(peaked_logits([9.0, 0.1, 0.1, 0.1, 0.1], [3, 4, 5, 6, 7])))
    batch = 4000
    ids, attn = torch.full((batch, 2), 3), torch.ones(batch, 2, dtype=torch.long)
    settings = SamplerSettings(gen_length=5, block_length=5, steps=5, remasking="random")
    _, order = generate(lm, ids, attn, settings, torch.Generator().manual_seed(11), return_order=True)
    first_counts = (order == 0).sum(dim=0).double()  # one position per row at step 0
    expected = batch / 5
    chi2 = ((first_counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 18.47, (first_counts, chi2)  # chi-square, 4 dof, p = 0.001


# --- Gumbel-max sampling ------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_gumbel_sampling_frequencies_match_the_tempered_softmax(temperature):
    logits_v = torch.tensor([0.3, 5.0, -0.4, 1.2, 0.0, 0.9, -1.0, 0.6])  # index MASK is excluded
    lm = toy_lm(FixedLogits(logits_v[None, :]))
    batch = 20000
    ids, attn = torch.full((batch, 1), 3), torch.ones(batch, 1, dtype=torch.long)
    settings = SamplerSettings(gen_length=1, block_length=1, steps=1, temperature=temperature)
    out = generate(lm, ids, attn, settings, torch.Generator().manual_seed(2024))
    counts = torch.bincount(out[:, 0], minlength=VOCAB).double()
    assert counts[MASK] == 0
    keep = torch.arange(VOCAB) != MASK
    probs = torch.softmax(logits_v[keep].double() / temperature, dim=0)
    expected = batch * probs
    chi2 = ((counts[keep] - expected) ** 2 / expected).sum().item()
    assert chi2 < 22.46, (counts, expected, chi2)  # chi-square, 6 dof, p = 0.001


# --- left padding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_more_left_padding_gives_the_same_completion(temperature):
    lm = toy_lm(RelativeMixer(seed=1))
    ids, attn = random_prompts(6, 5, seed=9)
    settings = SamplerSettings(gen_length=8, block_length=4, steps=4, temperature=temperature)
    out, order = generate(lm, ids, attn, settings, torch.Generator().manual_seed(3), return_order=True)
    out_pad, order_pad = generate(lm, *left_pad_more(ids, attn, 4), settings, torch.Generator().manual_seed(3),
                                  return_order=True)
    assert torch.equal(out, out_pad) and torch.equal(order, order_pad)


def test_each_row_alone_gives_its_batch_completion():
    lm = toy_lm(RelativeMixer(seed=1))
    ids, attn = random_prompts(6, 5, seed=9)
    settings = SamplerSettings(gen_length=8, block_length=4, steps=4)
    batch_out = generate(lm, ids, attn, settings)
    for row in range(6):
        first_real = 5 - int(attn[row].sum())
        alone = generate(lm, ids[row:row + 1, first_real:], attn[row:row + 1, first_real:], settings)
        assert torch.equal(alone[0], batch_out[row])


def test_padding_content_is_invisible():
    lm = toy_lm(RelativeMixer(seed=2))
    ids, attn = random_prompts(6, 6, seed=1, min_len=2)
    settings = SamplerSettings(gen_length=6, block_length=3, steps=6)
    scribbled = torch.where(attn == 0, torch.full_like(ids, 6), ids)
    assert torch.equal(generate(lm, ids, attn, settings), generate(lm, scribbled, attn, settings))


# --- classifier-free guidance --------------------------------------------------------------------------

class PromptSensitive(nn.Module):
    """Logits ``cond`` at every position when the last prompt token is visible, ``uncond`` when it is masked."""

    def __init__(self, cond_v, uncond_v, prompt_len):
        super().__init__()
        self.cond_v, self.uncond_v, self.prompt_len = torch.tensor(cond_v), torch.tensor(uncond_v), prompt_len
        self.calls = []

    def forward(self, input_ids, attention_mask):
        self.calls.append((input_ids.clone(), attention_mask.clone()))
        prompt_visible_b = input_ids[:, self.prompt_len - 1] != MASK
        rows_bv = torch.where(prompt_visible_b[:, None], self.cond_v, self.uncond_v)
        return SimpleNamespace(logits=rows_bv[:, None, :].expand(-1, input_ids.shape[1], -1).clone())


def test_guidance_combines_conditional_and_unconditional_logits():
    cond = [0.0, 0.0, 0.0, 2.0, 1.5, 0.0, 0.0, 0.0]
    uncond = [0.0, 0.0, 0.0, 2.0, 0.0, 0.0, 0.0, 0.0]
    model = PromptSensitive(cond, uncond, prompt_len=3)
    lm = toy_lm(model)
    ids = torch.tensor([[PAD, 5, 6], [7, 5, 6]])
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    base = dict(gen_length=2, block_length=2, steps=1)
    # scale 0: the conditional argmax (token 3); scale 1: uncond + 2 (cond - uncond) puts 3.0 on token 4
    assert (generate(lm, ids, attn, SamplerSettings(**base)) == 3).all()
    assert len(model.calls) == 1 and model.calls[0][0].shape[0] == 2  # no unconditional pass at scale 0
    assert (generate(lm, ids, attn, SamplerSettings(**base, cfg_scale=1.0)) == 4).all()
    stacked_ids, stacked_attn = model.calls[-1]
    assert stacked_ids.shape[0] == 4 and torch.equal(stacked_attn[:2], stacked_attn[2:])
    assert torch.equal(stacked_ids[:2, :3], ids)
    # the unconditional copy masks the real prompt tokens and leaves padding (attention 0) alone
    assert torch.equal(stacked_ids[2:, :3], torch.tensor([[PAD, MASK, MASK], [MASK, MASK, MASK]]))


def test_guidance_changes_nothing_when_the_prompt_does_not_matter():
    lm = toy_lm(FixedLogits(peaked_logits([1.0, 3.0, 2.0, 0.5], [3, 4, 5, 6]) + torch.randn(4, VOCAB,
                                                                                            generator=torch.Generator().manual_seed(0))))
    ids, attn = random_prompts(4, 3)
    plain = SamplerSettings(gen_length=4, block_length=2, steps=4, temperature=0.7)
    guided = SamplerSettings(gen_length=4, block_length=2, steps=4, temperature=0.7, cfg_scale=2.5)
    assert torch.equal(generate(lm, ids, attn, plain, torch.Generator().manual_seed(5), return_order=True)[1],
                       generate(lm, ids, attn, guided, torch.Generator().manual_seed(5), return_order=True)[1])
    assert torch.equal(generate(lm, ids, attn, plain, torch.Generator().manual_seed(5)),
                       generate(lm, ids, attn, guided, torch.Generator().manual_seed(5)))


# --- EOS ----------------------------------------------------------------------------------------------

def test_positions_after_the_first_eos_become_eos():
    logits_gv = peaked_logits([3.0, 3.0, 3.0, 3.0, 3.0], [4, EOS, 5, EOS, 6])
    ids, attn = random_prompts(2, 2)
    settings = SamplerSettings(gen_length=5, block_length=5, steps=5)
    assert torch.equal(generate(toy_lm(FixedLogits(logits_gv)), ids, attn, settings),
                       torch.tensor([[4, EOS, EOS, EOS, EOS]] * 2))
    raw = SamplerSettings(gen_length=5, block_length=5, steps=5, fill_after_eos=False)
    assert torch.equal(generate(toy_lm(FixedLogits(logits_gv)), ids, attn, raw),
                       torch.tensor([[4, EOS, 5, EOS, 6]] * 2))


# --- validation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(gen_length=10, block_length=4, steps=10, schedule="blocks"), "not a multiple of block_length"),
    (dict(gen_length=12, block_length=4, steps=10, schedule="blocks"), "not a multiple of the block count 3"),
    (dict(gen_length=8, block_length=4, steps=16, schedule="blocks"), "some steps would reveal nothing"),
    (dict(gen_length=0, block_length=4, steps=4), "must all be >= 1"),
    (dict(gen_length=8, block_length=4, steps=4, temperature=-0.1), "temperature"),
    (dict(gen_length=8, block_length=4, steps=4, temperature=float("nan")), "temperature"),
    (dict(gen_length=8, block_length=4, steps=4, remasking="top_p"), "remasking"),
    (dict(gen_length=8, block_length=4, steps=4, cfg_scale=-1.0), "cfg_scale"),
    (dict(confidence_threshold=0.0), r"confidence_threshold=0.0 must lie in \(0, 1\]"),
    (dict(confidence_threshold=1.5), r"confidence_threshold=1.5 must lie in \(0, 1\]"),
    (dict(confidence_threshold=-0.2), r"must lie in \(0, 1\]"),
    (dict(confidence_threshold=float("nan")), r"must lie in \(0, 1\]"),
    (dict(confidence_threshold=0.9, remasking="entropy"), "remasking='entropy' scores are not one"),
    (dict(confidence_threshold=0.9, remasking="random"), "remasking='random' scores are not one"),
    (dict(max_reveal_per_step=2), "set confidence_threshold too"),
    (dict(confidence_threshold=0.9, max_reveal_per_step=0), "max_reveal_per_step=0 must be >= 1"),
    (dict(kv_cache="full"), "kv_cache='full'; choose one of"),
    (dict(schedule="dream"), "schedule='dream'; choose one of"),
    (dict(schedule="global", schedule_eps=0.0), "schedule_eps=0.0 must lie in"),
    (dict(gen_length=8, steps=9, schedule="global"), "steps=9 exceeds gen_length=8"),
    (dict(top_k=0), "top_k=0 must be >= 1"),
    (dict(top_p=0.0), r"top_p=0.0 must lie in \(0, 1\]"),
    (dict(top_p=1.5), r"top_p=1.5 must lie in \(0, 1\]"),
])
def test_bad_settings_are_rejected_with_a_clear_message(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        SamplerSettings(**kwargs)


def test_bad_inputs_are_rejected_with_a_clear_message():
    lm = toy_lm(RelativeMixer())
    settings = SamplerSettings(gen_length=4, block_length=4, steps=4)
    ids, attn = random_prompts(2, 4, min_len=2)
    with pytest.raises(ValueError, match="left-padded"):
        generate(lm, ids, attn.flip(1), settings)
    with pytest.raises(ValueError, match="shape of prompt_ids"):
        generate(lm, ids, attn[:, 1:], settings)
    with pytest.raises(ValueError, match="only 0"):
        generate(lm, ids, attn * 2, settings)
    with pytest.raises(ValueError, match="long tensor"):
        generate(lm, ids.float(), attn, settings)
    with pytest.raises(ValueError, match="no mask token"):
        generate(toy_lm(RelativeMixer(), mask_id=None), ids, attn, settings)
    with pytest.raises(TypeError, match="SamplerSettings"):
        generate(lm, ids, attn, {"gen_length": 4})


# --- the built-in tiny model ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", hidden_size=32, num_layers=2, num_heads=2,
                            intermediate_size=64, seed=3)
    return load_masked_lm(path)


def tiny_prompts(lm, texts: list[str], extra_padding: int = 0):
    enc = lm.tokenizer(texts, padding=True, return_tensors="pt")
    assert lm.tokenizer.padding_side == "left"
    ids, attn = enc["input_ids"], enc["attention_mask"]
    if extra_padding:
        ids = torch.cat([torch.full((len(texts), extra_padding), lm.pad_id), ids], dim=1)
        attn = torch.cat([torch.zeros(len(texts), extra_padding, dtype=torch.long), attn], dim=1)
    return ids, attn


def test_tiny_model_invariants_determinism_and_left_padding(tiny_lm):
    texts = ["12+3=", "sudoku 0102", "a"]
    ids, attn = tiny_prompts(tiny_lm, texts)
    greedy = SamplerSettings(gen_length=8, block_length=4, steps=4, fill_after_eos=False)
    out, order = generate(tiny_lm, ids, attn, greedy, return_order=True)
    assert out.shape == (3, 8) and not (out == tiny_lm.mask_id).any()
    assert torch.equal(tiny_prompts(tiny_lm, texts)[0], ids)
    assert torch.equal(torch.stack([(order == s).sum(dim=1) for s in range(4)], dim=1), torch.full((3, 4), 2))
    assert torch.equal(generate(tiny_lm, ids, attn, greedy), out)
    # rotary positions + masked padding: more left padding changes nothing
    assert torch.equal(generate(tiny_lm, *tiny_prompts(tiny_lm, texts, extra_padding=5), greedy), out)
    hot = SamplerSettings(gen_length=8, block_length=4, steps=4, temperature=1.0, remasking="random")
    first = generate(tiny_lm, ids, attn, hot, torch.Generator().manual_seed(0))
    assert torch.equal(first, generate(tiny_lm, ids, attn, hot, torch.Generator().manual_seed(0)))
    assert not (first == tiny_lm.mask_id).any()


# --- reveal rules ---------------------------------------------------------------------------------

def test_each_reveal_rule_scores_hand_made_logits():
    from dipod.lm.reveal import REVEAL_RULES

    probs = [0.5, 0.3, 0.2]
    logits_blv = torch.tensor([[[math.log(p) for p in probs] + [float("-inf")]]])  # last token: the mask
    tokens_bl = torch.tensor([[0]])
    score = {name: rule.score(logits_blv, tokens_bl, 0.0, None).item() for name, rule in REVEAL_RULES.items()}
    assert score["low_confidence"] == pytest.approx(0.5, abs=1e-7)
    assert score["maskgit_plus"] == pytest.approx(0.5, abs=1e-7)
    assert score["topk_margin"] == pytest.approx(0.5 - 0.3, abs=1e-7)
    assert score["entropy"] == pytest.approx(sum(p * math.log(p) for p in probs), abs=1e-7)  # 0 log 0 = 0
    assert 0.0 <= score["random"] < 1.0
    # temperature 2: Dream's rules read softmax(logits / 2) (probabilities ~ sqrt(p)); LLaDA's does not
    root = [math.sqrt(p) for p in probs]
    tempered = [r / sum(root) for r in root]
    hot = {name: rule.score(logits_blv, tokens_bl, 2.0, None).item() for name, rule in REVEAL_RULES.items()}
    assert hot["low_confidence"] == pytest.approx(0.5, abs=1e-7)
    assert hot["maskgit_plus"] == pytest.approx(tempered[0], abs=1e-7)
    assert hot["topk_margin"] == pytest.approx(tempered[0] - tempered[1], abs=1e-7)
    assert hot["entropy"] == pytest.approx(sum(p * math.log(p) for p in tempered), abs=1e-7)
    # the score of the proposed token, not of the argmax
    assert REVEAL_RULES["maskgit_plus"].score(logits_blv, torch.tensor([[2]]), 0.0, None).item() == pytest.approx(0.2)
    assert REVEAL_RULES["low_confidence"].score(logits_blv, torch.tensor([[2]]), 1.0, None).item() == pytest.approx(0.2)


def test_reveal_rules_score_each_position_alone_in_float64_at_any_temperature():
    """Each position's score is its own distribution's (not a sum over the batch), float64 as the
    sampler's ranking expects; a temperature below 1 sharpens Dream's rules (p^2 at T = 0.5)."""
    from dipod.lm.reveal import REVEAL_RULES

    g = torch.Generator().manual_seed(0)
    logits_blv = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    tokens_bl = torch.randint(0, 5, (2, 3), generator=g)
    for name, rule in REVEAL_RULES.items():
        score = rule.score(logits_blv, tokens_bl, 0.5, torch.Generator().manual_seed(1))
        assert score.shape == (2, 3) and score.dtype == torch.float64, name
        if name != "random":
            alone = torch.stack([torch.stack([rule.score(logits_blv[b:b + 1, i:i + 1], tokens_bl[b:b + 1, i:i + 1],
                                                         0.5, None)[0, 0] for i in range(3)]) for b in range(2)])
            torch.testing.assert_close(score, alone, msg=name)
    probs = [0.5, 0.3, 0.2]
    logits = torch.tensor([[[math.log(p) for p in probs]]])
    sharp = [p * p / sum(q * q for q in probs) for p in probs]
    assert REVEAL_RULES["maskgit_plus"].score(logits, torch.tensor([[0]]), 0.5, None).item() == pytest.approx(sharp[0])
    assert REVEAL_RULES["low_confidence"].score(logits, torch.tensor([[0]]), 0.5, None).item() == pytest.approx(0.5)


def test_top_p_and_top_k_keep_the_nucleus_of_the_tempered_distribution():
    from dipod.lm.sampler import filter_logits

    logits_blv = torch.log(torch.tensor([[[0.5, 0.3, 0.15, 0.05]]]))

    def kept(temperature, top_k, top_p):
        return torch.isfinite(filter_logits(logits_blv, temperature, top_k, top_p))[0, 0].tolist()

    # mass of the tokens ranked above each one: 0, .5, .8, .95; a token goes once that exceeds top_p
    assert kept(0.0, None, 0.7) == [True, True, False, False]
    assert kept(0.0, None, 0.85) == [True, True, True, False]
    assert kept(0.0, None, 0.1) == [True, False, False, False]  # the most likely token always stays
    assert kept(0.0, None, 1.0) == kept(0.0, None, None) == [True] * 4
    # temperature 2 flattens the distribution (probabilities ~ sqrt(p)): .379, .293, .207, .120
    assert kept(2.0, None, 0.7) == [True, True, True, False]
    assert kept(0.0, 2, None) == [True, True, False, False]
    assert kept(0.0, 3, 0.7) == [True, True, False, False]
    # the surviving logits are unchanged, so scores read the renormalised distribution
    filtered = filter_logits(logits_blv, 0.0, 2, None)
    assert torch.softmax(filtered, dim=-1)[0, 0, 0].item() == pytest.approx(0.5 / 0.8)


def test_global_schedule_counts_follow_dreams_formula():
    from dipod.lm.reveal import global_counts

    # t = linspace(1, 1e-3, 5) = 1, .75025, .5005, .25075, .001; floor(n (1 - s/t)) of the masks left:
    # 8 * .24975 -> 1, 7 * .33289 -> 2, 5 * .49900 -> 2, and the last step takes the 3 left
    count = global_counts(steps=4, eps=1e-3)
    left, counts = 8, []
    for step in range(4):
        k = int(count(step, torch.arange(8)[None, :] < left, torch.zeros(1, 8))[0])
        counts.append(k)
        left -= k
    assert counts == [1, 2, 2, 3]
    # many masks tell the times apart to the fourth digit: t = linspace(1, eps, steps + 1) in float32
    import numpy as np

    times = np.linspace(1.0, 1e-3, 6, dtype=np.float32)
    count5 = global_counts(steps=5, eps=1e-3)
    for step in range(4):
        expected = int(np.float32(2000) * (np.float32(1.0) - times[step + 1] / times[step]))
        assert int(count5(step, torch.ones(1, 2000, dtype=torch.bool), torch.zeros(1, 2000))[0]) == expected
    lm = toy_lm(RelativeMixer(seed=4))
    ids, attn = random_prompts(3, 4, seed=5)
    out = decode(lm, ids, attn, SamplerSettings(gen_length=8, steps=4, schedule="global"))
    assert out.forward_passes == 4
    assert torch.equal(torch.stack([(out.order_bg == s).sum(dim=1) for s in range(4)], dim=1),
                       torch.tensor([[1, 2, 2, 3]] * 3))


# --- the block forward hook --------------------------------------------------------------------------

def test_forward_hook_sees_each_block_and_flags_its_first_step():
    lm = toy_lm(RelativeMixer(seed=6))
    ids, attn = random_prompts(4, 3, seed=1)
    calls = []

    def recording_forward(x_bt, attn_bt, lo, hi, new_block):
        calls.append((lo, hi, new_block))
        return lm.logits(x_bt, attn_bt)[:, lo:hi]

    settings = SamplerSettings(gen_length=8, block_length=4, steps=4)
    hooked = decode(lm, ids, attn, settings, forward=recording_forward)
    plain = decode(lm, ids, attn, settings)
    assert calls == [(3, 7, True), (3, 7, False), (7, 11, True), (7, 11, False)]
    assert hooked.forward_passes == plain.forward_passes == 4
    assert torch.equal(hooked.completion_bg, plain.completion_bg) and torch.equal(hooked.order_bg, plain.order_bg)


def test_kv_cache_asks_dipod_lm_networks_for_the_forward(monkeypatch):
    lm = toy_lm(RelativeMixer(seed=6))
    ids, attn = random_prompts(2, 3, seed=2)
    made = []

    def make_cached_forward(lm_arg, mode):
        made.append((lm_arg, mode))
        return lambda x_bt, attn_bt, lo, hi, new_block: lm_arg.logits(x_bt, attn_bt)[:, lo:hi]

    monkeypatch.setitem(sys.modules, "dipod.lm.networks", SimpleNamespace(make_cached_forward=make_cached_forward))
    settings = dict(gen_length=4, block_length=2, steps=4)
    cached = generate(lm, ids, attn, SamplerSettings(**settings, kv_cache="dual"))
    assert made == [(lm, "dual")]
    assert torch.equal(cached, generate(lm, ids, attn, SamplerSettings(**settings)))

    def refuse(lm_arg, mode):
        raise ValueError("kv_cache: no cached implementation for this family")

    monkeypatch.setitem(sys.modules, "dipod.lm.networks", SimpleNamespace(make_cached_forward=refuse))
    with pytest.raises(ValueError, match="no cached implementation"):
        generate(lm, ids, attn, SamplerSettings(**settings, kv_cache="prefix"))


# --- threshold parallel decoding -----------------------------------------------------------------------

def test_threshold_reveals_every_confident_position_and_at_least_one():
    # The confidence softmax spans all 8 tokens (the mask's logit 0 included): a peak a gives
    # probability e^a / (e^a + 7): 1 -> .28, 3 -> .74, 0.5 -> .19, 5 -> .955, 0.9 -> .26, 2.9 -> .72
    model = FixedLogits(peaked_logits([1.0, 3.0, 0.5, 5.0, 0.9, 2.9], [3, 4, 5, 6, 7, 3]))
    counting = CallCounter(model)
    lm = toy_lm(counting)
    ids, attn = random_prompts(2, 3)
    out = decode(lm, ids, attn, SamplerSettings(gen_length=6, block_length=6, steps=6, confidence_threshold=0.5))
    # step 0: the three above 0.5; then one per step, the most confident first (ties: leftmost)
    assert torch.equal(out.order_bg, torch.tensor([[1, 0, 3, 0, 2, 0]] * 2))
    assert out.forward_passes == counting.calls == 4
    capped = decode(lm, ids, attn, SamplerSettings(gen_length=6, block_length=6, steps=6, confidence_threshold=0.5,
                                                   max_reveal_per_step=2))
    assert torch.equal(capped.order_bg, torch.tensor([[2, 0, 4, 0, 3, 1]] * 2))
    assert capped.forward_passes == 5 and counting.calls == 9
    assert torch.equal(out.completion_bg, capped.completion_bg)


def test_threshold_counts_give_a_finished_row_nothing_while_others_reveal():
    from dipod.lm.reveal import threshold_counts

    masked_bl = torch.tensor([[False, False, False], [True, True, False]])
    score_bl = torch.tensor([[0.9, 0.9, 0.9], [0.2, 0.1, 0.9]], dtype=torch.float64)
    assert threshold_counts(0.5, None)(0, masked_bl, score_bl).tolist() == [0, 1]


def test_threshold_counts_only_scores_strictly_above_it():
    """"Above the threshold" is strict: with --confidence_threshold 1 a row whose masked positions all
    score a saturated 1.0 still reveals one token per step, not all of them at once."""
    from dipod.lm.reveal import threshold_counts

    masked = torch.tensor([[True, True, True, False], [True, True, False, False]])
    saturated = torch.ones(2, 4)
    assert threshold_counts(1.0, None)(0, masked, saturated).tolist() == [1, 1]
    scores = torch.tensor([[0.5, 0.6, 0.7, 0.9], [0.4, 0.5, 0.9, 0.9]])
    assert threshold_counts(0.5, None)(0, masked, scores).tolist() == [2, 1]  # 0.5 itself is not above 0.5
    assert threshold_counts(0.5, 1)(0, masked, scores).tolist() == [1, 1]


class CallCounter(nn.Module):
    """Counts the forwards of the model it wraps."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.calls = inner, 0

    def forward(self, input_ids, attention_mask):
        self.calls += 1
        return self.inner(input_ids, attention_mask)


@pytest.mark.parametrize("remasking", ["low_confidence", "maskgit_plus", "topk_margin"])
def test_threshold_steps_match_the_rule_on_the_models_own_logits(remasking):
    lm = toy_lm(RelativeMixer(seed=8))
    ids, attn = random_prompts(6, 4, seed=3)
    threshold = 0.3
    seen = []

    def recording_forward(x_bt, attn_bt, lo, hi, new_block):
        logits_blv = lm.logits(x_bt, attn_bt)[:, lo:hi]
        seen.append((x_bt[:, lo:hi].clone(), logits_blv.clone(), lo - 4))
        return logits_blv

    settings = SamplerSettings(gen_length=8, block_length=4, steps=2, remasking=remasking, confidence_threshold=threshold)
    out = decode(lm, ids, attn, settings, forward=recording_forward)
    assert out.forward_passes == len(seen)
    for step, (x_bl, logits_blv, start) in enumerate(seen):
        probs_blv = torch.softmax(logits_blv.double(), dim=-1)  # the mask token's logit included
        top2_bl2 = probs_blv.topk(2, dim=-1).values
        best_non_mask_bl = probs_blv.clone().index_fill_(-1, torch.tensor([MASK]), -1.0).max(dim=-1).values
        score_bl = top2_bl2[..., 0] - top2_bl2[..., 1] if remasking == "topk_margin" else best_non_mask_bl
        masked_bl = x_bl == MASK
        score_bl = score_bl.masked_fill(~masked_bl, float("-inf"))
        expected_bl = (score_bl > threshold) | (top_k_mask(score_bl, 1) & masked_bl)
        assert torch.equal(out.order_bg[:, start:start + 4] == step, expected_bl), step
    # every row reveals at least one token per step until its block is done; a block takes the
    # forwards its slowest row needs
    for start in (0, 4):
        steps_br = [sorted(set(row.tolist())) for row in out.order_bg[:, start:start + 4]]
        first = min(s[0] for s in steps_br)
        assert all(s == list(range(first, first + len(s))) for s in steps_br)
    assert out.forward_passes == sum(max(len(set(row.tolist())) for row in out.order_bg[:, s:s + 4]) for s in (0, 4))


@pytest.mark.parametrize("block_length, schedule", [(4, "blocks"), (8, "blocks"), (8, "global")])
def test_threshold_one_reveals_one_token_per_step(block_length, schedule):
    # No probability exceeds 1, so each step reveals exactly the most confident position: the
    # fixed schedule with one token per step (the global schedule is one block of the whole completion).
    lm = toy_lm(RelativeMixer(seed=2))
    ids, attn = random_prompts(5, 4, seed=6)
    threshold = SamplerSettings(gen_length=8, block_length=block_length, steps=2, schedule=schedule, temperature=0.7,
                                confidence_threshold=1.0)
    fixed = SamplerSettings(gen_length=8, block_length=block_length, steps=8, schedule="blocks", temperature=0.7)
    one = decode(lm, ids, attn, threshold, torch.Generator().manual_seed(4))
    reference = decode(lm, ids, attn, fixed, torch.Generator().manual_seed(4))
    assert one.forward_passes == reference.forward_passes == 8
    assert torch.equal(one.completion_bg, reference.completion_bg) and torch.equal(one.order_bg, reference.order_bg)


# --- family defaults -------------------------------------------------------------------------------------

def test_family_sampler_defaults_fill_only_what_the_user_left_unset():
    from dipod.lm.families import HFMaskedLM

    class GlobalFamily(HFMaskedLM):
        sampler_defaults = {"schedule": "global", "remasking": "entropy"}

    lm = MaskedDiffusionLM(model=RelativeMixer(seed=3), tokenizer=None, mask_id=MASK, pad_id=PAD, eos_id=EOS,
                           family=GlobalFamily())
    ids, attn = random_prompts(3, 4, seed=7)
    unset = SamplerSettings(gen_length=6, block_length=3, steps=4)
    assert unset.resolved(lm.family.sampler_defaults) == SamplerSettings(
        gen_length=6, block_length=3, steps=4, schedule="global", remasking="entropy")
    as_family = SamplerSettings(gen_length=6, block_length=3, steps=4, schedule="global", remasking="entropy")
    assert torch.equal(decode(lm, ids, attn, unset).order_bg, decode(lm, ids, attn, as_family).order_bg)
    mine = SamplerSettings(gen_length=6, block_length=3, steps=2, schedule="blocks", remasking="low_confidence")
    assert mine.resolved(lm.family.sampler_defaults) == mine
    assert decode(lm, ids, attn, mine).forward_passes == 2
    assert SamplerSettings().resolved({}).schedule == "blocks" and SamplerSettings().resolved({}).remasking == \
        "low_confidence"
    # an unset schedule is checked as blocks up front (no model needed), naming the way out
    with pytest.raises(ConfigError, match="not a multiple of block_length=4.*schedule=global"):
        SamplerSettings(gen_length=6, block_length=4, steps=3)
    assert SamplerSettings(gen_length=6, block_length=4, steps=3, schedule="global").num_blocks == 1


# --- the real architectures: parity with the models' own decoders ------------------------------------------

def load_snapshot(hub_models: dict, family: str, hub_code: bool = False) -> MaskedDiffusionLM:
    """The suite's tiny ``family`` checkpoint in our network, or (``hub_code``) ../shared/models' snapshot run
    by its own code: the legacy path, transformers 4.56-4.57."""
    if not hub_code:
        return load_masked_lm(str(hub_models[family]))
    from hub_snapshots import SNAPSHOTS, hub_code_loads

    if not SNAPSHOTS[family].is_dir():
        pytest.skip(f"{SNAPSHOTS[family]} (the hub code's snapshot) is absent")
    if not hub_code_loads():
        pytest.skip("the hub code of LLaDA / Dream loads on transformers 4.56-4.57 only")
    return load_masked_lm(str(SNAPSHOTS[family]), trust_remote_code=True)


def llada_generate_oracle(model, prompt_ids, mask_id, gen_length, block_length, steps, temperature=0.0,
                          generator=None, mask_in_confidence=True, propose_mask=True):
    """LLaDA's ``generate()`` (ML-GSAI/LLaDA, generate.py) written out from its description, for one batch
    of equal-length prompts, calling ``model(x)`` as it does (LLaDA's hub code ignores ``attention_mask``).

    Per block, each of ``steps / num_blocks`` steps reveals the block's masks split evenly (remainder to
    the first steps). A step proposes ``argmax`` of the logits over the WHOLE vocabulary (at T > 0 of the
    Gumbel-perturbed logits ``exp(logits) / (-log u)^T``, ``u`` uniform in float64) and scores it with
    ``softmax(logits)`` in the logits' own dtype, untempered, the mask token's logit included; the
    ``k`` best masked positions of the block take their proposals. One adaptation: ``u`` is drawn for the
    current block only, from ``generator``, as our sampler draws it (generate() draws it for the whole
    sequence from the global RNG), so sampled runs can be compared draw for draw.
    ``mask_in_confidence=False`` sets the mask logit to -inf first (dipod's earlier rule);
    ``propose_mask=False`` takes the proposal among the other tokens (dipod's sampler never proposes the
    mask: generate() may, and a position "revealed" as the mask token stays masked).
    ``model(x)`` returns logits (our network) or an output with ``.logits`` (the hub code)."""
    x = torch.cat([prompt_ids, torch.full((prompt_ids.shape[0], gen_length), mask_id)], dim=1)
    per_block = steps // (gen_length // block_length)
    for lo in range(prompt_ids.shape[1], x.shape[1], block_length):
        hi = lo + block_length
        base, extra = divmod(block_length, per_block)
        for step in range(per_block):
            out = model(x)
            logits = getattr(out, "logits", out)[:, lo:hi].clone()
            if not mask_in_confidence:
                logits[..., mask_id] = float("-inf")
            proposal_logits = logits.double() if temperature > 0 else logits.clone()
            if not propose_mask:
                proposal_logits[..., mask_id] = float("-inf")
            if temperature > 0:
                u = torch.rand(logits.shape, generator=generator, dtype=torch.float64)
                x0 = (proposal_logits.exp() / (-torch.log(u)) ** temperature).argmax(dim=-1)
            else:
                x0 = proposal_logits.argmax(dim=-1)
            confidence = torch.softmax(logits, dim=-1).gather(-1, x0[..., None])[..., 0]
            confidence = confidence.masked_fill(x[:, lo:hi] != mask_id, float("-inf"))
            chosen = torch.topk(confidence, base + (step < extra), dim=1).indices
            x[:, lo:hi] = x[:, lo:hi].scatter(1, chosen, x0.gather(1, chosen))
    return x[:, prompt_ids.shape[1]:]


def left_padded_prompts(lm, batch: int, max_len: int, seed: int):
    """Random prompts of lengths 2..max_len, left-padded with the model's pad token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, max_len + 1, (batch,), generator=g)
    lengths[0] = max_len  # one unpadded row
    attn = (torch.arange(max_len)[None, :] >= (max_len - lengths)[:, None]).long()
    ids = torch.randint(0, 90, (batch, max_len), generator=g).masked_fill(attn == 0, lm.pad_id)
    return ids, attn


@pytest.mark.parametrize("hub_code", [False, True], ids=["our_network", "hub_code"])
@pytest.mark.parametrize("block_length, steps", [(4, 8), (8, 8), (16, 16)])
def test_llada_greedy_padded_batch_equals_generate_row_by_row(hub_models, hub_code, block_length, steps):
    # generate() decodes one prompt, or a batch of equal length (its model attends to padding), so the
    # reference for a padded batch is each row alone, without its padding: ours must give that in one batch.
    lm = load_snapshot(hub_models, "llada", hub_code)
    ids, attn = left_padded_prompts(lm, 4, 7, seed=block_length)
    settings = SamplerSettings(gen_length=16, block_length=block_length, steps=steps, fill_after_eos=False)
    out = decode(lm, ids, attn, settings)
    assert out.forward_passes == steps
    with torch.no_grad():
        for row in range(ids.shape[0]):
            prompt = ids[row:row + 1, attn[row] == 1]
            expected = llada_generate_oracle(lm.model, prompt, lm.mask_id, 16, block_length, steps)
            assert torch.equal(out.completion_bg[row:row + 1], expected), row


@pytest.mark.parametrize("source", ["built", "shared"])
def test_llada_the_earlier_confidence_rule_is_a_named_option(hub_models, source):
    # mask_in_confidence=False (the mask logit at -inf before the confidence softmax) equals generate()
    # so modified; the default equals generate() proper. On ../shared's tiny-llada weights the two rules
    # decode differently (the option changes decoding); the suite's own random weights are too peaked
    # for the mask logit to reorder any reveal, so there only the two equalities are checked.
    from hub_snapshots import SNAPSHOTS

    if source == "shared" and not SNAPSHOTS["llada"].is_dir():
        pytest.skip(f"{SNAPSHOTS['llada']} (weights on which the two rules differ) is absent")
    lm = load_snapshot(hub_models if source == "built" else SNAPSHOTS, "llada")
    ids = torch.randint(0, 90, (8, 6), generator=torch.Generator().manual_seed(1))
    settings = SamplerSettings(gen_length=32, block_length=32, steps=32, fill_after_eos=False)
    earlier = decode(lm, ids, torch.ones_like(ids), dataclasses.replace(settings, mask_in_confidence=False))
    with torch.no_grad():
        expected = llada_generate_oracle(lm.model, ids, lm.mask_id, 32, 32, 32, mask_in_confidence=False)
        proper = llada_generate_oracle(lm.model, ids, lm.mask_id, 32, 32, 32)
    assert torch.equal(earlier.completion_bg, expected)
    assert torch.equal(decode(lm, ids, torch.ones_like(ids), settings).completion_bg, proper)
    if source == "shared":
        assert not torch.equal(expected, proper)


@pytest.mark.parametrize("temperature", [0.3, 1.0])
def test_llada_sampling_at_temperature_equals_the_reference_decoder_on_the_hub_code(hub_models, temperature):
    # RL rollouts run at T = 0.3..1: there the sampled token is often not the argmax, and low_confidence
    # must score the sampled token's untempered probability, as LLaDA's decoder does. At T > 0 generate()
    # may draw the mask token itself (probability ~1/V on these random weights); ours draws among the others.
    lm = load_snapshot(hub_models, "llada")
    ids = torch.randint(0, 90, (4, 6), generator=torch.Generator().manual_seed(1))
    settings = SamplerSettings(gen_length=16, block_length=8, steps=8, temperature=temperature, fill_after_eos=False)
    with torch.no_grad():
        expected = llada_generate_oracle(lm.model, ids, lm.mask_id, 16, 8, 8, temperature,
                                         torch.Generator().manual_seed(7), propose_mask=False)
    out = decode(lm, ids, torch.ones_like(ids), settings, generator=torch.Generator().manual_seed(7))
    assert torch.equal(out.completion_bg, expected)
    greedy = decode(lm, ids, torch.ones_like(ids), dataclasses.replace(settings, temperature=0.0))
    assert not torch.equal(out.completion_bg, greedy.completion_bg)  # the draws really left the argmax


@pytest.mark.parametrize("alg, top_p, top_k", [
    ("maskgit_plus", None, None), ("topk_margin", None, None), ("entropy", None, None),
    ("maskgit_plus", None, 50), ("topk_margin", 0.5, 20), ("entropy", 0.95, None),
])
@pytest.mark.parametrize("mask_in_confidence", [True, False], ids=["default", "mask_excluded"])
def test_dream_greedy_equals_diffusion_generate(hub_models, alg, top_p, top_k, mask_in_confidence):
    """Dream's own sampler (its hub code's ``diffusion_generate``) against ours on the same hub model."""
    lm = load_snapshot(hub_models, "dream", hub_code=True)
    prompt_len, gen_length, steps = 7, 32, 16
    ids = torch.randint(0, 90, (3, prompt_len), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :3] = 0  # left padding: Dream's own sampler then builds its 4-D mask and position ids
    attn[1, :1] = 0
    ids = ids.masked_fill(attn == 0, lm.pad_id)

    def no_mask_token(step, x, logits):  # Dream's logits hook, giving its sampler our earlier rule
        logits = logits.clone()
        logits[..., lm.mask_id] = float("-inf")
        return logits

    # top_p / top_k are passed explicitly: Dream's generation config otherwise fills in top_k=50.
    hook = {} if mask_in_confidence else {"generation_logits_hook_func": no_mask_token}
    expected = lm.model.diffusion_generate(ids, attention_mask=attn, max_new_tokens=gen_length, steps=steps,
                                           temperature=0.0, top_p=top_p, top_k=top_k, alg=alg,
                                           mask_token_id=lm.mask_id, **hook)
    # The family's defaults give Dream's global schedule; only the confidence rule is chosen here.
    out = decode(lm, ids, attn, SamplerSettings(gen_length=gen_length, steps=steps, remasking=alg, top_p=top_p,
                                                top_k=top_k, fill_after_eos=False,
                                                mask_in_confidence=mask_in_confidence))
    assert out.forward_passes == steps
    assert torch.equal(out.completion_bg, expected[:, prompt_len:])


# --- `dipod lm eval --json` -------------------------------------------------------------------------------

def test_lm_eval_json_records_forward_passes_and_accuracy(tmp_path):
    import json

    from dipod.lm import evaluate

    model_dir = build_tiny_model(tmp_path / "model", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                 seed=5)
    base = ["--model", str(model_dir), "--task", "sudoku4", "--limit", "6", "--batch_size", "4",
            "--gen_length", "16", "--block_length", "8", "--steps", "8"]

    def run(*extra):
        out = tmp_path / f"eval{len(list(tmp_path.glob('*.json')))}.json"
        assert evaluate.main(base + ["--json", str(out), *extra]) == 0
        return json.loads(out.read_text())

    fixed = run()
    assert fixed["forward_passes"] == 2 * 8  # two batches (4 + 2 prompts), 8 steps each
    assert fixed["row_forwards"] == (4 + 2) * 8  # every row takes part in every step of a fixed schedule
    assert fixed["sampler"]["schedule"] == "blocks" and fixed["sampler"]["remasking"] == "low_confidence"
    assert fixed["accuracy"] == sum(r["correct"] for r in fixed["results"]) / 6
    one_per_step = run("--confidence_threshold", "1.0")
    assert one_per_step["forward_passes"] == 2 * 16  # one token per forward
    assert one_per_step["sampler"]["confidence_threshold"] == 1.0
    parallel = run("--confidence_threshold", "0.01")
    assert 2 * 2 <= parallel["forward_passes"] < fixed["forward_passes"]  # at least one forward per block
    assert 6 * 2 <= parallel["row_forwards"] <= 4 * parallel["forward_passes"]  # each row: >= 1 per block
    with pytest.raises(ConfigError, match=r"confidence_threshold=1.5 must lie in \(0, 1\]"):
        evaluate.main(base + ["--confidence_threshold", "1.5"])


def test_train_sft_and_eval_configs_share_the_decoding_options():
    from dipod.config import parse_config
    from dipod.lm.evaluate import EvalConfig
    from dipod.lm.sft import SFTConfig
    from dipod.lm.train_config import TrainConfig

    flags = ["--confidence_threshold", "0.8", "--max_reveal_per_step", "3", "--kv_cache", "dual",
             "--remasking", "topk_margin", "--schedule", "global", "--schedule_eps", "0.01"]
    expected = dict(confidence_threshold=0.8, max_reveal_per_step=3, kv_cache="dual", remasking="topk_margin",
                    schedule="global", schedule_eps=0.01)
    configs = {
        "train": parse_config(TrainConfig, ["--model", "org/name", *flags], "t").sampler_settings(0.9),
        "sft": parse_config(SFTConfig, flags, "s").sampler_settings(),
        "eval": parse_config(EvalConfig, ["--model", "m", "--task", "sudoku4", *flags], "e").sampler_settings(),
    }
    for name, settings in configs.items():
        assert {key: getattr(settings, key) for key in expected} == expected, name
    for cls, extra in ((TrainConfig, ["--model", "org/name"]), (SFTConfig, []),
                       (EvalConfig, ["--model", "m", "--task", "sudoku4"])):
        with pytest.raises(ConfigError, match=r"confidence_threshold=0.0 must lie in \(0, 1\]"):
            parse_config(cls, [*extra, "--confidence_threshold", "0"], "x")
