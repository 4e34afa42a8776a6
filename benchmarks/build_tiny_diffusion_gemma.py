"""Build the tiny DiffusionGemma snapshot (transformers' own classes, random weights, our character tokenizer).

    python benchmarks/build_tiny_diffusion_gemma.py OUT_DIR [--canvas_length 8] [--seed 0]

The result loads with ``dipod lm eval / generate / train --model OUT_DIR`` as the ``diffusion_gemma``
family (docs/lm_models.md); about 0.16 M parameters, 0.66 MB on disk. Needs transformers >= 5 with
``transformers.models.diffusion_gemma``.
"""

from __future__ import annotations

import argparse

from dipod.lm.diffusion_gemma import build_tiny_diffusion_gemma


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--canvas_length", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(build_tiny_diffusion_gemma(args.out_dir, canvas_length=args.canvas_length, seed=args.seed))


if __name__ == "__main__":
    main()
