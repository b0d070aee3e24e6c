"""The in-process federation simulator: N clients and one server in one process, round by round.

FedML's ``sp`` simulator ignores custom algorithms, so research runs and CI use this loop. It keeps the exact
server/client split: the server object only ever sees the uploads clients return, and each client only ever sees
the payload addressed to it. All clients share one ``AdapterModel`` and load their own state into it in turn.

Each round the sampled clients (``client_num_per_round`` of N, federation.participants) receive their latest
payload, are evaluated on it when the round is due, train and upload; the others wait. An upload the server's
``check_upload`` refuses (NaN/Inf, wrong keys, shapes, dtypes, sender or sample count) is logged with its reason
and left out of the round (round_close.py); the round goes on with the rest unless fewer than
``min_uploads_per_round`` remain. After the last round every client receives its final payload and is evaluated
(the final table covers all N).

Who trains a round's clients is the engine's part (``common_args.engine``): ``LocalEngine`` visits them in turn in
this process, ``ray_engine.RayEngine`` on Ray workers; the loop, the server and the screening are the same.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from tqdm.auto import tqdm

from fedml_pfedseq.checkpoint import CHECKPOINT_FILE, CheckpointError, load_checkpoint, save_checkpoint
from fedml_pfedseq.config import Recipe, RecipeError, recipe_changes, warn_about
from fedml_pfedseq.federation import Federation, build_federation, participants
from fedml_pfedseq.hub.adapters import AdapterWriter, remove_stale
from fedml_pfedseq.hub.push import push_run
from fedml_pfedseq.hub.round_push import RoundPusher
from fedml_pfedseq.results import MetricsLog, write_run_outputs
from fedml_pfedseq.round_close import round_record, screen
from fedml_pfedseq.tracking import Tracker, check_reporters
from fedml_pfedseq.training import select_device
from fedml_pfedseq.transport import check_plain

RECIPE_FILE, SUMMARY_FILE = "recipe.yaml", "summary.json"  # what a run writes beside its checkpoint
RESUMABLE_CHANGES = ("train_args.comm_round", "hub_args", "tracking_args", "common_args.output_dir",
                     "common_args.engine", "ray_args")  # what is saved or pushed, and how rounds are run


def federation_parts(fed: Federation) -> dict[str, object]:
    """The objects that hold a run's learnt state: the server and every client (the models are rebuilt)."""
    return {"server": fed.server, **{f"client_{i}": client for i, client in enumerate(fed.clients)}}


def save_federation(path: Path, fed: Federation, round_idx: int, payloads: dict, log: MetricsLog) -> None:
    """Everything needed to go on after round ``round_idx``: the strategies, the payloads of the next round,
    the metrics so far and the recipe (checkpoint.py)."""
    save_checkpoint(path, federation_parts(fed), {"round": round_idx, "payloads": payloads,
                                                  "log": dataclasses.asdict(log), "recipe": fed.recipe.to_dict()})


def resume_federation(path: Path, fed: Federation) -> tuple[int, dict, MetricsLog]:
    """Restore a freshly built federation from ``path``: (the round to run next, its payloads, the metrics so far).
    Only the number of rounds (and what is saved or pushed) may differ from the run that wrote it; that is checked
    before anything is restored, so a refused checkpoint names the recipe keys that differ."""
    extra = load_checkpoint(path, federation_parts(fed),
                            check=lambda saved: check_resumable(path, saved["recipe"], saved["round"], fed.recipe),
                            device=select_device(fed.recipe.device_args.using_gpu))
    return extra["round"] + 1, extra["payloads"], MetricsLog(**extra["log"])


def check_resumable(path: Path, saved_recipe: dict, saved_round: int, recipe: Recipe) -> None:
    """CheckpointError unless a checkpoint saved after ``saved_round`` with ``saved_recipe`` can go on under
    ``recipe`` (a run's or a cross-silo party's): only RESUMABLE_CHANGES may differ, and rounds must remain."""
    changes = recipe_changes(saved_recipe, recipe, ignore=RESUMABLE_CHANGES)
    if changes:
        raise CheckpointError(f"{path} was written with another recipe ({'; '.join(changes)}); only "
                              f"{', '.join(RESUMABLE_CHANGES)} may change on resume")
    if saved_round > recipe.train_args.comm_round:
        raise CheckpointError(f"{path} is at round {saved_round}, past train_args.comm_round "
                              f"{recipe.train_args.comm_round}")


def checked(payloads: dict) -> dict:
    """Payloads as they would travel over FedML: plain data, each tensor owning its storage (transport.py)."""
    for i, payload in payloads.items():
        check_plain(payload, f"payload for client {i}")
    return payloads


AfterEvaluation = Callable[[int, int, object], None]  # (round, client id, client), its evaluated model loaded


@dataclass
class Visit:
    """What one sampled client did in a round: its evaluation of what it received (None in a round not evaluated),
    its upload, its training statistics, and the seconds evaluating and training took."""

    evaluation: dict | None
    upload: dict
    train_stats: dict
    eval_s: float
    train_s: float


def visit_client(client, payload: dict, round_idx: int, evaluate: bool,
                 after_evaluation: AfterEvaluation | None = None) -> Visit:
    """Client ``client``'s turn in round ``round_idx``: receive, evaluate (if due), train, upload. Every engine runs
    this, the Ray engine in its workers."""
    client.receive(payload)
    t0 = time.perf_counter()
    evaluation = client.evaluate() if evaluate else None
    if evaluate and after_evaluation is not None:
        after_evaluation(round_idx - 1, client.client_id, client)
    t1 = time.perf_counter()
    upload = client.train(round_idx)
    return Visit(evaluation, upload, client.last_train_stats, t1 - t0, time.perf_counter() - t1)


class LocalEngine:
    """``common_args.engine: local``: a round's clients one after another in this process, on the federation's
    shared models (the default; ray_engine.RayEngine is the other)."""

    def __init__(self, fed: Federation):
        self.fed = fed

    def visit(self, round_idx: int, payloads: dict[int, dict], evaluate: bool,
              after_evaluation: AfterEvaluation | None = None) -> tuple[dict[int, Visit], dict[int, str]]:
        """Every client in ``payloads`` (client id -> its payload, in order) visited: (the visits, and the clients
        whose visit never came back with why: none here)."""
        return {i: visit_client(self.fed.clients[i], payload, round_idx, evaluate, after_evaluation)
                for i, payload in payloads.items()}, {}

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        pass


def open_engine(fed: Federation):
    """The engine ``common_args.engine`` names, as a context manager (the Ray engine starts and stops workers)."""
    if fed.recipe.common_args.engine == "ray":
        from fedml_pfedseq.ray_engine import RayEngine  # ray is an extra: imported only where a recipe asks for it

        return RayEngine(fed)
    return LocalEngine(fed)


def run_federation(fed: Federation, progress: bool = True,
                   after_evaluation: AfterEvaluation | None = None,
                   before_aggregation: Callable[[int, MetricsLog], None] | None = None,
                   checkpoint: Path | None = None,
                   resumed: tuple[int, dict, MetricsLog] | None = None,
                   engine: LocalEngine | None = None, tracker: Tracker | None = None) -> MetricsLog:
    """Run ``comm_round`` rounds; evaluate what each client received before it trains, and once after the end.
    With ``checkpoint``, save the federation there after every round; ``resumed``: go on from what
    ``resume_federation`` restored. ``engine`` runs each round's clients (default: a LocalEngine); the server, the
    screening of uploads and the final evaluation stay here.

    ``after_evaluation(round, i, client)`` is called right after client i is evaluated at ``round``, while its
    evaluated model is still in ``client.model`` (to save exactly what was reported); ``before_aggregation(t - 1,
    log)`` once every client of round t has trained, while the server still holds the state after round t - 1.
    ``tracker`` gets each round's figures once they are all in (round t - 1's at the end of round t)."""
    engine = engine or LocalEngine(fed)
    rounds = fed.recipe.train_args.comm_round
    every = fed.recipe.validation_args.frequency_of_the_test
    start, payloads, log = resumed or (1, checked(fed.server.initial_payloads()), MetricsLog())
    bar = tqdm(desc=f"{fed.recipe.name}", disable=not progress, initial=start - 1, total=rounds, unit="round")
    for t in range(start, rounds + 1):
        started = time.perf_counter()
        sampled = participants(fed.recipe, len(fed.clients), t)
        visits, lost = engine.visit(t, {i: payloads[i] for i in sampled}, (t - 1) % every == 0, after_evaluation)
        for i, visit in visits.items():
            if visit.evaluation is not None:
                log.add(round=t - 1, client=i, **visit.evaluation)
            log.add_train(round=t, client=i, **visit.train_stats)
        uploads, left_out = screen(fed.server, {i: visit.upload for i, visit in visits.items()}, t,
                                   fed.recipe.train_args.min_uploads_per_round, lost)
        if before_aggregation is not None:
            before_aggregation(t - 1, log)
        payloads = checked(fed.server.aggregate(uploads))
        log.add_server(**round_record(t, len(sampled), uploads, left_out, payloads, fed.server))
        log.round_seconds.append(time.perf_counter() - started)
        log.train_seconds.append(sum(visit.train_s for visit in visits.values()))
        log.eval_seconds.append(sum(visit.eval_s for visit in visits.values()))
        if checkpoint is not None:
            save_federation(checkpoint, fed, t, payloads, log)
        if tracker is not None:
            tracker.log_round(log, t - 1)
        show_evaluated(bar, log)
        bar.update()
    for i, client in enumerate(fed.clients):
        client.receive(payloads[i])
        log.add(round=rounds, client=i, **client.evaluate())
        if after_evaluation is not None:
            after_evaluation(rounds, i, client)
    if tracker is not None:
        tracker.log_round(log, rounds)
    show_evaluated(bar, log)
    bar.close()
    return log


def show_evaluated(bar, log: MetricsLog) -> None:
    """The bar's figure: the mean test accuracy of the round evaluated last (the final one once the run ends)."""
    if log.rows:
        evaluated = log.rows[-1]["round"]
        bar.set_postfix(evaluated=evaluated, test_acc=f"{log.mean_at(evaluated, 'test_accuracy'):.4f}")


def run_folder_of(recipe_path: Path) -> Path | None:
    """The run folder a run's own ``recipe.yaml`` sits in (so that ``pfedseq run <run>/recipe.yaml --resume``
    continues that run in place), else None (the recipe's common_args.output_dir)."""
    folder = Path(recipe_path).parent
    is_run = any((folder / name).is_file() for name in (CHECKPOINT_FILE, SUMMARY_FILE))
    return folder if Path(recipe_path).name == RECIPE_FILE and is_run else None


def check_output_dir(output_dir: Path) -> None:
    """RecipeError unless ``output_dir`` is a folder or can become one."""
    for parent in (output_dir, *output_dir.parents):
        if parent.exists() and not parent.is_dir():
            raise RecipeError(f"--output-dir / common_args.output_dir: {parent} is a file, not a folder")
        if parent.exists():
            return


def run_recipe(recipe: Recipe, output_dir: Path | None = None, progress: bool = True, resume: bool = False,
               resume_from: Path | None = None) -> dict:
    """Build, run and save one recipe; returns its summary (also written to ``summary.json``). With ``resume``,
    continue from the checkpoint in ``output_dir`` (an interrupted run, or a finished one given more rounds), or
    from the checkpoint file ``resume_from`` (another run's, copied in once accepted).

    Every check that can refuse the run (output folder, data, checkpoint and its recipe) happens before anything
    under ``output_dir`` is written, so a refused command leaves a previous run there as it was."""
    output_dir = Path(output_dir or recipe.output_dir)
    check_output_dir(output_dir)
    checkpoint = output_dir / CHECKPOINT_FILE
    source = Path(resume_from) if resume_from else checkpoint
    resume = resume or resume_from is not None
    if resume and not source.is_file():
        raise CheckpointError(f"cannot resume: no {CHECKPOINT_FILE} in {source.parent} (was it run with "
                              "common_args.checkpoint: true and did it finish a round?)")
    check_reporters(recipe)
    started = time.perf_counter()
    fed = build_federation(recipe, resuming=resume, progress=progress)
    resumed = resume_federation(source, fed) if resume else None
    warn_about(recipe)
    with open_engine(fed) as engine:  # Ray missing or its workers not starting refuses the run here
        return _run_accepted(fed, engine, output_dir, resumed, source, started, progress)


def _run_accepted(fed: Federation, engine: LocalEngine, output_dir: Path, resumed: tuple | None, source: Path,
                  started: float, progress: bool) -> dict:
    """``run_recipe`` once nothing can refuse the run any more: from here on the output folder is written."""
    recipe, checkpoint = fed.recipe, output_dir / CHECKPOINT_FILE
    output_dir.mkdir(parents=True, exist_ok=True)
    if source.resolve() != checkpoint.resolve():
        shutil.copyfile(source, checkpoint)
    (output_dir / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    writer = AdapterWriter(output_dir / "adapters", recipe) if recipe.hub_args.save_adapters else None
    if writer is None:
        remove_stale(output_dir / "adapters")
    pusher = RoundPusher(fed, output_dir) if recipe.hub_args.hub_push_every else None

    def after_evaluation(round_idx: int, i: int, client) -> None:
        if writer is not None and round_idx == recipe.train_args.comm_round:
            writer.save_client(i, client.model, client.data, fed.data.label_names)
        if pusher is not None:
            pusher.after_evaluation(round_idx, i, client)

    tracker = Tracker.of(recipe, output_dir)
    try:
        log = run_federation(fed, progress=progress, after_evaluation=after_evaluation,
                             before_aggregation=pusher.before_aggregation if pusher else None,
                             checkpoint=checkpoint if recipe.common_args.checkpoint else None, resumed=resumed,
                             engine=engine, tracker=tracker)
    finally:
        if tracker is not None:
            tracker.close()
    fed.server.save_artifacts(output_dir)
    summary = write_run_outputs(log, recipe, output_dir, wall_seconds=time.perf_counter() - started)
    (output_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    if writer is not None:
        writer.finish(fed.server, fed.model, log.at(log.rounds[-1]), fed.data.label_names)
    if recipe.hub_args.push_to_hub:
        push_run(output_dir, recipe.hub_args.hub_repo_id, private=recipe.hub_args.hub_private,
                 with_checkpoint=recipe.hub_args.push_checkpoint)
    return summary
