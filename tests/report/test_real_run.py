"""The report on a ledger built by a real run: `budgetlab run` on a tiny grid of the arith
toy (a tiny random Llama, local executor, real training and evaluation), shared by the
tests of this module so that it runs once."""

import csv
import json

import pytest

from budgetlab.alloc import allocate

GRID = """
name = "real"
[grid]
tasks = ["arith"]
models = ["{model}"]
budgets = [8]
sft_fractions = [1.0, 0.5]
methods = ["dpo"]
seeds = [0]
[train]
max_length = 128
batch_size = 4
epochs = 1
[train.sft]
lr = 1e-3
[eval]
limit = 8
max_new_tokens = 4
batch_size = 8
baseline = false
[resources]
micro_batch_size = 4
"""

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from click.testing import CliRunner

    from budgetlab.cli import main
    from budgetlab.train.tiny import make_llama

    root = tmp_path_factory.mktemp("real-run")
    model = make_llama(root / "tiny", hidden=32, layers=1, heads=2)
    grid = root / "grid.toml"
    grid.write_text(GRID.format(model=model))
    base = ["--ledger", str(root / "ledger.db"), "--workdir", str(root / "runs")]
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(main, base + [str(a) for a in args], catch_exceptions=False)

    first = cli("run", grid, "--timeout", "300", "--poll", "0.5")
    return cli, first, root


def test_run_prints_the_report(real):
    _, first, _ = real
    assert first.exit_code == 0, first.output
    assert "arith · " in first.stdout and "total: 2/2 cells measured" in first.stdout
    assert "5/5 stages" in first.stderr  # the progress bar reached the end


def test_json_csv_and_plot_of_a_real_run(real):
    cli, _, root = real
    r = cli("report", "real", "--sync", "--json", "--csv", root / "c.csv",
            "--plot", root / "p.png")
    assert r.exit_code == 0, r.output
    data = json.loads(r.stdout)
    assert list(data) == ["grid", "metric", "cells", "best"] and data["metric"] == "accuracy"
    from budgetlab.ledger import Ledger

    led = Ledger(root / "ledger.db", create=False)
    points = {p["point_id"]: p for p in led.point_status()}
    for c in data["cells"]:
        assert c["status"] == "COMPLETED" and 0.0 <= c["score"] <= 1.0
        assert (c["n_sft"], c["n_pft"]) == allocate(8, c["sft_fraction"], 1.0, 1.0)
        assert points[c["point_id"]]["eval_state"] == "COMPLETED"
        # a point's id is its eval stage's id
        assert led.metrics([c["point_id"]])[c["point_id"]]["accuracy"] == c["score"]
        assert c["gpu_hours"] == 0.0  # CPU run: no GPU-seconds
    assert len(data["best"]) == 1 and data["best"][0]["budget"] == 8
    rows = list(csv.DictReader(open(root / "c.csv")))
    assert [r["point_id"] for r in rows] == [c["point_id"] for c in data["cells"]]
    assert (root / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_reprice_a_real_run(real):
    cli, _, _ = real
    r = cli("report", "real", "--cost", "sft=2,pair=1", "--json")
    cells = {c["sft_fraction"]: c for c in json.loads(r.stdout)["cells"]}
    # SFT-only at 8 now buys 4 SFT examples: the SFT stage of n = 4 was trained for the
    # 0.5 cell, so only its evaluation is missing; the 0.5 cell buys 2 + 4, all new.
    assert (cells[1.0]["n_sft"], cells[1.0]["n_pft"]) == (4, 0)
    assert (cells[0.5]["n_sft"], cells[0.5]["n_pft"]) == (2, 4)
    assert {c["status"] for c in cells.values()} == {"NOT_RUN"}
    r = cli("report", "real", "--cost", "sft=2,pair=1")
    assert "2 points still needed (4 stages to run" in r.stdout


def test_recommend_on_a_real_run(real):
    cli, _, _ = real
    r = cli("recommend", "real", "--budget", "8", "--json")
    a = json.loads(r.stdout)["answers"][0]
    assert a["kind"] == "measured" and a["best"]["n_sft"] + a["best"]["n_pft"] == 8
    r = cli("recommend", "real", "--budget", "100")
    assert r.exit_code == 0 and "outside the measured range [8, 8]" in r.stderr
