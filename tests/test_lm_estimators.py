"""dipod.lm.estimators: the records against the objectives they wrap, the TrainConfig checks derived
from them, a new estimator added as one record, and the trainer's per-iteration mask reseeding."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from dipod.config import ConfigError
from dipod.lm import estimators
from dipod.lm.estimators import ESTIMATORS, OPTION_OWNERS, Estimator, Option, get_estimator
from dipod.lm.proxies import Proxies
from dipod.lm.train_config import ESTIMATOR_FIELDS, TrainConfig
from dipod.lm.trainer import proxies_used, proxy_fields, rl_loss
from dipod.objectives import d1_loss, dipod_term, fpo_loss, fpo_plus_plus_loss, justgrpo_loss, spg_loss


def _proxies(seed: int) -> Proxies:
    g = torch.Generator().manual_seed(seed)
    elbo_nk = -5 * torch.rand(4, 3, generator=g) - 1
    lengths_n = torch.tensor([6.0, 3.0, 5.0, 2.0])
    mask_nl = (torch.arange(6)[None] < lengths_n[:, None]).float()
    return Proxies(elbo_nk=elbo_nk.requires_grad_(), elbo_n=elbo_nk.mean(1), elbo_per_token_n=elbo_nk.mean(1) / lengths_n,
                   eubo_n=elbo_nk.mean(1) + 0.7, completion_mask_nl=mask_nl, lengths_n=lengths_n,
                   meanfield_logp_nl=-torch.rand(4, 6, generator=g) - 0.1)


NEW, OLD, ADV = _proxies(0), _proxies(1), torch.tensor([1.0, -0.5, 0.25, -0.75])


def test_every_option_is_a_train_config_field_left_unset_by_default():
    fields = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    assert ESTIMATOR_FIELDS is OPTION_OWNERS
    for name in OPTION_OWNERS:
        assert fields[name] is None, name  # None = the estimator's own default


@pytest.mark.parametrize("name, direct", [
    ("d1", lambda: d1_loss(NEW.meanfield_logp_nl, OLD.meanfield_logp_nl, ADV, NEW.completion_mask_nl, eps=0.3,
                           kl_beta=0.1, logp_ref_nl=OLD.meanfield_logp_nl - 0.2)),
    ("fpo", lambda: fpo_loss(NEW.elbo_nk, OLD.elbo_nk, ADV, eps=0.3, kl_beta=0.1, elbo_ref=OLD.elbo_n - 0.2)),
    ("fpo++", lambda: fpo_plus_plus_loss(NEW.elbo_nk, OLD.elbo_nk, ADV, eps=0.3, log_ratio_max=3.0)),
    ("spg", lambda: spg_loss(ADV, NEW.elbo_n, NEW.eubo_n, negative_proxy="mix", mix_weight=0.5,
                             lengths_n=NEW.lengths_n)),
])
def test_each_record_is_its_objective(name, direct):
    cfg = TrainConfig(estimator=name, **({"clip_eps": 0.3} if name != "spg" else {}),
                      **({"kl_beta": 0.1} if name in ("d1", "fpo") else {}))
    record = get_estimator(name)
    ref = getattr(OLD, record.reference_proxy) - 0.2 if record.reference_proxy else None
    loss, info = record.loss(NEW, OLD, ADV, ref, cfg.estimator_options())
    expected, expected_info = direct()
    assert float(loss) == pytest.approx(float(expected), rel=1e-6)
    assert info == expected_info


def _near_policy():
    """A new and an old batch whose log-ratios are about 0.15 (ELBOs) and about 0.15 times the sign of the
    row's advantage (left-to-right log-probs): between a trust region of 0.1 (clipped) and the default 0.2
    (not clipped), and above a log-ratio clamp of 0.1 (the SPO penalty of a negative advantage sees it)."""
    g = torch.Generator().manual_seed(7)
    sign = ADV.sign()[:, None]
    new = dataclasses.replace(NEW, left_to_right_logp_nl=NEW.meanfield_logp_nl.clone())
    old = dataclasses.replace(NEW, elbo_nk=NEW.elbo_nk.detach() - (0.15 + 0.02 * torch.rand(4, 3, generator=g)),
                              left_to_right_logp_nl=NEW.meanfield_logp_nl - sign * (0.15 + 0.02 * torch.rand(4, 6, generator=g)))
    return new, old


@pytest.mark.parametrize("name, given, direct", [
    ("fpo", {"clip_eps": 0.1}, lambda new, old: fpo_loss(new.elbo_nk, old.elbo_nk, ADV, eps=0.1)),
    ("fpo++", {"clip_eps": 0.1, "log_ratio_max": 0.1},
     lambda new, old: fpo_plus_plus_loss(new.elbo_nk, old.elbo_nk, ADV, eps=0.1, log_ratio_max=0.1)),
    ("spg", {"spg_mix_weight": 0.2}, lambda new, old: spg_loss(ADV, new.elbo_n, new.eubo_n, negative_proxy="mix",
                                                                mix_weight=0.2, lengths_n=new.lengths_n)),
    ("justgrpo", {"clip_eps": 0.1},
     lambda new, old: justgrpo_loss(new.left_to_right_logp_nl, old.left_to_right_logp_nl, ADV, eps=0.1)),
])
def test_every_option_reaches_the_objective(name, given, direct):
    """A record hands each of its options to its objective: at non-default values the record's loss and
    diagnostics are the objective's at those values, and resetting any one of them to its default changes
    the loss on this batch (so an option dropped on the way would show)."""
    new, old = _near_policy()
    record = get_estimator(name)
    loss, info = record.loss(new, old, ADV, None, estimators.resolve_options(name, given))
    expected, expected_info = direct(new, old)
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-6)
    assert info == expected_info
    for option in given:
        at_default = estimators.resolve_options(name, {**given, option: None})
        assert abs(float(record.loss(new, old, ADV, None, at_default)[0].detach()) - float(loss.detach())) > 1e-3, option


def test_refusals_name_the_value_the_rule_and_the_way_out():
    """What a user reads when an estimator option is wrong: the value and the rule it breaks, or the
    estimators an option belongs to, or the valid names; the boundary values are accepted."""
    cases = [
        ("spg", {"kl_beta": 0.04, "clip_eps": 0.2},
         "kl_beta (used by d1/fpo), clip_eps (used by d1/fpo/fpo++/justgrpo) do not apply to estimator='spg'; "
         "remove them or change --estimator"),
        ("fpo", {"clip_eps": 0.0}, "clip_eps=0.0 must be > 0"),
        ("d1", {"kl_beta": -0.1}, "kl_beta=-0.1 must be >= 0 (0: no KL term, no reference model)"),
        ("fpo", {"dipod_normalisation": "per_step"},
         "dipod_normalisation='per_step' must be one of ('per_token', 'per_sequence')"),
        ("spg", {"spg_negative_proxy": "elbo", "eubo_beta": 1.0},
         "eubo_beta=1.0 is unused here (spg_negative_proxy='elbo' reads no EUBO); remove it"),
        ("reinforce", {}, "estimator='reinforce'; choose one of ('d1', 'fpo', 'fpo++', 'spg', 'justgrpo')"),
    ]
    for name, given, message in cases:
        with pytest.raises(ValueError) as refused:
            estimators.resolve_options(name, given)
        assert str(refused.value) == message
    assert estimators.resolve_options("d1", {"kl_beta": 0.0, "clip_eps": 1e-9})["clip_eps"] == 1e-9


def test_flag_help_shows_each_owners_default():
    assert estimators.option_help("clip_eps", "PPO clip range") == (
        "PPO clip range (default d1: 0.2, fpo: 0.2, fpo++: 0.05, justgrpo: 0.2; other estimators: must stay unset)")
    assert estimators.option_help("dipod_normalisation", "DiPOD mean") == (
        "DiPOD mean (default d1: per_token, fpo: per_sequence, fpo++: per_token, spg: per_token, "
        "justgrpo: per_token; other estimators: must stay unset)")


@pytest.mark.parametrize("changes, field", [
    (dict(estimator="fpo", spg_mix_weight=0.3), "spg_mix_weight"),
    (dict(estimator="spg", kl_beta=0.04), "kl_beta"),
    (dict(estimator="spg", clip_eps=0.2), "clip_eps"),
    (dict(estimator="spg", spg_negative_proxy="elbo", eubo_beta=1.0), "eubo_beta"),
    (dict(estimator="spg", spg_negative_proxy="eubo", spg_mix_weight=0.3), "spg_mix_weight"),
    (dict(estimator="fpo", clip_eps=0.0), "clip_eps"),
    (dict(estimator="fpo", dipod_normalisation="per_step"), "dipod_normalisation"),
    (dict(estimator="fpo", dipod_beta=0.0, dipod_normalisation="per_token"), "dipod_normalisation"),
    (dict(estimator="reinforce"), "estimator"),
])
def test_a_value_that_contradicts_its_estimator_fails_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        TrainConfig(**changes)


def test_defaults_and_fields_read_follow_the_record():
    assert TrainConfig(estimator="fpo").estimator_options() == {"clip_eps": 0.2, "kl_beta": 0.0,
                                                                "dipod_normalisation": "per_sequence"}
    assert proxy_fields(TrainConfig(estimator="spg")) == ("elbo_n", "eubo_n")
    assert proxy_fields(TrainConfig(estimator="spg", spg_negative_proxy="elbo")) == ("elbo_n",)
    assert proxy_fields(TrainConfig(estimator="d1")) == ("meanfield_logp_nl", "elbo_n")  # + the DiPOD ELBO
    assert proxy_fields(TrainConfig(estimator="d1", dipod_beta=0.0)) == ("meanfield_logp_nl",)
    assert not TrainConfig(estimator="spg", spg_negative_proxy="elbo").needs_eubo()


@pytest.mark.parametrize("normalisation, divisor", [("per_token", 16.0), ("per_sequence", 4.0)])
def test_dipod_normalisation_option(normalisation, divisor):
    cfg = TrainConfig(estimator="fpo", dipod_beta=0.05, dipod_normalisation=normalisation)
    loss, info = rl_loss(cfg, NEW, OLD, ADV, None)
    assert info["dipod_loss"] == pytest.approx(float(-0.05 * NEW.elbo_n.sum() / divisor), rel=1e-6)
    assert float(loss) == pytest.approx(float(fpo_loss(NEW.elbo_nk, OLD.elbo_nk, ADV)[0]) + info["dipod_loss"], rel=1e-6)
    assert info["dipod_loss"] == pytest.approx(float(dipod_term(
        NEW.elbo_n, 0.05, lengths_n=NEW.lengths_n if normalisation == "per_token" else None)), rel=1e-6)


def test_a_new_estimator_is_one_record(monkeypatch):
    """REINFORCE on the ELBO, added with one record (and no other edit), trains through rl_loss."""
    def reinforce(new, old, adv_n, ref, o):
        return -(adv_n * new.elbo_n).mean() * o["scale"], {}

    record = Estimator("reinforce", "plain REINFORCE on the ELBO", reinforce, reads=lambda o: ("elbo_n",),
                       needs_old=False, needs_meanfield=False, reference_proxy=None,
                       options={"scale": Option(1.0, lambda v: v > 0, "must be > 0")})
    monkeypatch.setitem(ESTIMATORS, "reinforce", record)
    cfg = TrainConfig(estimator="reinforce", dipod_beta=0.0)
    loss, _ = rl_loss(cfg, NEW, OLD, ADV, None)
    assert float(loss) == pytest.approx(float(-(ADV * NEW.elbo_n).mean()), rel=1e-6)
    assert [t is NEW.elbo_n for t in proxies_used(cfg, NEW)] == [True]
    assert estimators.resolve_options("reinforce", {"scale": None}) == {"scale": 1.0}


@pytest.mark.parametrize("masking, reseed, distinct", [("random", None, 1), ("block_random", None, 2),
                                                       ("block_random", False, 1), ("random", True, 2)])
def test_masks_are_redrawn_every_iteration_as_released(masking, reseed, distinct, tmp_path, monkeypatch):
    """SPG's release draws new masks for each inner iteration, the d1 fork's FPO keeps the rollout's;
    the old (rollout-weight) proxies use the same seed as the iteration that reads them."""
    from dipod.lm import train_engine
    from dipod.lm.model import build_tiny_model
    from dipod.lm.trainer import Trainer

    model = build_tiny_model(tmp_path / "m", hidden_size=16, num_layers=1, num_heads=2, intermediate_size=16,
                             max_positions=64)
    cfg = TrainConfig(model=str(model), task="sudoku4", prompt_style="compact", lora_r=0, dtype="float32",
                      prompts_per_step=2, num_generations=2, gradient_accumulation_steps=1, gen_length=8,
                      block_length=4, diffusion_steps=2, num_iterations=2, max_steps=1, masking=masking,
                      reseed_masks=reseed, estimator="fpo", dipod_unscored_eos=True, eval_examples=1,
                      gap_monitor_steps=0, tensorboard=False,
                      progress_bar=False, save_final_model=False, output_dir=str(tmp_path / "run"))
    trainer = Trainer(cfg)
    calls = []
    real = train_engine.compute_proxies

    def spy(lm, *args, **kwargs):
        calls.append((lm.model is trainer.frozen_view.model and not torch.is_grad_enabled(), args[4]))
        return real(lm, *args, **kwargs)

    monkeypatch.setattr(trainer.engine, "compute_proxies", spy)
    examples = trainer.step_examples(1)
    ids, attn = trainer.encode(examples)
    completion = trainer.generate(ids, attn, 0.9, seed=0)
    trainer.update({"prompt_ids": ids, "prompt_attn": attn, "completion_ids": completion,
                    "adv_n": torch.tensor([1.0, -1.0, 0.5, -0.5])}, step=1)
    old_seeds = [seed for is_old, seed in calls if is_old]
    new_seeds = [seed for is_old, seed in calls if not is_old]
    assert len(new_seeds) == 2 and len(set(new_seeds)) == distinct
    assert old_seeds == new_seeds if distinct == 2 else set(old_seeds) == set(new_seeds)
