"""The stage directory: the only channel from a worker back to the ledger (DESIGN section 6).

    <workdir>/stages/<stage_id>/
        spec.json        what to run (written by the CLI before submission)
        checkpoints/     resume state (the trainer's)
        model/           final Hugging Face weights
        progress.json    heartbeat: phase, step, total_steps, loss, lr, tokens, tokens_per_s,
                         started_at/start_step (this attempt's loop: the ETA), heartbeat time
                         (rewritten atomically; advisory)
        tracking.json    the stage's tracking run, when the grid tracks (budgetlab.tracking)
        result.json      written last, atomically; its presence means "complete"
        error.json       the worker's own error record when it fails (type, message, outcome)
        log/             stdout/stderr of attempts

spec.json keys (schema_version 1):
    stage_id, kind ("sft" | "dpo" | "kto" | "eval"), task, model (the base model reference),
    seed, n (examples or pairs used; null for eval), params (hyper-parameters of this kind),
    data ({"sft"|"preferences"|"eval": local path or null for the task's default}),
    parent (null or {"stage_id", "kind", "dir"}), init_model (what to start from / evaluate:
    the parent's model/ dir or the base model reference), resources (execution settings:
    micro_batch_size, zero_stage, checkpoint_every, keep_checkpoints, nodes, gpus_per_node, ...).

result.json keys: stage_id, kind, metrics ({name: float}), primary_metric (eval only),
    tokens, wall_seconds, world_size, peak_memory_bytes, versions, plus kind-specific extras.

Workers never open the ledger; they only write here.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

KINDS = ("sft", "dpo", "kto", "eval")


class StageFileError(Exception):
    """A stage file exists but cannot be used (truncated, not JSON, wrong shape)."""


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    data = json.dumps(obj, indent=1, sort_keys=True, default=str)
    try:
        with open(tmp, "w") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)   # a failed write (disk full) leaves nothing behind
        raise
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike, required: tuple[str, ...] = ()) -> dict:
    """Read a JSON object; StageFileError with a clear message if it is unusable."""
    path = Path(path)
    try:
        text = path.read_text()
    except UnicodeDecodeError as e:
        raise StageFileError(f"{path}: not text ({e.reason})") from None
    if not text.strip():
        raise StageFileError(f"{path}: empty file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise StageFileError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} "
                             f"(truncated or corrupt)") from None
    if not isinstance(obj, dict):
        raise StageFileError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in required if k not in obj]
    if missing:
        raise StageFileError(f"{path}: missing key(s) {', '.join(missing)}")
    return obj


@dataclass(frozen=True)
class StageDir:
    root: Path

    @classmethod
    def of(cls, workdir: str | os.PathLike, stage_id: str) -> "StageDir":
        return cls(Path(workdir).resolve() / "stages" / stage_id)

    @property
    def spec_path(self) -> Path:
        return self.root / "spec.json"

    @property
    def result_path(self) -> Path:
        return self.root / "result.json"

    @property
    def progress_path(self) -> Path:
        return self.root / "progress.json"

    @property
    def error_path(self) -> Path:
        return self.root / "error.json"

    @property
    def model_dir(self) -> Path:
        return self.root / "model"

    @property
    def checkpoints_dir(self) -> Path:
        return self.root / "checkpoints"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    def read_spec(self) -> dict:
        return read_json(self.spec_path, required=("stage_id", "kind", "task", "model"))

    def write_spec(self, spec: dict) -> None:
        atomic_write_json(self.spec_path, spec)

    def write_progress(self, **fields) -> None:
        fields.setdefault("heartbeat", time.time())
        atomic_write_json(self.progress_path, fields)

    def read_progress(self) -> dict | None:
        """The last heartbeat, or None if absent or unreadable (progress is advisory)."""
        if not self.progress_path.exists():
            return None
        try:
            return read_json(self.progress_path)
        except (StageFileError, OSError):
            return None

    def write_result(self, result: dict) -> None:
        atomic_write_json(self.result_path, result)

    def read_result(self) -> dict | None:
        """The result if the stage completed; None if not yet; StageFileError if corrupt."""
        if not self.result_path.exists():
            return None
        res = read_json(self.result_path, required=("stage_id", "metrics"))
        if not isinstance(res["metrics"], dict):
            raise StageFileError(f"{self.result_path}: 'metrics' is not an object")
        return res

    def write_error(self, error: dict) -> None:
        atomic_write_json(self.error_path, error)

    def read_error(self) -> dict | None:
        if not self.error_path.exists():
            return None
        try:
            return read_json(self.error_path)
        except (StageFileError, OSError) as e:
            return {"type": "StageFileError", "message": str(e), "outcome": "FAILED"}
