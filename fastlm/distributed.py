"""``fastlm.distributed`` moved to ``fastlm.train.distributed``; this name stays importable."""
from .train.distributed import (DistInfo, LossModule, all_reduce_mean, any_rank, barrier, device_for,
                                env_info, full_state, init_from_env, load_full_state, main_process_first, shard,
                                shutdown, wrap)

__all__ = ["DistInfo", "LossModule", "all_reduce_mean", "any_rank", "barrier", "device_for", "env_info", "full_state",
           "init_from_env", "load_full_state", "main_process_first", "shard", "shutdown", "wrap"]
