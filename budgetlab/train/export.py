"""Final export to <stage>/model/: Hugging Face format, loadable by from_pretrained.

LoRA stages are exported *merged* (base + adapter folded into full weights): the next stage
and every evaluation engine (transformers, vLLM) then load model/ like any other checkpoint,
with no base model to locate on the compute node. The adapter is kept beside it in
model/adapter/ for inspection. ZeRO-3 parameters are gathered onto rank 0 first.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from budgetlab import dist
from budgetlab.stagedir import atomic_write_json


def full_state_dict(engine, zero_stage: int):
    """The whole model's state dict on rank 0 (None elsewhere). Collective under ZeRO-3."""
    if zero_stage == 3:
        return engine._zero3_consolidated_16bit_state_dict()
    return engine.module.state_dict()


def export(engine, cfg, tokenizer, model_dir: Path, env, info: dict, fresh_model=None) -> None:
    """Write model_dir atomically (tmp dir + rename). fresh_model() builds an unsharded copy
    of the trained architecture on rank 0, needed to merge a LoRA adapter trained under ZeRO-3."""
    model_dir = Path(model_dir)
    state = full_state_dict(engine, cfg.zero_stage)
    if env.rank == 0:
        tmp = model_dir.with_name(f".{model_dir.name}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model = engine.module
        if cfg.zero_stage == 3 and cfg.finetune == "lora":
            # merging needs real tensors: an unsharded copy takes the gathered weights
            # (full finetuning saves the gathered state dict directly, no second copy)
            model = fresh_model()
            missing, unexpected = model.load_state_dict(state, strict=False)
            if unexpected or [k for k in missing if "lora_" in k]:
                raise RuntimeError(f"export: gathered state does not match the model "
                                   f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
            state = None
        if cfg.finetune == "lora":
            model.save_pretrained(tmp / "adapter")
            model = model.merge_and_unload()
            state = None
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / "budgetlab.json", info)
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
    dist.barrier()
