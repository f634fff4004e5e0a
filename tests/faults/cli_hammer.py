"""One of the concurrent CLI processes of scenario 4: runs `budgetlab` commands N times in
this process (each through the real Click entry point, so the ledger is opened, written and
closed per command as a user's shell would do) and writes one JSON line per command.

    python cli_hammer.py OUT.jsonl N LEDGER WORKDIR CMD [ARGS...]   (ARGS: the command's own)
"""

import json
import sys
import time

from click.testing import CliRunner

from budgetlab.cli import main


def run(out: str, n: int, ledger: str, workdir: str, args: list[str]) -> None:
    runner = CliRunner()
    with open(out, "w") as f:
        for i in range(n):
            t0 = time.time()
            res = runner.invoke(main, ["--ledger", ledger, "--workdir", workdir, *args])
            try:
                stages = json.loads(res.stdout).get("stages")   # submit/resubmit: how many
            except (ValueError, AttributeError):
                stages = None
            f.write(json.dumps({"cmd": args[0], "i": i, "exit": res.exit_code,
                                "seconds": time.time() - t0, "stages": stages, "stdout": res.stdout[-4000:],
                                "stderr": res.stderr[-2000:],
                                "exception": repr(res.exception) if res.exception and
                                res.exit_code not in (0, 1, 2) else None}) + "\n")
            f.flush()


if __name__ == "__main__":
    run(sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5:])
