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
STAGES = ("sft", "grpo", "sdpo", "sdft", "eval")
ALGOS = ("grpo", "sdpo", "sdft")  # the training stage `algo.name` runs (besides sft / eval)
DISTILL_LOSSES = ("sampled_token", "topk")
TEACHERS = ("frozen", "ema", "live")
SDFT_MODES = ("offline", "online")
CURRICULA = ("none", "demo_length")
BATCHINGS = ("single_pass", "three_pass")
REWARD_AGGS = ("mean", "sum_clip", "mean_min")
WITHOUT_MODES = ("placebo", "ban")
NONFINITE_POLICIES = ("raise", "skip")
SCHEDULES = ("constant", "cosine", "linear")
MODEL_DTYPES = ("float32", "bfloat16", "float16")
MIXED_PRECISIONS = ("no", "bf16", "fp16")  # fp16 is listed so build_engine can say why it is refused


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
    # Parameter dtype: float32 | bfloat16 | float16. The optimizer updates these parameters, so a
    # trained model keeps float32 and computes in bf16 with engine.mixed_precision=bf16.
    dtype: str = "float32"
    attn_implementation: str = "sdpa"  # sdpa | eager | flash_attention_2 (needs the `gpu` extra)
    # Recompute each decoder layer's activations in backward (HF activation checkpointing, non-
    # reentrant): activation memory of one layer instead of all; same loss and gradient.
    gradient_checkpointing: bool = False


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
    eval_path: Optional[str] = None  # the held-out split (selfdistill.eval)
    # A held-in validation file (same schema, drawn from the training distribution, no prompt shared
    # with train_path); alternative to carving `eval.val_size` rows out of the train split.
    val_path: Optional[str] = None
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)
    decoy_seed: int = 42
    system_prompt: Optional[str] = None
    # Prompt rows longer than this many tokens (chat-templated, as the policy sees them) are dropped
    # at load, counted and logged; null keeps every row.
    max_prompt_tokens: Optional[int] = None
    # false: the prompt is its messages' contents joined by a blank line, tokenized as they are
    # (base models without a chat template); true: the tokenizer's chat template.
    chat_template: bool = True
    # Extra variables for the chat template, e.g. {enable_thinking: false} for Qwen3.
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class RewardConfig:
    name: str = "base"
    agg: str = "mean"  # PMI token aggregation (SPEC section 2)
    meta_weight: float = 0.8  # w(s) = meta_weight * min(1, s / meta_warmup_steps)
    meta_warmup_steps: int = 80
    use_policy_as_scorer: bool = False  # SPEC: the frozen reference scores unless this says so
    grader_timeout_s: float = 5.0
    grader_workers: int = 2


# Teacher-context templates of SPEC section 6 ({prompt}: the user's question; {demonstration}: a
# correct sibling's completion (SDPO) or the row's demonstration (SDFT); {feedback}: the grader's
# message). The feedback wording is this trainer's choice: SPEC names only the messages.
SDPO_TEMPLATE = "{prompt}\n\nCorrect solution:\n\n{demonstration}\n\nCorrectly solve the original question."
SDFT_TEMPLATE = ("{prompt}\n\nThis is an example for a response to the question:\n{demonstration}\n\n"
                 "Now answer with a response of your own.")
FEEDBACK_TEMPLATE = ("{prompt}\n\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback}\n\n"
                     "Correctly solve the original question.")


@dataclass
class DistillConfig:
    """The self-teacher and the distillation loss (SPEC section 6), shared by SDPO and SDFT."""

    loss: str = "sampled_token"  # sampled_token | topk
    weight: float = 1.0  # L = (1 - weight) L_policy + weight L_distill
    teacher: str = "frozen"  # frozen (stage-start weights) | ema | live (the student)
    ema_tau: float = 0.05
    is_clip: float = 2.0  # sampled_token: rho = min(exp(logp - logp_old), is_clip)
    topk: int = 100
    tail: bool = True
    alpha: float = 0.5  # 0 = KL(T||S), 1 = KL(S||T), else generalised JSD
    template: str = SDPO_TEMPLATE
    feedback: bool = False  # SDPO: a rollout without a demonstration gets the grader's message
    feedback_template: str = FEEDBACK_TEMPLATE
    reprompt_on_self_success: bool = False  # SDPO: a correct rollout may be its own demonstration
    max_teacher_prompt_tokens: int = 2048  # the teacher prompt keeps its last this many tokens


@dataclass
class SDFTAlgoConfig:
    mode: str = "offline"  # offline: CE on frozen-teacher samples (seed recipe) | online: on-policy distillation


@dataclass
class AlgoConfig:
    name: str = "grpo"  # grpo | sdpo | sdft: the training stage this algorithm runs in
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
    distill: DistillConfig = field(default_factory=DistillConfig)
    sdft: SDFTAlgoConfig = field(default_factory=SDFTAlgoConfig)


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
    # bf16: compute in bf16, fp32 master weights and optimizer state (model.dtype=float32). single /
    # ddp: torch.autocast around the model's forward; fsdp2: MixedPrecisionPolicy; deepspeed: bf16.
    mixed_precision: str = "no"  # no | bf16 (fp16 is refused: it needs loss scaling)
    gather_for_generation: bool = True  # FSDP2/ZeRO-3: gather full params once per rollout phase
    shard_reference: bool = False
    backend: str = "auto"  # process-group backend: auto | nccl | gloo
    # Extra DeepSpeed config keys, deep-merged over the one generated from this config
    # (selfdistill.engine.deepspeed.deepspeed_config), e.g. zero_optimization.offload_optimizer.
    deepspeed: dict[str, Any] = field(default_factory=dict)


@dataclass
class OpsConfig:
    backend: str = "auto"  # auto = triton on CUDA, torch on CPU
    # CPU models: RMSNorm / rotary forward+backward and the decode step as csrc kernels
    # (selfdistill.ops.fused_layers). auto = where the extension builds; on = required; off = HF's code
    fused_layers: str = "auto"


@dataclass
class StageOptimConfig:
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    batch_size: int = 32  # sft: sequences per step; grpo: prompts per step
    # Rows per forward/backward; gradients of a step's micro-batches are accumulated (exact loss
    # weights, selfdistill.algo.update). null = the whole (mini)batch in one pass.
    micro_batch_size: Optional[int] = None
    grad_clip: float = 1.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])


@dataclass
class SDFTStageConfig(StageOptimConfig):
    """The SDFT stage: optimizer and batch as every stage, plus its eval cadence and data order."""

    train_pairs: Optional[int] = None  # train on the first this many rows (the seed's fixed subset); null = all
    eval_every: int = 0  # steps between evals of the score 1/(1 + eval token loss); 0 = at the end only
    eval_prompts: int = 32  # held-out rows whose frozen-teacher completions the score is measured on
    curriculum: str = "none"  # none | demo_length (shortest demonstration first)
    batching: str = "single_pass"  # single_pass (every epoch in curriculum order) | three_pass


@dataclass
class EvalConfig:
    """Held-in validation during training and held-out evaluation at the `eval` stage (selfdistill.eval).

    Held-in = `val_size` rows carved from the train split (never sampled by training) or the file
    `data.val_path`: the training distribution, the seed's "held-in val". Held-out = `data.eval_path`
    (synthetic: the disjoint held-out split), which training never informs."""

    num_prompts: Optional[int] = None  # held-out problems evaluated (the first ones); null = all
    batch_size: int = 128  # completions per generate call
    max_new_tokens: int = 64
    samples_per_problem: int = 1  # k: accuracy = mean over the k samples; pass@k reported beside it
    greedy: Optional[bool] = None  # null = greedy for k = 1, sampling for k > 1
    temperature: Optional[float] = None  # sampling temperature; null = rollout.temperature
    top_p: float = 1.0
    bands: int = 4  # numeric difficulty -> this many quantile bands (string levels are kept as given)
    every: int = 0  # held-in validation every this many steps of a training stage; 0 = none
    val_size: int = 0  # rows carved from the train split as the held-in set; 0 = data.val_path or none
    val_stages: Optional[list[str]] = None  # training stages that validate; null = all of them


@dataclass
class ReportConfig:
    """`selfdistill-report DIR [report.key=value ...]` (selfdistill.report)."""

    base_arm: str = "base"  # reward.name of the matched twin every arm is compared with
    drift_threshold: float = 0.05  # |held-in gain - held-out gain| above this (or opposite signs) = drift
    bootstrap_samples: int = 2000
    bootstrap_seed: int = 0
    confidence: float = 0.95
    step: Optional[int] = None  # held-out eval step compared; null = the last one a pair shares
    out_dir: Optional[str] = None  # null = the first directory given


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
    sdpo: StageOptimConfig = field(default_factory=lambda: StageOptimConfig(lr=1e-4, steps=50, batch_size=8))
    sdft: SDFTStageConfig = field(default_factory=lambda: SDFTStageConfig(lr=5e-5, steps=30, batch_size=32))
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
    from selfdistill.rewards.registry import REWARDS  # the registry is the list of arms

    _choice(cfg.reward.name, "reward.name", tuple(REWARDS))
    _choice(cfg.reward.agg, "reward.agg", REWARD_AGGS)
    _choice(cfg.rollout.without_mode, "rollout.without_mode", WITHOUT_MODES)
    _choice(cfg.trainer.on_nonfinite, "trainer.on_nonfinite", NONFINITE_POLICIES)
    for stage in cfg.trainer.stages:
        _choice(stage, "trainer.stages[]", STAGES)
    for name in ("sft", "grpo", "sdpo", "sdft"):
        st = cfg[name]
        _choice(st.schedule, f"{name}.schedule", SCHEDULES)
        if not st.lr > 0:
            raise ConfigError(f"{name}.lr={st.lr} must be > 0")
        if st.steps < 0 or st.warmup_steps < 0:
            raise ConfigError(f"{name}.steps={st.steps} and {name}.warmup_steps={st.warmup_steps} must be >= 0")
        if st.batch_size < 1:
            raise ConfigError(f"{name}.batch_size={st.batch_size} must be >= 1")
        if st.micro_batch_size is not None and st.micro_batch_size < 1:
            raise ConfigError(f"{name}.micro_batch_size={st.micro_batch_size} must be >= 1 (rows per forward/backward) "
                              "or null (the whole batch at once)")
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
    if REWARDS[cfg.reward.name].needs_split_arms:
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
    _validate_distillation(cfg)
    if cfg.data.source not in ("synthetic", "files"):
        raise ConfigError(f"data.source={cfg.data.source!r}: choose synthetic or files")
    if cfg.data.source == "files" and not cfg.data.train_path:
        raise ConfigError("data.source=files needs data.train_path=<.parquet or .jsonl>")
    if cfg.data.max_prompt_tokens is not None and cfg.data.max_prompt_tokens < 1:
        raise ConfigError(f"data.max_prompt_tokens={cfg.data.max_prompt_tokens} must be >= 1 or null (no limit)")
    if not cfg.data.chat_template and cfg.data.chat_template_kwargs:
        raise ConfigError(f"data.chat_template_kwargs={dict(cfg.data.chat_template_kwargs)} has no template to reach "
                          "with data.chat_template=false; drop the kwargs or enable the template")
    _choice(cfg.model.dtype, "model.dtype", MODEL_DTYPES)
    _choice(cfg.engine.mixed_precision, "engine.mixed_precision", MIXED_PRECISIONS)
    if cfg.engine.mixed_precision == "bf16" and cfg.model.dtype != "float32" and not cfg.engine.name.startswith("deepspeed"):
        raise ConfigError(f"engine.mixed_precision=bf16 keeps the model's own parameters as the fp32 master weights on "
                          f"engine={cfg.engine.name}, but model.dtype={cfg.model.dtype}; set model.dtype=float32")
    _validate_eval(cfg)


def _validate_eval(cfg: Config | DictConfig) -> None:
    e = cfg.eval
    for key in ("batch_size", "max_new_tokens", "samples_per_problem", "bands"):
        if getattr(e, key) < 1:
            raise ConfigError(f"eval.{key}={getattr(e, key)} must be >= 1")
    if e.num_prompts is not None and e.num_prompts < 1:
        raise ConfigError(f"eval.num_prompts={e.num_prompts} must be >= 1 or null (the whole held-out split)")
    if e.greedy and e.samples_per_problem > 1:
        raise ConfigError(f"eval.greedy=true with eval.samples_per_problem={e.samples_per_problem} gives k identical "
                          "samples; set eval.greedy=false (or null: greedy only for k=1)")
    if e.temperature is not None and e.temperature <= 0:
        raise ConfigError(f"eval.temperature={e.temperature} must be > 0 or null (= rollout.temperature)")
    if not (0 < e.top_p <= 1):
        raise ConfigError(f"eval.top_p={e.top_p} must be in (0, 1]")
    if e.every < 0 or e.val_size < 0:
        raise ConfigError(f"eval.every={e.every} and eval.val_size={e.val_size} must be >= 0")
    if e.val_size and cfg.data.val_path:
        raise ConfigError(f"eval.val_size={e.val_size} and data.val_path={cfg.data.val_path!r} both define the held-in "
                          "set; keep one (set eval.val_size=0 or data.val_path=null)")
    if e.every and not (e.val_size or cfg.data.val_path):
        raise ConfigError(f"eval.every={e.every} needs a held-in set: eval.val_size=<rows carved from the train split> "
                          "or data.val_path=<file>")
    for stage in e.val_stages or ():
        _choice(stage, "eval.val_stages[]", tuple(s for s in STAGES if s != "eval"))


def validate_report(cfg: ReportConfig | DictConfig) -> None:
    """Range checks for `selfdistill-report`'s `report.*` keys."""
    if not cfg.drift_threshold >= 0:
        raise ConfigError(f"report.drift_threshold={cfg.drift_threshold} must be >= 0")
    if cfg.bootstrap_samples < 100:
        raise ConfigError(f"report.bootstrap_samples={cfg.bootstrap_samples} must be >= 100 for a usable interval")
    if not (0 < cfg.confidence < 1):
        raise ConfigError(f"report.confidence={cfg.confidence} must be in (0, 1), e.g. 0.95")


def _validate_distillation(cfg: Config | DictConfig) -> None:
    """algo.name against the stages that run, and the self-distillation keys (SPEC section 6)."""
    a, d = cfg.algo, cfg.algo.distill
    _choice(a.name, "algo.name", ALGOS)
    _choice(d.loss, "algo.distill.loss", DISTILL_LOSSES)
    _choice(d.teacher, "algo.distill.teacher", TEACHERS)
    _choice(a.sdft.mode, "algo.sdft.mode", SDFT_MODES)
    stages = list(cfg.trainer.stages)
    others = [s for s in ("grpo", "sdpo", "sdft") if s != a.name and s in stages]
    if others:
        raise ConfigError(f"algo.name={a.name} (algo={a.name}) trains in the {a.name} stage, but trainer.stages={stages} "
                          f"has {others[0]}: set trainer.stages to use {a.name} (e.g. [sft, eval, {a.name}, eval]) "
                          f"or choose algo={others[0]}")
    if not 0 <= d.weight <= 1:
        raise ConfigError(f"algo.distill.weight={d.weight} must be in [0, 1] (L = (1 - w) L_policy + w L_distill)")
    if not 0 < d.ema_tau <= 1:
        raise ConfigError(f"algo.distill.ema_tau={d.ema_tau} must be in (0, 1] (0.05 is the default; teacher=frozen is tau = 0)")
    if not d.is_clip > 0:
        raise ConfigError(f"algo.distill.is_clip={d.is_clip} must be > 0 (2.0 is the default)")
    if d.topk < 1:
        raise ConfigError(f"algo.distill.topk={d.topk} must be >= 1 (100 is the default)")
    if not 0 <= d.alpha <= 1:
        raise ConfigError(f"algo.distill.alpha={d.alpha} must be in [0, 1] (0: KL(T||S), 1: KL(S||T), 0.5: JSD)")
    if d.max_teacher_prompt_tokens < 1:
        raise ConfigError(f"algo.distill.max_teacher_prompt_tokens={d.max_teacher_prompt_tokens} must be >= 1")
    for key, slots in (("template", ("{prompt}", "{demonstration}")), ("feedback_template", ("{prompt}", "{feedback}"))):
        text = getattr(d, key)
        missing = [s for s in slots if s not in text]
        if missing:
            raise ConfigError(f"algo.distill.{key}={text!r} lacks {', '.join(missing)}; it must contain {' and '.join(slots)}")
    if a.name == "sdft":
        if d.weight != 1.0:
            raise ConfigError(f"algo.distill.weight={d.weight}: SDFT has no reward, so there is no policy loss to mix; "
                              "keep algo.distill.weight=1.0")
        if a.sdft.mode == "offline" and d.teacher != "frozen":
            raise ConfigError(f"algo.sdft.mode=offline trains on completions the frozen teacher generates; "
                              f"algo.distill.teacher={d.teacher} applies to mode=online only (set it to frozen)")
    s = cfg.sdft
    _choice(s.curriculum, "sdft.curriculum", CURRICULA)
    _choice(s.batching, "sdft.batching", BATCHINGS)
    if s.batching == "three_pass" and s.curriculum == "none":
        raise ConfigError("sdft.batching=three_pass alternates sorted and shuffled passes: it needs sdft.curriculum=demo_length")
    if s.train_pairs is not None and s.train_pairs < 1:
        raise ConfigError(f"sdft.train_pairs={s.train_pairs} must be >= 1 (the first rows of the train split) or null (all)")
    if s.eval_every < 0 or s.eval_prompts < 1:
        raise ConfigError(f"sdft.eval_every={s.eval_every} must be >= 0 and sdft.eval_prompts={s.eval_prompts} >= 1")


def to_container(cfg: Config | DictConfig) -> dict:
    """Plain dict of a config (typed dataclass tree or DictConfig), for loggers and reports."""
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dataclasses.asdict(cfg)
