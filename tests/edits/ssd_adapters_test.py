"""SSD dampening restricted to adapter parameters: the frozen base is never edited."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from clax.edits.ssd import ssd_dampen
from clax.models import MLP, add_lora, peft_mask, trainable_params


def test_ssd_on_lora_factors_only_leaves_the_base_bit_identical():
    model = MLP((4, 4, 1), num_classes=3, widths=(8,), rngs=nnx.Rngs(0))
    add_lora(model, rank=2, targets=r"layers/0", rngs=nnx.Rngs(1))
    # Non-zero B so the LoRA factors matter.
    model.layers[0].lora_b.kernel[...] = jnp.ones_like(model.layers[0].lora_b.kernel[...])
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    mask = peft_mask(params)
    rng = np.random.default_rng(0)
    fisher_full = jax.tree.map(lambda p: jnp.asarray(rng.random(p.shape), jnp.float32), params)
    # The forget Fisher dominates everywhere: SSD selects (and dampens) every entry it sees.
    fisher_forget = jax.tree.map(lambda f: 100.0 * f + 1.0, fisher_full)
    sub = trainable_params(params, mask)
    edited, report = ssd_dampen(sub, trainable_params(fisher_full, mask),
                                trainable_params(fisher_forget, mask), alpha=10.0)
    nnx.update(model, edited)
    after = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(params),
                            jax.tree_util.tree_leaves(after), strict=True):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        if "lora_" in name:
            assert not np.array_equal(a, b), f"{name} should be dampened"
        else:
            np.testing.assert_array_equal(a, b, err_msg=f"{name} is frozen but changed")
    assert report is not None
