"""Layer call sequences in random orders, each step checked against a fresh recomputation.

Hypothesis draws a layer (DoRA or LoRA; linear, Conv1d with groups 1 or 2,
or embedding), its norm mode, and a sequence of calls: train/eval, forward
(with or without a dropout mask), backward, merge, unmerge, AdamW and SGD
steps, assignments and in-place writes into the trainable arrays, writes
through a view taken before a merge (and writing the merged values back),
zero_grad and set_base_weight. A model of the layer's state says, before
each call, what it must do, and the test asserts exactly that:

* a **correct result**: a forward equals the dense definition
  (``dora_ref.core.dense``, which forms V in full; LoRA written inline) at the
  current parameters; a backward adds the dense gradients at the parameters
  and input of the forward it follows; ``merge`` gives the dense merged
  weight and ``unmerge`` gives back the base weight; or
* **one of the documented exceptions**, with nothing changed: the layer is
  merged (backward, optimiser step, assignment, set_base_weight), not merged
  (unmerge), already merged (merge), no forward to go back through, a
  trainable array changed since the forward (backward), or since the merge
  (unmerge, merged forward).

Any other exception, a result off by more than the tolerance, or a missing
exception fails. The convolution's reference cuts patches with its own loop
(not ``dora_ref.core.im2col.im2col``). Tolerances: float64, ``assert_close`` with
the reduction lengths of the chain (``dora_ref.porting.tolerance``), against the
sum of the absolute terms where a result can cancel.
"""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dora_ref import AdamW, DoRALinear, LoRALinear, SGD

from dora_ref.core import dense
from dora_ref import conv as C
from dora_ref import embedding as Em
from dora_ref.porting.tolerance import assert_close

KINDS = ["DoRALinear", "LoRALinear", "DoRAConv1d", "LoRAConv1d", "DoRAConv1d-groups",
         "DoRAEmbedding"]
CONVS = ("DoRAConv1d", "LoRAConv1d", "DoRAConv1d-groups")
ACTIONS = ["forward", "forward", "backward", "backward", "merge", "unmerge", "adamw", "sgd",
           "assign", "write", "tamper", "restore", "train", "eval", "zero_grad",
           "set_base_weight"]
K = 64  # a bound on every reduction length below (in * k + r + N), for the tolerances


# ---------------------------------------------------------------------------
# the layers, and their definitions as linear maps (independent of dora_ref's paths)
# ---------------------------------------------------------------------------


def build(kind, rng, detach_norm):
    if kind in ("DoRALinear", "LoRALinear"):
        out_f, in_f, r = rng.integers(1, 6), rng.integers(1, 6), rng.integers(1, 4)
        kw = dict(detach_norm=detach_norm) if kind == "DoRALinear" else {}
        cls = DoRALinear if kind == "DoRALinear" else LoRALinear
        layer = cls(rng.normal(size=(out_f, in_f)), rng.normal(size=out_f), r=int(r),
                    lora_alpha=float(rng.uniform(1, 8)), rng=int(rng.integers(1 << 30)), **kw)
        geom = None
    elif kind in CONVS:
        groups = 2 if kind.endswith("groups") else 1
        out_c, in_c, k, r = (int(v) for v in rng.integers(1, 4, size=4))
        out_c, in_c, r = groups * out_c, groups * in_c, groups * r
        geom = dict(stride=int(rng.integers(1, 3)), padding=int(rng.integers(0, 2)),
                    dilation=int(rng.integers(1, 3)))
        kw = dict(detach_norm=detach_norm) if kind.startswith("DoRA") else {}
        cls = C.DoRAConv1d if kind.startswith("DoRA") else C.LoRAConv1d
        layer = cls(rng.normal(size=(out_c, in_c // groups, k)), rng.normal(size=out_c), r=r,
                    groups=groups, rng=int(rng.integers(1 << 30)), **geom, **kw)
    else:
        V, D, r = (int(v) for v in rng.integers(1, 6, size=3))
        layer = Em.DoRAEmbedding(rng.normal(size=(V, D)), r=r, rng=int(rng.integers(1 << 30)),
                                 detach_norm=detach_norm)
        geom = None
    for name, p in layer.parameters().items():  # a trained state, not only the initial one
        if name != "lora_magnitude_vector":
            p[...] = 0.5 * rng.normal(size=p.shape)
    return layer, geom


def draw_input(kind, layer, geom, rng):
    N = int(rng.integers(0, 4))  # N = 0 included
    if kind in ("DoRALinear", "LoRALinear"):
        return rng.normal(size=(N, layer.in_features))
    if kind in CONVS:
        k = layer.kernel_size[0]
        span = geom["dilation"] * (k - 1) + 1
        L = int(rng.integers(max(1, span - 2 * geom["padding"]), span + 4))
        return rng.normal(size=(N, layer.in_channels, L))
    return rng.integers(0, layer.num_embeddings, size=(N, 2))


def patches(x, k, stride, padding, dilation):
    """P[n * L_out + l, c * k + j] = x_padded[n, c, l * stride + j * dilation], by loops."""
    N, Cin, L = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
    L_out = (L + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    P = np.zeros((N * L_out, Cin * k))
    for n in range(N):
        for l in range(L_out):
            for c in range(Cin):
                for j in range(k):
                    P[n * L_out + l, c * k + j] = xp[n, c, l * stride + j * dilation]
    return P, L_out


def unpatch(dP, x_shape, k, stride, padding, dilation):
    """The adjoint of ``patches``: dx[n, c, pos] sums every patch entry read from it."""
    N, Cin, L = x_shape
    L_out = dP.shape[0] // max(N, 1) if N else 0
    dxp = np.zeros((N, Cin, L + 2 * padding))
    for n in range(N):
        for l in range(L_out):
            for c in range(Cin):
                for j in range(k):
                    dxp[n, c, l * stride + j * dilation] += dP[n * L_out + l, c * k + j]
    return dxp[:, :, padding:padding + L]


def block_diagonal(blocks, groups):
    """(out, c, ...) grouped blocks -> (out, groups * c, ...): row o keeps block o // (out/groups)."""
    out, c = blocks.shape[:2]
    dense = np.zeros((out, groups * c) + blocks.shape[2:])
    for o in range(out):
        j = o // (out // groups)
        dense[o, j * c:(j + 1) * c] = blocks[o]
    return dense


def diagonal_blocks(dense, groups):
    """The inverse of ``block_diagonal``: the entries of the grouped parameter."""
    out, c = dense.shape[0], dense.shape[1] // groups
    return np.stack([dense[o, (o // (out // groups)) * c:(o // (out // groups) + 1) * c]
                     for o in range(out)])


def linear_view(kind, layer, W0, params, x, mask=None):
    """(rows, W0, A, B, m, bias, mask rows, unflatten) of the layer as a linear map."""
    A, B = (params[n] for n in (("lora_embedding_A", "lora_embedding_B")
                                if kind == "DoRAEmbedding" else ("lora_A", "lora_B")))
    m = params.get("lora_magnitude_vector")
    if kind in ("DoRALinear", "LoRALinear"):
        return x, W0, A, B, m, layer.bias, mask, lambda y: y
    if kind in CONVS:
        k, g = layer.kernel_size[0], layer.geometry
        args = (k, g.stride[0], g.padding[0][0], g.dilation[0])
        P, L_out = patches(x, *args)
        Pm = None if mask is None else patches(mask, *args)[0]
        out, r = W0.shape[0], A.shape[0]
        N = x.shape[0]
        W_dense = block_diagonal(W0, g.groups)  # the (out, in, k) kernel of the grouped one
        B_dense = block_diagonal(B.reshape(out, -1), g.groups)  # (out, r)

        def unflatten(y):
            return y.reshape(N, L_out, out).transpose(0, 2, 1)
        return (P, W_dense.reshape(out, -1), A.reshape(r, -1), B_dense,
                None if m is None else m.reshape(out), layer.bias, Pm, unflatten)
    onehot = np.eye(W0.shape[0])[x.reshape(-1)]  # (N, V): the lookup as a product
    return onehot, W0.T, A, B, m, None, None, lambda y: y.reshape(*x.shape, y.shape[-1])


def ref_forward(kind, layer, W0, params, x, mask=None):
    """y by the definition, and a scale: the sum of |terms| of each output (for cancellation)."""
    X, W, A, B, m, bias, Xm, unflat = linear_view(kind, layer, W0, params, x, mask)
    s = layer.scaling
    if m is not None:
        y = dense.forward(X, W, A, B, m, s, bias, dropout_mask=Xm)
        Wm = dense.merged_weight(W, A, B, m, s)
        scale = np.abs(X) @ (np.abs(Wm) + np.abs(W) + s * np.abs(B) @ np.abs(A)).T
    else:
        Xd = X if Xm is None else X * Xm
        y = X @ W.T + s * (Xd @ A.T) @ B.T + (0 if bias is None else bias)
        scale = np.abs(X) @ (np.abs(W) + s * np.abs(B) @ np.abs(A)).T
    if bias is not None:
        scale = scale + np.abs(bias)
    return unflat(y), unflat(scale + 1e-300)


def ref_backward(kind, layer, W0, params, x, mask, dy, detach_norm):
    """dx and the parameter gradients by the definition (dense.backward or LoRA inline)."""
    X, W, A, B, m, _, Xm, _ = linear_view(kind, layer, W0, params, x, mask)
    s = layer.scaling
    if kind in CONVS:
        dY = dy.transpose(0, 2, 1).reshape(-1, W.shape[0])
    else:
        dY = dy.reshape(-1, W.shape[0])
    if m is not None:
        g = dense.backward(dY, X, W, A, B, m, s, detach_norm=detach_norm, dropout_mask=Xm)
        dX, dA, dB, dm = g.dx, g.dA, g.dB, g.dmagnitude
    else:
        Xd = X if Xm is None else X * Xm
        dA = s * B.T @ dY.T @ Xd
        dB = s * dY.T @ (Xd @ A.T)
        low = s * (dY @ B) @ A
        dX = dY @ W + (low if Xm is None else low * Xm)
        dm = None
    if kind in CONVS:
        dB = diagonal_blocks(dB, layer.groups)  # the grouped lora_B's own entries
    names = list(params)
    grads = {names[0]: dA.reshape(params[names[0]].shape),
             names[1]: dB.reshape(params[names[1]].shape)}
    if dm is not None:
        grads["lora_magnitude_vector"] = dm.reshape(params["lora_magnitude_vector"].shape)
    if kind in CONVS:
        g = layer.geometry
        dx = unpatch(dX, x.shape, layer.kernel_size[0], g.stride[0], g.padding[0][0], g.dilation[0])
    elif kind == "DoRAEmbedding":
        dx = None
    else:
        dx = dX.reshape(x.shape)
    return dx, grads


def no_input(kind, W0):
    """An empty input, for the linear view of the weights alone."""
    if "Conv" in kind:
        return np.zeros((0, 1, 1))
    return np.zeros((0,), int) if kind == "DoRAEmbedding" else np.zeros((0, W0.shape[-1]))


def ref_merged_weight(kind, layer, W0, params):
    _, W, A, B, m, _, _, _ = linear_view(kind, layer, W0, params, no_input(kind, W0))
    s = layer.scaling
    Wm = dense.merged_weight(W, A, B, m, s) if m is not None else W + s * B @ A
    scale = amax(W) + s * amax(np.abs(B) @ np.abs(A)) + 1
    if kind == "DoRAEmbedding":
        return Wm.T, scale
    if kind in CONVS:  # the dense (out, in, k) kernel, also with groups > 1 (see conv_merge)
        return Wm.reshape(W0.shape[0], layer.in_channels, *W0.shape[2:]), scale
    return Wm, scale


# ---------------------------------------------------------------------------
# the sequence runner
# ---------------------------------------------------------------------------


def amax(a):
    return float(np.max(np.abs(a), initial=0.0))


def copies(layer):
    return {k: v.copy() for k, v in layer.parameters().items()}


def same(a, b):
    return all(np.array_equal(a[k], b[k]) for k in a)


def run(kind, detach_norm, actions, seed):
    rng = np.random.default_rng(seed)
    layer, geom = build(kind, rng, detach_norm)
    params = layer.parameters()
    adamw = AdamW(params, lr=0.05, weight_decay=0.1)
    sgd = SGD(params, lr=0.05, momentum=0.5)
    view_name = list(params)[int(rng.integers(len(params)))]
    old_view = params[view_name][...]  # a view taken before any merge: stays writeable
    W0 = layer.weight.copy()  # the unmerged base weight
    merged, merged_params, merged_W0 = False, None, None
    last = None  # (x, mask, params, W0) of the forward a backward would follow
    grads = {k: np.zeros_like(v) for k, v in params.items()}
    grad_scale = {k: 0.0 for k in params}

    def expect(error, pattern, call):
        before = (copies(layer), layer.weight.copy(), {k: v.copy() for k, v in layer.grads.items()})
        with pytest.raises(error, match=pattern):
            call()
        assert same(copies(layer), before[0]), "a refused call changed a parameter"
        np.testing.assert_array_equal(layer.weight, before[1])
        assert same(layer.grads, before[2]), "a refused call changed a gradient"

    for action in actions:
        tampered = merged and not same(copies(layer), merged_params)
        if action == "forward":
            x = draw_input(kind, layer, geom, rng)
            mask = None
            if layer.training and kind != "DoRAEmbedding" and rng.random() < 0.5:
                mask = (rng.random(x.shape) >= 0.5) / 0.5
            if merged and mask is not None:
                mask = None  # PEFT's merged layer has no low-rank path to drop out
            if merged and tampered:
                expect(RuntimeError, "changed in place while the layer was merged",
                       lambda: layer.forward(x))
                last = None
                continue
            y = layer.forward(x) if mask is None else layer.forward(x, dropout_mask=mask)
            if merged:
                want, scale = ref_forward(kind, layer, merged_W0, merged_params, x)
                last = None
            else:
                want, scale = ref_forward(kind, layer, W0, copies(layer), x, mask)
                last = (x, mask, copies(layer), W0.copy())
            assert_close(y, want, k=K, scale=scale, name=f"{kind} forward")
        elif action == "backward":
            if merged:
                expect(RuntimeError, "merged: unmerge", lambda: layer.backward(np.zeros(1)))
                continue
            if last is None:
                expect(RuntimeError, "needs a forward", lambda: layer.backward(np.zeros(1)))
                continue
            x, mask, p_fwd, W_fwd = last
            want_y, _ = ref_forward(kind, layer, W_fwd, p_fwd, x, mask)
            dy = rng.normal(size=want_y.shape)
            if not same(copies(layer), p_fwd):
                expect(RuntimeError, "changed in place between the forward and this backward",
                       lambda: layer.backward(dy))
                continue
            dx = layer.backward(dy)
            want_dx, want_g = ref_backward(kind, layer, W_fwd, p_fwd, x, mask, dy, detach_norm)
            if want_dx is not None:
                assert_close(dx, want_dx, k=K, scale=amax(want_dx) + amax(dy) + 1,
                             name=f"{kind} dx")
            # The term scale of each gradient: the detached gradient of the absolute values
            # bounds the sum of |terms|; the exact mode's projection removes at most as much
            # again (it cancels to zero when in_features = 1, where every direction is fixed),
            # and its fast path forms it from W0 and B@A separately, so a row where W0 + s*B@A
            # nearly cancels carries the factor ||(|W0| + s|B||A|)_i|| / n_i (as tests/cases.py).
            _, abs_g = ref_backward(kind, layer, np.abs(W_fwd), {k: np.abs(v) for k, v in p_fwd.items()},
                                    np.abs(x), mask, np.abs(dy), True)
            kappa = 1.0
            _, Wl, Al, Bl, ml, _, _, _ = linear_view(kind, layer, W_fwd, p_fwd, x, mask)
            if ml is not None and not detach_norm:
                n = dense.row_norm(Wl + layer.scaling * Bl @ Al)
                n_abs = dense.row_norm(np.abs(Wl) + abs(layer.scaling) * np.abs(Bl) @ np.abs(Al))
                kappa = float(np.max(n_abs / np.maximum(n, np.finfo(float).tiny), initial=1.0))
            for k, g in want_g.items():
                grads[k] += g
                grad_scale[k] += amax(g) + 2 * kappa * amax(abs_g[k]) + amax(dy) + 1
        elif action == "merge":
            if merged:
                expect(RuntimeError, "already merged", layer.merge)
                continue
            layer.merge()
            want, scale = ref_merged_weight(kind, layer, W0, copies(layer))
            assert_close(layer.weight, want, k=K, scale=scale, name=f"{kind} merged weight")
            merged, merged_params, merged_W0 = True, copies(layer), W0.copy()
        elif action == "unmerge":
            if not merged:
                expect(RuntimeError, "not merged", layer.unmerge)
                continue
            if tampered:
                expect(RuntimeError, "changed in place while the layer was merged", layer.unmerge)
                continue
            layer.unmerge()
            _, scale = ref_merged_weight(kind, layer, W0, copies(layer))
            assert_close(layer.weight, W0, k=K, scale=scale, name=f"{kind} unmerged weight")
            W0 = layer.weight.copy()  # the next steps' base: checked equal to W0 above
            merged = False
        elif action in ("adamw", "sgd"):
            opt = adamw if action == "adamw" else sgd
            if merged:
                expect(RuntimeError, "read-only: its layer is merged", lambda: opt.step(layer.grads))
                continue
            opt.step(layer.grads)
        elif action in ("assign", "write"):
            name = list(params)[int(rng.integers(len(params)))]
            value = params[name] * 0.9 + 0.1 * rng.normal(size=params[name].shape)
            if action == "assign":
                if merged:
                    expect(RuntimeError, f"merged: unmerge\\(\\) before assigning {name}",
                           lambda: setattr(layer, name, value))
                    continue
                setattr(layer, name, value)
            else:
                if merged:
                    expect(ValueError, "read-only", lambda: params[name].__setitem__(..., value))
                    continue
                params[name][...] = value
            np.testing.assert_array_equal(params[name], value)
        elif action == "tamper":  # a write that gets around the read-only flag
            old_view.reshape(-1)[0] += 0.25
        elif action == "restore":
            if merged:
                old_view[...] = layer.merged_adapter[view_name]
        elif action == "train":
            layer.train()
        elif action == "eval":
            layer.eval()
        elif action == "zero_grad":
            layer.zero_grad()
            grads = {k: np.zeros_like(v) for k, v in params.items()}
            grad_scale = {k: 0.0 for k in params}
        elif action == "set_base_weight":
            new = W0 + 0.1 * rng.normal(size=W0.shape)
            if merged:
                expect(RuntimeError, "unmerge\\(\\) before replacing", lambda: layer.set_base_weight(new))
                continue
            layer.set_base_weight(new)
            W0 = new
            if "lora_magnitude_vector" in params:  # re-initialised from the new base
                _, Wv, A, B, _, _, _, _ = linear_view(kind, layer, W0, copies(layer),
                                                      no_input(kind, W0))
                want_m = dense.row_norm(Wv + layer.scaling * B @ A)
                assert_close(params["lora_magnitude_vector"].reshape(-1), want_m, k=K,
                             name=f"{kind} re-initialised magnitude")
                grads["lora_magnitude_vector"][...] = 0
                grad_scale["lora_magnitude_vector"] = 0.0
        for k in grads:  # the accumulated gradients, after every step
            assert_close(layer.grads[k], grads[k], k=K, scale=grad_scale[k] or 1.0,
                         name=f"{kind} grads[{k}] after {action}")


@settings(max_examples=200)
@given(kind=st.sampled_from(KINDS), detach_norm=st.booleans(),
       actions=st.lists(st.sampled_from(ACTIONS), min_size=1, max_size=30),
       seed=st.integers(0, 2**32 - 1))
def test_layer_call_sequences_match_a_fresh_recomputation(kind, detach_norm, actions, seed):
    """Every step of a drawn call sequence gives the definition's result or a documented
    exception with nothing changed (see the module docstring)."""
    run(kind, detach_norm, actions, seed)


@pytest.mark.parametrize("kind", KINDS)
def test_the_sequence_of_the_issue_is_caught_for_every_kind(kind):
    """The two reported sequences, for every kind: merge, AdamW step (refused), unmerge;
    and forward, AdamW step, backward (refused)."""
    run(kind, True, ["merge", "adamw", "unmerge", "forward", "adamw", "backward",
                     "forward", "backward", "adamw", "forward", "backward"], seed=1)
