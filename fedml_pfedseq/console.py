"""What the command line shows while it works: the project's own progress bars (one while a federation loads, one per
run), not a bar per file and per checkpoint from the libraries underneath."""
from __future__ import annotations


def quiet_libraries() -> None:
    """Turn off datasets' and transformers' own bars ("Generating train split", "Loading weights") in this process."""
    import datasets
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
