"""LoRA on the base model's weights through peft, while the CoMeT memory modules
train fully.

    apply_lora(model, rank=16)         # before building the Trainer
    ...train...
    model.save_pretrained(folder)      # adapters and their settings: from_pretrained re-applies them
    merge_lora(model)                  # or fold the adapters into the weights (plain checkpoint)

Adapters are injected in place (peft.inject_adapter_in_model), so the model
keeps its layout and every comet_ext path (read, generate, the pipeline) works
unchanged.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def apply_lora(model, rank: int = 16, alpha: float = 32.0, dropout: float = 0.0,
               target_modules: Sequence[str] = DEFAULT_TARGETS) -> int:
    """Injects LoRA adapters into the base decoder's linear layers and freezes the
    base weights; memory modules and the compression / readout embeddings stay
    trainable. Returns the number of trainable parameters."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise ImportError("apply_lora needs peft: pip install peft") from e
    if rank < 1:
        raise ValueError(f"apply_lora: rank must be >= 1, got {rank}")
    if model.comet_lora is not None or lora_parameters(model):
        # peft would add a second adapter beside the first and re-initialise the weights it
        # shares: the trained adapters would be lost
        raise ValueError(f"apply_lora: the model already has LoRA adapters ({model.comet_lora}); train them as "
                         "they are, or merge_lora(model) first to fold them into the weights")
    # merge_lora gives each base weight back the trainability it had here
    model._lora_frozen_base = {n for n, p in model.base.named_parameters() if not p.requires_grad}
    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules),
                        bias="none")
    inject_adapter_in_model(config, model.base.model)
    for name, p in model.base.named_parameters():
        p.requires_grad_("lora_" in name)
    # save_pretrained writes these beside the adapters' weights; from_pretrained re-applies them
    model.comet_lora = {"rank": rank, "alpha": alpha, "dropout": dropout, "target_modules": list(target_modules)}
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model) -> None:
    """Folds every LoRA adapter into its base weight and removes the adapter modules. Base
    weights become trainable again, but for those frozen before apply_lora."""
    from peft.tuners.lora import LoraLayer

    for parent in list(model.base.model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, LoraLayer):
                child.merge()
                setattr(parent, child_name, child.get_base_layer())
    frozen = getattr(model, "_lora_frozen_base", set())  # what the user had frozen before apply_lora
    for name, p in model.base.named_parameters():
        p.requires_grad_(name not in frozen)
    model.comet_lora = None
    model._lora_frozen_base = set()


def lora_parameters(model) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if "lora_" in n]
