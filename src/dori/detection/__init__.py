"""Detection of memorized prompts: one file per detector behind :class:`dori.detection.base.Detector`.

* ``wen``: Wen et al.'s text-conditional noise magnitude (:mod:`dori.detection.wen`);
* ``nemo``: NeMo's memorization score (:mod:`dori.detection.nemo_score`);
* ``trajectory``: the latent-trajectory deviation of *How Diffusion Models Memorize*
  (:mod:`dori.detection.trajectory`).

Metrics (AUC, strict TPR at a fixed FPR, ROC) are in :mod:`dori.detection.metrics`; the resumable per-prompt
runner behind ``dori detect`` in :mod:`dori.detection.run`.
"""

from dori.detection import nemo_score, trajectory, wen  # noqa: F401  (register the detectors)
from dori.detection.base import DETECTORS, Detector, build_detector, register

__all__ = ["DETECTORS", "Detector", "build_detector", "register"]
