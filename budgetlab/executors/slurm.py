"""SLURM through submitit: arrays, dependencies, one batched sacct per sync, scancel.

Submission: units are grouped into arrays by (stage kind, resources). A unit whose parent
unit sits at index i of array P goes at index i of a child array submitted with
`--dependency=aftercorr:P`, so task i waits for task i only (DESIGN section 7); siblings of
one parent go to separate child arrays (its first child in the first, and so on). Root
arrays are split at MaxArraySize. Every value reaches sbatch as an `#SBATCH --key=value`
line written by submitit (shlex-quoted), never through a shell command line.
"""

from __future__ import annotations

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

from budgetlab.errors import BadInput, RuntimeFailure
from budgetlab.executors.core import Unit, dumps, safe_name
from budgetlab.executors.job import StageJob

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
    time_min = max(1, round(float(res["time_min"])))   # SLURM counts whole minutes
    params = {
        "job_name": job_name, "nodes": int(res.get("nodes", 1)),
        "ntasks_per_node": int(res.get("tasks_per_node") or max(gpus, 1)),
        "cpus_per_task": int(res.get("cpus_per_task", 1)),
        "mem": f"{max(1, math.ceil(float(res['mem_gb']) * 1024))}MB",
        "time": time_min,
        # The pre-timeout signal: early enough to checkpoint, never before a short job starts.
        "signal_delay_s": int(min(120, max(15, time_min * 60 * 0.25))),
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


class SlurmBackend:
    name = NAME

    def __init__(self, workdir: Path, settings: dict):
        self.workdir = Path(workdir).resolve()
        self.settings = settings or {}
        self.folder = self.workdir / "submitit"
        self.sbatch_calls = 0
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

        import budgetlab
        src = Path(budgetlab.__file__).resolve().parent
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

    def submit(self, units: list[Unit]) -> None:
        """Give every unit a job id ("A_i"): arrays in dependency waves."""
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
            pending = [u for u in pending if u.job_id is None]

    def _arrays(self, units: list[Unit], max_size: int) -> list[_Array]:
        groups: dict[tuple, _Array] = {}
        roots: dict[tuple, list[Unit]] = {}
        for u in units:
            shape = (u.kind, dumps(u.resources))   # one array even if some carry an eval
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
        fns = [StageJob(u.stage_dirs(self.workdir)) for u in arr.units]
        self.sbatch_calls += 1
        try:
            job = ex.submit_indexed(fns, arr.indices, parallel)
        except (submitit_utils.FailedJobError, subprocess.CalledProcessError, OSError) as e:
            raise RuntimeFailure(f"sbatch failed: {str(e).strip().splitlines()[-1]}") from None
        for u, i in zip(arr.units, arr.indices):
            u.job_id = f"{job}_{i}"
            u.log_path = log_path(self.folder, u.job_id)

    # -- cancel -------------------------------------------------------------------------
    def cancel(self, job_ids: list[str]) -> None:
        for i in range(0, len(job_ids), 500):
            subprocess.run(["scancel", *job_ids[i:i + 500]], capture_output=True, text=True,
                           timeout=120)


def have_slurm() -> bool:
    import shutil
    return shutil.which("sbatch") is not None and bool(os.environ.get("SLURM_CONF") or
                                                       Path("/etc/slurm/slurm.conf").exists())


# -- reading the scheduler ----------------------------------------------------------------
@dataclass
class JobRecord:
    """One run of one job (a requeued job has several, oldest first)."""
    job_id: str
    raw_state: str
    reason: str = ""
    exit_code: str = ""
    submit: float | None = None
    start: float | None = None
    end: float | None = None
    elapsed: float = 0.0
    nodes: str = ""
    gpus: int = 0
    cpus: int = 0


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
                       capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise RuntimeFailure(f"squeue failed: {p.stderr.strip()}")
    wanted, out = set(job_ids), {}
    for line in p.stdout.splitlines():
        f = line.split("|")
        if len(f) >= 6 and f[0] in wanted:
            out[f[0]] = [JobRecord(job_id=f[0], raw_state=f[1], reason=f[2], nodes=f[5])]
    return out


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


def jobs_by_name(names: list[str]) -> dict[str, str]:
    """name -> array job id, for attempts whose submission crashed before the job id was
    recorded (squeue sees queued and recent jobs)."""
    p = subprocess.run(["squeue", "-h", "-t", "all", "-o", "%F|%j", "-n", ",".join(names)],
                       capture_output=True, text=True, timeout=300)
    out = {}
    for line in p.stdout.splitlines():
        jid, _, name = line.partition("|")
        out.setdefault(name, jid)
    return out


def _copy(rec: JobRecord, jid: str) -> JobRecord:
    return JobRecord(**{**rec.__dict__, "job_id": jid})
