"""Fingerprint stage: every generated face carries its model instance's 128-bit code.

Implements the inventor's side of papers/004, Ch. 5 (artificial fingerprints, Sec. 5.4 and
the null-hypothesis test of Eq. 5.5) and Ch. 6 (one code per model instance, 128 bits):

  registry      the database of issued codes (SQLite file or PostgreSQL), code <-> hex helpers
  verification  bit accuracy, binomial p-value (Eq. 5.5), the empirical false-positive rate
                calibrated on measured negatives, and the Verdict
  attacks       image perturbations and the robustness sweep shared by every protection
  posthoc       the post-hoc DWT-DCT watermark baseline (invisible-watermark)

Heavy optional dependencies (SQLAlchemy, scipy, matplotlib, OpenCV) are imported by the
submodules that need them, so ``import faceprint.fingerprint`` stays light.
"""

from __future__ import annotations

CODE_BITS = 128

__all__ = ["CODE_BITS"]
