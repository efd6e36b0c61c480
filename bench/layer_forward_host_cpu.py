"""Host time of one layer call: nn.Linear / nn.Conv2d against QuantLinear / QuantConv2d with their
weight handed over by a group (the eager packed path), on the CPU.

    python bench/layer_forward_host_cpu.py --out OUT.json

Why: an eager SD1.5 step is host-bound and makes 282 such calls (184 linear, 98 conv); whether a
packed layer's own forward costs more or less host time than the dense layer it replaces tells how
much of the packed step's extra host time the layers themselves can explain, and how much is
elsewhere (the arming, or GPU-path costs).  Tiny shapes so that the op's own work is negligible;
minimum over repeats of ``--number`` calls.
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from quantsd.nn import QuantConv2d, QuantLinear, set_armed_calls  # noqa: E402
from quantsd.quant import quantize_tensor  # noqa: E402


def _armed(layer):
    """``layer`` as an eager prehook group's member: the armed call (``set_armed_calls``) and its weight
    handed over as a group's arm does (a one-member hand-over cell)."""
    set_armed_calls(layer, True)
    layer.__dict__["_arm_cell"] = [[layer.dequantized_weight()]]
    return layer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--number", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    lin, conv = nn.Linear(8, 8), nn.Conv2d(8, 8, 3, padding=1)
    qlin = _armed(QuantLinear.from_linear(lin, quantize_tensor(lin.weight.detach(), 4, "pwlq", "tensor")))
    qconv = _armed(QuantConv2d.from_conv(conv, quantize_tensor(conv.weight.detach(), 4, "pwlq", "tensor")))
    x, xc = torch.randn(2, 8), torch.randn(1, 8, 4, 4)
    w = qlin._armed
    module_call = nn.Module.__call__
    cases = {"nn.Linear": lambda: lin(x), "QuantLinear armed": lambda: qlin(x),
             # the same layers through nn.Module.__call__ and forward: the call path before session 18
             "QuantLinear armed, nn.Module.__call__": lambda: module_call(qlin, x),
             "F.linear alone": lambda: torch.nn.functional.linear(x, w, lin.bias),
             "nn.Conv2d": lambda: conv(xc), "QuantConv2d armed": lambda: qconv(xc),
             "QuantConv2d armed, nn.Module.__call__": lambda: module_call(qconv, xc)}
    res: dict = {"us_per_call": {}}
    with torch.inference_mode():
        for name, fn in cases.items():
            res["us_per_call"][name] = round(min(timeit.repeat(fn, number=a.number, repeat=a.repeat)) / a.number * 1e6, 3)
    us = res["us_per_call"]
    res["packed_minus_dense_us"] = {"linear": round(us["QuantLinear armed"] - us["nn.Linear"], 3),
                                    "conv": round(us["QuantConv2d armed"] - us["nn.Conv2d"], 3)}
    res["armed_call_saves_us"] = {"linear": round(us["QuantLinear armed, nn.Module.__call__"] - us["QuantLinear armed"], 3),
                                 "conv": round(us["QuantConv2d armed, nn.Module.__call__"] - us["QuantConv2d armed"], 3)}
    # an SD1.5 step: 184 linear and 98 conv layer calls
    res["sd15_step_packed_minus_dense_us"] = round(184 * res["packed_minus_dense_us"]["linear"]
                                                   + 98 * res["packed_minus_dense_us"]["conv"], 1)
    res["sd15_step_armed_call_saves_us"] = round(184 * res["armed_call_saves_us"]["linear"]
                                                + 98 * res["armed_call_saves_us"]["conv"], 1)
    res["torch"] = torch.__version__
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
