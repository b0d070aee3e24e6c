"""Turn the grids of the paper's Tables 1-3 and L sweep into the reproduction report (Markdown, PNGs, summary.json).

    python docs/reproduction/generate.py --table1 runs/table1 --table2-3 runs/table2_3 --l-sweep runs/l_sweep \
        --pfedseq-investigation runs/pfedseq_investigation --rotated runs/rotated --full-data runs/full_data \
        --pacs-silos runs/pacs_silos --out docs/reproduction

Every number is read from the grids' cell files (``<scenario>/<method>/seed_<k>/summary.json``, ``recipe.yaml``,
``metrics.json`` and ``tune/<candidate>/summary.json``), not from grid_summary.json, which a grid writes only once it
has finished: so a grid that is still running is reported as far as it got, and the cells it lacks are listed.
Which cells a grid should have comes from its definition (``recipes/grids/<table>.yaml``, or ``--<table>-grid``).
The paper's numbers are in paper_results.json beside this script.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import yaml  # noqa: E402

from fedml_pfedseq.data.transforms import cluster_of  # noqa: E402
from fedml_pfedseq.grid import load_grid  # noqa: E402
from fedml_pfedseq.results import format_table, mean_test_curve, save_accuracy_plot  # noqa: E402

HERE = Path(__file__).resolve().parent
PAPER = json.loads((HERE / "paper_results.json").read_text())
PAPER_COLUMN = {"omniglot": "Omniglot", "pacs": "DomainNet", "cifar10": "CIFAR-100"}  # the paper's dataset of its kind
FULL = "pFedSeq"  # the full method's row; every other row of Table 1 is a baseline
NOTE = ("Local test accuracy (%) after the last round, averaged over clients; ours: mean ± std over the seeds that "
        "finished (sample std; one seed: no std).")


class GridOutput:
    """A grid's output folder read against its definition: each (scenario, method)'s finished seed cells."""

    def __init__(self, root: Path, definition: Path):
        if not root.is_dir():
            raise SystemExit(f"{root}: no such folder (expected the output of the grid {definition})")
        self.grid, self.root, self.definition = load_grid(definition), root, definition
        if not any((root / scenario).is_dir() for scenario in self.grid.scenarios):
            raise SystemExit(f"{root} is not an output of the grid {definition}: it has none of its scenario folders "
                             f"{list(self.grid.scenarios)}")

    def summary_path(self, scenario: str, method: str, seed: int) -> Path:
        """Where a seed cell's summary.json is once the cell finished."""
        return self.root / scenario / method / f"seed_{seed}" / "summary.json"

    def cells(self, scenario: str, method: str) -> list[Path]:
        """The seed cells that finished (have summary.json)."""
        return [cell for seed in self.grid.seeds if (cell := self.summary_path(scenario, method, seed)).is_file()]

    def by_seed(self, scenario: str, method: str, key: str = "final_test_accuracy_mean") -> dict[int, float]:
        """The final mean test (or ``key``) accuracy (%) of each finished seed."""
        return {seed: 100 * json.loads(path.read_text())[key] for seed in self.grid.seeds
                if (path := self.summary_path(scenario, method, seed)).is_file()}

    def stats(self, scenario: str, method: str, key: str = "final_test_accuracy_mean") -> dict | None:
        """Mean and std (%) over the finished seeds of the final mean test (or ``key``) accuracy; None if none
        finished."""
        return describe(list(self.by_seed(scenario, method, key).values()))

    def per_cluster(self, scenario: str, method: str) -> dict[str, float] | None:
        """Final test accuracy (%) per data cluster (``data_args.cluster_transforms``, client i in cluster i mod K):
        the mean over a cluster's clients, then over the finished seeds; None without clusters or cells."""
        seeds = []
        for path in self.cells(scenario, method):
            names = yaml.safe_load((path.parent / "recipe.yaml").read_text())["data_args"].get("cluster_transforms")
            rows = json.loads((path.parent / "metrics.json").read_text())["eval"]
            if not names:
                return None
            last = max(r["round"] for r in rows)
            seeds.append({name: statistics.fmean(100 * r["test_accuracy"] for r in rows if r["round"] == last
                                                 and cluster_of(names, r["client"]) == c)
                          for c, name in enumerate(names)})
        return {name: statistics.fmean(s[name] for s in seeds) for name in seeds[0]} if seeds else None

    @property
    def missing(self) -> list[str]:
        return [f"{scenario}/{method}/seed_{seed}" for scenario in self.grid.scenarios for method in self.grid.names
                for seed in self.grid.seeds
                if not self.summary_path(scenario, method, seed).is_file()]

    def header(self, title: str) -> str:
        missing, seeds = self.missing, {}
        for cell in missing:
            row, seed = cell.rsplit("/", 1)
            seeds.setdefault(row, []).append(seed)
        listed = "\n".join(f"- {row}: {', '.join(s)}" for row, s in seeds.items()) or "none: every cell finished"
        return (f"# {title}\n\nGrid `{self.definition.name}`, output `{self.root}`: {len(missing)} of "
                f"{len(self.grid.scenarios) * len(self.grid.names) * len(self.grid.seeds)} seed cells missing. "
                f"{NOTE}\n\nMissing cells (not in any number below):\n\n{listed}\n")

    def record(self) -> dict:
        return {"folder": str(self.root), "definition": str(self.definition), "missing_cells": self.missing}


def describe(values: list[float]) -> dict | None:
    """Mean, sample std (None for one value) and count; None for no values."""
    if not values:
        return None
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else None,
            "seeds": len(values)}


def paired(a: dict[int, float], b: dict[int, float]) -> dict | None:
    """``a`` minus ``b`` seed by seed, over the seeds both finished. A seed fixes the data partition (and the
    initial adapter and head) for every method, so this difference is free of the spread between partitions that
    the stds hold."""
    return describe([a[seed] - b[seed] for seed in sorted(a.keys() & b.keys())])


def fmt(stat: dict | None, sign: str = "") -> str:
    """``mean ± std``; ``sign="+"`` for a difference."""
    if stat is None:
        return "missing"
    return f"{stat['mean']:{sign}.2f}" + (f" ± {stat['std']:.2f}" if stat.get("std") is not None else "")


def signed(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def ranks(scores: dict[str, float]) -> dict[str, float]:
    """1 = highest; tied methods share the mean of their places."""
    order = sorted(scores.values(), reverse=True)
    return {m: statistics.fmean(i + 1 for i, v in enumerate(order) if v == s) for m, s in scores.items()}


def spearman(a: dict[str, float], b: dict[str, float]) -> float | None:
    """Spearman's rho between two scorings over the methods both have (Pearson's r of the ranks, ties averaged);
    None where it is undefined (fewer than two methods, or all tied)."""
    common = [m for m in a if m in b]
    rank_a, rank_b = ranks({m: a[m] for m in common}), ranks({m: b[m] for m in common})
    try:
        return statistics.correlation([rank_a[m] for m in common], [rank_b[m] for m in common])
    except statistics.StatisticsError:
        return None


def margin(scores: dict[str, float]) -> dict | None:
    """The full method minus the best other method."""
    others = {m: v for m, v in scores.items() if m != FULL}
    if FULL not in scores or not others:
        return None
    best = max(others, key=others.get)
    return {"margin": scores[FULL] - others[best], "best_baseline": best}


def margin_text(result: dict | None) -> str:
    return "n/a" if result is None else f"{result['margin']:+.2f} (vs {result['best_baseline']})"


def paper_column(scenario: str) -> str:
    if scenario not in PAPER_COLUMN:
        raise SystemExit(f"scenario {scenario!r} has no counterpart in the paper; known: {sorted(PAPER_COLUMN)}")
    return PAPER_COLUMN[scenario]


def table1_report(out: GridOutput, dest: Path) -> dict:
    """Table 1 per scenario beside the paper's dataset of the same kind, the tuned values, and learning curves."""
    grid, record = out.grid, {**out.record(), "scenarios": {}}
    text = [out.header("Table 1: pFedSeq and 12 baselines")]
    for scenario in grid.scenarios:
        column = paper_column(scenario)
        paper = {m: r[column] for m, r in PAPER["table1"]["results"].items()}
        ours = {m: s for m in grid.names if (s := out.stats(scenario, m))}
        our_scores, paper_scores = ({m: s["mean"] for m, s in d.items()} for d in (ours, paper))
        shared = [m for m in our_scores if m in paper_scores]
        our_rank, paper_rank = ranks(our_scores), ranks(paper_scores)  # among what we have; among all 13
        above = [m for m in our_scores if FULL in our_scores and m != FULL and our_scores[m] > our_scores[FULL]]
        full = out.by_seed(scenario, FULL)
        minus = {m: paired(full, out.by_seed(scenario, m)) for m in grid.names if m != FULL}
        result = {"paper_dataset": column, "ours": ours, "paper": {m: paper[m] for m in grid.names if m in paper},
                  "rank_ours": our_rank, "rank_paper": paper_rank,
                  "spearman": spearman(our_scores, paper_scores),
                  "margin_ours": margin(our_scores), "margin_paper": margin(paper_scores),
                  "baselines_above_pfedseq_ours": above, "pfedseq_minus_paired": minus}
        record["scenarios"][scenario] = result
        rank = lambda r, m: f"{r[m]:g}" if m in r else ""  # noqa: E731
        rows = [[m, fmt(ours.get(m)), ours[m]["seeds"] if m in ours else 0, rank(our_rank, m),
                 fmt(minus[m], "+") if m in minus else "", fmt(paper.get(m)), rank(paper_rank, m)] for m in grid.names]
        table = format_table(["method", f"ours: {scenario}", "seeds", "rank", f"ours: {FULL} minus it, by seed",
                              f"paper: {column}", "rank"], rows)
        mine, theirs, rho = result["margin_ours"], result["margin_paper"], result["spearman"]
        text.append(
            f"\n## {scenario} (paper: {column}, {PAPER['table1']['scenarios'][column]})\n\n{table}\n\n"
            f"- rank: ours among the methods that have a result, the paper's among its 13\n"
            f"- {FULL} minus it, by seed: the difference within each seed (same data partition), "
            f"mean ± std over the seeds both finished\n"
            f"- Spearman rank correlation, ours vs paper, over the {len(shared)} methods we have: "
            f"{'n/a' if rho is None else f'{rho:.2f}'}\n"
            f"- {FULL} minus the best baseline (ours: of those we have; paper: of all 12): ours {margin_text(mine)}, "
            f"paper {margin_text(theirs)}\n"
            f"- Baselines above {FULL} in ours: {', '.join(above) or 'none'}\n"
            + (f"\n![learning curves](curves_{scenario}.png)\n" if ours else ""))
    text.append(tuning_md(out, record))
    for scenario in grid.scenarios:
        plot_curves(out, scenario, dest / f"curves_{scenario}.png")
    (dest / "table1.md").write_text("".join(text))
    return record


def tuning_md(out: GridOutput, record: dict) -> str:
    """The values each method ran with (read from its seed cells' recipe.yaml) and every tuning candidate's final
    mean validation accuracy (from tune/<candidate>/summary.json)."""
    grid, tuned, candidates = out.grid, {}, []
    for scenario in grid.scenarios:
        for method in grid.names:
            keys = list(grid.candidates(method)[0])
            if keys and (cells := out.cells(scenario, method)):
                recipe = yaml.safe_load((cells[0].parent / "recipe.yaml").read_text())
                tuned.setdefault(method, {})[scenario] = {k: recipe[k.split(".")[0]][k.split(".")[1]] for k in keys}
            for path in sorted((out.root / scenario / method / "tune").glob("*/summary.json")):
                candidates.append({"scenario": scenario, "method": method, "candidate": path.parent.name,
                                   "validation_accuracy": 100 * json.loads(path.read_text())
                                   ["final_validation_accuracy_mean"]})
    record.update(tuned=tuned, tuning_candidates=candidates)
    label = lambda values: ", ".join(f"{k.split('.')[-1]}={v}" for k, v in values.items())  # noqa: E731
    tuned_rows = [[m] + [label(tuned[m][s]) if s in tuned.get(m, {}) else "" for s in grid.scenarios]
                  for m in grid.names if m in tuned]
    accuracy = {(c["method"], c["candidate"], c["scenario"]): c["validation_accuracy"] for c in candidates}
    candidate_rows = [[m, c] + [f"{accuracy[m, c, s]:.2f}" if (m, c, s) in accuracy else "" for s in grid.scenarios]
                      for m, c in dict.fromkeys((m, c) for m, c, _ in accuracy)]
    return ("\n## Tuned values (chosen on validation; read from the seed cells' recipes)\n\n"
            + (format_table(["method", *grid.scenarios], tuned_rows) if tuned_rows else "none finished yet")
            + "\n\n## Tuning candidates: final mean validation accuracy (%)\n\n"
            + (format_table(["method", "candidate", *grid.scenarios], candidate_rows) if candidate_rows
               else "none finished yet") + "\n")


def plot_curves(out: GridOutput, scenario: str, path: Path) -> None:
    """The paper's Figures 4-5: each method's test accuracy per round, averaged over clients and seeds, with the
    round where pFedSeq's warm-up ends (from then on clients get personalised adapters); none without a finished
    cell."""
    curves = {method: [r for cell in out.cells(scenario, method)
                       for r in json.loads((cell.parent / "metrics.json").read_text())["eval"]]
              for method in out.grid.names if out.cells(scenario, method)}
    if not curves:
        return
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.set_prop_cycle(color=plt.cm.tab20.colors[0::2] + plt.cm.tab20.colors[1::2])  # 13 methods, 20 colours
    for method, rows in curves.items():
        rounds, accuracy = mean_test_curve(rows)
        ax.plot(rounds, [100 * a for a in accuracy], marker="o", markersize=3, label=method)  # %, as the tables
    if FULL in curves:
        warmup = out.grid.recipe(scenario, out.grid.names.index(FULL), []).algorithm_args.warmup_rounds
        ax.axvline(warmup, color="black", linestyle=":", label=f"{FULL} warm-up ends (W={warmup})")
    save_accuracy_plot(ax, fig, f"{scenario}: mean over clients and seeds", path,
                       ylabel="local test accuracy (%, mean over clients)")


def table2_3_report(out: GridOutput, dest: Path) -> dict:
    """Variants A-E beside the full method, ours and the paper's, with each variant's drop from the full method."""
    grid, record = out.grid, {**out.record(), "scenarios": {}}
    headers, columns = ["variant"], {}
    for scenario in grid.scenarios:
        column = paper_column(scenario)
        ours = {m: out.stats(scenario, m) for m in grid.names}
        paper = {m: r[column] for m, r in PAPER["table2_3"]["results"].items() if m in grid.names}
        drop = lambda d, m: d[FULL]["mean"] - d[m]["mean"] if d.get(FULL) and d.get(m) else None  # noqa: E731
        columns[scenario] = result = {"paper_dataset": column, "ours": ours, "paper": paper,
                                      "drop_ours": {m: drop(ours, m) for m in grid.names if m != FULL},
                                      "drop_paper": {m: drop(paper, m) for m in grid.names if m != FULL}}
        record["scenarios"][scenario] = result
        headers += [f"ours: {scenario}", "drop", f"paper: {column}", "drop"]
    rows = [[m] + [value for s, r in columns.items() for value in
                   (fmt(r["ours"][m]), signed(r["drop_ours"].get(m)) if m != FULL else "",
                    fmt(r["paper"].get(m)), signed(r["drop_paper"].get(m)) if m != FULL else "")]
            for m in grid.names]
    (dest / "table2_3.md").write_text(out.header("Tables 2-3: pFedSeq's variants A-E") + "\n" +
                                      format_table(headers, rows) + f"\n\ndrop: {FULL} minus the variant "
                                      "(positive: the variant is worse).\n")
    return record


def l_sweep_report(out: GridOutput, dest: Path) -> dict:
    """Final accuracy against the history length L (read from each row's recipe), and L=15 minus L=1 against the
    paper's +1.17 (it gives only a plot and that difference)."""
    grid, record, paper = out.grid, {**out.record(), "scenarios": {}}, PAPER["l_sweep"]
    text, curves = [out.header("Sweep of the history length L")], {}
    for scenario in grid.scenarios:
        points = {grid.recipe(scenario, i, []).algorithm_args.seq_len: out.stats(scenario, m)
                  for i, m in enumerate(grid.names)}
        short, long = points.get(paper["short"]), points.get(paper["long"])
        difference = long["mean"] - short["mean"] if short and long else None
        record["scenarios"][scenario] = {"by_L": points, "long_minus_short": difference}
        if done := sorted(((L, s) for L, s in points.items() if s), key=lambda point: point[0]):
            curves[scenario] = done
        table = format_table(["L", "test accuracy (%)", "seeds"],
                             [[L, fmt(s), s["seeds"] if s else 0] for L, s in sorted(points.items())])
        text.append(f"\n## {scenario}\n\n{table}\n\nL={paper['long']} minus L={paper['short']}: ours "
                    f"{signed(difference)}, paper {signed(paper['long_minus_short'])} ({paper['source']}: "
                    f"\"{paper['statement']}\")\n")
    record["paper"] = paper
    (dest / "l_sweep.md").write_text("".join(text) + ("\n![accuracy vs L](l_sweep.png)\n" if curves else ""))
    if curves:
        plot_l_sweep(curves, dest / "l_sweep.png")
    return record


def plot_l_sweep(curves: dict[str, list[tuple[int, dict]]], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    for scenario, points in curves.items():
        ax.errorbar([L for L, _ in points], [s["mean"] for _, s in points], yerr=[s["std"] or 0 for _, s in points],
                    marker="o", capsize=3, label=f"ours: {scenario}")
    ax.set_xlabel("L (rounds of history the learner reads)")
    ax.set_ylabel("final local test accuracy (%)")
    ax.set_title("pFedSeq vs L: mean ± std over seeds")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


CONTROL = "FedAvgLocalHead"  # pFedSeq without calibrations: same clients, same global adapter


def server_rows(out: GridOutput, scenario: str, method: str) -> list[dict]:
    """The server rows of every finished seed of ``method`` (pFedSeq's learner statistics among them)."""
    return [row for cell in out.cells(scenario, method)
            for row in json.loads((cell.parent / "metrics.json").read_text())["server"]]


def learner_summary(server: list[dict]) -> dict:
    """What the learner sent: each calibration ratio at the last round (mean over seeds), and the surrogate
    -<xi^{t-1}, Delta^t> after warm-up (negative when clients kept moving the way the calibration pointed, positive
    when they undid it); None for a method without calibrations."""
    calibrated = [row for row in server if row.get("calibration_to_drift_ratio_mean") is not None]
    last = max((row["round"] for row in server), default=None)
    final = [row for row in calibrated if row["round"] == last]  # the last round, one row per seed
    return {**{f"{key}_last": statistics.fmean(r[key] for r in final) if final and all(key in r for r in final)
               else None for key in ("calibration_to_drift_ratio_mean", "calibration_to_update_ratio_mean")},
            "surrogate_after_warmup": statistics.fmean(r["surrogate_loss"] for r in calibrated) if calibrated else None,
            "surrogate_negative_share": statistics.fmean(r["surrogate_loss"] < 0 for r in calibrated)
            if calibrated else None}


def number(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def investigation_report(out: GridOutput, dest: Path) -> dict:
    """pFedSeq's variants against its no-calibration control: final accuracies, the gain over the control, and what
    the learner did after warm-up (``learner_summary``)."""
    grid, record = out.grid, {**out.record(), "scenarios": {}}
    text = [out.header("pFedSeq investigation: learner lr, output scale, W and L")]
    for scenario in grid.scenarios:
        rows, result, servers = [], {}, {}
        control = out.stats(scenario, CONTROL)
        control_val = out.stats(scenario, CONTROL, "final_validation_accuracy_mean")
        for method in grid.names:
            test, val = out.stats(scenario, method), out.stats(scenario, method, "final_validation_accuracy_mean")
            servers[method] = server_rows(out, scenario, method)
            result[method] = entry = {
                "test": test, "validation": val,
                "test_gain": test["mean"] - control["mean"] if test and control else None,
                "validation_gain": val["mean"] - control_val["mean"] if val and control_val else None,
                **learner_summary(servers[method])}
            rows.append([method, fmt(val), signed(entry["validation_gain"]) if method != CONTROL else "",
                         fmt(test), signed(entry["test_gain"]) if method != CONTROL else "",
                         number(entry["calibration_to_drift_ratio_mean_last"], ".4f"),
                         number(entry["calibration_to_update_ratio_mean_last"], ".3f"),
                         number(entry["surrogate_after_warmup"], ".4f"),
                         number(entry["surrogate_negative_share"], ".2f")])
        record["scenarios"][scenario] = result
        table = format_table(["variant", "validation (%)", f"vs {CONTROL}", "test (%)", f"vs {CONTROL}",
                              "||xi||/||theta_g - theta^0|| (last round)", "||xi||/||Delta|| (last round)",
                              "surrogate (mean after W)",
                              "share of rounds with surrogate < 0"], rows)
        text.append(f"\n## {scenario}\n\n{table}\n\n![calibrations and surrogate]"
                    f"(investigation_{scenario}.png)\n")
        plot_learner(servers, scenario, dest / f"investigation_{scenario}.png")
    (dest / "investigation.md").write_text("".join(text))
    return record


CHOSEN = "pFedSeq_proximal"  # pFedSeq with the learner schedule chosen on the known-answer benchmark
VARIANTS = ("A_", "B_", "C_", "D_", "E_")  # row-name prefixes of the Tables 2-3 variants (of CHOSEN, in rotated.yaml)
ORACLE = "ClusterOracle"  # FedAvg with local heads told the clusters (rotated.yaml): a reference, not ranked


def rotated_report(out: GridOutput, dest: Path) -> dict:
    """The scenario where personalization should matter (rotated clusters): every method with its rank, each
    method minus pFedSeq's control (FedAvg with local heads) paired by seed, the variants A-E against the schedule
    they vary, what the learners sent, and the learning curves."""
    grid, record = out.grid, {**out.record(), "scenarios": {}}
    text = [out.header("Rotated clusters: where personalization should matter")]
    for scenario in grid.scenarios:
        test = {m: s for m in grid.names if (s := out.stats(scenario, m))}
        rank = ranks({m: s["mean"] for m, s in test.items() if not m.startswith(VARIANTS) and m != ORACLE})
        by_seed = {m: out.by_seed(scenario, m) for m in grid.names}
        servers = {m: server_rows(out, scenario, m) for m in grid.names if m.startswith((FULL, *VARIANTS))}
        result = {m: {"test": test.get(m), "validation": out.stats(scenario, m, "final_validation_accuracy_mean"),
                      "rank": rank.get(m), "minus_control_paired": paired(by_seed[m], by_seed[CONTROL]),
                      **({"minus_chosen_paired": paired(by_seed[m], by_seed[CHOSEN])} if m.startswith(VARIANTS)
                         else {}),
                      **(learner_summary(servers[m]) if m in servers else {})} for m in grid.names}
        record["scenarios"][scenario] = result
        rows = [[m, fmt(r["validation"]), fmt(r["test"]), number(r["rank"], "g"),
                 fmt(r["minus_control_paired"], "+") if m != CONTROL else "",
                 fmt(r["minus_chosen_paired"], "+") if "minus_chosen_paired" in r else "",
                 number(r.get("calibration_to_update_ratio_mean_last"), ".3f"),
                 number(r.get("calibration_to_drift_ratio_mean_last"), ".3f")] for m, r in result.items()]
        table = format_table(["method", "validation (%)", "test (%)", "rank", f"minus {CONTROL}, by seed",
                              f"minus {CHOSEN}, by seed", "||xi||/||Delta|| (last round)",
                              "||xi||/||theta_g - theta^0|| (last round)"], rows)
        clusters = {m: c for m in grid.names if (c := out.per_cluster(scenario, m))}
        for m, c in clusters.items():
            result[m]["test_per_cluster"] = c
        names = list(next(iter(clusters.values()), {}))
        cluster_table = format_table(["method", *names], [[m, *(f"{c[n]:.1f}" for n in names)]
                                                          for m, c in clusters.items()])
        text.append(f"\n## {scenario}\n\n{table}\n\n"
                    f"- rank: among the methods (variants A-E and {ORACLE} left out), by mean test accuracy\n"
                    f"- {ORACLE}: not a method; {CONTROL} told the clusters (the adapter averaged within each "
                    f"cluster only)\n"
                    f"- minus {CONTROL}, by seed: the difference within each seed (the same partition and "
                    f"rotations for every method), mean ± std over the seeds both finished; {CONTROL} is "
                    f"pFedSeq without calibrations\n"
                    f"- minus {CHOSEN}: variants A-E against the schedule they vary (Tables 2-3)\n"
                    f"\nTest accuracy (%) per cluster after the last round (mean over the cluster's clients, then "
                    f"over seeds):\n\n{cluster_table}\n"
                    f"\n![learning curves](curves_{scenario}.png)\n\n![what the learners sent]"
                    f"(learner_{scenario}.png)\n")
        plot_curves(out, scenario, dest / f"curves_{scenario}.png")
        plot_learner(servers, scenario, dest / f"learner_{scenario}.png")
    (dest / "rotated.md").write_text("".join(text))
    return record


PERSONAL = ("pFedHN", "PeFLL", "pFedSeq")  # row-name prefixes of the methods that personalize the adapter itself


def comparison_report(out: GridOutput, dest: Path, page: str) -> dict:
    """A grid of a few methods against pFedSeq's control (the full-data grids of issue 31): each method's accuracy,
    its difference from FedAvg with local heads paired by seed, and whether the paper's order appears (every method
    that personalizes the adapter above the control)."""
    grid, record = out.grid, {**out.record(), "scenarios": {}}
    text = [out.header(yaml.safe_load(out.definition.read_text())["description"])]
    for scenario in grid.scenarios:
        by_seed = {m: out.by_seed(scenario, m) for m in grid.names}
        result = {m: {"test": out.stats(scenario, m),
                      "validation": out.stats(scenario, m, "final_validation_accuracy_mean"),
                      "minus_control_paired": paired(by_seed[m], by_seed[CONTROL])} for m in grid.names}
        record["scenarios"][scenario] = result
        rows = [[m, fmt(r["validation"]), fmt(r["test"]),
                 fmt(r["minus_control_paired"], "+") if m != CONTROL else ""] for m, r in result.items()]
        table = format_table(["method", "validation (%)", "test (%)", f"minus {CONTROL}, by seed"], rows)
        gains = {m: r["minus_control_paired"]["mean"] for m, r in result.items()
                 if m.startswith(PERSONAL) and r["minus_control_paired"]}
        if not gains:
            order = "not known yet: no method that personalizes the adapter has a cell beside the control's"
        else:
            above = sorted(m for m, gain in gains.items() if gain > 0)
            order = (f"{'yes' if len(above) == len(gains) else 'no'}: {len(above)} of the {len(gains)} methods that "
                     f"personalize the adapter and have finished cells are above {CONTROL} on the mean paired "
                     f"difference ({', '.join(above) or 'none'})")
        record["scenarios"][scenario]["paper_order"] = order
        text.append(f"\n## {scenario}\n\n{table}\n\n- minus {CONTROL}, by seed: the difference within each seed "
                    f"(the same partition for every method), mean ± std over the seeds both finished; {CONTROL} is "
                    f"pFedSeq without calibrations\n- the paper's order (methods that personalize the adapter above "
                    f"FedAvg with local heads): {order}\n\n![learning curves](curves_{scenario}.png)\n")
        plot_curves(out, scenario, dest / f"curves_{scenario}.png")
    (dest / page).write_text("".join(text))
    return record


def plot_learner(servers: dict[str, list[dict]], scenario: str, path: Path) -> None:
    """Per round, averaged over seeds: each variant's calibration size and surrogate loss (``servers``: each
    variant's server rows of every finished seed)."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method, server in servers.items():
        by_round: dict[int, list[dict]] = {}
        for row in server:
            by_round.setdefault(row["round"], []).append(row)
        for ax, key in zip(axes, ["calibration_to_update_ratio_mean", "surrogate_loss"]):
            points = [(t, statistics.fmean(r[key] for r in rows)) for t, rows in sorted(by_round.items())
                      if all(r.get(key) is not None for r in rows)]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=method)
    for ax, label in zip(axes, ["||xi_i|| / mean ||Delta_i|| (mean over clients)", "surrogate -<xi^{t-1}, Delta^t>"]):
        ax.set_xlabel("round")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[1].axhline(0, color="black", linewidth=0.8)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{scenario}: what pFedSeq's learner sends (mean over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


REPORTS = {"table1": table1_report, "table2_3": table2_3_report, "l_sweep": l_sweep_report,
           "pfedseq_investigation": investigation_report, "rotated": rotated_report,
           "full_data": functools.partial(comparison_report, page="full_data.md"),
           "pacs_silos": functools.partial(comparison_report, page="pacs_silos.md")}
PAGES = {key: f"{key}.md" for key in REPORTS} | {"pfedseq_investigation": "investigation.md"}  # what each writes


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for key in REPORTS:
        flag = key.replace("_", "-")
        parser.add_argument(f"--{flag}", type=Path, help=f"output folder of a recipes/grids/{key}.yaml grid "
                            "(left out: a page --out already has stays as it is, else the page says it is "
                            "not reported)")
        parser.add_argument(f"--{flag}-grid", type=Path,
                            default=HERE.parents[1] / "recipes" / "grids" / f"{key}.yaml",
                            help="the grid definition it ran, which says which cells to expect (default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    before = json.loads((args.out / "summary.json").read_text()) if (args.out / "summary.json").is_file() else {}
    summary = {"paper": PAPER}
    for key, report in REPORTS.items():
        folder = getattr(args, key)
        if folder is None and before.get(key) is not None and (args.out / PAGES[key]).is_file():
            summary[key] = before[key]  # reported before from cells not given now: that page stays as it is
        elif folder is None:
            (args.out / PAGES[key]).write_text(f"# {key}\n\nNot reported: no grid output was given "
                                               f"(--{key.replace('_', '-')}).\n")
            summary[key] = None
        else:
            summary[key] = report(GridOutput(folder, getattr(args, f"{key}_grid")), args.out)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
