"""DiffusionGemma (transformers' own classes) as a dipod family: tiny snapshot, decoding, ELBO, RL steps.

The snapshot is built here by ``build_tiny_diffusion_gemma`` (transformers' config and model
classes at a tiny size, random weights, our character tokenizer). Pins: it loads as the
``diffusion_gemma`` family with no remote code; dipod's decode IS the model's own sampler (same
tokens as ``model.generate`` under the same seed; padded rows run without their padding); the ELBO of a
block depends only on the clean prefix and that block, is seeded and differentiable; `lm eval`,
`lm generate` and `lm train` (FPO and SPG with DiPOD; rollouts by its sampler or ours) run on it.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers.models.diffusion_gemma")

from dipod.lm.diffusion_gemma import block_elbo_terms, build_tiny_diffusion_gemma  # noqa: E402
from dipod.lm.model import load_masked_lm  # noqa: E402
from dipod.lm.proxies import ProxySettings, compute_proxies  # noqa: E402
from dipod.lm.sampler import SamplerSettings, decode  # noqa: E402
from dipod.lm.uniform_noise import linear_alphas  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def snapshot(tmp_path_factory):
    return build_tiny_diffusion_gemma(tmp_path_factory.mktemp("dg") / "tiny-diffusion-gemma")


@pytest.fixture(scope="module")
def lm(snapshot):
    return load_masked_lm(snapshot)


def test_loads_as_a_family_of_ours_on_transformers_own_classes(lm, snapshot):
    from transformers import DiffusionGemmaForBlockDiffusion

    assert lm.family.name == "diffusion_gemma" and lm.family.noise == "uniform" and lm.mask_id == -1
    assert type(lm.model) is DiffusionGemmaForBlockDiffusion
    assert (lm.eos_id, lm.pad_id) == (lm.tokenizer.eos_token_id, lm.tokenizer.pad_token_id)
    assert not list(snapshot.glob("*.py"))  # no remote code
    assert sum(f.stat().st_size for f in snapshot.iterdir()) < 2_000_000
    with pytest.raises(ValueError, match="no masked forward"):
        lm.logits(torch.ones(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


def test_decode_is_the_models_own_sampler(lm):
    ids = torch.randint(4, 90, (3, 6), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[0, :2] = 0
    settings = SamplerSettings(gen_length=16, block_length=8, steps=4, temperature=1.0)
    out = decode(lm, ids, attn, settings, torch.Generator().manual_seed(3))
    assert out.completion_bg.shape == (3, 16) and out.forward_passes >= 2
    # the unpadded rows (one group) by the model's own generate, seeded as decode seeds it
    seed = int(torch.randint(0, 2**62, (1,), generator=torch.Generator().manual_seed(3)))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        own = lm.model.generate(ids[1:], max_new_tokens=16, max_denoising_steps=4, t_min=1.0, t_max=1.4,
                                pad_token_id=lm.pad_id, eos_token_id=lm.eos_id).sequences[:, 6:]
    # the same rows through dipod's decode (one padding pattern, so one generate call with the same seed)
    alone = decode(lm, ids[1:], attn[1:], settings, torch.Generator().manual_seed(3))
    assert torch.equal(alone.completion_bg, own)
    with pytest.raises(ValueError, match="multiple of DiffusionGemma's canvas_length=8"):
        decode(lm, ids, attn, SamplerSettings(gen_length=12, block_length=12, steps=4))


def test_block_elbo_sees_only_the_clean_prefix_and_its_block(lm):
    prefix = torch.randint(4, 90, (2, 5), generator=torch.Generator().manual_seed(1))
    block = torch.randint(4, 90, (2, 8), generator=torch.Generator().manual_seed(2))
    alphas = linear_alphas(8)
    with torch.no_grad():
        a = block_elbo_terms(lm.model, prefix, block, 3, alphas, torch.Generator().manual_seed(0))
        b = block_elbo_terms(lm.model, prefix, block, 3, alphas, torch.Generator().manual_seed(0))
        other = prefix.clone()
        other[:, 0] = 91
        c = block_elbo_terms(lm.model, other, block, 3, alphas, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and (a < 0).all() and (a != c).any()


def test_proxies_are_seeded_finite_and_differentiable(lm):
    ids = torch.randint(4, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[1, :1] = 0
    completion = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(5))
    settings = ProxySettings(num_draws=2)
    first = compute_proxies(lm, ids, attn, completion, settings, seed=7)
    again = compute_proxies(lm, ids, attn, completion, settings, seed=7)
    assert torch.equal(first.elbo_nk, again.elbo_nk) and first.elbo_nk.shape == (2, 2)
    assert torch.isfinite(first.elbo_nk).all() and (first.elbo_nk < 0).all() and first.eubo_n.isnan().all()
    lm.model.zero_grad()
    first.elbo_n.sum().backward()
    assert sum(float(p.grad.abs().sum()) for p in lm.model.parameters() if p.grad is not None) > 0
    lm.model.zero_grad()


def test_proxies_sum_the_block_elbos_over_the_canvases_each_on_its_clean_prefix(lm):
    """The ELBO of a completion is the sum over its canvas blocks of the block ELBO given the clean prompt
    and the earlier blocks (T = NOISE_STEPS, the draws from one generator seeded by ``seed``); every
    completion token counts and there is no EUBO."""
    from dipod.lm.diffusion_gemma import NOISE_STEPS, compute_uniform_proxies

    ids = torch.randint(4, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    attn[:, 0] = 0  # one padding pattern: one group, run without its padding column
    completion = torch.randint(4, 90, (2, 16), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = compute_uniform_proxies(lm, ids, attn, completion, ProxySettings(num_draws=3), seed=7)
        replay, alphas = torch.Generator().manual_seed(7), linear_alphas(NOISE_STEPS)
        expected = sum(block_elbo_terms(lm.model, torch.cat([ids[:, 1:], completion[:, :start]], dim=1),
                                        completion[:, start:start + 8], 3, alphas, replay) for start in (0, 8))
    torch.testing.assert_close(got.elbo_nk, expected)
    torch.testing.assert_close(got.elbo_n, expected.mean(1))
    torch.testing.assert_close(got.elbo_per_token_n, expected.mean(1) / 16)
    assert torch.equal(got.completion_mask_nl, torch.ones(2, 16)) and got.lengths_n.tolist() == [16.0, 16.0]
    assert got.eubo_n.isnan().all() and got.eubo_n.shape == (2,)
    with pytest.raises(ValueError) as refused:
        compute_uniform_proxies(lm, ids, attn, completion[:, :12], ProxySettings(num_draws=3), seed=7)
    assert str(refused.value) == "completion length 12 must be a multiple of canvas_length=8"


def test_the_tiny_snapshot_is_a_small_hub_shaped_diffusion_gemma(tmp_path):
    """What the tests built on it rely on: about 0.16 M parameters with its vision tower, both attention
    kinds and routed experts, the tokenizer's pad / EOS in config.json and in the generation config (so
    transformers' own generate stops at EOS untold), and the image ids above every text id."""
    lm = load_masked_lm(build_tiny_diffusion_gemma(tmp_path / "dg4", canvas_length=4))
    model, tokenizer = lm.model, lm.tokenizer
    config, text = model.config, model.config.text_config
    assert 140_000 < sum(p.numel() for p in model.parameters()) < 180_000
    assert any(".vision_tower." in name for name, _ in model.named_parameters())
    assert sorted(text.layer_types) == ["full_attention", "sliding_attention"]
    assert 1 < text.top_k_experts < text.num_experts and config.canvas_length == 4
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id)
    assert (text.pad_token_id, text.eos_token_id, text.bos_token_id) == (*ids, None)
    assert (model.generation_config.pad_token_id, model.generation_config.eos_token_id) == ids
    assert max(tokenizer.get_vocab().values()) < config.boi_token_id < config.eoi_token_id < config.image_token_id
    assert config.image_token_id < text.vocab_size


class RecordingGenerate(torch.nn.Module):
    """Stands in for DiffusionGemma's own ``generate``: records its arguments, draws from the global RNG as
    the real sampler does, and reports ``tokens_per_forward`` per row from ``rates`` (one entry per call)."""

    def __init__(self, rates):
        super().__init__()
        self.rates, self.calls = list(rates), []

    def generate(self, ids, **kwargs):
        from types import SimpleNamespace

        self.calls.append((ids.clone(), kwargs, torch.rand(1)))
        tokens = torch.full((ids.shape[0], kwargs["max_new_tokens"]), 40 + len(self.calls))
        return SimpleNamespace(sequences=torch.cat([ids, tokens], dim=1),
                               tokens_per_forward=torch.tensor(self.rates.pop(0)))


def test_the_own_sampler_runs_generate_per_padding_group_with_our_settings_and_counts_its_passes():
    """One generate call per padding pattern (rows without their padding), with our length, step cap,
    temperature schedule t_min .. t_min + 0.4 and pad / EOS ids; a group's passes are those of its slowest
    row (generated tokens / tokens per forward, rounded up; fewer than one token per forward happens when
    the step cap exceeds the canvas)."""
    from types import SimpleNamespace

    from dipod.lm.diffusion_gemma import decode_own

    model = RecordingGenerate(rates=[[4.0], [3.2, 0.5]])  # group 1: 1 row; group 2: 2 rows
    lm = SimpleNamespace(model=model, pad_id=0, eos_id=2)
    ids = torch.tensor([[0, 5, 6], [7, 8, 9], [4, 4, 4]])
    attn = torch.tensor([[0, 1, 1], [1, 1, 1], [1, 1, 1]])
    settings = SamplerSettings(gen_length=16, block_length=8, steps=4, temperature=0.5)
    out = decode_own(lm, ids, attn, settings, torch.Generator().manual_seed(3))
    assert [c[0].tolist() for c in model.calls] == [[[5, 6]], [[7, 8, 9], [4, 4, 4]]]
    for _, kwargs, _ in model.calls:
        assert kwargs == {"max_new_tokens": 16, "max_denoising_steps": 4, "t_min": 0.5, "t_max": 0.9,
                          "pad_token_id": 0, "eos_token_id": 2}
    assert out.completion_bg.tolist() == [[41] * 16, [42] * 16, [42] * 16]
    assert (out.forward_passes, out.row_forwards) == (4 + 32, 4 * 1 + 32 * 2)
    assert torch.equal(out.order_bg, torch.zeros(3, 16, dtype=torch.long))  # no fixed reveal order
    cold = RecordingGenerate(rates=[[4.0]])
    decode_own(SimpleNamespace(model=cold, pad_id=0, eos_id=2), ids[1:2], attn[1:2],
               SamplerSettings(gen_length=16, block_length=8, steps=4, temperature=0.0), None)
    assert (cold.calls[0][1]["t_min"], cold.calls[0][1]["t_max"]) == (1e-4, pytest.approx(0.4001))


def test_the_own_sampler_is_seeded_by_its_generator_and_leaves_the_global_rng_alone():
    from types import SimpleNamespace

    from dipod.lm.diffusion_gemma import decode_own

    ids, attn = torch.tensor([[7, 8, 9]]), torch.ones(1, 3, dtype=torch.long)
    settings = SamplerSettings(gen_length=8, block_length=8, steps=2, temperature=1.0)
    draws = []
    for generator in (torch.Generator().manual_seed(3), torch.Generator().manual_seed(3), None):
        model = RecordingGenerate(rates=[[2.0]])
        state = torch.get_rng_state()
        decode_own(SimpleNamespace(model=model, pad_id=0, eos_id=2), ids, attn, settings, generator)
        assert torch.equal(torch.get_rng_state(), state)
        draws.append(float(model.calls[0][2]))
    assert draws[0] == draws[1]


def test_eval_and_generate_decode_it(snapshot, tmp_path, capsys):
    from dipod.lm.evaluate import main as eval_main
    from dipod.lm.generate import main as generate_main

    common = ["--model", str(snapshot), "--task", "sudoku4", "--prompt_style", "compact", "--gen_length", "16",
              "--block_length", "8", "--steps", "4", "--max_prompt_length", "96"]
    assert eval_main([*common, "--limit", "3", "--batch_size", "2", "--json", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["num_examples"] == 3 and 0.0 <= report["mean_reward"] <= 1.0
    assert generate_main([*common, "--n", "2"]) == 0
    assert capsys.readouterr().out.count("--- example") == 2
    assert generate_main([*common, "--n", "2", "--uniform_sampler", "ancestral"]) == 0  # our sampler
    assert capsys.readouterr().out.count("--- example") == 2


@pytest.mark.parametrize("estimator,extra", [("fpo", []), ("spg", ["--spg_negative_proxy", "elbo"]),
                                             ("fpo", ["--uniform_sampler", "ancestral"])])
def test_train_runs_fpo_and_spg_with_dipod(snapshot, tmp_path, estimator, extra):
    from rl_smoke import smoke_flags

    from dipod.lm.trainer import main
    from dipod.runlog import read_metrics

    flags = smoke_flags(snapshot, tmp_path, estimator, *extra, block_length=8, diffusion_steps=4)
    assert main(flags) == 0
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward", "elbo", "loss", "grad_norm"):
            assert math.isfinite(row[key]), (key, row)
        assert row["skipped_updates"] == 0.0


def test_an_estimator_that_reads_the_eubo_is_refused(snapshot, tmp_path):
    from dipod.config import ConfigError
    from dipod.lm.trainer import main

    with pytest.raises(ConfigError) as refused:
        main(["--model", str(snapshot), "--task", "sudoku4", "--estimator", "spg", "--lora_r", "0",
              "--max_steps", "1", "--output_dir", str(tmp_path), "--tensorboard", "false", "--progress_bar", "false"])
    assert str(refused.value) == ("estimator 'spg' reads ['eubo_n'], which DiffusionGemma's uniform-noise process does "
                                  "not provide (only its ELBO is derived); use fpo, fpo++, or spg with "
                                  "--spg_negative_proxy elbo")


def test_ancestral_sampler_returns_the_point_the_denoiser_is_sure_of():
    """With p(x_0 | x_t) a point mass on x*, every reverse step is the posterior given x* and the chain ends at x*."""
    from types import SimpleNamespace

    from dipod.lm.diffusion_gemma import decode_ancestral
    from dipod.lm.families import get_family

    target = torch.tensor([[5, 9, 3, 3], [7, 1, 0, 2]])

    class Sure(torch.nn.Module):
        config = SimpleNamespace(canvas_length=2, text_config=SimpleNamespace(vocab_size=11))

        def forward(self, input_ids, decoder_input_ids):
            block = (input_ids.shape[1] - 3) // 2  # prompt of 3, then the finished canvases
            x0 = target[:, 2 * block:2 * block + 2]
            return SimpleNamespace(logits=torch.nn.functional.one_hot(x0, 11).float() * 50.0)

    lm = SimpleNamespace(model=Sure(), family=get_family("diffusion_gemma"))
    prompts = torch.ones(2, 3, dtype=torch.long)
    settings = SamplerSettings(gen_length=4, block_length=4, steps=4, temperature=1.0, uniform_sampler="ancestral")
    out = decode_ancestral(lm, prompts, torch.ones_like(prompts), settings, torch.Generator().manual_seed(0))
    assert torch.equal(out.completion_bg, target) and out.forward_passes == 4 * 2


def test_ancestral_sampler_on_the_snapshot_is_seeded(lm):
    ids = torch.randint(4, 90, (2, 5), generator=torch.Generator().manual_seed(0))
    attn = torch.ones_like(ids)
    settings = SamplerSettings(gen_length=16, block_length=16, steps=3, temperature=1.0, uniform_sampler="ancestral")
    runs = [decode(lm, ids, attn, settings, torch.Generator().manual_seed(4)) for _ in range(2)]
    assert torch.equal(runs[0].completion_bg, runs[1].completion_bg) and runs[0].forward_passes == 3 * 2
    assert runs[0].completion_bg.shape == (2, 16)
    from dipod.lm.diffusion_gemma import decode_ancestral

    direct = decode_ancestral(lm, ids, attn, settings, torch.Generator().manual_seed(4))  # the sampler asked for
    assert torch.equal(runs[0].completion_bg, direct.completion_bg)
    assert torch.equal(runs[0].order_bg, torch.zeros(2, 16, dtype=torch.long))


def test_ancestral_sampler_draws_from_the_denoiser_at_its_temperature_one_token_canvases_too():
    """x_0 ~ softmax(logits / temperature): two-token logits [0, 1] at temperature 0.5 give token 1 with
    probability sigmoid(2) = 0.881 (the logits times the temperature would give sigmoid(0.5) = 0.622);
    canvases of one token each fill the whole completion."""
    from types import SimpleNamespace

    from dipod.lm.diffusion_gemma import decode_ancestral

    class Fixed(torch.nn.Module):
        config = SimpleNamespace(canvas_length=1, text_config=SimpleNamespace(vocab_size=2))

        def forward(self, input_ids, decoder_input_ids):
            return SimpleNamespace(logits=torch.tensor([0.0, 1.0]).expand(*decoder_input_ids.shape, 2))

    rows = 4000
    prompts = torch.ones(rows, 3, dtype=torch.long)
    settings = SamplerSettings(gen_length=2, block_length=2, steps=1, temperature=0.5, uniform_sampler="ancestral")
    out = decode_ancestral(SimpleNamespace(model=Fixed()), prompts, torch.ones_like(prompts), settings,
                           torch.Generator().manual_seed(0))
    assert out.completion_bg.shape == (rows, 2) and (out.forward_passes, out.row_forwards) == (2, 2 * rows)
    ones = out.completion_bg.float().mean(0)
    assert torch.all((ones - 1 / (1 + math.exp(-2.0))).abs() < 0.02), ones  # 4 standard errors
