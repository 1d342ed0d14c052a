"""Where the parts of a transformer live, per model family.

Editing methods never hard-code module paths: they ask the model's :class:`ArchSpec` for
"the MLP output projection of block 5" and get the module, together with how it stores its
weight (GPT-2's ``Conv1D`` keeps ``(in, out)``; ``nn.Linear`` keeps ``(out, in)``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn


class UnsupportedArchitecture(ValueError):
    """The model's family is not one EditScope knows how to edit."""


@dataclass(frozen=True)
class ArchSpec:
    """Module paths of one model family (paths are dotted attribute names).

    ``blocks`` is relative to the model; every other block-level path is relative to one block.
    ``mlp_in`` lists the projections that read the residual stream (two for gated MLPs).
    """

    family: str
    blocks: str
    embed: str
    final_norm: str
    lm_head: str
    mlp: str
    mlp_in: tuple[str, ...]
    mlp_out: str
    attn: str
    attn_out: str
    conv1d: bool  # projections stored as transformers' Conv1D with weight (in, out)
    position_embed: str | None = None

    # -- module access -------------------------------------------------------------------------
    def get_blocks(self, model: nn.Module) -> nn.ModuleList:
        return _get(model, self.blocks)

    def n_layers(self, model: nn.Module) -> int:
        return len(self.get_blocks(model))

    def block(self, model: nn.Module, layer: int) -> nn.Module:
        return self.get_blocks(model)[layer]

    def block_name(self, layer: int) -> str:
        return f"{self.blocks}.{layer}"

    def module_name(self, layer: int, part: str) -> str:
        """Full dotted name of a block-level part, e.g. ``module_name(3, arch.mlp_out)``."""
        return f"{self.blocks}.{layer}.{part}"

    def mlp_out_name(self, layer: int) -> str:
        return self.module_name(layer, self.mlp_out)

    def mlp_name(self, layer: int) -> str:
        return self.module_name(layer, self.mlp)

    def attn_name(self, layer: int) -> str:
        return self.module_name(layer, self.attn)

    def module(self, model: nn.Module, name: str) -> nn.Module:
        return _get(model, name)

    # -- weights ---------------------------------------------------------------------------------
    def weight_out_in(self, module: nn.Module) -> torch.Tensor:
        """The projection's weight as an ``(out, in)`` view (edits through it change the model)."""
        weight = module.weight
        return weight.T if self.conv1d else weight

    def mlp_out_weight(self, model: nn.Module, layer: int) -> torch.Tensor:
        """``(d_model, d_ff)`` view of the MLP output projection of ``layer``."""
        return self.weight_out_in(self.module(model, self.mlp_out_name(layer)))

    def d_ff(self, model: nn.Module) -> int:
        return self.mlp_out_weight(model, 0).shape[1]

    def d_model(self, model: nn.Module) -> int:
        return self.mlp_out_weight(model, 0).shape[0]


def _get(root: nn.Module, dotted: str):
    obj = root
    for part in dotted.split("."):
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
    return obj


_GPT2 = ArchSpec(
    family="gpt2", blocks="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    lm_head="lm_head", mlp="mlp", mlp_in=("mlp.c_fc",), mlp_out="mlp.c_proj", attn="attn",
    attn_out="attn.c_proj", conv1d=True, position_embed="transformer.wpe",
)
_GPTJ = ArchSpec(
    family="gptj", blocks="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
    lm_head="lm_head", mlp="mlp", mlp_in=("mlp.fc_in",), mlp_out="mlp.fc_out", attn="attn",
    attn_out="attn.out_proj", conv1d=False,
)
_NEOX = ArchSpec(
    family="gpt_neox", blocks="gpt_neox.layers", embed="gpt_neox.embed_in",
    final_norm="gpt_neox.final_layer_norm", lm_head="lm_head", mlp="mlp",
    mlp_in=("mlp.dense_h_to_4h",), mlp_out="mlp.dense_4h_to_h", attn="attention",
    attn_out="attention.dense", conv1d=False,
)
_LLAMA = ArchSpec(
    family="llama", blocks="model.layers", embed="model.embed_tokens", final_norm="model.norm",
    lm_head="lm_head", mlp="mlp", mlp_in=("mlp.gate_proj", "mlp.up_proj"), mlp_out="mlp.down_proj",
    attn="self_attn", attn_out="self_attn.o_proj", conv1d=False,
)

#: config.model_type -> ArchSpec
ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": _GPT2,
    "gptj": _GPTJ,
    "gpt_neox": _NEOX,
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
}

SUPPORTED_FAMILIES = "GPT-2, GPT-J, GPT-NeoX/Pythia, LLaMA-style (LLaMA, Mistral, Qwen2)"


def arch_for(model: nn.Module) -> ArchSpec:
    """Resolve the ArchSpec of a Hugging Face causal LM and check every path exists."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    spec = ARCHITECTURES.get(model_type or "")
    if spec is None:
        raise UnsupportedArchitecture(
            f"Model type {model_type!r} is not supported. EditScope supports {SUPPORTED_FAMILIES} "
            f"(config.model_type one of {sorted(ARCHITECTURES)})."
        )
    if not hasattr(model, spec.lm_head):
        # GPT-NeoX's head is `embed_out` in older transformers releases, `lm_head` in newer ones.
        for candidate in ("lm_head", "embed_out"):
            if hasattr(model, candidate):
                spec = replace(spec, lm_head=candidate)
                break
    try:
        _get(model, spec.embed), _get(model, spec.final_norm), _get(model, spec.lm_head)
        block = spec.block(model, 0)
        for part in (spec.mlp, spec.mlp_out, spec.attn, spec.attn_out, *spec.mlp_in):
            _get(block, part)
    except (AttributeError, IndexError) as err:
        raise UnsupportedArchitecture(
            f"Model of type {model_type!r} does not have the expected layout ({err}); "
            f"supported: {SUPPORTED_FAMILIES}."
        ) from err
    return spec
