import json

from click.testing import CliRunner

from quantsd import __version__
from quantsd.cli import main


def test_version():
    r = CliRunner().invoke(main, ["--version"])
    assert r.exit_code == 0 and __version__ in r.output


def test_blocks_json_matches_library(tiny_pipe):
    from quantsd.blocks import list_blocks

    r = CliRunner().invoke(main, ["blocks", "-m", "tiny", "--format", "json", "--no-vae-encoder"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert [d["name"] for d in data] == [b.name for b in list_blocks(tiny_pipe)]
    assert sum(d["n_params"] for d in data) == sum(b.n_params for b in list_blocks(tiny_pipe))


def test_blocks_human_lists_totals():
    r = CliRunner().invoke(main, ["blocks", "-m", "tiny"])
    assert r.exit_code == 0, r.output
    assert "unet.mid_block" in r.output and "vae_encoder (not quantized)" in r.output
    assert "component" in r.output.splitlines()[-6]


def test_unknown_model_is_a_usage_error():
    r = CliRunner().invoke(main, ["blocks", "-m", "nope"])
    assert r.exit_code != 0
    assert "unknown model 'nope'" in r.output and "'org/name'" in r.output


def test_every_command_has_help():
    for name in main.commands:
        r = CliRunner().invoke(main, [name, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output
