"""A randomized fault campaign on the local 2-node SLURM (issue 11).

    BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh up
    set -a; eval "$(BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh env)"; set +a
    DS_ACCELERATOR=cpu .venv/bin/python bench/fault_campaign.py --runs 60 --seed 1

Each run submits a small grid (a tiny Llama, SFT + DPO, its own ledger, its workdir on a
tmpfs of its own) through the `budgetlab` CLI as separate processes and injects ONE real fault
at a random moment: kill -9 of one rank, kill-node, scancel, `scontrol requeue`, preemption by
an `urgent` job, a slurmctld restart, an eval whose data file is moved away (then restored),
the disk full at a checkpoint, kill -9 of `submit` mid-way, or two CLIs submitting overlapping
grids at once. Then it does what a user would: `status` (which syncs; through budgetlab.Lab,
the CLI's own code, to spare the jobs a CLI process every 2 s) until nothing is live, remove
the cause, `resubmit` (with `--state CANCELLED` only for what was cancelled), until
the grid is complete or the run's deadline passes.

Measured per run, from the outside (attempt rows through budgetlab.Lab, the stage
directories, squeue):
  completed     every stage of the grid(s) COMPLETED before the deadline
  lost          attempt rows seen during the run and gone at the end, or closed rows whose
                outcome changed afterwards
  orphans       budgetlab jobs in squeue once the grid settled that the ledger does not know
  untracked     jobs still in squeue whose attempt rows are all closed
  needless      training stages whose completing attempt started from step 0 although a
                complete checkpoint of the stage had been on disk before it started
  recovery_s    fault -> grid complete

Prints a table per fault kind and the last lines
  RESULT fault_campaign_completed_fraction X
  RESULT fault_campaign_lost_records N
  RESULT fault_campaign_orphan_jobs N
(--json FILE writes every run). Between runs the queue is drained and every node resumed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests" / "faults")]
from faultkit import CLI, job_pids, write_grid  # noqa: E402  (the fault suite's helpers)

KINDS = ("kill_rank", "kill_node", "scancel", "requeue", "preempt", "ctld_restart",
         "eval_fails", "disk_full", "kill_cli", "overlap")
TRAINING = ("sft", "dpo", "kto")

@dataclass
class Run:
    index: int
    kind: str
    completed: bool = False
    lost: int = 0
    orphans: int = 0
    untracked: int = 0
    needless: int = 0
    recovery_s: float | None = None
    resubmits: int = 0
    attempts: int = 0
    fault_at: str = ""          # what the fault hit (step, job, node, delay)
    note: str = ""


# -- the cluster ------------------------------------------------------------------------------
def sh(*args, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, args))}: {p.stderr.strip()}")
    return p


def cluster(*args) -> None:
    sh("bash", REPO / "slurm" / "cluster.sh", *args, check=True)


def squeue_jobs() -> dict[str, str]:
    """job id (array tasks one per line) -> job name, of every job in the queue."""
    out = sh("squeue", "-h", "-r", "-o", "%i %j").stdout
    return dict(line.split(None, 1) for line in out.splitlines() if line.strip())


def nodes_of(job_id: str) -> list[str]:
    nodelist = sh("squeue", "-h", "-j", job_id, "-o", "%N").stdout.strip()
    if not nodelist or nodelist == "(null)":
        return []
    return sh("scontrol", "show", "hostnames", nodelist).stdout.split()


def ctld_pid() -> int:
    return int((Path(os.environ["BUDGETLAB_SLURM_DIR"]) / "run" / "slurmctld.pid").read_text())


def ctld_up() -> bool:
    p = sh("scontrol", "ping", timeout=60)
    return p.returncode == 0 and "UP" in p.stdout


def all_nodes() -> list[str]:
    return sorted(set(sh("sinfo", "-h", "-N", "-o", "%N").stdout.split()))


def restore_cluster() -> None:
    """Between runs: the controller up, every node up, the queue empty."""
    if not ctld_up():
        sh("slurmctld", "-f", os.environ["SLURM_CONF"], check=True)
        wait(ctld_up, 60)
    for n in all_nodes():
        state = sh("sinfo", "-h", "-n", n, "-o", "%T").stdout.strip()
        if not state.startswith(("idle", "mix", "alloc")):
            cluster("revive-node", n)
    jobs = list(squeue_jobs())
    if jobs:
        sh("scancel", *jobs)
        wait(lambda: not squeue_jobs(), 90)


def wait(cond, timeout: float, poll: float = 0.5):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(poll)
    return None


# -- what the campaign watches --------------------------------------------------------------
class Watch:
    """Attempt rows and checkpoints as seen during the run, to judge the end against."""

    def __init__(self, cli: CLI):
        from budgetlab import Lab
        self.cli = cli
        self.lab = Lab(ledger=cli.ledger, workdir=cli.workdir)
        self.seen: dict[int, tuple[str, str | None]] = {}   # attempt -> (stage, closed outcome)
        self.changed: set[int] = set()
        self.status_error = ""                               # why the last status failed
        self.ckpt_seen: dict[str, float] = {}                # stage -> first complete ckpt seen

    def status(self, grid: str) -> dict | None:
        """What `budgetlab status GRID --json` prints (it syncs first), through the Python
        API the CLI calls: a poll every 2 s in a CLI process of its own would take CPU
        from the jobs. None while the grid is not registered or the ledger is busy."""
        if not self.cli.ledger.exists():
            return None
        try:
            return self.lab.status(grid, progress=False)
        except Exception as e:   # said in the run's note if the deadline passes
            self.status_error = f"{type(e).__name__}: {e}"[:150]
            return None

    def attempts(self) -> list:
        if not self.cli.ledger.exists():
            return []
        try:
            return self.lab.attempts()
        except Exception:      # a ledger being created by a submit: next look
            return []

    def look(self) -> None:
        from budgetlab.lifecycle import ENDED
        for a in self.attempts():
            closed = a.outcome if a.outcome in ENDED else None
            prev = self.seen.get(a.attempt_id)
            if prev and prev[1] is not None and prev[1] != closed:
                self.changed.add(a.attempt_id)
            if not prev or prev[1] is None:
                self.seen[a.attempt_id] = (a.stage_id, closed)
        stages = self.cli.workdir / "stages"
        if stages.is_dir():
            for sd in stages.iterdir():
                if sd.name in self.ckpt_seen:
                    continue
                ck = sd / "checkpoints"
                if ck.is_dir() and any((p / "meta.json").exists() for p in ck.glob("step-*")):
                    self.ckpt_seen[sd.name] = time.time()

    def lost(self) -> int:
        now = {a.attempt_id for a in self.attempts()}
        return len([i for i in self.seen if i not in now]) + len(self.changed)

    def needless(self) -> int:
        """Training stages whose completing attempt began from step 0 with a checkpoint there."""
        n = 0
        by_stage: dict[str, list] = {}
        for a in self.attempts():
            by_stage.setdefault(a.stage_id, []).append(a)
        for st in self.lab.stages():
            if st.kind not in TRAINING or st.state != "COMPLETED":
                continue
            atts = sorted(by_stage.get(st.stage_id, []), key=lambda a: a.attempt_id)
            done = next((a for a in reversed(atts) if a.outcome == "COMPLETED"), None)
            seen = self.ckpt_seen.get(st.stage_id)
            if done is None or seen is None or len(atts) < 2:
                continue
            resumed = int((st.result or {}).get("resumed_from_step") or 0)
            if resumed == 0 and done.started_at and seen < done.started_at - 1:
                n += 1
        return n

    def strays(self) -> tuple[list[str], list[str]]:
        """(orphans, untracked) after a settle of up to 30 s (a job that just ended can
        still be COMPLETING): budgetlab jobs in the queue that no attempt row knows, and
        those whose attempt rows are all closed although the job is still queued or running."""
        def look():
            atts = self.attempts()
            known = {a.job_id for a in atts if a.job_id}
            live = {a.job_id for a in atts if a.job_id and a.outcome in
                    ("SUBMITTING", "PENDING", "RUNNING")}
            jobs = {j: n for j, n in squeue_jobs().items() if n.startswith("bl-")}
            return ([f"{j} ({n})" for j, n in jobs.items() if j not in known],
                    [f"{j} ({n})" for j, n in jobs.items() if j in known and j not in live])
        left = look()
        end = time.time() + 30
        while (left[0] or left[1]) and time.time() < end:
            time.sleep(2)
            left = look()
        return left


def last_step(stage_dir: Path) -> int:
    """The step of the last complete line of the stage's train.jsonl (0 if none yet)."""
    try:
        with open(stage_dir / "log" / "train.jsonl", "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in reversed(lines):
        try:
            return int(json.loads(line)["step"])
        except (ValueError, KeyError, TypeError):
            continue    # a line being written, or cut by the seek
    return 0


# -- one run ----------------------------------------------------------------------------------
class Campaign:
    def __init__(self, root: Path, seed: int, deadline_s: float):
        self.root = root
        self.rng = random.Random(seed)
        self.deadline_s = deadline_s
        self.model = self._model()
        self.eval_rows = self._eval_rows()

    def _model(self) -> str:
        from budgetlab.train.tiny import make_llama
        return str(make_llama(self.root / "tiny", hidden=32, layers=1, heads=2))

    def _eval_rows(self) -> list[dict]:
        from budgetlab.tasks.arith import generate
        return generate("eval", 8)

    def grid(self, run_root: Path, name: str, *, nodes: int, fractions, budgets=(16,),
             long: bool = True, tasks: int | None = None) -> Path:
        """A small grid: SFT on 8 and 16 examples, DPO after the SFT of 8, a checkpoint every
        100 steps; the tiny model trains ~100 steps/s, so a stage lasts a few seconds, long
        enough for a fault to land in it."""
        eval_file = run_root / "arith_eval.jsonl"
        if not eval_file.exists():
            eval_file.write_text("".join(json.dumps(r) + "\n" for r in self.eval_rows))
        # Faults that do not aim at a training step (eval, submit, overlap) need no long stage.
        epochs = self.rng.choice((250, 350, 450)) if long else 40
        if tasks is None:
            tasks = 2 if nodes == 1 and self.rng.random() < 0.5 else 1
        # The fault suite's grid; nodes/ranks land in its [resources], then the eval file.
        return write_grid(run_root / f"{name}.toml", self.model, name=name, budgets=budgets,
                          fractions=fractions, epochs=epochs, every=100,
                          micro=4 // (nodes * tasks), extra=f"""
            nodes = {nodes}
            tasks_per_node = {tasks}
            [data.arith]
            eval = "{eval_file}"
            """)

    def run(self, index: int, kind: str) -> Run:
        run_root = Path(tempfile.mkdtemp(prefix=f"run{index:03d}-", dir=self.root))
        disk = run_root / "disk"
        disk.mkdir()
        sh("mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", disk, check=True)
        try:
            cli = CLI(run_root, env={"DS_ACCELERATOR": "cpu"})
            cli.workdir = disk / "runs"
            r = Run(index=index, kind=kind)
            try:
                getattr(self, f"_{kind}")(cli, run_root, r)
            except Exception as e:      # the campaign's own step failed: the run counts as lost
                r.note = f"{type(e).__name__}: {e}"[:200]
            return r
        finally:
            restore_cluster()
            sh("umount", "-l", disk)

    # The user's side: status until nothing is live, fix, resubmit; until complete.
    def settle(self, cli: CLI, watch: Watch, r: Run, grids: list[str], t_fault: float,
               fix=None, tick=None) -> None:
        end = t_fault + self.deadline_s
        fixed = False
        while time.time() < end:
            sts = []
            for g in grids:
                sts.append(watch.status(g))
            watch.look()
            if tick:
                tick()
            if all(st and st["active"] == 0 for st in sts):
                if all(st["stages_completed"] == st["stages_total"] for st in sts):
                    r.completed = True
                    r.recovery_s = time.time() - t_fault
                    break
                if fix and not fixed:
                    fix()
                    fixed = True
                if r.resubmits >= 4:
                    r.note = r.note or "still incomplete after 4 resubmits"
                    break
                for g, st in zip(grids, sts):
                    states = {s for v in st["stages"].values() for s in v}
                    args = ["resubmit", g]
                    if "CANCELLED" in states:       # what the user cancelled, on purpose
                        args += ["--state", ",".join(sorted(
                            states - {"COMPLETED", "BLOCKED", "NEW"}))]
                    cli(*args, timeout=300)
                r.resubmits += 1
            time.sleep(2)
        else:
            r.note = r.note or f"deadline ({self.deadline_s:.0f} s) passed" + (
                f"; last status error: {watch.status_error}" if watch.status_error else "")
        watch.look()
        r.lost = watch.lost()
        orphans, untracked = watch.strays()
        r.orphans, r.untracked = len(orphans), len(untracked)
        for what, jobs in (("orphans", orphans), ("untracked", untracked)):
            if jobs:
                r.note = (r.note + "; " if r.note else "") + f"{what}: {', '.join(jobs)}"
        r.needless = watch.needless()
        r.attempts = len(watch.attempts())

    def submit(self, cli: CLI, grid: Path) -> None:
        p = cli("submit", grid, "--executor", "slurm", timeout=300)
        if p.returncode != 0:
            raise RuntimeError(f"submit: {p.stderr.strip()[-200:]}")

    def running_training(self, cli: CLI, watch: Watch, frac: float, timeout: float = 240):
        """(stage id, job id, step) of a training stage past `frac` of its steps, from its
        stage directory (no sync: the ledger moves only when the user looks)."""
        def found():
            watch.look()
            latest = {a.stage_id: a for a in sorted(watch.attempts(),
                                                    key=lambda a: a.attempt_id)}
            sids = list(latest)
            self.rng.shuffle(sids)
            for sid in sids:
                sd = cli.workdir / "stages" / sid
                if not latest[sid].job_id or (sd / "result.json").exists():
                    continue
                try:
                    prog = json.loads((sd / "progress.json").read_text())
                except (OSError, ValueError):
                    continue
                # progress.json beats every 2 s, longer than a tiny stage's window: the step
                # comes from train.jsonl, one line per step.
                step, total = last_step(sd), int(prog.get("total_steps") or 0)
                if prog.get("phase") == "train" and total and frac * total <= step < total - 3:
                    return sid, latest[sid].job_id, step
            return None
        got = wait(found, timeout, poll=0.1)
        if not got:
            raise RuntimeError(f"no training stage reached {frac:.0%} of its steps")
        return got

    def _training_fault(self, cli, run_root, r, inject, fix=None, tick=None, nodes=1):
        g = self.grid(run_root, "f", nodes=nodes, fractions=(1.0, 0.5))
        watch = Watch(cli)
        self.submit(cli, g)
        sid, job, step = self.running_training(cli, watch, self.rng.uniform(0.05, 0.8))
        r.fault_at = f"step {step} of {sid[:8]}, job {job}"
        inject(job)
        self.settle(cli, watch, r, ["f"], time.time(), fix=fix, tick=tick)

    # -- the ten faults ---------------------------------------------------------------------
    def _kill_rank(self, cli, run_root, r):
        def inject(job):
            pids = wait(lambda: job_pids(job), 30, poll=0.2) or {}
            if not pids:
                raise RuntimeError(f"no rank of job {job} found")
            rank = self.rng.choice(sorted(pids))
            os.kill(pids[rank], signal.SIGKILL)
            r.fault_at += f", rank {rank} of {len(pids)}"
        self._training_fault(cli, run_root, r, inject)

    def _kill_node(self, cli, run_root, r):
        killed = []
        t = {}

        def inject(job):
            nodes = nodes_of(job)
            node = self.rng.choice(nodes)
            cluster("kill-node", node)
            killed.append(node)
            t["kill"] = time.time()
            r.fault_at += f", node {node} of {','.join(nodes)}"

        def revive(now: bool = False):   # the admin brings the node back 30-60 s later
            if killed and (now or time.time() - t["kill"] > t.setdefault(
                    "after", self.rng.uniform(30, 60))):
                cluster("revive-node", killed.pop())
        self._training_fault(cli, run_root, r, inject, fix=lambda: revive(now=True),
                             tick=revive, nodes=self.rng.choice((1, 2)))

    def _scancel(self, cli, run_root, r):
        self._training_fault(cli, run_root, r, lambda job: sh("scancel", job, check=True))

    def _requeue(self, cli, run_root, r):
        self._training_fault(cli, run_root, r,
                             lambda job: sh("scontrol", "requeue", job, check=True))

    def _preempt(self, cli, run_root, r):
        from tests.conftest import preemptor_args

        def inject(job):
            secs = self.rng.randint(2, 8)
            sh("sbatch", "--parsable", *preemptor_args(), "-J", "urgent-preemptor", "-o",
               "/dev/null", "--wrap", f"sleep {secs}", check=True)
            r.fault_at += f", urgent job of {secs} s"
        self._training_fault(cli, run_root, r, inject)

    def _ctld_restart(self, cli, run_root, r):
        def inject(job):
            pid, sig = ctld_pid(), self.rng.choice((signal.SIGTERM, signal.SIGKILL))
            os.kill(pid, sig)
            wait(lambda: not Path(f"/proc/{pid}").exists(), 30, poll=0.1)
            down = self.rng.uniform(2, 15)
            cli("status", "f", timeout=120)       # the user looks while it is down
            time.sleep(max(0.0, down - 1))
            sh("slurmctld", "-f", os.environ["SLURM_CONF"], check=True)
            wait(ctld_up, 60)
            r.fault_at += f", {sig.name}, down {down:.0f} s"
        self._training_fault(cli, run_root, r, inject)

    def _disk_full(self, cli, run_root, r):
        filler = cli.workdir.parent / "filler"

        def inject(job):
            with open(filler, "wb", buffering=0) as f:    # to the brim, then 96 KB back
                try:
                    while True:
                        f.write(b"\0" * (256 * 1024))
                except OSError:
                    pass
                f.truncate(max(0, f.tell() - 96 * 1024))

        def fix():
            filler.unlink(missing_ok=True)
        try:
            self._training_fault(cli, run_root, r, inject, fix=fix)
        finally:
            fix()

    def _eval_fails(self, cli, run_root, r):
        g = self.grid(run_root, "f", nodes=1, fractions=(1.0, 0.5), long=False)
        data = run_root / "arith_eval.jsonl"
        away = run_root / "arith_eval.away"
        watch = Watch(cli)
        self.submit(cli, g)
        delay = self.rng.uniform(0, 8)
        time.sleep(delay)
        data.rename(away)                       # the share is unreachable for a while
        r.fault_at = f"{delay:.1f} s after submit"
        self.settle(cli, watch, r, ["f"], time.time(),
                    fix=lambda: away.exists() and away.rename(data))
        if away.exists():
            away.rename(data)

    def _kill_cli(self, cli, run_root, r):
        g = self.grid(run_root, "f", nodes=1, fractions=(1.0, 0.5, 0.0), long=False)
        watch = Watch(cli)
        p = subprocess.Popen(cli.argv("submit", g, "--executor", "slurm"), env=cli.env,
                             cwd=cli.root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        delay = self.rng.uniform(0.3, 3.0)
        time.sleep(delay)
        p.send_signal(signal.SIGKILL)
        p.wait(60)
        r.fault_at = f"kill -9 {delay:.1f} s into submit"
        t_fault = time.time()
        watch.look()
        cli("status", "f", timeout=300)            # the user looks, then submits again
        p2 = cli("submit", g, "--executor", "slurm", timeout=300)
        if p2.returncode != 0:
            r.note = f"second submit: {p2.stderr.strip()[-150:]}"
        self.settle(cli, watch, r, ["f"], t_fault)

    def _overlap(self, cli, run_root, r):
        tasks = self.rng.choice((1, 2))
        g1 = self.grid(run_root, "f", nodes=1, fractions=(1.0, 0.5), long=False, tasks=tasks)
        g2 = self.grid(run_root, "g", nodes=1, fractions=(1.0, 0.25), long=False,
                       tasks=tasks)                                    # both hold SFT on 16
        watch = Watch(cli)
        procs = [subprocess.Popen(cli.argv("submit", g, "--executor", "slurm"), env=cli.env,
                                  cwd=cli.root, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True) for g in (g1, g2)]
        t_fault = time.time()
        errs = [p.communicate(timeout=300)[1] for p in procs]
        bad = [e.strip()[-150:] for p, e in zip(procs, errs) if p.returncode != 0]
        r.fault_at = "two submits at once"
        if bad:
            r.note = f"a submit failed: {bad[0]}"
        self.settle(cli, watch, r, ["f", "g"], t_fault)


# -- the campaign -----------------------------------------------------------------------------
def schedule(runs: int, rng: random.Random, kinds=KINDS) -> list[str]:
    """Every kind as evenly as `runs` allows, in a random order."""
    out = []
    while len(out) < runs:
        block = list(kinds)
        rng.shuffle(block)
        out += block
    return out[:runs]


def table(results: list[Run]) -> str:
    head = (f"{'fault':<13} {'runs':>4} {'completed':>9} {'lost':>4} {'orphans':>7} "
            f"{'untracked':>9} {'needless':>8} {'recovery s (median, max)':>25}")
    lines = [head, "-" * len(head)]
    for kind in KINDS:
        rs = [r for r in results if r.kind == kind]
        if not rs:
            continue
        rec = sorted(r.recovery_s for r in rs if r.recovery_s is not None)
        recs = f"{rec[len(rec) // 2]:.0f}, {rec[-1]:.0f}" if rec else "-"
        lines.append(f"{kind:<13} {len(rs):>4} {sum(r.completed for r in rs):>9} "
                     f"{sum(r.lost for r in rs):>4} {sum(r.orphans for r in rs):>7} "
                     f"{sum(r.untracked for r in rs):>9} {sum(r.needless for r in rs):>8} {recs:>25}")
    return "\n".join(lines)


def campaign(runs: int, seed: int, deadline_s: float = 420, kinds=KINDS, root: Path | None = None,
             log=print) -> list[Run]:
    if not os.environ.get("SLURM_CONF") or "BUDGETLAB_SLURM_DIR" not in os.environ:
        raise SystemExit("fault_campaign: the local cluster's environment is not set: "
                         "set -a; eval \"$(BUDGETLAB_SLURM_NODES=2 bash slurm/cluster.sh env)\"")
    if len(all_nodes()) < 2:
        raise SystemExit("fault_campaign: needs 2 nodes (BUDGETLAB_SLURM_NODES=2 bash "
                         "slurm/cluster.sh up)")
    root = Path(root or tempfile.mkdtemp(prefix="fault-campaign-"))
    restore_cluster()
    camp = Campaign(root, seed, deadline_s)
    results = []
    for i, kind in enumerate(schedule(runs, random.Random(seed), kinds)):
        t0 = time.time()
        r = camp.run(i, kind)
        results.append(r)
        log(f"run {i:3d} {kind:<13} completed={r.completed!s:<5} lost={r.lost} "
            f"orphans={r.orphans} untracked={r.untracked} needless={r.needless} resubmits={r.resubmits} "
            f"attempts={r.attempts} {time.time() - t0:.0f}s  [{r.fault_at}] {r.note}")
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=len(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--deadline", type=float, default=420, help="seconds per run, from the fault")
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated subset")
    ap.add_argument("--json", type=Path, help="write every run here")
    args = ap.parse_args()
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    bad = [k for k in kinds if k not in KINDS]
    if bad or args.runs < 1:
        print(f"fault_campaign: --kinds: unknown {', '.join(bad)} (known: {', '.join(KINDS)})"
              if bad else "fault_campaign: --runs must be at least 1", file=sys.stderr)
        raise SystemExit(2)
    t0 = time.time()
    results = campaign(args.runs, args.seed, args.deadline, kinds)
    print()
    print(table(results))
    print(f"\n{len(results)} runs in {(time.time() - t0) / 60:.1f} min (seed {args.seed})")
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
    print(f"RESULT fault_campaign_completed_fraction "
          f"{sum(r.completed for r in results) / len(results):.3f}")
    print(f"RESULT fault_campaign_lost_records {sum(r.lost for r in results)}")
    print(f"RESULT fault_campaign_orphan_jobs {sum(r.orphans for r in results)}")


if __name__ == "__main__":
    main()
