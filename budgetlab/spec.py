"""The grid spec (DESIGN section 3): TOML in, a validated GridSpec out, or one BadInput line.

Every check runs before anything is written. Errors read `FILE: KEY: reason`.
Relative paths (models, data files) are resolved against the current directory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from budgetlab import hub
from budgetlab.alloc import allocate
from budgetlab.errors import BadInput

METHODS = ("dpo", "kto")
TRAIN_KINDS = ("sft", "dpo", "kto")
STAGE_KINDS = ("sft", "dpo", "kto", "eval")

# A checker returns an error reason, or None when the value is fine.
def _int(lo=None, hi=None):
    def check(v):
        if not isinstance(v, int) or isinstance(v, bool):
            return f"expected an integer, got {_show(v)}"
        if lo is not None and v < lo:
            return f"must be >= {lo}, got {v}"
        if hi is not None and v > hi:
            return f"must be <= {hi}, got {v}"
    return check


def _num(lo=None, hi=None, lo_open=False, hi_open=False):
    def check(v):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            return f"expected a number, got {_show(v)}"
        if lo is not None and (v <= lo if lo_open else v < lo):
            return f"must be {'>' if lo_open else '>='} {lo}, got {v}"
        if hi is not None and (v >= hi if hi_open else v > hi):
            return f"must be {'<' if hi_open else '<='} {hi}, got {v}"
    return check


def _choice(*options):
    def check(v):
        if v not in options:
            return f"must be one of {', '.join(map(repr, options))}, got {_show(v)}"
    return check


def _bool(v):
    if not isinstance(v, bool):
        return f"expected true or false, got {_show(v)}"


def _str(v):
    if not isinstance(v, str) or not v:
        return f"expected a non-empty string, got {_show(v)}"


def _sbatch_value(v):
    # Values become `#SBATCH --key=value` lines: a newline would start a directive of its own.
    if not isinstance(v, str) or not v:
        return f"expected a non-empty string, got {_show(v)}"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in v):
        return f"control characters (newline, tab, ...) are not allowed, got {_show(v)}"


def _sbatch_list(v):
    if not isinstance(v, list):
        return f"expected a list of strings, got {_show(v)}"
    for x in v:
        reason = _sbatch_value(x)
        if reason:
            return reason


def _lora_targets(v):
    if v == "all-linear":
        return None
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return None
    return f"expected \"all-linear\" or a list of module names, got {_show(v)}"


def _show(v) -> str:
    text = repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


COMMON_TRAIN = {
    "finetune": _choice("full", "lora"),
    "max_length": _int(8),
    "epochs": _int(1),
    "lr": _num(0, lo_open=True),
    "batch_size": _int(1),
    "warmup_ratio": _num(0, 1, hi_open=True),
    "lr_scheduler": _choice("cosine", "linear", "constant"),
    "weight_decay": _num(0),
    "max_grad_norm": _num(0, lo_open=True),
    "lora_r": _int(1),
    "lora_alpha": _int(1),
    "lora_dropout": _num(0, 1, hi_open=True),
    "lora_targets": _lora_targets,
    "truncation": _choice("truncate", "drop"),
    "packing": _bool,
}
KIND_TRAIN = {
    "sft": {},
    "dpo": {"beta": _num(0, lo_open=True), "label_smoothing": _num(0, 0.5, hi_open=True)},
    "kto": {"beta": _num(0, lo_open=True), "desirable_weight": _num(0, lo_open=True),
            "undesirable_weight": _num(0, lo_open=True),
            "batch_unit": _choice("pairs", "examples")},
}
TRAIN_DEFAULTS = {
    "finetune": "full", "max_length": 1024, "epochs": 2, "batch_size": 16,
    "warmup_ratio": 0.1, "lr_scheduler": "cosine", "weight_decay": 0.0, "max_grad_norm": 1.0,
    "lora_r": 32, "lora_alpha": 32, "lora_dropout": 0.0, "lora_targets": "all-linear",
    "truncation": "truncate", "packing": True,
}
KIND_DEFAULTS = {
    "sft": {"lr": 5e-5},
    "dpo": {"lr": 5e-6, "beta": 0.1, "label_smoothing": 0.0},
    # batch_unit: what KTO's batch_size counts. "pairs" (each pair gives two KTO examples, so
    # an optimizer step sees as many pairs as DPO's at the same batch_size, and the two take the
    # same number of steps); "examples" is the meaning before the key existed (twice the steps).
    "kto": {"lr": 5e-6, "beta": 0.1, "desirable_weight": 1.0, "undesirable_weight": 1.0,
            "batch_unit": "pairs"},
}
# A training key whose value is dropped from the stage's params (and so from its id): the
# behaviour of stage specs written before the key existed. KTO stages planned before
# batch_unit counted examples; they keep their ids, and "pairs" (the default) gets new ones.
TRAIN_LEGACY = {"kto": {"batch_unit": "examples"}}
def _text(v):
    if not isinstance(v, str):
        return f"expected a string, got {_show(v)}"


def _prompt_template(v):
    if not isinstance(v, str) or "{prompt}" not in v:
        return f"expected a string containing {{prompt}}, got {_show(v)}"


EVAL_KEYS = {
    "limit": _int(1), "max_new_tokens": _int(1), "batch_size": _int(1),
    "engine": _choice("hf", "vllm"), "baseline": _bool,
    # The evaluation protocol (docs/evaluation.md): how prompts are framed and decoded.
    "chat_template": _choice("auto", "tokenizer", "chatml", "none"),
    "system_prompt": _text, "prompt_template": _prompt_template,
    "temperature": _num(0), "top_p": _num(0, 1, lo_open=True), "seed": _int(0),
    "samples": _int(1),
}
EVAL_DEFAULTS = {"limit": 500, "max_new_tokens": 256, "batch_size": 32, "engine": "hf",
                 "baseline": True}
# Protocol keys at these values are dropped from the spec, so that an eval stage's id (which
# hashes the [eval] keys) is the same whether a default is written out or left unset, and the
# same as before these keys existed. system_prompt unset = the task's own.
EVAL_PROTOCOL_DEFAULTS = {"chat_template": "auto", "prompt_template": "{prompt}",
                          "temperature": 0.0, "top_p": 1.0, "seed": 0, "samples": 1}
RESOURCE_KEYS = {
    "nodes": _int(1), "gpus_per_node": _int(0), "tasks_per_node": _int(1),
    "cpus_per_task": _int(1), "mem_gb": _num(0, lo_open=True), "time_min": _num(0, lo_open=True),
    "micro_batch_size": _int(1), "zero_stage": _int(0, 3), "checkpoint_every": _int(1),
    "keep_checkpoints": _int(1), "gradient_checkpointing": _bool,
    # Requeues in a row without checkpoint progress before a job gives up (TIMEOUT).
    "max_requeues": _int(0),
    # Seconds before the time limit that SLURM sends the checkpoint signal (unset: a quarter
    # of the limit, 15 to 120 s); a model that takes long to save needs more.
    "signal_before_s": _int(1),
}
RESOURCE_DEFAULTS = {
    "nodes": 1, "gpus_per_node": 0, "cpus_per_task": 2, "mem_gb": 8, "time_min": 60,
    "micro_batch_size": 4, "zero_stage": 2, "checkpoint_every": 50, "keep_checkpoints": 2,
    "max_requeues": 3,
}
SLURM_KEYS = {
    "partition": _sbatch_value, "account": _sbatch_value, "qos": _sbatch_value,
    "constraint": _sbatch_value, "exclude": _sbatch_value,
    "array_parallelism": _int(1), "max_array_size": _int(1), "extra_sbatch": _sbatch_list,
    "snapshot_code": _bool,
}
SLURM_DEFAULTS = {"array_parallelism": 64}
LOCAL_KEYS = {"max_parallel": _int(1)}
LOCAL_DEFAULTS = {"max_parallel": 2}
COSTS_KEYS = {
    "unit": _choice("examples", "usd"), "sft_example": _num(0, lo_open=True),
    "preference_pair": _num(0, lo_open=True), "gpu_hour_usd": _num(0, lo_open=True),
}
COSTS_DEFAULTS = {"unit": "examples", "sft_example": 1.0, "preference_pair": 1.0}
GRID_KEYS = ("tasks", "models", "budgets", "sft_fractions", "methods", "seeds")


def _tags(v):
    if not isinstance(v, list) or not all(isinstance(x, str) and 0 < len(x) <= 64 for x in v):
        return f"expected a list of strings of 1 to 64 characters, got {_show(v)}"


# Experiment tracking (budgetlab.tracking): how runs are logged, never what they compute, so
# not part of any stage id.
TRACKING_KEYS = {
    "backend": _choice("none", "wandb", "tensorboard"), "project": _sbatch_value,
    "entity": _sbatch_value, "mode": _choice("online", "offline"), "tags": _tags,
}
TOP_KEYS = ("name", "grid", "costs", "train", "eval", "data", "resources", "slurm", "local",
            "tracking")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w.-]+)?$")  # org/name[@revision]
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".gz")
_NAME = re.compile(r"^[A-Za-z0-9][\w.-]{0,99}$")


@dataclass(frozen=True)
class GridSpec:
    name: str
    path: str
    tasks: tuple[str, ...]
    models: tuple[str, ...]
    budgets: tuple[float, ...]
    sft_fractions: tuple[float, ...]
    methods: tuple[str, ...]
    seeds: tuple[int, ...]
    costs: dict
    train: dict          # kind -> full hyper-parameters (defaults merged)
    eval: dict
    data: dict           # task -> {key: absolute path}
    data_hashes: dict    # absolute path -> sha256 of the file; hub id -> "hub:id[@commit]"
    models_resolved: dict  # model ref as written -> canonical ref (abs path for local dirs)
    resources: dict      # kind -> resources (defaults merged)
    slurm: dict
    local: dict
    # What stage ids hash: model ref -> canonical ref, with "@commit" for a hub model whose
    # revision is known; task -> {data key -> content hash or hub identity} for every source
    # the task reads (local overrides and the task's default hub sources).
    model_ids: dict = field(default_factory=dict)
    source_ids: dict = field(default_factory=dict)
    tracking: dict = field(default_factory=lambda: {"backend": "none"})
    text: str = field(repr=False, default="")

    def to_dict(self) -> dict:
        """Everything the plan is built from, as JSON: the ledger keeps it, so that a grid is
        re-planned (re-pricing) from what was registered, never from today's files."""
        out = dataclasses.asdict(self)
        out.pop("text")
        return out

    @classmethod
    def from_dict(cls, d: dict, text: str = "") -> "GridSpec":
        d = dict(d)
        for k in ("tasks", "models", "budgets", "sft_fractions", "methods", "seeds"):
            d[k] = tuple(d[k])
        return cls(**d, text=text)


class _Checker:
    def __init__(self, file: str):
        self.file = file

    def fail(self, key: str, reason: str):
        raise BadInput(f"{self.file}: {key}: {reason}")

    def table(self, obj, key: str) -> dict:
        if not isinstance(obj, dict):
            self.fail(key, f"expected a table, got {_show(obj)}")
        return obj

    def keys(self, obj: dict, prefix: str, allowed) -> None:
        for k in obj:
            if k not in allowed:
                self.fail(f"{prefix}{k}", f"unknown key (expected one of: {', '.join(sorted(allowed))})")

    def values(self, obj: dict, prefix: str, checkers: dict) -> dict:
        self.keys(obj, prefix, checkers)
        for k, v in obj.items():
            reason = checkers[k](v)
            if reason:
                self.fail(f"{prefix}{k}", reason)
        return obj

    def listed(self, grid: dict, key: str, check) -> list:
        if key not in grid:
            self.fail(f"grid.{key}", "missing (a non-empty list is required)")
        vals = grid[key]
        if not isinstance(vals, list) or not vals:
            self.fail(f"grid.{key}", f"expected a non-empty list, got {_show(vals)}")
        seen = set()
        for v in vals:
            reason = check(v)
            if reason:
                self.fail(f"grid.{key}", f"{reason}")
            if v in seen:
                self.fail(f"grid.{key}", f"duplicate value {_show(v)}")
            seen.add(v)
        return vals


def load_spec(path: str | Path) -> GridSpec:
    """Read and validate a grid spec; BadInput (one line) on any problem."""
    path = Path(path)
    file = str(path)
    try:
        raw_bytes = path.read_bytes()
    except FileNotFoundError:
        raise BadInput(f"{file}: no such grid spec file") from None
    except (IsADirectoryError, PermissionError) as e:
        raise BadInput(f"{file}: cannot read ({e.strerror})") from None
    try:
        text = raw_bytes.decode("utf-8")
        raw = tomllib.loads(text)
    except UnicodeDecodeError:
        raise BadInput(f"{file}: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as e:
        raise BadInput(f"{file}: invalid TOML: {e}") from None
    return parse_spec(raw, file, text)


def parse_spec(raw: dict, file: str = "<spec>", text: str = "") -> GridSpec:
    c = _Checker(file)
    c.keys(raw, "", TOP_KEYS)
    name = raw.get("name")
    if name is None:
        c.fail("name", "missing (the grid's key in the ledger)")
    if not isinstance(name, str) or not _NAME.match(name):
        c.fail("name", f"expected a name of letters, digits, '.', '_', '-' (got {_show(name)})")

    grid = c.table(raw.get("grid"), "grid") if "grid" in raw else c.fail("grid", "missing table")
    c.keys(grid, "grid.", GRID_KEYS)
    from budgetlab.builtin import NAMES as BUILTINS
    from budgetlab.tasks import DATA_KEYS, TASKS

    tasks = c.listed(grid, "tasks", _choice(*TASKS))
    models = c.listed(grid, "models", _str)
    budgets = c.listed(grid, "budgets", _num(0, lo_open=True))
    fractions = c.listed(grid, "sft_fractions", _num(0, 1))
    methods = c.listed(grid, "methods", _choice(*METHODS))
    seeds = c.listed(grid, "seeds", _int(0))

    costs = dict(COSTS_DEFAULTS)
    costs.update(c.values(c.table(raw.get("costs", {}), "costs"), "costs.", COSTS_KEYS))

    models_resolved = {m: _resolve_model(c, i, m, BUILTINS) for i, m in enumerate(models)}

    # Every cell must buy at least one example of each stage it needs.
    for b in budgets:
        for f in fractions:
            n_sft, n_pft = allocate(b, f, costs["sft_example"], costs["preference_pair"])
            if f > 0 and n_sft == 0:
                c.fail("grid.sft_fractions", f"budget {b:g} x fraction {f:g} buys 0 SFT examples "
                       f"at sft_example = {costs['sft_example']:g}")
            if f < 1 and n_pft == 0:
                c.fail("grid.sft_fractions", f"budget {b:g} x fraction {f:g} buys 0 preference "
                       f"pairs at preference_pair = {costs['preference_pair']:g}")

    train = _parse_train(c, c.table(raw.get("train", {}), "train"))
    ev = dict(EVAL_DEFAULTS)
    ev.update(c.values(c.table(raw.get("eval", {}), "eval"), "eval.", EVAL_KEYS))
    _check_protocol(c, ev)
    resources = _parse_resources(c, c.table(raw.get("resources", {}), "resources"))
    for kind in TRAIN_KINDS:
        r = resources[kind]
        ranks = r["nodes"] * r["tasks_per_node"]
        if train[kind]["batch_size"] % (r["micro_batch_size"] * ranks):
            c.fail(f"resources.{kind}.micro_batch_size",
                   f"train.{kind}.batch_size {train[kind]['batch_size']} is not a multiple of "
                   f"micro_batch_size {r['micro_batch_size']} x {ranks} rank(s)")
    slurm = dict(SLURM_DEFAULTS)
    slurm.update(c.values(c.table(raw.get("slurm", {}), "slurm"), "slurm.", SLURM_KEYS))
    local = dict(LOCAL_DEFAULTS)
    local.update(c.values(c.table(raw.get("local", {}), "local"), "local.", LOCAL_KEYS))
    data, hashes = _parse_data(c, c.table(raw.get("data", {}), "data"), tasks, DATA_KEYS)
    tracking = _parse_tracking(c, c.table(raw.get("tracking", {}), "tracking"))
    model_ids = {m: hub.identity(ref, "model") if _HUB_ID.match(ref) else ref
                 for m, ref in models_resolved.items()}

    return GridSpec(
        name=name, path=str(Path(file).resolve()) if file != "<spec>" else file,
        tasks=tuple(tasks), models=tuple(models), budgets=tuple(budgets),
        sft_fractions=tuple(float(f) for f in fractions), methods=tuple(methods),
        seeds=tuple(seeds), costs=costs, train=train, eval=ev, data=data, data_hashes=hashes,
        models_resolved=models_resolved, resources=resources, slurm=slurm, local=local,
        text=text, model_ids=model_ids, tracking=tracking,
        source_ids={t: _source_ids(t, data.get(t, {}), hashes) for t in tasks},
    )


def _check_protocol(c: _Checker, ev: dict) -> None:
    """Cross-key checks of the evaluation protocol; defaults dropped (EVAL_PROTOCOL_DEFAULTS)."""
    sampling = ev.get("temperature", 0.0) > 0
    if ev.get("samples", 1) > 1 and not sampling:
        c.fail("eval.samples", f"{ev['samples']} samples need temperature > 0 (greedy decoding "
               "gives the same completion every time)")
    for key in ("top_p", "seed"):
        if key in ev and not sampling and ev[key] != EVAL_PROTOCOL_DEFAULTS[key]:
            c.fail(f"eval.{key}", "only used when sampling: set temperature > 0")
    if ev.get("chat_template") == "none" and ev.get("system_prompt"):
        c.fail("eval.system_prompt", "needs a chat template (chat_template = \"none\")")
    for key in ("temperature", "top_p"):      # 1 and 1.0 are the same setting (and id)
        if key in ev:
            ev[key] = float(ev[key])
    for key, default in EVAL_PROTOCOL_DEFAULTS.items():
        if key in ev and ev[key] == default:
            del ev[key]

def _parse_tracking(c: _Checker, raw: dict) -> dict:
    tr = {"backend": "none", **c.values(raw, "tracking.", TRACKING_KEYS)}
    backend = tr["backend"]
    if backend == "none":
        extra = sorted(set(tr) - {"backend"})
        if extra:
            c.fail(f"tracking.{extra[0]}", 'needs tracking.backend = "wandb" or "tensorboard"')
        return tr
    if backend == "wandb":
        tr.setdefault("mode", "offline")   # compute nodes often have no network
        if importlib.util.find_spec("wandb") is None:
            c.fail("tracking.backend", "wandb is not installed (pip install 'budgetlab[wandb]')")
    else:
        for k in ("project", "entity", "mode"):
            if k in tr:
                c.fail(f"tracking.{k}", "is a W&B setting (tracking.backend is tensorboard)")
        if importlib.util.find_spec("tensorboard") is None:
            c.fail("tracking.backend", "tensorboard is not installed (pip install tensorboard)")
    return tr


def _source_ids(task: str, data: dict, hashes: dict) -> dict:
    """Every source a task reads -> what identifies its content (see GridSpec.source_ids)."""
    from budgetlab.tasks import default_sources

    out = {}
    for key, default in default_sources(task).items():
        if key in data:
            out[key] = hashes[data[key]]
        elif isinstance(default, tuple):   # (hub id, config, split)
            hub_id, config, split = default
            kind = "model" if key == "reward_model" else "dataset"
            out[key] = f"{hub.identity(hub_id, kind)}/{config or ''}/{split or ''}"
        else:
            out[key] = str(default)        # generated by budgetlab itself (builtin:...)
    for key, path in data.items():         # overrides of keys with no default
        out.setdefault(key, hashes[path])
    return out


def _resolve_model(c: _Checker, i: int, ref: str, builtins) -> str:
    key = f"grid.models[{i}]"
    if ref.startswith("builtin:"):
        if ref[len("builtin:"):] not in builtins:
            c.fail(key, f"unknown built-in model {ref!r} (known: "
                   f"{', '.join('builtin:' + n for n in builtins)})")
        return ref
    p = Path(ref).expanduser()
    if ref.startswith(("/", ".", "~")) or p.exists():
        if not p.exists():
            c.fail(key, f"model path {ref!r} does not exist")
        if not p.is_dir():
            c.fail(key, f"model path {ref!r} is not a directory")
        return str(p.resolve())
    if _HUB_ID.match(ref):
        return ref  # a hub id: resolved by the worker, never at plan time
    c.fail(key, f"{ref!r} is neither builtin:NAME, an existing directory, nor a hub id ORG/NAME")


def _layered(c: _Checker, raw: dict, name: str, kinds, common_keys: dict, kind_keys, defaults):
    """A table whose keys apply to every kind and whose [NAME.KIND] subtables override them:
    {kind: defaults(kind) + common keys + the kind's own keys}."""
    common = {k: v for k, v in raw.items() if k not in kinds}
    c.values(common, f"{name}.", common_keys)
    out = {}
    for kind in kinds:
        section = c.table(raw.get(kind, {}), f"{name}.{kind}")
        c.values(section, f"{name}.{kind}.", {**common_keys, **kind_keys(kind)})
        out[kind] = {**defaults(kind), **common, **section}
    return out


def _parse_train(c: _Checker, raw: dict) -> dict:
    train = _layered(c, raw, "train", TRAIN_KINDS, COMMON_TRAIN, KIND_TRAIN.get,
                     lambda kind: {**TRAIN_DEFAULTS, **KIND_DEFAULTS[kind]})
    for kind, legacy in TRAIN_LEGACY.items():
        for key, value in legacy.items():
            if train[kind].get(key) == value:
                del train[kind][key]
    return train


def _parse_resources(c: _Checker, raw: dict) -> dict:
    out = _layered(c, raw, "resources", STAGE_KINDS, RESOURCE_KEYS, lambda kind: {},
                   lambda kind: RESOURCE_DEFAULTS)
    for kind, r in out.items():
        # One rank per GPU; on CPU one rank unless the spec asks for more.
        r.setdefault("tasks_per_node", max(r["gpus_per_node"], 1))
        if r["gpus_per_node"] and r["tasks_per_node"] != r["gpus_per_node"]:
            c.fail(f"resources.{kind}.tasks_per_node",
                   f"must equal gpus_per_node ({r['gpus_per_node']}): one rank per GPU")
        limit_s = slurm_time_min(r) * 60
        if r.get("signal_before_s") and r["signal_before_s"] >= limit_s:
            c.fail(f"resources.{kind}.signal_before_s",
                   f"must be less than the time limit ({limit_s} s)")
    return out


def slurm_time_min(res: dict) -> int:
    """The time limit SLURM gets: whole minutes, at least one."""
    return max(1, round(float(res["time_min"])))


def signal_before_s(res: dict) -> int:
    """Seconds before the time limit of the pre-timeout (checkpoint) signal: the resources'
    signal_before_s, else a quarter of the limit, 15 to 120 s (early enough to checkpoint,
    never before a short job starts)."""
    if res.get("signal_before_s"):
        return int(res["signal_before_s"])
    return int(min(120, max(15, slurm_time_min(res) * 60 * 0.25)))


def _parse_data(c: _Checker, raw: dict, tasks, data_keys) -> tuple[dict, dict]:
    data, hashes = {}, {}
    for task, section in raw.items():
        if task not in tasks:
            c.fail(f"data.{task}", f"task {task!r} is not in grid.tasks")
        section = c.table(section, f"data.{task}")
        c.keys(section, f"data.{task}.", data_keys[task])
        data[task] = {}
        for key, value in section.items():
            if not isinstance(value, str) or not value:
                c.fail(f"data.{task}.{key}", f"expected a path, got {_show(value)}")
            p = Path(value).expanduser()
            if p.exists():
                p = p.resolve()
                data[task][key] = str(p)
                hashes[str(p)] = _content_hash(p)
            elif _HUB_ID.match(value) and not value.endswith(_FILE_SUFFIXES):
                data[task][key] = value  # another hub dataset/model: resolved by the worker
                hashes[value] = hub.identity(value, "model" if key == "reward_model"
                                             else "dataset")
            else:
                c.fail(f"data.{task}.{key}", f"{value!r} does not exist")
    return data, hashes


def _content_hash(p: Path) -> str:
    """sha256 of a data file's bytes; for a directory (a model, a parquet folder), of its
    file names and sizes, since reading gigabytes of weights at every plan is too slow."""
    h = hashlib.sha256()
    if p.is_file():
        with open(p, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(f"{f.relative_to(p)}\0{f.stat().st_size}\n".encode())
    return h.hexdigest()
