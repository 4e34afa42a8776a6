"""The legacy ``--trust_remote_code`` path's version gate is per family: each family's hub code loads on
its own transformers range (ModelFamily.hub_code_transformers), and a user on another version is told
that family's range, not LLaDA / Dream's.

Ranges, from the hub code itself (../shared/models/README.md): LLaDA / Dream 4.56-4.57 (5.x breaks
their tie_weights / rope_type); SDAR 4.52-4.53 (modeling_sdar.py imports ``LossKwargs``, removed in 4.54,
and ``SlidingWindowCache``, removed in 5.0); LLaDA2 4.54-4.57 (modeling_llada2_moe.py imports
``TransformersKwargs``, added in 4.54; 5.x leaves its rotary buffer uninitialised).
"""

from __future__ import annotations

import sys

import pytest

from dipod.lm.families import FAMILIES
from dipod.lm.model import load_masked_lm

GATE = "--trust_remote_code true runs the hub code of"


def pretend_installed(monkeypatch, version: str) -> None:
    """Patch the transformers module the loader will import: the one in sys.modules now (another test may
    have reloaded it since this file was collected, leaving a module-level import stale)."""
    import transformers  # noqa: F401  (makes sure it is in sys.modules)

    monkeypatch.setattr(sys.modules["transformers"], "__version__", version)


@pytest.fixture(scope="module")
def block_models(tmp_path_factory):
    from dipod.lm.networks.tiny_block import build_tiny_block_model

    root = tmp_path_factory.mktemp("hub_code_versions")
    return {family: build_tiny_block_model(root / family, family) for family in ("sdar", "llada2_moe")}


@pytest.mark.parametrize("family,installed,versions,pip", [
    ("sdar", "4.57.1", "4.52-4.53", "'transformers>=4.52,<4.54'"),  # inside LLaDA's range: the old gate let it by
    ("sdar", "5.25.0", "4.52-4.53", "'transformers>=4.52,<4.54'"),
    ("llada2_moe", "4.53.2", "4.54-4.57", "'transformers>=4.54,<4.58'"),
    ("llada2_moe", "5.0.0", "4.54-4.57", "'transformers>=4.54,<4.58'"),
])
def test_a_block_family_outside_its_range_is_told_its_own_versions(block_models, monkeypatch, family, installed,
                                                                   versions, pip):
    pretend_installed(monkeypatch, installed)
    with pytest.raises(ValueError) as err:
        load_masked_lm(block_models[family], trust_remote_code=True)
    assert str(err.value) == (
        f"{GATE} {family}, which loads on transformers {versions} only (installed: {installed}). Drop "
        f"--trust_remote_code: dipod loads {family} into its own network on any supported transformers; or pip "
        f"install {pip}")


@pytest.mark.parametrize("family,installed", [("sdar", "4.52.4"), ("sdar", "4.53.0"), ("llada2_moe", "4.54.0"),
                                              ("llada2_moe", "4.57.6")])
def test_inside_its_range_a_block_family_is_refused_before_any_hub_code_runs(block_models, monkeypatch, family,
                                                                               installed):
    """The version gate is passed; the block-causal process is not wired to the hub code, so the legacy path
    is refused with the fix instead of decoding with the wrong attention."""
    pretend_installed(monkeypatch, installed)
    with pytest.raises(ValueError) as err:
        load_masked_lm(block_models[family], trust_remote_code=True)
    assert GATE not in str(err.value)
    assert str(err.value).startswith(f"--trust_remote_code true is not supported for {family} yet")
    assert "Drop --trust_remote_code" in str(err.value)


def test_the_ranges_are_the_hub_codes_own():
    ranges = {name: family.hub_code_transformers for name, family in FAMILIES.items() if family.native}
    assert ranges == {"llada": ((4, 56), (4, 58)), "dream": ((4, 56), (4, 58)), "sdar": ((4, 52), (4, 54)),
                      "llada2_moe": ((4, 54), (4, 58)), "sdar_moe": None}  # no hub code seen: no claim


def test_llada_keeps_its_range(hub_models, monkeypatch):
    pretend_installed(monkeypatch, "4.53.2")
    with pytest.raises(ValueError, match=r"hub code of llada, which loads on transformers 4\.56-4\.57 only "
                                         r"\(installed: 4\.53\.2\).*'transformers>=4\.56,<4\.58'"):
        load_masked_lm(hub_models["llada"], trust_remote_code=True)


def test_load_in_4bit_points_to_the_legacy_path_only_where_it_runs(block_models, hub_models):
    """4-bit loading goes through the hub code; LLaDA's legacy path can take it, a block family's cannot
    (it is refused), so only LLaDA is sent there."""
    with pytest.raises(ValueError) as llada:
        load_masked_lm(hub_models["llada"], load_in_4bit=True)
    assert str(llada.value).endswith("or use the legacy path (--trust_remote_code true on transformers 4.56-4.57)")
    with pytest.raises(ValueError) as sdar:
        load_masked_lm(block_models["sdar"], load_in_4bit=True)
    assert str(sdar.value).endswith("Set load_in_4bit false")
