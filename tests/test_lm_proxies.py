"""dipod.lm.proxies against closed forms: an input-ignoring model, the exact two-token model of
dipod.toy, hand-computed EUBO values, and invariants (determinism, chunking, shapes, dtypes)."""

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
    decoding_orders,
    draw_masks,
    eubo_surrogate,
    gap_lower_bound,
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


# ----------------------------------------------------------------------------- masks


def test_completion_mask_counts_up_to_and_including_first_eos():
    mask = completion_mask(torch.tensor([[5, EOS, 6, EOS], [5, 6, 7, 8], [EOS, 5, 5, 5]]), EOS)
    assert mask.dtype == torch.float32
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_random_masking_counts_weights_and_uniform_count():
    g = torch.Generator().manual_seed(0)
    settings = ProxySettings(num_draws=4000, masking="random", p_mask_prompt=0.0)
    draw = draw_masks(torch.ones(1, 3), torch.ones(1, 4), settings, g)
    count_k = draw.masked_nkl[0].sum(-1)
    assert torch.equal(draw.masked_nkl, draw.scored_nkl)
    assert int(count_k.min()) >= 1 and int(count_k.max()) <= 4
    assert torch.allclose(draw.weight_nk[0], 4.0 / count_k.float())
    freq = torch.bincount(count_k, minlength=5)[1:].float() / count_k.numel()
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.03)  # m = ceil(t G) uniform on {1..G}
    # every position is masked equally often
    assert torch.allclose(draw.masked_nkl[0].float().mean(0), torch.full((4,), 0.625), atol=0.03)
    assert not draw.prompt_masked_ncp.any()


def test_random_masking_rounds_count_up_within_t_range():
    settings = ProxySettings(num_draws=500, masking="random", min_t=0.3, max_t=0.5)
    draw = draw_masks(torch.ones(2, 1), torch.ones(2, 10), settings, torch.Generator().manual_seed(1))
    counts = set(draw.masked_nkl.sum(-1).flatten().tolist())
    assert counts == {4, 5}  # ceil(10 t) for t in (0.3, 0.5); 3 only at t = 0.3 exactly


def test_block_random_masking_structure():
    settings = ProxySettings(num_draws=300, masking="block_random", block_length=4)
    gen_length = 10  # blocks of 4, 4, 2
    draw = draw_masks(torch.ones(2, 3), torch.ones(2, gen_length), settings, torch.Generator().manual_seed(2))
    block_of_l = torch.arange(gen_length) // 4
    picked = set()
    for n in range(2):
        for k in range(300):
            scored, masked = draw.scored_nkl[n, k], draw.masked_nkl[n, k]
            blocks = block_of_l[scored].unique()
            assert blocks.numel() == 1
            b = int(blocks)
            picked.add(b)
            assert not masked[block_of_l < b].any()  # earlier blocks clean
            assert masked[block_of_l > b].all()  # later blocks fully masked
            assert torch.equal(masked[block_of_l == b], scored[block_of_l == b])
            block_len = int((block_of_l == b).sum())
            assert draw.weight_nk[n, k] == pytest.approx(3 * block_len / int(scored.sum()))
    assert picked == {0, 1, 2}


def test_block_random_uses_only_blocks_with_live_tokens():
    settings = ProxySettings(num_draws=400, masking="block_random", block_length=4)
    live = torch.zeros(1, 12)
    live[0, :6] = 1  # L = 6 live tokens: blocks of 4 and 2 live tokens; block 2 is all EOS tail
    draw = draw_masks(torch.ones(1, 2), live, settings, torch.Generator().manual_seed(4))
    scored, masked, weight = draw.scored_nkl[0], draw.masked_nkl[0], draw.weight_nk[0]
    first_block = scored[:, :4].any(1)
    assert first_block.any() and (~first_block).any()
    assert not scored[:, 6:].any() and masked[:, 6:].all()
    count = scored.sum(1).float()
    assert torch.allclose(weight, torch.where(first_block, 2 * 4 / count, 2 * 2 / count))
    assert int(count[~first_block].max()) <= 2


def test_masks_are_deterministic_per_seed_and_differ_across_seeds():
    settings = ProxySettings(num_draws=3, masking="random", p_mask_prompt=0.5)
    attn = torch.ones(4, 6)
    live = torch.ones(4, 12)
    d1 = draw_masks(attn, live, settings, torch.Generator().manual_seed(7))
    d2 = draw_masks(attn, live, settings, torch.Generator().manual_seed(7))
    d3 = draw_masks(attn, live, settings, torch.Generator().manual_seed(8))
    for field in ("masked_nkl", "scored_nkl", "weight_nk", "prompt_masked_ncp"):
        assert torch.equal(getattr(d1, field), getattr(d2, field))
    assert not torch.equal(d1.masked_nkl, d3.masked_nkl)
    assert d1.prompt_masked_ncp.any() and not d1.prompt_masked_ncp.all()


def test_prompt_padding_is_never_masked():
    settings = ProxySettings(num_draws=5, p_mask_prompt=1.0)
    attn = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
    draw = draw_masks(attn, torch.ones(2, 3), settings, torch.Generator().manual_seed(0))
    assert torch.equal(draw.prompt_masked_ncp, attn.bool()[:, None].expand(-1, 6, -1))


# ----------------------------------------------------------------------------- input-ignoring model


@pytest.mark.parametrize("masking", ["random", "block_random"])
def test_input_ignoring_model_each_draw_is_weighted_masked_sum(masking):
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1])
    settings = ProxySettings(num_draws=6, masking=masking, block_length=4, p_mask_prompt=0.3)
    out = compute_proxies(_lm(model), prompt, attn, completion, settings, seed=3, meanfield=True)
    mask_nl = completion_mask(completion, EOS)
    draw = draw_masks(attn, mask_nl, settings, torch.Generator().manual_seed(3))
    assert not (draw.scored_nkl & ~mask_nl.bool()[:, None]).any()  # the EOS tail is never scored
    assert draw.masked_nkl[~mask_nl.bool()[:, None].expand_as(draw.masked_nkl)].all()  # ... and always masked
    logp_nl = _exact_position_only_logp(model, prompt, completion)
    expected_nk = draw.weight_nk * (draw.scored_nkl * logp_nl[:, None]).sum(-1)
    assert torch.allclose(out.elbo_nk, expected_nk, atol=1e-5)
    assert torch.allclose(out.meanfield_logp_nl, logp_nl, atol=1e-6)
    assert torch.equal(out.lengths_n, torch.tensor([6.0, 3.0, 6.0]))


def test_input_ignoring_model_elbo_equals_log_likelihood():
    prompt, attn, completion = _position_only_batch()
    model = PositionOnlyModel(prompt.shape[1] + completion.shape[1])
    lm = _lm(model)
    log_lik_n = (_exact_position_only_logp(model, prompt, completion) * completion_mask(completion, EOS)).sum(1)
    # All masked (t = 1): every draw is exactly the log-likelihood, and so is the EUBO.
    full = compute_proxies(lm, prompt, attn, completion, ProxySettings(num_draws=3, masking="random", min_t=1.0), 0)
    assert torch.allclose(full.elbo_nk, log_lik_n[:, None].expand(-1, 3), atol=1e-5)
    assert torch.allclose(full.eubo_n, log_lik_n, atol=1e-5)
    assert torch.allclose(full.elbo_per_token_n, log_lik_n / full.lengths_n, atol=1e-6)
    # t ~ U(0, 1): unbiased, so the mean over many draws converges to the log-likelihood.
    for masking in ("random", "block_random"):
        many = compute_proxies(lm, prompt, attn, completion,
                               ProxySettings(num_draws=4000, masking=masking, block_length=4), 1)
        stderr = many.elbo_nk.std(1) / math.sqrt(4000)
        assert ((many.elbo_n - log_lik_n).abs() < 4 * stderr + 1e-4).all(), masking
    # The drift monitor sees no gap: every order gives the same probability.
    gap = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(masking="random"), num_orders=5, seed=0)
    assert gap.abs().max() < 1e-5


# ----------------------------------------------------------------------------- the exact two-token model


def test_order_log_probs_match_exact_two_token_orders():
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    steps = torch.tensor([[0, 1], [1, 0]])[None].expand(4, -1, -1)  # order 0: x1 first; order 1: x2 first
    log_p_nk = order_log_probs(lm, prompt, attn, completion, steps)
    assert torch.allclose(log_p_nk.double(), toy.order_log_probs(THETA), atol=1e-5)


def test_elbo_and_eubo_estimates_converge_to_exact_two_token_values():
    lm = _lm(TwoTokenModel(THETA))
    prompt, attn, completion = _toy_batch()
    draws = 20000
    out = compute_proxies(lm, prompt, attn, completion, ProxySettings(num_draws=draws, masking="random",
                                                                      eubo_beta=1.5), seed=0)
    stderr = out.elbo_nk.std(1).double() / math.sqrt(draws)
    assert ((out.elbo_n.double() - toy.elbo(THETA)).abs() < 4 * stderr).all()
    assert torch.allclose(out.eubo_n.double(), toy.eubo(THETA, 1.5), atol=0.02)
    # block_random with blocks of one token: the x1-then-x2 order only, i.e. log q_1 + log r_2.
    block = compute_proxies(lm, prompt, attn, completion,
                            ProxySettings(num_draws=draws, masking="block_random", block_length=1), seed=0)
    stderr = block.elbo_nk.std(1).double() / math.sqrt(draws)
    assert ((block.elbo_n.double() - toy.order_log_probs(THETA)[:, 0]).abs() < 4 * stderr).all()


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
    settings = ProxySettings(num_draws=4, masking="block_random", block_length=4, p_mask_prompt=0.2)
    out = compute_proxies(lm, prompt, attn, completion, settings, seed=11, meanfield=True)
    shapes = {"elbo_nk": (3, 4), "elbo_n": (3,), "elbo_per_token_n": (3,), "eubo_n": (3,),
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
