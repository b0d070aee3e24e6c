"""Benchmark: what mutual TLS costs a cross-silo deployment, against plaintext gRPC, on one recipe.

    python benchmarks/tls_cost.py recipes/omniglot_pfedseq.yaml --rounds 3

1. One message, measured alone: two parties' transports in this process (``SecureGRPCCommManager``, rank 0 sends
   rank 1 one of the recipe's payloads, encoded as on the wire) with ``comm_args.tls`` true and false, ``--sends``
   times each, alternating; prints the median and spread of one send (a new channel and, with TLS, a new
   handshake per message, as every party sends).
2. The whole deployment: ``pfedseq deploy`` of the recipe for ``--rounds`` rounds with TLS, then without
   (``--first plaintext``: the other way round); prints each round's wall time and the mean. Nothing is asserted
   (docs/security.md quotes the figures).
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from fedml_pfedseq.config import load_recipe
from fedml_pfedseq.cross_silo.certificates import CA_CERT, issue_federation, party_files
from fedml_pfedseq.cross_silo.launcher import deploy, free_ports, write_ipconfig
from fedml_pfedseq.cross_silo.party import message_limit
from fedml_pfedseq.data.federated import dataset_label_names
from fedml_pfedseq.federation import build_model, build_server
from fedml_pfedseq.results import format_table


def transports(tls: bool, folder: Path, limit: int):
    """Rank 0 and rank 1's transports, listening on free ports of 127.0.0.1."""
    from fedml_pfedseq.cross_silo.grpc_transport import SecureGRPCCommManager

    ipconfig = folder / f"ip_{tls}.csv"
    write_ipconfig(ipconfig, free_ports(2))
    cert, key = party_files(folder, "{rank}")
    args = argparse.Namespace(max_message_bytes=limit, tls=tls, ca_cert=str(folder / CA_CERT), party_cert=str(cert),
                              party_key=str(key), client_num_in_total=1, upload_timeout=30)
    return [SecureGRPCCommManager(str(ipconfig), client_rank=r, client_num=1, args=args) for r in (0, 1)]


def one_message(recipe, sends: int) -> list[list]:
    """Seconds per send of one payload, with TLS and without."""
    from fedml.core.distributed.communication.message import Message

    model = build_model(recipe, len(dataset_label_names(recipe.data_args)))
    n = recipe.train_args.client_num_in_total
    payload = build_server(recipe, model, n).initial_payloads()[0]
    folder = Path(tempfile.mkdtemp(prefix="tls_cost_"))
    issue_federation(folder, 1)
    limit = message_limit(recipe, model, n)
    pairs = {tls: transports(tls, folder, limit) for tls in (True, False)}
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(sends):
        for tls, (sender, receiver) in pairs.items():
            msg = Message(2, 0, 1)
            msg.add_params("model_params", {"round": 1, "payload": payload})
            started = time.perf_counter()
            sender.send_message(msg)
            times[tls].append(time.perf_counter() - started)
            receiver.grpc_servicer.message_q.get(timeout=30)
    for pair in pairs.values():
        for transport in pair:
            transport.stop_receive_message()
    return [["mutual TLS" if tls else "plaintext", statistics.median(t) * 1e3, min(t) * 1e3, max(t) * 1e3]
            for tls, t in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--sends", type=int, default=200, help="messages timed in part 1, per mode")
    parser.add_argument("--skip-deploy", action="store_true", help="part 1 only")
    parser.add_argument("--first", choices=["tls", "plaintext"], default="tls", help="which deployment runs first")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--output-dir", type=Path, default=None, help="keep both runs here (default: a temp dir)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, args.overrides + [f"train_args.comm_round={args.rounds}"])
    print(f"\none payload of {recipe.name} from rank 0 to rank 1, {args.sends} sends per mode, in ms:")
    print(format_table(["transport", "median", "min", "max"], one_message(recipe, args.sends)), flush=True)
    if args.skip_deploy:
        return
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="tls_cost_deploy_"))
    runs = {}
    for tls in (True, False) if args.first == "tls" else (False, True):
        tls_recipe = load_recipe(args.recipe, args.overrides + [f"train_args.comm_round={args.rounds}",
                                                                f"comm_args.tls={str(tls).lower()}"])
        runs[tls] = deploy(tls_recipe, out / ("tls" if tls else "plaintext"), progress=False)
    seconds = {tls: json.loads((out / ("tls" if tls else "plaintext") / "metrics.json").read_text())
               ["round_seconds"] for tls in runs}
    rows = [[t + 1, a, b, a - b] for t, (a, b) in enumerate(zip(seconds[True], seconds[False]))]
    rows.append(["mean", statistics.fmean(seconds[True]), statistics.fmean(seconds[False]),
                 statistics.fmean(seconds[True]) - statistics.fmean(seconds[False])])
    print(f"\n{recipe.name} deployed, {recipe.train_args.client_num_in_total} clients, {args.rounds} rounds, seconds:")
    print(format_table(["round", "mutual TLS", "plaintext", "difference"], rows))
    print(f"whole runs: {runs[True]['wall_seconds']} s (TLS) vs {runs[False]['wall_seconds']} s (plaintext); final "
          f"mean test accuracy {runs[True]['final_test_accuracy_mean']:.4f} vs "
          f"{runs[False]['final_test_accuracy_mean']:.4f}; outputs in {out}")


if __name__ == "__main__":
    main()
