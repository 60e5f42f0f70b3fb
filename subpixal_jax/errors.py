"""Exceptions raised by the host side of subpixal_jax.

Inside jit, failures are data (status codes); these exceptions are raised only
by host wrappers, and only when the caller asks (``throw=True``) or before any
file is touched.
"""


class SubpixalError(Exception):
    """Base class of every subpixal_jax exception."""


class NotEnoughPointsError(SubpixalError, ValueError):
    """A fit had fewer valid points than its geometry needs.

    Also a ``ValueError``, as tweakwcs raises there, so code written for
    tweakwcs catches it.
    """


class SingularMatrixError(SubpixalError):
    """A fit's normal equations were singular or gave non-finite parameters."""


class NoOverlapError(SubpixalError, ValueError):
    """A cutout box lies completely outside its parent image."""


class PartialOverlapError(SubpixalError, ValueError):
    """A cutout box lies partly outside its parent image (strict mode)."""


class AlignmentError(SubpixalError):
    """An image could not be aligned (raised only with ``throw=True``)."""
