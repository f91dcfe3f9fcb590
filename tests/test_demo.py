"""The demo (``dora-ref demo``) and the small MLP it is built from.

The demo runs in ``--quick`` mode into a temporary folder; the MLP's
hand-written backward is checked against float64 central differences
(``dora_ref.porting.gradcheck``, rtol 1e-6: see its docstring for the error model).
"""
import csv
import json
import sys

import numpy as np
import pytest

from dora_ref import DoRALinear, LoRALinear, cli
from dora_ref.porting.gradcheck import gradcheck
from dora_ref.demo.mlp import MLP, Dense, ReLU, init_dense, softmax_cross_entropy
from dora_ref.porting.tolerance import rtol

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from dora_ref import demo  # noqa: E402  (needs the two above)

OUTPUTS = ("results.json", "results.csv", "decomposition.csv", "decomposition.png", "accuracy.png")


_QUICK_RUNS = {}  # backend -> (folder, stdout): one --quick run per backend for all tests


@pytest.fixture
def quick_run(backend, tmp_path_factory, capsys):
    if backend not in _QUICK_RUNS:
        out = tmp_path_factory.mktemp(f"demo_{backend}")
        capsys.readouterr()
        assert demo.main(["--quick", "--out", str(out), "--no-progress"]) == 0
        _QUICK_RUNS[backend] = out, capsys.readouterr().out
    return _QUICK_RUNS[backend]


def test_quick_demo_writes_every_output(quick_run):
    out, stdout = quick_run
    for name in OUTPUTS:
        assert (out / name).stat().st_size > 0, name
    for name in ("decomposition.png", "accuracy.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / name).stat().st_size < 300_000
    result = json.loads((out / "results.json").read_text())
    n_methods = 2 + 2 * len(demo.QUICK.ranks)
    assert len(result["table"]) == n_methods
    assert len(result["runs"]) == n_methods * demo.QUICK.seeds
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == n_methods
    # one ΔM/ΔD point per hidden layer, per checkpoint, per (FT | adapter) run
    with open(out / "decomposition.csv") as f:
        points = list(csv.DictReader(f))
    per_run = len(demo.QUICK.hidden) * demo.QUICK.checkpoints
    assert len(points) == per_run * (n_methods - 1) * demo.QUICK.seeds
    for text in ("method", "test accuracy", "Merge check", "pooled", "-0.62", "within-step",
                 "DoRA - LoRA"):
        assert text in stdout
    # the paired differences are those of the runs
    acc = {(r["method"], r["rank"], r["seed"]): r["accuracy"] for r in result["runs"]}
    for p in result["dora_minus_lora"]:
        assert p["diffs"] == [acc[("DoRA", p["rank"], s)] - acc[("LoRA", p["rank"], s)]
                              for s in result["seeds"]]


def test_quick_demo_merged_equals_unmerged(quick_run):
    """Merging is exact up to float64 rounding along the network.

    Bound: rtol(float64, k) * max|logits| with k = sum over the 4 linear
    layers of (in + r) <= 4 * (64 + 4) = 272 terms, i.e. 8 * gamma_272
    ~ 2.4e-13 relative: the rounding of the longest chain of sums, with
    the tolerance module's safety factor. Measured: ~2e-14 absolute.
    """
    out, _ = quick_run
    result = json.loads((out / "results.json").read_text())
    adapters = [r for r in result["runs"] if r["method"] in ("LoRA", "DoRA")]
    assert len(adapters) == 2 * len(demo.QUICK.ranks) * demo.QUICK.seeds
    k = 4 * (64 + max(demo.QUICK.ranks))
    for r in adapters:
        assert r["merge_max_diff"] <= r["merge_bound"] <= rtol(np.float64, k) * 100, r
    assert result["merge_ok"] is True


def test_merge_check_of_a_trained_network_against_outputs_computed_here():
    """Issue 15: the test above asserts the demo's own reported difference, which a merge
    that did nothing would also pass. Here the test computes everything itself: each
    trained DoRA layer's merged weight from the paper's Eq. (5) formed densely,
    diag(m / ||W0 + s B A||_row)(W0 + s B A), and the network's logits from those
    weights. The unmerged network, the merged one and the demo's merge_check must all
    agree with them within the demo's float64 bound; and the merged weights are far
    from W0 (the adapter moved them), so a merge that did nothing fails.

    Bound: rtol(float64, k) * max|logits| with k = sum over the linear layers of
    (in + r), as in the docstring of test_quick_demo_merged_equals_unmerged.
    """
    data = demo.load_tasks()
    config = demo.Config(hidden=(32, 32), ranks=(2,))
    rng = np.random.default_rng(3)
    base = demo.build_mlp((64, 32, 32, 10), rng)
    net = demo.adapt(base, "DoRA", 2, config, rng)
    demo.train(net, data["X_train_target"][:256], data["y_train"][:256], epochs=2,
               lr=config.lr_adapter, batch_size=config.batch_size, rng=rng)
    X = data["X_test_target"][:100]
    adapters = [layer for layer in net.layers if isinstance(layer, DoRALinear)]
    assert len(adapters) == 2 and all(np.abs(a.lora_B).max() > 1e-3 for a in adapters)

    weights = []  # (W, b) of every linear layer, merged densely here
    for layer in net.layers:
        if isinstance(layer, DoRALinear):
            V = layer.weight + layer.scaling * layer.lora_B @ layer.lora_A
            W = (layer.lora_magnitude_vector / np.linalg.norm(V, axis=1))[:, None] * V
            assert np.abs(W - layer.weight).max() > 1e-3  # the merge has work to do
            weights.append((W, layer.bias))
        elif isinstance(layer, Dense):
            weights.append((layer.weight, layer.bias))
    h = X
    for i, (W, b) in enumerate(weights):
        h = h @ W.T + b
        if i < len(weights) - 1:
            h = np.maximum(h, 0.0)
    k = sum(W.shape[1] + 2 for W, _ in weights)
    bound = rtol(np.float64, k) * float(np.max(np.abs(h)))

    net.eval()
    unmerged = net.forward(X)
    assert np.abs(unmerged - h).max() <= bound
    max_diff, demo_bound = demo.merge_check(net, X)  # merges, compares, unmerges
    assert max_diff <= demo_bound
    for layer in adapters:
        layer.merge()
    for layer, (W, _) in zip([la for la in net.layers if isinstance(la, (Dense, DoRALinear))],
                             weights):
        np.testing.assert_allclose(layer.weight, W, rtol=1e-13, atol=1e-15)
    assert np.abs(net.forward(X) - h).max() <= bound


def test_the_shift_matters(quick_run):
    """The target task separates the methods: head-only is far below full FT."""
    out, _ = quick_run
    table = {(r["method"], r["rank"]): r for r in json.loads((out / "results.json").read_text())["table"]}
    assert table[("FT", None)]["acc_mean"] > 0.85
    assert table[("head", None)]["acc_mean"] < table[("FT", None)]["acc_mean"] - 0.15
    assert table[("head", None)]["params"] < table[("LoRA", 1)]["params"] < table[("DoRA", 1)]["params"]
    # DoRA adds exactly one magnitude per output channel of each adapted layer
    assert table[("DoRA", 1)]["params"] - table[("LoRA", 1)]["params"] == sum(demo.QUICK.hidden)


def test_demo_reproducible_from_seed():
    data = demo.load_tasks()
    config = demo.Config(seeds=1, ranks=(2,), pretrain_epochs=2, epochs=2)
    a, pa, _ = demo.run_seed(config, 7, data)
    b, pb, _ = demo.run_seed(config, 7, data)
    assert [r["accuracy"] for r in a] == [r["accuracy"] for r in b]
    assert [p["delta_m"] for p in pa] == [p["delta_m"] for p in pb]
    # the target is the source with a fixed permutation of the 64 pixels
    assert sorted(data["permutation"]) == list(range(64))
    assert np.array_equal(data["X_test_target"], data["X_test"][:, data["permutation"]])


def test_missing_dependency_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes "import sklearn" fail
    assert demo.main(["--quick", "--no-progress"]) == 1
    err = capsys.readouterr().err
    assert "scikit-learn" in err and 'pip install -e ".[demo]"' in err


def test_bad_seed_count_is_an_error(capsys):
    assert demo.main(["--quick", "--seeds", "0", "--no-progress"]) == 2
    assert "--seeds must be >= 1" in capsys.readouterr().err


def test_cli_dispatches_demo_help(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--quick" in out and "--out" in out and "--seed" in out


def test_merge_check_catches_a_wrong_merge():
    rng = np.random.default_rng(0)
    net = MLP([DoRALinear(*init_dense(6, 5, rng), r=2, rng=rng), ReLU(), Dense(*init_dense(5, 3, rng))])
    net.layers[0].lora_B[...] = rng.standard_normal((5, 2))
    x = rng.standard_normal((4, 6))
    diff, bound = demo.merge_check(net, x)
    assert diff <= bound
    layer = net.layers[0]
    honest_merge = layer.merge

    def sloppy_merge():  # folds a magnitude 1e-9 off the one the forward used
        layer.lora_magnitude_vector[0] *= 1 + 1e-9
        honest_merge()

    layer.merge = sloppy_merge
    diff, bound = demo.merge_check(net, x)
    assert diff > bound


# ---------------------------------------------------------------------------
# the MLP: hand-written backward against finite differences
# ---------------------------------------------------------------------------


def test_softmax_cross_entropy_value_and_gradient():
    rng = np.random.default_rng(1)
    logits, labels = rng.standard_normal((5, 4)), np.array([0, 3, 1, 1, 2])
    loss, dlogits = softmax_cross_entropy(logits, labels)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.mean(np.log(p[np.arange(5), labels])), rel=1e-14)
    gradcheck(lambda q: softmax_cross_entropy(q["z"], labels)[0], {"z": logits},
              {"z": dlogits}, raise_on_failure=True)
    # large logits do not overflow
    loss, d = softmax_cross_entropy(np.array([[1000.0, 0.0]]), np.array([0]))
    assert np.isfinite(loss) and np.isfinite(d).all()


@pytest.mark.parametrize("kind", ["dense", "frozen", "lora", "dora"])
def test_mlp_backward_matches_finite_differences(kind):
    rng = np.random.default_rng(2)
    W1, b1 = init_dense(6, 5, rng)
    W2, b2 = init_dense(5, 3, rng)
    if kind in ("dense", "frozen"):
        first = Dense(W1, b1, trainable=kind == "dense")
    elif kind == "lora":
        first = LoRALinear(W1, b1, r=2, rng=rng)
    else:  # the exact gradient: the default detached norm (Sec. 4.3) is not what f differentiates
        first = DoRALinear(W1, b1, r=2, rng=rng, detach_norm=False)
    if kind in ("lora", "dora"):
        first.lora_B[...] = rng.standard_normal(first.lora_B.shape)
    net = MLP([first, ReLU(), Dense(W2, b2)])
    x, labels = rng.standard_normal((7, 6)), rng.integers(0, 3, size=7)

    net.zero_grad()
    _, dlogits = softmax_cross_entropy(net.forward(x), labels)
    dx = net.backward(dlogits)
    params = net.parameters()
    assert ("0.weight" in params) == (kind == "dense")

    def loss(p):
        saved = {k: v.copy() for k, v in params.items()}
        for k in params:
            params[k][...] = p[k]
        value = softmax_cross_entropy(net.forward(x), labels)[0]
        for k in params:
            params[k][...] = saved[k]
        return value

    gradcheck(loss, params, net.grads(), raise_on_failure=True)
    gradcheck(lambda p: softmax_cross_entropy(net.forward(p["x"]), labels)[0], {"x": x},
              {"x": dx}, raise_on_failure=True)


def test_dense_and_labels_reject_bad_input():
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        Dense(np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match=r"\(\.\.\., in\) = \(\.\.\., 2\)"):
        Dense(np.zeros((3, 2))).forward(np.zeros((4, 5)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 2\)"):
        softmax_cross_entropy(np.zeros((2, 2)), np.array([0, 2]))
    with pytest.raises(ValueError, match="labels must be integers"):
        softmax_cross_entropy(np.zeros((2, 2)), np.array([0.0, 1.0]))
    with pytest.raises(RuntimeError, match="forward"):
        Dense(np.zeros((3, 2))).backward(np.zeros((1, 3)))


def test_quick_run_does_not_overwrite_a_full_runs_outputs():
    """A new user (session 22): ``demo`` and ``demo --quick`` both wrote to ./demo_out, so the
    short run replaced the full run's results and plots. --quick now defaults to ./demo_out_quick;
    an explicit --out is kept either way."""
    assert demo.parse_args([]).out == "demo_out"
    assert demo.parse_args(["--quick"]).out == "demo_out_quick"
    assert demo.parse_args(["--quick", "--out", "x"]).out == "x"
    assert demo.parse_args(["--out", "y"]).out == "y"
