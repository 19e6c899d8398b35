"""Engine checks that need a process group, run by tests/test_engines.py as a subprocess.

    torchrun --nproc-per-node 2 tests/dist_helpers.py guarded_step OUT   # every engine, 2 ranks
    python tests/dist_helpers.py world_size_one OUT                      # sharded engines, 1 process
    torchrun --nproc-per-node 2 tests/dist_helpers.py uneven_rows OUT    # ranks with unequal rows
    python tests/dist_helpers.py uneven_rows OUT                         # ... and its 1-process reference
    torchrun --nproc-per-node 2 tests/dist_helpers.py lockstep_generation OUT  # fsdp2 without gathering

Each rank writes OUT/<check>-rank<r>.json; the test reads and asserts on them.
"""

from __future__ import annotations

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from selfdistill.algo.logprobs import completion_logprobs  # noqa: E402
from selfdistill.engine import NonFiniteError, build_engine  # noqa: E402
from selfdistill.models import load_model_and_tokenizer  # noqa: E402
from tests.conftest import compose_config  # noqa: E402

TINY_MODEL = ["model.tiny.hidden_size=64", "model.tiny.num_hidden_layers=2", "model.tiny.num_attention_heads=2",
              "model.tiny.num_key_value_heads=1", "model.tiny.intermediate_size=128", "trainer.device=cpu",
              "sft.warmup_steps=0", "sft.schedule=constant", "sft.lr=1e-2"]
ENGINE_EXTRA = {"deepspeed_zero3": ["engine.deepspeed.zero_optimization.stage3_param_persistence_threshold=0"]}


def make_engine(name: str, on_nonfinite: str = "skip", extra: tuple[str, ...] = ()):
    cfg = compose_config([*TINY_MODEL, f"engine={name}", f"trainer.on_nonfinite={on_nonfinite}", *ENGINE_EXTRA.get(name, []), *extra])
    torch.manual_seed(0)
    engine = build_engine(cfg)
    model, tokenizer = load_model_and_tokenizer(cfg.model)
    engine.wrap(model)
    engine.setup_optimizer(cfg.sft)
    return engine, tokenizer


def global_batch(step: int, rows: int = 4, length: int = 6):
    """A fixed global batch per step (rows x (prompt, completion)); every engine sees the same."""
    g = torch.Generator().manual_seed(1000 + step)
    prompts = torch.randint(6, 60, (rows, 3), generator=g).tolist()
    comps = torch.randint(6, 60, (rows, length), generator=g)
    return prompts, comps, torch.ones_like(comps, dtype=torch.bool)


def loss_on(engine, step: int, poison: bool = False) -> torch.Tensor:
    prompts, comps, mask = global_batch(step)
    k = len(prompts) // engine.world_size
    sl = slice(engine.rank * k, (engine.rank + 1) * k)
    logp, _ = completion_logprobs(engine.model, prompts[sl], comps[sl], mask[sl], pad_id=0)
    loss = -logp.mean()
    return loss * float("nan") if poison else loss


def weights(engine) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().cpu().clone() for k, v in engine.full_state_dict().items()}


def moments(engine) -> list[torch.Tensor]:
    """This rank's AdamW state tensors (the torch AdamW inside DeepSpeed's ZeRO optimizer too)."""
    adamw = getattr(engine.optimizer, "optimizer", engine.optimizer)
    out = []
    for state in adamw.state.values():
        for v in state.values():
            if torch.is_tensor(v):
                out.append((v.to_local() if hasattr(v, "to_local") else v).detach().clone())
    return out


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a if k in b)


def guarded_step(out: str) -> None:
    """Skip: a NaN on the last rank refuses the update everywhere, weights / schedule / moments
    untouched, counted; training then goes on. Raise: every rank raises, naming step and rank."""
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    report = {}
    for name in os.environ.get("ENGINES", "ddp,fsdp2,deepspeed_zero2,deepspeed_zero3").split(","):
        r = {}
        engine, _ = make_engine(name)
        loss = loss_on(engine, 0)
        engine.backward(loss)
        r["first_applied"] = engine.step(float(loss.detach()), 0)[0]
        before, lr_before, moments_before = weights(engine), engine.scheduler.get_last_lr()[0], moments(engine)
        epoch_before = engine.scheduler.last_epoch
        loss = loss_on(engine, 1, poison=rank == world - 1)
        engine.backward(loss)
        applied, _ = engine.step(float(loss.detach()), 1)
        after = weights(engine)
        r.update(skip_applied=applied, skipped_steps=engine.skipped_steps,
                 weights_unchanged=(max_diff(before, after) == 0.0) if engine.is_main else True,
                 moments_unchanged=len(moments_before) > 0 and all(torch.equal(a, b) for a, b in zip(moments_before, moments(engine))),
                 schedule_unchanged=engine.scheduler.last_epoch == epoch_before and engine.scheduler.get_last_lr()[0] == lr_before)
        loss = loss_on(engine, 2)
        engine.backward(loss)
        r["after_skip_applied"] = engine.step(float(loss.detach()), 2)[0]
        latest = weights(engine)  # a collective: every rank calls it
        r["after_skip_changed"] = (max_diff(after, latest) > 0) if engine.is_main else True
        # The frozen reference: an unsharded copy equal to the consolidated weights.
        ref = engine.frozen_copy()
        full = engine.full_state_dict()
        if engine.is_main:
            ref_sd = ref.state_dict()
            r["frozen_copy_diff"] = max(float((ref_sd[k].float().cpu() - v.float()).abs().max()) for k, v in full.items())
            r["frozen_copy_frozen"] = not any(p.requires_grad for p in ref.parameters())
        # Raise: the poisoned step never reaches the optimizer; the message names step and rank.
        engine.cfg.trainer.on_nonfinite = "raise"
        loss = loss_on(engine, 3, poison=rank == world - 1)
        engine.backward(loss)
        try:
            engine.step(float(loss.detach()), 7)
            r["raised"] = None
        except NonFiniteError as e:
            r["raised"] = str(e)
        report[name] = r
        del engine
        dist.barrier()
    with open(os.path.join(out, f"guarded_step-rank{rank}.json"), "w") as f:
        json.dump(report, f, indent=1)
    dist.destroy_process_group()


def world_size_one(out: str) -> None:
    """fsdp2 / deepspeed engines without torchrun (a benchmark's single process): same losses and
    weights as engine=single over three steps; generation under generation_context works."""
    report, reference = {}, None
    for name in ("single", "fsdp2", "deepspeed_zero2", "deepspeed_zero3"):
        engine, tokenizer = make_engine(name)
        losses = []
        for step in range(3):
            loss = loss_on(engine, step)
            engine.backward(loss)
            assert engine.step(float(loss.detach()), step)[0]
            losses.append(float(loss.detach()))
        w = weights(engine)
        with engine.generation_context():
            ids = torch.tensor([[1, 20, 30, 40]])
            gen = engine.unwrapped().generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=5,
                                              do_sample=False, pad_token_id=tokenizer.pad_token_id)
        r = {"losses": losses, "generated": gen[0].tolist(), "world_size": engine.world_size}
        if reference is None:
            reference = (losses, w)
        else:
            r["max_loss_diff"] = max(abs(a - b) for a, b in zip(losses, reference[0]))
            r["max_weight_diff"] = max_diff(reference[1], w)
        report[name] = r
    with open(os.path.join(out, "world_size_one-rank0.json"), "w") as f:
        json.dump(report, f, indent=1)


def uneven_batch():
    """6 rollouts of 3 groups with unequal lengths and fixed per-token advantages."""
    from selfdistill.rollout.base import RolloutBatch

    g = torch.Generator().manual_seed(7)
    lengths = torch.tensor([7, 2, 5, 7, 1, 4])
    mask = torch.arange(7)[None, :] < lengths[:, None]
    batch = RolloutBatch(prompt_ids=torch.randint(6, 60, (6, 3), generator=g).tolist(),
                         completion_ids=torch.randint(6, 60, (6, 7), generator=g), completion_mask=mask,
                         forced_mask=torch.zeros_like(mask), group_ids=torch.arange(3).repeat_interleave(2),
                         with_arm=torch.ones(6, dtype=torch.bool), texts=[""] * 6)
    return batch, torch.randn(6, 7, generator=g)


def uneven_rows(out: str) -> None:
    """One policy update where the ranks hold different numbers of rows (as after zero-std
    filtering): 5 + 1, and 6 + 0 (the empty rank joins with a zero-weight filler row), and 5 + 1 in
    micro-batches of 2 rows (gradient accumulation, unequal micro-batch counts). Rank 0 saves
    the updated weights; without torchrun, engine=single on all 6 rows saves the reference."""
    from selfdistill.algo import grpo

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        import torch.distributed as dist

        dist.init_process_group("gloo")
    engines = os.environ.get("ENGINES", "ddp,fsdp2,deepspeed_zero2,deepspeed_zero3").split(",") if distributed else ["single"]
    batch, adv = uneven_batch()
    for name in engines:
        for loss_type in ("grpo", "dapo"):
            # (rows on rank 0, micro-batch size): 5 + 1 rows in micro-batches of 2 gives rank 0 three
            # micro-batches and rank 1 one, so rank 1 adds two zero-weight passes.
            for first, mbs in (((5, None), (6, None), (5, 2)) if distributed else ((6, None),)):
                engine, tokenizer = make_engine(name)
                engine.cfg.algo.loss_type = loss_type
                keep = torch.arange(6) < first if engine.rank == 0 else torch.arange(6) >= first
                sub, sub_adv = grpo.select_rows(batch, adv, keep)
                filler = grpo.select_rows(batch, adv, torch.arange(6) == 0)[0]
                applied, metrics = grpo.policy_update(engine, sub, sub_adv, tokenizer.pad_token_id, engine.cfg, 0, None, filler,
                                                      micro_batch_size=mbs)
                w = weights(engine)
                if engine.is_main:
                    assert applied == 1, applied
                    tag = f"{first}" if mbs is None else f"{first}-mb{mbs}"
                    torch.save({"weights": w, "grad_norm": metrics["grad_norm"]}, os.path.join(out, f"uneven-{name}-{loss_type}-{tag}.pt"))
                del engine
    if distributed:
        dist.destroy_process_group()


def sharded_reference(out: str) -> None:
    """`engine.shard_reference`: at rest a rank holds ~1/world_size of the reference; inside
    `gathered()` the model is the full reference again; after it the full tensors are released."""
    import torch.distributed as dist

    from selfdistill.engine.reference import ShardedReference

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    engine, tokenizer = make_engine("single" if world == 1 else "ddp")
    full = {k: v.clone() for k, v in engine.unwrapped().state_dict().items()}
    ref = ShardedReference(engine.frozen_copy(), rank, world)
    ids = torch.tensor([[1, 20, 30, 40]])
    with ref.gathered() as model:
        gathered_equal = all(torch.equal(model.state_dict()[k], v) for k, v in full.items())
        logits = model(input_ids=ids).logits
    expected = engine.unwrapped()(input_ids=ids).logits
    total = sum(p.numel() for p in engine.unwrapped().parameters())
    report = {"local_numel": ref.local_numel(), "total_numel": total, "gathered_equal": gathered_equal,
              "logits_equal": bool(torch.equal(logits, expected)),
              "released": all(p.numel() == 0 for p in ref.model.parameters())}
    with open(os.path.join(out, f"sharded_reference-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


def lockstep_generation(out: str) -> None:
    """FSDP2 with engine.gather_for_generation=false: every forward all-gathers the layers, so the
    ranks must run as many forwards. Rank 0 generates 2 rows of at most 3 tokens in one call, rank
    1 five rows of at most 12 tokens in three calls (max_rows_per_call=2), then both a greedy pass:
    nobody hangs, both ranks count the same forwards, and every row equals the same row generated
    by one process from the full (unsharded) model."""
    import torch.distributed as dist

    from selfdistill.rollout import MetaMode
    from selfdistill.rollout.hf import HFRolloutBackend

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    engine, tokenizer = make_engine("fsdp2", extra=("engine.gather_for_generation=false",))
    model = engine.unwrapped()
    forwards = []
    model.register_forward_pre_hook(lambda *_: forwards.append(1))
    questions = ["1+2", "17*3+5"] if rank == 0 else ["9", "100-7*2", "3*(4+5)", "2", "40/8"]
    prompts = [tokenizer(f"<|bos|>Q: {q}\nA: ", add_special_tokens=False)["input_ids"] for q in questions]
    modes = [(MetaMode.ALLOW, MetaMode.BAN, MetaMode.PLACEBO)[i % 3] for i in range(len(prompts))]
    calls = [dict(seeds=[100 * rank + i for i in range(len(prompts))], max_new_tokens=3 if rank == 0 else 12, temperature=1.0,
                  top_p=1.0, max_rows_per_call=2),
             dict(greedy=True, max_new_tokens=2 if rank == 0 else 9, temperature=1.0, top_p=1.0)]
    with engine.generation_context():
        sharded = [HFRolloutBackend(model, tokenizer).generate(prompts, modes, **kw) for kw in calls]
    counted = len(forwards)
    full = engine.frozen_copy()  # a collective: every rank gathers the full weights
    reference = [HFRolloutBackend(full, tokenizer).generate(prompts, modes, **kw) for kw in calls]
    report = {"forwards": counted, "lengths": [b.lengths.tolist() for b in sharded],
              "equal": all(torch.equal(a.completion_ids, b.completion_ids) for a, b in zip(sharded, reference))}
    with open(os.path.join(out, f"lockstep_generation-rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    {"guarded_step": guarded_step, "world_size_one": world_size_one, "uneven_rows": uneven_rows,
     "sharded_reference": sharded_reference, "lockstep_generation": lockstep_generation}[check](out_dir)
