"""The code a job runs: its stage directories, in order, with checkpoint-and-requeue.

`StageJob(dirs)` is what backends submit (pickled by submitit on SLURM; the local runner
calls `python -m budgetlab.backends.job DIR...`). On the pre-timeout signal or on
preemption the trainer saves a checkpoint and raises TrainingInterrupted (see
budgetlab/train/checkpoint.py); outside training our own handler interrupts. Either way
rank 0 requeues the job and the next run resumes from the newest checkpoint. Each run
leaves `log/run-<job>-<restart>.json` in the first stage's directory (which step it resumed
from, on which nodes, why the run stopped), which `sync` turns into attempt rows.

Requeues are bounded: after `resources.max_requeues` (default 3) interruptions in a row
without checkpoint progress (a reference pass or an eval longer than the time limit never
checkpoints) the job ends with error.json outcome TIMEOUT instead of requeueing for ever.
A requeue that SLURM refuses ends the run with an error record and a non-zero exit code, so
that children waiting with `aftercorr` never start without their parent's model.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from budgetlab.stagedir import StageDir, StageFileError, atomic_write_json, read_json
from budgetlab.worker import Interrupted, is_interruption, process_rank

DEFAULT_MAX_REQUEUES = 3


def newest_step(stage: StageDir) -> int | None:
    """The step of the newest complete checkpoint, or None."""
    try:
        from budgetlab.train.checkpoint import complete
    except ImportError:
        return None
    found = complete(stage.checkpoints_dir) if stage.checkpoints_dir.exists() else []
    return found[-1][0] if found else None


def job_key() -> tuple[str, int]:
    """(job id as the ledger stores it, restart count) of this process."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID") and env.get("SLURM_ARRAY_TASK_ID"):
        jid = f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}"
    else:
        jid = env.get("SLURM_JOB_ID") or env.get("BUDGETLAB_LOCAL_JOB_ID") or "local"
    return jid, int(env.get("SLURM_RESTART_COUNT") or 0)


def requeue_slurm_job(job_id: str) -> tuple[int, str]:
    """Requeue this SLURM job (it restarts after the cluster's cred_expire, 120 s by
    default). Returns (return code, a note for the run record)."""
    p = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                       timeout=60)
    return p.returncode, f"scontrol requeue {job_id}: rc={p.returncode} {p.stderr.strip()}".strip()


def run_records(head: StageDir, job_id: str) -> list[dict]:
    """This job's run records, oldest first (unreadable ones skipped)."""
    out = []
    for p in head.log_dir.glob(f"run-{job_id}-*.json"):
        try:
            rec = read_json(p)
        except (StageFileError, OSError):
            continue
        out.append(rec)
    return sorted(out, key=lambda r: int(r.get("restart") or 0))


def runs_without_progress(records: list[dict]) -> int:
    """Interrupted runs in a row, newest first, whose checkpoint did not advance."""
    n = 0
    for rec in reversed(records):
        if "stopped_at" not in rec:
            break
        before = rec.get("resumed_from_step")
        after = rec.get("checkpoint_step")
        if after is not None and (before is None or after > before):
            break
        n += 1
    return n


class StageJob(submitit.helpers.Checkpointable):
    """Run stage directories in order (a training stage, then its eval) in one job."""

    def __init__(self, stage_dirs: list[str]):
        self.stage_dirs = [str(d) for d in stage_dirs]

    def __call__(self):
        from budgetlab.worker import prepare_process, run_stages

        prepare_process(self.stage_dirs)
        head = StageDir(Path(self.stage_dirs[0]))
        jid, restart = job_key()
        record = {"job_id": jid, "restart": restart, "host": os.uname().nodename,
                  "nodes": os.environ.get("SLURM_JOB_NODELIST"),
                  "started_at": time.time(), "resumed_from_step": newest_step(head)}
        if process_rank() == 0:
            atomic_write_json(head.log_dir / f"run-{jid}-{restart}.json", record)
        old = _install_interrupt_handler()
        try:
            return run_stages(self.stage_dirs)
        except BaseException as exc:
            if not is_interruption(exc):
                raise
            self._requeue_after(exc, head, record)
        finally:
            signal.signal(_preempt_signal(), old)

    def _requeue_after(self, exc: BaseException, head: StageDir, record: dict) -> None:
        record.update(stopped_at=time.time(), stop_reason=f"{type(exc).__name__}: {exc}",
                      checkpoint_step=newest_step(head))
        if process_rank() != 0:
            sys.exit(0)   # rank 0 decides for the job
        path = head.log_dir / f"run-{record['job_id']}-{record['restart']}.json"
        on_slurm = bool(os.environ.get("SLURM_JOB_ID"))
        if not on_slurm:   # locally nobody requeues; `resubmit` resumes from the checkpoint
            record["requeue"] = "not on SLURM"
            atomic_write_json(path, record)
            print(f"budgetlab: interrupted ({record['stop_reason']})", flush=True)
            sys.exit(3)
        spec = _read_spec(head)
        cap = int((spec.get("resources") or {}).get("max_requeues", DEFAULT_MAX_REQUEUES))
        atomic_write_json(path, record)
        stalled = runs_without_progress(run_records(head, record["job_id"]))
        if stalled > cap:
            record["requeue"] = f"not requeued: {stalled} interruptions without progress"
            atomic_write_json(path, record)
            step = record["checkpoint_step"]
            _fail(head, "TIMEOUT", f"interrupted {stalled} times in a row without checkpoint "
                  f"progress (newest checkpoint: {'step ' + str(step) if step else 'none'}; "
                  f"max_requeues = {cap}): the time limit is shorter than a part of the stage "
                  f"that does not checkpoint; raise [resources.{spec.get('kind', 'KIND')}] "
                  f"time_min (resubmit doubles it after a TIMEOUT) or lower checkpoint_every")
            sys.exit(1)
        rc, note = requeue_slurm_job(record["job_id"])
        record["requeue"] = note
        atomic_write_json(path, record)
        print(f"budgetlab: interrupted ({record['stop_reason']}); requeue: {note}", flush=True)
        if rc != 0:
            _fail(head, _interrupted_outcome(record, spec),
                  f"interrupted ({record['stop_reason']}) and SLURM refused to requeue the "
                  f"job ({note}); `budgetlab resubmit` resumes from the newest checkpoint")
            sys.exit(1)
        sys.exit(0)

    def checkpoint(self, *args, **kwargs):
        # submitit's handler (before ours is installed): requeue the same stage directories;
        # the trainer resumes from its checkpoints/.
        return submitit.helpers.DelayedSubmission(StageJob(self.stage_dirs))


def _read_spec(head: StageDir) -> dict:
    try:
        return head.read_spec()
    except (StageFileError, OSError):
        return {}


def _interrupted_outcome(record: dict, spec: dict) -> str:
    """TIMEOUT when the run stopped near its time limit, PREEMPTED otherwise."""
    res = spec.get("resources") or {}
    limit = float((res.get("job") or res).get("time_min") or 0) * 60
    ran = record["stopped_at"] - record["started_at"]
    return "TIMEOUT" if limit and ran >= limit - min(120, max(15, limit * 0.25)) - 30 \
        else "PREEMPTED"


def _fail(head: StageDir, outcome: str, message: str) -> None:
    head.write_error({"type": "Interrupted", "outcome": outcome, "message": message,
                      "time": time.time()})
    print(f"budgetlab: {message}", file=sys.stderr, flush=True)


def _preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _install_interrupt_handler():
    def handler(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")
    return signal.signal(_preempt_signal(), handler)


def main(argv: list[str] | None = None) -> int:
    """`python -m budgetlab.backends.job DIR...`: the local executor's entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m budgetlab.backends.job STAGE_DIR [STAGE_DIR ...]",
              file=sys.stderr)
        return 2
    try:
        StageJob(argv)()
    except Exception as exc:
        from budgetlab.worker import last_line
        print(f"budgetlab job: {last_line(exc)}", file=sys.stderr)
        import traceback
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
