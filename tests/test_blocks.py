import collections

import pytest

from quantsd.blocks import COMPONENTS, component_roots, get_module, list_blocks


def _partition_check(pipe):
    blocks = list_blocks(pipe)
    seen = collections.Counter()
    for b in blocks:
        module = get_module(pipe, b.name)
        for name, p in module.named_parameters():
            seen[id(p)] += 1
    every = {id(p) for _, _, root in component_roots(pipe) for p in root.parameters()}
    assert set(seen) == every, "partition misses parameters"
    assert all(v == 1 for v in seen.values()), "a parameter is in two blocks"
    assert sum(b.n_params for b in blocks) == sum(
        p.numel() for _, _, root in component_roots(pipe) for p in root.parameters())
    names = [b.name for b in blocks]
    assert len(names) == len(set(names))
    return blocks


def test_tiny_partition_covers_every_parameter_once(tiny_pipe):
    blocks = _partition_check(tiny_pipe)
    assert {b.component for b in blocks} == set(COMPONENTS)


def test_sd15_partition_covers_every_parameter_once(sd15_meta_pipe):
    blocks = _partition_check(sd15_meta_pipe)
    names = {b.name for b in blocks}
    for expected in ("text_encoder.encoder.layers.3", "unet.down_blocks.1.attentions.0",
                     "unet.mid_block", "unet.up_blocks.2.resnets.1", "vae.decoder.up_blocks.3",
                     "vae.decoder.conv_out"):
        assert expected in names
    unet = [b.name for b in blocks if b.component == "unet"]
    # forward order: down blocks, then the middle block, then up blocks
    assert unet.index("unet.down_blocks.3.resnets.1") < unet.index("unet.mid_block") < unet.index(
        "unet.up_blocks.0.resnets.0")
    # roughly 5-10 layers a block: no huge block apart from the middle block
    big = [b.name for b in blocks if b.n_layers > 12]
    assert big == ["unet.mid_block"]


def test_vae_encoder_listed_separately_not_quantized(tiny_pipe):
    with_enc = list_blocks(tiny_pipe, include_vae_encoder=True)
    enc = [b for b in with_enc if b.component == "vae_encoder"]
    assert enc and not any(b.quantized_by_default for b in enc)
    assert all(b.quantized_by_default for b in list_blocks(tiny_pipe))


def test_block_bytes_and_layers(tiny_pipe):
    b = next(b for b in list_blocks(tiny_pipe) if b.name == "unet.conv_in")
    w = tiny_pipe.unet.conv_in
    assert b.n_params == w.weight.numel() + w.bias.numel()
    assert b.fp16_bytes == 2 * b.n_params
    assert b.layer_names == ("unet.conv_in",)


def test_get_module_unknown_component(tiny_pipe):
    with pytest.raises(KeyError, match="no component"):
        get_module(tiny_pipe, "transformer.blocks.0")
