"""Check a port of DoRA against dora_ref, in one call per operation.

Write your port in any framework, wrap it to take and return NumPy arrays,
and call::

    from dora_ref.porting import testing
    testing.check_forward(my_forward)                      # y
    testing.check_backward(my_backward, detach_norm=True)  # dx, dA, dB, dmagnitude
    testing.check_merge(my_merge, my_unmerge)              # W', then W0 back
    testing.check_init(my_init, my_forward)                # m at init; B = 0 is the base layer

Each check draws cases with hypothesis (shapes from 1 up, with or without
bias, B = 0 or random, a magnitude at its initial value or trained, several
scalings and weight scales), computes the expected outputs with dora_ref's
functional core in float64, and compares. On a mismatch hypothesis shrinks
the case to a minimal one, and the check raises ``ConformanceError`` saying
in words which output and index differ, expected vs got, the tolerance and
why, and the known variants of DoRA your numbers reproduce, ranked, with the
evidence (``.hint`` the first, ``.diagnoses`` all): the port is run again on
a few targeted cases (square, tiny norms, a large bias; when it raised, the
smallest square case, a 3-D x, other magnitude and weight layouts) and each
variant, recomputed, is kept when the port matches it wherever it differs
from DoRA (``dora_ref.porting.diagnosis``).

A port is checked as it is written: ``Convention`` (or the same fields as
keywords) says how it takes its arguments -- a magnitude (out,), (out, 1)
or, as a different layer with its own reference, (1, in); scaling as a float
or ``(lora_alpha, r, use_rslora)``; W0 stored (in, out) (fan_in_fan_out);
x of shape (batch, seq, in); unmerge with or without n; dropout as a mask or
a callable. ``report="all"`` checks each output on its own and returns
every failure; ``cases=`` restricts the drawn cases.

The signatures the checks call (arrays in the case's dtype, PyTorch layout:
weights are (out, in); the paper's column norm is the norm of each *row*,
one value per output channel)::

    forward(x, W0, A, B, magnitude, scaling, bias)                 -> y (N, out)
    backward(dy, x, W0, A, B, magnitude, scaling, bias)            -> (dx, dA, dB, dmagnitude)
    merge(W0, A, B, magnitude, scaling)                            -> W_merged (out, in)
    unmerge(W_merged, A, B, magnitude, scaling, weight_norm)       -> W0 (out, in)

``bias`` may be None. With ``dropout=True`` the forward and backward also get
``dropout_mask=`` (shape of x, 0 or 1 / (1 - p)): PEFT's training path. A
function may return a tuple whose first element is the output (as
``dora_ref.dora_forward`` and ``dora_ref.merge`` do); a backward may return a
mapping with keys ``dx``, ``dA``, ``dB``, ``dmagnitude``.

hypothesis is needed for the checks (``pip install hypothesis``); it is
imported only when a check runs.

Tolerances come from ``dora_ref.porting.tolerance``: ``rtol(dtype, k)`` with ``k``
the reduction length of the output (``dora_reduction_length``), times the
size of the summed terms (``term_scales``), so that a nearly cancelling
``W0 + s*B@A`` or a tiny weight scale is judged by the size of what was
summed, not by the size of the result. See docs/porting.md.
"""
from __future__ import annotations

from ..core._validate import check_flag
from . import conventions as _C
from . import diagnosis as _D
from . import layer_checks as _L
from .cases import Case, make_case, reference, term_scales, tolerances
from .hints import HINTS
from .runner import CheckResult, ConformanceError, Report, _run, _run_layer
from .tolerance import UNIT_ROUNDOFF  # noqa: F401 (dora_ref.testing.UNIT_ROUNDOFF, as in 0.1)

__all__ = [
    "Case",
    "CheckResult",
    "ConformanceError",
    "Convention",
    "Diagnosis",
    "HINTS",
    "Report",
    "check_backward",
    "check_chain_forward",
    "check_conv_forward",
    "check_embedding_forward",
    "check_embedding_merge",
    "check_forward",
    "check_init",
    "check_merge",
    "make_case",
    "make_chain_case",
    "make_conv_case",
    "make_embedding_case",
    "reference",
    "term_scales",
    "tolerances",
]

GRAD_NAMES = _C.GRAD_NAMES
LayerCase = _L.LayerCase
make_embedding_case = _L.make_embedding_case
make_conv_case = _L.make_conv_case
make_chain_case = _L.make_chain_case
Convention = _C.Convention
Diagnosis = _D.Diagnosis


_COMMON = """
    dtype : {"float64", "float32", "bfloat16", "float16"}, default "float64"
        The dtype of every array passed to your function. Your outputs are
        compared with dora_ref's float64 result within ``rtol(dtype, k)``
        times the term scale (``tolerances``). "bfloat16" / "float16" check
        a low-precision port in PEFT's mixed precision: x, W0, bias, dy (and
        the dropout mask) come as lp arrays (``ml_dtypes.bfloat16`` or
        ``numpy.float16``), A and B as float32 arrays holding lp values, the
        magnitude (and unmerge's n) float32; y, dx and the merged / unmerged
        weights are judged as lp results (``rtol(lp, k, roundings=R)``), n,
        the initial magnitude, dA and dB as float32 ones. See
        docs/low_precision.md.
    max_examples : int, default 100
        Cases to draw.
    seed : int, default 0
        Seeds hypothesis: the same seed draws the same cases.
    convention : Convention, optional
        How your function takes its arguments; the same fields may be given
        as keywords: ``magnitude`` ("(out,)", "(out, 1)", or "(1, in)" for the
        per-input-column layer), ``scaling`` ("float" or "lora_alpha": you
        get ``(lora_alpha, r, use_rslora)``), ``fan_in_fan_out`` (W0 stored
        (in, out)), ``x_ndim`` (3: x (batch, seq, in)), ``unmerge_gets_norm``
        and ``dropout_as`` ("mask" or "callable"). See ``Convention``.
    report : {"first", "all"}, default "first"
        "first": raise at the first (shrunk) mismatch. "all": check each
        output on its own and return a ``Report`` of every failure (one
        accepted deviation does not hide the others).
    cases : dict, optional
        Restricts the drawn cases: a ``make_case`` parameter -> a value, a
        list / tuple / range of values, or a hypothesis strategy, e.g.
        ``cases=dict(bias=False, weight_scale=[1.0])``.

    Returns
    -------
    CheckResult
        Cases compared and the largest error / tolerance seen; with
        ``report="all"``, a ``Report``.

    Raises
    ------
    ConformanceError
        An ``AssertionError`` on the first (shrunk) mismatch, or if your
        function raised or wrote to its inputs; the message names the
        output, index, expected and got values, tolerance, the case, and
        the known mistakes your numbers reproduce, ranked, with the evidence
        (``.hint`` the first, ``.diagnoses`` all).
    ImportError
        If hypothesis is not installed.
    TypeError, ValueError
        On bad arguments to the check itself.
"""


def check_forward(forward, *, dtype="float64", dropout=False, max_examples=100, seed=0, convention=None,
                  report="first", cases=None, **conventions):
    """Check a port's DoRA forward against dora_ref (paper Eq. 5, PEFT semantics).

    Parameters
    ----------
    forward : callable
        ``forward(x, W0, A, B, magnitude, scaling, bias) -> y``: x (N, in),
        W0 (out, in), A (r, in), B (out, r), magnitude (out,), scaling a
        float, bias (out,) or None; y (N, out). With ``dropout=True`` it is
        also given ``dropout_mask=`` (N, in) and must compute PEFT's training
        formula ``y = x@W0.T + b + (g-1)*(xd@W0.T) + g*s*(xd@A.T)@B.T``,
        ``xd = x * dropout_mask``.
    dropout : bool, default False
        Check PEFT's training path (``lora_dropout > 0``) with a given mask.
    """
    return _run("forward", forward, dtype=dtype, dropout=dropout, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


def check_backward(backward, *, detach_norm=True, dtype="float64", dropout=False, max_examples=100, seed=0,
                   convention=None, report="first", cases=None, **conventions):
    """Check a port's DoRA gradients against dora_ref's hand-derived backward.

    Parameters
    ----------
    backward : callable
        ``backward(dy, x, W0, A, B, magnitude, scaling, bias) -> (dx, dA,
        dB, dmagnitude)`` (or a mapping with those keys): the gradients of
        ``sum(dy * y)`` with y the forward of ``check_forward``; dy (N, out),
        dx (N, in), dA (r, in), dB (out, r), dmagnitude (out,). With
        ``dropout=True`` it is also given ``dropout_mask=``.
    detach_norm : bool, default True
        True: the norm is a constant (paper Sec. 4.3; PEFT). False: the exact
        gradient (paper Eqs. 6-7).
    dropout : bool, default False
        Check the gradients of PEFT's training path with a given mask.
    """
    detach_norm = check_flag("detach_norm", detach_norm)
    return _run("backward", backward, dtype=dtype, dropout=dropout, detach_norm=detach_norm,
                max_examples=max_examples, seed=seed, convention=convention, report=report, cases=cases,
                **conventions)


def check_merge(merge, unmerge=None, *, dtype="float64", max_examples=100, seed=0, convention=None,
                report="first", cases=None, **conventions):
    """Check a port's merge (and unmerge) against dora_ref.

    Parameters
    ----------
    merge : callable
        ``merge(W0, A, B, magnitude, scaling) -> W_merged`` (out, in), which
        must be ``diag(m / n) (W0 + s*B@A)``; a tuple whose first element is
        W_merged is accepted (``dora_ref.merge`` returns ``(W, n)``).
    unmerge : callable, optional
        ``unmerge(W_merged, A, B, magnitude, scaling, weight_norm) -> W0``,
        given dora_ref's merged weight and the norm n from merge time
        (PEFT caches it: the merged weight alone does not determine it).
        With ``unmerge_gets_norm=False``: ``unmerge(W_merged, A, B,
        magnitude, scaling)`` on the port's own merged weight, right after
        its merge.
    """
    return _run("merge", merge, unmerge=unmerge, dtype=dtype, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


def check_init(init, forward=None, *, dtype="float64", max_examples=100, seed=0, convention=None,
               report="first", cases=None, **conventions):
    """Check a port's magnitude initialisation (and, given its forward, the B = 0 identity).

    Parameters
    ----------
    init : callable
        ``init(W0, A, B, scaling) -> magnitude`` (out,): the magnitude a new
        adapter starts from, ``||W0 + s*B@A||_row`` (PEFT
        ``DoraLinearLayer.update_layer``; with PEFT's default B = 0 it is
        ``||W0||_row``). B is drawn random, as with ``init_lora_weights=False``.
    forward : callable, optional
        ``forward(x, W0, A, B, magnitude, scaling, bias) -> y``: then each case
        is also run with B = 0 and the port's own ``init`` magnitude, and y
        must be the base layer's output ``x@W0.T + b`` (output
        ``y_identity``): a freshly initialised adapter changes nothing.
    """
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable or None, got {type(forward).__name__}")
    return _run("init", init, unmerge=forward, dtype=dtype, max_examples=max_examples, seed=seed,
                convention=convention, report=report, cases=cases, **conventions)


_LAYER_COMMON = """
    dtype : {"float64", "float32"}, default "float64"
        The dtype of every float array passed to your function; compared with
        dora_ref's float64 result within the linear view's tolerance
        (``dora_ref.porting.layer_checks.tolerances``).
    max_examples : int, default 100
    seed : int, default 0
    report : {"first", "all"}, default "first"
        "all": return a ``Report`` instead of raising.
    cases : dict, optional
        Restricts the drawn cases: a parameter of the case builder
        (``make_embedding_case`` / ``make_conv_case`` / ``make_chain_case``) -> a value, a list of
        values or a hypothesis strategy.

    Returns
    -------
    CheckResult, or a ``Report`` with ``report="all"``.

    Raises
    ------
    ConformanceError
        On the first (shrunk) mismatch, or if your function raised or wrote
        to its inputs, with the known mistakes your numbers reproduce, ranked
        (``.hint`` the first, ``.diagnoses`` all).
    ImportError
        If hypothesis is not installed.
    TypeError, ValueError
        On bad arguments to the check itself.
"""


def check_embedding_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Embedding forward (PEFT ``DoraEmbeddingVariant.forward``, PEFT >= 0.18).

    Parameters
    ----------
    forward : callable
        ``forward(ids, weight, lora_embedding_A, lora_embedding_B, magnitude,
        scaling, embed_scale, padding_idx) -> y``: ids int64 (N,), weight E
        (V, D), lora_embedding_A (r, V), lora_embedding_B (D, r), magnitude
        (D,), scaling and embed_scale floats, padding_idx an int or None;
        y (N, D) = ``embed_scale * g * (E[ids] + s * A.T[ids] @ B.T)``,
        ``g = m / ||E.T + s*B@A||_row`` (one norm per embedding dimension,
        over the vocabulary). padding_idx changes only the backward: the
        forward value of a padding id is computed like any other.
    """
    return _run_layer("embedding_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_embedding_merge(merge, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Embedding merge (PEFT ``DoraEmbeddingVariant.merge_safe``).

    Parameters
    ----------
    merge : callable
        ``merge(weight, lora_embedding_A, lora_embedding_B, magnitude,
        scaling) -> weight_merged`` (V, D) = ``(E + s*(B@A).T) * (m / n)[None, :]``
        (a tuple whose first element is it is accepted, as
        ``dora_ref.core.embedding.embedding_merge`` returns).
    """
    return _run_layer("embedding_merge", merge, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_conv_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's DoRA Conv1d / Conv2d forward (PEFT ``_DoraConvNdLayer.forward``, eval).

    Parameters
    ----------
    forward : callable
        ``forward(x, weight, lora_A, lora_B, magnitude, scaling, bias,
        stride, padding, dilation, groups) -> y``: x (N, in, *L), weight
        (out, in/groups, *k), lora_A (r, in, *k) (a convolution with the
        base's stride, padding and dilation, not grouped), lora_B
        (out, r/groups, 1, ...) (a grouped 1x1 convolution), magnitude
        (out,) (PEFT stores it (1, out, 1, ...)), bias (out,) or None, ints
        for the geometry (the same on every axis); y (N, out, *L_out) =
        ``g * (conv(x, W0) + s * lora_B(lora_A(x))) + bias`` per channel,
        g = m / n with n the norm of each output channel's dense adapted
        kernel ``W0 + s * lora_B_dense @ lora_A`` (``dora_ref.core.conv``). With
        groups > 1, PEFT's norm differs (see ``dora_ref.core.conv``).
    """
    return _run_layer("conv_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


def check_chain_forward(forward, *, dtype="float64", max_examples=100, seed=0, report="first", cases=None):
    """Check a port's forward with several (Do)LoRA adapters active on one linear layer (PEFT 0.21, eval).

    Parameters
    ----------
    forward : callable
        ``forward(x, W0, bias, adapters) -> y``: x (N, in), W0 (out, in),
        bias (out,) or None, adapters a list (PEFT's active-adapter order)
        of dicts with ``A`` (r_i, in), ``B`` (out, r_i), ``magnitude``
        (out,) or None for a plain LoRA adapter, and ``scaling`` (float);
        y (N, out) as ``dora_ref.formats.peft.chain_forward``::

            y <- x @ W0.T
            for each adapter:  DoRA: y <- g_i * (y + s_i (x @ A_i.T) @ B_i.T)
                               LoRA: y <- y + s_i (x @ A_i.T) @ B_i.T
            y <- y + b,        g_i = m_i / ||W0 + s_i B_i A_i||_row  (the bare W0)
    """
    return _run_layer("chain_forward", forward, dtype=dtype, max_examples=max_examples, seed=seed,
                      report=report, cases=cases)


for _check in (check_embedding_forward, check_embedding_merge, check_conv_forward, check_chain_forward):
    _check.__doc__ = _check.__doc__.rstrip() + _LAYER_COMMON

for _check in (check_forward, check_backward, check_merge, check_init):
    _check.__doc__ = _check.__doc__.rstrip() + _COMMON
del _check
