"""The fault and bad-input suite (issue 7): shared fixtures and the summary table.

Every scenario runs the real thing: the budgetlab CLI as a separate process, the local SLURM
cluster from slurm/cluster.sh, real training stages of a tiny random Llama (DeepSpeed on CPU,
gloo), real SQLite. Each test records its figures with `figure(...)`; the table of all
scenarios is printed at the end of the session (pytest_terminal_summary below).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # faultkit: the helpers

from faultkit import CLI, slurm_env  # noqa: E402
from tests.conftest import drain_slurm_queue  # noqa: E402

os.environ.setdefault("DS_ACCELERATOR", "cpu")

# nodeid -> {"scenario": str, "figures": dict}; outcomes come from the report hook.
_FIGURES: dict[str, dict] = {}
_OUTCOMES: dict[str, str] = {}


@pytest.fixture
def figure(request):
    """figure(scenario, **numbers): what this test measured, for the summary table."""
    def record(scenario: str, **numbers):
        entry = _FIGURES.setdefault(request.node.nodeid, {"scenario": scenario, "figures": {}})
        entry["scenario"] = scenario
        entry["figures"].update(numbers)
    return record


def pytest_runtest_logreport(report):
    if "tests/faults/" not in report.nodeid.replace(os.sep, "/"):
        return
    if report.when == "call" or report.outcome != "passed":
        prev = _OUTCOMES.get(report.nodeid)
        if prev in (None, "passed"):
            _OUTCOMES[report.nodeid] = report.outcome


def pytest_terminal_summary(terminalreporter):
    if not _OUTCOMES:
        return
    tr = terminalreporter
    tr.section("budgetlab fault scenarios")
    rows = []
    for nodeid, outcome in _OUTCOMES.items():
        entry = _FIGURES.get(nodeid, {"scenario": nodeid.split("::")[-1], "figures": {}})
        figs = ", ".join(f"{k}={_fmt(v)}" for k, v in entry["figures"].items())
        rows.append((entry["scenario"], outcome, figs))
    rows.sort()
    w0 = max(len(r[0]) for r in rows)
    tr.write_line(f"{'scenario':<{w0}}  {'result':<7}  figures")
    for scen, outcome, figs in rows:
        tr.write_line(f"{scen:<{w0}}  {outcome:<7}  {figs}")
    out = os.environ.get("BUDGETLAB_FAULT_TABLE")
    if out:  # README.md (Reliability) quotes these numbers
        Path(out).write_text(json.dumps([dict(zip(("scenario", "result", "figures"), r))
                                         for r in rows], indent=1))


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


@pytest.fixture
def cli(tmp_path):
    return CLI(tmp_path)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A random 1-layer Llama with a byte tokenizer (local path: no hub, cheap stages)."""
    from budgetlab.train.tiny import make_llama

    return make_llama(tmp_path_factory.mktemp("fault-model") / "tiny", hidden=32, layers=1,
                      heads=2)


@pytest.fixture(scope="session")
def slurm():
    """The cluster's environment (SLURM_CONF ...); skips when `slurm/cluster.sh up` was not run."""
    env = slurm_env()
    if env is None:
        pytest.skip("no local SLURM cluster (run: bash slurm/cluster.sh up)")
    os.environ.update(env)
    return env


@pytest.fixture
def scli(tmp_path, slurm):
    """A CLI for a SLURM test on an idle cluster; whatever it left queued or running is
    cancelled afterwards."""
    drain_slurm_queue()
    cli = CLI(tmp_path)
    yield cli
    if cli.ledger.exists():
        cli("cancel", timeout=120)
    drain_slurm_queue(wait=False)
