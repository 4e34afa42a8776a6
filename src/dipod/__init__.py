"""dipod: Diffusion Policy Optimization without Drifting Apart.

RL post-training of masked-diffusion language models and flow-matching policies with variational
policy-gradient estimators (FPO, FPO++, SPG, d1) kept tight on-policy by the DiPOD term.
"""

__version__ = "0.1.0"
