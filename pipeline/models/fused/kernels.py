"""Triton kernels of fused KoPE attention: FlashAttention-2 forward and backward whose tiles are rotated by the
tokens' phasors as they are loaded and stored, so the rotations of q, k, v and the output cost no pass of their own.

Layouts (see ``pipeline.models.phase``): a head's channels are interleaved pairs, pair ``c`` is
``x[2c] + i·x[2c+1]``; a phasor row is ``[cos (R) | sin (R)]`` with ``R = D/2``. A tile ``(rows, D)`` is read as
``(rows, R, 2)`` and split into its real and imaginary halves, rotated element-wise in fp32 against ``(rows, R)``
cos/sin tiles, and joined back: no gather. A phasor need not be unit (the mix renormalisation clamps), so every
rotation is a plain complex multiply, and the output is multiplied by the conjugate, exactly as the plain path.

Every program owns one tile of rows of one (batch, head); strides come from the caller, so q, k, v may be views of
a fused qkv projection and a phasor shared by all samples or heads arrives with stride 0 there. Scores are scaled
by ``scale·log2(e)`` so the softmax runs on ``exp2``; the saved log-sum-exp is in those base-2 units. Matrix
products take their operands in the input dtype and accumulate in fp32.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _load_rows(ptr, rows, n, stride_n, stride_d, WIDTH: tl.constexpr):
    """Rows ``rows`` of an ``(n, WIDTH)`` slice as fp32; rows past ``n`` read as zeros (the ragged last tile)."""
    cols = tl.arange(0, WIDTH)
    mask = rows[:, None] < n
    return tl.load(ptr + rows[:, None] * stride_n + cols[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _store_rows(ptr, value, rows, n, stride_n, WIDTH: tl.constexpr):
    """Store an fp32 tile into rows ``rows < n`` of a slice with unit column stride, in the slice's dtype."""
    cols = tl.arange(0, WIDTH)
    mask = rows[:, None] < n
    tl.store(ptr + rows[:, None] * stride_n + cols[None, :], value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_phasor(ptr, rows, n, stride_n, stride_r, R: tl.constexpr):
    """The ``(cos, sin)`` halves of phasor rows, each ``(rows, R)`` fp32 (zeros past ``n``)."""
    cos = _load_rows(ptr, rows, n, stride_n, stride_r, R)
    sin = _load_rows(ptr + R * stride_r, rows, n, stride_n, stride_r, R)
    return cos, sin


@triton.jit
def _rotate(x, cos, sin, ROWS: tl.constexpr, R: tl.constexpr):
    """``x·(cos + i·sin)`` per interleaved pair of an fp32 ``(ROWS, 2R)`` tile (``-sin``: the conjugate)."""
    re, im = tl.split(tl.reshape(x, (ROWS, R, 2)))
    return tl.reshape(tl.join(re * cos - im * sin, re * sin + im * cos), (ROWS, 2 * R))


@triton.jit
def _pair_grad(grad, x, ROWS: tl.constexpr, R: tl.constexpr):
    """``grad·conj(x)`` per pair, as (real, imaginary) ``(ROWS, R)`` tiles.

    For ``y = x·p`` this is the gradient w.r.t. the phasor ``p = (cos, sin)`` given ``grad`` = dL/dy; for an
    output ``out = o·conj(p)`` the same product with ``(o, dL/dout)`` in place of ``(grad, x)`` is its gradient.
    """
    g_re, g_im = tl.split(tl.reshape(grad, (ROWS, R, 2)))
    x_re, x_im = tl.split(tl.reshape(x, (ROWS, R, 2)))
    return g_re * x_re + g_im * x_im, g_im * x_re - g_re * x_im


@triton.jit
def _dot(a, b, WIDEN: tl.constexpr):
    """``a @ b`` accumulated in fp32 (``ieee``: no TF32 for fp32 inputs). ``WIDEN`` is for Triton's interpreter,
    whose ``tl.dot`` multiplies the bit patterns of bf16 operands: they are widened to fp32 first, which gives
    the same products (a product of two bf16 or fp16 values is exact in fp32)."""
    if WIDEN:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    return tl.dot(a, b, input_precision="ieee")


@triton.jit
def attention_forward_kernel(
    Q, K, V, Z, OUT, LSE,
    q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
    z_sb, z_sh, z_sn, z_sd, o_sb, o_sh, o_sn,
    H, N, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ROTATE_VO: tl.constexpr,
    WIDEN_DOTS: tl.constexpr,
):
    """One query tile of one (batch, head): online softmax over the key tiles.

    q is rotated once as it is loaded, each k (and v) tile as it is loaded, and the normalised output tile is
    multiplied by the conjugate phasor as it is stored. ``LSE`` keeps each row's base-2 log-sum-exp, from which
    the backward recomputes the probabilities.
    """
    R: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * q_sb + h * q_sh
    K += b * k_sb + h * k_sh
    V += b * v_sb + h * v_sh
    Z += b * z_sb + h * z_sh
    OUT += b * o_sb + h * o_sh
    dtype = Q.dtype.element_ty

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cos, sin = _load_phasor(Z, rows, N, z_sn, z_sd, R)
    q = _rotate(_load_rows(Q, rows, N, q_sn, q_sd, HEAD_DIM), cos, sin, BLOCK_M, R).to(dtype)

    row_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    row_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_cos, k_sin = _load_phasor(Z, cols, N, z_sn, z_sd, R)
        k = _rotate(_load_rows(K, cols, N, k_sn, k_sd, HEAD_DIM), k_cos, k_sin, BLOCK_N, R).to(dtype)
        v = _load_rows(V, cols, N, v_sn, v_sd, HEAD_DIM)
        if ROTATE_VO:
            v = _rotate(v, k_cos, k_sin, BLOCK_N, R)
        s = _dot(q, tl.trans(k), WIDEN_DOTS) * qk_scale
        s = tl.where(cols[None, :] < N, s, float("-inf"))
        # online softmax: rescale what was summed so far to the new running maximum
        new_max = tl.maximum(row_max, tl.max(s, 1))
        p = tl.exp2(s - new_max[:, None])
        alpha = tl.exp2(row_max - new_max)
        row_sum = row_sum * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + _dot(p.to(dtype), v.to(dtype), WIDEN_DOTS)
        row_max = new_max

    out = acc / row_sum[:, None]
    if ROTATE_VO:
        cos, sin = _load_phasor(Z, rows, N, z_sn, z_sd, R)  # reloaded: cheaper than holding it through the loop
        out = _rotate(out, cos, -sin, BLOCK_M, R)
    _store_rows(OUT, out, rows, N, o_sn, HEAD_DIM)
    tl.store(LSE + bh * N + rows, row_max + tl.log2(row_sum), mask=rows < N)


@triton.jit
def attention_backward_dq_kernel(
    Q, K, V, Z, OUT, DO, LSE, DELTA, DQ, DZ,
    q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
    z_sb, z_sh, z_sn, z_sd, o_sb, o_sh, o_sn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE_VO: tl.constexpr, PHASOR_GRAD: tl.constexpr, WIDEN_DOTS: tl.constexpr,
):
    """dq of one query tile, recomputing the probabilities from ``LSE`` over the key tiles; it runs first and
    also writes ``DELTA`` (rowsum of dO·O, read by the dk/dv kernel) and the query side of the phasor gradient.

    With primes for rotated tensors: ``dq = dq'·conj(p)``, and the phasor gets ``dq'·conj(q)`` plus, when the
    output was rotated back, ``o'·conj(dout)``. ``o'`` (the output before that rotation) is not saved: it is
    summed here as ``P·v'`` beside ``dq'``, because dividing the stored output by a clamped phasor is not exact.
    """
    R: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * q_sb + h * q_sh
    K += b * k_sb + h * k_sh
    V += b * v_sb + h * v_sh
    Z += b * z_sb + h * z_sh
    OUT += b * o_sb + h * o_sh
    DO += b * o_sb + h * o_sh
    DQ += b * o_sb + h * o_sh
    dtype = Q.dtype.element_ty

    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cos, sin = _load_phasor(Z, rows, N, z_sn, z_sd, R)
    q_in = _load_rows(Q, rows, N, q_sn, q_sd, HEAD_DIM)
    q = _rotate(q_in, cos, sin, BLOCK_M, R).to(dtype)
    grad_out = _load_rows(DO, rows, N, o_sn, 1, HEAD_DIM)
    # rowsum(dO'·O') equals rowsum(dout·out) for any phasor: Re(conj(dout·p)·o') = Re(conj(dout)·o'·conj(p))
    delta = tl.sum(grad_out * _load_rows(OUT, rows, N, o_sn, 1, HEAD_DIM), 1)
    tl.store(DELTA + bh * N + rows, delta, mask=rows < N)
    do = grad_out
    if ROTATE_VO:
        do = _rotate(grad_out, cos, sin, BLOCK_M, R)  # out = o'·conj(p), so dL/do' = dout·p
    do = do.to(dtype)
    lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    o_rotated = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        k_cos, k_sin = _load_phasor(Z, cols, N, z_sn, z_sd, R)
        k = _rotate(_load_rows(K, cols, N, k_sn, k_sd, HEAD_DIM), k_cos, k_sin, BLOCK_N, R).to(dtype)
        v = _load_rows(V, cols, N, v_sn, v_sd, HEAD_DIM)
        if ROTATE_VO:
            v = _rotate(v, k_cos, k_sin, BLOCK_N, R)
        v = v.to(dtype)
        # padded keys get no weight: their score would be 0, and exp2(0 − lse) overflows where every real
        # score is far below zero
        s = tl.where(cols[None, :] < N, _dot(q, tl.trans(k), WIDEN_DOTS) * qk_scale, float("-inf"))
        p = tl.exp2(s - lse[:, None])
        dp = _dot(do, tl.trans(v), WIDEN_DOTS)
        ds = p * (dp - delta[:, None])  # softmax backward: dS = P ⊙ (dP − rowsum(dO'·O'))
        dq += _dot(ds.to(dtype), k, WIDEN_DOTS)
        if ROTATE_VO and PHASOR_GRAD:
            o_rotated += _dot(p.to(dtype), v, WIDEN_DOTS)

    dq *= sm_scale
    _store_rows(DQ, _rotate(dq, cos, -sin, BLOCK_M, R), rows, N, o_sn, HEAD_DIM)
    if PHASOR_GRAD:
        grad_cos, grad_sin = _pair_grad(dq, q_in, BLOCK_M, R)
        if ROTATE_VO:
            out_cos, out_sin = _pair_grad(o_rotated, grad_out, BLOCK_M, R)
            grad_cos += out_cos
            grad_sin += out_sin
        DZ += bh.to(tl.int64) * N * HEAD_DIM
        _store_rows(DZ, grad_cos, rows, N, HEAD_DIM, R)
        _store_rows(DZ + R, grad_sin, rows, N, HEAD_DIM, R)


@triton.jit
def attention_backward_dkdv_kernel(
    Q, K, V, Z, DO, LSE, DELTA, DK, DV, DZ,
    q_sb, q_sh, q_sn, q_sd, k_sb, k_sh, k_sn, k_sd, v_sb, v_sh, v_sn, v_sd,
    z_sb, z_sh, z_sn, z_sd, o_sb, o_sh, o_sn,
    H, N, qk_scale, sm_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    ROTATE_VO: tl.constexpr, PHASOR_GRAD: tl.constexpr, WIDEN_DOTS: tl.constexpr,
):
    """dk and dv of one key tile, recomputing the probabilities over the query tiles (transposed, so both
    accumulate with plain products). It runs after the dq kernel, whose ``DELTA`` it reads and whose rows of the
    phasor gradient it completes with the key and value sides ``dk'·conj(k)`` and ``dv'·conj(v)``.
    """
    R: tl.constexpr = HEAD_DIM // 2
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), (bh % H).to(tl.int64)
    Q += b * q_sb + h * q_sh
    K += b * k_sb + h * k_sh
    V += b * v_sb + h * v_sh
    Z += b * z_sb + h * z_sh
    DO += b * o_sb + h * o_sh
    DK += b * o_sb + h * o_sh
    DV += b * o_sb + h * o_sh
    dtype = Q.dtype.element_ty

    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cos, sin = _load_phasor(Z, cols, N, z_sn, z_sd, R)
    k_in = _load_rows(K, cols, N, k_sn, k_sd, HEAD_DIM)
    v_in = _load_rows(V, cols, N, v_sn, v_sd, HEAD_DIM)
    k = _rotate(k_in, cos, sin, BLOCK_N, R).to(dtype)
    v = v_in
    if ROTATE_VO:
        v = _rotate(v_in, cos, sin, BLOCK_N, R)
    v = v.to(dtype)

    dk = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for start in range(0, N, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        q_cos, q_sin = _load_phasor(Z, rows, N, z_sn, z_sd, R)
        q = _rotate(_load_rows(Q, rows, N, q_sn, q_sd, HEAD_DIM), q_cos, q_sin, BLOCK_M, R).to(dtype)
        do = _load_rows(DO, rows, N, o_sn, 1, HEAD_DIM)
        if ROTATE_VO:
            do = _rotate(do, q_cos, q_sin, BLOCK_M, R)
        do = do.to(dtype)
        lse = tl.load(LSE + bh * N + rows, mask=rows < N, other=0.0)
        delta = tl.load(DELTA + bh * N + rows, mask=rows < N, other=0.0)
        # Pᵀ: (keys, queries). Query rows past N add nothing: their dO and delta load as zeros (their scores and
        # log-sum-exp too, so their weights are a finite 1). Padded keys' rows are never stored; masking them
        # only keeps them finite, as in the dq kernel.
        st = tl.where(cols[:, None] < N, _dot(k, tl.trans(q), WIDEN_DOTS) * qk_scale, float("-inf"))
        pt = tl.exp2(st - lse[None, :])
        dv += _dot(pt.to(dtype), do, WIDEN_DOTS)
        dst = pt * (_dot(v, tl.trans(do), WIDEN_DOTS) - delta[None, :])
        dk += _dot(dst.to(dtype), q, WIDEN_DOTS)

    dk *= sm_scale
    _store_rows(DK, _rotate(dk, cos, -sin, BLOCK_N, R), cols, N, o_sn, HEAD_DIM)
    if ROTATE_VO:
        _store_rows(DV, _rotate(dv, cos, -sin, BLOCK_N, R), cols, N, o_sn, HEAD_DIM)
    else:
        _store_rows(DV, dv, cols, N, o_sn, HEAD_DIM)
    if PHASOR_GRAD:
        grad_cos, grad_sin = _pair_grad(dk, k_in, BLOCK_N, R)
        if ROTATE_VO:
            v_cos, v_sin = _pair_grad(dv, v_in, BLOCK_N, R)
            grad_cos += v_cos
            grad_sin += v_sin
        DZ += bh.to(tl.int64) * N * HEAD_DIM
        grad_cos += _load_rows(DZ, cols, N, HEAD_DIM, 1, R)
        grad_sin += _load_rows(DZ + R, cols, N, HEAD_DIM, 1, R)
        _store_rows(DZ, grad_cos, cols, N, HEAD_DIM, R)
        _store_rows(DZ + R, grad_sin, cols, N, HEAD_DIM, R)


def interpreted() -> bool:
    """Whether these kernels were built for Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import)."""
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(attention_forward_kernel, InterpretedFunction)
