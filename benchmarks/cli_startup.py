"""Benchmark: how long `pfedseq` takes to answer, per command (fresh interpreter each time, best of --repeat).

    python benchmarks/cli_startup.py                          # this checkout
    python benchmarks/cli_startup.py --checkout /tmp/older    # another checkout of the project, for before/after

Times `--help`, `check` of the default pFedSeq recipe, of the default suite and of the Table 1 grid, `keys`, and
`hub-serve` until its endpoint answers an HTTP request; prints a table, asserts nothing (see docs/benchmarks.md).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# `pfedseq ARGS` from the checkout in $PFEDSEQ_CHECKOUT, not the editable install's finder (which maps the package to
# the installed checkout whatever sys.path says)
LAUNCH = ("import os, runpy, sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in repr(f)]; "
          "sys.path.insert(0, os.environ['PFEDSEQ_CHECKOUT']); sys.argv[0] = 'pfedseq'; "
          "runpy.run_module('fedml_pfedseq.cli', run_name='__main__')")


def timed(argv: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", LAUNCH, *argv], env=env, check=True, capture_output=True)
    return time.perf_counter() - started


def timed_hub_serve(env: dict) -> float:
    """From the command's start until its endpoint answers (then it is stopped)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as root:
        started = time.perf_counter()
        process = subprocess.Popen([sys.executable, "-c", LAUNCH, "hub-serve", "--root", root,
                                    "--port", str(port)], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        try:
            while time.perf_counter() - started < 120:
                try:
                    urllib.request.urlopen(f"http://127.0.0.1:{port}/api/whoami-v2", timeout=1)
                    break
                except urllib.error.HTTPError:
                    break  # it answered (401 without a token)
                except OSError:
                    time.sleep(0.02)
            return time.perf_counter() - started
        finally:
            process.terminate()
            process.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkout", type=Path, default=REPO, help="the project checkout to time")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    env = {**os.environ, "PFEDSEQ_CHECKOUT": str(args.checkout.resolve())}
    checked = ["recipes/omniglot_pfedseq.yaml", "recipes/suites/default.yaml", "recipes/grids/table1.yaml"]
    commands = {"--help": ["--help"], **{f"check {path}": ["check", str(args.checkout / path)] for path in checked},
                "keys": ["keys"]}
    print(f"checkout {args.checkout}, best of {args.repeat}, seconds")
    print("| command | seconds |\n|---|---|")
    for name, argv in commands.items():
        try:
            print(f"| `pfedseq {name}` | {min(timed(argv, env) for _ in range(args.repeat)):.2f} |")
        except subprocess.CalledProcessError as err:
            print(f"| `pfedseq {name}` | fails (exit {err.returncode}) |")
    print(f"| `pfedseq hub-serve` (until it answers) | {min(timed_hub_serve(env) for _ in range(args.repeat)):.2f} |")


if __name__ == "__main__":
    main()
