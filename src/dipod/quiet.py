"""Third-party lines a user cannot act on, kept off the screen of every ``dipod`` command.

Each is named here with why it is noise; anything else a library prints still shows. Runs once,
from the command-line entry point, before the libraries load (library users keep their own
logging as they configured it).
"""

from __future__ import annotations

import logging
import warnings


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def silence_third_party_noise(language_models: bool) -> None:
    """DeepSpeed announces on import, on every machine without a GPU, that it fell back to the CPU
    (its logger keeps this filter when it configures itself later). Deprecation notices
    (FutureWarning) from the libraries concern their own internals. With ``language_models`` (a
    command that loads transformers anyway): transformers' per-tensor "Loading weights" / "Writing
    model shards" bars, which finish in under a second on every model we load, while the hub's
    download bars (minutes for an 8B checkpoint) stay on."""
    logging.getLogger("DeepSpeed").addFilter(_DropMessage("Setting accelerator to CPU"))
    for library in ("transformers", "accelerate", "peft", "deepspeed", "torch", "datasets"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=rf"{library}(\.|$)")
    if language_models:
        import huggingface_hub.utils as hub_utils
        import transformers.utils.logging as transformers_logging

        downloads_hidden = hub_utils.are_progress_bars_disabled()
        transformers_logging.disable_progress_bar()  # also turns the hub's bars off ...
        if not downloads_hidden:
            hub_utils.enable_progress_bars()  # ... which the user did not ask for
