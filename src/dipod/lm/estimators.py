"""The estimator registry: one record per policy-gradient estimator of `dipod lm train`.

A record says which proxies its loss reads, whether it needs proxies under the rollout weights
("old", for ratio estimators), which proxy of the reference model its KL term compares, its own
options with defaults and checks, how the DiPOD term is normalised for it, and its loss (a thin
adapter onto a function of ``dipod.objectives``). ``TrainConfig`` derives its per-estimator checks
from these records, and the trainer resolves its loss here once by name, so adding an estimator is
one function in objectives.py and one record below.

Two kinds of likelihood: the bounds of ``dipod.lm.proxies`` (ELBO / EUBO / mean-field, Monte-Carlo
masked copies, the estimators DiPOD tightens) and the exact left-to-right likelihood of
``dipod.lm.left_to_right`` (``left_to_right=True``: JustGRPO; its rollouts are decoded left to right
too, the policy whose likelihood it reads).

Shape names as in ``dipod.lm.proxies``: ``N`` sequences, ``K`` draws, ``L`` completion tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor

from dipod.objectives import SPG_NEGATIVE_PROXIES, d1_loss, fpo_loss, fpo_plus_plus_loss, justgrpo_loss, spg_loss

# How the DiPOD term -beta * ELBO is averaged over the batch:
#   per_token    -beta * sum_n ELBO_n / sum_n L_n   (SPG's released form; beta scales a per-token ELBO)
#   per_sequence -beta * mean_n ELBO_n              (the d1 fork's FPO; mean(L) times stronger at equal beta)
DIPOD_NORMALISATIONS = ("per_token", "per_sequence")


@dataclass(frozen=True)
class Option:
    """One estimator option: a TrainConfig field of the same name (``None`` there = this default)."""

    default: Any
    valid: Callable[[Any], bool]
    requirement: str  # what ``valid`` asks, for the error message
    # Options that only matter for some values of the others (say eubo_beta with an ELBO-only SPG):
    # setting one where it is unused is a contradiction, reported before any compute.
    applies: Callable[[Mapping[str, Any]], bool] = lambda options: True
    unused_when: str = ""


def _positive(x) -> bool:
    return x > 0


def _non_negative(x) -> bool:
    return x >= 0


def _clip_eps(default: float) -> Option:
    return Option(default, _positive, "must be > 0")


def _kl_beta() -> Option:
    return Option(0.0, _non_negative, "must be >= 0 (0: no KL term, no reference model)")


def _dipod_normalisation(default: str) -> Option:
    return Option(default, lambda v: v in DIPOD_NORMALISATIONS, f"must be one of {DIPOD_NORMALISATIONS}")


@dataclass(frozen=True)
class Estimator:
    name: str
    summary: str
    # loss(new, old, adv_n, ref, options) -> (loss, diagnostics); new/old are dipod.lm.proxies.Proxies
    loss: Callable[..., tuple[Tensor, dict]]
    reads: Callable[[Mapping[str, Any]], tuple[str, ...]]  # Proxies fields of `new` the loss reads
    needs_old: bool  # reads proxies under the rollout weights (its ratio)
    needs_meanfield: bool  # the proxies must include d1's mean-field copy
    reference_proxy: str | None  # Proxies field of the reference model that kl_beta compares
    options: dict[str, Option] = field(default_factory=dict)
    # reads the exact left-to-right log-probs, and its rollouts are decoded left to right (one token per step)
    left_to_right: bool = False


def _d1(new, old, adv_n, ref, o):
    return d1_loss(new.meanfield_logp_nl, old.meanfield_logp_nl, adv_n, new.completion_mask_nl,
                   eps=o["clip_eps"], kl_beta=o["kl_beta"], logp_ref_nl=ref)


def _fpo(new, old, adv_n, ref, o):
    return fpo_loss(new.elbo_nk, old.elbo_nk, adv_n, eps=o["clip_eps"], kl_beta=o["kl_beta"], elbo_ref=ref)


def _fpo_plus_plus(new, old, adv_n, ref, o):
    return fpo_plus_plus_loss(new.elbo_nk, old.elbo_nk, adv_n, eps=o["clip_eps"], log_ratio_max=o["log_ratio_max"])


def _spg_uses_eubo(o: Mapping[str, Any]) -> bool:
    return o["spg_negative_proxy"] != "elbo"


def _spg(new, old, adv_n, ref, o):
    return spg_loss(adv_n, new.elbo_n, new.eubo_n if _spg_uses_eubo(o) else None,
                    negative_proxy=o["spg_negative_proxy"], mix_weight=o["spg_mix_weight"], lengths_n=new.lengths_n)


def _justgrpo(new, old, adv_n, ref, o):
    return justgrpo_loss(new.left_to_right_logp_nl, old.left_to_right_logp_nl, adv_n, eps=o["clip_eps"])


ESTIMATORS: dict[str, Estimator] = {e.name: e for e in (
    Estimator("d1", "diffu-GRPO: token-level PPO clip on d1's mean-field log-probs (+ k3 KL)", _d1,
              reads=lambda o: ("meanfield_logp_nl",), needs_old=True, needs_meanfield=True,
              reference_proxy="meanfield_logp_nl",
              options={"clip_eps": _clip_eps(0.2), "kl_beta": _kl_beta(),
                       "dipod_normalisation": _dipod_normalisation("per_token")}),
    Estimator("fpo", "FPO as the d1 fork: one PPO-clipped ELBO ratio per sequence (+ KL on ELBOs)", _fpo,
              reads=lambda o: ("elbo_nk",), needs_old=True, needs_meanfield=False, reference_proxy="elbo_n",
              options={"clip_eps": _clip_eps(0.2), "kl_beta": _kl_beta(),
                       "dipod_normalisation": _dipod_normalisation("per_sequence")}),
    Estimator("fpo++", "FPO++: per-draw ratios, PPO clip for A >= 0, SPO penalty for A < 0", _fpo_plus_plus,
              reads=lambda o: ("elbo_nk",), needs_old=True, needs_meanfield=False, reference_proxy=None,
              options={"clip_eps": _clip_eps(0.05), "log_ratio_max": Option(3.0, _positive, "must be > 0"),
                       "dipod_normalisation": _dipod_normalisation("per_token")}),
    Estimator("spg", "SPG: ELBO for A > 0, EUBO / ELBO / mix for A < 0, length-weighted, no ratio", _spg,
              reads=lambda o: ("elbo_n", "eubo_n") if _spg_uses_eubo(o) else ("elbo_n",),
              needs_old=False, needs_meanfield=False, reference_proxy=None,
              options={"spg_negative_proxy": Option("mix", lambda v: v in SPG_NEGATIVE_PROXIES,
                                                    f"must be one of {SPG_NEGATIVE_PROXIES}"),
                       "spg_mix_weight": Option(0.5, lambda v: 0.0 <= v <= 1.0, "must lie in [0, 1]",
                                                applies=lambda o: o["spg_negative_proxy"] == "mix",
                                                unused_when="spg_negative_proxy is not 'mix'"),
                       "eubo_beta": Option(1.5, _positive, "must be > 0", applies=_spg_uses_eubo,
                                           unused_when="spg_negative_proxy='elbo' reads no EUBO"),
                       "dipod_normalisation": _dipod_normalisation("per_token")}),
    Estimator("justgrpo", "JustGRPO: left-to-right rollouts, token-level PPO clip on the exact left-to-right "
              "log-probs, no KL", _justgrpo, reads=lambda o: ("left_to_right_logp_nl",), needs_old=True,
              needs_meanfield=False, reference_proxy=None, left_to_right=True,
              options={"clip_eps": _clip_eps(0.2), "dipod_normalisation": _dipod_normalisation("per_token")}),
)}

# option name -> the estimators that have it (every other estimator must leave it unset)
OPTION_OWNERS: dict[str, tuple[str, ...]] = {}
for _e in ESTIMATORS.values():
    for _name in _e.options:
        OPTION_OWNERS[_name] = OPTION_OWNERS.get(_name, ()) + (_e.name,)


def get_estimator(name: str) -> Estimator:
    if name not in ESTIMATORS:
        raise ValueError(f"estimator={name!r}; choose one of {tuple(ESTIMATORS)}")
    return ESTIMATORS[name]


def option_help(name: str, what: str) -> str:
    """Flag help for option ``name``: ``what`` plus each owning estimator's default."""
    defaults = ", ".join(f"{e}: {ESTIMATORS[e].options[name].default}" for e in OPTION_OWNERS[name])
    return f"{what} (default {defaults}; other estimators: must stay unset)"


def resolve_options(name: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Estimator ``name``'s options: ``given`` values (None = unset) over the record's defaults.

    Raises ValueError naming the field when a value is set for an estimator that has no such
    option, is out of range, or is unused given the other options.
    """
    estimator = get_estimator(name)
    foreign = [k for k, v in given.items() if v is not None and k in OPTION_OWNERS and k not in estimator.options]
    if foreign:
        raise ValueError(", ".join(f"{k} (used by {'/'.join(OPTION_OWNERS[k])})" for k in foreign)
                         + f" do not apply to estimator={name!r}; remove them or change --estimator")
    options = {k: (given.get(k) if given.get(k) is not None else opt.default) for k, opt in estimator.options.items()}
    for k, opt in estimator.options.items():
        if not opt.valid(options[k]):
            raise ValueError(f"{k}={options[k]!r} {opt.requirement}")
        if given.get(k) is not None and not opt.applies(options):
            raise ValueError(f"{k}={given[k]!r} is unused here ({opt.unused_when}); remove it")
    return options
