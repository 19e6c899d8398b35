"""Typed config schema, registered in Hydra's ConfigStore.

Every group in `conf/` is validated against one dataclass here, so an unknown or mistyped key
fails when the config is composed (Hydra raises ConfigKeyError naming the key), before any model
is built. Value checks that a type cannot express (ranges, choices, cross-field rules) live in
`validate()`, which the entry point calls right after composition.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

LOSS_TYPES = ("grpo", "dapo", "dr_grpo", "gspo")
KL_ESTIMATORS = ("k1", "k2", "k3")
TOKEN_WEIGHTINGS = ("uniform", "ramp")
ENGINES = ("single", "ddp", "fsdp2", "deepspeed_zero2", "deepspeed_zero3")
OPS_BACKENDS = ("auto", "torch", "triton", "cuda")
STAGES = ("sft", "grpo", "eval")
REWARDS = ("base", "pmi", "cf", "gm", "asym_cf", "pmi_shift")
REWARD_AGGS = ("mean", "sum_clip", "mean_min")
WITHOUT_MODES = ("placebo", "ban")
NONFINITE_POLICIES = ("raise", "skip")
SCHEDULES = ("constant", "cosine", "linear")


@dataclass
class TinyModelConfig:
    """Shape of the from-scratch Qwen3-architecture model used when `model.path` is null."""

    hidden_size: int = 192
    num_hidden_layers: int = 4
    num_attention_heads: int = 6
    num_key_value_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 512
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF checkpoint directory; null builds the tiny model
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    trust_remote_code: bool = False
    dtype: str = "float32"  # float32 | bfloat16 | float16
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the `gpu` extra)


@dataclass
class SyntheticDataConfig:
    num_train: int = 4000
    num_eval: int = 400
    # Difficulty levels drawn for the train split; the held-out split uses `eval_levels`.
    levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    eval_levels: list[int] = field(default_factory=lambda: [1, 2, 3])
    meta_fraction: float = 0.25  # share of SFT solutions with a planted slip caught in a meta block
    seed: int = 0


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | files
    train_path: Optional[str] = None  # .parquet or .jsonl in the verl schema (SPEC section 9)
    eval_path: Optional[str] = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    decoy_seed: int = 42
    system_prompt: Optional[str] = None


@dataclass
class RewardConfig:
    name: str = "base"
    agg: str = "mean"  # PMI token aggregation (SPEC section 2)
    meta_weight: float = 0.8  # w(s) = meta_weight * min(1, s / meta_warmup_steps)
    meta_warmup_steps: int = 80
    use_policy_as_scorer: bool = False  # SPEC: the frozen reference scores unless this says so
    grader_timeout_s: float = 5.0
    grader_workers: int = 2


@dataclass
class AlgoConfig:
    loss_type: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None  # e.g. 3.0: cap the loss of negative-advantage tokens
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.001
    token_weighting: str = "uniform"
    filter_zero_std: bool = False
    ppo_epochs: int = 1
    num_minibatches: int = 1
    max_len_norm: Optional[int] = None  # dr_grpo's constant; null = rollout.max_new_tokens


@dataclass
class RolloutConfig:
    backend: str = "hf"
    n: int = 8
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    without_mode: str = "placebo"  # cf / asym_cf without-arm: force the placebo block, or ban tags
    split_arms: bool = False  # first n/2 with meta, the rest without (cf, asym_cf)
    # Rows (prompts x n) per generation call; null = all in one call. Outputs are the same per row.
    max_rows_per_call: Optional[int] = None
    # torch.compile the decode step over a static KV cache (CUDA graphs on GPU); off: on a 2-core CPU
    # it measured no faster and costs ~20-40 s of compilation per process (selfdistill/rollout/compiled.py).
    compile: bool = False


@dataclass
class EngineConfig:
    name: str = "single"
    mixed_precision: str = "no"  # no | bf16 | fp16
    gather_for_generation: bool = True  # FSDP2/ZeRO-3: gather full params once per rollout phase
    shard_reference: bool = False
    backend: str = "auto"  # process-group backend: auto | nccl | gloo
    # Extra DeepSpeed config keys, deep-merged over the one generated from this config
    # (selfdistill.engine.deepspeed.deepspeed_config), e.g. zero_optimization.offload_optimizer.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpsConfig:
    backend: str = "auto"  # auto = triton on CUDA, torch on CPU


@dataclass
class StageOptimConfig:
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 32  # sft: sequences per step; grpo: prompts per step
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class EvalConfig:
    num_prompts: Optional[int] = None  # null = the whole held-out split
    batch_size: int = 128
    max_new_tokens: int = 64
    greedy: bool = True


@dataclass
class TrainerConfig:
    stages: list[str] = field(default_factory=lambda: ["sft", "grpo", "eval"])
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints; 0 = only at the end of a stage
    keep_last: int = 2
    resume: str = "auto"  # auto | never | <checkpoint dir>
    on_nonfinite: str = "raise"
    progress: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "selfdistill"
    device: str = "auto"  # auto | cpu | cuda
    deterministic: bool = False
    torch_threads: int = 0  # 0 = torch default


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    ops: OpsConfig = field(default_factory=OpsConfig)
    sft: StageOptimConfig = field(default_factory=StageOptimConfig)
    grpo: StageOptimConfig = field(default_factory=lambda: StageOptimConfig(lr=1e-4, steps=50, batch_size=8))
    eval: EvalConfig = field(default_factory=EvalConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    experiment_name: str = MISSING


def register_configs() -> None:
    """Register the schema so every `conf/` group file is typed against it."""
    cs = ConfigStore.instance()
    cs.store(name="selfdistill_schema", node=Config)
    for group, node in (
        ("model", ModelConfig), ("data", DataConfig), ("reward", RewardConfig),
        ("algo", AlgoConfig), ("rollout", RolloutConfig), ("engine", EngineConfig),
        ("ops", OpsConfig),
    ):
        cs.store(group=group, name=f"{group}_schema", node=node)


class ConfigError(ValueError):
    """A config value is out of range or inconsistent; the message names it and the fix."""


def _choice(value: Any, key: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of {', '.join(valid)}")


def validate(cfg: Config | DictConfig) -> None:
    """Range and consistency checks that the dataclass types cannot express."""
    _choice(cfg.algo.loss_type, "algo.loss_type", LOSS_TYPES)
    _choice(cfg.algo.kl_estimator, "algo.kl_estimator", KL_ESTIMATORS)
    _choice(cfg.algo.token_weighting, "algo.token_weighting", TOKEN_WEIGHTINGS)
    _choice(cfg.engine.name, "engine.name", ENGINES)
    _choice(cfg.ops.backend, "ops.backend", OPS_BACKENDS)
    _choice(cfg.reward.name, "reward.name", REWARDS)
    _choice(cfg.reward.agg, "reward.agg", REWARD_AGGS)
    _choice(cfg.rollout.without_mode, "rollout.without_mode", WITHOUT_MODES)
    _choice(cfg.trainer.on_nonfinite, "trainer.on_nonfinite", NONFINITE_POLICIES)
    for stage in cfg.trainer.stages:
        _choice(stage, "trainer.stages[]", STAGES)
    for name in ("sft", "grpo"):
        st = cfg[name]
        _choice(st.schedule, f"{name}.schedule", SCHEDULES)
        if not st.lr > 0:
            raise ConfigError(f"{name}.lr={st.lr} must be > 0")
        if st.steps < 0 or st.warmup_steps < 0:
            raise ConfigError(f"{name}.steps={st.steps} and {name}.warmup_steps={st.warmup_steps} must be >= 0")
        if st.batch_size < 1:
            raise ConfigError(f"{name}.batch_size={st.batch_size} must be >= 1")
    a = cfg.algo
    if not (0 <= a.clip_low < 1):
        raise ConfigError(f"algo.clip_low={a.clip_low} must be in [0, 1)")
    if a.clip_high < 0:
        raise ConfigError(f"algo.clip_high={a.clip_high} must be >= 0")
    if a.clip_low > a.clip_high:
        raise ConfigError(
            f"algo.clip_low={a.clip_low} > algo.clip_high={a.clip_high}; clip-higher needs clip_low <= clip_high"
        )
    if a.dual_clip is not None and a.dual_clip <= 1:
        raise ConfigError(f"algo.dual_clip={a.dual_clip} must be > 1 (3.0 is usual) or null")
    if a.kl_coef < 0 or a.entropy_coef < 0:
        raise ConfigError(f"algo.kl_coef={a.kl_coef} and algo.entropy_coef={a.entropy_coef} must be >= 0")
    if a.ppo_epochs < 1 or a.num_minibatches < 1:
        raise ConfigError("algo.ppo_epochs and algo.num_minibatches must be >= 1")
    r = cfg.rollout
    if r.n < 2:
        raise ConfigError(f"rollout.n={r.n}: group advantages need n >= 2 completions per prompt")
    if r.temperature <= 0:
        raise ConfigError(f"rollout.temperature={r.temperature} must be > 0")
    if not (0 < r.top_p <= 1):
        raise ConfigError(f"rollout.top_p={r.top_p} must be in (0, 1]")
    if r.max_new_tokens < 1:
        raise ConfigError(f"rollout.max_new_tokens={r.max_new_tokens} must be >= 1")
    if r.max_rows_per_call is not None and r.max_rows_per_call < 1:
        raise ConfigError(f"rollout.max_rows_per_call={r.max_rows_per_call} must be >= 1, or null for one call per step")
    if r.compile and cfg.engine.name == "fsdp2" and not cfg.engine.gather_for_generation:
        raise ConfigError("rollout.compile=true with engine=fsdp2 and engine.gather_for_generation=false: the compiled "
                          "decode step cannot run over sharded weights; set rollout.compile=false or gather_for_generation=true")
    if cfg.reward.name in ("cf", "asym_cf"):
        if not r.split_arms:
            raise ConfigError(
                f"reward.name={cfg.reward.name} needs rollout.split_arms=true (n/2 with meta, n/2 without)"
            )
    if r.split_arms and r.n % 2:
        raise ConfigError(f"rollout.n={r.n} must be even when rollout.split_arms=true (n/2 per arm)")
    if not (0 <= cfg.reward.meta_weight):
        raise ConfigError(f"reward.meta_weight={cfg.reward.meta_weight} must be >= 0")
    if cfg.reward.meta_warmup_steps < 0:
        raise ConfigError(f"reward.meta_warmup_steps={cfg.reward.meta_warmup_steps} must be >= 0")
    if cfg.reward.grader_timeout_s <= 0:
        raise ConfigError(f"reward.grader_timeout_s={cfg.reward.grader_timeout_s} must be > 0")
    if cfg.data.source not in ("synthetic", "files"):
        raise ConfigError(f"data.source={cfg.data.source!r}: choose synthetic or files")
    if cfg.data.source == "files" and not cfg.data.train_path:
        raise ConfigError("data.source=files needs data.train_path=<.parquet or .jsonl>")


def to_container(cfg: Config | DictConfig) -> dict:
    """Plain dict of a config (typed dataclass tree or DictConfig), for loggers and reports."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dataclasses.asdict(cfg)
