"""clax.core.method.Method: its fields are checked at construction."""

import optax
import pytest

from clax.core.method import Method, before


@pytest.mark.parametrize("kwargs,error,match", [
    ({"name": 3}, TypeError, r"^Method name must be a non-empty str, got 3 \(int\)$"),
    ({"name": None}, TypeError, r"^Method name must be a non-empty str, got None"),
    ({"name": ""}, ValueError, r"^Method name must be a non-empty str, got ''$"),
    ({"name": "m", "optimizer": "sgd"}, TypeError,
     r"^method 'm': optimizer must be callable, got 'sgd' \(str\)$"),
    ({"name": "m", "optimizer": optax.sgd(0.1)}, TypeError, "optimizer must be callable"),
    ({"name": "m", "optimizer": None}, TypeError,
     r"^method 'm': optimizer must be callable \(leave it unset for the default\), got None"),
    ({"name": "m", "init_memory": None}, TypeError, "init_memory must be callable"),
    ({"name": "m", "training_data": None}, TypeError, "training_data must be callable"),
    ({"name": "m", "replay": 3}, TypeError,
     r"^method 'm': replay must be callable or None, got 3 \(int\)$"),
    ({"name": "m", "transform": "sgd"}, TypeError, "unexpected keyword argument 'transform'"),
])
def test_bad_fields_are_refused_at_construction(kwargs, error, match):
    # An empty name used to raise TypeError (a right type out of range is a ValueError), and
    # optimizer / init_memory / training_data = None were accepted and failed when the loop
    # called them.
    with pytest.raises(error, match=match):
        Method(**kwargs)


def test_valid_fields_are_accepted():
    m = Method(name="m", optimizer=before(optax.scale(2.0)), replay=None, predict=None)
    assert m.name == "m" and callable(m.optimizer) and m.replay is None
