"""Test-only: lets accelerate shard with FSDP on CPU processes (gloo), which it refuses on its own.

accelerate decides its strategy from the device: on CPUs it reports `MULTI_CPU` and drops an FSDP plugin without a
word. Put on `PYTHONPATH` of the processes a test starts, this file (imported by Python at start-up) turns exactly that
decision into `FSDP` with the plugin the run was given; nothing else changes: torch's `fully_shard` runs on a CPU mesh
over gloo, and accelerate's FSDP2 preparation, checkpointing and loading, transformers' Trainer and hf_stack run as on
GPUs. hf_stack itself never imports it (without it, `--fsdp` on CPUs is refused: `StackingTrainer.__init__`).
"""

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_sharding_on_cpus(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP


state.AcceleratorState.__init__ = _init_sharding_on_cpus
