"""The hub-shaped snapshots in ../shared/models and what the installed transformers can run of them.

``needs_snapshots`` skips a test when the snapshots are absent; ``needs_hub_code`` when the
installed transformers cannot run their hub code (the legacy ``trust_remote_code`` path loads on
4.56-4.57 only; the default path, our own network, runs everywhere).
"""

from __future__ import annotations

from pathlib import Path

import pytest

MODELS = Path(__file__).resolve().parents[1].parent / "shared" / "models"
SNAPSHOTS = {"llada": MODELS / "tiny-llada", "dream": MODELS / "tiny-dream"}
HUB_LOGITS = MODELS / "hub_code_logits_4.57.pt"


def hub_code_loads() -> bool:
    try:
        import transformers
    except ImportError:
        return False
    from dipod.lm.model import LEGACY_TRANSFORMERS, _version

    return LEGACY_TRANSFORMERS[0] <= _version(transformers.__version__) < LEGACY_TRANSFORMERS[1]


needs_snapshots = pytest.mark.skipif(not all((p / "model.safetensors").is_file() for p in SNAPSHOTS.values()),
                                     reason="../shared/models snapshots are absent")
needs_hub_code = pytest.mark.skipif(not hub_code_loads(),
                                    reason="the hub code of LLaDA / Dream loads on transformers 4.56-4.57 only")
