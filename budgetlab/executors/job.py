"""The code a job runs: its stage directories, in order, with checkpoint-and-requeue.

`StageJob(dirs)` is what executors submit (pickled by submitit on SLURM; the local runner
calls `python -m budgetlab.executors.job DIR...`). On the pre-timeout signal or on
preemption the trainer saves a checkpoint and raises TrainingInterrupted (see
budgetlab/train/checkpoint.py); outside training our own handler interrupts. Either way
rank 0 requeues the job and the next run resumes from the newest checkpoint. Each run
leaves `log/run-<job>-<restart>.json` in the first stage's directory (which step it resumed
from, and why the previous run stopped), which `sync` turns into attempt rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import submitit

from budgetlab.stagedir import StageDir, atomic_write_json
from budgetlab.worker import _rank


class Interrupted(Exception):
    """Our preemption/timeout signal arrived outside a training loop."""


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


def requeue_slurm_job(job_id: str) -> str:
    """Requeue this SLURM job (it restarts after the cluster's cred_expire, 120 s by
    default). Returns a note for the run record."""
    p = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True,
                       timeout=60)
    return f"scontrol requeue {job_id}: rc={p.returncode} {p.stderr.strip()}".strip()


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
                  "started_at": time.time(), "resumed_from_step": newest_step(head)}
        if _rank() == 0:
            atomic_write_json(head.log_dir / f"run-{jid}-{restart}.json", record)
        old = _install_interrupt_handler()
        try:
            return run_stages(self.stage_dirs)
        except BaseException as exc:
            if not _is_interruption(exc):
                raise
            self._requeue_after(exc, head, record)
        finally:
            signal.signal(_preempt_signal(), old)

    def _requeue_after(self, exc: BaseException, head: StageDir, record: dict) -> None:
        # The worker wrote error.json for the interrupted stage: it is not a failure.
        for d in self.stage_dirs:
            err = StageDir(Path(d)).error_path
            if err.exists():
                err.unlink()
        record.update(stopped_at=time.time(), stop_reason=f"{type(exc).__name__}: {exc}",
                      checkpoint_step=newest_step(head))
        if _rank() != 0:
            sys.exit(0)
        on_slurm = bool(os.environ.get("SLURM_JOB_ID"))
        record["requeue"] = requeue_slurm_job(record["job_id"]) if on_slurm else "not on SLURM"
        atomic_write_json(head.log_dir / f"run-{record['job_id']}-{record['restart']}.json", record)
        print(f"budgetlab: interrupted ({record['stop_reason']}); requeue: {record['requeue']}",
              flush=True)
        # Locally nobody requeues: a non-zero exit, so that the try does not pass for done;
        # `resubmit` resumes from the checkpoint.
        sys.exit(0 if on_slurm else 3)

    def checkpoint(self, *args, **kwargs):
        # submitit's handler (before ours is installed): requeue the same stage directories;
        # the trainer resumes from its checkpoints/.
        return submitit.helpers.DelayedSubmission(StageJob(self.stage_dirs))


def _preempt_signal() -> signal.Signals:
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"))


def _install_interrupt_handler():
    def handler(signum, frame):
        raise Interrupted(f"signal {signal.Signals(signum).name}")
    return signal.signal(_preempt_signal(), handler)


def _is_interruption(exc: BaseException) -> bool:
    if isinstance(exc, Interrupted):
        return True
    try:
        from budgetlab.train.checkpoint import TrainingInterrupted
    except ImportError:
        return False
    return isinstance(exc, TrainingInterrupted)


def main(argv: list[str] | None = None) -> int:
    """`python -m budgetlab.executors.job DIR...`: the local executor's entry point."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m budgetlab.executors.job STAGE_DIR [STAGE_DIR ...]", file=sys.stderr)
        return 2
    try:
        StageJob(argv)()
    except Exception as exc:
        from budgetlab.worker import _last_line
        print(f"budgetlab job: {_last_line(exc)}", file=sys.stderr)
        import traceback
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
