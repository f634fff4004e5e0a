"""Checkpoints under <stage>/checkpoints/step-NNNNNNNN/, written atomically, newest K kept.

DeepSpeed saves model, optimizer and scheduler (every rank its own shard); we add each rank's
RNG state and a meta.json (step, world size, ZeRO stage). A checkpoint written by N ranks
resumes on M ranks: ZeRO 0 as it is (its optimizer state is not sharded), ZeRO 1-3 through
DeepSpeed's universal checkpoint (ds_to_universal, converted once by rank 0 into
step-N/universal/, then loaded with load_universal). A change of ZeRO stage is refused. All ranks write into a hidden
.tmp-step-N directory; after a barrier rank 0 writes meta.json and renames it, so a directory
named step-N is always complete. The data position is the step itself: the example order is
a pure function of (seed, epoch), see data.plan_steps.

Signals: SIGUSR1 asks for a checkpoint at the next step boundary; SIGUSR2 (submitit's
preemption signal, or $SUBMITIT_PREEMPT_SIGNAL) and SIGTERM ask for a checkpoint and a stop.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import random
import shutil
import signal
import threading
import traceback
from pathlib import Path

from budgetlab import dist
from budgetlab.stagedir import atomic_write_json

PREFIX = "step-"
log = logging.getLogger(__name__)


class TrainingInterrupted(Exception):
    """Training stopped on request after saving a checkpoint; rerunning the stage resumes.

    `reason` names the signal (SIGUSR2, SIGTERM, ...), so that a caller can tell a
    pre-timeout/preemption signal (requeue) from a plain termination."""

    def __init__(self, message: str, reason: str = "", step: int | None = None):
        super().__init__(message)
        self.reason = reason
        self.step = step


class CheckpointMismatch(Exception):
    """A checkpoint that this run cannot resume from (stated why)."""


def tag(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def complete(ckpt_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of complete checkpoints, oldest first."""
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(PREFIX) and (p / "meta.json").exists():
                try:
                    out.append((int(p.name[len(PREFIX):]), p))
                except ValueError:
                    continue
    return sorted(out)


def _rng_state() -> dict:
    import numpy as np
    import torch

    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, env, zero_stage: int,
         keep: int) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    import torch

    ckpt_dir = Path(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    tmp_tag = f".tmp-{tag(step)}"
    if env.rank == 0 and (ckpt_dir / tmp_tag).exists():
        shutil.rmtree(ckpt_dir / tmp_tag)  # left by a crash during an earlier save
    dist.barrier()
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state,
                               save_latest=False)
        torch.save(_rng_state(), ckpt_dir / tmp_tag / f"rng-rank{env.rank}.pt")
    except Exception as e:
        # Free what the half-written save holds (on a full disk, the error record and the
        # next try need that space): its files, and the writers still open in the frames of
        # the traceback. The previous checkpoint is untouched.
        msg = _save_failure(ckpt_dir, step, e)
        x, seen = e, 0
        while x is not None and seen < 10:
            traceback.clear_frames(x.__traceback__)
            x, seen = x.__cause__ or x.__context__, seen + 1
        del e, x
        gc.collect()
        shutil.rmtree(ckpt_dir / tmp_tag, ignore_errors=True)
        raise CheckpointSaveError(msg) from None
    dist.barrier()
    final = ckpt_dir / tag(step)
    if env.rank == 0:
        atomic_write_json(ckpt_dir / tmp_tag / "meta.json",
                          {"step": step, "world_size": env.world_size, "zero_stage": zero_stage})
        if final.exists():
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        for _, old in complete(ckpt_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


class CheckpointSaveError(OSError):
    """Saving a checkpoint failed (disk full, quota, I/O error); the previous one is intact."""


def _save_failure(ckpt_dir: Path, step: int, exc: Exception) -> str:
    chain, e = [], exc
    while e is not None and len(chain) < 5:
        chain.append(e)
        e = e.__cause__ or e.__context__
    full = any(getattr(x, "errno", None) == errno.ENOSPC or "No space left" in str(x)
               for x in chain)
    if not full:   # torch's writer often hides the errno ("file write failed")
        try:
            full = shutil.disk_usage(ckpt_dir).free < 1 << 20
        except OSError:
            pass
    why = "No space left on device (the disk is full)" if full else \
        f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
    prev = complete(ckpt_dir)
    keep = f"the previous checkpoint {prev[-1][1].name} is intact" if prev else \
        "there is no earlier checkpoint"
    return f"saving checkpoint {tag(step)} in {ckpt_dir} failed: {why}; {keep}"


def load_latest(engine, ckpt_dir: Path, env, zero_stage: int) -> tuple[int, dict] | None:
    """Restore the newest usable checkpoint; (step, client_state), or None if there is none.

    A checkpoint left broken by a crash (meta.json unreadable, shards DeepSpeed cannot load)
    is reported and skipped for the one before it; a save that never reached its rename
    (.tmp-step-N) is reported and ignored."""
    ckpt_dir = Path(ckpt_dir)
    if env.rank == 0 and ckpt_dir.is_dir():
        for p in sorted(ckpt_dir.glob(f".tmp-{PREFIX}*")):
            log.warning("%s: ignored: an unfinished checkpoint (a save was interrupted)", p)
    for step, path in reversed(complete(ckpt_dir)):
        try:
            meta = json.loads((path / "meta.json").read_text())
            world, zero = int(meta["world_size"]), int(meta["zero_stage"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("%s: skipped: meta.json is unreadable (%s); trying the previous "
                        "checkpoint", path, f"{type(e).__name__}: {e}")
            continue
        if zero != zero_stage:
            raise CheckpointMismatch(f"{path} was written with ZeRO stage {zero}, "
                                     f"this run uses stage {zero_stage}")
        load_dir, load_tag, universal = path.parent, path.name, False
        if world != env.world_size and zero_stage > 0:
            # ZeRO 1-3 shard the optimizer state by rank: DeepSpeed's universal checkpoint
            # (ds_to_universal) re-partitions it for this world size.
            try:
                load_dir, load_tag, universal = universal_copy(path, env), UNIVERSAL, True
            except Exception as e:
                raise CheckpointMismatch(
                    f"{path} was written by {world} ranks with ZeRO stage {zero_stage} and "
                    f"cannot be re-partitioned for {env.world_size} ranks: DeepSpeed's "
                    f"ds_to_universal failed ({type(e).__name__}: {_first_line(e)}); resume "
                    f"on {world} ranks, or resubmit from step 0") from None
        try:
            _, client_state = _load(engine, load_dir, load_tag, universal)
        except Exception as e:  # truncated shard: torch/DeepSpeed raise many types
            client_state = None
            why = f"{type(e).__name__}: {_first_line(e)}"
        else:
            why = "DeepSpeed found nothing to load"
        if client_state is not None and universal:
            log.info("%s: written by %d ranks, resumed on %d through a universal checkpoint",
                     path, world, env.world_size)
        if client_state is None:
            log.warning("%s: skipped: cannot be loaded (%s); trying the previous checkpoint",
                        path, why)
            continue
        rng = path / f"rng-rank{env.rank}.pt"
        if rng.exists():
            import torch

            try:
                _set_rng_state(torch.load(rng, weights_only=False))
            except Exception as e:  # the weights are fine: resume, with fresh RNG streams
                log.warning("%s: RNG state unreadable (%s); resuming without it", rng, e)
        return step, client_state
    return None


UNIVERSAL = "universal"   # <step dir>/universal: the same checkpoint, for any world size


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else ""


def universal_copy(path: Path, env) -> Path:
    """Collective: rank 0 converts the checkpoint at `path` into DeepSpeed's universal format
    (once: the copy stays next to the shards, at path/universal/) while the others wait.
    Returns the directory to load tag UNIVERSAL from. Raises what the conversion raised."""
    out = path / UNIVERSAL
    failure = None
    if env.rank == 0 and not (out / "zero").is_dir():
        tmp = path / f".tmp-{UNIVERSAL}"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_to_universal(path, tmp)
            os.replace(tmp, out)
        except Exception as e:  # every rank must learn of it, not wait at the barrier
            shutil.rmtree(tmp, ignore_errors=True)
            failure = e
    ok = _all_agree(failure is None)
    if failure is not None:
        raise failure
    if not ok:
        raise RuntimeError(f"rank 0 could not convert {path} to a universal checkpoint")
    return path


def convert_to_universal(src: Path, dest: Path) -> None:
    """DeepSpeed's ds_to_universal on one checkpoint directory (ZeRO 1-3), in this process."""
    import argparse
    import contextlib
    import io

    from deepspeed.checkpoint import ds_to_universal

    args = argparse.Namespace(input_folder=str(src), output_folder=str(dest),
                              num_extract_workers=1, num_merge_workers=1,
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    with contextlib.redirect_stdout(io.StringIO()):   # it prints every parameter name
        ds_to_universal.main(args)


def _all_agree(ok: bool) -> bool:
    """Collective: True if every rank says ok (one process: ok itself)."""
    if not dist.is_initialized():
        return ok
    import torch
    import torch.distributed as td

    t = torch.tensor([1 if ok else 0], dtype=torch.int32)
    td.all_reduce(t, op=td.ReduceOp.MIN)
    return bool(t.item())


def _load(engine, load_dir: Path, tag: str, universal: bool):
    """engine.load_checkpoint, with DeepSpeed's load_universal switched on for this load only
    (it is an engine setting: the config's checkpoint.load_universal)."""
    cfg = engine._config
    before = cfg.load_universal_checkpoint
    cfg.load_universal_checkpoint = universal
    try:
        return engine.load_checkpoint(str(load_dir), tag=tag, load_optimizer_states=True,
                                      load_lr_scheduler_states=True)
    finally:
        cfg.load_universal_checkpoint = before


def newest_tag(ckpt_dir: Path) -> str | None:
    found = complete(Path(ckpt_dir))
    return found[-1][1].name if found else None


class StopFlag:
    """Set from a signal handler; the loop checks it at every step boundary."""

    def __init__(self):
        self.save = False
        self.stop = False
        self.reason = ""

    def request(self, stop: bool, reason: str) -> None:
        self.save = True
        self.stop = self.stop or stop
        self.reason = reason


def install_signal_handlers(flag: StopFlag):
    """Route checkpoint/preemption signals to `flag`; returns a function restoring the old ones."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    preempt = getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"),
                      signal.SIGUSR2)
    wanted = {signal.SIGUSR1: False, preempt: True, signal.SIGTERM: True}
    old = {}
    for sig, stop in wanted.items():
        def handler(signum, frame, stop=stop):
            flag.request(stop, signal.Signals(signum).name)
        old[sig] = signal.signal(sig, handler)

    def restore():
        for sig, h in old.items():
            signal.signal(sig, h)
    return restore
