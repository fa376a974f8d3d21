"""The canonical attn2 order: official key index i -> ldm / diffusers layer names.

The table (tests/core/sd1_layer_table.py) is written out from docs/method.md (section 6),
independently of the constants in ssr.layers, because a wrong mapping loads silently and
spoils every image.
"""
from __future__ import annotations

import pytest

from ssr import layers as L
from tests.core.sd1_layer_table import ATTN2, DIFFUSERS_NAMES, LDM_NAMES, METHOD_DOC_TABLE, OFFICIAL


def test_official_index_maps_to_method_doc_table():
    assert OFFICIAL == list(range(1, 32, 2))
    for i in OFFICIAL:
        j = L.canonical_position(i)
        assert L.official_index(j) == i
        diffusers, ldm, width = METHOD_DOC_TABLE[i]
        assert L.SD1_DIFFUSERS_LAYERS[j] == diffusers + ATTN2, i
        assert L.SD1_LDM_LAYERS[j] == ldm + ATTN2, i
        assert L.SD1_WIDTHS[j] == width, i
    assert len(L.SD1_LDM_LAYERS) == len(L.SD1_DIFFUSERS_LAYERS) == len(L.SD1_WIDTHS) == 16


@pytest.mark.parametrize("bad", [0, 2, 32, -1])
def test_canonical_position_rejects_even_or_nonpositive(bad):
    with pytest.raises(ValueError, match="odd"):
        L.canonical_position(bad)


def test_find_layers_ldm_order(ldm_unet_pristine):
    found = L.find_cross_attention_layers(ldm_unet_pristine)
    assert [name for name, _ in found] == LDM_NAMES
    assert all(module is ldm_unet_pristine.get_submodule(name) for name, module in found)
    # tiny widths are the SD1.5 widths / 10
    assert [m.to_q.out_features * 10 for _, m in found] == [METHOD_DOC_TABLE[i][2] for i in OFFICIAL]


def test_find_layers_diffusers_order(diffusers_unet_pristine):
    found = L.find_cross_attention_layers(diffusers_unet_pristine)
    assert [name for name, _ in found] == DIFFUSERS_NAMES
    assert [m.to_q.out_features * 10 for _, m in found] == [METHOD_DOC_TABLE[i][2] for i in OFFICIAL]


def test_ldm_and_diffusers_layers_correspond(ldm_unet_pristine, diffusers_unet_pristine):
    """Same canonical position -> same width and same spatial level in both UNets."""
    ldm = L.find_cross_attention_layers(ldm_unet_pristine)
    dif = L.find_cross_attention_layers(diffusers_unet_pristine)
    assert [m.to_q.out_features for _, m in ldm] == [m.to_q.out_features for _, m in dif]
