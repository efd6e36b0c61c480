"""Evaluation: generation harness, FID / KID / IS, rFID / rKID, latent MSE, PSNR, adherence, reports.

    from quantsd.eval import evaluate
    results = evaluate("out/ckpt", reference="fixture", num_prompts=1024, out="eval/fixture/paper-final")

See docs/EVAL.md. Submodules: :mod:`.core` (``evaluate``), :mod:`.data` (prompts, real images),
:mod:`.features` (Inception extractors), :mod:`.metrics` (torchmetrics + numpy cross-checks),
:mod:`.store` (resumable on-disk stores), :mod:`.dist` (accelerate / torchrun sharding),
:mod:`.report` (Markdown tables).
"""

from .core import EvalConfig, EvalError, evaluate, model_identity, model_info  # noqa: F401
from .data import EvalInputError  # noqa: F401
from .features import InceptionUnavailable, load_extractor  # noqa: F401
from .report import aggregate, merge_table, render_table, write_table  # noqa: F401

__all__ = ["EvalConfig", "EvalError", "EvalInputError", "InceptionUnavailable", "aggregate", "evaluate",
           "load_extractor", "merge_table", "model_identity", "model_info", "render_table", "write_table"]
