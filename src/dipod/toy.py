r"""The exact two-token masked diffusion diagnostic of double drift (paper Sec. 4.1, Appendix D).

The model generates ``x = (x1, x2)`` with tokens in {A, B}, starting from ``MM`` (both masked)
and revealing one token at a time in a uniformly random order. Six logits, in this order:

======  =====================================  ======================================
index   logit                                  conditional
======  =====================================  ======================================
0  a    ``logit pi(x1 = A | M A)``             x1 given x2 = A already revealed
1  b    ``logit pi(x1 = A | M M)``             x1 first
2  c    ``logit pi(x2 = A | A M)``             x2 given x1 = A already revealed
3  d    ``logit pi(x2 = A | M M)``             x2 first
4  e    ``logit pi(x1 = A | M B)``             x1 given x2 = B already revealed
5  f    ``logit pi(x2 = A | B M)``             x2 given x1 = B already revealed
======  =====================================  ======================================

Everything is exact: the four outputs are enumerated in the order ``OUTPUTS = (AA, AB, BA, BB)``
and every function takes ``theta [..., 6]`` (float64) and returns ``[..., 4]``, batched over any
leading dims (the experiment runs all methods as one ``[M, 6]`` batch).

Write ``q_i(x) = pi(x_i | both masked)`` and ``r_i(x) = pi(x_i | the other token revealed)``.
The two decoding orders give ``p_12(x) = q_1 r_2`` (x1 first) and ``p_21(x) = q_2 r_1``, so

* ``log pi(x) = log(p_12/2 + p_21/2)``  (the exact likelihood, a mixture over orders);
* ``ELBO(x) = (log p_12 + log p_21) / 2`` (the masked-diffusion ELBO with ``w(t) = 1/t``: each
  token is masked with probability ``t`` and predicted from the other token, which is masked with
  probability ``t``; ``E_t[(1/t) t (t log q_i + (1-t) log r_i)] = (log q_i + log r_i)/2``);
* the gap ``D^L(x) = log pi(x) - ELBO(x) >= 0`` (Jensen), zero exactly when ``p_12 = p_21``.

The SPG EUBO surrogate, continuous-time form with ``w(t) = 1/t``, ``t ~ U(0, 1)``. SPG's
per-token upper bound is ``(1/beta_E) log E_{t, x_t}[w(t) 1{x_t^i = M} pi(x_i | x_t)^beta_E]``
summed over tokens. For token ``i``: it is masked with probability ``t``, and then the other token
is masked (context ``MM``) with probability ``t`` or revealed with probability ``1 - t``, so

    E_t[(1/t) * t * (t q_i^beta_E + (1 - t) r_i^beta_E)] = q_i^beta_E / 2 + r_i^beta_E / 2,

    EUBO(x) = (1/beta_E) sum_i log(q_i(x)^beta_E / 2 + r_i(x)^beta_E / 2)
            = sum_i log M_beta_E(q_i, r_i)      (M_p = power mean of order p).

Is it an upper bound? ``pi(x) = (q_1 r_2 + q_2 r_1)/2`` and, by Cauchy-Schwarz,
``M_2(q_1, r_1) M_2(q_2, r_2) >= (q_1 r_2 + q_2 r_1)/2``; power means grow with their order, so
``EUBO >= log pi`` for every ``beta_E >= 2``. Below 2 it can fail: with ``q_1 = r_2 -> 1`` and
``r_1 = q_2 -> 0`` the EUBO tends to ``-(2/beta_E) log 2`` while ``log pi -> -log 2``. The paper's
default ``beta_E = 1.5`` is therefore only a surrogate, not a guaranteed bound. Where each token's
two conditionals agree (``q_i = r_i``, a product distribution) ELBO = EUBO = log pi.

Methods (exact-expectation updates, ``theta <- theta + lr sum_x pi(x)[g(x) + beta grad ELBO(x)]``,
``beta > 0`` only for the ``+dipod`` methods): ``pg`` uses ``g = A grad log pi`` (the true policy
gradient), ``fpo`` ``g = A grad ELBO``, ``spg`` ``g = A grad ELBO`` where ``A > 0`` and
``A grad EUBO`` otherwise; ``fpo+interleave`` is FPO with Algorithm 1: after every
``interleave_every`` policy steps, ``distill_steps`` gradient-ascent steps on
``E_{x ~ pi_ref}[ELBO(x)]`` with ``pi_ref`` the frozen current policy.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from dipod.config import ConfigError, config_to_dict, parse_config
from dipod.runlog import atomic_write_bytes, atomic_write_json

DTYPE = torch.float64
OUTPUTS = ("AA", "AB", "BA", "BB")
REWARDS = torch.tensor([0.8, 1.0, 0.7, 1.0], dtype=DTYPE)  # r(AA), r(AB), r(BA), r(BB)
METHODS = ("pg", "fpo", "fpo+dipod", "spg", "spg+dipod", "fpo+interleave")
# The likelihood proxy each method differentiates (see estimator_directions).
_PROXY = {"pg": "logpi", "fpo": "elbo", "fpo+dipod": "elbo", "spg": "spg", "spg+dipod": "spg", "fpo+interleave": "elbo"}

# Which logit gives pi(x_i | context) for each output x and token i, context 0 = both masked,
# context 1 = the other token revealed: [output, token, context].
_LOGIT_INDEX = torch.tensor([
    [[1, 0], [3, 2]],  # AA: x1 | MM = b, x1 | MA = a;  x2 | MM = d, x2 | AM = c
    [[1, 4], [3, 2]],  # AB: x1 | MB = e
    [[1, 0], [3, 5]],  # BA: x2 | BM = f
    [[1, 4], [3, 5]],  # BB
])
# +1 where the token is A (log sigmoid(logit)), -1 where it is B (log sigmoid(-logit)): [output, token, 1].
_TOKEN_SIGN = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=DTYPE)[:, :, None]


def token_log_probs(theta: Tensor) -> Tensor:
    """``log pi(x_i | context)`` -> ``[..., 4 outputs, 2 tokens, 2 contexts (MM, other revealed)]``."""
    # log sigmoid(z) = -softplus(-z); torch's logsigmoid kernel is ~1000x slower on tiny CPU tensors
    # when it runs multi-threaded (torch 2.13).
    return -torch.nn.functional.softplus(-_TOKEN_SIGN * theta[..., _LOGIT_INDEX])


def order_log_probs(theta: Tensor) -> Tensor:
    """Log-probability of each output along each decoding order -> ``[..., 4, 2]`` (x1 first, x2 first)."""
    lp = token_log_probs(theta)
    x1_first = lp[..., 0, 0] + lp[..., 1, 1]  # log q_1 + log r_2
    x2_first = lp[..., 1, 0] + lp[..., 0, 1]  # log q_2 + log r_1
    return torch.stack([x1_first, x2_first], dim=-1)


def log_likelihood(theta: Tensor) -> Tensor:
    """Exact ``log pi(x)``, the uniform mixture over the two decoding orders -> ``[..., 4]``."""
    return torch.logsumexp(order_log_probs(theta), dim=-1) - math.log(2.0)


def probs(theta: Tensor) -> Tensor:
    """``pi(x)`` for AA, AB, BA, BB -> ``[..., 4]`` (sums to one)."""
    return log_likelihood(theta).exp()


def elbo(theta: Tensor) -> Tensor:
    """Masked-diffusion ELBO = mean over the two orders of the order's log-probability -> ``[..., 4]``."""
    return order_log_probs(theta).mean(dim=-1)


def gap(theta: Tensor) -> Tensor:
    """``D^L(x) = log pi(x) - ELBO(x) >= 0`` -> ``[..., 4]``."""
    return log_likelihood(theta) - elbo(theta)


def eubo(theta: Tensor, beta_e: float) -> Tensor:
    """SPG EUBO surrogate ``(1/beta_E) sum_i log(q_i^beta_E / 2 + r_i^beta_E / 2)`` -> ``[..., 4]``."""
    if beta_e <= 0:
        raise ValueError(f"eubo: beta_e={beta_e} must be > 0")
    lp = token_log_probs(theta)
    per_token = (torch.logsumexp(beta_e * lp, dim=-1) - math.log(2.0)) / beta_e
    return per_token.sum(dim=-1)


def expected_reward(theta: Tensor) -> Tensor:
    """``J = sum_x pi(x) r(x)`` -> ``[...]``; its gradient is the true policy gradient."""
    return (probs(theta) * REWARDS).sum(dim=-1)


def advantages(theta: Tensor) -> Tensor:
    """``A(x) = r(x) - sum_x pi(x) r(x)`` -> ``[..., 4]``."""
    return REWARDS - expected_reward(theta)[..., None]


def expected_gap(theta: Tensor) -> Tensor:
    """``E_pi[D^L] = sum_x pi(x) (log pi(x) - ELBO(x))`` -> ``[...]``."""
    return (probs(theta) * gap(theta)).sum(dim=-1)


def kl_divergence(logp_ref: Tensor, theta: Tensor) -> Tensor:
    """``KL(pi_ref || pi_theta)`` from the reference log-probs ``[..., 4]`` -> ``[...]``."""
    return (logp_ref.exp() * (logp_ref - log_likelihood(theta))).sum(dim=-1)


def estimator_directions(theta_m6: Tensor, proxy: list[str], eubo_beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Exact expected update directions for a batch of parameter vectors ``[M, 6]``.

    ``proxy[m]`` is ``'logpi'`` (true PG), ``'elbo'`` (FPO) or ``'spg'`` (ELBO where A > 0, EUBO
    otherwise). Returns ``(g, dipod, pg)``, each ``[M, 6]``: the estimator's
    ``sum_x pi(x) A(x) grad proxy(x)``, the DiPOD direction ``sum_x pi(x) grad ELBO(x)``, and the
    true policy gradient ``grad sum_x pi(x) r(x) = sum_x pi(x) A(x) grad log pi(x)``.
    """
    unknown = set(proxy) - {"logpi", "elbo", "spg"}
    if unknown:
        raise ValueError(f"estimator_directions: unknown proxy {sorted(unknown)}; use logpi, elbo or spg")
    theta = theta_m6.detach().requires_grad_(True)
    logp_m4, elbo_m4 = log_likelihood(theta), elbo(theta)
    pi_m4 = logp_m4.exp()
    adv_m4 = (REWARDS - (pi_m4 * REWARDS).sum(-1, keepdim=True)).detach()
    use_logpi = torch.tensor([p == "logpi" for p in proxy])[:, None]
    use_spg = torch.tensor([p == "spg" for p in proxy])[:, None]
    proxy_m4 = elbo_m4
    if bool(use_spg.any()):
        proxy_m4 = torch.where(use_spg & (adv_m4 <= 0), eubo(theta, eubo_beta), proxy_m4)
    proxy_m4 = torch.where(use_logpi, logp_m4, proxy_m4)
    weight_m4 = pi_m4.detach()
    (g,) = torch.autograd.grad((weight_m4 * adv_m4 * proxy_m4).sum(), theta, retain_graph=True)
    (dipod,) = torch.autograd.grad((weight_m4 * elbo_m4).sum(), theta, retain_graph=True)
    (pg,) = torch.autograd.grad((pi_m4 * REWARDS).sum(), theta)
    return g, dipod, pg


def self_distill(theta_6: Tensor, steps: int, lr: float) -> tuple[Tensor, float]:
    """Algorithm 1's distillation: gradient ascent on ``E_{x ~ pi_ref}[ELBO_theta(x)]``, ``pi_ref`` frozen.

    The objective is concave in the logits (sums of log-sigmoids) and maximised by the policy
    that equals ``pi_ref`` with a tight ELBO, so it tightens the bound without moving the policy.
    Returns the new logits and ``KL(pi_ref || pi)`` after distillation.
    """
    logp_ref = log_likelihood(theta_6).detach()
    pi_ref = logp_ref.exp()
    theta = theta_6.detach().clone()
    for _ in range(steps):
        theta.requires_grad_(True)
        (grad,) = torch.autograd.grad((pi_ref * elbo(theta)).sum(), theta)
        theta = (theta + lr * grad).detach()
    return theta, float(kl_divergence(logp_ref, theta))


def _cosine(u_md: Tensor, v_md: Tensor) -> Tensor:
    denom = u_md.norm(dim=-1) * v_md.norm(dim=-1)
    # A zero vector (both gradients vanish at an optimum) has no direction: report NaN, not 0 or 1.
    return torch.where(denom > 0, (u_md * v_md).sum(-1) / denom.clamp_min(1e-300), torch.nan)


@dataclass
class ToyConfig:
    out: str = field(default="runs/toy", metadata={"help": "output folder for toy.json and toy.png"})
    steps: int = field(default=1500, metadata={"help": "policy-gradient steps per method"})
    lr: float = field(default=0.1, metadata={"help": "policy learning rate"})
    beta: float = field(default=0.2, metadata={"help": "DiPOD coefficient for the +dipod methods"})
    eubo_beta: float = field(default=1.5, metadata={"help": "SPG EUBO exponent beta_E"})
    init: float = field(default=0.5, metadata={"help": "initial value of all six logits"})
    methods: list[str] = field(default_factory=lambda: list(METHODS), metadata={"help": f"comma list from {','.join(METHODS)}"})
    interleave_every: int = field(default=10, metadata={"help": "fpo+interleave: policy steps between distillations (n)"})
    distill_steps: int = field(default=50, metadata={"help": "fpo+interleave: gradient steps per distillation (m)"})
    distill_lr: float = field(default=2.0, metadata={"help": "fpo+interleave: distillation learning rate"})

    def __post_init__(self):
        positive = {"steps": self.steps, "lr": self.lr, "eubo_beta": self.eubo_beta, "interleave_every": self.interleave_every,
                    "distill_steps": self.distill_steps, "distill_lr": self.distill_lr}
        for name, value in positive.items():
            if not value > 0:
                raise ConfigError(f"--{name.replace('_', '-')}={value} must be > 0")
        if not self.beta >= 0:
            raise ConfigError(f"--beta={self.beta} must be >= 0 (0 turns DiPOD off in the +dipod methods)")
        if not math.isfinite(self.init) or abs(self.init) > 20:
            raise ConfigError(f"--init={self.init} must be a finite logit in [-20, 20]")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ConfigError(f"--methods: unknown or empty {unknown}; choose from {','.join(METHODS)}")
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"--methods lists a method twice: {self.methods}")


def run_toy(cfg: ToyConfig) -> dict:
    """Run every method for ``cfg.steps`` exact updates; returns the ``toy.json`` content.

    Curves hold ``steps + 1`` points: step 0 is the initial state; the cosine at step k is that of
    the update the method takes from the state at step k.
    """
    names = list(cfg.methods)
    proxy = [_PROXY[m] for m in names]
    dipod_beta_m1 = torch.tensor([cfg.beta if m.endswith("+dipod") else 0.0 for m in names], dtype=DTYPE)[:, None]
    interleave = names.index("fpo+interleave") if "fpo+interleave" in names else None
    theta = torch.full((len(names), 6), cfg.init, dtype=DTYPE)
    reward, gaps, cosine, distill_kl = [], [], [], []
    for step in range(cfg.steps + 1):
        g, dipod, pg = estimator_directions(theta, proxy, cfg.eubo_beta)
        with torch.no_grad():
            reward.append(expected_reward(theta))
            gaps.append(expected_gap(theta))
            cosine.append(_cosine(g, pg))
        if step == cfg.steps:
            break
        theta = theta + cfg.lr * (g + dipod_beta_m1 * dipod)
        if interleave is not None and (step + 1) % cfg.interleave_every == 0:
            theta[interleave], kl = self_distill(theta[interleave], cfg.distill_steps, cfg.distill_lr)
            distill_kl.append((step + 1, kl))
    curves = {"reward": torch.stack(reward, 1), "gap": torch.stack(gaps, 1), "grad_cosine": torch.stack(cosine, 1)}
    steps = list(range(cfg.steps + 1))
    methods = {}
    for m, name in enumerate(names):
        method_curves = {key: [_json_float(v) for v in value[m].tolist()] for key, value in curves.items()}
        methods[name] = {
            "final_reward": method_curves["reward"][-1],
            "final_gap": method_curves["gap"][-1],
            "max_gap": max(method_curves["gap"]),
            "final_grad_cosine": method_curves["grad_cosine"][-1],
            "curves": {"step": steps, **method_curves},
        }
    if interleave is not None:
        methods["fpo+interleave"]["distill_kl"] = {"step": [s for s, _ in distill_kl], "kl": [k for _, k in distill_kl]}
    return {"config": config_to_dict(cfg), "methods": methods}


def _json_float(value: float) -> float | None:
    return value if math.isfinite(value) else None  # JSON has no NaN (undefined cosine)


def format_table(result: dict) -> str:
    lines = [f"{'method':<16} {'final reward':>12} {'final gap':>11} {'max gap':>11} {'final cos':>10}"]
    for name, r in result["methods"].items():
        cos = "n/a" if r["final_grad_cosine"] is None else f"{r['final_grad_cosine']:.4f}"
        lines.append(f"{name:<16} {r['final_reward']:>12.4f} {r['final_gap']:>11.2e} {r['max_gap']:>11.2e} {cos:>10}")
    if "fpo+interleave" in result["methods"]:
        kl = result["methods"]["fpo+interleave"]["distill_kl"]["kl"]
        if kl:
            lines.append(f"fpo+interleave: {len(kl)} distillations, max KL(pi_ref || pi) after one = {max(kl):.2e}")
    lines.append("optimum expected reward = 1.0 (AB and BB)")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Three panels (expected gap, expected reward, gradient cosine vs step), one line per method."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = [("gap", "expected gap  E_pi[log pi - ELBO]"), ("reward", "expected reward"), ("grad_cosine", "cos(update, true PG)")]
    for ax, (key, title) in zip(axes, panels):
        for name, r in result["methods"].items():
            values = [math.nan if v is None else v for v in r["curves"][key]]
            ax.plot(r["curves"]["step"], values, label=name, lw=1.4)
        ax.set_title(title)
        ax.set_xlabel("policy step")
        ax.grid(alpha=0.3)
    axes[1].axhline(1.0, color="k", ls=":", lw=1)
    axes[0].legend(fontsize=8)
    cfg = result["config"]
    fig.suptitle(f"two-token masked diffusion (exact): lr={cfg['lr']}, DiPOD beta={cfg['beta']}, "
                 f"beta_E={cfg['eubo_beta']}, init logits={cfg['init']}", fontsize=10)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())


def main(argv: list[str], prog: str = "dipod toy") -> int:
    cfg = parse_config(ToyConfig, argv, prog, description="Exact two-token diagnostic of double drift (paper Fig. 2).")
    out = Path(cfg.out)
    started = time.perf_counter()
    result = run_toy(cfg)
    atomic_write_json(out / "toy.json", result)
    plot(result, out / "toy.png")
    print(format_table(result))
    print(f"wrote {out / 'toy.json'} and {out / 'toy.png'} in {time.perf_counter() - started:.1f} s")
    return 0

