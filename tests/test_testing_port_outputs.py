"""What a port returns, checked before its values: real floating-point arrays in PEFT's dtypes.

Found by session 17's adversary: a port returning complex y (imaginary part
1000) or y as an array of strings *passed* check_forward (only a
ComplexWarning: the values were cast to float64 before the comparison); an
object array escaped as a raw TypeError from the comparison; float64 y in a
float32 check and float32 y in a bfloat16 check passed (the rounding PEFT
makes skipped); a torch port returning a torch.bfloat16 tensor was told that
*it* raised ("Got unsupported ScalarType BFloat16", the checker's own
conversion); a nondeterministic port got hypothesis's raw FlakyFailure. Now
each is a ConformanceError saying what came back, and a bfloat16 tensor is
taken as the bfloat16 array of the same bits.

The correct port is written here from the paper's formula (float64 inside,
returned in x's dtype), not with dora_ref's functions.
"""
import numpy as np
import pytest

pytest.importorskip("hypothesis")

from dora_ref.porting import testing as T  # noqa: E402
from dora_ref.porting.testing import ConformanceError  # noqa: E402


def forward(x, W0, A, B, m, s, bias):
    """y = m / ||W0 + s B A||_row * (x @ (W0 + s B A).T) + bias, in float64, returned in x's dtype."""
    f = lambda a: None if a is None else np.asarray(a, dtype=np.float64)  # noqa: E731
    V = f(W0) + s * f(B) @ f(A)
    y = (f(m) / np.sqrt((V * V).sum(axis=1))) * (f(x) @ V.T)
    return (y if bias is None else y + f(bias)).astype(x.dtype)


def _fails(port, match, **kw):
    with pytest.raises(ConformanceError, match=match) as info:
        T.check_forward(port, max_examples=10, **kw)
    return str(info.value)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_correct_port_passes(dtype):
    assert T.check_forward(forward, dtype=dtype, max_examples=10).examples == 10


def test_complex_y_fails_naming_its_dtype():
    text = _fails(lambda *a: forward(*a) + 1000j, r"output y as an array of complex128")
    assert "real floating-point" in text


def test_y_as_strings_fails():
    _fails(lambda *a: forward(*a).astype(str), r"output y as an array of <U")


@pytest.mark.parametrize("value, what", [(np.array([[object()]]), "an array of object"),
                                         (None, "a NoneType"), ({"y": 1.0}, "a dict")])
def test_objects_and_non_arrays_fail_naming_what_came_back(value, what):
    _fails(lambda *a: value, f"output y as {what}")


@pytest.mark.parametrize("returned", ["int64", "bool"])
def test_integer_and_boolean_y_fail(returned):
    _fails(lambda *a: np.round(forward(*a)).astype(returned), f"output y as an array of {returned}")


def test_float64_y_in_a_float32_check_fails():
    text = _fails(lambda *a: forward(*a).astype(np.float64),
                  r"output y in float64, expected float32 \(the dtype of x", dtype="float32")
    assert "hint: none" not in text  # the message says what is wrong; no numbers to explain


def test_float32_y_in_a_bfloat16_check_fails():
    def float32_out(x, W0, A, B, m, s, bias):
        return forward(np.asarray(x, np.float32), W0, A, B, m, s, bias)  # never rounded to bfloat16
    _fails(float32_out, r"output y in float32, expected bfloat16", dtype="bfloat16")


def test_a_torch_bfloat16_tensor_is_taken_as_its_bits():
    torch = pytest.importorskip("torch")

    def torch_port(x, W0, A, B, m, s, bias):
        y = forward(np.asarray(x, np.float32), W0, A, B, m, s, bias)
        return torch.from_numpy(y).to(torch.bfloat16)  # rounded once, as PEFT's bfloat16 layer returns y
    assert T.check_forward(torch_port, dtype="bfloat16", max_examples=10).examples == 10


@pytest.mark.parametrize("when", ["30% of calls", "the 7th call"])
def test_a_nondeterministic_port_is_named_as_such(when):
    rng, calls = np.random.default_rng(0), [0]

    def varies(*a):
        calls[0] += 1
        wrong = rng.random() < 0.3 if when == "30% of calls" else calls[0] == 7
        return forward(*a) * (1.5 if wrong else 1.0)
    text = _fails(varies, "your port is not deterministic")
    assert "the failing run: output y" in text


def test_the_layer_checks_refuse_a_complex_output_too():
    def embedding_forward(ids, E, A, B, m, s, embed_scale, padding_idx):
        V = E + s * (B @ A).T
        return embed_scale * (m / np.linalg.norm(V, axis=0)) * V[ids] + 1j
    with pytest.raises(ConformanceError, match="output y as an array of complex128"):
        T.check_embedding_forward(embedding_forward, max_examples=5)
