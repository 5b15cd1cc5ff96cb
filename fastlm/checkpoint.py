"""Former home of checkpoint reading and writing, kept so that ``fastlm.checkpoint`` imports
keep working: the Hugging Face layout is now ``fastlm.models.checkpoint``, atomic writes and
bounded readers ``fastlm._io``."""
from ._io import (MAX_JSON_BYTES, CheckpointError, atomic_write_bytes, atomic_write_json, load_tensors, read_json,
                  save_tensors)
from .models import load_model
from .models.checkpoint import (BIN_INDEX_NAME, BIN_NAME, CONFIG_NAME, CONV1D_SUFFIXES, GENERATION_CONFIG_NAME,
                                PIPELINE_CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, config_from_hf, config_to_hf,
                                from_checkpoint_layout, load_gpt, load_state_dict, load_weights,
                                read_pipeline_config, save_gpt, to_checkpoint_layout, write_pipeline_config)

__all__ = ["CheckpointError", "atomic_write_bytes", "atomic_write_json", "save_tensors", "load_tensors", "read_json",
           "MAX_JSON_BYTES", "load_model", "load_gpt", "save_gpt", "load_state_dict", "load_weights",
           "config_from_hf", "config_to_hf", "from_checkpoint_layout", "to_checkpoint_layout",
           "read_pipeline_config", "write_pipeline_config", "CONFIG_NAME", "WEIGHTS_NAME", "WEIGHTS_INDEX_NAME",
           "BIN_NAME", "BIN_INDEX_NAME", "GENERATION_CONFIG_NAME", "PIPELINE_CONFIG_NAME", "CONV1D_SUFFIXES"]
