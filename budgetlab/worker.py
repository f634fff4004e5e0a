"""Run stage directories: the code that executes on a compute node (or a local subprocess).

    python -m budgetlab.worker STAGE_DIR [STAGE_DIR ...]

runs each stage in order (a training stage, then the eval stage of the same job), as one
process or as one rank of N (rank and world size from submitit/SLURM/torchrun variables).
A stage whose result.json is valid is skipped, so a requeued job resumes where it stopped.
Only rank 0 writes result.json / error.json. Workers never open the ledger.

The process's exit code is the first stage's (the training stage's): children in other jobs
wait for it (`aftercorr`), and an eval that fails after its training stage completed must not
keep them waiting for ever. That eval's failure is in its own error.json, which sync reads.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path

from budgetlab.redact import RedactingStream, redact
from budgetlab.stagedir import StageDir, StageFileError


def classify_exception(exc: BaseException) -> str:
    """The outcome class of an exception raised inside a stage."""
    text = f"{type(exc).__name__}: {exc}"
    if "CUDA out of memory" in text or type(exc).__name__ == "OutOfMemoryError":
        return "CUDA_OOM"
    if isinstance(exc, MemoryError):
        return "OUT_OF_MEMORY"
    return "FAILED"


def run_one(stage: StageDir) -> dict | None:
    """Run one stage directory; returns its result (rank 0) or None (other ranks)."""
    from budgetlab import dist, tracking

    spec = stage.read_spec()
    env = dist.from_environment()
    kind = spec["kind"]
    if kind == "eval":
        from budgetlab.evaluate import run_stage
    elif kind in ("sft", "dpo", "kto"):
        from budgetlab.train import run_stage
    else:
        raise ValueError(f"{stage.spec_path}: unknown stage kind {kind!r}")
    start = time.time()
    tracker = tracking.open_tracker(spec, stage.root, env.rank)   # NULL unless tracked, rank 0
    try:
        result = (run_stage(stage, spec, env) if kind == "eval"
                  else run_stage(stage, spec, env, tracker=tracker))
    except BaseException:
        tracker.finish(ok=False)
        raise
    if env.rank != 0:
        return None
    result = dict(result)
    result.setdefault("stage_id", spec["stage_id"])
    result.setdefault("kind", kind)
    result.setdefault("wall_seconds", time.time() - start)
    result.setdefault("world_size", env.world_size)
    result.setdefault("metrics", {})
    # The tracker's run is finished (flushed to disk offline) before result.json makes the
    # stage COMPLETED, so whoever reads the run after the stage completes finds it whole;
    # tracker errors are swallowed (tracking._Safe), never the result.
    try:
        tracker.summary(tracking.result_metrics(result))
        tracker.finish(ok=True)
    finally:
        stage.write_result(result)
    return result


def free_training_memory() -> None:
    """Between a training stage and the eval of the same job: the training engine (model,
    optimizer state, ZeRO buffers) is unreachable once run_one returns; collect it now, and
    hand the CUDA caching allocator's blocks back so that the eval's engine (vLLM sizes its
    KV cache from the free memory) gets the GPU."""
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def prepare_process(stage_dirs: list[str]) -> None:
    """Set up a job process before any stage runs (both executors call this).

    - stdout/stderr mask environment secrets, so a library that prints a token by mistake
      does not leak it into the job log;
    - torch uses the CPUs the job asked for (cpus_per_task), not every core of the node:
      two 1-CPU jobs on a 2-core machine would otherwise each start 2 threads and thrash;
    - TorchDynamo is off (our recipes run eager, nothing calls torch.compile): DeepSpeed's
      ZeRO optimizer check imports its Muon module, whose torch.compile decorators load
      inductor, ~1.7 CPU-s of every rank's start-up. TORCHDYNAMO_DISABLE set by the user stays.
    """
    os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
    if not isinstance(sys.stdout, RedactingStream):
        sys.stdout, sys.stderr = RedactingStream(sys.stdout), RedactingStream(sys.stderr)
    if "OMP_NUM_THREADS" in os.environ or not stage_dirs:
        return
    try:
        cpus = StageDir(Path(stage_dirs[0])).read_spec().get("resources", {}).get("cpus_per_task")
    except (OSError, StageFileError):
        return
    if isinstance(cpus, int) and cpus > 0:
        os.environ["OMP_NUM_THREADS"] = str(cpus)
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(cpus)


class Interrupted(BaseException):
    """The job's preemption/timeout signal arrived outside a training loop.

    A BaseException, like KeyboardInterrupt: the signal lands anywhere, and libraries wrap
    much of their work (transformers' model and tokenizer loading) in `except Exception`
    fallbacks that would swallow it and let the stage run on past its requeue."""


def is_interruption(exc: BaseException) -> bool:
    """A stop on request (signal, preemption): the job requeues, it is not a failure."""
    if isinstance(exc, Interrupted):
        return True
    try:
        from budgetlab.train.checkpoint import TrainingInterrupted
    except ImportError:
        return False
    return isinstance(exc, TrainingInterrupted)


def _already_done(stage: StageDir) -> bool:
    try:
        return stage.read_result() is not None
    except StageFileError:
        return False


def run_stages(stage_dirs: list[str]) -> list[dict | None]:
    """Run stages in order. A failure of the first stage stops the job (later stages need
    it) and raises; a later stage's failure is recorded in its error.json and the job goes on
    (exit code 0: the first stage's outcome). An interruption always propagates (requeue)."""
    out: list[dict | None] = []
    rank = process_rank()
    for i, d in enumerate(stage_dirs):
        stage = StageDir(Path(d).resolve())
        if _already_done(stage):
            out.append(stage.read_result())
            continue
        if rank == 0:   # only rank 0 touches the error record: ranks never race on it
            stage.error_path.unlink(missing_ok=True)
        try:
            if i > 0:
                free_training_memory()  # the previous stage's engine, before this one starts
            out.append(run_one(stage))
        except BaseException as exc:
            if is_interruption(exc) or isinstance(exc, KeyboardInterrupt):
                raise
            if rank == 0:
                stage.write_error({
                    "type": type(exc).__name__,
                    "message": redact(last_line(exc)),
                    "outcome": classify_exception(exc),
                    "traceback": redact(traceback.format_exc()[-4000:]),
                    "time": time.time(),
                })
            if i == 0:
                raise
            print(f"budgetlab worker: {stage.root.name} failed after the stage it evaluates "
                  f"completed: {last_line(exc)}", file=sys.stderr, flush=True)
            traceback.print_exc()
            out.append(None)
    return out


def process_rank() -> int:
    """Global rank of this process (budgetlab.dist): only rank 0 writes result/error files."""
    from budgetlab.dist import process_rank as rank
    return rank()


def last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1] if text else ''}".strip()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        print("usage: python -m budgetlab.worker STAGE_DIR [STAGE_DIR ...]", file=sys.stderr)
        return 2
    prepare_process(argv)
    try:
        run_stages(argv)
    except Exception as exc:  # the error record is written; the exit code tells the scheduler
        print(f"budgetlab worker: {last_line(exc)}", file=sys.stderr)
        traceback.print_exc()
        return 1
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
