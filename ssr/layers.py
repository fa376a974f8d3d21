"""Which attn2 layer is which: the canonical order the released weights index.

The released ``pytorch_model_1.bin`` numbers *all* attention layers (attn1 and attn2) in
diffusers' module order: down blocks, up blocks, then the mid block (diffusers registers
``mid_block`` after ``up_blocks``). Its odd indices 1, 3, ..., 31 are the 16 attn2 layers.
The ``ldm`` UNet the WebUI uses registers input_blocks, middle_block, output_blocks, so its
middle layer must be moved to the end. Same-width layers can only be told apart by this
order: a wrong mapping loads silently and spoils every image.

Also the one table of model families by text-context width (768 SD1.x, 1024 SD2.x, 2048
SDXL) that every family check and message uses.
"""
from __future__ import annotations

from typing import List, Tuple

from torch import nn

# Canonical position j (0..15) -> official key index i = 2*j + 1, and the layer names.
SD1_LDM_LAYERS = (
    [f"input_blocks.{b}.1.transformer_blocks.0.attn2" for b in (1, 2, 4, 5, 7, 8)]
    + [f"output_blocks.{b}.1.transformer_blocks.0.attn2" for b in range(3, 12)]
    + ["middle_block.1.transformer_blocks.0.attn2"]
)
SD1_DIFFUSERS_LAYERS = (
    [f"down_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(3) for a in range(2)]
    + [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn2" for b in range(1, 4) for a in range(3)]
    + ["mid_block.attentions.0.transformer_blocks.0.attn2"]
)
SD1_WIDTHS = (320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280)

# Model family by the width of the attn2 layers' text context (the text encoder's width).
FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}
FAMILY_LABELS = {"sd1": "SD1.x", "sd2": "SD2.x", "sdxl": "SDXL"}

# Rank of each top-level group in the canonical order (ldm names, then diffusers names).
_GROUP_RANK = {
    "input_blocks": 0, "output_blocks": 1, "middle_block": 2,
    "down_blocks": 0, "up_blocks": 1, "mid_block": 2,
}


def family_label(context_dim: int, unknown: str = "unknown family") -> str:
    """"SD1.x", "SD2.x" or "SDXL" for a text-context width; ``unknown`` for any other width."""
    return FAMILY_LABELS.get(FAMILIES.get(int(context_dim), ""), unknown)


def official_index(position: int) -> int:
    """Canonical position j -> index i of ``{i}.to_k_SSR.weight`` in the released file."""
    return 2 * position + 1


def canonical_position(official: int) -> int:
    if official < 1 or official % 2 == 0:
        raise ValueError(f"official SSR layer index must be odd and >= 1, got {official}")
    return (official - 1) // 2


def find_cross_attention_layers(unet: nn.Module) -> List[Tuple[str, nn.Module]]:
    """-> [(name, attn2 module)] in canonical order, for an ``ldm`` UNetModel or a
    diffusers UNet2DConditionModel (module order within each group is kept)."""
    found = []
    for name, module in unet.named_modules():
        if name.endswith("attn2") and hasattr(module, "to_q") and hasattr(module, "to_out"):
            group = name.split(".", 1)[0]
            if group not in _GROUP_RANK:
                raise ValueError(f"unexpected cross-attention layer {name!r}: not an ldm or diffusers SD UNet")
            found.append((_GROUP_RANK[group], len(found), name, module))
    return [(name, module) for _, _, name, module in sorted(found, key=lambda t: (t[0], t[1]))]
