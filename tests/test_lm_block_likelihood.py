"""The block-causal ELBO (dipod.lm.processes.block_likelihood) on a 2-block toy, by enumeration.

On ../shared/models/tiny-sdar (or dipod's tiny SDAR where ../shared is absent; blocks of 4), a prompt of one block and a completion of two: every
masked state of each block is scored by a plain block-causal forward (the table); from it
- our one two-copy forward gives, for every pair of block masks, the table's weighted sum;
- the exact expectation of our estimator over its mask distribution equals the definition
  ``sum_b E_sigma[log p_sigma(x_b | x_<b)]`` (24 orders per block) and is below the exact
  ``sum_b log E_sigma[p_sigma(x_b | x_<b)]``; the Monte Carlo mean of ``compute_proxies`` agrees;
- with one block holding the whole sequence it is the full-sequence ``unbiased_random`` process;
- the drift monitor's order log-probs (blocks in turn) equal the table's for all 576 orders, and its
  ``IW_K - ELBO_K`` approaches the exact gap.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("transformers")

from block_models import sdar_snapshot  # noqa: E402, F401

from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.processes.block_likelihood import completion_blocks, draw_block_masks, score_block_draw  # noqa: E402
from dipod.lm.processes.masked_likelihood import MaskDraw, ProxySettings, score_draw  # noqa: E402
from dipod.lm.proxies import compute_proxies, gap_lower_bound, order_log_probs  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")
BLOCK = 4
SUBSETS = [s for r in range(1, BLOCK + 1) for s in itertools.combinations(range(BLOCK), r)]  # masked sets


@pytest.fixture(scope="module")
def toy(sdar_snapshot):
    lm = load_masked_lm(sdar_snapshot)
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(4, 96, (1, BLOCK), generator=g)
    completion = torch.randint(4, 96, (1, 2 * BLOCK), generator=g)  # plain characters, no EOS: all 8 tokens live
    attn = torch.ones_like(prompt)
    table = {}  # (block, masked set) -> log p of each masked token given the rest of the block and earlier blocks
    with torch.no_grad():
        for b, masked in itertools.product(range(2), SUBSETS):
            noisy = completion.clone()
            noisy[0, [b * BLOCK + i for i in masked]] = lm.mask_id
            noisy[0, (b + 1) * BLOCK:] = lm.mask_id  # later blocks: unseen by block b anyway
            ids = torch.cat([prompt, noisy], dim=1)
            logp = torch.log_softmax(lm.logits(ids, torch.ones_like(ids)), -1)[0]
            table[b, masked] = {i: float(logp[BLOCK + b * BLOCK + i, completion[0, b * BLOCK + i]]) for i in masked}
    return lm, prompt, attn, completion, table


def _draw_masks(pairs):
    masked = torch.zeros(1, len(pairs), 2 * BLOCK, dtype=torch.bool)
    weight = torch.zeros(1, len(pairs), 2 * BLOCK)
    for k, pair in enumerate(pairs):
        for b, subset in enumerate(pair):
            for i in subset:
                masked[0, k, b * BLOCK + i] = True
                weight[0, k, b * BLOCK + i] = BLOCK / len(subset)
    return masked, weight


def test_one_two_copy_forward_scores_every_block_as_its_own_forward(toy):
    lm, prompt, attn, completion, table = toy
    pairs = list(itertools.product(SUBSETS, SUBSETS))
    masked, weight = _draw_masks(pairs)
    with torch.no_grad():
        ours = score_block_draw(lm, prompt, attn, completion, masked, weight, ProxySettings(), BLOCK).elbo_nk[0]
    expected = torch.tensor([sum(BLOCK / len(s) * sum(table[b, s].values()) for b, s in enumerate(pair))
                             for pair in pairs])
    torch.testing.assert_close(ours, expected, rtol=1e-6, atol=2e-5)  # float32 rounding of sums near -100


def _order_log_prob(table, b, order):
    # reveal the tokens of block b in `order`; before step i the tokens order[i:] are still masked
    return sum(table[b, tuple(sorted(order[i:]))][order[i]] for i in range(BLOCK))


def test_the_estimators_expectation_is_the_any_order_elbo_and_bounds_the_likelihood(toy):
    lm, prompt, attn, completion, table = toy
    # m uniform on 1..4 (t ~ U[0, 1)), then a uniform subset of that size: P(S) = (1/4) / C(4, |S|)
    prob = {s: 0.25 / math.comb(BLOCK, len(s)) for s in SUBSETS}
    expectation = sum(prob[s] * BLOCK / len(s) * sum(table[b, s].values()) for b in range(2) for s in SUBSETS)
    orders = list(itertools.permutations(range(BLOCK)))
    order_logp = [[_order_log_prob(table, b, o) for o in orders] for b in range(2)]
    elbo = sum(sum(lp) / len(orders) for lp in order_logp)
    log_likelihood = sum(torch.logsumexp(torch.tensor(lp, dtype=torch.float64), 0).item() - math.log(len(orders))
                         for lp in order_logp)
    assert expectation == pytest.approx(elbo, abs=1e-9)
    assert log_likelihood - elbo > 1e-3  # Jensen, strictly here: the orders disagree
    settings = ProxySettings(num_draws=3000)
    with torch.no_grad():
        draws = compute_proxies(lm, prompt, attn, completion, settings, seed=0).elbo_nk[0].double()
    assert abs(draws.mean().item() - elbo) < 4 * draws.std().item() / math.sqrt(len(draws))


def test_masks_are_a_uniform_count_per_block_at_least_one():
    live = torch.ones(2, 10)
    live[1, 7:] = 0  # row 1: 7 live tokens, the tail after them masked and unweighted
    blocks = torch.tensor([[0, 0, 1, 1, 1, 1, 2, 2, 2, 2]] * 2)
    masked, weight = draw_block_masks(blocks, live, ProxySettings(num_draws=4000), torch.Generator().manual_seed(1))
    counts = masked[0, :, 2:6].sum(-1)
    assert counts.min() >= 1 and counts.max() <= 4
    assert torch.allclose(torch.bincount(counts, minlength=5)[1:].double() / 4000, torch.full((4,), 0.25, dtype=torch.float64),
                          atol=0.03)
    assert masked[1, :, 7:].all() and (weight[1, :, 7:] == 0).all()
    assert torch.equal(weight[0, :, 2:6][masked[0, :, 2:6]], (4.0 / counts.float())[:, None].expand(-1, 4)[masked[0, :, 2:6]])


def test_one_block_over_the_whole_sequence_is_the_full_sequence_process(toy, sdar_snapshot, tmp_path):
    _, prompt, attn, completion, _ = toy
    wide = tmp_path / "sdar-one-block"
    shutil.copytree(sdar_snapshot, wide)
    config = json.loads((wide / "config.json").read_text())
    (wide / "config.json").write_text(json.dumps({**config, "block_size": 64}))
    lm = load_masked_lm(wide)
    settings = ProxySettings(num_draws=6, masking="unbiased_random")
    live = torch.ones(1, 2 * BLOCK)
    masked, weight = draw_block_masks(completion_blocks(attn, 2 * BLOCK, 64), live, settings,
                                      torch.Generator().manual_seed(2))
    draw = MaskDraw.from_masks(masked, live, torch.zeros(1, 7, BLOCK, dtype=torch.bool))
    assert torch.allclose(weight.amax(-1), draw.weight_nk)  # L / m: one block's weight is the process's
    with torch.no_grad():
        ours = score_block_draw(lm, prompt, attn, completion, masked, weight, settings, 64)
        full = score_draw(lm, prompt, attn, completion, draw, settings)
    torch.testing.assert_close(ours.elbo_nk, full.elbo_nk, rtol=0, atol=2e-5)
    torch.testing.assert_close(ours.eubo_n, full.eubo_n, rtol=0, atol=2e-5)


def test_the_drift_monitor_reveals_blocks_in_turn_and_measures_the_gap(toy):
    lm, prompt, attn, completion, table = toy
    orders = list(itertools.permutations(range(BLOCK)))
    joint = list(itertools.product(orders, orders))
    steps = torch.tensor([[*(o.index(i) for i in range(BLOCK)), *(BLOCK + o2.index(i) for i in range(BLOCK))]
                          for o, o2 in joint])[None]
    settings = ProxySettings(masking="block_random", block_length=BLOCK)
    with torch.no_grad():
        ours = order_log_probs(lm, prompt, attn, completion, steps, settings=settings)[0]
    expected = torch.tensor([_order_log_prob(table, 0, o) + _order_log_prob(table, 1, o2) for o, o2 in joint])
    torch.testing.assert_close(ours, expected, rtol=0, atol=5e-5)
    exact_gap = (torch.logsumexp(expected.double(), 0) - math.log(len(joint)) - expected.double().mean()).item()
    with torch.no_grad():
        gap = gap_lower_bound(lm, prompt, attn, completion, ProxySettings(), num_orders=2000, seed=0).item()
    noise = 4 * expected.double().std().item() / math.sqrt(2000)  # ELBO_K's standard error, four times
    assert 0.8 * exact_gap < gap <= exact_gap + noise  # IW_2000 is biased low; measured 0.551 (exact 0.543)


def test_left_padding_moves_no_block_boundary_and_changes_no_proxy(toy):
    """The model's blocks count from each row's first real token, so left padding moves no block boundary
    (``completion_blocks`` in closed form for 3 and 5 real prompt tokens) and the same prompt, padded, gets the same
    per-block ELBO, EUBO and drift monitor as unpadded, for the same seed."""
    lm, prompt, attn, completion, _ = toy
    blocks = completion_blocks(torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]]), 6, BLOCK)
    assert blocks.tolist() == [[0, 1, 1, 1, 1, 2], [1, 1, 1, 2, 2, 2]]
    padded = torch.cat([torch.full((1, 2), lm.pad_id), prompt], dim=1)
    padded_attn = torch.cat([torch.zeros(1, 2, dtype=attn.dtype), attn], dim=1)
    settings = ProxySettings(num_draws=4)
    with torch.no_grad():
        plain, shifted = (compute_proxies(lm, p, a, completion, settings, seed=0)
                          for p, a in ((prompt, attn), (padded, padded_attn)))
        plain_gap, shifted_gap = (gap_lower_bound(lm, p, a, completion, settings, num_orders=4, seed=0)
                                  for p, a in ((prompt, attn), (padded, padded_attn)))
    torch.testing.assert_close(shifted.elbo_nk, plain.elbo_nk, rtol=0, atol=1e-4)
    torch.testing.assert_close(shifted.eubo_n, plain.eubo_n, rtol=0, atol=1e-4)
    torch.testing.assert_close(shifted_gap, plain_gap, rtol=0, atol=1e-4)
