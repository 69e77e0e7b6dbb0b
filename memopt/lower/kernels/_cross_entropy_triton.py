"""The Triton kernels of ``linear_cross_entropy`` (imported only where Triton is installed).

Tensors are contiguous: ``x`` (M tokens, K features), ``weight`` (V classes, K), ``bias`` (V) when ``HAS_BIAS``;
``target`` (M) holds a class per token (an ignored token's is any valid class: its ``scale`` is 0).
"""

import triton
import triton.language as tl


@triton.jit
def _logits(x_ptr, w_ptr, b_ptr, rows, cols, M, V, K, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
            BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The (BLOCK_M, BLOCK_V) tile of logits of tokens ``rows`` and classes ``cols``, in fp32."""
    acc = tl.zeros((BLOCK_M, BLOCK_V), dtype=tl.float32)
    for start in range(0, K, BLOCK_K):
        ks = start + tl.arange(0, BLOCK_K)
        xs = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0)
        ws = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < K), other=0.0)
        acc += tl.dot(xs, tl.trans(ws))
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < V, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _dlogits(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, rows, cols, M, V, K, HAS_BIAS: tl.constexpr,
             BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The loss's gradient with respect to a tile of logits: (softmax - one-hot target) x each token's scale."""
    logits = _logits(x_ptr, w_ptr, b_ptr, rows, cols, M, V, K, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K)
    lse = tl.load(lse_ptr + rows, mask=rows < M, other=0.0)
    target = tl.load(t_ptr + rows, mask=rows < M, other=-1)
    scale = tl.load(scale_ptr + rows, mask=rows < M, other=0.0)
    p = tl.where(cols[None, :] < V, tl.exp(logits - lse[:, None]), 0.0)
    p = p - tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    return p * scale[:, None]


@triton.jit
def forward(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, picked_ptr, M, V, K, HAS_BIAS: tl.constexpr,
            BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """Per token of this program's tile: the log-sum-exp of its logits and its target's logit."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    target = tl.load(t_ptr + rows, mask=rows < M, other=-1)
    high = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    total = tl.zeros((BLOCK_M,), dtype=tl.float32)
    picked = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        logits = _logits(x_ptr, w_ptr, b_ptr, rows, cols, M, V, K, HAS_BIAS, BLOCK_M, BLOCK_V, BLOCK_K)
        logits = tl.where(cols[None, :] < V, logits, float("-inf"))
        new_high = tl.maximum(high, tl.max(logits, 1))
        total = total * tl.exp(high - new_high) + tl.sum(tl.exp(logits - new_high[:, None]), 1)
        high = new_high
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), 1)
    tl.store(lse_ptr + rows, high + tl.log(total), mask=rows < M)
    tl.store(picked_ptr + rows, picked, mask=rows < M)


@triton.jit
def grad_input(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, gx_ptr, M, V, K, HAS_BIAS: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gradient of this program's tile of tokens (``gx``, fp32, zeroed), summed over the classes' tiles."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        dlogits = _dlogits(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, rows, cols, M, V, K, HAS_BIAS, BLOCK_M,
                           BLOCK_V, BLOCK_K)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            ws = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=(cols[:, None] < V) & (ks[None, :] < K),
                         other=0.0).to(tl.float32)
            where = gx_ptr + rows[:, None] * K + ks[None, :]
            inside = (rows[:, None] < M) & (ks[None, :] < K)
            tl.store(where, tl.load(where, mask=inside, other=0.0) + tl.dot(dlogits, ws), mask=inside)


@triton.jit
def grad_weight(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, gw_ptr, gb_ptr, M, V, K, HAS_BIAS: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
    """The gradients of this program's tile of classes (``gw`` and ``gb``, fp32, zeroed), summed over the tokens'
    tiles."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    for start in range(0, M, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        dlogits = _dlogits(x_ptr, w_ptr, b_ptr, t_ptr, lse_ptr, scale_ptr, rows, cols, M, V, K, HAS_BIAS, BLOCK_M,
                           BLOCK_V, BLOCK_K)
        for k_start in range(0, K, BLOCK_K):
            ks = k_start + tl.arange(0, BLOCK_K)
            xs = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K),
                         other=0.0).to(tl.float32)
            where = gw_ptr + cols[:, None] * K + ks[None, :]
            inside = (cols[:, None] < V) & (ks[None, :] < K)
            tl.store(where, tl.load(where, mask=inside, other=0.0) + tl.dot(tl.trans(dlogits), xs), mask=inside)
        if HAS_BIAS:
            tl.store(gb_ptr + cols, tl.load(gb_ptr + cols, mask=cols < V, other=0.0) + tl.sum(dlogits, 0),
                     mask=cols < V)
