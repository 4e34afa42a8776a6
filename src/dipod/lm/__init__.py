"""Masked-diffusion language models: loading (model), likelihood proxies (proxies), decoding
(sampler), tasks, supervised training (sft) and the RL trainer. Submodules import lazily heavy
dependencies (transformers, peft), so import the one you need: ``from dipod.lm.model import ...``."""
