"""The vision benchmark: every method and budget against the unreduced model, on several
datasets, in one process.

For each dataset and configuration the same images go through the unpatched model and the
patched one:

- CLS-feature cosine (mean, and the 5th percentile with a bootstrap standard error);
- leave-one-out k-NN accuracy (k = 20, cosine; bank and queries from the model under test);
- a cross-fitted linear probe trained on the *unreduced* features;
- decision agreement of k-NN and probe with the unreduced model, with standard errors;
- saliency agreement: the real dense head is fed tokens unmerged back onto the patch grid
  (Pearson r and IoU of the top 10% pixels against the unreduced heatmap);
- measured throughput ratio against the unpatched model on that dataset's images
  (interleaved runs, median);
- analytic FLOPs ratio and the tokens reached at each layer.

The baselines of :mod:`..baselines` run beside the methods: downsampling (the same images
fitted to smaller sides, a ladder of input sizes) and random pruning (at the methods' budgets);
each method's quality is set against downsampling's (and constant-r ToMe's) at the speed the
method reached, on the same dataset, and every curve is tabulated at the same speed-ups.
``--autotune`` adds the plans :func:`tokenmerge.tune.autotune` finds on each dataset's
calibration images, ``--plan`` saved ones. The hardest dataset (lowest mean cos p05) heads the
report.

:mod:`.measure` runs the measurements; :mod:`.cli` is ``tokenmerge bench`` and its report.
"""

from .cli import QUICK, cli_main
from .measure import (
    DATASETS,
    TASKS,
    VisionBenchConfig,
    check_datasets,
    difficulty,
    hardest_first,
    load_dataset,
    run,
)

__all__ = [
    "DATASETS",
    "QUICK",
    "TASKS",
    "VisionBenchConfig",
    "check_datasets",
    "cli_main",
    "difficulty",
    "hardest_first",
    "load_dataset",
    "run",
]
