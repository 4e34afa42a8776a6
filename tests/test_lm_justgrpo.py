"""JustGRPO (`--estimator justgrpo`): its loss in closed form, the exact left-to-right likelihood on the
two-token policy of dipod.toy (and the sampler drawing from it), packed forwards equal to the
one-forward-per-token loop (values and gradients), and its wiring into TrainConfig and the trainer."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from dipod import toy
from dipod.config import ConfigError
from dipod.lm.estimators import get_estimator
from dipod.lm.left_to_right import left_to_right_log_probs, left_to_right_settings
from dipod.lm.model import MaskedDiffusionLM, build_tiny_model, load_masked_lm
from dipod.lm.proxies import Proxies
from dipod.lm.sampler import decode
from dipod.lm.train_config import TrainConfig
from dipod.lm.trainer import needs_bounds, proxy_fields, rl_loss
from dipod.objectives import justgrpo_loss

# ---------------------------------------------------------------- the loss in closed form


def test_on_policy_loss_and_gradient_are_the_release_scaling():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -0.1], [-2.0, -1.0, -3.0]], requires_grad=True)
    adv = torch.tensor([2.0, 0.0, -1.0])  # two rows carry a signal: n_valid = 2, L = 3
    loss, info = justgrpo_loss(logp, logp.detach(), adv)
    loss.backward()
    # ratio 1 everywhere: loss = -sum_n A_n L / (L n_valid) = -(2 - 1) / 2
    assert loss.item() == pytest.approx(-0.5)
    expected = (-adv / (3 * 2))[:, None].expand(3, 3)
    torch.testing.assert_close(logp.grad, expected)
    assert info["clip_ratio"] == 0.0 and info["frac_valid_samples"] == pytest.approx(2 / 3)


def test_off_policy_tokens_outside_the_trust_region_stop_learning():
    # log-ratios: 1.5 and 0.5 for A > 0 (clipped above / unclipped), 0.5 and 1.5 for A < 0 (clipped below / not)
    import math
    old = torch.zeros(2, 2)
    logp = torch.tensor([[math.log(1.5), math.log(0.5)], [math.log(0.5), math.log(1.5)]], requires_grad=True)
    adv = torch.tensor([1.0, -1.0])
    loss, info = justgrpo_loss(logp, old, adv, eps=0.2)
    loss.backward()
    # objectives: min(1.5, 1.2) = 1.2, min(0.5, 0.8) = 0.5; A = -1: min(-0.5, -0.8) = -0.8, min(-1.5, -1.2) = -1.5
    assert loss.item() == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.5) / (2 * 2))
    # d/dlogp of r A = r A where unclipped, 0 where clipped
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5 / 4], [0.0, 1.5 / 4]]))
    assert info["clip_ratio"] == pytest.approx(0.5)


def test_a_batch_without_signal_gives_zero_loss_not_nan():
    logp = torch.randn(3, 4, requires_grad=True)
    loss, _ = justgrpo_loss(logp, logp.detach(), torch.zeros(3))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logp.grad, torch.zeros(3, 4))

# ---------------------------------------------------------------- the two-token policy of dipod.toy


A, B, MASK, EOS, PROMPT = range(5)


class TwoTokenModel(nn.Module):
    """dipod.toy's six logits as a mask predictor over the vocabulary (A, B, MASK, EOS, PROMPT): a one-token
    prompt, then x1 and x2; pi(x_i = A | context) = sigmoid(logit of that context), every other token -inf."""

    def __init__(self, theta_6: torch.Tensor):
        super().__init__()
        self.theta = nn.Parameter(theta_6.clone())

    def forward(self, input_ids, attention_mask=None):
        a, b, c, d, e, f = self.theta
        x1, x2 = input_ids[:, 1], input_ids[:, 2]
        logit_x1 = torch.where(x2 == MASK, b, torch.where(x2 == A, a, e))
        logit_x2 = torch.where(x1 == MASK, d, torch.where(x1 == A, c, f))
        logits = torch.full((input_ids.shape[0], 3, 5), -1e4, dtype=self.theta.dtype)
        logits = logits.index_put((torch.arange(len(x1)), torch.full_like(x1, 1), torch.full_like(x1, A)), logit_x1)
        logits = logits.index_put((torch.arange(len(x1)), torch.full_like(x1, 2), torch.full_like(x1, A)), logit_x2)
        logits[:, 1:, B] = 0.0
        return SimpleNamespace(logits=logits)


def _two_token_lm(theta):
    return MaskedDiffusionLM(model=TwoTokenModel(theta), tokenizer=None, mask_id=MASK, pad_id=EOS, eos_id=EOS)


OUTPUTS = torch.tensor([[A, A], [A, B], [B, A], [B, B]])  # dipod.toy.OUTPUTS order
THETA = torch.tensor([0.7, -0.4, 1.3, 0.2, -1.1, 0.5], dtype=torch.float64)


def test_left_to_right_likelihood_is_the_x1_first_order_of_the_two_token_model():
    lm = _two_token_lm(THETA)
    prompt = torch.full((4, 1), PROMPT)
    logp_nl = left_to_right_log_probs(lm, prompt, torch.ones_like(prompt), OUTPUTS)
    # p_12(x) = q_1 r_2: x1 with both masked, then x2 with x1 revealed (dipod.toy.order_log_probs order 0)
    torch.testing.assert_close(logp_nl.sum(1).double(), toy.order_log_probs(THETA)[:, 0], rtol=0, atol=1e-6)
    assert torch.exp(logp_nl.sum(1).double()).sum().item() == pytest.approx(1.0, abs=1e-6)


def test_justgrpo_gradient_is_the_exact_left_to_right_policy_gradient_of_the_samples():
    lm = _two_token_lm(THETA)
    rows = torch.tensor([0, 1, 1, 3, 2, 0])  # sampled outputs (indices into OUTPUTS)
    adv = torch.tensor([1.0, -0.5, -0.5, 0.0, 2.0, 1.0])
    prompt = torch.full((6, 1), PROMPT)
    logp_nl = left_to_right_log_probs(lm, prompt, torch.ones_like(prompt), OUTPUTS[rows])
    loss, _ = justgrpo_loss(logp_nl, logp_nl.detach(), adv)
    (grad,) = torch.autograd.grad(loss, lm.model.theta)
    theta = THETA.clone().requires_grad_()
    # closed form: -(1 / (L n_valid)) sum_n A_n grad log p_12(x_n), L = 2, n_valid = 5
    closed = -(adv.double() * toy.order_log_probs(theta)[rows, 0]).sum() / (2 * 5)
    (expected,) = torch.autograd.grad(closed, theta)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_the_left_to_right_sampler_draws_from_the_likelihood_it_is_scored_with(temperature):
    """Frequencies of 40000 two-token rollouts (sampler, block length 1) against exp(left_to_right_log_probs)
    at the same temperature: within 4.5 standard errors for each of the four outputs."""
    lm = _two_token_lm(THETA.float())
    prompt = torch.full((4, 1), PROMPT)
    with torch.no_grad():
        p = left_to_right_log_probs(lm, prompt, torch.ones_like(prompt), OUTPUTS, temperature).sum(1).exp().double()
    n = 40000
    ids = torch.full((n, 1), PROMPT)
    out = decode(lm, ids, torch.ones_like(ids), left_to_right_settings(2, temperature),
                 generator=torch.Generator().manual_seed(3))
    assert torch.equal(out.order_bg, torch.tensor([[0, 1]]).expand(n, 2))  # x1 first, then x2
    counts = torch.stack([(out.completion_bg == o).all(1).sum() for o in OUTPUTS]).double()
    stderr = (p * (1 - p) / n).sqrt()
    assert ((counts / n - p).abs() <= 4.5 * stderr).all(), (counts / n, p)

# ---------------------------------------------------------------- packed forwards == one forward per token


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = build_tiny_model(tmp_path_factory.mktemp("jg") / "m", hidden_size=16, num_layers=2, num_heads=2,
                            intermediate_size=24, max_positions=64)
    return load_masked_lm(str(path), dtype="float32")


def _batch(lm):
    g = torch.Generator().manual_seed(0)
    vocab = lm.model.config.vocab_size
    prompt = torch.randint(5, vocab, (3, 5), generator=g)
    attn = torch.ones_like(prompt)
    attn[0, :2], attn[2, :1] = 0, 0  # left padding
    prompt = prompt.masked_fill(attn == 0, lm.pad_id)
    completion = torch.randint(5, vocab, (3, 6), generator=g)
    completion[1, 3:] = lm.eos_id  # an answer that ends early, EOS padding after it
    return prompt, attn, completion


def _one_forward_per_token(lm, prompt, attn, completion, temperature):
    """The release's loop: for each t one forward over [prompt, y_<t, MASK x (G - t)], read position t."""
    batch, gen_length = completion.shape
    out = []
    for t in range(gen_length):
        state = torch.cat([completion[:, :t], torch.full((batch, gen_length - t), lm.mask_id)], dim=1)
        logits = lm.logits(torch.cat([prompt, state], 1), torch.cat([attn, torch.ones_like(state)], 1))
        logits = logits[:, prompt.shape[1] + t] / temperature
        logits[:, lm.mask_id] = float("-inf")
        out.append(logits.log_softmax(-1).gather(1, completion[:, t:t + 1]).squeeze(1))
    return torch.stack(out, dim=1)


@pytest.mark.parametrize("budget", [None, 11, 40, 10_000])  # 11 tokens: one row per chunk; 40: three rows
def test_packed_forwards_equal_the_one_forward_per_token_loop(tiny, budget):
    prompt, attn, completion = _batch(tiny)
    weights = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    tiny.model.zero_grad()
    reference = _one_forward_per_token(tiny, prompt, attn, completion, 0.8)
    (reference * weights).sum().backward()
    expected_grads = [p.grad.clone() for p in tiny.model.parameters()]
    tiny.model.zero_grad()
    packed = left_to_right_log_probs(tiny, prompt, attn, completion, 0.8, max_tokens_per_forward=budget)
    (packed * weights).sum().backward()
    torch.testing.assert_close(packed, reference, rtol=1e-5, atol=1e-5)
    for got, want in zip((p.grad for p in tiny.model.parameters()), expected_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_chunked_forwards_keep_one_chunk_of_activations(tiny):
    """Saved-for-backward bytes of a checkpointed multi-chunk call stay at the chunks' inputs and outputs:
    well under one unchunked call's, which keeps every row's activations."""
    prompt, attn, completion = _batch(tiny)

    def saved_bytes(budget):
        total = [0]

        def pack(t):
            total[0] += t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            left_to_right_log_probs(tiny, prompt, attn, completion, max_tokens_per_forward=budget).sum()
        return total[0]
    whole, chunked = saved_bytes(None), saved_bytes(22)  # 22 tokens: two rows per chunk, nine chunks
    assert chunked < whole / 5, (chunked, whole)

# ---------------------------------------------------------------- the configuration and the trainer


def test_config_refuses_greedy_rollouts_and_foreign_options():
    with pytest.raises(ConfigError, match="temperature=0.0"):
        TrainConfig(estimator="justgrpo", temperature=0.0)
    with pytest.raises(ConfigError, match="kl_beta"):
        TrainConfig(estimator="justgrpo", kl_beta=0.01)
    cfg = TrainConfig(estimator="justgrpo", dipod_beta=0.0, temperature=1.0, gen_length=64, block_length=32,
                      diffusion_steps=64)
    rollout, evaluation = cfg.rollout_settings(), cfg.sampler_settings(0.0)
    assert (rollout.block_length, rollout.steps, rollout.temperature, rollout.fill_after_eos) == (1, 64, 1.0, False)
    assert (evaluation.block_length, evaluation.steps) == (32, 64)  # evaluation keeps the parallel decoder
    assert proxy_fields(cfg) == ("left_to_right_logp_nl",) and not needs_bounds(cfg)
    with_dipod = dataclasses.replace(cfg, dipod_beta=0.05)
    assert proxy_fields(with_dipod) == ("left_to_right_logp_nl", "elbo_n") and needs_bounds(with_dipod)


def test_rl_loss_adds_dipod_on_the_bounds_of_the_same_batch():
    g = torch.Generator().manual_seed(0)
    logp = -torch.rand(4, 6, generator=g)
    elbo_n = -5 * torch.rand(4, generator=g)
    lengths = torch.tensor([6.0, 3.0, 5.0, 2.0])
    new = Proxies(elbo_nk=elbo_n[:, None], elbo_n=elbo_n, elbo_per_token_n=elbo_n / lengths, eubo_n=elbo_n,
                  completion_mask_nl=torch.ones(4, 6), lengths_n=lengths, left_to_right_logp_nl=logp)
    adv = torch.tensor([1.0, -1.0, 0.0, 0.5])
    cfg = TrainConfig(estimator="justgrpo", dipod_beta=0.1, temperature=1.0)
    loss, info = rl_loss(cfg, new, new, adv, None)
    expected = justgrpo_loss(logp, logp, adv)[0] - 0.1 * elbo_n.sum() / lengths.sum()
    assert loss.item() == pytest.approx(float(expected), rel=1e-6)
    assert get_estimator("justgrpo").left_to_right


def test_a_training_step_decodes_left_to_right_and_scores_the_exact_likelihood(tiny, tmp_path, monkeypatch):
    from dipod.lm import train_engine
    from dipod.lm.trainer import Trainer

    path = build_tiny_model(tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                            max_positions=64)
    cfg = TrainConfig(model=str(path), task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                      prompts_per_step=2, num_generations=2, gradient_accumulation_steps=1, gen_length=8,
                      block_length=4, diffusion_steps=4, num_iterations=1, max_steps=1, estimator="justgrpo",
                      dipod_beta=0.0, temperature=1.0, max_tokens_per_forward=64, eval_examples=1,
                      gap_monitor_steps=0, rollout_mismatch_steps=1, tensorboard=False, progress_bar=False,
                      save_final_model=False, output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    compared = []
    from dipod.lm import rollout_mismatch

    real_mismatch = rollout_mismatch.rollout_mismatch
    monkeypatch.setattr(rollout_mismatch, "rollout_mismatch", lambda lm, i, a, fast, reference, *rest:
                        compared.append((fast, reference)) or real_mismatch(lm, i, a, fast, reference, *rest))
    decoded, scored = [], []
    real_generate, real_proxies = train_engine.generate, train_engine.compute_proxies
    monkeypatch.setattr(trainer.engine, "generate", lambda lm, i, a, s, generator: decoded.append(s) or
                        real_generate(lm, i, a, s, generator))

    def spy(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, **kwargs):
        found = real_proxies(lm, prompt_ids, prompt_attn, completion_ids, settings, seed, **kwargs)
        with torch.no_grad():
            scored.append((found, left_to_right_log_probs(lm, prompt_ids, prompt_attn, completion_ids)))
        return found
    monkeypatch.setattr(trainer.engine, "compute_proxies", spy)
    metrics = trainer.step(1)
    assert [(s.block_length, s.steps) for s in decoded] == [(1, 8)]
    # the monitor compares the parallel decoder it is evaluated with against its left-to-right rollouts
    (fast, reference), = compared
    assert (fast.block_length, fast.steps, reference.block_length, reference.steps) == (4, 4, 1, 8)
    assert "mismatch/same_tokens" in metrics
    (found, exact), = scored
    assert found.elbo_n is None  # no bound computed without DiPOD
    torch.testing.assert_close(found.left_to_right_logp_nl.detach(), exact)
    assert metrics["clip_ratio"] == 0.0 and "frac_valid_samples" in metrics and "elbo" not in metrics

# ---------------------------------------------------------------- the paper configuration and its memory plan

PAPER = Path(__file__).resolve().parents[1] / "configs" / "lm" / "paper" / "justgrpo"
# LeapLabTHU/JustGRPO train.py TrainConfig, its README launch (8 processes, --grad_accum 8) and grpo.py
RELEASED = dict(model="GSAI-ML/LLaDA-8B-Instruct", dtype="bfloat16", lora_r=0, gradient_checkpointing=True,
                prompts_per_step=64, num_generations=16, gradient_accumulation_steps=8, gen_length=256,
                block_length=32, diffusion_steps=256, temperature=1.0, scale_rewards=True, estimator="justgrpo",
                clip_eps=0.2, num_iterations=1, dipod_beta=0.0, learning_rate=5e-6, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0 / 8, lr_scheduler="constant", warmup_steps=0,
                max_steps=125, seed=1234)


@pytest.mark.parametrize("task", ["gsm8k", "math500"])
def test_paper_config_carries_the_released_values_and_fits_80_gib(task):
    from dipod.config import parse_config
    from dipod.lm.memory import plan

    cfg = parse_config(TrainConfig, ["--config", str(PAPER / f"justgrpo_{task}.yaml")], "test")
    assert {k: getattr(cfg, k) for k in RELEASED} == RELEASED and cfg.task == task
    assert cfg.reward_weights[0] == 1.0 and not any(cfg.reward_weights[1:])  # correctness only
    # one prompt's group of 16 per micro-batch on each of 8 processes, as the release's accumulation step
    assert cfg.prompts_per_step * cfg.num_generations // 8 // cfg.gradient_accumulation_steps == 16
    result = plan(cfg, num_gpus=8, engine="fsdp")
    assert 15 < result["peak_gib_per_gpu"] <= 80, result


def test_memory_plan_counts_one_checkpointed_chunk_of_prefix_states():
    from dipod.lm.memory import activation_bytes_per_token, left_to_right_chunk_rows, model_shape, plan

    cfg = TrainConfig(model="GSAI-ML/LLaDA-8B-Instruct", estimator="justgrpo", dipod_beta=0.0, temperature=1.0,
                      lora_r=0, gradient_checkpointing=True, max_prompt_length=256, gen_length=256,
                      max_tokens_per_forward=8192)
    seq, shape = 512, model_shape(cfg.model)
    small, large = (plan(dataclasses.replace(cfg, prompts_per_step=p), 8, "fsdp") for p in (16, 64))
    assert left_to_right_chunk_rows(cfg, small["micro_batch"]) == 16  # 8192 tokens / 512 per state
    expected = 16 * seq * activation_bytes_per_token(shape, 2, True) / 2 ** 30
    assert small["update_gib"]["activations"] == pytest.approx(expected)
    # a bigger micro-batch makes more chunks, not bigger ones
    assert large["micro_batch"] > small["micro_batch"] and large["update_gib"]["activations"] == small["update_gib"]["activations"]
    unchunked = plan(dataclasses.replace(cfg, max_tokens_per_forward=None), 8, "fsdp")
    assert unchunked["update_gib"]["activations"] == pytest.approx(expected * small["micro_batch"] * 256 / 16)
