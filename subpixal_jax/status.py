"""One vocabulary of outcomes: per source, per image, per run.

The library compares these enums; their text appears only at the edges
(tables, ECSV summaries, FITS headers, the command line), spelled as the
summaries have always spelled it (``SUCCESS``, ``FAILED: <reason>``, ...), so
stored summaries still load (:meth:`ImageOutcome.parse`).

- :class:`SourceFlag`: bits of one source's measurement, the kernels' peak
  flags and the refinement's flags in one non-overlapping bit space.
- :class:`ImageStatus` with :class:`ImageOutcome` (status plus reason): what
  happened to one image in one iteration, and finally.
- :class:`RunStatus` with :class:`RunOutcome`: how the loop ended.
- :class:`TieGrade`: how far an absolute tie to a reference catalog can be
  trusted.
"""

from __future__ import annotations

import dataclasses
import enum

from subpixal_jax.core import refine as _refine
from subpixal_jax.core.peak import PeakFlag

#: Refinement flags sit above the peak flags (bits 8-11).
_REFINE_SHIFT = 8


class SourceFlag(enum.IntFlag):
    """Why a source's displacement is not used (0 = a good measurement).

    The low bits are the peak finder's (:class:`subpixal_jax.core.peak.PeakFlag`,
    same values); the refinement's own bits are moved up by 8; the loop's
    bits sit at 16 and above.
    """

    EDGE = PeakFlag.EDGE
    NO_MAXIMUM = PeakFlag.NO_MAXIMUM
    TOO_FEW_POINTS = PeakFlag.TOO_FEW_POINTS
    NONFINITE = PeakFlag.NONFINITE
    VERTEX_OUTSIDE = PeakFlag.VERTEX_OUTSIDE
    INVALID_INPUT = PeakFlag.INVALID_INPUT
    #: The correlation peak lies at the edge of the lags the cutout allows
    #: (the true offset may be larger than the cutout can show).
    LAG_WINDOW = PeakFlag.LAG_WINDOW
    REFINE_NO_PIXELS = _refine.FLAG_NO_PIXELS << _REFINE_SHIFT
    REFINE_DEGENERATE = _refine.FLAG_DEGENERATE << _REFINE_SHIFT
    REFINE_NOT_CONVERGED = _refine.FLAG_NOT_CONVERGED << _REFINE_SHIFT
    REFINE_NON_FINITE = _refine.FLAG_NON_FINITE << _REFINE_SHIFT
    #: The displacement came back non-finite without a kernel flag.
    NOT_FINITE = 1 << 16
    #: The least-squares refinement failed; the cross-correlation flags are kept.
    REFINE_FAILED = 1 << 17


def refine_flags(flags):
    """Map :mod:`subpixal_jax.core.refine` flag values into :class:`SourceFlag` bits.

    Examples
    --------
    >>> SourceFlag(refine_flags(4)) == SourceFlag.REFINE_NOT_CONVERGED
    True
    """
    return flags << _REFINE_SHIFT


class ImageStatus(enum.Enum):
    """What happened to one image (in one iteration, or at the end of a run)."""

    #: Fitted, and its correction applied.
    SUCCESS = "SUCCESS"
    #: Could not be fitted (too few sources, singular fit, ...).
    FAILED = "FAILED"
    #: Nothing to measure (e.g. no catalog source overlaps it).
    SKIPPED = "SKIPPED"
    #: Held fixed as the astrometric reference.
    REFERENCE = "REFERENCE"
    #: Fitted, but the run did not converge, so its correction is not trusted.
    NOT_CONVERGED = "NOT_CONVERGED"


@dataclasses.dataclass(frozen=True)
class ImageOutcome:
    """An :class:`ImageStatus` with the reason that explains it.

    Examples
    --------
    >>> o = ImageOutcome(ImageStatus.FAILED, "too few sources (2 usable)")
    >>> str(o)
    'FAILED: too few sources (2 usable)'
    >>> ImageOutcome.parse(str(o)) == o
    True
    """

    status: ImageStatus
    reason: str = ""

    def __str__(self) -> str:
        return (
            f"{self.status.value}: {self.reason}" if self.reason else self.status.value
        )

    @property
    def ok(self) -> bool:
        """True for an image whose correction was applied (SUCCESS)."""
        return self.status is ImageStatus.SUCCESS

    @classmethod
    def parse(cls, text: str) -> ImageOutcome:
        """Read the text form back (summaries written by any version)."""
        head, _, reason = str(text).partition(":")
        return cls(ImageStatus(head.strip()), reason.strip())


class RunStatus(enum.Enum):
    """How an alignment run ended."""

    #: Every image's shift fell below ``eps_shift``.
    CONVERGED = "CONVERGED"
    #: The iteration limit was reached first.
    MAX_ITERATIONS = "MAX_ITERATIONS"
    #: The ``on_iteration`` callback asked to stop.
    STOPPED = "STOPPED"
    #: The largest shift grew markedly twice in a row.
    DIVERGED = "DIVERGED"
    #: No image could be aligned.
    FAILED = "FAILED"


@dataclasses.dataclass(frozen=True)
class RunOutcome:
    """A :class:`RunStatus` with its reason.

    Compares equal to its text form, so a script may test ``result.status``
    against ``"CONVERGED"``; the library itself compares :attr:`status`.

    Examples
    --------
    >>> str(RunOutcome(RunStatus.FAILED, "no image could be aligned"))
    'FAILED: no image could be aligned'
    """

    status: RunStatus
    reason: str = ""

    def __str__(self) -> str:
        return (
            f"{self.status.value}: {self.reason}" if self.reason else self.status.value
        )

    def __eq__(self, other: object) -> bool:
        if isinstance(other, str):
            return str(self) == other
        if isinstance(other, RunOutcome):
            return (self.status, self.reason) == (other.status, other.reason)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(str(self))

    def __contains__(self, text: str) -> bool:
        return text in str(self)

    @property
    def converged(self) -> bool:
        """True when the run converged."""
        return self.status is RunStatus.CONVERGED


class TieGrade(enum.Enum):
    """How far an absolute tie to a reference catalog can be trusted.

    Graded from the tie's residual RMS and star count
    (:func:`subpixal_jax.reference.refcat.tie_grade`).
    """

    #: Many stars, residuals at the level of the positions' errors.
    GOOD = "GOOD"
    #: Few stars, or residuals well above the positions' errors.
    FAIR = "FAIR"
    #: Residuals of a large fraction of a pixel: check the catalog and epoch.
    POOR = "POOR"
    #: No tie was made (too few or ambiguous matches); nothing applied.
    FAILED = "FAILED"
