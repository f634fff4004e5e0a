"""Experiment tracking from the workers: one run per stage in Weights & Biases (online, or
offline on compute nodes without network) or TensorBoard, behind one small interface.

The grid spec's `[tracking]` table (validated in budgetlab.spec; not part of any stage id):

    [tracking]
    backend = "wandb"        # "none" (default) | "wandb" | "tensorboard"
    project = "budgetlab"    # W&B project (default: the grid's name)
    entity = "my-team"       # W&B entity (optional)
    mode = "offline"         # W&B: "online" | "offline" (default "offline": nodes rarely
                             # have network; `wandb sync` uploads the runs later)
    tags = ["paper-repro"]   # added to every run, with the stage's kind and task

submit writes, into each stage's spec.json, `tracking` = these settings + the grid's name +
the cells the stage serves + `dir` (the workdir). Rank 0 of the worker then opens one run:

    W&B      id "bl-<stage_id>" (a requeued or resumed attempt continues the same run,
             resume="allow"), group = grid, job_type = kind, config = the stage's parameters,
             task, model, n, seed, parent and cells; runs land in <workdir>/wandb/
    TB       <workdir>/tensorboard/<grid>/<kind>-<stage_id>/ event files

It logs per optimizer step train/loss, train/lr, train/tokens_per_s, train/grad_norm (and
DPO/KTO rewards, margins, KL), and the stage's final metrics (eval/<metric> for an eval
stage) to the run's summary. A tracking failure (package missing on the node, no network in
online mode) never fails a stage: the worker says so in the job log and in tracking.json.

tracking.json (in the stage dir, rank 0): {"backend", "mode", "run_id", "path", "url",
"project", "entity", "error"}; sync stores the run's URL (online) or `backend:path` in the
attempt's `tracking` column (budgetlab.progress.run_ref).

    read_offline_run(run_dir) -> {"run", "config", "history", "summary"}
reads an offline W&B run back (its .wandb record log), without the network.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import time
from pathlib import Path

from budgetlab.stagedir import atomic_write_json

BACKENDS = ("none", "wandb", "tensorboard")
MODES = ("online", "offline")
TRACKING_FILE = "tracking.json"


def run_id(stage_id: str) -> str:
    return f"bl-{stage_id}"


class Tracker:
    """What the worker and the training loop call; the base class tracks nothing."""
    backend = "none"

    def log(self, metrics: dict, step: int) -> None:
        pass

    def summary(self, metrics: dict) -> None:
        pass

    def finish(self, ok: bool = True) -> None:
        pass

    def record(self) -> dict | None:
        return None


NULL = Tracker()


def _config(spec: dict) -> dict:
    tr = spec.get("tracking") or {}
    return {"stage_id": spec.get("stage_id"), "kind": spec.get("kind"),
            "task": spec.get("task"), "model": spec.get("model"), "n": spec.get("n"),
            "seed": spec.get("seed"), "parent": (spec.get("parent") or {}).get("stage_id"),
            "params": spec.get("params") or {}, "resources": spec.get("resources") or {},
            "grid": tr.get("grid"), "cells": tr.get("cells") or []}


def _name(spec: dict) -> str:
    n = "" if spec.get("n") is None else f" n={spec['n']}"
    seed = "" if spec.get("seed") is None else f" seed={spec['seed']}"
    return f"{spec.get('kind')} {spec.get('task')}{n}{seed} {spec.get('stage_id', '')[:8]}"


class WandbTracker(Tracker):
    backend = "wandb"

    def __init__(self, spec: dict):
        import wandb

        tr = spec["tracking"]
        self.mode = tr.get("mode", "offline")
        root = Path(tr.get("dir") or ".")
        root.mkdir(parents=True, exist_ok=True)
        tags = list(dict.fromkeys([*(tr.get("tags") or []), spec.get("kind"), spec.get("task")]))
        self.run = wandb.init(
            project=tr.get("project") or tr.get("grid") or "budgetlab",
            entity=tr.get("entity"), id=run_id(spec["stage_id"]), resume="allow",
            group=tr.get("grid"), job_type=spec.get("kind"), name=_name(spec),
            tags=[t for t in tags if t], config=_config(spec), dir=str(root), mode=self.mode,
            # the job log already has stdout; wandb must not wrap our redacting streams
            settings=wandb.Settings(console="off", silent=True))
        self.project, self.entity = tr.get("project"), tr.get("entity")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(metrics, step=step)

    def summary(self, metrics: dict) -> None:
        for k, v in metrics.items():
            self.run.summary[k] = v

    def finish(self, ok: bool = True) -> None:
        self.run.finish(exit_code=0 if ok else 1)

    def record(self) -> dict:
        files = Path(self.run.dir)          # <workdir>/wandb/<offline-run-...>/files
        url = None if self.mode == "offline" else getattr(self.run, "url", None)
        return {"backend": "wandb", "mode": self.mode, "run_id": self.run.id,
                "path": str(files.parent), "url": url, "project": self.run.project,
                "entity": self.entity}


class TensorBoardTracker(Tracker):
    backend = "tensorboard"

    def __init__(self, spec: dict):
        from torch.utils.tensorboard import SummaryWriter

        tr = spec["tracking"]
        self.path = (Path(tr.get("dir") or ".") / "tensorboard" / (tr.get("grid") or "stages")
                     / f"{spec.get('kind')}-{spec['stage_id']}")
        self.writer = SummaryWriter(log_dir=str(self.path))
        self.writer.add_text("config", json.dumps(_config(spec), sort_keys=True, default=str))

    def log(self, metrics: dict, step: int) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def summary(self, metrics: dict) -> None:
        self.log(metrics, 0)

    def finish(self, ok: bool = True) -> None:
        self.writer.close()

    def record(self) -> dict:
        return {"backend": "tensorboard", "mode": None, "run_id": self.path.name,
                "path": str(self.path), "url": None}


_CLASSES = {"wandb": WandbTracker, "tensorboard": TensorBoardTracker}


class _Safe(Tracker):
    """A tracker whose failures are said once in the job log and then ignored: a broken
    tracking run must not fail (or stop) a training stage."""

    def __init__(self, inner: Tracker):
        self.inner, self.backend, self.broken = inner, inner.backend, False

    def _call(self, name, *args, **kw):
        if self.broken:
            return None
        try:
            return getattr(self.inner, name)(*args, **kw)
        except Exception as e:
            self.broken = True
            print(f"budgetlab worker: tracking ({self.backend}) stopped: {type(e).__name__}: "
                  f"{e}", file=sys.stderr, flush=True)

    def log(self, metrics: dict, step: int) -> None:
        self._call("log", metrics, step)

    def summary(self, metrics: dict) -> None:
        self._call("summary", metrics)

    def finish(self, ok: bool = True) -> None:
        self._call("finish", ok)
        self.broken = True   # finished: nothing more goes to this run

    def record(self) -> dict | None:
        return self.inner.record()


def open_tracker(spec: dict, stage_root: Path, rank: int) -> Tracker:
    """The stage's tracker on rank 0 (NULL elsewhere, or when the grid tracks nothing).
    Writes tracking.json; a failure to open is reported there and in the log, not raised."""
    tr = spec.get("tracking") or {}
    backend = tr.get("backend", "none")
    if rank != 0 or backend == "none":
        return NULL
    rec = {"backend": backend, "mode": tr.get("mode"), "time": time.time()}
    try:
        tracker = _Safe(_CLASSES[backend](spec))
        rec.update(tracker.record())
    except Exception as e:  # tracking is advisory: the stage runs without it
        rec["error"] = f"{type(e).__name__}: {e}"[:500]
        print(f"budgetlab worker: tracking ({backend}) is off for this stage: {rec['error']}",
              file=sys.stderr, flush=True)
        tracker = NULL
    try:
        atomic_write_json(Path(stage_root) / TRACKING_FILE, rec)
    except OSError:
        pass
    return tracker


def result_metrics(result: dict) -> dict:
    """A stage's final metrics under the names its run shows: train/... or eval/..."""
    kind = result.get("kind")
    prefix = "eval" if kind == "eval" else "train"
    out = {f"{prefix}/{k}": v for k, v in (result.get("metrics") or {}).items()
           if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in ("tokens", "wall_seconds", "train_seconds"):
        if isinstance(result.get(k), (int, float)):
            out[f"stage/{k}"] = result[k]
    return out


# -- reading an offline W&B run back -----------------------------------------------------
_BLOCK = 32768
_HEADER = 7     # ":W&B" + magic (2) + version (1)


def _records(path: Path):
    """The raw records of a .wandb file (LevelDB log format: 32 KiB blocks of chunks,
    each with a 7-byte header: crc32c, length, type FULL/FIRST/MIDDLE/LAST)."""
    data = path.read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path}: not a W&B run file")
    pos, buf = _HEADER, b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:           # the block's tail is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:
            yield chunk
        elif kind == 2:
            buf = chunk
        elif kind == 3:
            buf += chunk
        elif kind == 4:
            yield buf + chunk
            buf = b""


def read_offline_run(run_dir: str | os.PathLike) -> dict:
    """{"run": {id, project, group, job_type, tags, name}, "config": {...},
    "history": [{_step, key: value}], "summary": {...}} of an offline W&B run dir."""
    from wandb.proto import wandb_internal_pb2 as pb

    run_dir = Path(run_dir)
    (path,) = run_dir.glob("run-*.wandb")
    out = {"run": {}, "config": {}, "history": [], "summary": {}}

    def key(item):
        return item.key or "/".join(item.nested_key)
    for raw in _records(path):
        r = pb.Record()
        r.ParseFromString(raw)
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["run"] = {"id": r.run.run_id, "project": r.run.project, "group": r.run.run_group,
                          "job_type": r.run.job_type, "tags": list(r.run.tags),
                          "name": r.run.display_name}
            out["config"].update({c.key: json.loads(c.value_json) for c in r.run.config.update})
        elif kind == "config":
            out["config"].update({c.key: json.loads(c.value_json) for c in r.config.update})
        elif kind == "history":
            row = {key(i): json.loads(i.value_json) for i in r.history.item}
            if r.history.HasField("step"):
                row.setdefault("_step", r.history.step.num)
            out["history"].append(row)
        elif kind == "summary":
            out["summary"].update({key(i): json.loads(i.value_json) for i in r.summary.update})
    return out
