"""The alignment options: one frozen, self-validating record.

:class:`AlignOptions` is the single place where an option is declared,
documented and validated. :func:`subpixal_jax.align.align_images` builds it
from its keyword arguments (the seed's names, :meth:`AlignOptions.create`),
the loop reads it, and the command line generates its option flags from its
fields (:func:`add_arguments`, :func:`from_arguments`), so the three cannot
disagree.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from subpixal_jax.core.interp import KERNELS
from subpixal_jax.core.linfit import FITGEOM_MIN_POINTS
from subpixal_jax.core.peak import PEAK_FITS

FITGEOMS = tuple(FITGEOM_MIN_POINTS)
CC_TYPES = ("CC", "NCC", "ZNCC")
WCSUPDATES = ("batch", "otf")
REFINES = (None, "sources", "transform")
HISTORIES = ("all", "last", None)
SIGMA_STATS = ("rmse", "mae", "std")
WEIGHTINGS = ("catalog", "measured")


def _option(default: Any, help: str, *, cli: bool = True, **argparse_kw) -> Any:
    """Declare an option field with its command-line help (``cli=False``: API only)."""
    meta = {"help": help, "cli": cli, "argparse": argparse_kw}
    return dataclasses.field(default=default, metadata=meta)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fail(name: str, expected: str, value: Any) -> None:
    msg = f"{name} must be {expected}, got {value!r}"
    raise ValueError(msg)


def _positive_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0


def _one_of(choices: tuple) -> tuple[Any, str]:
    return (lambda value: value in choices), f"one of {choices}"


def _int_at_least(low: int, *, optional: bool = False) -> tuple[Any, str]:
    def valid(value: Any) -> bool:
        return (optional and value is None) or (_is_int(value) and value >= low)

    kind = {0: "a non-negative int", 1: "a positive int"}.get(low, f"an int >= {low}")
    return valid, kind + (" or None" if optional else "")


_BOOL = ((lambda value: isinstance(value, bool)), "True or False")

#: Case-insensitive options are normalised before they are checked.
_NORMALISE = {
    "fitgeom": lambda v: str(v).strip().lower(),
    "cc_type": lambda v: str(v).strip().upper(),
    "wcsupdate": lambda v: str(v).strip().lower(),
}

#: Every option's check: (predicate, what a valid value is).
_CHECKS: dict[str, tuple[Any, str]] = {
    "fitgeom": _one_of(FITGEOMS),
    "cc_type": _one_of(CC_TYPES),
    "wcsupdate": _one_of(WCSUPDATES),
    "interp": _one_of(tuple(KERNELS)),
    "peak_fit": _one_of(PEAK_FITS),
    "refine": _one_of(REFINES),
    "history": _one_of(HISTORIES),
    "sigma_stat": _one_of(SIGMA_STATS),
    "nclip": _int_at_least(0),
    "max_iterations": _int_at_least(1),
    "max_full_resamples": _int_at_least(1),
    "eps_shift": (_positive_number, "a positive number"),
    "reference": _int_at_least(0, optional=True),
    "search_radius": _int_at_least(1, optional=True),
    "use_weights": _BOOL,
    "clip_normalized": _BOOL,
    "weighting": _one_of(WEIGHTINGS),
    "combine_seg_mask": _BOOL,
    "keep_diagnostics": _BOOL,
    "joint": _BOOL,
    "cr_reject": ((lambda v: v is None or isinstance(v, bool)), "True, False or None"),
    "capture": _one_of(("auto", "always", "off")),
    "capture_min_matches": _int_at_least(3),
    "capture_max_shift": (
        (lambda v: v is None or _positive_number(v)),
        "a positive number or None",
    ),
    "capture_max_rotation": (
        (lambda v: v is None or _positive_number(v)),
        "a positive number or None",
    ),
    "absolute_fitgeom": _one_of(("shift", "rscale")),
}


@dataclasses.dataclass(frozen=True)
class AlignOptions:
    """Options of one alignment run (validated and normalised on creation).

    Examples
    --------
    >>> AlignOptions(fitgeom="RScale").fitgeom
    'rscale'
    >>> AlignOptions.create(nmax=(5, 2), sigma=(2.5, "mae")).max_full_resamples
    2
    >>> AlignOptions(cc_type="XCORR")
    Traceback (most recent call last):
    ...
    ValueError: cc_type must be one of ('CC', 'NCC', 'ZNCC'), got 'XCORR'
    """

    fitgeom: str = _option("general", "fit geometry", choices=FITGEOMS, type=str.lower)
    nclip: int = _option(3, "clipping passes of the linear fit", type=int)
    sigma: float = _option(3.0, "clipping limit in units of sigma_stat", type=float)
    sigma_stat: str = _option(
        "rmse", "statistic the clipping limit is measured in", choices=SIGMA_STATS
    )
    max_iterations: int = _option(10, "maximum number of iterations", type=int)
    max_full_resamples: int = _option(
        2,
        "iterations that redo the catalog and cosmic-ray rejection (the first "
        "ones; at most max_iterations)",
        type=int,
    )
    eps_shift: float = _option(
        0.003,
        "stop when every image's shift is below this (fit-frame pixels)",
        type=float,
        metavar="PX",
    )
    use_weights: bool = _option(
        True, "weight sources by their position errors in the fit"
    )
    # 'measured' by measurement: on the default set 0.0047 px RMS (seeds
    # 0-2, with clip_normalized) against 0.0116 for 'catalog'; each image's
    # excess error joins every point's so that early iterations and small
    # sets do not rest on a few bright sources (docs/accuracy.md §2.4).
    weighting: str = _option(
        "measured",
        "fit weights: the catalog's position errors or each measurement's own",
        choices=WEIGHTINGS,
        type=str,
    )
    # On by default: the plain clip at 3x the weighted RMS (which the bright
    # sources set) drops the faint sources for noise their weights allow:
    # 936 of 1077 kept instead of about half, kept pull std 0.92 for 0.78,
    # and a first pass that keeps half its sources no longer looks like an
    # offset beyond the cutouts.
    clip_normalized: bool = _option(
        True, "clip each residual in units of its own error (not the plain RMS)"
    )
    cc_type: str = _option(
        "NCC", "cross-correlation normalisation", choices=CC_TYPES, type=str.upper
    )
    interp: str = _option("poly5", "blot interpolation kernel", choices=tuple(KERNELS))
    # The quadratic fit by default: per source the Lagrange model is closer to
    # the Cramér-Rao bound at high S/N, but end to end it measured no better
    # (HST simulator 0.0156/0.0118 vs 0.0154/0.0149 px; JWST simulator 0.0138
    # vs 0.0104 px) at 1.5x the cost. The template fit reaches the bound per
    # source, but on the default set gives RMS 0.0085 px against 0.0047.
    peak_fit: str = _option(
        "quadratic",
        "peak model of the interlaced correlation: quadratic (the original's 5x5 "
        "fit), lagrange (7x7 interpolating polynomial, no grid locking) or "
        "template (a noise-weighted fit of the blot at the continuous lag: "
        "at the Cramer-Rao bound per source, worse end to end so far)",
        choices=PEAK_FITS,
    )
    wcsupdate: str = _option(
        "batch",
        "update all images after each pass (batch) or each at once (otf)",
        choices=WCSUPDATES,
    )
    combine_seg_mask: bool = _option(
        True, "reference cutouts keep only the source's own segment"
    )
    history: str | None = _option(
        "last", "which iterations to keep in the result", cli=False
    )
    reference: int | None = _option(
        None,
        "index (0-based) of an image held fixed as the astrometric reference",
        type=int,
        metavar="INDEX",
    )
    search_radius: int | None = _option(
        None, "restrict the peak search to lags within this radius (px)", type=int
    )
    keep_diagnostics: bool = _option(
        False, "keep cutouts and blots in the history (for plots)", cli=False
    )
    cr_reject: bool | None = _option(
        None,
        "cosmic-ray handling: median-image catalog and rejection once aligned "
        "(default: on with 3 or more images)",
    )
    joint: bool = _option(True, "solve the batch corrections of all images jointly")
    capture: str = _option(
        "auto",
        "coarse catalog matching for offsets larger than the cutouts: auto (when "
        "the first pass cannot measure an image), always, or off",
        choices=("auto", "always", "off"),
    )
    capture_min_matches: int = _option(
        15, "fewest matched sources the capture accepts", type=int
    )
    capture_max_shift: float | None = _option(
        None,
        "largest offset the capture searches (fit-frame px; default unlimited)",
        type=float,
        metavar="PX",
    )
    capture_max_rotation: float | None = _option(
        None,
        "largest rotation the capture searches (degrees; default unlimited)",
        type=float,
        metavar="DEG",
    )
    absolute_fitgeom: str = _option(
        "shift",
        "fit geometry of the tie to a reference catalog (--reference-catalog)",
        choices=("shift", "rscale"),
    )
    refine: str | None = _option(
        None,
        "least-squares refinement through the blot: of every displacement "
        "(sources) or of each image's transform (transform)",
        choices=("sources", "transform"),
    )

    def __post_init__(self) -> None:
        for name, normalise in _NORMALISE.items():
            object.__setattr__(self, name, normalise(getattr(self, name)))
        for name, (valid, expected) in _CHECKS.items():
            value = getattr(self, name)
            if not valid(value):
                _fail(name, expected, value)
        if isinstance(self.sigma, bool) or not float(self.sigma) > 0:
            _fail("sigma", "a positive number", self.sigma)
        object.__setattr__(self, "sigma", float(self.sigma))
        object.__setattr__(self, "eps_shift", float(self.eps_shift))
        # Two full resamples by default, never more than there are iterations.
        full = min(self.max_full_resamples, self.max_iterations)
        object.__setattr__(self, "max_full_resamples", full)

    @classmethod
    def create(cls, **kwargs: Any) -> AlignOptions:
        """Build the options from :func:`~subpixal_jax.align.align_images`' keywords.

        Accepts the field names and the seed's compound forms: ``nmax`` (an
        int: that many iterations with two full resamples; or a pair
        ``(iterations, full resamples)``) and ``sigma`` (a number, or
        ``(value, 'rmse'|'mae'|'std')``).
        """
        if "nmax" in kwargs:
            total, full = _parse_nmax(kwargs.pop("nmax"))
            kwargs.update(max_iterations=total, max_full_resamples=full)
        if isinstance(kwargs.get("sigma"), tuple | list):
            sigma = kwargs.pop("sigma")
            if len(sigma) != 2:
                _fail("sigma", "a number or (value, 'rmse'|'mae'|'std')", sigma)
            kwargs.update(sigma=sigma[0], sigma_stat=sigma[1])
        unknown = sorted(set(kwargs) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            msg = f"unknown alignment option(s): {', '.join(unknown)}"
            raise TypeError(msg)
        for name in ("reference", "search_radius", "nclip"):
            value = kwargs.get(name)
            if value is not None and hasattr(value, "__index__") and not _is_int(value):
                kwargs[name] = int(value)  # numpy integers
        return cls(**kwargs)

    @classmethod
    def keywords(cls) -> frozenset[str]:
        """Return the keyword names :meth:`create` accepts."""
        return frozenset({f.name for f in dataclasses.fields(cls)} | {"nmax"})

    def to_dict(self) -> dict[str, Any]:
        """Return the options as a plain dict (for summaries and checkpoints)."""
        return dataclasses.asdict(self)


def _parse_nmax(nmax: Any) -> tuple[int, int]:
    if isinstance(nmax, bool):
        _fail("nmax", "an int or a pair of ints", nmax)
    if hasattr(nmax, "__index__"):
        # The second full resample redoes cosmic-ray rejection and the catalog
        # once the first correction has aligned the images.
        return int(nmax), 2
    try:
        total, full = (int(v) for v in nmax)
    except (TypeError, ValueError):
        _fail("nmax", "an int or a pair (iterations, full resamples)", nmax)
    if not 1 <= full <= total:
        _fail("nmax", "a pair with 1 <= full resamples <= iterations", nmax)
    return total, full


# --------------------------------------------------------------------------
# The command line, generated from the fields
# --------------------------------------------------------------------------


def cli_fields() -> list[dataclasses.Field]:
    """Return the fields of :class:`AlignOptions` that have a command-line flag."""
    return [f for f in dataclasses.fields(AlignOptions) if f.metadata["cli"]]


def flag_name(field: dataclasses.Field) -> str:
    """Return the flag of an option field (``--cc-type`` for ``cc_type``)."""
    return "--" + field.name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one flag per :class:`AlignOptions` field (``--nmax`` as a shorthand)."""
    group = parser.add_argument_group("alignment options")
    for field in cli_fields():
        extra = dict(field.metadata["argparse"])
        help_text = field.metadata["help"]
        if field.default is not None:
            help_text += f" (default {field.default})"
        if field.type in ("bool", "bool | None"):
            extra["action"] = argparse.BooleanOptionalAction
        group.add_argument(
            flag_name(field),
            dest=field.name,
            default=None,
            help=help_text,
            **extra,
        )
    group.add_argument(
        "--nmax",
        metavar="N[,M]",
        type=_nmax_text,
        help="shorthand for --max-iterations N [--max-full-resamples M]",
    )


def _nmax_text(text: str) -> tuple[int, int] | int:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) not in (1, 2):
        msg = f"expected N or N,M (integers), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return values[0] if len(values) == 1 else tuple(values)


def from_arguments(args: argparse.Namespace, **overrides: Any) -> AlignOptions:
    """Build :class:`AlignOptions` from parsed flags (unset flags keep defaults)."""
    given: dict[str, Any] = {
        f.name: getattr(args, f.name)
        for f in cli_fields()
        if getattr(args, f.name, None) is not None
    }
    if getattr(args, "nmax", None) is not None:
        given["nmax"] = args.nmax
    given.update(overrides)
    return AlignOptions.create(**given)
