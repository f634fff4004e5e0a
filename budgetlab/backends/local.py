"""The local executor: jobs as subprocesses of a detached runner, at most N at a time.

The CLI never waits for local jobs and the runner never opens the ledger (one writer).
They talk through files under <workdir>/local/:

    jobs/<id>.job.json     written once by `submit`: stage dirs, resources, what it waits for
    jobs/<id>.state.json   written by the runner only: state, times, exit code, pid
    jobs/<id>.cancel       written by `cancel`: the runner stops the job
    jobs/<id>.release      written by `sync`: start without waiting for `after` (its stage
                           completed although its job did not)
    runner.lock            flock held by the one live runner
    config.json            max_parallel

States mirror SLURM's words so that sync reads them the way it reads sacct: PENDING,
RUNNING, COMPLETED, FAILED, CANCELLED, and PENDING with reason DependencyNeverSatisfied
when the job it waits for did not complete.

    python -m budgetlab.backends.local WORKDIR      the runner (started by submit/sync)
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from budgetlab.backends.base import Backend, Poll, Unit
from budgetlab.datamodel import JobRecord
from budgetlab.stagedir import atomic_write_json

NAME = "local"
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
POLL_S = 0.3


def local_dir(workdir: Path) -> Path:
    return Path(workdir).resolve() / "local"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


class LocalBackend(Backend):
    name = NAME

    def __init__(self, workdir: Path, settings: dict | None = None):
        super().__init__(workdir, settings)
        self.dir = local_dir(self.workdir)
        self.max_parallel = int(self.settings.get("max_parallel") or 2)

    def _next_ids(self, n: int) -> list[str]:
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        with open(self.dir / "counter.lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.dir / "counter"
            start = int(path.read_text()) if path.exists() else 1
            path.write_text(str(start + n))
        return [f"L{i}" for i in range(start, start + n)]

    def submit(self, units: list[Unit], on_submitted=None) -> None:
        ids = self._next_ids(len(units))
        atomic_write_json(self.dir / "config.json", {"max_parallel": self.max_parallel})
        for u, jid in zip(units, ids):
            u.job_id = jid
        for u in units:
            dirs = u.stage_dirs(self.workdir)
            u.log_path = str(Path(dirs[0]) / "log" / f"{u.job_id}.log")
            after = u.parent_unit.job_id if u.parent_unit else u.after_job
            atomic_write_json(self.dir / "jobs" / f"{u.job_id}.job.json", {
                "job_id": u.job_id, "stage_dirs": dirs, "after": after,
                "resources": u.job_resources(), "log": u.log_path,
                "submitted_at": time.time(), "name": u.job_name})
        self.sbatch_calls += 1
        if on_submitted is not None:
            on_submitted(units)
        ensure_runner(self.workdir)

    def cancel(self, job_ids: list[str]) -> None:
        self._mark(job_ids, "cancel")

    def release(self, job_ids: list[str]) -> None:
        self._mark(job_ids, "release")

    def _mark(self, job_ids: list[str], what: str) -> None:
        (self.dir / "jobs").mkdir(parents=True, exist_ok=True)
        for jid in job_ids:
            (self.dir / "jobs" / f"{jid}.{what}").touch()
        ensure_runner(self.workdir)

    def poll(self, job_ids: list[str]) -> Poll:
        """The runner's state files, read as the scheduler records they stand for."""
        now = time.time()
        runs = {}
        for jid, st in read_states(self.workdir, job_ids).items():
            started = st.get("started_at")
            runs[jid] = [JobRecord(
                job_id=jid, raw_state=st.get("state", "PENDING"), reason=st.get("reason", ""),
                exit_code=st.get("exit_code", ""), submit=st.get("submitted_at"),
                start=started, end=st.get("ended_at"),
                elapsed=((st.get("ended_at") or now) - started) if started else 0.0,
                nodes=st.get("nodes", ""), cpus=int(st.get("cpus") or 1))]
        if any(r[0].raw_state in ("PENDING", "RUNNING") for r in runs.values()):
            ensure_runner(self.workdir)   # a runner that died or exited early is replaced
        return Poll(runs=runs)

    def find_by_name(self, names: list[str]) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        wanted = set(names)
        for p in (self.dir / "jobs").glob("*.job.json"):
            job = _read(p)
            if job and job.get("name") in wanted:
                out.setdefault(job["name"], []).append(job["job_id"])
        return out


def ensure_runner(workdir: Path) -> bool:
    """Start a runner unless one holds the lock. Returns True if one was started."""
    d = local_dir(workdir)
    d.mkdir(parents=True, exist_ok=True)
    with open(d / "runner.lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
    log = open(d / "runner.log", "ab")
    subprocess.Popen([sys.executable, "-m", "budgetlab.backends.local", str(workdir)],
                     stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True,
                     close_fds=True)
    log.close()
    return True


def read_states(workdir: Path, job_ids: list[str]) -> dict[str, dict]:
    """job id -> state record (what sync reads instead of sacct)."""
    jobs = local_dir(workdir) / "jobs"
    out = {}
    for jid in job_ids:
        st = _read(jobs / f"{jid}.state.json")
        if st is None:
            job = _read(jobs / f"{jid}.job.json")
            if job is not None:
                st = {"job_id": jid, "state": "PENDING", "reason": "None",
                      "submitted_at": job.get("submitted_at")}
        if st is not None:
            out[jid] = st
    return out


# -- the runner -------------------------------------------------------------------------------
class Runner:
    def __init__(self, workdir: Path):
        self.workdir = Path(workdir).resolve()
        self.dir = local_dir(self.workdir)
        self.jobs_dir = self.dir / "jobs"
        self.procs: dict[str, list[subprocess.Popen]] = {}
        self.logs: dict[str, object] = {}

    def max_parallel(self) -> int:
        cfg = _read(self.dir / "config.json") or {}
        return int(cfg.get("max_parallel") or 2)

    def state(self, jid: str) -> dict | None:
        return _read(self.jobs_dir / f"{jid}.state.json")

    def set_state(self, jid: str, **fields) -> None:
        st = self.state(jid) or {"job_id": jid}
        st.update(fields)
        atomic_write_json(self.jobs_dir / f"{jid}.state.json", st)

    def open_jobs(self) -> list[dict]:
        out = []
        for p in sorted(self.jobs_dir.glob("*.job.json"), key=lambda p: int(p.name[1:].split(".")[0])):
            job = _read(p)
            if job is None:
                continue
            st = self.state(job["job_id"])
            if st is None or st.get("state") not in TERMINAL:
                out.append(job)
        return out

    def step(self) -> bool:
        """One scheduling pass; False when nothing is left to do."""
        self.reap()
        jobs = self.open_jobs()
        for job in jobs:
            jid = job["job_id"]
            if (self.jobs_dir / f"{jid}.cancel").exists():
                self.kill(jid)
                self.set_state(jid, state="CANCELLED", ended_at=time.time(), reason="None")
        running = len(self.procs)
        for job in self.open_jobs():
            jid = job["job_id"]
            if jid in self.procs:
                continue
            st = self.state(jid) or {}
            if st.get("state") == "RUNNING":   # started by a runner that died
                if any(_alive(pid) for pid in st.get("pids", [])):
                    running += 1
                else:
                    self.set_state(jid, state="FAILED", exit_code="0:0", ended_at=time.time(),
                                   reason="the runner that started it exited")
                continue
            after = job.get("after")
            if after and not (self.jobs_dir / f"{jid}.release").exists():
                dep = self.state(after)
                dep_state = (dep or {}).get("state")
                never = (dep or {}).get("reason") == "DependencyNeverSatisfied"
                if never or (dep_state in TERMINAL and dep_state != "COMPLETED"):
                    self.set_state(jid, state="PENDING", reason="DependencyNeverSatisfied")
                    continue
                if dep_state != "COMPLETED":
                    continue
            if running >= self.max_parallel():
                continue
            self.launch(job)
            running += 1
        return bool(self.procs) or any(
            (self.state(j["job_id"]) or {}).get("reason") != "DependencyNeverSatisfied"
            for j in self.open_jobs())

    def launch(self, job: dict) -> None:
        jid, res = job["job_id"], job["resources"]
        world = int(res.get("nodes", 1)) * int(res.get("tasks_per_node") or 1)
        Path(job["log"]).parent.mkdir(parents=True, exist_ok=True)
        log = open(job["log"], "ab")
        port = _free_port()
        procs = []
        for rank in range(world):
            env = dict(os.environ, BUDGETLAB_LOCAL_JOB_ID=jid)
            if world > 1:
                env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                           LOCAL_WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                           MASTER_PORT=str(port))
            procs.append(subprocess.Popen(
                [sys.executable, "-u", "-m", "budgetlab.backends.job", *job["stage_dirs"]],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                start_new_session=True))
        self.procs[jid] = procs
        self.logs[jid] = log
        started = time.time()
        self.set_state(jid, state="RUNNING", reason="None", started_at=started,
                       deadline=started + float(res.get("time_min") or 1e9) * 60,
                       pids=[p.pid for p in procs], nodes=socket.gethostname(), cpus=world)

    def reap(self) -> None:
        now = time.time()
        for jid, procs in list(self.procs.items()):
            codes = [p.poll() for p in procs]
            if any(c is None for c in codes):
                if any(c not in (None, 0) for c in codes):   # one rank failed: stop the rest
                    self.kill(jid)
                st = self.state(jid) or {}
                if now > st.get("deadline", float("inf")) and st.get("state") == "RUNNING":
                    # The time limit, as SLURM would: SIGTERM lets the trainer checkpoint.
                    self.set_state(jid, state="TIMEOUT", ended_at=now, reason="TimeLimit")
                    self.kill(jid)
                continue
            code = next((c for c in codes if c != 0), 0)
            st = self.state(jid) or {}
            if st.get("state") not in ("CANCELLED", "TIMEOUT"):
                self.set_state(jid, state="COMPLETED" if code == 0 else "FAILED",
                               exit_code=f"{code}:0" if code >= 0 else f"0:{-code}",
                               ended_at=time.time())
            del self.procs[jid]
            self.logs.pop(jid).close()

    def kill(self, jid: str) -> None:
        for p in self.procs.get(jid, []):
            if p.poll() is None:
                try:
                    os.killpg(p.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass

    def run(self) -> None:
        """Work until nothing is left; one runner per workdir (flock)."""
        with open(self.dir / "runner.lock", "a+") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            idle_since = None
            while True:
                busy = self.step()
                if busy:
                    idle_since = None
                elif idle_since is None:
                    idle_since = time.time()
                elif time.time() - idle_since > 2.0:   # a late submit still gets picked up
                    break
                time.sleep(POLL_S)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m budgetlab.backends.local WORKDIR", file=sys.stderr)
        return 2
    Runner(Path(argv[0])).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
