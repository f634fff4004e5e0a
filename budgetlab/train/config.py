"""The settings of one training stage, read from spec.json (params + resources) and checked.

Every key is known and typed here; a wrong one is a one-line error naming the key and the value.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

KINDS = ("sft", "dpo", "kto")

# Defaults apply only where the spec leaves a key out (the grid normally writes them all).
# DPO/KTO learning rates are low on purpose: PAPER.md's miniature saw lr >= 1e-4 collapse
# generation after DPO; the spec still decides.
_KIND_DEFAULTS = {
    "sft": {"lr": 5e-5, "epochs": 2},
    "dpo": {"lr": 5e-6, "epochs": 2, "beta": 0.1},
    "kto": {"lr": 5e-6, "epochs": 2, "beta": 0.1},
}


@dataclass
class TrainConfig:
    kind: str = "sft"
    seed: int = 0
    # params
    finetune: str = "full"            # full | lora
    max_length: int = 1024
    epochs: int = 2
    lr: float = 5e-5
    batch_size: int = 16              # SFT examples, DPO pairs, KTO per batch_unit, per step
    # KTO: "pairs" (2 x batch_size KTO examples a step: DPO's pairs per step, DPO's step count)
    # or "examples". Absent from a stage spec = "examples": such specs (and their stage ids)
    # predate the key; grids write "pairs" explicitly (budgetlab.spec.TRAIN_LEGACY).
    batch_unit: str = "examples"
    warmup_ratio: float = 0.1
    lr_scheduler: str = "cosine"      # any transformers.get_scheduler name
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lora_r: int = 32
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_targets: object = "all-linear"   # "all-linear" or a list of module names
    truncation: str = "truncate"      # truncate (cut the response) | drop
    packing: bool = True              # pack sequences into rows (else pad per micro-batch)
    beta: float = 0.1                 # DPO / KTO
    label_smoothing: float = 0.0      # DPO
    nll_weight: float = 0.0           # DPO: add weight x NLL of the chosen response (0 = pure DPO)
    desirable_weight: float = 1.0     # KTO
    undesirable_weight: float = 1.0   # KTO
    reference: str = "precomputed"    # precomputed | online (a reference model every step)
    dtype: str = "auto"               # auto: bf16 on GPU, fp32 on CPU
    # resources
    micro_batch_size: int = 4
    zero_stage: int = 2
    checkpoint_every: int = 50        # optimizer steps; 0 = only on request and at the end
    keep_checkpoints: int = 2
    gradient_checkpointing: bool = False

    @classmethod
    def from_spec(cls, spec: dict) -> "TrainConfig":
        kind = spec.get("kind")
        if kind not in KINDS:
            raise ValueError(f"spec.json: kind {kind!r} is not a training stage ({', '.join(KINDS)})")
        names = {f.name: f for f in fields(cls)}
        values = dict(_KIND_DEFAULTS[kind])
        for section in ("params", "resources"):
            block = spec.get(section) or {}
            if not isinstance(block, dict):
                raise ValueError(f"spec.json: {section} must be an object, got {type(block).__name__}")
            for key, value in block.items():
                if section == "resources" and key not in names:
                    continue  # scheduler settings (nodes, time_min, ...) are not ours
                if key not in names or key in ("kind", "seed"):
                    raise ValueError(f"spec.json: unknown training parameter {section}.{key}")
                values[key] = value
        cfg = cls(kind=kind, seed=spec.get("seed", 0), **values)
        cfg.check()
        return cfg

    @property
    def examples_per_step(self) -> int:
        """Training examples in one optimizer step (KTO pairs count as two examples)."""
        pairs = self.kind == "kto" and self.batch_unit == "pairs"
        return self.batch_size * (2 if pairs else 1)

    def check(self) -> None:
        def bad(key, why):
            raise ValueError(f"spec.json: {key}={getattr(self, key)!r} {why}")

        types = {f.name: f.type for f in fields(self)}
        for key, t in types.items():
            v = getattr(self, key)
            if t == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                bad(key, "must be an integer")
            if t == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    bad(key, "must be a number")
                setattr(self, key, float(v))
            if t == "bool" and not isinstance(v, bool):
                bad(key, "must be true or false")
        for key in ("max_length", "epochs", "batch_size", "micro_batch_size", "lora_r"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        for key in ("checkpoint_every", "seed"):
            if getattr(self, key) < 0:
                bad(key, "must be >= 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if not self.lr > 0:
            bad("lr", "must be > 0")
        if not 0 <= self.warmup_ratio <= 1:
            bad("warmup_ratio", "must be in [0, 1]")
        if not 0 <= self.label_smoothing < 0.5:
            bad("label_smoothing", "must be in [0, 0.5)")
        if not self.beta > 0:
            bad("beta", "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        choices = {"finetune": ("full", "lora"), "truncation": ("truncate", "drop"),
                   "reference": ("precomputed", "online"), "zero_stage": (0, 1, 2, 3),
                   "dtype": ("auto", "bf16", "fp32"), "batch_unit": ("pairs", "examples")}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                bad(key, f"must be one of {', '.join(map(str, allowed))}")
        if not (self.lora_targets == "all-linear" or isinstance(self.lora_targets, list)
                and all(isinstance(t, str) for t in self.lora_targets)):
            bad("lora_targets", "must be 'all-linear' or a list of module names")
