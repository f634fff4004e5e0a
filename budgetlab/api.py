"""The Python API: what the `budgetlab` commands do, for notebooks and scripts.

    from budgetlab import Lab
    lab = Lab(ledger="ledger.db", workdir="runs")
    lab.plan("jobs/quickstart.toml")          # dict: points, stages, spend, GPU-hours
    lab.run("jobs/quickstart.toml")           # local executor, waits, returns the Report
    rep = lab.report("quickstart")            # budgetlab.report.Report
    rep.to_records()                          # the `report --json` cells
    rep.to_pandas()                           # a DataFrame (pandas installed)

The methods have the names of the CLI commands (`plan`, `submit`, `run`, `sync`, `status`,
`resubmit`, `cancel`, `report`, `recommend`, `search`, `logs`) and of `ledger`'s listings (`points`,
`stages`, `attempts`, `spend`, `sql`, `metadata`); the CLI parses arguments, calls them
and prints.
They return the data model's objects (budgetlab.datamodel: Grid, Cell, Point, Stage,
Attempt), the library's result objects (SubmitResult, SyncReport, Report) or plain dicts.
Bad input raises budgetlab.errors.BadInput (the CLI's exit code 2), a failed run
RuntimeFailure (exit code 1).

A GRID argument is a grid spec file (plan, submit, run) or, for the commands that read the
ledger, either a spec file (its `name` is used) or a grid name already registered.
"""

from __future__ import annotations

import time
from pathlib import Path

from budgetlab.errors import BadInput, RuntimeFailure

__all__ = ["Lab", "load_plan", "grid_name", "datasette_metadata"]


def load_plan(grid):
    """Parse + validate a grid spec and build its stage graph (BadInput on bad specs).
    `grid` is a path or an already built Plan."""
    if hasattr(grid, "stages") and hasattr(grid, "cells"):
        return grid
    from budgetlab.graph import PoolTooSmall, build_plan, check_pool_sizes
    from budgetlab.spec import load_spec
    from budgetlab.tasks import TaskDataError, check_local_sources

    spec = load_spec(grid)
    for task, data in spec.data.items():
        try:
            check_local_sources(task, data)
        except TaskDataError as e:
            raise BadInput(f"{spec.path}: data.{task}: {e}") from None
    plan = build_plan(spec)
    try:  # before anything is written: a budget the data cannot serve never reaches a job
        check_pool_sizes(plan)
    except (PoolTooSmall, TaskDataError) as e:
        raise BadInput(f"{spec.path}: {e}") from None
    return plan


def grid_name(grid) -> str:
    """GRID is a grid spec file (its name is used), a Plan, or a grid name in the ledger."""
    if hasattr(grid, "name") and not isinstance(grid, (str, Path)):
        return grid.name
    p = Path(grid)
    if p.suffix == ".toml" or p.is_file():
        from budgetlab.spec import load_spec
        return load_spec(p).name
    return str(grid)


class Lab:
    """One ledger and one workdir: the state every command works on."""

    def __init__(self, ledger: str | Path = "ledger.db", workdir: str | Path = "runs"):
        self.ledger_path = Path(ledger)
        self.workdir = Path(workdir)
        self._led = None

    def __repr__(self) -> str:
        return f"Lab(ledger={str(self.ledger_path)!r}, workdir={str(self.workdir)!r})"

    # -- the ledger ------------------------------------------------------------------------
    def ledger(self, create: bool = False):
        """The budgetlab.ledger.Ledger (opened once; create=True makes a new file)."""
        if self._led is None:
            from budgetlab.ledger import Ledger
            self._led = Ledger(self.ledger_path, create=create)
        return self._led

    def _grid(self, grid) -> str:
        """The grid's name, checked to be registered (BadInput otherwise)."""
        name = grid_name(grid)
        self.ledger().grid(name)
        return name

    # -- planning and running ----------------------------------------------------------------
    def plan(self, grid) -> dict:
        """Points, unique stages, shared SFT, annotation spend, GPU-hours. Writes nothing."""
        from budgetlab.estimate import plan_summary
        return plan_summary(load_plan(grid))

    def submit(self, grid, executor: str = "local"):
        """Register GRID's cells/points/stages and submit every pending stage; returns the
        orchestrate.SubmitResult at once (the jobs run on their own)."""
        from budgetlab.orchestrate import submit
        plan = load_plan(grid)
        return submit(self.ledger(create=True), plan, self.workdir, executor=executor)

    def run(self, grid, timeout: float | None = None, poll: float = 1.0, metric=None,
            on_submit=None, on_progress=None, check: bool = True):
        """Submit GRID on the local executor, wait until nothing runs (or `timeout` seconds;
        the jobs keep running), and return its Report, with the last status dict as
        `report.status`. on_submit(plan, SubmitResult) is called once submitted,
        on_progress(status_dict) after every sync (`status(grid)`'s dict, with `running`
        and `tracking`). With check=True a failed stage raises RuntimeFailure after the
        wait; the exception carries `.report`."""
        from budgetlab.lifecycle import ENDED, NEW

        plan = load_plan(grid)
        res = self.submit(plan, executor="local")
        if on_submit is not None:
            on_submit(plan, res)
        st = self.wait(plan.name, poll=poll, timeout=timeout, on_progress=on_progress)
        rep = self.report(plan.name, metric=metric)
        rep.status = st
        failed = {s: n for v in st["stages"].values() for s, n in v.items()
                  if s in (*ENDED, NEW) and s != "COMPLETED"}
        if check and failed:
            err = RuntimeFailure(f"{plan.name}: " + ", ".join(
                f"{n} stage(s) {s}" for s, n in sorted(failed.items()))
                + f" (see `budgetlab status {plan.name}`, `budgetlab logs ID`)")
            err.report = rep
            raise err
        return rep

    def wait(self, grid, poll: float = 1.0, timeout: float | None = None,
             on_progress=None) -> dict:
        """Sync until no stage of GRID is queued or running; the last status dict."""
        name = self._grid(grid)
        start = time.time()
        while True:
            self.sync()
            st = self.status(name, sync=False, progress=on_progress is not None)
            if on_progress is not None:
                on_progress(st)
            if st["active"] == 0 or (timeout is not None and time.time() - start > timeout):
                return st
            time.sleep(poll)

    def sync(self):
        """Read scheduler states and stage results into the ledger (sync.SyncReport)."""
        from budgetlab.sync import sync
        return sync(self.ledger(), self.workdir)

    def status(self, grid=None, sync: bool = True, progress: bool = True):
        """One grid's status dict (see budgetlab.status), or a list of them for every grid
        when GRID is None. progress=True adds `running` (step/total, loss, tokens/s, ETA of
        each running stage, from its progress.json) and `tracking` (the runs of tracked
        stages, and the `wandb sync` command for offline ones)."""
        from budgetlab.status import status
        led = self.ledger()
        names = [self._grid(grid)] if grid is not None else [g.name for g in led.grids()]
        if not names:
            raise BadInput(f"{self.ledger_path}: no grid registered yet (budgetlab submit GRID)")
        if sync:
            self.sync()
        out = []
        for n in names:
            st = status(led, n)
            if progress:
                st.update(self.progress(n))
            out.append(st)
        return out[0] if grid is not None else out

    def progress(self, grid) -> dict:
        """{"running": [...], "tracking": {...}} of GRID: live progress of its running
        stages and its tracking runs (read from the stage directories; no sync)."""
        from budgetlab.progress import live_progress
        return live_progress(self.ledger(), self.workdir, self._grid(grid))

    def resubmit(self, grid=None, states=None, executor: str | None = None,
                 dry_run: bool = False, sync: bool = True) -> tuple:
        """Failed stages again (escalated) and the blocked stages below them:
        (SubmitResult, [{stage_id, kind, outcome, changes}])."""
        from budgetlab.lifecycle import RESUBMIT_DEFAULT
        from budgetlab.orchestrate import resubmit
        name = self._grid(grid) if grid is not None else None
        if isinstance(states, str):
            states = [states]
        chosen = tuple(x.strip().upper() for s in (states or ()) for x in s.split(",")
                       if x.strip()) or RESUBMIT_DEFAULT
        if sync and not dry_run:
            self.sync()
        return resubmit(self.ledger(), self.workdir, grid=name, states=chosen,
                        executor=executor, dry_run=dry_run)

    def cancel(self, grid=None, point: str | None = None) -> list:
        """Stop queued/running work of a grid (or one point); the cancelled Attempts."""
        from budgetlab.orchestrate import cancel
        name = self._grid(grid) if grid is not None else None
        return cancel(self.ledger(), self.workdir, grid=name, point=point)

    def logs(self, ident: str, lines: int = 40) -> dict:
        """Path and tail of the log of a stage's or a point's latest attempt."""
        from budgetlab.orchestrate import logs
        return logs(self.ledger(), self.workdir, ident, lines=lines)

    # -- results ---------------------------------------------------------------------------
    def report(self, grid, metric: str | None = None, cost=None, sync: bool = False):
        """The Report of GRID (budgetlab.report.Report: .cells, .best, .to_records(),
        .to_pandas(), .to_json()). cost re-prices: "sft=2,pair=1" or {"sft": 2, "pair": 1}."""
        from budgetlab.report import build_report
        costs = _costs(cost)
        name = self._grid(grid)
        if sync:
            self.sync()
        return build_report(self.ledger(), name, metric=metric, costs=costs)

    def recommend(self, grid, budget: float, metric: str | None = None, cost=None,
                  top: int = 3, sync: bool = False, epsilon: float = 0.05) -> dict:
        """The best split at `budget` from the measured points, its epsilon-band with the
        points it rests on, and the next runs worth paying for (`recommend --json`)."""
        from budgetlab.recommend import recommend
        return recommend(self.report(grid, metric=metric, cost=cost, sync=sync), budget,
                         top=top, epsilon=epsilon)

    def search(self, grid, eta: int = 3, borrow: bool = True, z: float = 0.5,
               all_seeds: bool = False, seed: int | None = None, epsilon: float = 0.05,
               max_gpu_hours: float | None = None, transfer_from=None,
               executor: str = "local", poll: float = 1.0, timeout: float | None = None,
               on_round=None) -> dict:
        """Find the best split per budget of GRID, and its epsilon-band (the splits within
        (1 - epsilon) of the best), while measuring only part of it (budgetlab.search:
        successive halving over (method, SFT share) per budget, seeds as the fidelity, pools
        and seed noise borrowed from the budgets below). It stops when every budget's band
        is separated from the rest given the seed spread, when the finalists have every
        seed, or at `max_gpu_hours` (GPU-hours, CPU-hours where no GPU was used), and says
        which. `transfer_from`: a grid of a smaller model, measured in this ledger (fully or
        by search), whose bands are the prior: GRID gets only the points that confirm them.
        Registers the grid, runs round after round on `executor` and waits for each; the
        dict of `search --json`. Measured cells are ordinary ledger points."""
        from budgetlab.search import Strategy, search
        plan = load_plan(grid)
        strategy = Strategy(eta=eta, borrow=borrow, z=z, all_seeds=all_seeds, seed=seed,
                            epsilon=epsilon)
        strategy.check()          # bad input before anything is written
        if max_gpu_hours is not None and not (isinstance(max_gpu_hours, (int, float))
                                              and max_gpu_hours > 0):
            raise BadInput(f"--max-gpu-hours: must be a positive number, got {max_gpu_hours!r}")
        priors, source = None, None
        if transfer_from is not None:
            priors, source = self._priors(transfer_from, plan, epsilon)
        return search(self.ledger(create=True), plan, self.workdir, strategy,
                      executor=executor, poll=poll, timeout=timeout, on_round=on_round,
                      max_hours=max_gpu_hours, priors=priors, transfer_from=source)

    def _priors(self, small, plan, epsilon: float):
        """The bands of the small model's grid, from what this ledger measured of it."""
        from budgetlab.report import build_report
        from budgetlab.search import priors_from
        where = f"--transfer-from {small}"
        try:
            name = grid_name(small)
        except BadInput as exc:
            raise BadInput(f"{where}: {exc}") from None
        if not self.ledger_path.exists() or name not in {g.name for g in self.grids()}:
            raise BadInput(f"{where}: grid {name!r} is not in the ledger {self.ledger_path}; "
                           f"measure it first (`budgetlab search {small}` or `run`)")
        if name == plan.name:
            raise BadInput(f"{where}: that is the grid being searched; give the small model's")
        rep = build_report(self.ledger(), name)
        models = sorted({g["model"] for g in rep.groups if g["score_mean"] is not None})
        if len(models) != 1:
            raise BadInput(f"{where}: needs measured cells of exactly one model, found "
                           f"{len(models)} ({', '.join(models) or 'none'})")
        tasks = {g["task"] for g in rep.groups if g["score_mean"] is not None}
        if not tasks & set(plan.spec.tasks):
            raise BadInput(f"{where}: it measured {', '.join(sorted(tasks))}, none of this "
                           f"grid's tasks ({', '.join(plan.spec.tasks)})")
        priors = priors_from(rep.groups, epsilon)
        return priors, f"{name} ({models[0]})"

    # -- the ledger's listings ------------------------------------------------------------
    def grids(self) -> list:
        """Registered grids (datamodel.Grid)."""
        return self.ledger().grids()

    def cells(self, grid, active_only: bool = True) -> list:
        """The grid's cells (datamodel.Cell)."""
        return self.ledger().cells(self._grid(grid), active_only=active_only)

    def points(self, grid=None) -> list[dict]:
        """Points with the state of each of their stages (dicts, as `ledger points`)."""
        led = self.ledger()
        ids = None if grid is None else set(led.grid_point_ids(self._grid(grid)))
        return led.point_status(ids)

    def stages(self, grid=None, states=None) -> list:
        """Stages (datamodel.Stage), of one grid and/or in some states."""
        name = self._grid(grid) if grid is not None else None
        if isinstance(states, str):
            states = [states]
        return self.ledger().stages(grid=name,
                                    states={s.upper() for s in states} if states else None)

    def attempts(self, stage: str | None = None) -> list:
        """Every try of every stage (or of one), as datamodel.Attempt."""
        return self.ledger().attempts(stage_id=stage)

    def spend(self, grid=None) -> list[dict]:
        """Annotation spend and compute per grid, task and method."""
        from budgetlab.status import spend
        return spend(self.ledger(), grid_name(grid) if grid is not None else None)

    def metadata(self) -> dict:
        """Datasette metadata for this ledger: `datasette LEDGER --metadata FILE`."""
        return datasette_metadata(self.ledger_path)

    def sql(self, query: str) -> list[dict]:
        """One read-only SELECT; rows as dicts."""
        from budgetlab.ledger import query_readonly
        cols, rows = query_readonly(self.ledger_path, query)
        return [dict(zip(cols, r)) for r in rows]


def datasette_metadata(ledger_path: str | Path) -> dict:
    """Datasette metadata describing the ledger's tables and columns, keyed for this file
    (Datasette names a database after its file's stem)."""
    import json
    desc = json.loads((Path(__file__).parent / "ledger" / "datasette.json").read_text())
    return {"title": desc["title"], "description": desc["description"],
            "databases": {Path(ledger_path).stem: {"tables": desc["tables"]}}}


def _costs(cost) -> dict | None:
    if cost is None:
        return None
    from budgetlab.report import parse_costs
    if isinstance(cost, str):
        return parse_costs(cost)
    if isinstance(cost, dict):
        unknown = set(cost) - {"sft", "pair"}
        if unknown:
            raise BadInput(f"cost: unknown key(s) {', '.join(sorted(unknown))} "
                           f"(expected sft, pair)")
        return parse_costs(",".join(f"{k}={v}" for k, v in cost.items()))
    raise BadInput(f"cost: expected 'sft=X,pair=Y' or a dict, got {type(cost).__name__}")
