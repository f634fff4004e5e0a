"""SLURM through submitit: arrays, dependencies, one batched sacct per sync, scancel.

Submission: units are grouped into arrays by (stage kind, resources). A unit whose parent
unit sits at index i of array P goes at index i of a child array submitted with
`--dependency=aftercorr:P`, so task i waits for task i only (DESIGN section 7); siblings of
one parent go to separate child arrays (its first child in the first, and so on). Root
arrays are split at MaxArraySize. Every value reaches sbatch as an `#SBATCH --key=value`
line written by submitit (shlex-quoted), never through a shell command line.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import submitit
from submitit.core import utils as submitit_utils
from submitit.slurm.slurm import SlurmJob

from budgetlab.backends.base import Backend, Poll, Unit
from budgetlab.backends.job import StageJob
from budgetlab.datamodel import JobRecord
from budgetlab.errors import BadInput, RuntimeFailure
from budgetlab.spec import signal_before_s, slurm_time_min

NAME = "slurm"
DEFAULT_MAX_ARRAY_SIZE = 1001   # SLURM's default MaxArraySize


class ArrayExecutor(submitit.SlurmExecutor):
    """submitit's SlurmExecutor, with arrays at chosen (sparse) indices."""

    def submit_indexed(self, fns: list, indices: list[int], parallelism: int) -> str:
        """Submit fns[k] as array task indices[k]; returns the array job id."""
        folder = submitit_utils.JobPaths.get_first_id_independent_folder(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        timeout_min = self.parameters.get("time", 5)
        tmp = []
        for fn in fns:
            d = submitit_utils.DelayedSubmission(fn)
            d.set_timeout(timeout_min, self.max_num_timeout)
            path = folder / f"{uuid.uuid4().hex}.pkl"
            d.dump(path)
            tmp.append(path)
        ex = ArrayExecutor(self.folder, self.max_num_timeout, python=self.python)
        ex.update_parameters(**self.parameters)
        ex.parameters["map_count"] = len(fns)
        extra = dict(ex.parameters.get("additional_parameters") or {})
        extra["array"] = ",".join(map(str, indices)) + f"%{max(1, min(parallelism, len(fns)))}"
        ex.parameters["additional_parameters"] = extra
        first = ex._submit_command(self._submitit_command_str)
        for i, path in zip(indices, tmp):
            job = SlurmJob(folder=self.folder, job_id=f"{first.job_id}_{i}")
            job.paths.move_temporary_file(path, "submitted_pickle")
        return first.job_id


def log_path(folder: Path, job_id: str) -> str:
    return str(submitit_utils.JobPaths(folder, job_id=job_id, task_id=0).stdout)


def sbatch_parameters(res: dict, settings: dict, job_name: str) -> dict:
    """submitit parameters for one array: resources of the unit + the spec's [slurm]."""
    gpus = int(res.get("gpus_per_node") or 0)
    time_min = slurm_time_min(res)
    params = {
        "job_name": job_name, "nodes": int(res.get("nodes", 1)),
        "ntasks_per_node": int(res.get("tasks_per_node") or max(gpus, 1)),
        "cpus_per_task": int(res.get("cpus_per_task", 1)),
        "mem": f"{max(1, math.ceil(float(res['mem_gb']) * 1024))}MB",
        "time": time_min,
        "signal_delay_s": signal_before_s(res),
        "stderr_to_stdout": True,
    }
    if gpus:
        params["gpus_per_node"] = gpus
    for key in ("partition", "account", "qos", "constraint"):
        if settings.get(key):
            params[key] = settings[key]
    exclude = [x for x in (settings.get("exclude") or "").split(",") +
               (res.get("exclude") or "").split(",") if x]
    if exclude:
        params["exclude"] = ",".join(dict.fromkeys(exclude))
    extra = {}
    for opt in settings.get("extra_sbatch") or []:
        m = re.fullmatch(r"--?([A-Za-z][\w-]*)(?:[= ](.*))?", opt.strip())
        if not m:
            raise BadInput(f"slurm.extra_sbatch: {opt!r}: expected --option or --option=value")
        extra[m.group(1).replace("-", "_")] = True if m.group(2) is None else m.group(2)
    if extra:
        params["additional_parameters"] = extra
    return params


@dataclass
class _Array:
    key: tuple
    units: list[Unit]
    indices: list[int]
    dependency: str | None


class SlurmBackend(Backend):
    name = NAME

    def __init__(self, workdir: Path, settings: dict | None = None):
        super().__init__(workdir, settings)
        self.folder = self.workdir / "submitit"
        self.setup: list[str] = []

    def _executor(self) -> ArrayExecutor:
        """A fresh executor: parameters of one array never leak into the next."""
        try:
            return ArrayExecutor(folder=self.folder)
        except RuntimeError as e:
            raise RuntimeFailure(f"executor slurm: {e} (start one with slurm/cluster.sh up, "
                                 f"or use --executor local)") from None

    def snapshot_code(self) -> Path:
        """A copy of the budgetlab package that queued jobs import instead of the live tree
        ([slurm] snapshot_code = true): editing the code while jobs wait changes nothing."""
        import hashlib
        import shutil

        src = Path(__file__).resolve().parents[1]   # the budgetlab package
        h = hashlib.sha256()
        for f in sorted(src.rglob("*.py")):
            h.update(str(f.relative_to(src)).encode())
            h.update(f.read_bytes())
        dest = self.workdir / "code" / h.hexdigest()[:12]
        if not (dest / "budgetlab").exists():
            tmp = dest.with_name(dest.name + ".tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src, tmp / "budgetlab",
                            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            tmp.rename(dest)
        return dest

    def submit(self, units: list[Unit], on_submitted=None) -> None:
        """Give every unit a job id ("A_i"): arrays in dependency waves; on_submitted(units)
        right after each sbatch, so that the ids are recorded before the next one."""
        self._executor()  # fails early with a clear message when SLURM is absent
        self.setup = []
        if self.settings.get("snapshot_code"):
            import shlex
            code = self.snapshot_code()
            self.setup = [f"export PYTHONPATH={shlex.quote(str(code))}${{PYTHONPATH:+:$PYTHONPATH}}"]
        max_size = int(self.settings.get("max_array_size") or DEFAULT_MAX_ARRAY_SIZE)
        parallel = int(self.settings.get("array_parallelism") or 64)
        pending = list(units)
        while pending:
            ready = [u for u in pending if u.parent_unit is None or u.parent_unit.job_id]
            if not ready:
                raise RuntimeFailure("executor slurm: dependency cycle among units")
            for arr in self._arrays(ready, max_size):
                self._submit_array(self._executor(), arr, parallel)
                if on_submitted is not None:
                    on_submitted(arr.units)
            pending = [u for u in pending if u.job_id is None]

    def _arrays(self, units: list[Unit], max_size: int) -> list[_Array]:
        groups: dict[tuple, _Array] = {}
        roots: dict[tuple, list[Unit]] = {}
        for u in units:
            shape = (u.kind, json.dumps(u.resources, sort_keys=True))  # evals ride along
            parent_job = u.parent_unit.job_id if u.parent_unit else u.after_job
            if parent_job is None:
                roots.setdefault(shape, []).append(u)
                continue
            base, _, idx = parent_job.partition("_")
            if not idx.isdigit():       # not an array task: plain afterok, one array per parent
                key = shape + ("afterok", parent_job)
                arr = groups.setdefault(key, _Array(key, [], [], f"afterok:{parent_job}"))
                arr.units.append(u)
                arr.indices.append(len(arr.indices))
                continue
            rank = 0   # the rank-th child of that parent task goes to the rank-th child array
            while (key := shape + ("aftercorr", base, rank)) in groups and \
                    int(idx) in groups[key].indices:
                rank += 1
            arr = groups.setdefault(key, _Array(key, [], [], f"aftercorr:{base}"))
            arr.units.append(u)
            arr.indices.append(int(idx))
        out = list(groups.values())
        for shape, us in roots.items():
            for start in range(0, len(us), max_size):
                chunk = us[start:start + max_size]
                out.append(_Array(shape, chunk, list(range(len(chunk))), None))
        return out

    def _submit_array(self, ex: ArrayExecutor, arr: _Array, parallel: int) -> None:
        head = arr.units[0]
        name = head.job_name or f"bl-{head.kind}"
        res = head.job_resources()
        for u in arr.units[1:]:   # the longest member sets the array's limits
            r = u.job_resources()
            res["time_min"] = max(res["time_min"], r["time_min"])
            res["mem_gb"] = max(res["mem_gb"], r["mem_gb"])
        params = sbatch_parameters(res, self.settings, name)
        if self.setup:   # run the snapshot: nothing in the job's cwd may shadow it
            params["setup"] = self.setup
            params.setdefault("additional_parameters", {})["chdir"] = str(self.workdir)
        if arr.dependency:
            params["dependency"] = arr.dependency
        ex.update_parameters(**params)
        # submitit's own cap on timeout requeues, before our handler takes over in the job
        ex.max_num_timeout = int(res.get("max_requeues", 3))
        fns = [StageJob(u.stage_dirs(self.workdir)) for u in arr.units]
        self.sbatch_calls += 1
        try:
            job = ex.submit_indexed(fns, arr.indices, parallel)
        except (submitit_utils.FailedJobError, subprocess.CalledProcessError, OSError) as e:
            raise RuntimeFailure(f"sbatch failed: {str(e).strip().splitlines()[-1]}") from None
        for u, i in zip(arr.units, arr.indices):
            u.job_id = f"{job}_{i}"
            u.log_path = log_path(self.folder, u.job_id)

    # -- the scheduler's side ------------------------------------------------------------
    def cancel(self, job_ids: list[str]) -> None:
        for i in range(0, len(job_ids), 500):
            subprocess.run(["scancel", *job_ids[i:i + 500]], capture_output=True, text=True,
                           timeout=120)

    def release(self, job_ids: list[str]) -> None:
        """Drop the dependency of jobs whose parent stage completed although its job did not
        (e.g. killed after writing result.json): they would wait for ever otherwise."""
        for jid in job_ids:
            subprocess.run(["scontrol", "update", f"JobId={jid}", "Dependency="],
                           capture_output=True, text=True, timeout=60)

    def poll(self, job_ids: list[str]) -> Poll:
        """Every run of these jobs: one sacct call and at most one squeue call (squeue alone
        where accounting is disabled)."""
        global _said_no_accounting
        out = Poll(runs={})
        down = controller_down()
        if down:
            # sacct still answers (slurmdbd), but what it says about running jobs is frozen
            # and jobs cannot end or start: nothing is judged lost until it is back.
            out.controller_down = down
            out.notes.append(f"warning: the SLURM controller does not answer ({down}); "
                             f"scheduler states are from accounting and may be stale, "
                             f"nothing is marked MISSING until it is back")
        try:
            out.sacct_calls += 1
            out.runs = sacct(job_ids)
        except AccountingDisabled as e:
            if not _said_no_accounting:
                out.notes.append(f"SLURM accounting is disabled ({e}): using squeue and the "
                                 f"stage directories; a job that leaves the queue without "
                                 f"result.json or error.json becomes MISSING")
                _said_no_accounting = True
            out.squeue_calls += 1
            out.accounting = False
            out.runs = squeue(job_ids)
        if out.accounting:
            # At most one squeue call, for two kinds of jobs: those not in accounting yet (a
            # held job is sent there once eligible), and those waiting on a dependency: sacct
            # keeps the Reason a pending job had when it was recorded ("Dependency"), not
            # DependencyNeverSatisfied once its parent's job failed; without the live reason
            # a child whose parent completed before its job was killed waits for ever.
            # A third kind: runs that ended PREEMPTED or NODE_FAIL, which SLURM may requeue.
            # The controller requeues at once (the job is PENDING again); one it lists as
            # ended for good (until MinJobAge) gets no new run, so nothing waits the grace.
            unknown = [j for j in job_ids if j not in out.runs]
            waiting = [] if down else [
                j for j, runs in out.runs.items() if runs and runs[-1].raw_state == "PENDING"
                and runs[-1].reason.startswith("Dependency")]
            interrupted = [] if down else [
                j for j, runs in out.runs.items() if runs and runs[-1].raw_state in
                ("PREEMPTED", *NODE_FAIL_STATES)]
            if unknown or waiting or interrupted:
                out.squeue_calls += 1
                live = squeue(unknown + waiting + interrupted)
                out.runs.update({j: live[j] for j in unknown if j in live})
                for j in waiting:
                    if live.get(j):
                        last = dataclasses.replace(out.runs[j][-1], reason=live[j][-1].reason)
                        out.runs[j] = [*out.runs[j][:-1], last]
                for j in interrupted:
                    last = out.runs[j][-1]
                    if live.get(j) and live[j][-1].raw_state == last.raw_state:
                        out.runs[j] = [*out.runs[j][:-1], dataclasses.replace(last, final=True)]
        if not down:
            states = node_states()
            if states is not None:
                out.nodes_up = sorted(n for n, s in states.items() if node_is_up(s))
                out.nodes_down = sorted(n for n, s in states.items() if not node_is_up(s))
                out.runs = {j: [_with_failed_nodes(r, out.nodes_down) for r in runs]
                            for j, runs in out.runs.items()}
        return out

    def find_by_name(self, names: list[str]) -> dict[str, list[str]]:
        """name -> array job ids (every array of that name: one submission made several)."""
        if not names:
            return {}
        p = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%F|%j", "-n", ",".join(names)],
                           capture_output=True, text=True, timeout=300)
        out: dict[str, list[str]] = {}
        for line in p.stdout.splitlines():
            jid, _, name = line.partition("|")
            if jid and jid not in out.get(name, []):
                out.setdefault(name, []).append(jid)
        return out


_said_no_accounting = False


def have_slurm() -> bool:
    import shutil
    return shutil.which("sbatch") is not None and bool(os.environ.get("SLURM_CONF") or
                                                       Path("/etc/slurm/slurm.conf").exists())


# -- reading the scheduler ----------------------------------------------------------------
SACCT_FIELDS = "JobID,State,Reason,ExitCode,Submit,Start,End,ElapsedRaw,NodeList,AllocTRES"
ACCOUNTING_DISABLED = ("accounting storage is disabled", "slurmdbd", "not running a supported")


class AccountingDisabled(Exception):
    pass


def expand_job_id(text: str) -> list[str]:
    """"12_[1,3-5%2]" -> ["12_1", "12_3", "12_4", "12_5"]; "12_3" and "12" unchanged."""
    m = re.fullmatch(r"(\d+)_\[([^\]]*)\]", text)
    if not m:
        return [text]
    base, spec = m.group(1), m.group(2).split("%")[0]
    out = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        if lo.isdigit():
            out += [f"{base}_{i}" for i in range(int(lo), int(hi or lo) + 1)]
    return out


def _epoch(text: str) -> float | None:
    return float(text) if text and text.isdigit() else None


def _tres(text: str, key: str) -> int:
    m = re.search(rf"(?:^|,){re.escape(key)}=(\d+)", text or "")
    return int(m.group(1)) if m else 0


def sacct(job_ids: list[str]) -> dict[str, list[JobRecord]]:
    """All runs of the given jobs, in ONE sacct call. Raises AccountingDisabled."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    env = dict(os.environ, SLURM_TIME_FORMAT="%s")
    cmd = ["sacct", "-D", "-X", "-P", "-n", f"--format={SACCT_FIELDS}", "-j", ",".join(bases)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    if p.returncode != 0:
        msg = (p.stderr or p.stdout).strip()
        if any(w in msg.lower() for w in ACCOUNTING_DISABLED):
            raise AccountingDisabled(msg.splitlines()[-1] if msg else "sacct failed")
        raise RuntimeFailure(f"sacct failed: {msg.splitlines()[-1] if msg else p.returncode}")
    wanted = set(job_ids)
    out: dict[str, list[JobRecord]] = {}
    grouped: dict[str, list[JobRecord]] = {}
    bare: dict[str, JobRecord] = {}
    for line in p.stdout.splitlines():
        f = line.split("|")
        if len(f) < 10:
            continue
        rec = JobRecord(job_id=f[0], raw_state=f[1].split(" ")[0], reason=f[2],
                        exit_code=f[3], submit=_epoch(f[4]), start=_epoch(f[5]),
                        end=_epoch(f[6]), elapsed=float(f[7] or 0), nodes=f[8],
                        gpus=_tres(f[9], "gres/gpu"), cpus=_tres(f[9], "cpu"))
        if "_" not in f[0]:
            bare[f[0]] = rec
        if "[" in f[0]:   # "12_[0,2-4]": the tasks that have no record of their own yet
            for jid in expand_job_id(f[0]):
                if jid in wanted:
                    grouped.setdefault(jid, []).append(_copy(rec, jid))
        elif f[0] in wanted:
            out.setdefault(f[0], []).append(rec)
    # A task's own record wins over the array's grouped one, which sacct may still list
    # for it (read both, and a held task looked like a job that ran twice).
    for jid, recs in grouped.items():
        if jid not in out:
            out[jid] = recs
    # An array whose tasks the database does not list yet shows as the bare array id.
    for jid in wanted - set(out):
        rec = bare.get(jid.split("_")[0])
        if rec is not None and rec.raw_state == "PENDING":
            out[jid] = [_copy(rec, jid)]
    for runs in out.values():
        runs.sort(key=lambda r: (r.submit or 0, r.start or 0))
    return out


def squeue(job_ids: list[str]) -> dict[str, list[JobRecord]]:
    """What slurmctld still holds (no accounting): one squeue call, one run per job."""
    p = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T|%r|%V|%S|%N"],
                       capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, SLURM_TIME_FORMAT="%s"))
    if p.returncode != 0:
        raise RuntimeFailure(f"squeue failed: {p.stderr.strip()}")
    wanted, out = set(job_ids), {}
    for line in p.stdout.splitlines():
        f = line.split("|")
        if len(f) >= 6 and f[0] in wanted:
            out[f[0]] = [JobRecord(job_id=f[0], raw_state=f[1], reason=f[2], nodes=f[5],
                                   submit=_epoch(f[3]), start=_epoch(f[4]))]
    return out


# -- nodes -----------------------------------------------------------------------------------
NODE_FAIL_STATES = ("NODE_FAIL", "BOOT_FAIL")


def node_states() -> dict[str, str] | None:
    """node -> its state as sinfo prints it ("idle", "mixed", "down*", "allocated*" ...),
    in one sinfo call; None if sinfo fails."""
    try:
        p = subprocess.run(["sinfo", "-h", "-N", "-o", "%N|%T"], capture_output=True,
                           text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if p.returncode != 0:
        return None
    out: dict[str, str] = {}
    for line in p.stdout.splitlines():
        name, _, state = line.strip().partition("|")
        if name:
            out[name] = state.lower()
    return out


def node_is_up(state: str) -> bool:
    """A node that can run jobs: not down, drained or failing, and answering (no `*`)."""
    s = state.lower()
    return not s.endswith("*") and not s.startswith(("down", "drain", "fail", "maint",
                                                     "future", "unknown", "boot", "power"))


def hostnames(nodelist: str) -> list[str]:
    """"n[1-2],gpu7" -> ["n1", "n2", "gpu7"] (submitit's parser: no scontrol call)."""
    from submitit.slurm.slurm import _parse_node_list

    if not nodelist or nodelist in ("None assigned", "(null)"):
        return []
    try:
        return _parse_node_list(nodelist)
    except Exception:   # a format the parser does not know: the list as it is
        return [x for x in nodelist.split(",") if x]


def _with_failed_nodes(rec: JobRecord, down: list[str]) -> JobRecord:
    """A NODE_FAIL run with the nodes of its allocation that are down now: the ones that
    failed (sacct lists the whole allocation)."""
    if rec.raw_state not in NODE_FAIL_STATES:
        return rec
    failed = [n for n in hostnames(rec.nodes) if n in set(down)]
    return dataclasses.replace(rec, failed_nodes=",".join(failed))


def controller_down() -> str | None:
    """None if slurmctld answers `scontrol ping`, else what the ping said."""
    try:
        p = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"scontrol ping: {e}"
    out = (p.stdout + p.stderr).strip()
    if p.returncode == 0 and "UP" in out and "DOWN" not in out:
        return None
    return " ".join(out.split()) or f"scontrol ping exited {p.returncode}"


def _copy(rec: JobRecord, jid: str) -> JobRecord:
    return dataclasses.replace(rec, job_id=jid)
