"""FSDP2 engine: `fully_shard` on every decoder layer, then on the root (gloo on CPU, NCCL on GPU).

Each decoder layer is its own FSDP group: all-gathered just before it runs, freed after forward,
gathered again for backward, its gradients reduce-scattered as soon as they are ready. The root
group holds the rest: embeddings, final norm and the LM head (tied or not). FSDP2 keeps the root
gathered from forward to backward, which is what lets `completion_logprobs` hand the LM-head weight
to the fused log-prob op after the model's forward.

`engine.mixed_precision=bf16` -> MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32
sharded master weights and optimizer moments, bf16 all-gathers and compute, fp32 reduce-scatter.

Checkpoints: weights are consolidated on rank 0 (`get_model_state_dict(full_state_dict=True,
cpu_offload=True)`) for the HF directory; the optimizer is saved sharded, one file per rank, with
torch.distributed.checkpoint under `<checkpoint>/optimizer/` (resharded on load, so a resume may
even change the world size).
"""

from __future__ import annotations

import contextlib
import os

import torch

from selfdistill.engine.base import MIXED_PRECISION, Engine, ensure_process_group
from selfdistill.rollout.lockstep import generation_lockstep


class FSDP2Engine(Engine):
    name = "fsdp2"

    def __init__(self, cfg):
        ensure_process_group(cfg)
        super().__init__(cfg)
        self._layers: list = []

    def wrap(self, model):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        self._prepare(model)
        model = model.to(self.device)
        self._broadcast_from_rank0(model)  # ranks seed differently: start every shard from rank 0's init
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        dtype = MIXED_PRECISION[self.cfg.engine.mixed_precision]
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32 if dtype is not None else None)
        self._layers = decoder_layers(model)
        for layer in self._layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)
        self.model = model
        return model

    def setup_optimizer(self, stage):
        # The optimizer must hold the sharded parameters (DTensors); after a forward with no
        # backward (an eval stage) the root group is still registered unsharded.
        self.model.reshard()
        return super().setup_optimizer(stage)

    def no_sync(self):
        return _gradient_sync_off(self.model)

    @contextlib.contextmanager
    def generation_context(self):
        """Gather every group once for the whole rollout phase, free them after.

        Without the gather, each forward all-gathers every layer again (tokens x layers
        collectives), so the ranks must run the same number of forwards: the decode loop keeps
        them in lockstep (`selfdistill.rollout.lockstep`; a rank that is done joins its peers'
        forwards until every rank is done). With it, the full model is resident during
        generation: roughly one extra copy of the weights in `param_dtype` per rank.
        `engine.gather_for_generation=false` chooses the former."""
        if not self.cfg.engine.gather_for_generation:
            try:
                with generation_lockstep():
                    yield
            finally:
                self.model.reshard()  # the root stays gathered after a forward that has no backward
            return
        modules = [self.model, *self._layers]  # root first: it is the one FSDP initializes as root
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)
        for handle in [m.unshard(async_op=True) for m in modules]:
            handle.wait()
        try:
            yield
        finally:
            for m in modules:
                m.reshard()
            for m in self._layers:
                m.set_reshard_after_forward(True, recurse=False)
            self.model.set_reshard_after_forward(False, recurse=False)  # FSDP2's default for the root

    # -- the guarded step ----------------------------------------------------------------------
    def grad_norm(self) -> torch.Tensor:
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if not grads:
            return torch.zeros((), device=self.device)
        total = torch.nn.utils.get_total_norm(grads)
        # Partial sums over this rank's shards -> the global norm (clipping then scales the shards).
        return total.full_tensor() if isinstance(total, DTensor) else total

    def _named_local_grads(self):
        # After backward the gradients are reduce-scattered: each rank checks its own shard, so a
        # non-finite value is reported by the rank that owns that slice of the tensor.
        for n, p in self.model.named_parameters():
            if p.grad is not None:
                yield n, p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad

    # -- checkpoint state ----------------------------------------------------------------------
    def full_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        for key, source in _tied_keys(self.model).items():  # gathered as two tensors: save the tie once
            if source in state:
                state.pop(key, None)
        return state

    def load_model_weights(self, ckpt_dir: str) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        from selfdistill import checkpoint as ckpt

        state = {}
        if self.is_main:  # rank 0 reads the files once and broadcasts shard by shard
            state = ckpt.read_model_weights(ckpt_dir)
            for key, source in _tied_keys(self.model).items():
                if key not in state and source in state:
                    state[key] = state[source]
        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
        self._restore_dir = ckpt_dir

    def optimizer_state_dict(self) -> dict:
        # The moments live in this rank's shards (`save_sharded_state`); rank 0 stores the schedule.
        return {"scheduler": self.scheduler.state_dict(), "sharded_optimizer": bool(self.optimizer.state)}

    def save_sharded_state(self, ckpt_dir: str) -> None:
        if self.optimizer is None or not self.optimizer.state:
            return  # nothing stepped yet: there are no moments to save
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        dcp.save({"optimizer": get_optimizer_state_dict(self.model, self.optimizer)},
                 checkpoint_id=os.path.join(ckpt_dir, "optimizer"))

    def load_optimizer_state_dict(self, state: dict) -> None:
        if state.get("sharded_optimizer"):
            import torch.distributed.checkpoint as dcp
            from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

            path = os.path.join(self._restore_dir or "", "optimizer")
            if not os.path.isdir(path):
                raise FileNotFoundError(f"{path} missing: the checkpoint has no sharded FSDP2 optimizer state")
            # The template (DTensor moments of this rank's shards) is filled in place by dcp.load.
            sd = {"optimizer": get_optimizer_state_dict(self.model, self.optimizer)}
            dcp.load(sd, checkpoint_id=path)
            set_optimizer_state_dict(self.model, self.optimizer, sd["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def frozen_copy(self):
        # FSDP modules cannot be deep-copied: every rank gathers the full weights into a plain model.
        return self._materialize(self.full_parameters())

    def full_parameters(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        # The sharded parameters are the fp32 masters (mixed precision casts only what is gathered for compute).
        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True))


def decoder_layers(model) -> list:
    """The repeated blocks to shard one by one: the model's `_no_split_modules` classes (HF)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} to shard: "
                         f"its _no_split_modules is {sorted(names) or 'empty'}; FSDP2 shards one group per layer")
    return layers


def _tied_keys(model) -> dict[str, str]:
    """{tied key: its source key} when the LM head shares the input embedding (HF `_tied_weights_keys`)."""
    if not getattr(getattr(model, "config", None), "tie_word_embeddings", False):
        return {}
    keys = getattr(model, "_tied_weights_keys", None)
    return dict(keys) if isinstance(keys, dict) else {}


@contextlib.contextmanager
def _gradient_sync_off(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)
