"""What the conformance checker says when a port's numbers match a known mistake.

``HINTS`` maps each key of ``ConformanceError.hint`` (and of a
``Diagnosis``) to the explanation printed with the failure: what the port
computed, what PEFT and the paper compute, and how to fix it. The mistakes
themselves are recomputed in ``dora_ref.porting.variants`` and
``dora_ref.porting.layer_checks``.
"""

#: What each hint means. The keys are ``ConformanceError.hint``.
HINTS = {
    "norm_axis": (
        "the norm is taken over the wrong axis. DoRA's norm is one value per output "
        "channel: the L2 norm of each ROW of the (out, in) weight W0 + s*B@A, e.g. "
        "torch.linalg.norm(W0 + s * B @ A, dim=1). The paper's 'column norm' means "
        "the same thing, because the paper writes W as (in, out)."
    ),
    "scaling_outside_norm": (
        "the scaling s is left out of the norm: n must be ||W0 + s*B@A|| per row, with "
        "the same s = lora_alpha / r (or / sqrt(r)) as the low-rank term "
        "(PEFT DoraLinearLayer.get_weight_norm)."
    ),
    "scaling_rule": (
        "the scaling uses the other of PEFT's two rules: s = lora_alpha / r, and "
        "s = lora_alpha / sqrt(r) only with use_rslora=True (rsLoRA; PEFT "
        "LoraLayer.update_layer). Your numbers match the rule the case did not ask for; "
        "the same s goes into the norm, the low-rank term and the merge."
    ),
    "scaling_twice": (
        "the low-rank term is scaled twice: your y has s*s*(x@A.T)@B.T (e.g. s applied "
        "to B@A, or to lora_B's output, and again to the sum), where PEFT and the paper "
        "have s*(x@A.T)@B.T once, the same s as in the norm ||W0 + s*B@A|| (which your "
        "numbers take once). Scale the low-rank path by s in one place only."
    ),
    "computed_in_float32": (
        "your numbers are dora_ref's to float32's rounding but not to float64's: most likely "
        "the formula is right and part of the port computes or keeps a value in float32 in "
        "this float64 check (a torch.tensor or np.array made without dtype=, torch's float32 "
        "default dtype, an np.float32 constant, a norm or magnitude stored in float32); a "
        "formula error as small as float32's rounding (about 1e-7 relative) looks the same. "
        "Keep every array float64 end to end, or check the port with dtype='float32'."
    ),
    "norm_of_W0": (
        "the norm ignores the low-rank update: your n is ||W0|| per row, but it must be "
        "||W0 + s*B@A||, recomputed from the current A and B at every forward. The two "
        "agree only at initialisation (B = 0)."
    ),
    "bias_scaled": (
        "the bias is multiplied by the magnitude: y = g*(x@V.T + b), so in the backward "
        "dm = sum_N(dy * (x@V.T + b)) / n (torchtune's and fsdp_qlora's DoRALinear add "
        "(g - 1) * base_layer(x), bias included). The bias must be added after the "
        "scaling, y = g*(x@V.T) + b, dm = sum_N(dy * x@V.T) / n (PEFT subtracts the base "
        "bias before applying m / n, and never scales it)."
    ),
    "no_magnitude": (
        "the magnitude is not applied: your output is plain LoRA, x@(W0 + s*B@A).T + b. "
        "DoRA multiplies each output channel by g = m / ||W0 + s*B@A||_row."
    ),
    "naive_dropout": (
        "dropout is applied to the whole input, y = g*(dropout(x)@V.T) + b. PEFT's "
        "training formula feeds the clean x to the base layer and the dropped-out xd only "
        "to DoRA's correction: y = x@W0.T + b + (g - 1)*(xd@W0.T) + g*s*(xd@A.T)@B.T "
        "(PEFT DoraLinearLayer.forward; nbasyl/DoRA#2)."
    ),
    "dropout_ignored": (
        "the dropout mask is not applied: your output is the eval-mode forward."
    ),
    "norm_not_detached": (
        "your gradients are the exact ones (the norm differentiated), but the detached "
        "variant was asked for: PEFT and the paper (Sec. 4.3) treat n as a constant, "
        "i.e. n = norm(...).detach() in PyTorch. Use detach_norm=False to check the "
        "exact gradient instead."
    ),
    "norm_detached": (
        "your gradients treat the norm as a constant (detached), but the exact gradient "
        "was asked for (detach_norm=False): let the gradient flow through n (paper Eq. 6, "
        "the projection away from each row of V). Use detach_norm=True to check the "
        "detached variant (PEFT's) instead."
    ),
    "dmagnitude_missing_norm": (
        "dmagnitude is missing the division by n: dm = sum_N(dy * z) / n with "
        "z = x@V.T (paper Eq. 7); you return sum_N(dy * z), the gradient w.r.t. g."
    ),
    "grads_without_g": (
        "dA and dB are plain LoRA's gradients: they must be scaled per output channel by "
        "g = m / n, because y = g * (... + s*(x@A.T)@B.T)."
    ),
    "merge_without_magnitude": (
        "the merge leaves out the magnitude: your W' is W0 + s*B@A (what PEFT's "
        "get_delta_weight gives, and what a LoRA merge does). DoRA's merged weight is "
        "diag(m / n) (W0 + s*B@A), n the row norms of W0 + s*B@A."
    ),
    "merge_without_norm": (
        "the merge multiplies by the magnitude but does not divide by the norm: "
        "W' = diag(m / n) (W0 + s*B@A), n = ||W0 + s*B@A||_row."
    ),
    "factor_on_columns": (
        "the factor m / n scales the columns instead of the rows of the (out, in) weight, in "
        "the merge and in the unmerge (the factor laid out for a weight stored (in, out) but "
        "applied to an (out, in) one). One factor per output channel: "
        "W' = (m / n)[:, None] * V, W0 = W' / (m / n)[:, None] - s*B@A."
    ),
    "unmerge_factor_on_columns": (
        "the merge is right but the unmerge divides by m / n per column of the (out, in) "
        "weight, i.e. per ROW of a weight stored (in, out) (PEFT 0.11 to 0.20's Conv1D / "
        "fan_in_fan_out unmerge: weight / dora_factor.view(-1, 1) without transposing; "
        "fixed in PEFT PR #3532). Divide each output channel's weights by its own factor: "
        "W0 = W' / (m / n)[:, None] - s*B@A in the (out, in) layout."
    ),
    "norm_plus_eps": (
        "an epsilon is added to the norm, g = m / (n + eps) (LyCORIS adds "
        "torch.finfo(dtype).eps to its weight norm). DoRA divides by n itself; the "
        "difference is eps / n relative, so it shows only when the norms are tiny. If you "
        "need a guard against n = 0, raise or handle n = 0 alone rather than shift every n."
    ),
    "norm_eps_under_root": (
        "an epsilon is added under the norm's square root, n = sqrt(sum V**2 + eps) (a common guard "
        "against n = 0). DoRA takes n = ||V|| itself; the difference is about eps / (2 n**2) relative, "
        "so it shows only when the norms are tiny. If you need a guard against n = 0, raise or handle "
        "n = 0 alone rather than shift every n."
    ),
    "fan_in_fan_out_norm_untransposed": (
        "the weight is stored (in, out) (fan_in_fan_out, GPT-2's Conv1D) and the norm is "
        "taken of that stored weight plus s*B@A without transposing it first, "
        "n = ||W0_stored + s*B@A||_row: it runs only when in = out and is wrong there "
        "(PEFT 0.10's Conv1D DoRA, fixed in peft PR #1588). Transpose to (out, in) before "
        "adding s*B@A and taking the row norms."
    ),
    "magnitude_per_input_column": (
        "your port normalises per INPUT column: n = ||W0 + s*B@A|| over the output axis, "
        "one value per input feature, magnitude of shape (1, in), W' = V * (m / n)[None, :] "
        "(the paper's ||.||_c read on an (out, in) weight; LyCORIS with wd_on_out=False). "
        "That is a different layer from DoRA as PEFT and the paper's code implement it (one "
        "magnitude per output channel). If it is the layer you mean, check it as such with "
        "magnitude='(1, in)'; otherwise take the norm over dim=1 with a magnitude (out,)."
    ),
    "dropout_scales_clean_base": (
        "with dropout your forward scales the clean base output by g and applies the "
        "correction to the dropped-out input only through the low-rank term: "
        "y = g*(x@W0.T) + g*s*(xd@A.T)@B.T + b (torchtune's DoRALinear, which also scales "
        "the bias). PEFT's formula also corrects the base output on xd: "
        "y = x@W0.T + b + (g - 1)*(xd@W0.T) + g*s*(xd@A.T)@B.T. Both equal the eval "
        "forward without dropout; they differ in training."
    ),
    "expects_batched_x": (
        "your port runs and is right on x of shape (batch, seq, in) but not on (N, in): "
        "it assumes a leading batch dimension (e.g. indexes x.shape[2], sums over dim=(0, 1)). "
        "Either accept any number of leading dimensions or check it with x_ndim=3."
    ),
    "magnitude_shape_out_1": (
        "your port runs and is right with a magnitude of shape (out, 1) (as the paper "
        "authors' code stores it, the weight of an nn.Linear(1, out)), not (out,): check "
        "it with magnitude='(out, 1)'."
    ),
    "weight_layout_transposed": (
        "your port runs and is right with W0 in the other layout: with fan_in_fan_out it "
        "wants W0 (out, in), without it W0 (in, out). Check it with the fan_in_fan_out= "
        "that matches how it stores the weight."
    ),
    "embedding_norm_axis": (
        "the embedding's norm is taken over the wrong axis: per token (over the embedding "
        "dimension, one value per row of E), as in mlx-lm's DoRAEmbedding, which is a different "
        "layer. PEFT's DoRA embedding keeps one magnitude per embedding DIMENSION, shape (D,), "
        "and its norm is over the vocabulary: n = ||E.T + s*B@A||_row with "
        "lora_embedding_B @ lora_embedding_A of shape (D, V), e.g. "
        "torch.linalg.norm(E + s * (B @ A).T, dim=0)."
    ),
    "embed_scale_not_on_lora": (
        "embed_scale multiplies only the base lookup, not the DoRA term: your "
        "y = g*(embed_scale*E[ids] + s*A.T[ids]@B.T). PEFT >= 0.18 scales the whole output, "
        "y = embed_scale * g * (E[ids] + s*A.T[ids]@B.T) (the base layer's output already "
        "carries embed_scale; the low-rank term must be scaled too)."
    ),
    "embedding_merge_without_magnitude": (
        "the embedding merge ignores the magnitude: your E' = E + s*(B@A).T, a LoRA merge (the "
        "delta weight alone; PEFT 0.14's embedding merge is reported to do this). DoRA's merged "
        "table scales each embedding dimension j by g_j = m_j / n_j: "
        "E' = (E + s*(B@A).T) * (m / n)[None, :], n = ||E.T + s*B@A||_row (over the vocabulary)."
    ),
    "peft_grouped_conv_norm": (
        "with groups > 1 your norm is PEFT 0.21's: it forms the delta as "
        "(lora_B.view(-1, r) @ lora_A.view(r, -1)).view(W0.shape), which for a grouped lora_B "
        "reshapes an (out/groups, in*k) product into the grouped kernel and mixes output channels "
        "(_DoraConvNdLayer.get_weight_norm). The layer's own norm is that of each output channel's "
        "dense adapted kernel, blockdiag(W0) + s * lora_B_dense @ lora_A (dora_ref.core.conv). To check the "
        "rest of a port that follows PEFT, use cases=dict(groups=1)."
    ),
    "peft_conv_dilation_dropped": (
        "with dilation > 1 your low-rank path ignores the dilation: lora_A is a convolution with "
        "the base's kernel size, stride and padding but dilation 1 (PEFT 0.21's _ConvNd.update_layer), "
        "so it sees another receptive field and gives another output size (PEFT raises, or broadcasts "
        "where one size is 1). lora_A must use the base's dilation, so that W0 + s*delta is one kernel; "
        "to check the rest of a port that follows PEFT, use cases=dict(dilation=1)."
    ),
    "chain_norm_of_merged_weight": (
        "with several adapters active, each DoRA adapter's norm is taken from the weight the "
        "adapters before it give (W0 merged with them in order). PEFT 0.21 takes every "
        "adapter's norm from the bare base, n_i = ||W0 + s_i*B_i@A_i||_row, and feeds the "
        "running output forward: y <- g_i * (y + s_i*(x@A_i.T)@B_i.T) per DoRA adapter, "
        "y <- y + s_i*(x@A_i.T)@B_i.T per LoRA one, then + b (its merge does the same, PEFT PR #3609)."
    ),
    "chain_not_fed_forward": (
        "with several DoRA adapters active, each adapter's correction is computed on the bare base "
        "output and the corrections are summed, y = x@W0.T + b + sum_i ((g_i - 1)*x@W0.T + "
        "g_i*s_i*(x@A_i.T)@B_i.T). PEFT 0.21 feeds the running output into each adapter, so a DoRA "
        "adapter rescales everything before it: y <- g_i * (y + s_i*(x@A_i.T)@B_i.T)."
    ),
    "unmerge_without_magnitude": (
        "the unmerge only subtracts s*B@A (or recomputes n from the merged weight, whose "
        "rows have norm m, which amounts to the same): it must divide by the factor "
        "m / n of the merge first, with n the norm kept from merge time: "
        "W0 = W' / (m / n)[:, None] - s*B@A."
    ),
    "magnitude_rounded_at_init": (
        "your init rounds the magnitude to the storage dtype (bfloat16 / float16) while your forward's "
        "norm is not rounded: m = lp(||W0 + s*B@A||_row) but n = the float32 norm of the same weights, "
        "so g = m / n differs from 1 by up to u (2**-8 in bfloat16, 2**-11 in float16) in almost every "
        "output channel, and a freshly initialised adapter moves the layer's outputs by about one ulp. "
        "This is PEFT 0.21 with autocast_adapter_dtype=True (its default): DoraLinearLayer.update_layer "
        "computes the norm of the lp weight and rounds it to lp, and only afterwards are the adapter's "
        "parameters upcast to float32. Compute the initial magnitude in float32 from the upcast weights "
        "and keep it float32 (dora_ref's consistent rule: m = n exactly, so g = 1). (PEFT with "
        "autocast_adapter_dtype=False rounds the forward's norm too, so g = 1 there, but its adapters are "
        "lp, which these cases, with float32 adapters, do not model.) See docs/low_precision.md."
    ),
    "ragged_last_tile": (
        "your port passes every small drawn case and misses on a wide one, and it misses only where the "
        "axis named above has a ragged size (not a whole number of tiles of 8 to 64): a loop tiled over "
        "that axis (a CUDA/Triton block, a SIMD width, a blocked sum) drops, double-counts or misreads "
        "its last, partial tile. For a sum over the axis (in or r in the forward; N in dA, dB and "
        "dmagnitude) every entry of the output misses; for an output axis (N or out of y) only the last "
        "entries do. The sizes where it starts to miss bound the tile's size. Check the tail loop, its "
        "bounds mask and its start index."
    ),
    "fails_past_drawn_sizes": (
        "your port passes every small drawn case (N <= 6, in and out <= 8, r <= 6) but misses on a "
        "larger case even where every axis is a whole number of tiles of 8: not a ragged tail, something "
        "that depends on size (a fixed buffer or tile table, an index computed with the wrong stride, a "
        "sum that loses precision as it grows, a hard-coded shape, or a separate path for whole tiles, "
        "taken when a size is a multiple of 8, that the aligned wide case reaches)."
    ),
}
