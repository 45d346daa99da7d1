"""Per-sample building blocks that the passes insert into backward graphs.

Each function is plain torch code: it appears as one named node in the rewritten
graph (readable in the inspection tools), then gets traced into aten ops and handed
to Inductor. A *layout* is the tuple ``(dim, outer, inner)`` of ``batch_dim.Batched``.
Norms are accumulated in float32 whatever the compute dtype.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch.func import vmap

from . import kernels


def _is_one(size) -> bool:
    """A layout entry known to be 1. Dynamic lengths arrive as SymInts: comparing one with 1
    could add a shape guard while the backward is traced, so they count as not 1 (the
    general code paths below hold for 1 as well)."""
    return isinstance(size, int) and size == 1


def batch_front(x: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """(..., outer*B*inner, ...) -> (B, ..., outer*inner, ...): one slice per sample, same rank."""
    dim, outer, inner = layout
    if _is_one(outer):  # stays a strided view: GEMMs read it in place (flattening a size-1 dim made Inductor copy it)
        x = x.unflatten(dim, (-1, inner))
        return x if dim == 0 else x.movedim(dim, 0)
    x = x.unflatten(dim, (outer, -1, inner)).movedim(dim + 1, 0)
    return x.flatten(dim + 1, dim + 2)


def per_sample_rows(weights: torch.Tensor, x: torch.Tensor, layout: tuple[int, int, int]) -> torch.Tensor:
    """x with every element of sample b multiplied by weights[b] (the BK re-weighting)."""
    dim, outer, inner = layout
    w = weights.to(x.dtype)
    if not (_is_one(outer) and _is_one(inner)):
        w = w.view(1, -1, 1).expand(outer, -1, inner).reshape(-1)
    return x * w.view([-1 if d == dim else 1 for d in range(x.dim())])


def sq_norm(x: torch.Tensor) -> torch.Tensor:
    """Squared L2 norm of each x[b]."""
    return x.float().pow(2).flatten(1).sum(1)


def gram(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """bmm(x, y) in float32. Half-precision CUDA inputs stay on the tensor cores with float32
    accumulation and output: products of bf16/fp16 numbers are exact in float32, so this is
    as exact as upcasting first, without float32 copies and at the half-precision GEMM rate."""
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and y.dtype == x.dtype:
        return torch.bmm(x, y, out_dtype=torch.float32)
    return torch.bmm(x.float(), y.float())


def ghost_sq_norm_linear(a: torch.Tensor, b: torch.Tensor, la: tuple, lb: tuple) -> torch.Tensor:
    """‖a_b @ b_b‖² for mm(a, b) contracting over sample rows, via T×T Gram matrices.

    a: (n, N) with samples along dim 1, b: (N, m) with samples along dim 0.
    ‖Σ_t u_t v_tᵀ‖² = Σ_{t,s} (u_t·u_s)(v_t·v_s), no (n, m) tensor per sample.
    """
    A = batch_front(a, la)  # (B, n, T)
    V = batch_front(b, lb)  # (B, T, m)
    return (gram(A.mT, A) * gram(V, V.mT)).sum((1, 2))


def ghost_sq_norm_embedding(grad: torch.Tensor, indices: torch.Tensor, lg: tuple, li: tuple,
                            padding_idx: int) -> torch.Tensor:
    """‖embedding gradient of sample b‖² = Σ_{t,s} [x_t = x_s ≠ pad] ⟨g_t, g_s⟩, no vocab-sized tensor."""
    G = batch_front(grad, lg)
    B = G.shape[0]
    G = G.reshape(B, -1, G.shape[-1])  # (B, T, d)
    idx = batch_front(indices, li).reshape(B, -1)  # (B, T)
    same = idx.unsqueeze(2) == idx.unsqueeze(1)
    if padding_idx >= 0:
        same = same & (idx != padding_idx).unsqueeze(2)
    return (gram(G, G.mT) * same).sum((1, 2))


# Per-sample gradients of each kind of summation site: (B, *site output shape). Written
# with batched ops rather than vmap, whose fallbacks specialize on the batch size.

def phantom_sq_norm(grad, indices, lg: tuple, li: tuple, padding_idx: int, a, b, la: tuple, lb: tuple,
                    transposed: bool) -> torch.Tensor:
    """‖G_in + G_out‖² of a tied embedding (see passes/phantom.py), no (V, d) tensor per sample."""
    G = batch_front(grad, lg)
    n_samples, d = G.shape[0], G.shape[-1]
    G = G.reshape(n_samples, -1, d)  # (B, S, d): input-side gradient rows
    idx = batch_front(indices, li).reshape(n_samples, -1)  # (B, S)
    A, V = batch_front(a, la), batch_front(b, lb)  # (B, n, T), (B, T, m)
    U, W = (V.mT, A.mT) if transposed else (A, V)  # U (B, vocab, T), W (B, T, d)
    Ux = torch.gather(U, 1, idx.unsqueeze(2).expand(-1, -1, U.shape[2])).float()  # u_t[x_s]: (B, S, T)
    if padding_idx >= 0:
        Ux = Ux * (idx != padding_idx).unsqueeze(2)
    cross = (Ux * gram(G, W.mT)).sum((1, 2))
    inner = ghost_sq_norm_embedding(grad, indices, lg, li, padding_idx)
    outer = (gram(U.mT, U) * gram(W, W.mT)).sum((1, 2))
    return inner + outer + 2 * cross


def _trilinear_rows(x: torch.Tensor, dims: list, p: int, layout: tuple) -> torch.Tensor:
    """An input of _trilinear holding the rows (common position p): (B, rows, rest flattened)."""
    d = dims.index(p)
    xb = batch_front(x, (d, *layout[1:]))
    return xb.movedim(d + 1, 1).flatten(2) if xb.dim() > 2 else xb.unsqueeze(2)


def ghost_sq_norm_trilinear(i1, i2, i3, positions: list, p: int, layout: tuple) -> torch.Tensor:
    """‖Σ_t u_t ⊗ v_t ⊗ w_t‖² = Σ_{t,s} ⟨u_t, u_s⟩⟨v_t, v_s⟩⟨w_t, w_s⟩ over each sample's rows t, s
    (nn.Bilinear's weight gradient, each output dim from one input): T×T Grams, no (O, I, J) per sample."""
    grams = [gram(r, r.mT) for r in (_trilinear_rows(x, dims, p, layout) for x, dims in zip((i1, i2, i3), positions))]
    return (grams[0] * grams[1] * grams[2]).sum((1, 2))


def instantiate_trilinear(i1, i2, i3, positions: list, sumdim: list, rank: int, p: int, layout: tuple) -> torch.Tensor:
    """_trilinear summed over the rows at p, split per sample: (B, *output) by one einsum.
    positions[k]: the common-space position of each dim of input k (rank dims in all)."""
    letters = "abcdefghijklmnopqrstuvwxy"
    operands, specs = [], []
    for x, dims in zip((i1, i2, i3), positions):
        spec = "".join(letters[d] for d in dims)
        if p in dims:
            x, spec = batch_front(x, (dims.index(p), *layout[1:])), "z" + spec
        operands.append(x)
        specs.append(spec)
    out = "z" + "".join(letters[d] for d in range(rank) if d not in sumdim)
    return torch.einsum(",".join(specs) + "->" + out, *operands)


def instantiate_linear(a: torch.Tensor, b: torch.Tensor, la: tuple, lb: tuple) -> torch.Tensor:
    """mm(a, b) split per sample: a (n, N) samples on dim 1, b (N, m) samples on dim 0."""
    return torch.bmm(batch_front(a, la), batch_front(b, lb))


def instantiate_sum(x: torch.Tensor, lx: tuple, dims: list, out_shape: list) -> torch.Tensor:
    """sum(x, dims) split per sample (biases, elementwise scales)."""
    xb = batch_front(x, lx)
    dims = [d % x.dim() for d in dims] if dims else list(range(x.dim()))
    return xb.sum([d + 1 for d in dims]).reshape([xb.shape[0], *out_shape])


def sample_of(x: torch.Tensor, layout: tuple) -> torch.Tensor:
    """The sample each position along x's batch dim belongs to, shaped to broadcast against x."""
    dim, outer, inner = layout
    n = x.shape[dim]
    ids = torch.div(torch.arange(n, device=x.device), inner, rounding_mode="floor") % (n // (outer * inner))
    return ids.view([-1 if d == dim else 1 for d in range(x.dim())])


def frequency_scaled(grad: torch.Tensor, indices: torch.Tensor, li: tuple, num_weights: int) -> torch.Tensor:
    """Embedding gradient rows divided by their token's count in their own sample
    (scale_grad_by_freq per sample); counts by one index_add over B·V slots."""
    keys = sample_of(indices, li) * num_weights + indices
    n_samples = indices.shape[li[0]] // (li[1] * li[2])
    counts = grad.new_zeros(n_samples * num_weights).index_add(0, keys.reshape(-1), grad.new_ones(keys.numel()))
    return grad / counts[keys].unsqueeze(-1)


def zero_rows(x: torch.Tensor, rows: list) -> torch.Tensor:
    """x with rows `rows` (dim 0) set to zero: the padding rows every sample's gradient leaves zero."""
    ids = torch.arange(x.shape[0], device=x.device)
    drop = torch.zeros_like(ids, dtype=torch.bool)
    for row in rows:
        drop = drop | (ids == row)
    return x.masked_fill(drop.view([-1] + [1] * (x.dim() - 1)), 0)


def instantiate_embedding(grad: torch.Tensor, indices: torch.Tensor, lg: tuple, li: tuple | None,
                          num_weights: int, padding_idx: int) -> torch.Tensor:
    """embedding_dense_backward split per sample: (B, V, d) by one index_add over B·V rows."""
    G = batch_front(grad, lg)
    B, d = G.shape[0], G.shape[-1]
    G = G.reshape(B, -1, d)
    idx = batch_front(indices, li).reshape(B, -1) if li is not None else indices.reshape(1, -1).expand(B, -1)
    if padding_idx >= 0:
        G = G * (idx != padding_idx).unsqueeze(-1).to(G.dtype)
    rows = (torch.arange(B, device=idx.device).unsqueeze(1) * num_weights + idx).reshape(-1)
    out = G.new_zeros(B * num_weights, d).index_add(0, rows, G.reshape(-1, d))
    return out.view(B, num_weights, d)


# nn.EmbeddingBag. Bag b's output is Σ_t c_t · table[x_t] over its entries t (sum: c_t = the
# per-sample weight or 1; mean: 1 / its non-padding count; padding entries: 0), or, mode max,
# table[m_bj, j] per feature j. Norms and sums are computed here from these definitions,
# never by the kernel's backward, so both always see the same per-bag gradients.
BAG_SUM, BAG_MEAN, BAG_MAX = 0, 1, 2
BAG_OFFSETS_MESSAGE = ("dpcompile: EmbeddingBag offsets must start at 0 and never decrease (one bag per sample, "
                       "in order); no gradient released.")


def bag_of_index(indices: torch.Tensor, offsets: torch.Tensor | None, n_bags) -> torch.Tensor:
    """The bag of each entry. Offsets form: bag b starts at offsets[b] (checked at run time to
    start at 0 and never decrease); 2-D form (offsets None): n_bags rows of equal length."""
    n = indices.shape[0]
    if offsets is None:
        return torch.div(torch.arange(n, device=indices.device), n // n_bags, rounding_mode="floor")
    offsets = offsets.long()
    torch._assert_async(((offsets[:1] == 0).all() & (offsets[1:] >= offsets[:-1]).all()), BAG_OFFSETS_MESSAGE)
    starts = torch.zeros(n + 1, dtype=torch.long, device=indices.device).index_add(0, offsets, torch.ones_like(offsets))
    return starts.cumsum(0)[:n] - 1


def bag_terms(indices, offsets, weights, mode: int, padding_idx: int, n_bags) -> tuple[torch.Tensor, torch.Tensor]:
    """(bag of each entry, its coefficient c_t; mode max: 1 for non-padding entries)."""
    bag = bag_of_index(indices, offsets, n_bags)
    c = torch.ones(indices.shape, device=indices.device) if padding_idx < 0 else (indices != padding_idx).float()
    if mode == BAG_MEAN:
        c = c / bag_sums(c, bag, offsets, n_bags).clamp(min=1)[bag]
    elif weights is not None:
        c = c * weights.float()
    return bag, c


def bag_sums(c: torch.Tensor, bag: torch.Tensor, offsets, n_bags) -> torch.Tensor:
    """Σ of c over each bag: rows of equal length in the 2-D form, else an index_add."""
    return c.view(n_bags, -1).sum(1) if offsets is None else _add_per_bag(c, bag, n_bags)


def _add_per_bag(values: torch.Tensor, bag: torch.Tensor, n_bags) -> torch.Tensor:
    """index_add of values into n_bags slots, through one spare slot: Inductor's vectorized CPU
    scatter fails on a 1-element target (one bag: the index folds to a constant; torch 2.13)."""
    return values.new_zeros(n_bags + 1).index_add(0, bag, values)[:n_bags]


def ghost_sq_norm_bag(grad, indices, offsets, weights, max_indices, mode: int, padding_idx: int,
                      num_weights: int) -> torch.Tensor:
    """‖gradient of bag b‖², one bag per sample, no (B, V, d) tensor. Sum/mean: the gradient is
    u_b g_bᵀ with u_b = Σ_t c_t e_{x_t}, so ‖u_b‖²‖g_b‖², where ‖u_b‖² sums (Σ c_t)² over the
    bag's distinct tokens (one sort of the (bag, token) keys). Max: feature j sends g_bj to
    one row, so ‖g_b‖² when the bag has a non-padding entry."""
    n_bags = grad.shape[0]
    bag, c = bag_terms(indices, offsets, weights, mode, padding_idx, n_bags)
    g_sq = grad.float().pow(2).sum(1)
    if mode == BAG_MAX:
        return g_sq * (bag_sums(c, bag, offsets, n_bags) > 0)
    keys, order = (bag * num_weights + indices.long()).sort()
    run = torch.cat([keys[:1] == keys[:1], keys[1:] != keys[:-1]]).cumsum(0) - 1  # run of equal keys
    sums = c.new_zeros(keys.shape[0]).index_add(0, run, c[order])
    run_bag = torch.zeros_like(keys).scatter(0, run, torch.div(keys, num_weights, rounding_mode="floor"))
    return _add_per_bag(sums.pow(2), run_bag, n_bags) * g_sq


def _bag_scatter(g, block, n_blocks, indices, offsets, weights, max_indices, mode: int, padding_idx: int,
                 num_weights: int) -> torch.Tensor:
    """Σ over bags of each bag's gradient (bag rows g, float32) into (n_blocks·V, d): bag b's
    rows go to block block[b] (its sample; 0 for the batch sum)."""
    n_bags, d = g.shape
    bag, c = bag_terms(indices, offsets, weights, mode, padding_idx, n_bags)
    base = block * num_weights
    if mode == BAG_MAX:
        live = (bag_sums(c, bag, offsets, n_bags) > 0).unsqueeze(1)
        rows = (base.unsqueeze(1) + max_indices.long().clamp(min=0)) * d + torch.arange(d, device=g.device)
        return g.new_zeros(n_blocks * num_weights * d).index_add(0, rows.flatten(), (g * live).flatten()).view(-1, d)
    return g.new_zeros(n_blocks * num_weights, d).index_add(0, base[bag] + indices.long(), c.unsqueeze(1) * g[bag])


def bag_weighted_sum(weights, grad, lg: tuple, indices, offsets, per_sample_weights, max_indices, mode: int,
                     padding_idx: int, num_weights: int) -> torch.Tensor:
    """Σ_b w_b · (gradient of bag b): the table's clipped (V, d) gradient, by one index_add."""
    g = per_sample_rows(weights, grad, lg).float()
    block = torch.zeros(grad.shape[0], dtype=torch.long, device=grad.device)
    return _bag_scatter(g, block, 1, indices, offsets, per_sample_weights, max_indices, mode, padding_idx,
                        num_weights).to(grad.dtype)


def instantiate_bag(grad, lg: tuple, indices, offsets, per_sample_weights, max_indices, mode: int,
                    padding_idx: int, num_weights: int) -> torch.Tensor:
    """Per-sample table gradients (B, V, d); a sample may own several bags (lg)."""
    block = sample_of(grad, lg).reshape(-1)
    n_samples = grad.shape[0] // (lg[1] * lg[2])
    out = _bag_scatter(grad.float(), block, n_samples, indices, offsets, per_sample_weights, max_indices, mode,
                       padding_idx, num_weights)
    return out.view(n_samples, num_weights, -1).to(grad.dtype)


def instantiate_layer_norm(grad, x, mean, rstd, lg: tuple, n_normalized: int, which: int) -> torch.Tensor:
    """LayerNorm weight (which=1: Σ g·x̂) or bias (which=2: Σ g) gradients per sample."""
    term = grad * ((x - mean) * rstd) if which == 1 else grad
    tb = batch_front(term.float(), lg)
    return tb.sum(list(range(1, tb.dim() - n_normalized)))


def instantiate_group_norm(grad, x, mean, rstd, lg: tuple, groups: int, which: int) -> torch.Tensor:
    """GroupNorm weight/bias gradients per sample: (B, C)."""
    if which == 1:
        n = x.shape[0]
        xhat = (x.reshape(n, groups, -1) - mean.reshape(n, groups, 1)) * rstd.reshape(n, groups, 1)
        grad = grad * xhat.reshape(x.shape)
    tb = batch_front(grad.float(), lg)  # (B, rows, C, *spatial)
    return tb.sum([1] + list(range(3, tb.dim())))


def instantiate_conv(grad, x, weight, lg: tuple, stride, padding, dilation, transposed: bool, output_padding,
                     groups: int, which: int) -> torch.Tensor:
    """Per-sample weight (which=1) or bias (which=2) gradients of any convolution: 1/2/3-D,
    transposed or not, every stride, padding, dilation, output padding and group count.

    A convolution's weight gradient correlates the windows of one operand with the other:
    of the input x with the output gradient, or, transposed, of the output gradient with
    the input (a transposed convolution is the input gradient of the plain one, whose
    output size absorbs output_padding). Windows are strided views (``Tensor.unfold``),
    so a symbolic batch size stays symbolic (a grouped convolution with B·g groups
    would make Inductor's lowering specialize it)."""
    if which == 2:
        tb = batch_front(grad.float(), lg)
        return tb.sum([1] + list(range(3, tb.dim())))
    kernel = weight.shape[2:]
    a, b = (grad, x) if transposed else (x, grad)
    cols = _windows(a, kernel, *(_per_dim(v, len(kernel)) for v in (stride, padding, dilation)), b.shape[2:])
    cols, b = batch_front(cols, lg), batch_front(b, lg)  # (B, rows, Ca, *L, *k), (B, rows, Cb, *L)
    n, rows = b.shape[:2]
    cols = cols.reshape(n, rows, groups, a.shape[1] // groups, b[0, 0, 0].numel(), kernel.numel())
    b = b.reshape(n, rows, groups, b.shape[2] // groups, -1)
    return torch.einsum("brgol,brgilk->bgoik", b, cols).reshape(n, *weight.shape)


def _per_dim(value, n: int) -> list:
    """A conv argument for each of n spatial dims (aten repeats a single entry: padding="valid" is [0])."""
    value = list(value)
    return value * n if len(value) == 1 else value


def _windows(a: torch.Tensor, kernel, stride, padding, dilation, out_size) -> torch.Tensor:
    """(N, C, *S) -> (N, C, *out_size, *kernel): the (dilated) window under each output position."""
    a = torch.nn.functional.pad(a, [p for pad in reversed(padding) for p in (pad, pad)])
    for i, k in enumerate(kernel):
        a = a.unfold(2 + i, dilation[i] * (k - 1) + 1, stride[i])[..., ::dilation[i]]
        a = a.narrow(2 + i, 0, out_size[i])
    return a


def embedding_grad_onehot(grad: torch.Tensor, indices: torch.Tensor, num_weights: int, padding_idx: int,
                          scale_grad_by_freq: bool = False) -> torch.Tensor:
    """embedding_dense_backward as a one-hot matmul, which vmap batches without specializing."""
    idx = indices.reshape(-1)
    onehot = (idx.unsqueeze(1) == torch.arange(num_weights, device=idx.device)).to(grad.dtype)
    if padding_idx >= 0:
        onehot = onehot * (idx != padding_idx).unsqueeze(1).to(grad.dtype)
    return onehot.t() @ grad.reshape(idx.shape[0], -1)


def lsg_reduced(a: torch.Tensor, b: torch.Tensor, la: tuple, lb: tuple, left: torch.Tensor,
                right: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Per-sample LSG coordinates (B, k) of the site gradient G_b = a_b @ b_b (n×m).

    The reduced gradient is the pair (G_b Rᵀ (n×r), Lᵀ G_b (r×m)), flattened and read at
    the kept coordinates ``index``; G_b itself is never formed: O(B·T·r·(n+m)) FLOPs.
    """
    A = batch_front(a, la).float()  # (B, n, T)
    V = batch_front(b, lb).float()  # (B, T, m)
    d_left = A @ (V @ right.mT)  # G_b Rᵀ: (B, n, r)
    d_right = (left.mT @ A) @ V  # Lᵀ G_b: (B, r, m)
    flat = torch.cat([d_left.flatten(1), d_right.flatten(1)], 1)
    return flat.index_select(1, index)


def lsg_reconstruct(coords: torch.Tensor, index: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                    dtype: torch.dtype) -> torch.Tensor:
    """The n×m gradient a reduced vector stands for: ∂L R + L ∂R − L (Lᵀ ∂L) R.

    With orthonormal L (columns) and R (rows) this is the orthogonal projection of G onto
    {U R + L W} when (∂L, ∂R) = (G Rᵀ, Lᵀ G); the last term removes the core Lᵀ G Rᵀ that
    both factors carry. Dropped coordinates count as zero.
    """
    n, r, m = left.shape[0], left.shape[1], right.shape[1]
    full = coords.new_zeros(r * (n + m)).index_copy(0, index, coords.float())
    d_left, d_right = full[: n * r].view(n, r), full[n * r:].view(r, m)
    grad = d_left @ right + left @ d_right - left @ (left.mT @ d_left) @ right
    return grad.to(dtype)


def token_count_message(where: str) -> str:
    """Device-side assert messages must stay under 255 characters (CUDA)."""
    tail = (": token-mean loss over the whole batch, but samples have unequal non-ignored token counts; "
            "no gradient released. Average each sequence's loss first, then over sequences.")
    return "dpcompile: " + where[: 250 - len("dpcompile: ") - len(tail)] + tail


def checked_token_count(total_weight: torch.Tensor, target: torch.Tensor, ignore_index: int,
                        layout: tuple | None, where: str) -> torch.Tensor:
    """A token-mean loss's count B·c, after asserting every sample has c non-ignored tokens."""
    if layout is not None:
        counts = batch_front(target != ignore_index, layout).flatten(1).sum(1)
        where = "".join(c for c in where if c not in '"\\`\n')  # the message is pasted into C++/Triton source
        torch._assert_async(counts.eq(counts[:1]).all(), token_count_message(where))
    return total_weight


def total_sq_norm(*sq_norms: torch.Tensor) -> torch.Tensor:
    """Σ over layers of the per-sample squared norms: the whole-model per-sample norm²."""
    return torch.stack(sq_norms).sum(0)


def instantiate_post(post: fx.GraphModule, n_sites: int, *args):
    """Apply the sample-free ops after the sites to each sample's site values.

    `post` holds only linear aten ops (param_grads checked it), with embedding backward
    already swapped for `embedding_grad_onehot`, so vmap batches it symbolically.
    """
    in_dims = (0,) * n_sites + (None,) * (len(args) - n_sites)
    return vmap(post, in_dims=in_dims)(*args)


def pack(*per_sample_values: torch.Tensor) -> torch.Tensor:
    """(B, N) float32: each sample's values of several small gradients side by side (Inductor
    writes each producer straight into its columns)."""
    return torch.cat([v.float().flatten(1) for v in per_sample_values], 1)


def unpack(flat: torch.Tensor, start: int, shape: list, dtype: torch.dtype) -> torch.Tensor:
    """One gradient's entries of a packed flat vector, in its site's shape and dtype."""
    return flat.narrow(0, start, torch.Size(shape).numel()).view(shape).to(dtype)


def weighted_sum(weights: torch.Tensor, per_sample: torch.Tensor, dtype: torch.dtype | None = None,
                 noise: torch.Tensor | None = None, offset: int = 0, std: torch.Tensor | None = None) -> torch.Tensor:
    """Σ_b w_b x_b in float32, returned as `dtype` (default x's); memory-rich path: no second GEMM.

    With `noise`: Σ_b w_b x_b + std · noise[offset : offset + numel], the privatized gradient in
    one pass (`privatize` of the sum, with a single rounding to `dtype`). On CUDA, while the
    backward is re-traced, one hand-written Triton kernel (`dpcompile.privacy.kernels`); elsewhere a
    reduction that Inductor fuses with the noise addition."""
    dtype = dtype or per_sample.dtype
    z = None if noise is None else noise.narrow(0, offset, per_sample.shape[1:].numel())
    if kernels.enabled(per_sample):
        return kernels.weighted_sum(weights, per_sample, dtype, z, std)
    w = weights.view([-1] + [1] * (per_sample.dim() - 1))
    summed = (w * per_sample.float()).sum(0)
    if z is not None:
        summed = summed + std * z.view(summed.shape)
    return summed.to(dtype)


def clip_weights(total_sq: torch.Tensor, max_grad_norm: float, scale_mode: str, clipping: str,
                 gamma: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights w_b = C_b * s for the graph's per-sample gradient pieces g_b.

    The loss seen by backward is mean_b(l_b) ("mean") or sum_b(l_b) ("sum"), so a
    sample's own gradient is s*g_b with s = B or 1. C_b is min(1, R/‖s g_b‖) ("flat")
    or R/(‖s g_b‖ + γ) ("automatic"). Returns (w, per-sample norms ‖s g_b‖).

    Group-wise clipping: total_sq is (K, B), each group's squared norms, and R that of one
    group; then w is (K, B), one weight per group and sample, and the norms are still those
    of each sample's whole gradient, (B,).
    """
    scale = total_sq.shape[-1] if scale_mode == "mean" else 1
    norms = total_sq.sqrt() * scale
    if clipping == "automatic":
        factors = max_grad_norm / (norms + gamma)
    else:
        factors = (max_grad_norm / (norms + 1e-6)).clamp(max=1.0)
    if total_sq.dim() > 1:
        norms = total_sq.sum(0).sqrt() * scale
    return factors * scale, norms


def stack_groups(group_count: int, groups: list[int], *sq_norms: torch.Tensor) -> torch.Tensor:
    """(K, B) squared norms per clip group: row groups[i] is sq_norms[i], rows of the groups
    this graph has no parameter of are zero (their share of the sample's norm is elsewhere)."""
    stacked = torch.stack(sq_norms)
    if list(groups) == list(range(group_count)):
        return stacked
    index = torch.tensor(groups, device=stacked.device)
    return stacked.new_zeros(group_count, stacked.shape[1]).index_copy(0, index, stacked)


def group_row(weights: torch.Tensor, group: int) -> torch.Tensor:
    """The clip weights (B,) of one group from the (K, B) table."""
    return weights[group]


def noise_scales(weights: torch.Tensor, scalars: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(w_b / d, std / d), once per step: the clip weights and the noise std divided by the
    batch divisor d, so each gradient's privatization is one multiply-add.

    scalars = [noise std, expected batch size or 0 for "the actual batch size"]; weights are (B,)
    or, group-wise, (K, B)."""
    std, expected = scalars[0], scalars[1]
    divisor = torch.where(expected > 0, expected, torch.full_like(expected, weights.shape[-1]))
    return weights / divisor, std / divisor


def privatize(clipped: torch.Tensor, noise: torch.Tensor, offset: int, std: torch.Tensor) -> torch.Tensor:
    """clipped + std * z in float32, z = noise[offset : offset + numel]; `clipped` is already
    divided by the batch divisor (its clip weights were, `noise_scales`), `std` too."""
    z = noise.narrow(0, offset, clipped.numel()).view(clipped.shape)
    return (clipped.float() + std * z).to(clipped.dtype)
