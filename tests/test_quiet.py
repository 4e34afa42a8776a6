"""The command line hides third-party lines a user cannot act on, and only those."""

import logging
import warnings

import huggingface_hub.utils as hub_utils
import pytest
import transformers.utils.logging as transformers_logging

from dipod.quiet import silence_third_party_noise


@pytest.fixture
def restore_libraries():
    logger = logging.getLogger("DeepSpeed")
    filters, bars, downloads = list(logger.filters), transformers_logging.is_progress_bar_enabled(), \
        not hub_utils.are_progress_bars_disabled()
    with warnings.catch_warnings():
        yield logger
    logger.filters[:] = filters
    (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
    (hub_utils.enable_progress_bars if downloads else hub_utils.disable_progress_bars)()


def test_deepspeeds_cpu_fallback_line_is_dropped_and_its_other_warnings_kept(restore_libraries, caplog):
    silence_third_party_noise(language_models=False)
    logger = restore_libraries
    with caplog.at_level(logging.WARNING, logger="DeepSpeed"):
        logger.warning("Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect it.")
        logger.warning("ZeRO stage 3 offload misconfigured")
    assert [r.getMessage() for r in caplog.records] == ["ZeRO stage 3 offload misconfigured"]


def test_weight_loading_bars_go_but_download_bars_stay(restore_libraries):
    hub_utils.enable_progress_bars()
    silence_third_party_noise(language_models=True)
    assert not transformers_logging.is_progress_bar_enabled()
    assert not hub_utils.are_progress_bars_disabled()
    hub_utils.disable_progress_bars()  # a user who hid the hub's bars keeps them hidden
    silence_third_party_noise(language_models=True)
    assert hub_utils.are_progress_bars_disabled()


def test_library_deprecations_are_hidden_ours_are_not(restore_libraries):
    silence_third_party_noise(language_models=False)
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit("old argument", FutureWarning, "x.py", 1, module="transformers.modeling_utils")
        warnings.warn_explicit("old dipod flag", FutureWarning, "y.py", 1, module="dipod.lm.trainer")
    assert [str(w.message) for w in seen] == ["old dipod flag"]
