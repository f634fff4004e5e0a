"""Scenario 7: malformed grid specs and malformed dataset rows.

Each is refused with ONE line naming the file and where in it (key, or row/line), exit code
2, and the ledger file byte-identical before and after. Most cases run the CLI in-process
(click's runner: the same code, 25 cases in seconds); one case of each family also runs as
a separate process to check the real exit code and stderr.
"""

from __future__ import annotations

import hashlib
import json
import textwrap
import time

import pytest
from click.testing import CliRunner

from budgetlab.cli import main
from budgetlab.graph import build_plan
from budgetlab.ledger import Ledger
from budgetlab.spec import load_spec

pytestmark = pytest.mark.fault

BASE = """
name = "bad"
[grid]
tasks = ["arith"]
models = ["{model}"]
budgets = [8]
sft_fractions = [1.0, 0.5]
methods = ["dpo"]
seeds = [0]
[train]
max_length = 64
batch_size = 4
[resources]
micro_batch_size = 4
"""

# (name, how to break BASE: (old, new) replacements or text appended, what the error names)
SPECS = [
    ("toml syntax", [("[grid]", "[grid")], "invalid TOML"),
    ("name missing", [('name = "bad"', "")], ": name: missing"),
    ("name with spaces", [('name = "bad"', 'name = "my grid; rm -rf ~"')], ": name: "),
    ("unknown top key", [], "bogus = 1", ": bogus: unknown key"),
    ("unknown grid key", [("seeds = [0]", "seeds = [0]\nfracs = [0.5]")], "grid.fracs"),
    ("fraction > 1", [("[1.0, 0.5]", "[1.0, 1.5]")], "grid.sft_fractions"),
    ("budget zero", [("budgets = [8]", "budgets = [0]")], "grid.budgets"),
    ("budget text", [("budgets = [8]", 'budgets = ["8"]')], "grid.budgets"),
    ("cost <= 0", [], "[costs]\nsft_example = 0", "costs.sft_example"),
    ("unknown task", [('tasks = ["arith"]', 'tasks = ["arithmetic"]')], "grid.tasks"),
    ("unknown method", [('methods = ["dpo"]', 'methods = ["ppo"]')], "grid.methods"),
    ("model path missing", [("models = [", 'models = ["/nonexistent/model", ')], "grid.models"),
    ("seed not integer", [("seeds = [0]", "seeds = [0.5]")], "grid.seeds"),
    ("empty task list", [('tasks = ["arith"]', "tasks = []")], "grid.tasks"),
    ("negative lr", [], "[train.sft]\nlr = -1e-3", "train.sft.lr"),
    ("zero stage 5", [("micro_batch_size = 4", "micro_batch_size = 4\nzero_stage = 5")],
     "resources.zero_stage"),
    ("batch not divisible", [("micro_batch_size = 4", "micro_batch_size = 3")],
     "micro_batch_size"),
    ("cell buys nothing", [("budgets = [8]", "budgets = [0.5]")], "grid."),
    ("data file missing", [], '[data.arith]\nsft = "nope.jsonl"', "data.arith.sft"),
    ("slurm value with newline", [], '[slurm]\npartition = "batch\\n#SBATCH --uid=0"',
     "slurm.partition"),
]

# (name, JSONL text of an SFT file, what the error names)
ROWS = [
    ("not json", '{"prompt": "a", "response": "b"}\n{"prompt": "c", "resp\n', "line 2"),
    ("array row", '{"prompt": "a", "response": "b"}\n["c", "d"]\n', "line 2"),
    ("missing response", '{"prompt": "a", "response": "b"}\n{"prompt": "c"}\n', "row 2"),
    ("missing prompt", '{"response": "b"}\n', "row 1"),
    ("empty prompt", '{"prompt": "a", "response": "b"}\n{"prompt": "  ", "response": "x"}\n',
     "row 2"),
    ("number response", '{"prompt": "a", "response": 7}\n', "row 1"),
    ("null prompt", '{"prompt": "a", "response": "b"}\n' * 2 + '{"prompt": null, "response": "x"}\n',
     "row 3"),
    ("list prompt", '{"prompt": ["a"], "response": "b"}\n', "row 1"),
    ("bad utf-8", b'{"prompt": "a", "response": "b"}\n{"prompt": "\xff\xfe", "response": "x"}\n',
     "line 2"),
    ("empty file", "", "empty"),
]
# preference rows: chosen == rejected and a missing rejected
PREF_ROWS = [
    ("chosen equals rejected", '{"prompt": "a", "chosen": "x", "rejected": "x"}\n', "row 1"),
    ("missing rejected", '{"prompt": "a", "chosen": "x"}\n', "row 1"),
]


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def setup(tmp_path, tiny_model):
    base = BASE.replace("{model}", tiny_model)
    good = tmp_path / "good.toml"
    good.write_text(textwrap.dedent(base))
    ledger = tmp_path / "ledger.db"
    led = Ledger(ledger)
    led.register(build_plan(load_spec(good)))   # an existing ledger with a grid in it
    led.close()
    return tmp_path, base, ledger


def _invoke(ledger, workdir, *args):
    return CliRunner().invoke(main, ["--ledger", str(ledger), "--workdir", str(workdir),
                                     *map(str, args)])


def _check_refused(res, spec_path, where, ledger, before, name=""):
    err = res.stderr.strip()
    assert res.exit_code == 2, (name, res.exit_code, res.output[-300:])
    assert len(err.splitlines()) == 1, err
    assert err.startswith("budgetlab: error: ") and str(spec_path) in err, err
    assert where in err, (where, err)
    assert _digest(ledger) == before


def test_malformed_specs_are_one_line_exit_2_ledger_untouched(setup, cli, figure):
    root, base, ledger = setup
    before = _digest(ledger)
    t0 = time.time()
    for i, (name, edits, *rest) in enumerate(SPECS):
        where = rest[-1]
        text = base
        for old, new in edits:
            assert old in text, name
            text = text.replace(old, new, 1)
        if len(rest) == 2:   # a table goes at the end, a top-level key at the start
            text = text + "\n" + rest[0] + "\n" if rest[0].startswith("[") else \
                rest[0] + "\n" + text
        spec = root / f"bad{i}.toml"
        spec.write_text(textwrap.dedent(text))
        for cmd in (("plan",), ("submit", "--executor", "local"), ("submit", "--executor", "slurm")):
            res = _invoke(ledger, root / "runs", cmd[0], spec, *cmd[1:])
            _check_refused(res, spec, where, ledger, before, name)
    assert not (root / "runs").exists()   # no stage directory, no job folder
    # The same through a real process: exit status and stderr as a shell sees them.
    cli.ledger = ledger
    p = cli("submit", root / "bad0.toml", "--executor", "local")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert _digest(ledger) == before
    figure("7 malformed specs", cases=len(SPECS), commands=3 * len(SPECS) + 1,
           seconds=time.time() - t0)


def test_malformed_dataset_rows_are_one_line_exit_2_ledger_untouched(setup, cli, figure):
    root, base, ledger = setup
    before = _digest(ledger)
    cases = [("sft", *c) for c in ROWS] + [("preferences", *c) for c in PREF_ROWS]
    t0 = time.time()
    for i, (key, name, content, where) in enumerate(cases):
        data = root / f"rows{i}.jsonl"
        data.write_bytes(content.encode() if isinstance(content, str) else content)
        spec = root / f"data{i}.toml"
        spec.write_text(textwrap.dedent(base) + f'\n[data.arith]\n{key} = "{data}"\n')
        res = _invoke(ledger, root / "runs", "submit", spec, "--executor", "local")
        _check_refused(res, spec, where, ledger, before, name)
        assert str(data) in res.stderr, (name, res.stderr)
    assert not (root / "runs").exists()
    cli.ledger = ledger
    spec = root / "data2.toml"
    p = cli("submit", spec, "--executor", "slurm")
    assert p.returncode == 2 and "row 2" in p.stderr and len(p.stderr.strip().splitlines()) == 1
    assert _digest(ledger) == before
    figure("7 malformed dataset rows", cases=len(cases), seconds=time.time() - t0)


def test_a_good_data_file_is_accepted(setup):
    """The row checks do not refuse a well-formed file (else the test above proves nothing)."""
    root, base, ledger = setup
    data = root / "good.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"q{i}", "response": f"a{i}"}) + "\n"
                            for i in range(20)))
    spec = root / "gooddata.toml"
    spec.write_text(textwrap.dedent(base) + f'\n[data.arith]\nsft = "{data}"\n')
    res = _invoke(ledger, root / "runs", "plan", spec, "--json")
    assert res.exit_code == 0, res.output
