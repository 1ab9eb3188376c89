"""Fused subspace projection ``G − V (Vᵀ G)`` as a Pallas kernel, with a ``jnp`` reference.

The projection of Gradient Projection Memory (Saha et al., ICLR 2021) applied to a kernel
update ``G`` (``n × out``) with a basis ``V`` (``n × c``, orthonormal columns, zero
padding). Unfused, XLA writes the ``c × out`` coefficients to memory and reads ``G`` twice;
the kernel keeps one ``c × block_out`` coefficient tile on chip per output-column block:

1. ``coeff = Σ_i V[i]ᵀ G[i]`` over row tiles ``i`` of ``block_n`` rows;
2. ``out[i] = G[i] − V[i] coeff`` for every row tile.

The grid runs over blocks of output columns (independent). The wrapper pads ``n``, ``c``
and ``out`` to the block sizes (zero rows / columns do not change the result) and slices
the output back. The backward pass uses XLA on the reference (``jax.custom_vjp``); the
cotangent w.r.t. ``G`` is itself a projection since ``I − V Vᵀ`` is symmetric.

Status: written for the Triton (GPU) backend and tested on CPU in interpret mode only. No
GPU was available while writing it, so nothing here claims GPU speed; block sizes are
untuned defaults.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl


def projection_reference(v: jax.Array, g: jax.Array) -> jax.Array:
    """``g − v (vᵀ g)`` in plain ``jnp`` at the highest matmul precision."""
    hi = jax.lax.Precision.HIGHEST
    coeff = jnp.matmul(v.T, g, precision=hi)
    return (g - jnp.matmul(v, coeff, precision=hi)).astype(g.dtype)


def _projection_kernel(v_ref, g_ref, o_ref, *, block_n: int, num_row_tiles: int):
    """One output-column block: accumulate ``Vᵀ G`` over row tiles, then write ``G − V·coeff``."""
    c = v_ref.shape[1]
    block_out = g_ref.shape[1]

    def accumulate(i, coeff):
        rows = pl.ds(i * block_n, block_n)
        v = v_ref[rows, :].astype(jnp.float32)
        g = g_ref[rows, :].astype(jnp.float32)
        return coeff + jax.lax.dot_general(v, g, (((0,), (0,)), ((), ())),
                                           preferred_element_type=jnp.float32)

    coeff = jax.lax.fori_loop(0, num_row_tiles, accumulate,
                              jnp.zeros((c, block_out), jnp.float32))

    def write(i, carry):
        rows = pl.ds(i * block_n, block_n)
        v = v_ref[rows, :].astype(jnp.float32)
        g = g_ref[rows, :].astype(jnp.float32)
        o_ref[rows, :] = (g - jnp.dot(v, coeff, preferred_element_type=jnp.float32)).astype(
            o_ref.dtype)
        return carry

    jax.lax.fori_loop(0, num_row_tiles, write, 0)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _projection_pallas(v, g, *, block_n: int, block_out: int, interpret: bool):
    n, c = v.shape
    out = g.shape[1]
    n_pad, c_pad, out_pad = _round_up(n, block_n), _round_up(c, 16), _round_up(out, block_out)
    v_p = jnp.pad(v, ((0, n_pad - n), (0, c_pad - c)))
    g_p = jnp.pad(g, ((0, n_pad - n), (0, out_pad - out)))
    kernel = functools.partial(_projection_kernel, block_n=block_n,
                               num_row_tiles=n_pad // block_n)
    result = pl.pallas_call(
        kernel,
        grid=(out_pad // block_out,),
        in_specs=[
            pl.BlockSpec((n_pad, c_pad), lambda j: (0, 0)),
            pl.BlockSpec((n_pad, block_out), lambda j: (0, j)),
        ],
        out_specs=pl.BlockSpec((n_pad, block_out), lambda j: (0, j)),
        out_shape=jax.ShapeDtypeStruct((n_pad, out_pad), g.dtype),
        interpret=interpret,
        name="subspace_projection",
    )(v_p, g_p)
    return result[:n, :out]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _projection(v, g, block_n, block_out, interpret):
    return _projection_pallas(v, g, block_n=block_n, block_out=block_out, interpret=interpret)


def _projection_fwd(v, g, block_n, block_out, interpret):
    return _projection(v, g, block_n, block_out, interpret), (v, g)


def _projection_bwd(block_n, block_out, interpret, residuals, ct):
    del block_n, block_out, interpret
    v, g = residuals
    _, vjp = jax.vjp(projection_reference, v, g)  # backward_pass_impl = "xla"
    return vjp(ct)


_projection.defvjp(_projection_fwd, _projection_bwd)


@functools.partial(jax.jit, static_argnames=("block_n", "block_out", "interpret"))
def project_out_fused(
    v: jax.Array,
    g: jax.Array,
    *,
    block_n: int = 32,
    block_out: int = 32,
    interpret: bool = False,
) -> jax.Array:
    """``g − v (vᵀ g)`` with the fused Pallas kernel.

    Args:
        v: Basis ``(n, c)`` (orthonormal columns, zero padding; any ``c``).
        g: Update ``(n, out)``; reshape a conv kernel to ``(kh·kw·in, out)`` first.
        block_n: Rows per tile (a power of two for Triton).
        block_out: Output columns per grid step (a power of two for Triton).
        interpret: Run the kernel in the Pallas interpreter (CPU tests).

    Returns:
        The projected update, shape and dtype of ``g``.

    Raises:
        ValueError: If ``v`` and ``g`` are not 2-D with the same number of rows.
    """
    if v.ndim != 2 or g.ndim != 2 or v.shape[0] != g.shape[0]:
        raise ValueError(
            f"v must be (n, c) and g (n, out) with the same n, got v {v.shape} and g {g.shape}"
        )
    return _projection(v, g, block_n, block_out, interpret)
