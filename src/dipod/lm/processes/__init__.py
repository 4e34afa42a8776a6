"""Diffusion processes: one object per kind of diffusion, behind one seam (``base.DiffusionProcess``).

- ``masked`` (``masked.py``): full-sequence masked diffusion, LLaDA and Dream (and any Hugging Face
  mask predictor);
- ``uniform`` (``uniform.py``): uniform-noise block diffusion, DiffusionGemma.

A model family names its process (``ModelFamily.process``); ``registry.process_of(lm)`` finds it. The
public entry points (``dipod.lm.sampler.decode``, ``dipod.lm.proxies.compute_proxies`` /
``gap_lower_bound``, ``dipod.lm.monitors.rollout_confidence``) check their inputs and call it.
How to add a process: docs/design.md. This package file imports nothing, so that a model module
(``dipod.lm.diffusion_gemma``) can import ``base`` while ``registry`` imports the processes.
"""

