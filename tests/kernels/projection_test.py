"""Tests for kernels.projection: the fused Pallas projection vs its jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kernels.projection import project_out_fused, projection_reference

TOL = {jnp.float32: 1e-5, jnp.bfloat16: 3e-2}


def basis(seed, n, c, rank):
    q, _ = np.linalg.qr(np.random.default_rng(seed).normal(size=(n, c)))
    return jnp.asarray(np.where(np.arange(c) < rank, q, 0.0), jnp.float32)


class ProjectionInterpretTest:
    INTERPRET = True

    @pytest.mark.parametrize("n,c,out,rank", [(20, 12, 7, 5), (40, 40, 33, 40)])
    @pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
    def test_matches_reference(self, n, c, out, rank, dtype):
        v = basis(0, n, c, rank)
        g = jnp.asarray(np.random.default_rng(1).normal(size=(n, out)), dtype)
        got = project_out_fused(v, g, block_n=16, block_out=16, interpret=self.INTERPRET)
        want = projection_reference(v, g.astype(jnp.float32))
        assert got.dtype == dtype and got.shape == g.shape
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want),
                                   atol=TOL[dtype], rtol=TOL[dtype])
        if dtype == jnp.float32:
            assert np.abs(np.asarray(v).T @ np.asarray(got)).max() < 1e-5

    def test_gradients_match_reference(self):
        v = basis(2, 20, 12, 6)
        g = jnp.asarray(np.random.default_rng(3).normal(size=(20, 9)), jnp.float32)
        w = jnp.asarray(np.random.default_rng(4).normal(size=(20, 9)), jnp.float32)

        def loss(fn):
            return lambda v, g: jnp.sum(w * fn(v, g) ** 2)

        fused = loss(lambda v, g: project_out_fused(v, g, block_n=16, block_out=16,
                                                    interpret=self.INTERPRET))
        got = jax.grad(fused, argnums=(0, 1))(v, g)
        want = jax.grad(loss(projection_reference), argnums=(0, 1))(v, g)
        for a, b in zip(got, want, strict=False):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)

    def test_shape_errors(self):
        with pytest.raises(ValueError, match="same n"):
            project_out_fused(jnp.zeros((4, 2)), jnp.zeros((5, 3)), interpret=True)


class TestProjectionInterpret(ProjectionInterpretTest):
    INTERPRET = True
