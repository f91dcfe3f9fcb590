"""What every adapter layer shares: frozen weights, trainable arrays, modes, the eval cache.

``LoRALinear``/``DoRALinear`` (``layers``), the conv layers (``conv``) and
``DoRAEmbedding`` (``embedding``) differ in their math, which lives in their
own modules; the state handling below is the same for all of them:

* the frozen base weight is the layer's own read-only copy (``frozen``);
* trainable arrays keep their identity for the layer's life, because
  optimisers hold references to them: assigning copies into them
  (``adapter_parameter``);
* ``parameters()``/``grads``/``zero_grad()``, ``train()``/``eval()``, and
  dropout masks drawn from the layer's seeded generator (``AdapterLayer``);
* the eval-mode norm cache that recomputes on any change (``EvalNormCache``);
* the merged state's guard (``AdapterLayer._lock_adapter``): while merged,
  the trainable arrays are read-only, and a change that got around that is
  found (by a snapshot of their bytes) before ``unmerge()`` or a merged
  forward could use the merged weight with values it was not built from.
"""
from __future__ import annotations

import collections
import inspect
import itertools
import operator
import weakref

import numpy as np

from ..core._validate import WeightSnapshot, as_float_array, check_finite, check_scaling
from ..core.precision import LOW_PRECISION_DTYPES, check_policy


def check_keywords(layer, cls, kwargs):
    """Refuse a keyword that a DoRA layer's ``__init__`` (class ``cls``) would pass on to the next
    ``__init__`` of ``layer``'s class order and that it does not take, naming the class the user
    called.

    Python's own message named the parent ("LoRALinear.__init__() got an
    unexpected keyword argument 'alpha'" for ``DoRALinear(..., alpha=3)``: a
    new user's case). The next ``__init__`` is the one ``super()`` calls (a
    mixin's, in a subclass that mixes one in: an adversary's case, whose
    keyword was refused when this compared with ``LoRALinear``'s); one that
    takes ``**kwargs`` is left to say what it refuses.

    Raises
    ------
    TypeError
        Naming ``type(layer)``, the keyword, and the keywords it takes.
    """
    if not kwargs:
        return
    taken = inspect.signature(super(cls, layer).__init__).parameters
    key = _not_taken(taken, kwargs)
    if key is not None:
        own = _keyword_only(inspect.signature(cls.__init__).parameters)
        raise unknown_keyword(type(layer).__name__, key,
                              own + [name for name in _keyword_only(taken) if name not in own])


def _not_taken(params, kwargs):
    """The first of ``kwargs`` that a signature's ``params`` do not take by name, or None
    (also when they take ``**kwargs``)."""
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return None
    by_name = (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return next((key for key in kwargs if key not in params or params[key].kind not in by_name),
                None)


def _keyword_only(params):
    return [name for name, p in params.items() if p.kind is inspect.Parameter.KEYWORD_ONLY]


def unknown_keyword(class_name, key, keywords):
    """The ``TypeError`` for keyword ``key`` that class ``class_name``'s constructor does not
    take: the keyword most likely meant (``_keyword_meant``), what PEFT's ``use_dora`` means
    here, and every keyword it takes."""
    guess = _keyword_meant(key, keywords)
    if guess:
        hint = f"did you mean {guess!r}? "
    elif key == "use_dora" and "DoRA" in class_name:
        hint = "a DoRA layer is DoRA already (PEFT's use_dora=True); "
    elif key == "use_dora":
        hint = f"for DoRA use {class_name.replace('LoRA', 'DoRA', 1)}; "
    elif key == "target_modules":  # a PEFT config's, not a layer's
        hint = ("a layer is one module: its path is its key in the mapping given to "
                "dora_ref.peft.adapter_from_layers; ")
    elif key in ("modules_to_save", "task_type", "base_model_name_or_path", "peft_type"):
        hint = "a PEFT config field: pass it to dora_ref.peft.adapter_from_layers; "
    else:
        hint = ""
    return TypeError(f"{class_name}() got an unexpected keyword argument {key!r}; {hint}"
                     f"it takes {', '.join(keywords)}")


def check_constructor_keywords(cls, kwargs):
    """Refuse a keyword that ``cls``'s constructor does not take, before it runs, with the
    message of ``unknown_keyword``: Python's own named no alternative, and for the LoRA,
    embedding and conv layers named the wrong class ("_LoRAConvNd.__init__() got an
    unexpected keyword argument", session 20's second adversary). Only dora_ref's own
    classes: a subclass defined elsewhere (a mixin's keywords, a ``**kwargs`` of its own) is
    left to its constructors, which say what they refuse (``check_keywords`` for a DoRA
    layer's parent)."""
    if not (getattr(cls, "__module__", None) or "").startswith("dora_ref."):
        return  # (a class made by type() where no module name is set has no __module__)
    params = inspect.signature(cls).parameters
    key = _not_taken(params, kwargs)
    if key is not None:
        raise unknown_keyword(cls.__name__, key, _keyword_only(params))


#: Other libraries' names for a DoRA layer's keywords (torchtune and LyCORIS: rank, alpha,
#: dropout, lora_dim; a seed where dora_ref takes ``rng``), for ``check_keywords``'s hint.
_OTHER_SPELLINGS = {"rank": "r", "lora_rank": "r", "lora_dim": "r", "lora_r": "r",
                    "alpha": "lora_alpha", "dropout": "lora_dropout", "lora_dropout_p": "lora_dropout",
                    "seed": "rng", "random_state": "rng", "generator": "rng",
                    "magnitude": "lora_magnitude_vector", "rslora": "use_rslora"}


def _keyword_meant(key, keywords):
    """The keyword a user most likely meant by ``key`` (another library's name for it, else the
    closest spelling among ``keywords``), or None."""
    import difflib

    meant = _OTHER_SPELLINGS.get(key, _OTHER_SPELLINGS.get(key.lower(), key.lower()))
    if meant in keywords:
        return meant
    close = difflib.get_close_matches(key, keywords, n=1, cutoff=0.8)
    return close[0] if close else None


def check_bias_argument(layer, bias):
    """Refuse a number where a layer takes its bias, saying that the options are keyword-only.

    ``DoRALinear(W0, 4)`` (PEFT's ``r`` given by position, a second new user's
    case) was refused as "bias must have 1 dimension(s), got shape ()".

    Raises
    ------
    TypeError
        If ``bias`` is a Python or NumPy number (or bool).
    """
    if isinstance(bias, (bool, int, float, np.number, np.bool_)):
        raise TypeError(
            f"{type(layer).__name__}(weight, bias=None, *, r=..., lora_alpha=..., ...): the second "
            f"positional argument is the bias, an array of shape (out,) or None, got "
            f"{type(bias).__name__} {bias!r}; r and the other options are keyword-only "
            f"(e.g. {type(layer).__name__}(weight, r={bias!r}))")


def with_parent_keywords(init, parent_init):
    """Give ``init`` (a DoRA layer's ``__init__(..., **kwargs)``) the signature that lists
    the parent's keyword-only parameters too, for ``help()`` and ``inspect.signature``."""
    own = [p for p in inspect.signature(init).parameters.values()
           if p.kind is not inspect.Parameter.VAR_KEYWORD]
    names = {p.name for p in own}
    more = [p for p in inspect.signature(parent_init).parameters.values()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in names]
    init.__signature__ = inspect.Signature(own + more)
    return init


def adapter_dtype(weight_dtype, autocast_adapter_dtype):
    """The dtype of lora_A, lora_B (and the magnitude) for a base weight of ``weight_dtype``.

    float32/float64 weights: their own. float16/bfloat16 (``core.precision``):
    float32 with ``autocast_adapter_dtype`` (PEFT's default, "mixed"), else
    the weight's dtype ("pure").
    """
    if weight_dtype in LOW_PRECISION_DTYPES and autocast_adapter_dtype:
        return np.dtype(np.float32)
    return np.dtype(weight_dtype)


def check_lora_dropout(lora_dropout):
    """``lora_dropout`` as a float in [0, 1) (a Python or NumPy number); else ``ValueError``.

    NumPy scalars are numbers here (``np.float32(0.5)`` was refused with a
    message saying it must be in [0, 1): session 18's adversary)."""
    if not (isinstance(lora_dropout, (int, float, np.integer, np.floating)) and 0.0 <= lora_dropout < 1.0):
        raise ValueError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    return float(lora_dropout)


def check_autocast(autocast_adapter_dtype):
    """``autocast_adapter_dtype`` as a bool; ``TypeError`` for anything but True/False.

    ``bool("False")`` is True: a setting read from a config file as a string
    would silently give float32 adapters instead of 16-bit ones.

    Parameters
    ----------
    autocast_adapter_dtype : bool or numpy.bool_
        PEFT's ``get_peft_model(..., autocast_adapter_dtype=)``.

    Returns
    -------
    bool

    Raises
    ------
    TypeError
        For any other type (str, int, None, ...).
    """
    if not isinstance(autocast_adapter_dtype, (bool, np.bool_)):
        raise TypeError(
            f"autocast_adapter_dtype must be True or False, got {autocast_adapter_dtype!r} "
            f"({type(autocast_adapter_dtype).__name__})"
        )
    return bool(autocast_adapter_dtype)


def initial_adapter_dtype(arrays, weight_dtype, policy, autocast_adapter_dtype):
    """Freshly drawn adapter arrays (float32 for an lp weight) in the adapter's dtype.

    PEFT draws in float32 and casts to the base dtype before anything else,
    then upcasts again if ``autocast_adapter_dtype``: under "peft" (and for a
    pure-lp adapter, which must be lp) the draw is rounded to the weight's
    dtype; under "consistent" a mixed adapter keeps its float32 draw.
    """
    target = adapter_dtype(weight_dtype, autocast_adapter_dtype)
    if weight_dtype in LOW_PRECISION_DTYPES and (policy == "peft" or target == weight_dtype):
        arrays = [a.astype(weight_dtype) for a in arrays]
    return [a.astype(target) for a in arrays]


def _written_through(arr):
    """Whether ``arr``'s memory can be written through something else: a writeable array
    in its chain of bases, or a writable buffer at its end (a bytearray, a writable memory
    map), followed through ndarrays and memoryviews (``memoryview(W).toreadonly()``). Found by
    session 18's adversaries: a read-only view ``v`` of a writeable ``W`` was
    kept as a layer's frozen weight, and a write into ``W`` then changed the weight behind
    the eval-mode norm cache (the eval forward 9.2 where the train-mode forward on the
    same, written, weights gave 0.49)."""
    base = arr.base
    while isinstance(base, (np.ndarray, memoryview)):
        if isinstance(base, np.ndarray):
            if base.flags.writeable:
                return True
            base = base.base
        else:  # a read-only memoryview can be a view of writeable memory: follow it
            if not base.readonly:
                return True
            base = base.obj
    if base is None:
        return False
    try:
        return not memoryview(base).readonly
    except TypeError:  # a base that is not a buffer: nothing says it cannot change
        return True


def frozen(arr, owned=False):
    """A read-only, C-contiguous array the layer can rely on never to change.

    The layer keeps its own copy, so that writing to the array the caller
    passed cannot change the frozen weight behind the layer's back (and its
    eval-mode norm cache). An array that is already read-only and
    C-contiguous, and is not a view of memory that can be written through
    another array (``_written_through``: a read-only view of a writeable
    array is copied), is trusted and kept without a copy (pass one, or a
    read-only memory map, to save the memory), as are ``owned`` arrays the
    layer computed itself.

    The layer's own copy is handed out as a read-only view of a read-only
    array: NumPy refuses ``flags.writeable = True`` on such a view (on an
    array owning its data it would allow it, and an in-place write would
    leave the eval-mode norm cache stale).
    """
    if not owned and (arr.flags.writeable or not arr.flags.c_contiguous or _written_through(arr)):
        arr = np.array(arr, order="C", copy=True)
    elif owned:
        arr = np.ascontiguousarray(arr)
    else:  # the caller's read-only array, trusted
        arr = arr.view()
        arr.flags.writeable = False
        return arr
    arr.flags.writeable = False
    arr = arr.view()
    arr.flags.writeable = False
    return arr


# id(array restored read-only over a pickle's bytes) -> (weak ref to it, weak ref to the copy
# the layer took in its place): see _own_locked_arrays and replacement
_REPLACED = {}


def _record_replacement(old, new):
    key = id(old)
    _REPLACED[key] = (weakref.ref(old, lambda _, key=key: _REPLACED.pop(key, None)), weakref.ref(new))


def replacement(arr):
    """The array a layer restored from a pickle took in place of ``arr``, or None.

    A merged layer's adapter is pickled read-only; NumPy restores it (pickle
    protocol 5) over the pickle's immutable bytes, which can never be made
    writeable, so the restored layer holds writeable-capable copies
    (``_own_locked_arrays``). An optimiser pickled with it still holds the
    restored arrays; its step looks here for the layer's own (``optim``)."""
    entry = _REPLACED.get(id(arr))
    if entry is None or entry[0]() is not arr:
        return None
    return entry[1]()


def _can_unlock(arr):
    """Whether ``arr``'s WRITEABLE flag, once cleared, can be set again (NumPy's own test:
    it owns its data, or the object at the end of its chain of bases is a writable buffer).

    Not so for an array NumPy unpickled over the pickle's immutable bytes: writeable as
    restored (above about 1 KiB), never again once cleared (a layer sent to a spawn or
    forkserver worker)."""
    base = arr
    while isinstance(base, np.ndarray):
        if base.base is None:
            return True
        base = base.base
    try:
        return not memoryview(base).readonly
    except TypeError:
        return False


def _lock(arr):
    """Make a merged layer's array read-only where ``unmerge()`` can make it writeable again.

    An array that could not be unlocked (``_can_unlock``) stays writeable: the merge-time
    snapshot then finds a write into it, at the next forward or ``unmerge()``, as it finds
    one through a view taken before ``merge()`` (a ``RuntimeError`` saying what changed)."""
    if _can_unlock(arr):
        arr.flags.writeable = False


def checked_array(name, value, dtype, shape, alt_shapes=()):
    """A value for a trainable array: float of ``dtype``, finite, of ``shape``.

    Complex, integer and object arrays and the other float dtype raise
    ``TypeError`` (no silent truncation or promotion); NaN/Inf and a wrong
    shape raise ``ValueError``. A shape in ``alt_shapes`` (e.g. a flat (out,)
    conv magnitude) is reshaped to ``shape``.
    """
    value = as_float_array(name, value, low_precision=dtype in LOW_PRECISION_DTYPES)
    if value.dtype != dtype:
        raise TypeError(f"{name} has dtype {value.dtype} but the weight has dtype {dtype}")
    if value.shape != tuple(shape) and value.shape not in alt_shapes:
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {value.shape}")
    check_finite(name, value)
    return value.reshape(shape)


def adapter_parameter(name, doc, alt_shapes=lambda layer: ()):
    """A trainable array attribute stored as ``_<name>``: assigning copies into it.

    Optimisers hold references to the arrays of ``parameters()``, so the
    arrays must live as long as the layer; an assigned value is checked
    (``checked_array``) and written in.
    """
    attr = "_" + name

    def get(self):
        return getattr(self, attr)

    def set(self, value):
        if getattr(self, "merged", False):
            raise RuntimeError(
                f"the layer is merged: unmerge() before assigning {name} (the merged weight "
                f"was built from its current value, and unmerge() needs that value to "
                f"restore the base weight)"
            )
        current = getattr(self, attr)
        current[...] = checked_array(name, value, current.dtype, current.shape, alt_shapes(self))

    return property(get, set, doc=doc)


def refuse_unrecoverable_merge(magnitude, n, one_way):
    """Raise ``ValueError`` where m = 0 but n != 0.

    The merge would scale that channel of the base weight to zero, and
    ``unmerge()`` could not restore it; ``one_way`` names the functional
    merge to use instead.
    """
    lost = (np.asarray(magnitude).reshape(-1) == 0) & (np.asarray(n).reshape(-1) != 0)
    if lost.any():
        raise ValueError(
            f"the magnitude is 0 at output channel(s) {np.flatnonzero(lost)[:8].tolist()}: "
            f"merging would scale those rows of the base weight to zero and unmerge() could "
            f"not restore them. Use {one_way}(...) for a one-way merge."
        )


class EvalNormCache:
    """The eval-mode weight norm, reused while the weights it came from are unchanged.

    Every lookup compares the cached low-rank factors (r * (in + out)
    numbers, negligible next to a forward) and the base weight's identity
    (the layer's own frozen copy: it changes only by replacement), and
    recomputes on any change, including in-place optimiser updates. PEFT's
    opt-in ``DoraCaching`` is not invalidated when weights change in eval.
    """

    def __init__(self):
        self._entry = None

    def clear(self):
        """Forget the cached norm."""
        self._entry = None

    def get(self, weight, A, B, scaling, compute):
        """The cached norm for (weight, A, B, scaling), or ``compute()``, kept.

        ``scaling`` is checked first (``check_scaling``: a TypeError or
        ValueError naming it), so that no comparison with the cached one
        sees an array or a non-number."""
        scaling = check_scaling(scaling)
        e = self._entry
        if (
            e is not None
            and e[0] is weight
            and e[1] == scaling
            and np.array_equal(e[2], A)
            and np.array_equal(e[3], B)
        ):
            return e[4]
        n = compute()
        self._entry = (weight, scaling, A.copy(), B.copy(), n)
        return n


def run_in_c(*steps):
    """Run the lazy iterators ``steps`` to their end, in order, by C code alone.

    Python runs a signal handler (and raises what it raises: Ctrl-C's
    ``KeyboardInterrupt``, an alarm's exception) only between two bytecodes
    of Python code. ``steps`` made of C callables over plain ndarrays and
    dicts (``map(operator.iadd, ...)``, ``itertools.starmap(d.update, ...)``)
    and consumed here by a zero-length ``deque`` run no bytecode from their
    first item to their last, so such an exception comes before all of their
    effects or after all of them, never between two (adversarial tests,
    session 24: an optimiser step and a backward had stopped half done). The
    caller checks first that no item can fail or run Python code.
    """
    collections.deque(itertools.chain(*steps), maxlen=0)


class Module:
    """What every trainable piece shares: named parameters, their gradients, a mode.

    A subclass defines ``parameters()`` (the trainable arrays by name, live
    references that optimisers update in place) and sets ``training``.
    """

    def parameters(self):
        """The trainable arrays by name (none here)."""
        return {}

    def zero_grad(self):
        """Set every accumulated gradient to zero (new arrays in ``grads``)."""
        self.grads = {name: np.zeros_like(p) for name, p in self.parameters().items()}

    def _add_to_grads(self, deltas):
        """``grads[name] += delta`` for each (name, delta) of ``deltas``, in place, all or nothing.

        The adds run by C code alone (``run_in_c``), so a backward stopped by
        Ctrl-C or an alarm's exception has added every gradient or none, and
        leaves no partly accumulated gradient for the next optimiser step.
        Each add is checked first to be one that cannot
        fail (a plain writeable ndarray of the delta's shape, into which the
        sum casts). A gradient array put in by hand that is not (an int array,
        another shape, a subclass) is refused by name, as ``+=`` refused it,
        before anything is added; a read-only one is summed into a new array.
        """
        grads = self.grads
        targets, values, replaced = [], [], {}
        for name, delta in deltas.items():
            grad = grads[name]
            if not (type(grad) is np.ndarray and grad.shape == delta.shape and grad.flags.writeable
                    and (grad.dtype == delta.dtype  # the usual case, without the two calls below
                         or np.can_cast(np.result_type(grad, delta), grad.dtype, "same_kind"))):
                try:  # += 's own rules, into a new array
                    grad = np.add(grad, delta, out=np.empty_like(grad), casting="same_kind")
                except (TypeError, ValueError) as exc:
                    raise TypeError(
                        f"grads[{name!r}] ({type(grad).__name__} {getattr(grad, 'dtype', '')} "
                        f"{np.shape(grad)}) cannot take this backward's gradient ({delta.dtype} "
                        f"{delta.shape}): {exc}. zero_grad() gives every parameter a gradient of "
                        f"its own dtype and shape; nothing was added") from exc
                if type(grad) is not np.ndarray or grad.shape != delta.shape:
                    raise TypeError(f"grads[{name!r}] must be an ndarray of shape {delta.shape}, got "
                                    f"{type(grads[name]).__name__} {np.shape(grads[name])}; nothing was added")
                replaced[name] = grad  # put in with the adds below
                continue
            targets.append(grad)
            values.append(delta)
        run_in_c(map(operator.iadd, targets, values), itertools.starmap(grads.update, [(replaced,)]))

    def train(self, mode=True):
        """Training mode (``mode=True``) or evaluation mode. Returns self."""
        self.training = bool(mode)
        return self

    def eval(self):
        """Evaluation mode: ``train(False)``. Returns self."""
        return self.train(False)


class _InitSignature:
    """A class's ``__signature__``: its ``__init__``'s without ``self``, read when asked (a
    decorator may set the ``__init__``'s own after the class is made); None on an instance,
    whose signature is its ``__call__``'s."""

    def __get__(self, obj, cls):
        if obj is not None:
            return None
        init = inspect.signature(cls.__init__)
        return init.replace(parameters=list(init.parameters.values())[1:])


def consistent_forward(forward):
    """A layer's ``forward``, refused when a merge or unmerge of the same layer overlaps it.

    ``merge()`` and ``unmerge()`` change the flag, the base weight and the
    kept norm (``_all_or_nothing``), a forward reads them one after another,
    and the C kernels release the GIL: a forward on one thread while another
    thread merged and unmerged the same layer returned a wrong y without an
    error (up to 0.14 of its largest value in 94 of a few thousand forwards;
    an adversarial test, session 24). Each change now moves a counter to an
    odd number before it starts and to the next even one when it ends (a
    sequence lock); a forward that starts while it is odd, or ends with a
    number other than the one it started with, raises ``RuntimeError``
    instead of returning what it computed; ``set_base_weight`` counts as
    such a change too. A layer is meant for one thread at a time (README,
    "Errors"); this turns the worst misuse from a silent wrong answer into
    an error. It does not see an optimiser writing the parameters in place
    from another thread (``backward`` does, after).
    """
    def checked(self, *args, **kwargs):
        generation = self._state_generation
        if generation & 1:
            raise RuntimeError(_OVERLAP.format(when="started while"))
        y = forward(self, *args, **kwargs)
        if self._state_generation != generation:
            self._ctx = None  # nothing a backward could pair with
            raise RuntimeError(_OVERLAP.format(when="overlapped"))
        return y

    checked.__name__, checked.__qualname__ = forward.__name__, forward.__qualname__
    checked.__doc__, checked.__wrapped__ = forward.__doc__, forward
    return checked


_OVERLAP = ("this forward {when} a merge(), unmerge() or set_base_weight() of the same layer (from "
            "another thread): its output would mix two states of the layer, so it is not returned. Use "
            "a layer from one thread at a time, or change it only between forwards")


class AdapterLayer(Module):
    """Parameters, gradients, modes and dropout masks of an adapter layer.

    In training mode dropout is applied and a DoRA norm is recomputed every
    forward; in evaluation mode there is no dropout and the norm is cached
    while the weights it depends on are unchanged.

    A subclass sets ``_param_names`` and, in its constructor, ``training``,
    ``merged``, ``_ctx``, ``rng``, ``lora_dropout`` and ``_weight``. Its
    ``merge()`` calls ``_lock_adapter()`` last, its ``unmerge()`` and merged
    forward ``_check_merged_adapter()`` first, and ``unmerge()``
    ``_unlock_adapter()`` last.

    Attributes
    ----------
    merged_adapter : dict of str to ndarray, or None
        While merged: copies of the trainable arrays as ``merge()`` used them.
    """

    _param_names = ()
    _state_generation = 0  # even between merges and unmerges (``consistent_forward``)
    merged_adapter = None

    #: Each layer class's signature is its ``__init__``'s (without ``self``): Python 3.10's
    #: ``inspect.signature`` reads an inherited ``__new__`` before ``__init__``, so the
    #: ``__new__`` below made every layer's signature ``(*args, **kwargs)`` there, and the
    #: keyword check, which reads it, did nothing (session 20's third adversary).
    __signature__ = _InitSignature()

    def __new__(cls, *args, **kwargs):
        if kwargs:  # a keyword the constructor does not take: named, with the one meant
            check_constructor_keywords(cls, kwargs)
        return super().__new__(cls)

    @property
    def policy(self):
        """Where a float16/bfloat16 layer rounds: "consistent" or "peft" (``precision.POLICIES``).

        Checked on every assignment (a typo would otherwise run the other
        policy silently: the low-precision code tests ``== "peft"``). A layer
        pickled before policies existed reads as "consistent", the rule its
        float32/float64 arithmetic already follows.
        """
        return self.__dict__.get("_policy", "consistent")

    @policy.setter
    def policy(self, value):
        check_policy(value)
        if getattr(self, "merged", False) and value != self.policy:
            # unmerge() under another policy than merge() recovers another W0
            raise ValueError(
                f"policy cannot change while the layer is merged (merged under "
                f"{self.policy!r}, got {value!r}): unmerge() first"
            )
        if value != self.policy and self.__dict__.get("_norm_cache") is not None:
            self._norm_cache.clear()  # the eval-mode norm was computed under the old policy
        self.__dict__["_policy"] = value
    _merged_snapshot = None
    _merged_scaling = None  # the scaling merge() used, compared like the adapter

    def parameters(self):
        """The trainable arrays by PEFT name: live references, updated in place by optimisers."""
        return {name: getattr(self, name) for name in self._param_names}

    def _check_parameters_finite(self):
        """Per call, what can change between calls: NaN/Inf written in place into a trainable array.

        Their shapes and dtypes are fixed when the layer is built (assignments
        are checked, in-place writes cannot change them) and the frozen
        weights are checked when installed, so the forward's per-call checks
        are this, the input's and the scaling's (``functional._dora_forward``).
        """
        for name in self._param_names:
            check_finite(name, getattr(self, "_" + name))

    def _mask_for(self, x, dropout_mask):
        """The dropout mask of this forward: the given one, a drawn one, or None.

        A given mask in eval mode raises ``ValueError``: PEFT applies no
        dropout in eval, and using the training formula there would be silent.
        So does a given mask while merged (a merged layer runs only its merged
        weight; the mask would be ignored); merged, no mask is drawn.
        """
        if dropout_mask is None and self.lora_dropout == 0.0:  # the usual call, answered first
            return None
        merged = getattr(self, "merged", False)
        if dropout_mask is not None:
            if not self.training:
                raise ValueError(
                    "dropout_mask given in eval mode: PEFT applies no dropout in eval; "
                    "call train() first"
                )
            if merged:
                raise ValueError(
                    "dropout_mask given while the layer is merged: a merged layer runs only "
                    "its merged weight (as PEFT's), with no adapter dropout; unmerge() first"
                )
            return dropout_mask
        if merged or not self.training or self.lora_dropout == 0.0:
            return None
        keep = self.rng.random(np.shape(x)) >= self.lora_dropout
        return keep.astype(self._weight.dtype) / (1.0 - self.lora_dropout)

    # -- the merged state's guard ---------------------------------------------

    def _replace_base(self, weight):
        """Install ``weight`` (a fresh array of ours) as the base, keeping the bias and magnitude."""
        raise NotImplementedError

    def _switch_base(self, weight, merged):
        # the flag first: the shapes a grouped conv layer accepts depend on it
        self.merged = merged
        self._replace_base(weight)

    def _next_change(self):
        """The odd number ``_state_generation`` takes while a change runs (``consistent_forward``);
        the change ends by setting it to that number + 1.

        From any value: an odd one left by two changes racing on two threads
        gives way to an even one at the next change's end, instead of refusing
        every forward for good (an adversarial test, session 24)."""
        return (self._state_generation + 1) | 1

    def _changing_base(self, replace):
        """Run ``replace()`` (``set_base_weight``'s work) as a change that a forward on
        another thread sees (``consistent_forward``), all or nothing.

        Before, such a forward returned a y from the old base mixed with the new
        one, with no error; a refused weight (a bias of another dtype, a NaN
        weight, a norm that overflows) was left installed with half of its
        attributes, and every later forward refused or computed from it; and an
        alarm's exception in the middle left the new W0 with the old magnitude,
        a wrong y with no error (adversarial tests, session 24). On any
        exception the attributes come back in one assignment and the arrays a
        DoRA layer rewrites in place (the magnitude, its gradient) get their
        old values back.
        """
        in_place = [a for a in (getattr(self, "_lora_magnitude_vector", None),
                                self.grads.get("lora_magnitude_vector")) if isinstance(a, np.ndarray)]
        self._all_or_nothing(replace, in_place)

    def __getstate__(self):
        """Pickling and ``copy.deepcopy``: the layer's attributes, refused while a change runs.

        A copy taken (on another thread, say a checkpoint) in the middle of a
        ``merge()``, ``unmerge()`` or ``set_base_weight()`` held a flag and a
        weight that disagree, and its forward returned a wrong y with no error
        (an adversarial test, session 24). The change counter is read before
        and after the attributes are copied, as ``consistent_forward`` does.
        """
        generation = self._state_generation
        state = dict(self.__dict__)
        if generation & 1 or self._state_generation != generation:
            raise RuntimeError(
                "this layer was being changed (merge(), unmerge() or set_base_weight(), from another "
                "thread) while it was copied or pickled: the copy would mix two states. Copy it "
                "between changes")
        return state

    def _all_or_nothing(self, change, in_place=()):
        """Run ``change()``, which moves the layer between its merged and unmerged states
        (or replaces its base: ``_changing_base``), all or nothing.

        It sets several attributes (the flag, the base weight, the norm kept for
        ``unmerge``, the merge-time copies) and the trainable arrays'
        writeable flags. An exception anywhere in it, a ``KeyboardInterrupt``
        from Ctrl-C included, puts every attribute back in one assignment
        (``__dict__``: no half-restored state between two bytecodes) and then
        the flags, and goes on: a layer stopped in the middle of ``merge()``
        is the unmerged layer it was, never one whose flag and weight disagree
        (its forward was silently wrong) or whose adapter stayed read-only.
        The arrays of ``in_place``, which ``change`` rewrites in place (a DoRA
        layer's magnitude and its gradient, re-initialised by a new base), get
        their old values back too.
        """
        saved = dict(self.__dict__)
        arrays = [*self.parameters().values(), *self._merged_norm().values()]
        flags = [(a, a.flags.writeable) for a in arrays]
        kept = [(a, a.copy()) for a in in_place]  # arrays ``change`` rewrites in place
        started = self._next_change()
        try:
            self._state_generation = started
            change()
            self._state_generation = started + 1
        except BaseException:
            saved["_state_generation"] = started + 1  # a forward that overlapped it still sees a change
            self.__dict__ = saved
            for a, old in kept:
                a[...] = old
            for a, writeable in flags:
                if a.flags.writeable != writeable and (_can_unlock(a) or not writeable):
                    a.flags.writeable = writeable
            raise

    def _install_merged(self, weight, n=None, where=None):
        """A merge's last steps: the merged ``weight`` becomes the base, the adapter is locked.

        For DoRA, ``n`` is the norm the merge used (kept in ``weight_norm`` for
        ``unmerge``) and a zero magnitude is refused first (``where`` names the
        merge in the message), since unmerge could not restore that row.
        All or nothing (``_all_or_nothing``).
        """
        if n is not None:
            refuse_unrecoverable_merge(self.lora_magnitude_vector, n, where)

        def change():
            self._switch_base(weight, merged=True)
            if n is not None:
                self.weight_norm = n
            self._lock_adapter()

        self._all_or_nothing(change)

    def _install_unmerged(self, weight):
        """An unmerge's last steps: the restored ``weight`` becomes the base, the adapter
        trainable; all or nothing (``_all_or_nothing``)."""
        def change():
            self._switch_base(weight, merged=False)
            if getattr(self, "weight_norm", None) is not None:
                self.weight_norm = None
            self._unlock_adapter()

        self._all_or_nothing(change)

    def _lock_adapter(self):
        """After a merge: keep what was merged, and make the trainable arrays read-only.

        The merged weight was built from the adapter's current values, and
        ``unmerge()`` subtracts exactly them: an optimiser step (AdamW's
        weight decay moves parameters even with zero gradients) or an
        assignment in between would give back a wrong base weight. Read-only
        arrays refuse such writes where they happen (the optimisers and the
        property setters say why); the snapshot finds the writes that get
        around it (a view taken before ``merge()``, a writeable flag set back).
        """
        params = self.parameters()
        self.merged_adapter = {name: p.copy() for name, p in params.items()}
        self._merged_scaling = self.scaling
        self._merged_snapshot = WeightSnapshot({**params, **self._merged_norm()})
        for p in [*params.values(), *self._merged_norm().values()]:
            _lock(p)

    def _merged_norm(self):
        """A DoRA layer's ``weight_norm`` kept by ``merge()``, which ``unmerge()`` divides by."""
        n = getattr(self, "weight_norm", None)
        return {} if n is None else {"weight_norm": n}

    def _check_merged_adapter(self, action):
        """Raise ``RuntimeError`` if the adapter differs from what was merged."""
        changed = self._merged_snapshot.changed() if self._merged_snapshot is not None else []
        saved = self._merged_scaling
        try:
            same_scaling = saved is None or bool(self.scaling == saved)
        except (TypeError, ValueError):  # e.g. an array assigned to scaling
            same_scaling = False
        if not same_scaling:
            raise RuntimeError(
                f"scaling changed from {saved!r} to {self.scaling!r} while the layer was "
                f"merged: the merged weight was built with the scaling at merge(), so "
                f"{action} would use another one and give a wrong result. The layer is left "
                f"merged and unchanged. Set scaling back to {saved!r}, then call {action} again."
            )
        if changed:
            consequence = {
                "unmerge()": "give back a wrong base weight",
                "forward": "not compute the adapter the layer now holds",
            }[action]
            raise RuntimeError(
                f"{', '.join(changed)} changed in place while the layer was merged: the merged "
                f"weight was built from the values at merge(), so {action} would {consequence}. "
                f"The layer is left merged and unchanged. (While merged the adapter's arrays "
                f"are read-only; this write went around that, e.g. through a view taken "
                f"before merge().) Write back the merged values, kept in "
                f"layer.merged_adapter, then call {action} again."
            )

    def __setstate__(self, state):
        """Unpickling and ``copy.deepcopy``: the frozen weight and bias are frozen again, and a
        merged copy's adapter is read-only too.

        NumPy restores arrays writeable; without this a merged copy would
        accept optimiser steps (its ``unmerge()`` would still refuse, by the
        snapshot, but late).
        """
        state = dict(state)
        # a copy is not under a change, even one taken while the original was (an odd number)
        state.pop("_state_generation", None)
        if "policy" in state:  # pickled while policy was a plain attribute
            state["_policy"] = check_policy(state.pop("policy"))
        # pickled before float16/bfloat16 layers existed (dora_ref 0.1): a float32 or
        # float64 layer, for which autocast_adapter_dtype changes nothing
        if "_weight" in state and "_low_precision" not in state:
            state["_low_precision"] = state["_weight"].dtype in LOW_PRECISION_DTYPES
        state.setdefault("autocast_adapter_dtype", True)
        for name in ("_weight", "_bias"):  # NumPy restores them writeable: freeze them again
            if isinstance(state.get(name), np.ndarray):
                state[name] = frozen(state[name], owned=True)
        self.__dict__.update(state)
        if getattr(self, "merged", False):
            self._own_locked_arrays()
            for p in [*self.parameters().values(), *self._merged_norm().values()]:
                _lock(p)

    def _own_locked_arrays(self):
        """Give a merged copy writeable-capable adapter arrays, the snapshot following them.

        A merged layer's arrays are read-only when pickled; pickle protocol 5
        restores such an array over the pickle's immutable bytes, whose
        WRITEABLE flag can never be set again, so ``unmerge()`` failed with
        NumPy's "cannot set WRITEABLE flag". Such an array is replaced by a
        copy (nothing outside this fresh copy holds it yet), also in the
        merge-time snapshot, which compares the live arrays.
        """
        replaced = {}
        for attr in ["_" + name for name in self._param_names] + ["weight_norm"]:
            a = self.__dict__.get(attr)
            if isinstance(a, np.ndarray) and not a.flags.writeable:
                try:
                    a.flags.writeable = True
                except ValueError:  # over immutable memory: copy (an optimiser finds it: replacement)
                    replaced[id(a)] = self.__dict__[attr] = a.copy()
                    _record_replacement(a, replaced[id(a)])
        snapshot = self.__dict__.get("_merged_snapshot")
        if replaced and snapshot is not None:
            snapshot._arrays = tuple(replaced.get(id(a), a) for a in snapshot._arrays)

    def _unlock_adapter(self):
        """After an unmerge: the trainable arrays are writeable again (those ``_lock`` left
        writeable are: NumPy refuses to set the flag of such an array even to True again)."""
        for p in self.parameters().values():
            if not p.flags.writeable:
                p.flags.writeable = True
        self.merged_adapter = None
        self._merged_snapshot = None
        self._merged_scaling = None

    def _require_ctx(self):
        """Raise ``RuntimeError`` unless a forward left a context for backward."""
        if self.merged:
            raise RuntimeError("the layer is merged: unmerge() before training")
        if self._ctx is None:
            raise RuntimeError("backward() needs a forward() first")
