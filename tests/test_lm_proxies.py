"""dipod.lm.proxies against the released processes and closed forms: the released per-sequence
formulas computed by hand on known log-probs, the laws of the block / count / subset draws, the
exact two-token model of dipod.toy, and invariants (determinism, chunking, shapes, dtypes)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dipod import toy
from dipod.lm.model import MaskedDiffusionLM
from dipod.lm.proxies import (
    ProxySettings,
    completion_mask,
    compute_proxies,
    MASKINGS,
    MaskDraw,
    decoding_orders,
    draw_masks,
    eubo_surrogate,
    gap_lower_bound,
    live_mask,
    order_log_probs,
)

A, B, MASK, PAD, EOS = 0, 1, 2, 3, 4
VOCAB = 5


class TwoTokenModel(nn.Module):
    """The two-token model of dipod.toy as a mask predictor: the last two positions are (x1, x2);
    six logits a..f give p(x_i = A | context); the prompt is ignored."""

    def __init__(self, theta: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta.clone().float())

    def forward(self, input_ids, attention_mask):
        a, b, c, d, e, f = self.theta
        x1, x2 = input_ids[:, -2], input_ids[:, -1]
        logit_x1 = torch.where(x2 == MASK, b, torch.where(x2 == A, a, e))
        logit_x2 = torch.where(x1 == MASK, d, torch.where(x1 == A, c, f))
        logits = torch.full((*input_ids.shape, VOCAB), -math.inf)
        logits[..., B] = 0.0
        logits = logits.clone()
        logits[:, -2, A] = logit_x1
        logits[:, -1, A] = logit_x2
        return SimpleNamespace(logits=logits)


class PositionOnlyModel(nn.Module):
    """Logits depend on the position only, never on the input: p(x) = prod_l q_l(x_l) exactly."""

    def __init__(self, seq_len: int, vocab: int = VOCAB, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(seq_len, vocab, generator=g))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1))


def _lm(module):
    return MaskedDiffusionLM(model=module, tokenizer=None, mask_id=MASK, pad_id=PAD, eos_id=EOS)


THETA = torch.tensor([1.3, -0.4, 0.9, 0.2, -1.1, 2.0], dtype=torch.float64)
OUTPUTS = torch.tensor([[A, A], [A, B], [B, A], [B, B]])


def _toy_batch(repeat: int = 1):
    completion = OUTPUTS.repeat(repeat, 1)
    prompt = torch.full((completion.shape[0], 1), 4)  # one (ignored) prompt token
    return prompt, torch.ones_like(prompt), completion


def _position_only_batch():
    prompt = torch.tensor([[PAD, PAD, 0, 1], [1, 0, 1, 1], [PAD, 0, 0, 0]])
    attn = (prompt != PAD).long()
    completion = torch.tensor([[0, 1, 1, 0, 0, 1], [1, 1, EOS, 0, EOS, 1], [0, 0, 0, 1, 1, EOS]])
    return prompt, attn, completion


def _exact_position_only_logp(model, prompt, completion):
    logq = model.table.detach().log_softmax(-1)[prompt.shape[1]:]  # [G, V]
    return logq.gather(1, completion.T).T  # [B, G]


# ----------------------------------------------------------------------------- the released formulas by hand


def _released_spg_per_token(logp_nkl, masked_nkl, live_nl, beta):
    """SPG's released per-token ELBO and EUBO (written from its formulas, loops and all): the mean
    log-prob over the masked live tokens of each draw; p^beta averaged over draws divided by each
    draw's empirical mask ratio, tokens never masked left out."""
    batch, draws, gen = logp_nkl.shape
    elbo, eubo = torch.zeros(batch), torch.zeros(batch)
    for n in range(batch):
        live = live_nl[n].float()
        per_draw = []
        avg = torch.zeros(gen)
        for k in range(draws):
            hit = masked_nkl[n, k].float() * live
            per_draw.append(float((logp_nkl[n, k] * hit).sum() / hit.sum()))
            empirical_t = hit.sum() / live.sum()
            avg += logp_nkl[n, k].exp() ** beta * hit / empirical_t / draws
        elbo[n] = sum(per_draw) / draws
        seen = avg > 0
        eubo[n] = (torch.where(seen, avg, 1.0).log() * seen).sum() / seen.sum() / beta
    return elbo, eubo


def _released_fpo_elbo(logp_nkl, masked_nkl, live_nl):
    """The d1 fork's FPO ELBO: per draw (L / max(n, 1)) * sum of the masked tokens' log-probs, mean over draws."""
    length_n = live_nl.float().sum(1)
    n_nk = masked_nkl.float().sum(-1)
    return (length_n[:, None] / n_nk.clamp(min=1) * (logp_nkl * masked_nkl).sum(-1)).mean(1)


# ----------------------------------------------------------------------------- masks


def test_completion_mask_conventions_of_the_two_processes():
    ids = torch.tensor([[5, EOS, 6, EOS], [5, 6, 7, 8], [EOS, 5, 5, 5]])
    mask = completion_mask(ids, EOS)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]  # SPG: the first EOS counts
    assert completion_mask(ids, EOS, include_eos=False).tolist() == [[1, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]
    assert torch.equal(live_mask(ids, EOS, ProxySettings(masking="block_random")), mask)
    assert torch.equal(live_mask(ids, EOS, ProxySettings(masking="random")), completion_mask(ids, EOS, False))
    assert ProxySettings(masking="block_random").num_draws == 2 and ProxySettings(masking="random").num_draws == 4


def test_random_is_fpo_floor_count_with_weight_l_over_max_n():
    g = torch.Generator().manual_seed(0)
    settings = ProxySettings(num_draws=4000, masking="random")
    live = torch.zeros(1, 6)
    live[0, :4] = 1  # L = 4, then the (visible) EOS and tail
    draw = draw_masks(torch.ones(1, 3), live, settings, g)
    count_k = draw.masked_nkl[0].sum(-1)
    assert torch.equal(draw.masked_nkl, draw.scored_nkl)
    assert not draw.masked_nkl[..., 4:].any()  # EOS and tail stay visible
    freq = torch.bincount(count_k, minlength=4).float() / count_k.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)  # n = floor(u L) uniform on {0..L-1}
    assert torch.allclose(draw.weight_nk[0], 4.0 / count_k.clamp(min=1).float())
    assert not draw.prompt_masked_ncp.any()
    narrow = draw_masks(torch.ones(2, 1), torch.ones(2, 10), ProxySettings(num_draws=500, masking="random",
                                                                          min_t=0.3, max_t=0.5), g)
    assert set(narrow.masked_nkl.sum(-1).flatten().tolist()) == {3, 4}  # floor(10 t), t in [0.3, 0.5)


def test_unbiased_random_count_is_uniform_on_1_to_l_and_tail_masked():
    settings = ProxySettings(num_draws=4000, masking="unbiased_random")
    live = torch.zeros(1, 6)
    live[0, :4] = 1
    draw = draw_masks(torch.ones(1, 3), live, settings, torch.Generator().manual_seed(0))
    count_k = draw.scored_nkl[0].sum(-1)
    assert draw.masked_nkl[..., 4:].all() and not draw.scored_nkl[..., 4:].any()
    freq = torch.bincount(count_k, minlength=5)[1:].float() / count_k.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)  # m = ceil(t L) uniform on {1..L}
    assert torch.allclose(draw.weight_nk[0], 4.0 / count_k.float())


def test_unbiased_random_mean_is_the_log_likelihood_of_an_input_ignoring_model():
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1])
    settings = ProxySettings(num_draws=4000, masking="unbiased_random")
    many = compute_proxies(_lm(model), prompt, attn, completion, settings, 1)
    live = live_mask(completion, EOS, settings)
    log_lik_n = (_exact_position_only_logp(model, prompt, completion) * live).sum(1)
    stderr = many.elbo_nk.std(1) / math.sqrt(4000)
    assert ((many.elbo_n - log_lik_n).abs() < 4 * stderr + 1e-4).all()


def _block_of(masked_nkl, live_nl, block):
    """The block of each draw: the first block (of live tokens) that is not fully clean, with p_mask_prompt = 0."""
    blocks = torch.arange(masked_nkl.shape[-1]) // block
    hit = masked_nkl & live_nl.bool()[:, None]
    return torch.where(hit, blocks, 10 ** 6).min(-1).values


def test_block_random_structure_counts_and_weights():
    settings = ProxySettings(num_draws=2, masking="block_random", block_length=4)
    gen_length = 12  # three blocks of 4
    live = torch.ones(600, gen_length)
    live[:, 10:] = 0  # L = 10: the last block holds 2 live tokens
    draw = draw_masks(torch.ones(600, 3), live, settings, torch.Generator().manual_seed(2))
    b_nk = _block_of(draw.masked_nkl, live, 4)
    blocks = torch.arange(gen_length) // 4
    for n in range(600):
        for k in range(2):
            b, masked, scored = int(b_nk[n, k]), draw.masked_nkl[n, k], draw.scored_nkl[n, k]
            assert not masked[blocks < b].any()  # earlier blocks clean (p_mask_prompt = 0)
            assert masked[blocks > b].all()  # every later position masked, the tail included
            in_block = int(masked[(blocks == b) & live[n].bool()].sum())
            assert 1 <= in_block <= min(4, 10 - 4 * b)
            assert torch.equal(scored, masked & live[n].bool())  # later blocks are scored too
            assert draw.weight_nk[n, k] == pytest.approx(10 / int(scored.sum()))
    assert (b_nk[:, 0] != b_nk[:, 1]).all()  # J = nb = 3: two entries of one permutation differ
    counts = torch.bincount(b_nk.flatten(), minlength=3).float() / b_nk.numel()
    assert torch.allclose(counts, torch.full((3,), 1 / 3), atol=0.04)


def test_block_random_block_law_is_permutation_modulo_live_blocks():
    """8 blocks, J = 3 live blocks: P(b) = (3, 3, 2) / 8 and P(b_0 = b_1) = 14 / 56 (SPG's randperm % J)."""
    settings = ProxySettings(num_draws=2, masking="block_random", block_length=2)
    live = torch.zeros(8000, 16)
    live[:, :6] = 1
    draw = draw_masks(torch.ones(8000, 1), live, settings, torch.Generator().manual_seed(3))
    b_nk = _block_of(draw.masked_nkl, live, 2)
    freq = torch.bincount(b_nk.flatten(), minlength=3).float() / b_nk.numel()
    assert torch.allclose(freq, torch.tensor([3 / 8, 3 / 8, 2 / 8]), atol=0.015)
    assert float((b_nk[:, 0] == b_nk[:, 1]).float().mean()) == pytest.approx(0.25, abs=0.015)
    in_block = (draw.masked_nkl & (torch.arange(16) // 2 == b_nk[..., None])).sum(-1)
    assert set(in_block.flatten().tolist()) == {1, 2}  # randint(1, M) with M = 2


def test_block_random_p_mask_prompt_reaches_earlier_blocks_and_they_are_scored():
    settings = ProxySettings(num_draws=2, masking="block_random", block_length=2, p_mask_prompt=1.0)
    attn = torch.tensor([[0, 1, 1]] * 50)
    live = torch.ones(50, 8)
    draw = draw_masks(attn, live, settings, torch.Generator().manual_seed(5))
    blocks = torch.arange(8) // 2
    assert torch.equal(draw.prompt_masked_ncp, attn.bool()[:, None].expand(-1, 3, -1))  # padding never
    assert draw.masked_nkl.sum(-1).min() >= 1
    for n in range(50):
        for k in range(2):
            masked = draw.masked_nkl[n, k]
            first_clean = (~masked).nonzero()
            if first_clean.numel() == 0:
                continue  # the chosen block had every token masked
            b = int(blocks[first_clean[0, 0]])  # the chosen block: the only one that can hold clean tokens
            assert masked[blocks != b].all()  # earlier blocks all masked by p_mask_prompt = 1, later ones always
    assert torch.equal(draw.scored_nkl, draw.masked_nkl)
    assert torch.allclose(draw.weight_nk, 8 / draw.scored_nkl.sum(-1).float())


def test_block_random_beyond_the_release_partial_block_and_more_draws_than_blocks():
    """G = 5 with blocks of 2 (a last partial block) and K = 5 > 3 blocks: draws 0-2 and 3-4 come from
    two permutations, so each group of three holds distinct blocks when all three hold live tokens."""
    settings = ProxySettings(num_draws=5, masking="block_random", block_length=2)
    live = torch.ones(300, 5)
    draw = draw_masks(torch.ones(300, 1), live, settings, torch.Generator().manual_seed(6))
    b_nk = _block_of(draw.masked_nkl, live, 2)
    assert torch.equal(b_nk[:, :3].sort(-1).values, torch.arange(3).expand(300, -1))
    assert torch.equal(b_nk[:, 3:4] == b_nk[:, 4:5], torch.zeros(300, 1, dtype=torch.bool))
    last = b_nk == 2  # the partial block holds one token: it is the only one masked there
    assert (draw.masked_nkl[..., 4][last]).all() and (draw.masked_nkl[last].sum(-1) == 1).all()


def test_masks_are_deterministic_per_seed_and_differ_across_seeds():
    for masking in MASKINGS:
        settings = ProxySettings(num_draws=3, masking=masking, block_length=4, p_mask_prompt=0.5)
        attn, live = torch.ones(4, 6), torch.ones(4, 12)
        d1 = draw_masks(attn, live, settings, torch.Generator().manual_seed(7))
        d2 = draw_masks(attn, live, settings, torch.Generator().manual_seed(7))
        d3 = draw_masks(attn, live, settings, torch.Generator().manual_seed(8))
        for field in ("masked_nkl", "scored_nkl", "weight_nk", "prompt_masked_ncp"):
            assert torch.equal(getattr(d1, field), getattr(d2, field))
        assert not torch.equal(d1.masked_nkl, d3.masked_nkl)
        assert d1.prompt_masked_ncp.any() and not d1.prompt_masked_ncp.all()


# ----------------------------------------------------------------------------- input-ignoring model


@pytest.mark.parametrize("masking", MASKINGS)
def test_per_sequence_values_equal_the_released_formulas(masking):
    """Same draws, known log-probs: ELBO and EUBO equal the released per-sequence values (SPG's per-token
    values times L; FPO's L/max(n,1)-weighted sums) to float32 rounding."""
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1])
    settings = ProxySettings(num_draws=6 if masking == "random" else 1, masking=masking, block_length=2,
                             p_mask_prompt=0.3)
    out = compute_proxies(_lm(model), prompt, attn, completion, settings, seed=3, meanfield=True)
    live = live_mask(completion, EOS, settings)
    draw = draw_masks(attn, live, settings, torch.Generator().manual_seed(3))
    logp_nl = _exact_position_only_logp(model, prompt, completion)
    logp_nkl = logp_nl[:, None].expand(-1, settings.num_draws, -1)
    if masking == "random":
        assert torch.allclose(out.elbo_n, _released_fpo_elbo(logp_nkl, draw.masked_nkl, live), atol=1e-5)
        assert torch.equal(out.lengths_n, torch.tensor([6.0, 2.0, 5.0]))
    else:
        elbo_pt, eubo_pt = _released_spg_per_token(logp_nkl, draw.masked_nkl, live, settings.eubo_beta)
        assert torch.allclose(out.elbo_n, elbo_pt * out.lengths_n, atol=1e-5)
        assert torch.allclose(out.elbo_per_token_n, elbo_pt, atol=1e-6)
        assert torch.allclose(out.eubo_n, eubo_pt * out.lengths_n, atol=1e-5)
        assert torch.equal(out.lengths_n, torch.tensor([6.0, 3.0, 6.0]))
    assert torch.allclose(out.meanfield_logp_nl, logp_nl, atol=1e-6)


def test_spg_formulas_with_two_draws_by_hand():
    """One row, L = 4, two given draws; the released SPG values computed with pencil-and-paper numbers."""
    logp = torch.log(torch.tensor([0.5, 0.25, 0.8, 0.1]))
    masked = torch.tensor([[[False, True, True, True], [False, False, True, False]]])
    draw = MaskDraw.from_masks(masked, torch.ones(1, 4), torch.zeros(1, 3, 1, dtype=torch.bool))
    assert torch.allclose(draw.weight_nk, torch.tensor([[4 / 3, 4.0]]))
    elbo_nk = draw.weight_nk * (draw.scored_nkl * logp).sum(-1)
    expected_elbo = 0.5 * (4 / 3 * math.log(0.25 * 0.8 * 0.1) + 4 * math.log(0.8))
    assert float(elbo_nk.mean()) == pytest.approx(expected_elbo, rel=1e-6)
    beta = 1.5  # token 0 never masked: left out, the 3 seen tokens rescaled to L = 4
    e1 = math.log(0.5 * (4 / 3) * 0.25 ** beta) / beta
    e2 = math.log(0.5 * ((4 / 3) * 0.8 ** beta + 4 * 0.8 ** beta)) / beta
    e3 = math.log(0.5 * (4 / 3) * 0.1 ** beta) / beta
    eubo = eubo_surrogate(logp.expand(1, 2, 4), draw.scored_nkl, draw.weight_nk, beta, torch.tensor([4.0]))
    assert float(eubo) == pytest.approx((e1 + e2 + e3) * 4 / 3, rel=1e-6)
    _, eubo_pt = _released_spg_per_token(logp.expand(1, 2, 4), masked, torch.ones(1, 4), beta)
    assert float(eubo) == pytest.approx(float(eubo_pt) * 4, rel=1e-6)


def _recording_lm(seen: list[torch.Tensor]):
    """A model of zero logits that appends every input it is given to ``seen``: what each forward sees."""

    class Recorder(nn.Module):
        def forward(self, input_ids, attention_mask):
            seen.append(input_ids.clone())
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    return _lm(Recorder())


def test_random_keeps_eos_and_tail_visible_block_random_hides_the_tail():
    seen: list[torch.Tensor] = []
    prompt, attn, completion = _position_only_batch()
    for masking in MASKINGS:
        seen.clear()
        settings = ProxySettings(num_draws=2, masking=masking, block_length=2)
        compute_proxies(_recording_lm(seen), prompt, attn, completion, settings, 0)
        noisy = seen[0][:, prompt.shape[1]:].view(3, 2, -1)
        tail = completion_mask(completion, EOS, include_eos=False) == 0  # the EOS and after
        if masking == "random":
            assert torch.equal(noisy[tail[:, None].expand_as(noisy)], completion[:, None].expand_as(noisy)[
                tail[:, None].expand_as(noisy)])
        else:
            after_eos = completion_mask(completion, EOS) == 0
            assert (noisy[after_eos[:, None].expand_as(noisy)] == MASK).all()


def test_input_ignoring_model_all_masked_is_the_log_likelihood():
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1])
    settings = ProxySettings(num_draws=3, masking="random", min_t=1.0)
    full = compute_proxies(_lm(model), prompt, attn, completion, settings, 0)
    live = live_mask(completion, EOS, settings)
    log_lik_n = (_exact_position_only_logp(model, prompt, completion) * live).sum(1)
    assert torch.allclose(full.elbo_nk, log_lik_n[:, None].expand(-1, 3), atol=1e-5)
    assert torch.allclose(full.eubo_n, log_lik_n, atol=1e-5)
    gap = gap_lower_bound(_lm(model), prompt, attn, completion, ProxySettings(masking="random"), num_orders=5, seed=0)
    assert gap.abs().max() < 1e-5  # every order gives the same probability


# ----------------------------------------------------------------------------- the exact two-token model


def test_order_log_probs_match_exact_two_token_orders():
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    steps = torch.tensor([[0, 1], [1, 0]])[None].expand(4, -1, -1)  # order 0: x1 first; order 1: x2 first
    log_p_nk = order_log_probs(lm, prompt, attn, completion, steps)
    assert torch.allclose(log_p_nk.double(), toy.order_log_probs(THETA), atol=1e-5)


def _two_token_conditionals():
    """Exact ``log p(x_i | context)`` of the two-token model for the four outputs: (x1 | x2 masked),
    (x2 | x1 masked), (x1 | x2), (x2 | x1), each [4], from the six logits of THETA."""
    a, b, c, d, e, f = THETA
    x1_is_a, x2_is_a = OUTPUTS[:, 0] == A, OUTPUTS[:, 1] == A

    def logp(logit, is_a):
        return torch.where(is_a, torch.nn.functional.logsigmoid(logit), torch.nn.functional.logsigmoid(-logit))

    ones = torch.ones(4, dtype=THETA.dtype)
    return (logp(b * ones, x1_is_a), logp(d * ones, x2_is_a),
            logp(torch.where(x2_is_a, a, e), x1_is_a), logp(torch.where(x1_is_a, c, f), x2_is_a))


def test_two_token_block_random_values_in_closed_form():
    """Blocks of one token, K = 2 = all blocks: the draws are block 0 (both tokens masked, both
    scored, w = 1) and block 1 (x1 visible, x2 scored, w = 2), in some order: exact values."""
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    x1_mf, x2_mf, _, x2_given_x1 = _two_token_conditionals()
    beta = 1.5
    out = compute_proxies(lm, prompt, attn, completion,
                          ProxySettings(num_draws=2, masking="block_random", block_length=1, eubo_beta=beta), seed=0)
    expected_elbo = 0.5 * (x1_mf + x2_mf) + x2_given_x1
    assert torch.allclose(out.elbo_n.double(), expected_elbo, atol=1e-5)
    eubo_x1 = torch.log(0.5 * (beta * x1_mf).exp()) / beta
    eubo_x2 = torch.log(0.5 * ((beta * x2_mf).exp() + 2 * (beta * x2_given_x1).exp())) / beta
    assert torch.allclose(out.eubo_n.double(), eubo_x1 + eubo_x2, atol=1e-5)


def test_two_token_random_mean_converges_to_closed_form():
    """FPO's process with L = 2: n = floor(2u) is 0 (the draw is 0) or 1 (one token scored with w = 2,
    the other visible), so E[ELBO_k] = (log p(x1 | x2) + log p(x2 | x1)) / 2."""
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    _, _, x1_given_x2, x2_given_x1 = _two_token_conditionals()
    draws = 20000
    out = compute_proxies(lm, prompt, attn, completion, ProxySettings(num_draws=draws, masking="random"), seed=0)
    stderr = out.elbo_nk.std(1).double() / math.sqrt(draws)
    assert ((out.elbo_n.double() - 0.5 * (x1_given_x2 + x2_given_x1)).abs() < 4 * stderr).all()
    assert float((out.elbo_nk == 0).float().mean()) == pytest.approx(0.5, abs=0.01)


def _exact_expected_monitor(num_orders: int) -> torch.Tensor:
    """E[IW_K - ELBO_K] for the two-token model: j of K orders are x1-first with prob C(K,j)/2^K."""
    lp = toy.order_log_probs(THETA)  # [4, 2]
    total = torch.zeros(4, dtype=torch.float64)
    for j in range(num_orders + 1):
        prob = math.comb(num_orders, j) / 2 ** num_orders
        iw = torch.logsumexp(torch.stack([lp[:, 0] + math.log(j) if j else torch.full((4,), -math.inf, dtype=lp.dtype),
                                          lp[:, 1] + math.log(num_orders - j) if j < num_orders
                                          else torch.full((4,), -math.inf, dtype=lp.dtype)]), 0) - math.log(num_orders)
        elbo_k = (j * lp[:, 0] + (num_orders - j) * lp[:, 1]) / num_orders
        total += prob * (iw - elbo_k)
    return total


@pytest.mark.parametrize("num_orders", [2, 8])
def test_gap_monitor_matches_exact_two_token_expectation(num_orders):
    lm = _lm(TwoTokenModel(THETA))
    repeat = 1500
    prompt, attn, completion = _toy_batch(repeat)
    gap_n = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="random"), num_orders, seed=5)
    assert (gap_n >= -1e-6).all()  # IW_K >= ELBO_K for every sample (Jensen)
    true_gap = toy.gap(THETA)
    per_output = gap_n.view(repeat, 4).double()
    if num_orders == 2:  # each sample is 0 or the exact gap; larger K can exceed it per sample
        assert (per_output <= true_gap + 1e-5).all()
    stderr = per_output.std(0) / math.sqrt(repeat)
    expected = _exact_expected_monitor(num_orders)
    assert ((per_output.mean(0) - expected).abs() < 4 * stderr + 1e-6).all()
    assert (expected <= true_gap).all() and (expected > 0).all()


def test_gap_monitor_with_one_order_is_allowed_and_exactly_zero():
    """K = 1 is the smallest monitor: IW_1 = ELBO_1 (the log-mean-exp of one term is that term), so every
    sequence's gap is 0; K = 0 is refused."""
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch(3)
    gap_n = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="random"), 1, seed=0)
    assert gap_n.shape == (12,) and gap_n.abs().max() < 1e-6
    with pytest.raises(ValueError, match=r"^gap_lower_bound: num_orders=0 must be >= 1$"):
        gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="random"), 0, seed=0)


def test_gap_monitor_converges_to_true_gap_for_many_orders():
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    expected = [_exact_expected_monitor(k) for k in (1, 2, 8, 64, 512)]
    assert all((lo <= hi + 1e-12).all() for lo, hi in zip(expected, expected[1:]))  # E[IW_K] rises with K
    assert torch.allclose(expected[-1], toy.gap(THETA), atol=2e-3)
    gap_n = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="random"), 4000, seed=0)
    assert torch.allclose(gap_n.double(), toy.gap(THETA), atol=0.01)
    # Block-by-block decoding with blocks of one token has one order: no gap at all.
    block = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="block_random", block_length=1), 8, 0)
    assert block.abs().max() < 1e-6


def test_decoding_orders_are_permutations_and_respect_blocks():
    live = torch.ones(3, 7)
    live[0, 5:] = 0  # an EOS tail of two positions
    steps = decoding_orders(live, 5, ProxySettings(masking="block_random", block_length=3),
                            torch.Generator().manual_seed(0))
    assert torch.equal(steps.sort(-1).values, torch.arange(7).expand(3, 5, -1))
    assert (steps[0, :, 5:] >= 5).all()  # the tail comes after every live token
    block_of_l = torch.arange(7) // 3
    assert (steps[..., block_of_l == 0].max(-1).values < steps[..., block_of_l == 1].min(-1).values).all()


@pytest.mark.parametrize("masking", MASKINGS)
def test_drift_monitor_shows_the_eos_tail_only_where_its_process_does(masking):
    """The drift monitor's orders treat the positions after the live tokens as the process does: block_random and
    unbiased_random keep them masked in every forward (as in every ELBO copy), random shows the EOS and the tail (as
    its ELBO copies do); step s of an order sees exactly L_n - s live tokens still masked."""
    seen: list[torch.Tensor] = []
    prompt, attn, completion = _position_only_batch()
    settings = ProxySettings(masking=masking, block_length=2)
    gap_lower_bound(_recording_lm(seen), prompt, attn, completion, settings, num_orders=3, seed=0)
    live = live_mask(completion, EOS, settings).bool()
    assert len(seen) == int(live.sum(1).max())  # one forward per step
    tail = ~live[:, None].expand(-1, 3, -1)
    hidden = torch.full((3, 3, completion.shape[1]), MASK) if settings.process.masks_tail else \
        completion[:, None].expand(-1, 3, -1)
    for step, ids in enumerate(seen):
        noisy = ids[:, prompt.shape[1]:].view(3, 3, -1)
        assert torch.equal(noisy[tail], hidden[tail])
        still_masked = ((noisy == MASK) & live[:, None]).sum(-1)
        assert torch.equal(still_masked, (live.sum(1)[:, None] - step).clamp(min=0).expand(-1, 3))


# ----------------------------------------------------------------------------- EUBO by hand


def test_eubo_surrogate_against_hand_computation():
    logp_nkl = torch.log(torch.tensor([[[0.5, 0.2, 0.9], [0.4, 0.3, 0.6]]]))
    scored_nkl = torch.tensor([[[True, False, True], [True, False, False]]])
    weight_nk = torch.tensor([[2.0, 3.0]])
    beta = 1.5
    token0 = math.log((2.0 * 0.5 ** beta + 3.0 * 0.4 ** beta) / 2) / beta
    token2 = math.log((2.0 * 0.9 ** beta) / 2) / beta  # scored in one draw of two; token 1 in none
    value = eubo_surrogate(logp_nkl, scored_nkl, weight_nk, beta, torch.tensor([3.0]))
    assert value.item() == pytest.approx((token0 + token2) * 3 / 2, rel=1e-6)  # 2 of 3 live tokens seen
    all_seen = eubo_surrogate(logp_nkl[..., [0, 2]], scored_nkl[..., [0, 2]], weight_nk, beta, torch.tensor([2.0]))
    assert all_seen.item() == pytest.approx(token0 + token2, rel=1e-6)


def test_eubo_gradient_is_finite_when_a_token_is_never_scored():
    logp_nkl = torch.log(torch.tensor([[[0.5, 0.2], [0.4, 0.3]]])).requires_grad_()
    scored_nkl = torch.tensor([[[True, False], [True, False]]])
    eubo_surrogate(logp_nkl, scored_nkl, torch.ones(1, 2), 1.5, torch.tensor([2.0])).backward()
    assert torch.isfinite(logp_nkl.grad).all()
    assert logp_nkl.grad[..., 1].abs().max() == 0


# ----------------------------------------------------------------------------- invariants


def test_shapes_dtypes_determinism_and_gradients():
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1]).to(torch.bfloat16)
    lm = _lm(model)
    settings = ProxySettings(num_draws=3, masking="block_random", block_length=2, p_mask_prompt=0.2)
    out = compute_proxies(lm, prompt, attn, completion, settings, seed=11, meanfield=True)
    shapes = {"elbo_nk": (3, 3), "elbo_n": (3,), "elbo_per_token_n": (3,), "eubo_n": (3,),
              "completion_mask_nl": (3, 6), "lengths_n": (3,), "meanfield_logp_nl": (3, 6)}
    for name, shape in shapes.items():
        value = getattr(out, name)
        assert value.shape == shape and value.dtype == torch.float32, name
    again = compute_proxies(lm, prompt, attn, completion, settings, seed=11)
    assert again.meanfield_logp_nl is None
    assert torch.equal(again.elbo_nk, out.elbo_nk)  # the mean-field copy does not change the draws
    other = compute_proxies(lm, prompt, attn, completion, settings, seed=12)
    assert not torch.equal(other.elbo_nk, out.elbo_nk)
    (out.elbo_n.sum() + out.eubo_n.sum() + out.meanfield_logp_nl.sum()).backward()
    assert model.table.grad is not None and torch.isfinite(model.table.grad.float()).all()


def test_chunked_forward_gives_the_same_values():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, batch_first=True, dropout=0.0)

    class SmallEncoder(nn.Module):  # depends on the input, unlike PositionOnlyModel
        def __init__(self):
            super().__init__()
            self.embed, self.layer, self.head = nn.Embedding(VOCAB, 16), layer, nn.Linear(16, VOCAB)

        def forward(self, input_ids, attention_mask):
            h = self.layer(self.embed(input_ids), src_key_padding_mask=attention_mask == 0)
            return SimpleNamespace(logits=self.head(h))

    lm = _lm(SmallEncoder().eval())
    prompt, attn, completion = _position_only_batch()
    whole = compute_proxies(lm, prompt, attn, completion, ProxySettings(num_draws=3, masking="random"), 4,
                            meanfield=True)
    chunked = compute_proxies(lm, prompt, attn, completion,
                              ProxySettings(num_draws=3, masking="random", max_tokens_per_forward=25), 4,
                              meanfield=True)  # 25 tokens = 2 rows of 10 per forward
    for name in ("elbo_nk", "eubo_n", "meanfield_logp_nl"):
        assert torch.allclose(getattr(whole, name), getattr(chunked, name), rtol=1e-5, atol=1e-5), name
    gap_whole = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(), 3, seed=1)
    gap_chunked = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(max_tokens_per_forward=10), 3, seed=1)
    assert torch.allclose(gap_whole, gap_chunked, atol=1e-5)
    assert (gap_whole >= -1e-6).all()


def test_eos_tail_never_changes_the_proxies():
    torch.manual_seed(1)

    class Mixer(nn.Module):  # every output position depends on every input token
        def __init__(self):
            super().__init__()
            self.embed, self.head = nn.Embedding(VOCAB, 8), nn.Linear(16, VOCAB)

        def forward(self, input_ids, attention_mask):
            h = self.embed(input_ids)
            pooled = (h * attention_mask[..., None]).sum(1, keepdim=True).expand_as(h)
            return SimpleNamespace(logits=self.head(torch.cat([h, pooled], -1)))

    lm = _lm(Mixer())
    prompt, attn, completion = _position_only_batch()
    other_tail = completion.clone()
    other_tail[1, 3:] = torch.tensor([1, 0, 0])  # after row 1's first EOS at position 2
    settings = ProxySettings(num_draws=3, masking="block_random", block_length=2, p_mask_prompt=0.2)
    a = compute_proxies(lm, prompt, attn, completion, settings, 9, meanfield=True)
    b = compute_proxies(lm, prompt, attn, other_tail, settings, 9, meanfield=True)
    assert torch.equal(a.elbo_nk, b.elbo_nk) and torch.equal(a.eubo_n, b.eubo_n)
    live = a.completion_mask_nl.bool()
    assert torch.equal(a.meanfield_logp_nl[live], b.meanfield_logp_nl[live])
    gap_a = gap_lower_bound(lm, prompt, attn, completion, settings, 3, 0)
    assert torch.equal(gap_a, gap_lower_bound(lm, prompt, attn, other_tail, settings, 3, 0))


def test_settings_and_batch_validation():
    with pytest.raises(ValueError, match="masking"):
        ProxySettings(masking="uniform")
    with pytest.raises(ValueError, match="min_t"):
        ProxySettings(min_t=0.6, max_t=0.5)
    with pytest.raises(ValueError, match="num_draws"):
        ProxySettings(num_draws=0)
    with pytest.raises(ValueError, match="eubo_beta"):
        ProxySettings(eubo_beta=0.0)
    lm = _lm(PositionOnlyModel(8))
    with pytest.raises(ValueError, match="same B"):
        compute_proxies(lm, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), torch.zeros(3, 4, dtype=torch.long),
                        ProxySettings(), 0)
    with pytest.raises(ValueError, match="num_orders"):
        gap_lower_bound(lm, torch.zeros(1, 2, dtype=torch.long), torch.ones(1, 2), torch.zeros(1, 2, dtype=torch.long),
                        ProxySettings(), 0, 0)


def test_tiny_model_in_bf16_gives_finite_float32_proxies(tmp_path):
    pytest.importorskip("transformers")
    from dipod.lm.model import build_tiny_model, load_masked_lm

    lm = load_masked_lm(build_tiny_model(tmp_path / "tiny", hidden_size=32, num_layers=1, num_heads=2,
                                         intermediate_size=32, max_positions=64), dtype="bf16")
    enc = lm.tokenizer(["1+2=", "sum 3 4:"], padding=True, return_tensors="pt")
    completion = lm.tokenizer(["3<eos><eos><eos>", "7 ok"], return_tensors="pt")["input_ids"]
    settings = ProxySettings(num_draws=2, masking="block_random", block_length=2, p_mask_prompt=0.1)
    out = compute_proxies(lm, enc["input_ids"], enc["attention_mask"], completion, settings, 0, meanfield=True)
    assert out.lengths_n.tolist() == [2.0, 4.0]  # "3<eos>" counts up to and including the first EOS
    for value in (out.elbo_nk, out.eubo_n, out.meanfield_logp_nl):
        assert value.dtype == torch.float32 and torch.isfinite(value).all()
    gap = gap_lower_bound(lm, enc["input_ids"], enc["attention_mask"], completion, settings, 2, 0)
    assert gap.dtype == torch.float32 and (gap >= -1e-5).all()


@pytest.mark.parametrize("masking", ["block_random", "random"])
def test_p_mask_prompt_zero_never_masks_and_one_always_masks_even_at_a_zero_uniform(masking, monkeypatch):
    # u ~ U[0, 1) can be exactly 0; "masked with probability p" is u < p, so p = 0 (the released
    # setting) must never mask a prompt token, and p = 1 must mask every real one.
    monkeypatch.setattr(torch, "rand", lambda *shape, generator=None, **kw: torch.zeros(*shape))
    attn = torch.tensor([[0, 1, 1]])
    for p, expected in ((0.0, False), (1.0, True)):
        settings = ProxySettings(num_draws=2, masking=masking, block_length=2, p_mask_prompt=p)
        draw = draw_masks(attn, torch.ones(1, 4), settings, torch.Generator())
        assert torch.equal(draw.prompt_masked_ncp[..., 1:], torch.full((1, 3, 2), expected))
        assert not draw.prompt_masked_ncp[..., 0].any()  # padding is never a prompt token
