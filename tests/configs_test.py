"""Tests of cai_jax.configs: each config refuses its own out-of-range fields by name."""

import numpy as np
import pytest

from cai_jax import configs
from cai_jax.configs import ModelConfig, OptimizerConfig, PPOConfig, TrainConfig


@pytest.mark.parametrize("kw, match", [
    (dict(schedule="linear"), r"OptimizerConfig.schedule='linear'"),
    (dict(learning_rate=-1e-4), r"OptimizerConfig.learning_rate must be a finite number >= 0, "
                                r"got -0.0001"),
    (dict(learning_rate=float("inf")), r"OptimizerConfig.learning_rate must be a finite number"),
    (dict(learning_rate=float("nan")), r"OptimizerConfig.learning_rate must be a finite number"),
    (dict(warmup_steps=-1), r"OptimizerConfig.warmup_steps must be an integer >= 0, got -1"),
    (dict(warmup_steps=1.5), r"OptimizerConfig.warmup_steps must be an integer >= 0, got 1.5"),
    (dict(b1="0.9"), r"OptimizerConfig.b1 must be in \[0, 1\)"),
    (dict(b1=1.0), r"OptimizerConfig.b1 must be in \[0, 1\), got 1.0"),
    (dict(b2=-0.1), r"OptimizerConfig.b2 must be in \[0, 1\)"),
    (dict(eps=-1e-8), r"OptimizerConfig.eps must be a finite number >= 0"),
    (dict(weight_decay=float("nan")), r"OptimizerConfig.weight_decay must be a finite number"),
    (dict(grad_clip_norm=-1.0), r"grad_clip_norm must be a finite number >= 0, got -1.0 "
                                r"\(0 disables clipping\)"),
    (dict(final_lr_fraction=float("inf")), r"final_lr_fraction must be a finite number"),
    (dict(schedule="cosine", total_steps=0),
     r"total_steps=0 must be greater than warmup_steps=0 for the cosine"),
    (dict(schedule="cosine", warmup_steps=5, total_steps=3),   # optax refuses it too
     r"^OptimizerConfig.total_steps=3 must be greater than warmup_steps=5"),
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
    (dict(temperature=0.0), r"PPOConfig.temperature must be a finite number > 0, got 0.0"),
    (dict(temperature=float("nan")), r"PPOConfig.temperature must be a finite number > 0"),
    (dict(kl_coef=float("inf")), r"PPOConfig.kl_coef must be a finite number >= 0, got inf"),
    (dict(value_loss_coef=-1.0), r"PPOConfig.value_loss_coef must be a finite number >= 0"),
    (dict(epochs=1.5), r"PPOConfig.epochs must be an integer >= 1, got 1.5"),
    (dict(rollout_batch=16.0), r"PPOConfig.rollout_batch must be an integer >= 1, got 16.0"),
    (dict(whiten_advantages="False"), r"PPOConfig.whiten_advantages must be True or False"),
    (dict(clip=0.0), r"PPOConfig.clip must be > 0, got 0.0"),
    (dict(gamma=1.5), r"PPOConfig.gamma must be in \[0, 1\], got 1.5"),
    (dict(adaptive_kl=True, kl_horizon=3, rollout_batch=16),
     r"kl_horizon=3 is too short for rollout_batch=16.*kl_horizon > 3"),
])
def test_ppo_config_refuses_out_of_range_fields(kw, match):
  with pytest.raises(ValueError, match=match):
    PPOConfig(**kw)


@pytest.mark.parametrize("kw, match", [
    (dict(d_model="64"), r"^ModelConfig.d_model must be an integer >= 1, got '64'$"),
    (dict(n_layers=2.0), r"^ModelConfig.n_layers must be an integer >= 1, got 2.0$"),
    (dict(d_model=64.5), r"^ModelConfig.d_model must be an integer >= 1, got 64.5$"),
    (dict(vocab_size=0), r"^ModelConfig.vocab_size must be an integer >= 1, got 0$"),
    (dict(head_dim=0), r"^ModelConfig.head_dim must be an integer >= 1, got 0$"),
    (dict(head_dim=-4), r"^ModelConfig.head_dim must be an integer >= 1, got -4$"),
    (dict(rope_theta=-1.0), r"^ModelConfig.rope_theta must be a finite number > 0, got -1.0$"),
    (dict(norm_eps=float("nan")), r"^ModelConfig.norm_eps must be a finite number >= 0"),
    (dict(tie_embeddings="False"), r"^ModelConfig.tie_embeddings must be True or False"),
    (dict(dtype="int8"), r"^ModelConfig.dtype: unknown dtype 'int8'"),
    (dict(param_dtype="fp32"), r"^ModelConfig.param_dtype: unknown dtype 'fp32'"),
    (dict(attention_impl="flash"), r"^ModelConfig.attention_impl='flash'; expected None, 'xla' "
                                   r"or 'cudnn'$"),
])
def test_model_config_refuses_bad_fields_by_name(kw, match):
  """Each of these was accepted (a traceback, NaN logits or a silently different model later)
  or refused without the field's name."""
  with pytest.raises(ValueError, match=match):
    ModelConfig(**kw)


def test_model_config_accepts_numpy_numbers_and_its_choices():
  import numpy as np
  cfg = ModelConfig(d_model=np.int64(64), rope_theta=np.float32(1e4), tie_embeddings=np.bool_(True),
                    head_dim=16, attention_impl="cudnn")
  assert cfg.dim_per_head == 16
  ModelConfig(attention_impl="xla", norm_eps=0.0)


@pytest.mark.parametrize("kw, match", [
    (dict(batch_size=8.5), r"^TrainConfig.batch_size must be an integer >= 1, got 8.5$"),
    (dict(num_steps=2.5), r"^TrainConfig.num_steps must be an integer >= 1, got 2.5$"),
    (dict(seq_len=0), r"^TrainConfig.seq_len must be an integer >= 1, got 0$"),
    (dict(seed="0"), r"^TrainConfig.seed must be an integer in \[0, 2\*\*32\), got '0'$"),
    (dict(progress="no"), r"^TrainConfig.progress must be True or False, got 'no'$"),
])
def test_train_config_refuses_bad_fields_by_name(kw, match):
  with pytest.raises(ValueError, match=match):
    TrainConfig(**kw)


def test_an_odd_head_width_is_refused():
  with pytest.raises(ValueError, match=r"^ModelConfig: the head width 15 \(head_dim, or d_model / "
                                       r"n_heads\) must be even: RoPE rotates pairs of channels$"):
    ModelConfig(d_model=60, n_heads=4, n_kv_heads=2)
  with pytest.raises(ValueError, match=r"head width 7"):
    ModelConfig(head_dim=7)
  assert ModelConfig(d_model=48, n_heads=4, n_kv_heads=2).d_model == 48   # width 12


@pytest.mark.parametrize("call, match", [
    (lambda: configs.check_seed("x.seed", 2**32), r"^x.seed must be an integer in \[0, 2\*\*32\), got 4294967296$"),
    (lambda: configs.check_seed("x.seed", -1), r"^x.seed must be an integer in \[0, 2\*\*32\), got -1$"),
    (lambda: configs.check_seed("x.seed", np.bool_(True)), r"^x.seed must be an integer in"),
    (lambda: configs.check_int("x.n", np.float32(2.0), 1), r"^x.n must be an integer >= 1, got "),
    (lambda: configs.check_number("x.f", 1.5, 0.0, high=1.0), r"^x.f must be a finite number in \[0, 1\], got 1.5$"),
    (lambda: configs.check_number("x.f", float("nan"), 0.0, high=1.0), r"^x.f must be a finite number in \[0, 1\]"),
    (lambda: configs.check_number("x.f", True, 0.0), r"^x.f must be a finite number >= 0, got True$"),
])
def test_shared_checks_name_the_setting(call, match):
  with pytest.raises(ValueError, match=match):
    call()


def test_shared_checks_take_numpy_scalars_at_the_bounds():
  configs.check_seed("x.seed", np.uint32(2**32 - 1))
  configs.check_seed("x.seed", 0)
  configs.check_int("x.n", np.int64(1), 1)
  configs.check_number("x.f", np.float32(1.0), 0.0, high=1.0)
  configs.check_number("x.f", 0, 0.0, high=1.0)
