"""Optax wrappers that track extra parameter copies during training (EMA balancing)."""

from clax.transforms.ema import EMABalancingState, ema_balancing, ema_params, find_state

__all__ = ["EMABalancingState", "ema_balancing", "ema_params", "find_state"]
