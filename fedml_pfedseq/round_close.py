"""Closing a round, the same in the simulator and in a FedML server: screen the uploads that arrived (a bad one
is left out with its reason, never aggregated) and record the round as one server row."""
from __future__ import annotations

import logging

from fedml_pfedseq.transport import traffic


class RoundError(RuntimeError):
    """A round left with fewer valid uploads than ``train_args.min_uploads_per_round``."""


def screen(server, uploads: dict, round_idx: int, minimum: int,
           lost: dict[int, str] | None = None) -> tuple[dict, dict[int, str]]:
    """The uploads the server accepts, and the reason for each it refuses (logged) or that never came (``lost``:
    client -> why, e.g. its Ray worker died); RoundError when fewer than ``minimum`` are accepted."""
    accepted, rejected = {}, dict(lost or {})
    for i, upload in uploads.items():
        try:
            server.check_upload(i, upload)
            accepted[i] = upload
        except (ValueError, KeyError, TypeError) as err:
            rejected[i] = f"rejected: {err}"
            logging.warning("round %d: client %d's upload left out of the aggregate (%s)", round_idx, i, err)
    if len(accepted) < minimum:
        raise RoundError(f"round {round_idx}: {len(accepted)} valid upload(s), fewer than "
                         f"train_args.min_uploads_per_round = {minimum}; rejected: {rejected}")
    return accepted, rejected


def round_record(round_idx: int, participants: int, uploads: dict, left_out: dict[int, str], payloads: dict,
                 server) -> dict:
    """The server's row of one round in every engine: who took part, what was aggregated or left out (and why),
    the traffic, and the method's own measurements."""
    return {"round": round_idx, "participants": participants, "aggregated": len(uploads),
            "left_out": "; ".join(f"client {i}: {reason}" for i, reason in sorted(left_out.items())),
            **traffic(payloads, uploads), **server.last_round_stats}
