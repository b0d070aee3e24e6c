"""Every public entry point imports first in a fresh interpreter. The test session has imported the package already,
so an import cycle that only bites when a module is the first one a user imports (as `from hf_models.seq_learner
import SeqLearnerModel` once did) can only show in a new process. The learner's model package imports nothing else
of the library, as a transformers model folder imports only its own configuration."""
from __future__ import annotations

import subprocess
import sys

import pytest

from fedml_pfedseq import _PUBLIC

# what a user imports first: each public name the way the README shows it (`from fedml_pfedseq import run_recipe`),
# one process per module behind those names, and the modules docs/design.md and docs/hub.md name
FIRST_IMPORTS = [
    *(f"from fedml_pfedseq import {', '.join(name for name, home in _PUBLIC.items() if home == module)}"
      for module in sorted(set(_PUBLIC.values()))),
    "from fedml_pfedseq.models.seq_learner import SeqLearnerConfig, SeqLearnerModel, selective_scan, "
    "update_proxy_gradient",
    "from fedml_pfedseq.method import Method",
    "from fedml_pfedseq.testing.hub_server import LocalHubServer, serve",
    "from fedml_pfedseq.cross_silo.aggregator import StrategyAggregator",
    "from fedml_pfedseq.cross_silo.trainer import StrategyTrainer",
    "from fedml_pfedseq.grid import load_grid, run_grid",
    "import fedml_pfedseq.known_answer",
    "import fedml_pfedseq.hub",
]


@pytest.mark.slow
def test_every_public_entry_point_imports_in_a_fresh_interpreter():
    processes = {line: subprocess.Popen([sys.executable, "-c", line], stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True) for line in FIRST_IMPORTS}
    failures = {}
    for line, process in processes.items():
        output, _ = process.communicate(timeout=300)
        if process.returncode != 0:
            failures[line] = output.strip().splitlines()[-1]
    assert failures == {}


@pytest.mark.slow
def test_the_learner_package_imports_nothing_else_of_the_library():
    probe = ("import sys, fedml_pfedseq.models.seq_learner; "
             "print(sorted(m for m in sys.modules if m.startswith('fedml_pfedseq')))")
    loaded = eval(subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout)
    assert loaded and all(m == "fedml_pfedseq" or m.startswith("fedml_pfedseq.models") for m in loaded), loaded
