"""The alignment loop as a pure step over explicit state.

- :mod:`~subpixal_jax.pipeline.stages`: the separately callable stages of one
  iteration (cutouts, measurement, fit, joint solve, WCS correction).
- :mod:`~subpixal_jax.pipeline.state`: :class:`AlignState`, everything the
  loop carries from one iteration to the next, with checkpoints.
- :mod:`~subpixal_jax.pipeline.loop`: :func:`align_step`, the pure
  :func:`stop_reason` and :func:`run`, the driver that
  :func:`subpixal_jax.align_images` calls.
"""

from subpixal_jax.pipeline.loop import align_step, run, stop_reason
from subpixal_jax.pipeline.state import (
    AlignState,
    initial_state,
    load_state,
    save_state,
)

__all__ = [
    "AlignState",
    "align_step",
    "initial_state",
    "load_state",
    "run",
    "save_state",
    "stop_reason",
]
