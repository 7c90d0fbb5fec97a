"""Tests of cai_jax.configs: each config refuses its own out-of-range fields by name."""

import pytest

from cai_jax.configs import OptimizerConfig, PPOConfig


@pytest.mark.parametrize("kw, match", [
    (dict(schedule="linear"), r"OptimizerConfig.schedule='linear'"),
    (dict(learning_rate=-1e-4), r"learning_rate and warmup_steps must be >= 0"),
    (dict(b1=1.0), r"OptimizerConfig.b1 must be in \[0, 1\), got 1.0"),
    (dict(b2=-0.1), r"OptimizerConfig.b2 must be in \[0, 1\)"),
    (dict(eps=-1e-8), r"OptimizerConfig.eps must be a finite number >= 0"),
    (dict(weight_decay=float("nan")), r"OptimizerConfig.weight_decay must be a finite number"),
    (dict(grad_clip_norm=-1.0), r"grad_clip_norm must be a finite number >= 0, got -1.0 "
                                r"\(0 disables clipping\)"),
    (dict(final_lr_fraction=float("inf")), r"final_lr_fraction must be a finite number"),
    (dict(schedule="cosine", total_steps=0), r"total_steps must be >= 1 for the cosine"),
])
def test_optimizer_config_refuses_out_of_range_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    OptimizerConfig(**kw)


def test_optimizer_config_accepts_its_edges():
  OptimizerConfig(b1=0.0, b2=0.0, weight_decay=0.0, grad_clip_norm=0.0, eps=0.0)
  OptimizerConfig(schedule="constant", total_steps=0)   # the horizon is unused there


@pytest.mark.parametrize("kw, match", [
    (dict(kl_kind="k9"), r"PPOConfig.kl_kind must be one of"),
    (dict(rollout_batch=6, minibatches=4), r"minibatches=4 must divide rollout_batch=6"),
    (dict(temperature=0.0), r"PPOConfig.temperature must be > 0"),
    (dict(clip=0.0), r"PPOConfig.clip must be > 0, got 0.0"),
    (dict(gamma=1.5), r"PPOConfig.gamma must be in \[0, 1\], got 1.5"),
    (dict(adaptive_kl=True, kl_horizon=3, rollout_batch=16),
     r"kl_horizon=3 is too short for rollout_batch=16.*kl_horizon > 3"),
])
def test_ppo_config_refuses_out_of_range_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    PPOConfig(**kw)
