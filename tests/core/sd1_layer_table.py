"""The table in docs/method.md of SD1 attn2 layers (section 6), written independently of
ssr.layers so the tests can check that module against it."""

ATTN2 = ".transformer_blocks.0.attn2"
# official i: (diffusers block, ldm block, width at SD1.5 size)
METHOD_DOC_TABLE = {
    1: ("down_blocks.0.attentions.0", "input_blocks.1.1", 320),
    3: ("down_blocks.0.attentions.1", "input_blocks.2.1", 320),
    5: ("down_blocks.1.attentions.0", "input_blocks.4.1", 640),
    7: ("down_blocks.1.attentions.1", "input_blocks.5.1", 640),
    9: ("down_blocks.2.attentions.0", "input_blocks.7.1", 1280),
    11: ("down_blocks.2.attentions.1", "input_blocks.8.1", 1280),
    13: ("up_blocks.1.attentions.0", "output_blocks.3.1", 1280),
    15: ("up_blocks.1.attentions.1", "output_blocks.4.1", 1280),
    17: ("up_blocks.1.attentions.2", "output_blocks.5.1", 1280),
    19: ("up_blocks.2.attentions.0", "output_blocks.6.1", 640),
    21: ("up_blocks.2.attentions.1", "output_blocks.7.1", 640),
    23: ("up_blocks.2.attentions.2", "output_blocks.8.1", 640),
    25: ("up_blocks.3.attentions.0", "output_blocks.9.1", 320),
    27: ("up_blocks.3.attentions.1", "output_blocks.10.1", 320),
    29: ("up_blocks.3.attentions.2", "output_blocks.11.1", 320),
    31: ("mid_block.attentions.0", "middle_block.1", 1280),
}
OFFICIAL = sorted(METHOD_DOC_TABLE)
DIFFUSERS_NAMES = [METHOD_DOC_TABLE[i][0] + ATTN2 for i in OFFICIAL]
LDM_NAMES = [METHOD_DOC_TABLE[i][1] + ATTN2 for i in OFFICIAL]

