"""docs/reproduction/generate.py: the tables hold the cells' own numbers beside the paper's, the paper's numbers
are transcribed right, Spearman's rho and ranks are computed right, missing cells are listed and never filled, and
the plots are written."""
from __future__ import annotations

import importlib.util
import json
import statistics
from pathlib import Path

import pytest
import yaml
from conftest import RECIPES

from fedml_pfedseq.grid import run_grid

REPORT_DIR = Path(__file__).resolve().parents[1] / "docs" / "reproduction"
PAPER_TEXT = Path(__file__).resolve().parents[2] / "shared/papers/001_6a459a2e05555e41.txt"
_spec = importlib.util.spec_from_file_location("reproduction_report", REPORT_DIR / "generate.py")
report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(report)
PFEDSEQ = str(RECIPES / "omniglot_pfedseq.yaml")


def write_definition(path: Path, methods: list, scenarios: dict, seeds: list[int], **extra) -> Path:
    path.write_text(yaml.safe_dump({"methods": methods, "scenarios": scenarios, "seeds": seeds, **extra}))
    return path


def fake_cell(root: Path, scenario: str, method: str, seed: int, test: float) -> None:
    """A finished seed cell as the report reads it: its summary.json (the keys grid.summarize reads)."""
    cell = root / scenario / method / f"seed_{seed}"
    cell.mkdir(parents=True)
    (cell / "summary.json").write_text(json.dumps({"final_test_accuracy_mean": test,
                                                   "final_validation_accuracy_mean": test,
                                                   "mean_round_seconds": 1.0}))


def hand(values: list[float]) -> str:
    percent = [100 * v for v in values]
    return f"{statistics.fmean(percent):.2f} ± {statistics.stdev(percent):.2f}"


def test_paper_numbers_are_the_papers():
    paper = json.loads((REPORT_DIR / "paper_results.json").read_text())
    # the three spot checks, as printed in Tables 1 and 3
    assert paper["table1"]["results"]["pFedSeq"]["Omniglot"] == {"mean": 45.25, "std": 0.16}
    assert paper["table1"]["results"]["PeFLL"]["DomainNet"] == {"mean": 82.42, "std": 0.17}
    assert paper["table2_3"]["results"]["D_mlp_learner"]["CIFAR-100"] == {"mean": 94.32, "std": 0.17}
    assert paper["l_sweep"]["long_minus_short"] == 1.17
    if not PAPER_TEXT.is_file():
        return
    text = PAPER_TEXT.read_text()  # every row, where the paper's text is at hand
    cell = lambda r: f"{r['mean']:.2f}±{r['std']:.2f}"  # noqa: E731
    for row in paper["table1"]["results"].values():
        assert "\t".join(cell(row[d]) for d in ("CIFAR-100", "Tiny-ImageNet", "DomainNet", "Omniglot")) in text
    for row in paper["table2_3"]["results"].values():
        assert f"{cell(row['CIFAR-100'])}\t{cell(row['DomainNet'])}" in text


def test_spearman_and_ranks_by_hand():
    # ranks ours a1 b3 c2, paper a3 b2 c1: d = 2, 1, 1 -> rho = 1 - 6 * 6 / (3 * (9 - 1)) = -0.5
    assert report.spearman({"a": 3.0, "b": 1.0, "c": 2.0}, {"a": 1.0, "b": 2.0, "c": 3.0, "only_paper": 9.0}) == \
        pytest.approx(-0.5)
    # a tie: ranks (1.5, 1.5, 3) vs (1, 2, 3): Pearson's r = 1.5 / sqrt(1.5 * 2)
    assert report.ranks({"a": 1.0, "b": 1.0, "c": 0.0}) == {"a": 1.5, "b": 1.5, "c": 3.0}
    assert report.spearman({"a": 1.0, "b": 1.0, "c": 0.0}, {"a": 3.0, "b": 2.0, "c": 1.0}) == \
        pytest.approx(1.5 / 3 ** 0.5)
    assert report.spearman({"a": 1.0}, {"a": 2.0}) is None


@pytest.mark.slow
def test_table1_from_a_real_grid_then_with_a_cell_missing(tiny_vit, tmp_path):
    definition = write_definition(
        tmp_path / "table1.yaml",
        [str(RECIPES / "omniglot_fedavg.yaml"),
         {"recipe": PFEDSEQ, "name": "pFedSeq", "set": ["algorithm_args.warmup_rounds=1"]}],
        {"omniglot": ["data_args.partition_method=dirichlet", "data_args.partition_alpha=1.0",  # 4 clients: fast
                      "train_args.client_num_in_total=4", "train_args.client_num_per_round=4",
                      "data_args.samples_per_client=30"]}, [0, 1],
        overrides=[f"model_args.model={tiny_vit}", "train_args.comm_round=2", "device_args.num_threads=1",
                   "device_args.using_gpu=false", "hub_args.save_adapters=false"],
        tuning={"rounds": 1, "methods": {"pFedSeq": {"algorithm_args.output_scale_init": [0.1, 1.0]}}},
        output_dir=str(tmp_path / "grid"))
    grid_summary = run_grid(definition, progress=False)
    out = tmp_path / "report"
    summary = report.main(["--table1", str(tmp_path / "grid"), "--table1-grid", str(definition), "--out", str(out)])

    test = {m: [json.loads((tmp_path / f"grid/omniglot/{m}/seed_{k}/summary.json").read_text())
                ["final_test_accuracy_mean"] for k in (0, 1)] for m in ("FedAvg", "pFedSeq")}
    markdown = (out / "table1.md").read_text()
    result = summary["table1"]["scenarios"]["omniglot"]
    for method, values in test.items():
        assert f"| {hand(values)} " in markdown
        ours = result["ours"][method]
        assert ours["mean"] == pytest.approx(100 * grid_summary["table"][method]["omniglot"]["test_mean"])
        assert ours["std"] == pytest.approx(100 * grid_summary["table"][method]["omniglot"]["test_std"])
    assert summary["table1"]["tuned"] == {"pFedSeq": {"omniglot": grid_summary["table"]["pFedSeq"]["omniglot"]
                                                      ["tuned"]}}
    assert {c["candidate"] for c in summary["table1"]["tuning_candidates"]} == \
        {"output_scale_init=0.1", "output_scale_init=1.0"}
    assert "45.25 ± 0.16" in markdown and "37.87 ± 0.84" in markdown  # the paper's Omniglot column
    assert result["margin_paper"] == {"margin": pytest.approx(45.25 - 42.98), "best_baseline": "PeFLL"}
    means = {m: statistics.fmean(v) for m, v in test.items()}
    assert result["margin_ours"]["margin"] == pytest.approx(100 * (means["pFedSeq"] - means["FedAvg"]))
    assert result["baselines_above_pfedseq_ours"] == (["FedAvg"] if means["FedAvg"] > means["pFedSeq"] else [])
    assert result["rank_paper"]["pFedSeq"] == 1 and result["rank_paper"]["FedAvg"] == 13
    differences = [100 * (test["pFedSeq"][k] - test["FedAvg"][k]) for k in (0, 1)]  # seed by seed
    assert result["pfedseq_minus_paired"]["FedAvg"] == {"mean": pytest.approx(statistics.fmean(differences)),
                                                        "std": pytest.approx(statistics.stdev(differences)),
                                                        "seeds": 2}
    assert "pFedSeq" not in result["pfedseq_minus_paired"]
    assert summary["table1"]["missing_cells"] == [] and summary["table2_3"] is None
    assert (out / "curves_omniglot.png").stat().st_size > 0

    # a cell not finished: listed as missing, and its row holds the one seed there is (no std), nothing filled in
    (tmp_path / "grid/omniglot/pFedSeq/seed_1/summary.json").unlink()
    (tmp_path / "grid/grid_summary.json").unlink()
    summary = report.main(["--table1", str(tmp_path / "grid"), "--table1-grid", str(definition), "--out", str(out)])
    assert summary["table1"]["missing_cells"] == ["omniglot/pFedSeq/seed_1"]
    assert summary["table1"]["scenarios"]["omniglot"]["ours"]["pFedSeq"] == {
        "mean": pytest.approx(100 * test["pFedSeq"][0]), "std": None, "seeds": 1}
    markdown = (out / "table1.md").read_text()
    assert "- omniglot/pFedSeq: seed_1" in markdown
    assert summary["table1"]["scenarios"]["omniglot"]["pfedseq_minus_paired"]["FedAvg"] == {  # seed 0 only
        "mean": pytest.approx(100 * (test["pFedSeq"][0] - test["FedAvg"][0])), "std": None, "seeds": 1}
    assert f"| pFedSeq | {100 * test['pFedSeq'][0]:.2f} " in markdown


def test_table2_3_and_l_sweep_from_hand_written_cells(tmp_path):
    variants = write_definition(
        tmp_path / "table2_3.yaml",
        [{"recipe": PFEDSEQ, "name": "pFedSeq"},
         {"recipe": PFEDSEQ, "name": "D_mlp_learner", "set": ["algorithm_args.learner_architecture=mlp"]}],
        {"pacs": [], "cifar10": []}, [0, 1])
    sweep = write_definition(tmp_path / "l_sweep.yaml",
                             [{"recipe": PFEDSEQ, "name": f"L{L}", "set": [f"algorithm_args.seq_len={L}"]}
                              for L in (1, 7, 15)], {"omniglot": []}, [0, 1])
    cells = {("pacs", "pFedSeq"): [0.80, 0.84], ("pacs", "D_mlp_learner"): [0.70, 0.75],
             ("cifar10", "pFedSeq"): [0.90, 0.91]}  # cifar10/D_mlp_learner: not run yet
    for (scenario, method), values in cells.items():
        for seed, value in enumerate(values):
            fake_cell(tmp_path / "t23", scenario, method, seed, value)
    for L, values in {1: [0.40, 0.42], 15: [0.43, 0.47]}.items():  # L7: not run yet
        for seed, value in enumerate(values):
            fake_cell(tmp_path / "ls", "omniglot", f"L{L}", seed, value)
    out = tmp_path / "report"
    summary = report.main(["--table2-3", str(tmp_path / "t23"), "--table2-3-grid", str(variants),
                           "--l-sweep", str(tmp_path / "ls"), "--l-sweep-grid", str(sweep), "--out", str(out)])

    variants_md = (out / "table2_3.md").read_text()
    assert all(hand(values) in variants_md for values in cells.values())  # 82.00 ± 2.83, 72.50 ± 3.54, 90.50 ± 0.71
    pacs, cifar = (summary["table2_3"]["scenarios"][s] for s in ("pacs", "cifar10"))
    assert pacs["drop_ours"]["D_mlp_learner"] == pytest.approx(82.0 - 72.5)
    assert pacs["drop_paper"]["D_mlp_learner"] == pytest.approx(84.63 - 81.25)  # DomainNet
    assert cifar["paper"]["D_mlp_learner"] == {"mean": 94.32, "std": 0.17}  # CIFAR-100
    assert cifar["ours"]["D_mlp_learner"] is None and cifar["drop_ours"]["D_mlp_learner"] is None
    assert summary["table2_3"]["missing_cells"] == ["cifar10/D_mlp_learner/seed_0", "cifar10/D_mlp_learner/seed_1"]
    assert "- cifar10/D_mlp_learner: seed_0, seed_1" in variants_md and "+9.50" in variants_md

    sweep_result = summary["l_sweep"]["scenarios"]["omniglot"]
    assert sweep_result["long_minus_short"] == pytest.approx(45.0 - 41.0)
    assert sweep_result["by_L"][7] is None and summary["l_sweep"]["missing_cells"] == ["omniglot/L7/seed_0",
                                                                                      "omniglot/L7/seed_1"]
    sweep_md = (out / "l_sweep.md").read_text()
    assert "45.00 ± 2.83" in sweep_md and "ours +4.00, paper +1.17" in sweep_md
    assert (out / "l_sweep.png").stat().st_size > 0
    assert json.loads((out / "summary.json").read_text())["l_sweep"]["scenarios"]["omniglot"]["by_L"]["7"] is None
    assert "Not reported" in (out / "table1.md").read_text() and summary["table1"] is None


def test_a_folder_that_is_not_the_grids_output_is_refused(tmp_path):
    sweep = write_definition(tmp_path / "l_sweep.yaml", [{"recipe": PFEDSEQ, "name": "L1"}], {"omniglot": []}, [0])
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(SystemExit, match=r"none of its scenario folders \['omniglot'\]"):
        report.main(["--l-sweep", str(tmp_path / "elsewhere"), "--l-sweep-grid", str(sweep),
                     "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="no such folder"):
        report.main(["--l-sweep", str(tmp_path / "absent"), "--l-sweep-grid", str(sweep),
                     "--out", str(tmp_path / "out")])


def test_investigation_compares_each_variant_with_the_control_and_summarises_the_learner(tmp_path):
    definition = write_definition(
        tmp_path / "investigation.yaml",
        [str(RECIPES / "omniglot_fedavg_local_head.yaml"), {"recipe": PFEDSEQ, "name": "lr1e-1"}],
        {"omniglot": []}, [0, 1])
    root = tmp_path / "runs"
    servers = {0: [{"round": 1, "surrogate_loss": None, "calibration_to_drift_ratio_mean": None},
                   {"round": 2, "surrogate_loss": -0.2, "calibration_to_drift_ratio_mean": 0.1},
                   {"round": 3, "surrogate_loss": 0.4, "calibration_to_drift_ratio_mean": 0.3,
                    "calibration_to_update_ratio_mean": 2.0}],
               1: [{"round": 1, "surrogate_loss": None, "calibration_to_drift_ratio_mean": None},
                   {"round": 2, "surrogate_loss": -0.1, "calibration_to_drift_ratio_mean": 0.2},
                   {"round": 3, "surrogate_loss": -0.3, "calibration_to_drift_ratio_mean": 0.5,
                    "calibration_to_update_ratio_mean": 1.0}]}
    for seed, (control, variant) in enumerate([(0.10, 0.20), (0.30, 0.30)]):
        fake_cell(root, "omniglot", "FedAvgLocalHead", seed, control)
        fake_cell(root, "omniglot", "lr1e-1", seed, variant)
        (root / "omniglot" / "lr1e-1" / f"seed_{seed}" / "metrics.json").write_text(
            json.dumps({"server": servers[seed]}))
        (root / "omniglot" / "FedAvgLocalHead" / f"seed_{seed}" / "metrics.json").write_text(
            json.dumps({"server": [{"round": t} for t in (1, 2, 3)]}))
    out = tmp_path / "report"
    out.mkdir()
    result = report.investigation_report(report.GridOutput(root, definition), out)["scenarios"]["omniglot"]
    variant = result["lr1e-1"]
    assert variant["test_gain"] == pytest.approx(100 * (0.25 - 0.20))  # means over seeds: 25 % vs 20 %
    assert variant["validation_gain"] == pytest.approx(5.0)
    assert variant["calibration_to_drift_ratio_mean_last"] == pytest.approx((0.3 + 0.5) / 2)  # round 3, both seeds
    assert variant["calibration_to_update_ratio_mean_last"] == pytest.approx(1.5)
    assert variant["surrogate_after_warmup"] == pytest.approx((-0.2 + 0.4 - 0.1 - 0.3) / 4)
    assert variant["surrogate_negative_share"] == pytest.approx(3 / 4)
    assert result["FedAvgLocalHead"]["calibration_to_drift_ratio_mean_last"] is None
    text = (out / "investigation.md").read_text()
    assert "| lr1e-1" in text and "+5.00" in text and (out / "investigation_omniglot.png").stat().st_size > 0


def test_rotated_report_pairs_every_method_with_the_control_and_each_variant_with_its_schedule(tmp_path):
    definition = write_definition(
        tmp_path / "rotated.yaml",
        [str(RECIPES / "omniglot_fedavg.yaml"), str(RECIPES / "omniglot_fedavg_local_head.yaml"),
         {"recipe": PFEDSEQ, "name": "pFedSeq"}, {"recipe": PFEDSEQ, "name": "pFedSeq_proximal"},
         {"recipe": PFEDSEQ, "name": "B_no_cross_step", "set": ["algorithm_args.seq_len=1"]}],
        {"cifar10_rotated": []}, [0, 1])
    root = tmp_path / "runs"
    accuracy = {"FedAvg": [0.40, 0.50], "FedAvgLocalHead": [0.60, 0.64], "pFedSeq": [0.60, 0.65],
                "pFedSeq_proximal": [0.63, 0.70], "B_no_cross_step": [0.62, 0.66]}
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            fake_cell(root, "cifar10_rotated", method, seed, value)
            ratio = {"pFedSeq": 0.1, "pFedSeq_proximal": 0.8}.get(method)
            cell = root / "cifar10_rotated" / method / f"seed_{seed}"
            (cell / "recipe.yaml").write_text(yaml.safe_dump({"data_args": {"cluster_transforms": ["identity",
                                                                                                  "rot90"]}}))
            (cell / "metrics.json").write_text(json.dumps(
                {"eval": [{"round": 12, "client": 0, "test_accuracy": value},  # clients 0, 2: upright; 1: rot90
                          {"round": 12, "client": 2, "test_accuracy": value + 0.02},
                          {"round": 12, "client": 1, "test_accuracy": value - 0.10},
                          {"round": 11, "client": 1, "test_accuracy": 0.0}],
                 "server": [{"round": 12, "surrogate_loss": 0.0, "calibration_to_drift_ratio_mean": ratio,
                             "calibration_to_update_ratio_mean": ratio}]}))
    out = tmp_path / "report"
    out.mkdir()
    result = report.rotated_report(report.GridOutput(root, definition), out)["scenarios"]["cifar10_rotated"]
    assert result["FedAvg"]["minus_control_paired"]["mean"] == pytest.approx(-17.0)  # (-20 - 14) / 2
    assert result["FedAvg"]["minus_control_paired"]["std"] == pytest.approx(statistics.stdev([-20, -14]))
    assert result["pFedSeq_proximal"]["minus_control_paired"]["mean"] == pytest.approx(4.5)  # (3 + 6) / 2
    assert result["B_no_cross_step"]["minus_chosen_paired"]["mean"] == pytest.approx(-2.5)  # (-1 - 4) / 2
    assert "minus_chosen_paired" not in result["pFedSeq"]
    assert result["pFedSeq_proximal"]["rank"] == 1 and result["FedAvg"]["rank"] == 4  # variants are not ranked
    assert result["B_no_cross_step"]["rank"] is None
    assert result["pFedSeq_proximal"]["calibration_to_update_ratio_mean_last"] == pytest.approx(0.8)
    # per cluster: the last round's clients of each cluster, then the mean over seeds (FedAvg: 40 % and 50 %)
    assert result["FedAvg"]["test_per_cluster"] == pytest.approx({"identity": 46.0, "rot90": 35.0})
    text = (out / "rotated.md").read_text()
    assert "+4.50 ± 2.12" in text and "-17.00 ± 4.24" in text and "| FedAvg           | 46.0     | 35.0  |" in text
    assert (out / "curves_cifar10_rotated.png").stat().st_size > 0
    assert (out / "learner_cifar10_rotated.png").stat().st_size > 0


def test_a_part_left_out_keeps_the_page_and_numbers_reported_before(tmp_path):
    sweep = write_definition(tmp_path / "l_sweep.yaml", [{"recipe": PFEDSEQ, "name": "L1"}], {"omniglot": []}, [0])
    fake_cell(tmp_path / "ls", "omniglot", "L1", 0, 0.40)
    out = tmp_path / "report"
    first = report.main(["--l-sweep", str(tmp_path / "ls"), "--l-sweep-grid", str(sweep), "--out", str(out)])
    page = (out / "l_sweep.md").read_text()
    again = report.main(["--out", str(out)])  # no grid given: what was reported stays, what never was says so
    assert (out / "l_sweep.md").read_text() == page and again["l_sweep"] == json.loads(json.dumps(first["l_sweep"]))
    assert again["table1"] is None and "Not reported" in (out / "table1.md").read_text()
    # a report whose page is named otherwise than its key (the investigation writes investigation.md) is kept too
    kept = {"folder": "somewhere", "scenarios": {}}
    summary = json.loads((out / "summary.json").read_text())
    (out / "summary.json").write_text(json.dumps({**summary, "pfedseq_investigation": kept}))
    (out / "investigation.md").write_text("# the investigation\n")
    assert report.main(["--out", str(out)])["pfedseq_investigation"] == kept
    assert (out / "investigation.md").read_text() == "# the investigation\n"
    assert not (out / "pfedseq_investigation.md").exists()


def test_comparison_report_pairs_each_method_with_the_control_and_says_whether_the_papers_order_appears(tmp_path):
    definition = write_definition(
        tmp_path / "full_data.yaml",
        [str(RECIPES / "omniglot_fedavg_local_head.yaml"), str(RECIPES / "omniglot_local.yaml"),
         {"recipe": PFEDSEQ, "name": "pFedSeq_memory"}, str(RECIPES / "omniglot_pfedhn.yaml")],
        {"omniglot_full": [], "pacs_full": []}, [0, 1], description="full data")
    root = tmp_path / "runs"
    accuracy = {"FedAvgLocalHead": [0.40, 0.50], "Local": [0.30, 0.35], "pFedSeq_memory": [0.45, 0.52],
                "pFedHN": [0.41, 0.48]}
    for method, values in accuracy.items():
        for seed, value in enumerate(values):
            fake_cell(root, "omniglot_full", method, seed, value)
            (root / "omniglot_full" / method / f"seed_{seed}" / "metrics.json").write_text(
                json.dumps({"eval": [{"round": 1, "client": 0, "test_accuracy": value}]}))
    fake_cell(root, "pacs_full", "FedAvgLocalHead", 0, 0.5)
    (root / "pacs_full" / "FedAvgLocalHead" / "seed_0" / "metrics.json").write_text(json.dumps({"eval": []}))
    out = tmp_path / "report"
    out.mkdir()
    record = report.comparison_report(report.GridOutput(root, definition), out, page="full_data.md")
    result = record["scenarios"]["omniglot_full"]
    assert result["pFedSeq_memory"]["minus_control_paired"]["mean"] == pytest.approx(3.5)  # (5 + 2) / 2
    assert result["pFedHN"]["minus_control_paired"]["mean"] == pytest.approx(-0.5)  # (1 - 2) / 2
    assert result["Local"]["minus_control_paired"]["mean"] == pytest.approx(-12.5)
    assert result["paper_order"].startswith("no: 1 of the 2 methods") and "(pFedSeq_memory)" in result["paper_order"]
    assert record["scenarios"]["pacs_full"]["paper_order"].startswith("not known yet")
    text = (out / "full_data.md").read_text()
    assert text.startswith("# full data") and "+3.50 ± 2.12" in text and "- pacs_full/pFedHN: seed_0, seed_1" in text
    assert (out / "curves_omniglot_full.png").stat().st_size > 0
