"""EWC in a hand-written `nnx.Optimizer` loop: two Permuted-Digits tasks, with and without.

The penalty is an optax transform chained before SGD; its Fisher and anchor arrive as
keyword extra args of `optimizer.update`; `ewc_update_memory` is the task-end consolidation
(the same function the registered `ewc` method calls). ``lam=0`` is plain finetuning.
Run: ``python examples/own_loop_ewc.py`` (about 10 s on 2 CPU cores).
"""

import jax
import numpy as np
import optax
from flax import nnx

import clax
from clax.methods import ewc_update_memory
from clax.transforms.ewc import ewc_penalty, init_ewc_memory

scenario = clax.make_scenario("permuted", clax.data.load_source("digits"), num_tasks=2)


@nnx.jit
def train_step(model, optimizer, x, y, fisher, anchor):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads, fisher=fisher, anchor=anchor)  # extra args of the penalty
    return loss


def run(lam: float, epochs: int = 5, batch_size: int = 32) -> tuple[float, float]:
    """Trains both tasks; returns the test accuracy on (task 0, task 1) at the end."""
    model = clax.make_model("mlp", input_shape=scenario.input_shape, widths=(64,),
                            num_classes=scenario.num_classes, seed=0)
    tx = clax.before(ewc_penalty(lam=lam))(optax.sgd(0.05))  # penalty, then SGD
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    memory = init_ewc_memory(nnx.state(model, nnx.Param))  # zero Fisher: no penalty yet
    for t, task in enumerate(scenario.tasks):
        rng = np.random.default_rng(t)
        for _ in range(epochs):
            order = rng.permutation(len(task.y_train))
            for i in range(0, len(order) - batch_size + 1, batch_size):
                idx = order[i:i + batch_size]
                train_step(model, optimizer, task.x_train[idx], task.y_train[idx],
                           memory.fisher, memory.anchor)
        memory = ewc_update_memory(model, memory, (task.x_train, task.y_train),
                                   key=jax.random.key(t))  # task end: add this task's Fisher
    return tuple(float(np.mean(np.asarray(model(task.x_test)).argmax(-1) == task.y_test))
                 for task in scenario.tasks)


if __name__ == "__main__":
    for name, lam in (("finetune", 0.0), ("ewc", 30.0)):
        old, new = run(lam)
        print(f"{name}: after both tasks, task 0 accuracy {old:.3f}, task 1 {new:.3f}")
