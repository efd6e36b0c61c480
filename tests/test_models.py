import pytest
import torch
from diffusers import StableDiffusionPipeline

import quantsd
from quantsd.models import ModelSourceError, load_pipeline


def _params(module):
    return sum(p.numel() for p in module.parameters())


def test_tiny_is_deterministic_and_small():
    a, b, c = load_pipeline("tiny", seed=0), load_pipeline("tiny", seed=0), load_pipeline("tiny", seed=1)
    wa, wb, wc = (p.unet.conv_in.weight for p in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    total = sum(_params(getattr(a, n)) for n in ("text_encoder", "unet", "vae"))
    assert total * 4 < 8 * 2**20  # a few MB at fp32


def test_tiny_generates_offline(tiny_pipe):
    out = tiny_pipe("a red circle on the left", num_inference_steps=2, output_type="np",
                    generator=torch.Generator().manual_seed(0))
    img = out.images[0]
    assert img.shape == (32, 32, 3)
    assert 0.0 <= img.min() and img.max() <= 1.0


def test_sd15_arch_parameter_counts(sd15_meta_pipe):
    p = sd15_meta_pipe
    assert _params(p.unet) == 859_520_964
    assert _params(p.text_encoder) == 123_060_480
    assert _params(p.vae.decoder) + _params(p.vae.post_quant_conv) == 49_490_199
    assert p.unet.conv_in.weight.device.type == "meta"


def test_local_directory_roundtrip(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    loaded = quantsd.load_pipeline(str(tmp_path / "pipe"), dtype="float16")
    assert isinstance(loaded, StableDiffusionPipeline)
    assert loaded.unet.dtype == torch.float16
    ref = tiny_pipe.unet.conv_in.weight.to(torch.float16)
    assert torch.equal(loaded.unet.conv_in.weight, ref)
    assert loaded.tokenizer("a red circle").input_ids == tiny_pipe.tokenizer("a red circle").input_ids


def test_directory_without_model_index_is_a_clear_error(tmp_path):
    with pytest.raises(ModelSourceError, match="model_index.json"):
        load_pipeline(str(tmp_path))


def test_unknown_model_names_valid_choices():
    with pytest.raises(ModelSourceError, match="tiny, sd15-arch, fixture"):
        load_pipeline("not-a-model")


def test_unreachable_hub_id_suggests_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelSourceError, match="local directory"):
        load_pipeline("no-such-org/no-such-model")


def test_bad_dtype_is_a_clear_error():
    with pytest.raises(ModelSourceError, match="float16"):
        load_pipeline("tiny", dtype="float13")
