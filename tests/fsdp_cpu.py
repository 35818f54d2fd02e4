"""`python -m core.train ARGS` under accelerate's FSDP2 code path on CPU processes (gloo).

accelerate only picks FSDP when the processes have GPUs. This entry point makes one Accelerator,
switches the shared accelerate state to FSDP2 with the settings of recipes/accelerate/fsdp.yaml,
and runs the training CLI, whose Accelerator then prepares the policy with accelerate's own
fsdp2_prepare_model (decoder blocks as FSDP units, DTensor parameters). Used by
tests/test_distributed.py; launch it with torchrun or `accelerate launch --multi_gpu`.
"""

import os
import sys

import torch

torch.set_num_threads(1)


def main() -> int:
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    Accelerator(cpu=True, mixed_precision=mp)
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                                            reshard_after_forward=True, state_dict_type="FULL_STATE_DICT",
                                            cpu_ram_efficient_loading=False)
    if mp != "no":
        plugin.set_mixed_precision(mp)
    AcceleratorState._shared_state["distributed_type"] = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    from core.train import main as train_main

    return train_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
