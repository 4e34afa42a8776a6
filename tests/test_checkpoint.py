"""dipod.checkpoint's promises beyond crashes (tests/test_checkpoint_crash.py): every spelling of
``--resume`` has one meaning, ..."""

from __future__ import annotations

import pytest

from dipod.checkpoint import resume_target


@pytest.mark.parametrize("value, meaning", [
    (None, None), (False, None), ("", None), ("  ", None), ("false", None), ("False", None), (" none ", None),
    ("NULL", None), ("no", None),
    (True, "latest"), ("latest", "latest"), ("Auto", "latest"), (" TRUE ", "latest"),
    (" runs/a b/checkpoint-4 ", "runs/a b/checkpoint-4"), ("runs/Latest", "runs/Latest"),
])
def test_every_resume_spelling_means_no_resume_the_newest_checkpoint_or_a_path(value, meaning):
    assert resume_target(value) == meaning
