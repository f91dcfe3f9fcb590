"""How a port is called: the conventions real DoRA implementations use.

``dora_ref.porting.testing`` draws every case in one canonical layout (PyTorch's:
W0 (out, in), magnitude (out,), x (N, in), scaling a float). Real
implementations differ in how they take those arrays, not in what they
compute, so each check can call a port the way it is written and convert
its outputs back before comparing:

========================  ===================================  =====================================
convention                the port gets                        as in
========================  ===================================  =====================================
``magnitude="(out,)"``    magnitude (out,)                     PEFT ``lora_magnitude_vector``
``magnitude="(out, 1)"``  magnitude (out, 1); returns dm so    the paper authors' code (a
                                                               ``Linear(1, out)`` weight)
``magnitude="(1, in)"``   a DIFFERENT layer: one magnitude     LyCORIS ``wd_on_out=False``; the
                          per input column, n = ||V||_col      paper's notation read literally
``scaling="float"``       s                                    dora_ref, torchtune
``scaling="lora_alpha"``  (lora_alpha, r, use_rslora)          PEFT, LyCORIS (s computed by the port)
``fan_in_fan_out=True``   W0 (in, out); W_merged (in, out)     GPT-2's Conv1D in PEFT
``x_ndim=3``              x (batch, seq, in), dy likewise      transformer code
``unmerge_gets_norm``     False: unmerge(W', A, B, m, s) right  ports that keep n privately
                          after the port's own merge
``dropout_as="callable"`` ``dropout=`` a function x -> x*mask  code that calls ``self.dropout(x)``
========================  ===================================  =====================================
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, fields

import numpy as np

from ..core.precision import _is_bfloat16

GRAD_NAMES = ("dx", "dA", "dB", "dmagnitude")
MAGNITUDE_LAYOUTS = ("(out,)", "(out, 1)", "(1, in)")


@dataclass(frozen=True)
class Convention:
    """How a port takes its arguments (see the module docstring's table).

    Attributes
    ----------
    magnitude : {"(out,)", "(out, 1)", "(1, in)"}
        "(1, in)" selects the per-input-column layer (its own reference math:
        ``n = ||W0 + s*B@A||`` per column, ``W' = V * (m / n)[None, :]``).
    scaling : {"float", "lora_alpha"}
        "lora_alpha": the port gets the tuple ``(lora_alpha, r, use_rslora)``
        where the others get s, and must compute ``lora_alpha / r`` (or
        ``/ sqrt(r)``) itself.
    fan_in_fan_out : bool
        W0 (and the merged weight, and the unmerge's input and output) stored
        (in, out).
    x_ndim : {2, 3}
        3: x, dy and the dropout mask come as (batch, seq, features).
    unmerge_gets_norm : bool
        True: ``unmerge(W_merged, A, B, magnitude, scaling, weight_norm)``
        with dora_ref's merged weight and n. False: ``unmerge(W_merged, A,
        B, magnitude, scaling)`` with the port's own merged weight, called
        right after its merge (a port may keep n from that call).
    dropout_as : {"mask", "callable"}
        How a dropout check hands over the mask: ``dropout_mask=`` an array
        of x's shape, or ``dropout=`` a function that multiplies its argument
        by that mask (drop-in for ``nn.Dropout``; same mask every call).
    """

    magnitude: str = "(out,)"
    scaling: str = "float"
    fan_in_fan_out: bool = False
    x_ndim: int = 2
    unmerge_gets_norm: bool = True
    dropout_as: str = "mask"

    def __post_init__(self):
        if self.magnitude not in MAGNITUDE_LAYOUTS:
            raise ValueError(f"magnitude must be one of {MAGNITUDE_LAYOUTS}, got {self.magnitude!r}")
        if self.scaling not in ("float", "lora_alpha"):
            raise ValueError(f"scaling must be 'float' or 'lora_alpha', got {self.scaling!r}")
        if self.x_ndim not in (2, 3) or isinstance(self.x_ndim, bool):
            raise ValueError(f"x_ndim must be 2 or 3, got {self.x_ndim!r}")
        if self.dropout_as not in ("mask", "callable"):
            raise ValueError(f"dropout_as must be 'mask' or 'callable', got {self.dropout_as!r}")
        for name in ("fan_in_fan_out", "unmerge_gets_norm"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def per_input_column(self):
        return self.magnitude == "(1, in)"

    def changed(self):
        """The fields that differ from the defaults, as keyword arguments."""
        default = Convention()
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) != getattr(default, f.name)}


def convention_from(convention, kwargs):
    """A Convention from ``convention=`` and/or keyword fields (not both for one field)."""
    if convention is not None and not isinstance(convention, Convention):
        raise TypeError(f"convention must be a testing.Convention, got {type(convention).__name__}")
    names = {f.name for f in fields(Convention)}
    unknown = sorted(set(kwargs) - names)
    if unknown:
        raise TypeError(f"unknown argument(s) {unknown}; conventions are {sorted(names)}")
    base = convention.changed() if convention is not None else {}
    both = sorted(set(base) & set(kwargs))
    if both:
        raise TypeError(f"{both} given both in convention= and as keywords")
    return Convention(**base, **kwargs)


class PortContract(Exception):
    """The port broke a rule every port keeps (its message says which): not a numerical mismatch."""


class WroteInput(PortContract):
    """The port modified an input array in place."""


class WrongOutputType(PortContract):
    """An output is not a real floating-point array in the dtype PEFT returns it in."""


class Dropout:
    """A drop-in for ``nn.Dropout`` that multiplies by a fixed mask (any array type)."""

    def __init__(self, mask):
        self.mask = mask

    def __call__(self, x):
        mask = self.mask
        if hasattr(x, "new_tensor"):  # torch
            mask = x.new_tensor(mask)
        elif type(x).__module__.startswith("jax"):
            import jax.numpy as jnp

            mask = jnp.asarray(mask, dtype=x.dtype)
        if tuple(np.shape(x)) != tuple(np.shape(self.mask)):
            raise ValueError(f"the dropout callable got an array of shape {tuple(np.shape(x))}; it applies to x, "
                             f"of shape {tuple(np.shape(self.mask))}")
        return x * mask


def batch_shape(N, x_ndim):
    """The leading dimensions x gets: (N,) or (batch, seq) with batch = 2 when N is even."""
    if x_ndim == 2:
        return (N,)
    return (2, N // 2) if N % 2 == 0 else (1, N)


def first(result):
    if isinstance(result, tuple) and not hasattr(result, "_fields"):
        return result[0]
    return result


def to_numpy(value):
    """np.asarray, after .detach().cpu() for tensors that carry a graph or live on a device.

    A ``torch.bfloat16`` tensor (which NumPy cannot take) comes back as an
    ``ml_dtypes.bfloat16`` array of the same bits.
    """
    for method in ("detach", "cpu"):
        if hasattr(value, method) and not isinstance(value, np.ndarray):
            value = getattr(value, method)()
    torch = sys.modules.get("torch")
    if torch is not None and isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16:
        import ml_dtypes

        return value.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return np.asarray(value)


def checked_output(check, name, value, expected, source):
    """``to_numpy(value)`` if it is a real floating-point array of dtype ``expected``.

    ``source`` names the input whose dtype ``expected`` is (PEFT returns y
    and dx in x's dtype, each gradient in its parameter's, a merged weight
    in W0's). Raises WrongOutputType, saying what came back: a complex
    array (its imaginary part would be dropped), strings, objects, integers
    or booleans, or another floating dtype (a port that returns float64 for
    float32 inputs, or float32 for bfloat16 ones, skips a rounding PEFT
    makes, which the tolerances, derived for ``expected``, may not see).
    """
    given = type(value).__name__
    try:
        array = to_numpy(value)
    except (TypeError, ValueError) as exc:
        raise WrongOutputType(f"your {check} returned output {name} as a {given} that is not an array "
                              f"({exc})") from None
    expected = np.dtype(expected)
    dtype = array.dtype
    if not (dtype.kind == "f" or _is_bfloat16(dtype)):
        what = f"a {given}" if dtype == object and given != "ndarray" else f"an array of {dtype}"
        raise WrongOutputType(f"your {check} returned output {name} as {what}: a port returns real "
                              f"floating-point arrays, here {expected} (the dtype of {source})")
    if dtype != expected:
        raise WrongOutputType(f"your {check} returned output {name} in {dtype}, expected {expected} "
                              f"(the dtype of {source}, as PEFT returns it)")
    return array


def grads_of(result):
    if isinstance(result, dict):
        missing = [k for k in GRAD_NAMES if k not in result]
        if missing:
            raise TypeError(f"the backward returned a mapping without {missing}")
        return {k: result[k] for k in GRAD_NAMES}
    result = tuple(result)
    if len(result) != 4:
        raise TypeError(f"the backward must return (dx, dA, dB, dmagnitude), got {len(result)} values")
    return dict(zip(GRAD_NAMES, result))


class ShapeMismatch(Exception):
    """An output came back in a shape the convention does not give it."""

    def __init__(self, output, got, expected):
        super().__init__(f"output {output} has shape {got}, expected {expected}{_shape_note(got, expected)}")
        self.output, self.got, self.expected = output, got, expected


def _shape_note(got, expected):
    """What a wrong output shape suggests, in words (empty when nothing simple does)."""
    squeeze = lambda shape: tuple(d for d in shape if d != 1)  # noqa: E731
    if got == tuple(reversed(expected)) and got != expected:
        return ": the transpose (a weight in the other layout? see fan_in_fan_out)"
    if squeeze(got) == squeeze(expected) and len(got) != len(expected):
        return ": the same values with dimensions of size 1 added or dropped (a magnitude (out, 1) or " \
               "(1, in) broadcast into the output? see the magnitude and x_ndim conventions)"
    if len(got) == len(expected) + 1 and got[1:] == expected:
        return ": an extra leading dimension (x treated as batched? see x_ndim)"
    return ""


def _scaling_arg(case, conv):
    if conv.scaling == "float":
        return case.scaling
    p = case.params
    if p.get("lora_alpha") is None:
        raise ValueError("scaling='lora_alpha' needs a case built with make_case(lora_alpha=...)")
    return (p["lora_alpha"], case.A.shape[0], bool(p.get("use_rslora", False)))


def call_port(check, fn, unmerge, case, conv, dropout):
    """Call the port on copies of the case's arrays, in its convention; return canonical outputs.

    Returns ``{output: ndarray}`` in dora_ref's layout (y (N, out), W (out, in),
    dmagnitude (out,) or (in,) for the per-input-column layer). Raises
    ShapeMismatch, WroteInput, or whatever the port raised.
    """
    c = case.copy()  # fresh copies: a port may not write to our arrays
    N, i, o, _ = c.shapes()
    lead = batch_shape(N, conv.x_ndim)
    store = (lambda w: np.ascontiguousarray(w.T)) if conv.fan_in_fan_out else (lambda w: w)
    m_shape = {"(out,)": (o,), "(out, 1)": (o, 1), "(1, in)": (1, i)}[conv.magnitude]
    args = dict(
        x=c.x.reshape(*lead, i), W0=store(c.W0), A=c.A, B=c.B, magnitude=c.magnitude.reshape(m_shape),
        scaling=_scaling_arg(c, conv), bias=c.bias,
    )
    kw = {}
    if dropout:
        mask = c.dropout_mask.reshape(*lead, i)
        kw = {"dropout_mask": mask} if conv.dropout_as == "mask" else {"dropout": Dropout(mask)}
    port_shapes = {}
    if check == "forward":
        raw = {"y": first(fn(*args.values(), **kw))}
        port_shapes["y"] = (*lead, o)
    elif check == "backward":
        dy = c.dy.reshape(*lead, o)
        raw = grads_of(fn(dy, *args.values(), **kw))
        port_shapes.update(dx=(*lead, i), dA=c.A.shape, dB=c.B.shape, dmagnitude=m_shape)
    elif check == "init":
        a = args
        raw = {"magnitude": first(fn(a["W0"], a["A"], a["B"], a["scaling"]))}
        port_shapes["magnitude"] = m_shape
        if unmerge is not None:  # here: the port's forward, for the B = 0 identity
            B0 = np.zeros_like(a["B"])
            m0 = np.array(to_numpy(first(fn(a["W0"], a["A"], B0, a["scaling"]))), dtype=case.magnitude.dtype)
            raw["y_identity"] = first(unmerge(a["x"], a["W0"], a["A"], B0, m0, a["scaling"], a["bias"]))
            port_shapes["y_identity"] = (*lead, o)
    else:
        a = args
        raw = {"W_merged": first(fn(a["W0"], a["A"], a["B"], a["magnitude"], a["scaling"]))}
        port_shapes["W_merged"] = a["W0"].shape
        if unmerge is not None:
            port_shapes["W0_unmerged"] = a["W0"].shape
            if conv.unmerge_gets_norm:
                from .cases import reference

                ref = reference(case)
                merged = store(ref["W_merged"].astype(case.dtype))
                n = ref["weight_norm"].astype(case.magnitude.dtype).reshape(m_shape)
                raw["W0_unmerged"] = first(unmerge(merged, a["A"], a["B"], a["magnitude"], a["scaling"], n))
            else:
                own = np.array(to_numpy(raw["W_merged"]), dtype=case.dtype, copy=True)
                raw["W0_unmerged"] = first(unmerge(own, a["A"], a["B"], a["magnitude"], a["scaling"]))
    for name in ("x", "W0", "A", "B", "magnitude", "bias", "dy", "dropout_mask"):
        before, after = getattr(case, name), getattr(c, name)
        if before is not None and not np.array_equal(before, after):
            raise WroteInput(f"your {check} wrote to its input {name!r}: a port must not modify its inputs")
    sources = {"y": "x", "dx": "x", "y_identity": "x", "dA": "A", "dB": "B", "dmagnitude": "magnitude",
               "magnitude": "magnitude", "W_merged": "W0", "W0_unmerged": "W0"}
    out = {}
    for name, value in raw.items():
        src = sources[name]
        value = checked_output(check, name, value, args[src].dtype, src)
        if value.shape != tuple(port_shapes[name]):
            raise ShapeMismatch(name, value.shape, tuple(port_shapes[name]))
        if name in ("W_merged", "W0_unmerged") and conv.fan_in_fan_out:
            value = value.T
        elif name in ("y", "dx", "y_identity"):
            value = value.reshape(N, -1)
        elif name in ("dmagnitude", "magnitude"):
            value = value.reshape(-1)
        out[name] = value
    return out
