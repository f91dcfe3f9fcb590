"""Bad input gets a TypeError/ValueError that names the argument and the shapes."""
import numpy as np
import pytest

from dora_ref import column_norm, dora_backward, dora_forward, lora_forward, merge, unmerge

rng = np.random.default_rng(0)
W0, A, B = rng.normal(size=(4, 3)), rng.normal(size=(2, 3)), rng.normal(size=(4, 2))
m, x = np.linalg.norm(W0, axis=1), rng.normal(size=(5, 3))


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(W0=W0.T), ValueError, r"A must have shape \(r, in\) = \(r, 4\); got W0 \(3, 4\)"),
        (dict(A=A.T), ValueError, r"A must have shape \(r, in\).*A \(3, 2\)"),
        (dict(B=B.T), ValueError, r"B must have shape \(out, r\) = \(4, 2\).*B \(2, 4\)"),
        (dict(A=np.zeros((0, 3)), B=np.zeros((4, 0))), ValueError, r"rank r must be >= 1"),
        (dict(magnitude=np.ones(3)), ValueError, r"magnitude must have shape \(out,\) = \(4,\), got \(3,\).*wrong axis"),
        (dict(magnitude=np.ones((1, 4))), ValueError, r"magnitude must have shape \(out,\) = \(4,\), one value per output channel; got \(1, 4\)"),
        (dict(bias=np.ones(3)), ValueError, r"bias must have shape \(out,\) = \(4,\), got \(3,\)"),
        (dict(x=np.ones((5, 4))), ValueError, r"x must have shape \(\.\.\., in\) = \(\.\.\., 3\), got \(5, 4\)"),
        (dict(x=np.ones((5, 3), np.float32)), TypeError, r"x has dtype float32 but the weights have dtype float64"),
        (dict(A=A.astype(np.float32)), TypeError, r"arrays must share one dtype.*A: float32"),
        (dict(W0=np.ones((4, 3), np.int64)), TypeError, r"W0 must have dtype float32 or float64, got int64"),
        (dict(W0=W0.astype(np.float16)), TypeError, r"unsupported combination of dtypes: W0: float16, A: float64"),
        (dict(W0=W0.astype(np.int8)), TypeError, r"W0 must have dtype float32 or float64, got int8"),
        (dict(A=np.where(np.eye(2, 3) > 0, np.nan, A)), ValueError, r"A \(shape \(2, 3\)\) contains NaN or Inf, first at index \(0, 0\)"),
        (dict(magnitude=np.array([1, np.inf, 1, 1.0])), ValueError, r"magnitude .* NaN or Inf, first at index \(1,\)"),
        (dict(scaling=np.nan), ValueError, r"scaling must be finite"),
        (dict(scaling="2"), TypeError, r"scaling must be a real number, got str"),
        (dict(x=None), TypeError, r"x must be an array, got None"),
    ],
)
def test_dora_forward_rejects(kwargs, error, pattern):
    args = dict(x=x, W0=W0, A=A, B=B, magnitude=m, scaling=1.0, bias=None)
    args.update(kwargs)
    with pytest.raises(error, match=pattern):
        dora_forward(**args)


def test_nan_in_base_weight_names_the_row():
    W = W0.copy()
    W[2, 1] = np.nan
    with pytest.raises(ValueError, match=r"not finite in row\(s\) \[2\]: W0 has NaN/Inf in row\(s\) \[2\]"):
        dora_forward(x, W, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"row\(s\) \[2\]"):
        merge(W, A, B, m, 1.0)


def test_overflowing_norm_is_reported():
    W = np.full((4, 3), 3e38, dtype=np.float32)  # the norm itself, 5.2e38, exceeds float32
    with pytest.raises(ValueError, match="overflowed"):
        column_norm(W, A.astype(np.float32), B.astype(np.float32), 1.0)


def test_backward_rejects_wrong_dy():
    _, ctx = dora_forward(x, W0, A, B, m, 1.0)
    with pytest.raises(ValueError, match=r"dy must have shape \(\.\.\., out\) = \(\.\.\., 4\), got \(5, 3\)"):
        dora_backward(np.ones((5, 3)), ctx)
    with pytest.raises(ValueError, match=r"dy must have shape \(5, 4\).*got \(6, 4\)"):
        dora_backward(np.ones((6, 4)), ctx)


def test_a_wrong_dy_is_measured_against_out_not_in():
    """A new user's case: a (3, 6) dy for a layer with in = 6, out = 8 was told
    "dy must have shape (..., in) = (..., 8)": the size was out's, the name in's."""
    from dora_ref.core import dense
    from dora_ref.layers import DoRALinear, LoRALinear

    W = np.ones((8, 6))
    x6 = np.ones((3, 6))
    want = r"dy must have shape \(\.\.\., out\) = \(\.\.\., 8\), got \(3, 6\)"
    for cls in (DoRALinear, LoRALinear):
        layer = cls(W, r=2, lora_alpha=4, rng=0)
        layer(x6)
        with pytest.raises(ValueError, match=want):
            layer.backward(x6)
    with pytest.raises(ValueError, match=want):  # the dense reference too
        dense.backward(x6, x6, W, np.ones((2, 6)), np.zeros((8, 2)), np.ones(8), 2.0)


def test_unmerge_rejects_lost_rows_and_wrong_norm():
    Wm, n = merge(W0, A, B, m, 1.0)
    m0 = m.copy()
    m0[1] = 0.0
    with pytest.raises(ValueError, match=r"cannot unmerge: the magnitude is 0 .* channel\(s\) \[1\]"):
        unmerge(Wm, A, B, m0, 1.0, n)
    with pytest.raises(ValueError, match=r"W_merged .* contains NaN or Inf"):
        unmerge(Wm * np.nan, A, B, m, 1.0, n)
    with pytest.raises(ValueError, match=r"n must have the shape and dtype of magnitude"):
        unmerge(Wm, A, B, m, 1.0, n[:3])


def test_dropout_mask_shape():
    with pytest.raises(ValueError, match=r"dropout_mask must have the shape of x \(5, 3\), got \(5, 2\)"):
        dora_forward(x, W0, A, B, m, 1.0, dropout_mask=np.ones((5, 2)))
    with pytest.raises(ValueError, match=r"dropout_mask"):
        lora_forward(x, W0, A, B, 1.0, dropout_mask=np.ones(3))


def test_zero_input_features_is_an_error():
    with pytest.raises(ValueError, match=r"W0 must have at least one input feature, got shape \(4, 0\)"):
        dora_forward(np.ones((2, 0)), np.ones((4, 0)), np.ones((1, 0)), np.ones((4, 1)), np.ones(4), 1.0)


def test_python_lists_of_ints_are_float64():
    y, _ = dora_forward([1, 0], [[1, 2], [3, 4]], [[1, 1]], [[0], [0]], [1, 1], 1)
    assert y.dtype == np.float64



@pytest.mark.parametrize("call", ["dora_forward", "merge", "column_norm"])
def test_transposed_W0_error_says_W0_looks_transposed(call):
    """A new user passed W0 as (in, out): the error said A had the wrong shape (with all
    three shapes) without saying that W0 transposed fits A and B. Now it says so; a
    square W0 (which cannot be told) and a merely wrong A get no such hint."""
    rng = np.random.default_rng(0)
    out_f, in_f, r = 64, 32, 4
    W0 = rng.normal(size=(out_f, in_f))
    A, B = rng.normal(size=(r, in_f)), rng.normal(size=(out_f, r))
    m, x = np.ones(out_f), rng.normal(size=(3, in_f))
    calls = {"dora_forward": lambda W: dora_forward(x, W, A, B, m, 2.0),
             "merge": lambda W: merge(W, A, B, m, 2.0),
             "column_norm": lambda W: column_norm(W, A, B, 2.0)}
    calls[call](W0)  # the right layout passes
    with pytest.raises(ValueError, match=r"W0 looks transposed: A and B fit a weight of shape \(64, 32\)"):
        calls[call](W0.T)
    with pytest.raises(ValueError) as info:
        dora_forward(x, W0, A[:, :-1], B, m, 2.0)  # A wrong, W0 right
    assert "transposed" not in str(info.value)
    sq = rng.normal(size=(in_f, in_f))
    with pytest.raises(ValueError) as info:
        dora_forward(x, sq, A, rng.normal(size=(in_f + 1, r)), np.ones(in_f), 2.0)
    assert "transposed" not in str(info.value)


def test_a_dora_layer_names_itself_for_an_unknown_keyword():
    """A new user's case: DoRALinear(..., alpha=3) was refused as
    "LoRALinear.__init__() got an unexpected keyword argument 'alpha'", and
    inspect.signature(DoRALinear) hid r and lora_alpha in **kwargs."""
    import inspect

    from dora_ref.layers import DoRAConv1d, DoRAConv2d, DoRALinear

    cases = [(DoRALinear, np.ones((3, 4))), (DoRAConv1d, np.ones((3, 4, 2))),
             (DoRAConv2d, np.ones((3, 4, 1, 1)))]
    for cls, W in cases:
        with pytest.raises(TypeError, match=rf"^{cls.__name__}\(\) got an unexpected keyword "
                                            r"argument 'alpha'; did you mean 'lora_alpha'\? it takes .*\blora_alpha\b"):
            cls(W, r=2, lora_alpha=4, alpha=3)
        params = inspect.signature(cls).parameters
        assert {"r", "lora_alpha", "detach_norm", "rng"} <= set(params)
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
        cls(W, r=2, lora_alpha=4, rng=0)  # the keywords it lists still work


@pytest.mark.parametrize("key, meant", [("lora_alpa", "lora_alpha"), ("rank", "r"),
                                        ("alpha", "lora_alpha"), ("dropout", "lora_dropout"),
                                        ("seed", "rng"), ("detatch_norm", "detach_norm"),
                                        ("lora_dim", "r"), ("use_rslor", "use_rslora"),
                                        ("R", "r"), ("Lora_Alpha", "lora_alpha")])
def test_a_mistyped_or_foreign_keyword_gets_a_did_you_mean(key, meant):
    """A keyword spelled wrong (lora_alpa) or as another library spells it (torchtune's rank and
    alpha, LyCORIS's lora_dim) names the keyword meant, before the list of all of them; in
    every layer class (the embedding, LoRA and LoRA conv layers had Python's message, naming
    "_LoRAConvNd.__init__()" for a conv: session 20's second adversary)."""
    from dora_ref.layers import DoRAConv2d, DoRAEmbedding, DoRALinear, LoRAConv2d, LoRALinear

    for cls, W in ((DoRALinear, np.ones((3, 4))), (DoRAConv2d, np.ones((3, 4, 1, 1))),
                   (DoRAEmbedding, np.ones((5, 4))), (LoRALinear, np.ones((3, 4))),
                   (LoRAConv2d, np.ones((3, 4, 1, 1)))):
        if key == "detatch_norm" and cls.__name__.startswith("LoRA"):
            continue  # a LoRA layer has no norm to detach
        if key == "dropout" and cls is DoRAEmbedding:
            continue  # nor does the embedding take a dropout
        with pytest.raises(TypeError, match=rf"unexpected keyword argument '{key}'; did you mean "
                                            rf"'{meant}'\? it takes .*\b{meant}\b"):
            cls(W, **{key: 2})


def test_a_keyword_like_none_of_them_gets_no_guess():
    """No guess where none is close (use_rslora is not what use_dora meant: PEFT's use_dora=True
    is what a DoRA layer is, and the message says so)."""
    from dora_ref.layers import DoRALinear

    from dora_ref.layers import LoRAConv2d

    for key, said in (("use_dora", "a DoRA layer is DoRA already"), ("bias_init", "")):
        with pytest.raises(TypeError) as info:
            DoRALinear(np.ones((3, 4)), **{key: True})
        assert "did you mean" not in str(info.value)
        assert said in str(info.value) and "it takes detach_norm" in str(info.value)
    with pytest.raises(TypeError, match=r"^LoRAConv2d\(\) .*'use_dora'; for DoRA use DoRAConv2d; it takes"):
        LoRAConv2d(np.ones((3, 4, 1, 1)), use_dora=True)


def test_adapter_from_layers_says_it_wants_a_mapping():
    """A new user's case: a list of layers gave AttributeError: 'list' object has no attribute 'items'."""
    from dora_ref import peft
    from dora_ref.layers import DoRALinear

    layer = DoRALinear(np.ones((3, 4)), r=2, lora_alpha=4, rng=0)
    with pytest.raises(TypeError, match=r"layers must be a mapping of module path to layer.*got list"):
        peft.adapter_from_layers([layer])


def test_the_checker_without_hypothesis_says_how_to_install_it(monkeypatch):
    """The hint named pip install 'dora_ref[test]', which does not fit a checkout; the README
    installs the porting extra."""
    import sys

    from dora_ref.porting import runner

    monkeypatch.setitem(sys.modules, "hypothesis", None)
    with pytest.raises(ImportError, match=r'pip install hypothesis .*pip install -e "\.\[porting\]"'):
        runner._hypothesis()


@pytest.mark.parametrize("bias", [4, 4.0, np.int64(4), True])
def test_a_number_given_as_the_bias_says_the_options_are_keyword_only(bias):
    """A second new user's case: DoRALinear(W0, 4) (PEFT's r by position) was refused as
    "bias must have 1 dimension(s), got shape ()"."""
    from dora_ref.layers import DoRAConv2d, DoRALinear, LoRALinear

    for cls, W in ((DoRALinear, np.ones((3, 4))), (LoRALinear, np.ones((3, 4))),
                   (DoRAConv2d, np.ones((3, 4, 1, 1)))):
        with pytest.raises(TypeError, match=rf"^{cls.__name__}\(weight, bias=None, \*, r=.*keyword-only"):
            cls(W, bias)
    DoRALinear(np.ones((3, 4)), np.zeros(3), r=2, rng=0)  # an array bias still works


def test_a_dora_layer_with_a_mixin_passes_the_mixin_its_keyword():
    """An adversary's case: class TaggedDoRA(DoRALinear, Tagged), Tagged a LoRALinear subclass with
    a keyword of its own, was refused ("unexpected keyword argument 'tag'") once the DoRA layers
    checked keywords against LoRALinear's; the next __init__ in the class order decides."""
    from dora_ref.layers import DoRALinear, LoRALinear

    class Tagged(LoRALinear):
        def __init__(self, weight, bias=None, *, tag=None, **kwargs):
            self.tag = tag
            super().__init__(weight, bias, **kwargs)

    class TaggedDoRA(DoRALinear, Tagged):
        pass

    layer = TaggedDoRA(np.ones((3, 4)), r=2, rng=0, tag="q")
    assert layer.tag == "q"
    with pytest.raises(TypeError, match="lora_alpah"):  # the mixin's own refusal, by Python
        TaggedDoRA(np.ones((3, 4)), r=2, rng=0, lora_alpah=8)


def test_a_dy_of_another_dtype_says_how_to_convert_it():
    """A new user's case: a float64 dy (made with np.sqrt(in_f), a float64 scalar) for a float32
    layer was told what is wrong but not what to do; the message now gives the conversion, and
    following it works."""
    from dora_ref.layers import DoRALinear

    layer = DoRALinear(np.ones((4, 3), np.float32), r=2, rng=0)
    layer(np.ones((2, 3), np.float32))
    dy = np.ones((2, 4)) / np.sqrt(3)
    with pytest.raises(TypeError, match=r"dy has dtype float64 but the weights have dtype float32; "
                                        r"convert it first \(dy\.astype\('float32'\)\)"):
        layer.backward(dy)
    assert layer.backward(dy.astype('float32')).dtype == np.float32
    with pytest.raises(TypeError, match=r"convert it first \(x\.astype\('float32'\)\)"):
        layer(np.ones((2, 3)))


_KINDS = ["DoRALinear", "LoRALinear", "DoRAEmbedding", "DoRAConv2d", "LoRAConv1d"]
_FLOATS = ["float32", "float64", "float16", "bfloat16"]


def _layer_and_input(kind, dtype, rng):
    import dora_ref

    cls = getattr(dora_ref, kind)
    if kind == "DoRAEmbedding":
        return cls(rng.standard_normal((10, 6)).astype(dtype), r=2, lora_alpha=4, rng=0), None
    shape, x = {"DoRALinear": ((6, 5), (3, 5)), "LoRALinear": ((6, 5), (3, 5)),
                "DoRAConv2d": ((4, 3, 3, 3), (2, 3, 6, 6)), "LoRAConv1d": ((4, 3, 3), (2, 3, 7))}[kind]
    return cls(rng.standard_normal(shape).astype(dtype), r=2, lora_alpha=4, rng=0), rng.standard_normal(x)


@pytest.mark.parametrize("kind", _KINDS)
@pytest.mark.parametrize("weights, given", [(w, g) for w in _FLOATS for g in _FLOATS + ["int64"]
                                            if w != g])
def test_following_the_dtype_hint_works(kind, weights, given):
    """Session 20's second adversary: a float64 layer given float16 x (or dy) was told to convert
    it to float32, which it then refused too; the third: an int x or dy for a conv layer, or a
    float16 embedding's dy, was told float32 too. For x and dy of every float dtype other than
    the weights', and int64, the conversion the message names is one the layer takes."""
    import re

    import ml_dtypes

    names = {"np": np, "ml_dtypes": ml_dtypes}
    rng = np.random.default_rng(0)
    layer, x = _layer_and_input(kind, np.dtype(ml_dtypes.bfloat16) if weights == "bfloat16" else weights, rng)

    def follow(call, arr, name):
        with pytest.raises(TypeError) as info:
            call(arr)
        m = (re.search(rf"\(({name}\.astype\('\w+'\))\)", str(info.value))
             or re.search(rf"e\.g\. ({name}\.astype\([\w.]+\))", str(info.value)))
        assert m, str(info.value)
        return call(eval(m.group(1), names, {name: arr}))  # the message's own expression

    as_given = (lambda a: a.astype(ml_dtypes.bfloat16)) if given == "bfloat16" else (lambda a: a.astype(given))
    y = layer(np.array([1, 2, 3])) if x is None else follow(layer, as_given(x), "x")
    follow(layer.backward, as_given(np.ones(np.shape(y))), "dy")


def test_an_int_or_float16_x_for_a_float32_layer_names_the_weights_dtype():
    """The last new user's case: int64 and float16 x for a float32 layer were told "it takes
    float32 or float64", though the layer refuses float64 too."""
    from dora_ref.layers import DoRALinear

    layer = DoRALinear(np.ones((4, 3), np.float32), r=2, rng=0)
    with pytest.raises(TypeError, match=r"x must have the weights' dtype float32, got int64 .*"
                                        r"e\.g\. x\.astype\(np\.float32\)"):
        layer(np.ones((2, 3), np.int64))
    with pytest.raises(TypeError, match=r"x has dtype float16 .*it takes the weights' dtype, "
                                        r"float32; convert it explicitly, e\.g\. x\.astype\(np\.float32\)"):
        layer(np.ones((2, 3), np.float16))


def test_every_layer_class_signature_is_its_init_s():
    """Session 20's third adversary: on Python 3.10 ``inspect.signature`` reads an inherited
    ``__new__`` first, and the keyword check's ``__new__`` made the conv layers' signature
    ``(*args, **kwargs)`` there (and skipped the check). Each class now carries its
    ``__init__``'s signature, whatever the Python."""
    import inspect

    import dora_ref

    for name in ("DoRALinear", "LoRALinear", "DoRAEmbedding", "DoRAConv1d", "DoRAConv2d",
                 "DoRAConv3d", "LoRAConv1d", "LoRAConv2d", "LoRAConv3d"):
        params = inspect.signature(getattr(dora_ref, name)).parameters
        assert {"weight", "r", "lora_alpha", "rng"} <= set(params), name
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values()), name


def test_a_layer_subclass_made_by_type_without_a_module_name():
    """The third adversary's case: ``type('X', (LoRALinear,), {})`` run by ``exec`` in globals
    without ``__name__`` has no ``__module__``; constructing it with keywords raised
    AttributeError."""
    from dora_ref.layers import LoRALinear

    scope = {"LoRALinear": LoRALinear}
    exec("X = type('X', (LoRALinear,), {})", scope)
    layer = scope["X"](np.ones((3, 4)), r=2, rng=0)
    assert layer.r == 2
