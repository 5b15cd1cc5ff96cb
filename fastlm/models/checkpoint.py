"""Checkpoints in the Hugging Face directory layout, read safely and written atomically.

A model directory holds ``config.json``, ``model.safetensors`` (or shards listed in
``model.safetensors.index.json``) and ``generation_config.json``. GPT-2 checkpoints from
``transformers`` load directly: their Conv1D weights are stored (in, out) and are transposed
into fastlm's ``nn.Linear`` (out, in) layout; the ``attn.bias``/``attn.masked_bias`` mask
buffers are ignored; keys may carry the ``transformer.`` prefix or not. fastlm writes the
same layout back, so ``transformers.GPT2LMHeadModel.from_pretrained`` loads a GPT-2-shaped
fastlm model. Variants that GPT-2 cannot express (RMSNorm, rotary positions, SwiGLU, GQA,
no biases) are written with ``model_type: "fastlm"`` and the same tensor names.

Nothing is ever unpickled: ``.bin`` files are read only with ``torch.load(weights_only=True)``,
and only on torch 2.6 or later (earlier, a crafted file can get past it: CVE-2025-32434).
Every write is atomic (``fastlm._io``): a crash never leaves a half-written file under the
final name.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..hub import MODEL_FILES, resolve_pretrained
from .._io import CheckpointError, atomic_write_json, load_tensors, read_json, save_tensors
from .config import GPTConfig
from .quant import apply_layout, choose_weights, convert_layout, read_quantization, write_quantization

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
BIN_NAME = "pytorch_model.bin"
BIN_INDEX_NAME = "pytorch_model.bin.index.json"
GENERATION_CONFIG_NAME = "generation_config.json"
PIPELINE_CONFIG_NAME = "pipeline.json"  # a task pipeline's settings (fastlm.pipelines)

# GPT-2 stores these projections as Conv1D, weight (in, out): transposed on load and save.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight",
                   "mlp.c_gate.weight")
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")
SUPPORTED_ACTIVATIONS = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")
# Memory a config may ask for beyond what its weights hold (rotary tables, sized by
# block_size, which no weight pins): at most the weights' own size or this, the larger.
MAX_EXTRA_BYTES = 256 << 20


def write_pipeline_config(directory, config: dict) -> None:
    """Write a task pipeline's settings (``{"task": ..., ...}``) as ``pipeline.json``."""
    atomic_write_json(Path(directory) / PIPELINE_CONFIG_NAME, {"format": "fastlm-pipeline", **config})


def read_pipeline_config(directory) -> dict | None:
    """The settings in ``directory/pipeline.json``, or None when there is none (a plain model)."""
    path = Path(directory) / PIPELINE_CONFIG_NAME
    if not path.is_file():
        return None
    cfg = read_json(path)
    if not isinstance(cfg, dict) or cfg.get("format") != "fastlm-pipeline" or not isinstance(cfg.get("task"), str):
        raise CheckpointError(f"{path} is not a fastlm pipeline config (format 'fastlm-pipeline' with a task)")
    return cfg


# ----------------------------------------------------------------------------- reading
# torch.load(weights_only=True) can be made to run code by a crafted file before torch 2.6
# (CVE-2025-32434).
SAFE_TORCH_LOAD = "2.6"


def _load_bin(path) -> dict:
    from torch.torch_version import TorchVersion

    if TorchVersion(torch.__version__) < SAFE_TORCH_LOAD:
        raise CheckpointError(f"refusing to read {path}: torch {torch.__version__}'s torch.load(weights_only=True) "
                              f"can run code from a crafted file (CVE-2025-32434); install torch>={SAFE_TORCH_LOAD} "
                              "or convert the checkpoint to safetensors")
    try:
        sd = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, refused globals, truncated files
        raise CheckpointError(f"cannot read {path} safely (weights_only=True): {e}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} does not hold a flat dict of tensors")
    return sd


def load_state_dict(directory) -> dict:
    """Every tensor of a checkpoint directory (single file, sharded, safetensors or .bin)."""
    d = Path(directory)
    if d.is_file():
        return load_tensors(d) if d.suffix == ".safetensors" else _load_bin(d)
    if (d / WEIGHTS_NAME).is_file():
        return load_tensors(d / WEIGHTS_NAME)
    for index_name, reader in ((WEIGHTS_INDEX_NAME, load_tensors), (BIN_INDEX_NAME, _load_bin)):
        if (d / index_name).is_file():
            index = read_json(d / index_name)
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{d / index_name} has no weight_map")
            sd = {}
            for shard in sorted(set(weight_map.values())):
                shard_path = (d / shard).resolve()
                if shard_path.parent != d.resolve():
                    raise CheckpointError(f"shard {shard!r} in {index_name} points outside {d}")
                if not shard_path.is_file():
                    raise CheckpointError(f"shard {shard} listed in {index_name} is missing")
                sd.update(reader(shard_path))
            missing = set(weight_map) - set(sd)
            if missing:
                raise CheckpointError(f"tensors listed in {index_name} but absent from the shards: {sorted(missing)[:10]}")
            return sd
    if (d / BIN_NAME).is_file():
        return _load_bin(d / BIN_NAME)
    raise FileNotFoundError(
        f"no weights in {d}: expected {WEIGHTS_NAME}, {WEIGHTS_INDEX_NAME}, {BIN_INDEX_NAME} or {BIN_NAME}"
    )


# ----------------------------------------------------------------------------- config mapping
def config_from_hf(hf: dict):
    """GPTConfig from a config.json written by transformers (GPT-2) or by fastlm."""
    if not isinstance(hf, dict):
        raise CheckpointError("config.json must hold a JSON object")
    if hf.get("model_type") == "fastlm":
        if not isinstance(hf.get("fastlm"), dict):
            raise CheckpointError("config.json has model_type 'fastlm' but no 'fastlm' object")
        try:
            return GPTConfig.from_dict(hf["fastlm"])
        except (TypeError, ValueError) as e:
            raise CheckpointError(f"config.json holds a bad fastlm config: {e}") from None
    if hf.get("model_type") not in (None, "gpt2"):
        raise CheckpointError(f"config.json has model_type {hf.get('model_type')!r}; fastlm reads 'gpt2' and 'fastlm'")
    act = hf.get("activation_function", "gelu_new")
    if act not in SUPPORTED_ACTIVATIONS:
        raise CheckpointError(f"activation_function {act!r} is not supported (supported: {', '.join(SUPPORTED_ACTIVATIONS)})")
    for flag in ("scale_attn_by_inverse_layer_idx", "add_cross_attention"):
        if hf.get(flag):
            raise CheckpointError(f"config.json sets {flag}=true, which fastlm's GPT does not implement")
    if hf.get("scale_attn_weights") is False:
        raise CheckpointError("config.json sets scale_attn_weights=false, which fastlm's GPT does not implement")
    own = hf.get("fastlm") if isinstance(hf.get("fastlm"), dict) else {}
    try:
        return GPTConfig(
            vocab_size=int(hf["vocab_size"]),
            block_size=int(hf.get("n_positions", hf.get("n_ctx", 1024))),
            n_layer=int(hf["n_layer"]),
            n_head=int(hf["n_head"]),
            n_embd=int(hf["n_embd"]),
            n_inner=hf.get("n_inner"),
            dropout=float(hf.get("resid_pdrop", 0.0)),
            layer_norm_epsilon=float(hf.get("layer_norm_epsilon", 1e-5)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
            # how fastlm initialised the weights: GPT-2 has no key for it, fastlm's object keeps it
            zero_init_proj=bool(own.get("zero_init_proj", False)),
            bos_token_id=hf.get("bos_token_id"),
            eos_token_id=hf.get("eos_token_id"),
        )
    except KeyError as e:
        raise CheckpointError(f"config.json lacks the GPT-2 key {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"config.json holds a bad GPT-2 config: {e}") from None


def config_to_hf(cfg) -> dict:
    """config.json for a GPTConfig: GPT-2's keys (transformers reads them), plus fastlm's own."""
    d = {
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.n_embd,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.n_inner,
        "activation_function": "gelu_new",
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_epsilon,
        "initializer_range": cfg.initializer_range,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "fastlm": cfg.to_dict(),
    }
    if cfg.is_gpt2:
        d.update(model_type="gpt2", architectures=["GPT2LMHeadModel"])
    else:
        d.update(model_type="fastlm", architectures=["GPT"])
    return d


# ----------------------------------------------------------------------------- the key map
def _to_model_key(k: str) -> str | None:
    if k.endswith(IGNORED_SUFFIXES):
        return None
    if k.startswith(("lm_head.", "transformer.")):
        return k
    return "transformer." + k


def from_checkpoint_layout(raw: dict) -> dict:
    """A checkpoint's tensors in the model's names and layout: GPT-2's mask buffers dropped,
    the ``transformer.`` prefix added where a checkpoint leaves it out, Conv1D weights
    transposed to ``nn.Linear``'s (out, in)."""
    sd = {}
    for k, v in raw.items():
        mk = _to_model_key(k)
        if mk is None:
            continue
        if mk.endswith(CONV1D_SUFFIXES) and v.dim() == 2:
            v = v.t()
        sd[mk] = v
    return sd


def to_checkpoint_layout(state_dict: dict, tie_word_embeddings: bool) -> dict:
    """A model's tensors as the checkpoint stores them (the inverse of ``from_checkpoint_layout``):
    Conv1D weights (in, out), a tied output layer left out, contiguous CPU copies."""
    tensors = {}
    for k, v in state_dict.items():
        if k == "lm_head.weight" and tie_word_embeddings:
            continue  # tied to transformer.wte.weight
        if k.endswith(CONV1D_SUFFIXES):
            v = v.t()
        tensors[k] = v.detach().cpu().contiguous()
    return tensors


def load_weights(path) -> dict:
    """Every tensor of the checkpoint at ``path``, in the model's names and layout."""
    return from_checkpoint_layout(load_state_dict(path))


# ----------------------------------------------------------------------------- model I/O


def load_gpt(cls, path, dtype=None, device=None, revision=None, weights=None, **overrides):
    """Load the checkpoint at ``path`` into ``cls(config)`` (a model class or factory). ``path``
    is a directory, a GGUF file (``fastlm.models.gguf``), or a Hugging Face repo id (``"gpt2"``),
    found as ``fastlm.hub`` describes.

    A quantized checkpoint (config.json's ``quantization_config``, written by
    ``save_pretrained`` of a quantized model) loads quantized, its packed weights as saved.
    ``weights`` ("fp32", "int8", "int4", "bf16", "fp16"): the format wanted; a float checkpoint
    (or GGUF file) is quantized to it on load, a quantized one must already be in it."""
    if Path(path).suffix.lower() == ".gguf" and Path(path).is_file():
        from .gguf import load_gguf

        if overrides:
            raise ValueError("a GGUF file's configuration is its own: no overrides")
        return choose_weights(load_gguf(cls, Path(path), dtype=dtype, device=device), weights)
    path = resolve_pretrained(path, revision, need=MODEL_FILES)
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{path / CONFIG_NAME} not found: a checkpoint directory needs a config.json")
    hf = read_json(path / CONFIG_NAME)
    cfg = config_from_hf(hf)
    quant = read_quantization(hf)
    if quant is not None and cfg.arch != "gpt":
        raise CheckpointError(f"checkpoint {path}: quantized weights are for the GPT, not arch {cfg.arch!r}")
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise ValueError(f"unknown GPTConfig override {k!r}")
        setattr(cfg, k, v)
    sd = load_weights(path)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    model = _build_fitting(cls, cfg, sd, path, quant)
    if quant is not None:
        sd = convert_layout(quant, sd)
    with torch.no_grad():
        for k, p in model.state_dict().items():
            if k in sd:
                p.copy_(sd[k].to(p.dtype))
    model = choose_weights(model, weights)
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def _build_fitting(cls, cfg, sd: dict, path, quant: dict | None = None):
    """``cls(cfg)``, built only once the config is known to fit the weights ``sd``: the model is
    first built on the meta device (no memory), its tensors' names and shapes compared with
    the weights', and the memory it needs beyond them (buffers no weight backs) bounded, so a
    config.json cannot make fastlm allocate a model its weights do not back."""
    # Building takes time in the number of layers; every layer has weights.
    if cfg.n_layer > len(sd):
        raise CheckpointError(f"checkpoint {path}: config.json asks for {cfg.n_layer} layers and the weights "
                              f"hold only {len(sd)} tensors")
    try:
        with torch.device("meta"):
            shell = cls(cfg)
            if quant is not None:
                apply_layout(shell, quant)
    except (RuntimeError, ValueError, TypeError, OverflowError) as e:
        raise CheckpointError(f"checkpoint {path}: config.json describes no buildable model: {e}") from None
    expected = shell.state_dict()
    if cfg.tie_word_embeddings:
        expected = {k: v for k, v in expected.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    wrong = sorted(f"{k}: checkpoint {tuple(sd[k].shape)}, model {tuple(expected[k].shape)}"
                   for k in set(sd) & set(expected) if sd[k].shape != expected[k].shape)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}{' ...' if len(missing) > 8 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}{' ...' if len(unexpected) > 8 else ''}")
    if wrong:
        problems.append(f"wrongly shaped tensors: {'; '.join(wrong[:8])}")
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit the model in its config.json: " + " | ".join(problems))
    weight_bytes = sum(v.numel() * v.element_size() for v in sd.values())
    named = shell.state_dict(keep_vars=True)
    extra = sum(b.numel() * b.element_size() for n, b in shell.named_buffers() if n not in named)
    if extra > max(weight_bytes, MAX_EXTRA_BYTES):
        raise CheckpointError(f"checkpoint {path}: config.json asks for {extra} bytes of buffers beyond the weights' "
                              f"{weight_bytes} (block_size {cfg.block_size}); at most "
                              f"max(the weights' size, {MAX_EXTRA_BYTES}) is allowed")
    model = cls(cfg)
    return model if quant is None else apply_layout(model, quant)


def _weight_files(path: Path) -> set[str]:
    """The names of the weight files ``path`` holds now: ``model.safetensors`` and the shards
    its index lists (plain names in ``path`` only), plus shards a save left staged there."""
    names = set()
    if (path / WEIGHTS_NAME).is_file():
        names.add(WEIGHTS_NAME)
    if (path / WEIGHTS_INDEX_NAME).is_file():
        try:
            weight_map = read_json(path / WEIGHTS_INDEX_NAME).get("weight_map")
        except (CheckpointError, AttributeError, UnicodeDecodeError):
            weight_map = None
        if isinstance(weight_map, dict):
            names |= {v for v in weight_map.values() if isinstance(v, str) and v == Path(v).name and v not in ("", ".", "..")}
    names |= {p.name for p in path.glob(".model-*.safetensors.new-*")}
    return names


def _write_index(path: Path, names: list[str], shards: list[dict], total: int) -> None:
    weight_map = {k: name for name, shard in zip(names, shards) for k in shard}
    atomic_write_json(path / WEIGHTS_INDEX_NAME, {"metadata": {"total_size": total}, "weight_map": weight_map})


def _link_or_copy(src: Path, dst: Path) -> None:
    """Make ``dst`` hold ``src``'s bytes (a hard link, or a copy where links are not
    supported), replacing ``dst`` in one rename."""
    import shutil

    tmp = dst.with_name(f".{dst.name}.link-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def save_gpt(model, path, max_shard_size: int | None = None, state_dict: dict | None = None) -> None:
    """Write ``model`` (its config, and ``state_dict`` or its own weights) to ``path``.

    Weights already in ``path`` are replaced so that a crash at any moment leaves a folder
    that loads either the old weights or the new ones, never a mix: the new files are written
    beside the old ones under names of their own; one atomic write (``model.safetensors``, or
    the index naming the new shards) switches the folder to them; then the old files are
    removed, and new shards get their usual names by a second index write."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    tensors = to_checkpoint_layout(model.state_dict() if state_dict is None else state_dict,
                                   cfg.tie_word_embeddings)
    meta = {"format": "pt"}
    old = _weight_files(path)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    if max_shard_size is None or total <= max_shard_size:
        # Loaders prefer model.safetensors to an index: writing it is the switch.
        save_tensors(path / WEIGHTS_NAME, tensors, meta)
        for name in old - {WEIGHTS_NAME}:
            (path / name).unlink(missing_ok=True)
        (path / WEIGHTS_INDEX_NAME).unlink(missing_ok=True)
    else:
        shards, cur, size = [], {}, 0
        for k, t in tensors.items():
            n = t.numel() * t.element_size()
            if cur and size + n > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[k], size = t, size + n
        shards.append(cur)
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        staged = [f".{name}.new-{os.getpid()}" for name in names]
        switched = False
        try:
            for name, shard in zip(staged, shards):
                save_tensors(path / name, shard, meta)
            _write_index(path, staged, shards, total)
            (path / WEIGHTS_NAME).unlink(missing_ok=True)
            switched = True  # from here the folder loads the new shards
            for name in old - set(staged):
                (path / name).unlink(missing_ok=True)
            for name, final in zip(staged, names):
                _link_or_copy(path / name, path / final)
            _write_index(path, names, shards, total)
        except BaseException:
            if not switched:
                for name in staged:
                    (path / name).unlink(missing_ok=True)
            raise
        for name in staged:
            (path / name).unlink(missing_ok=True)
    atomic_write_json(path / CONFIG_NAME, {**config_to_hf(cfg), **write_quantization(model)})
    gen = {k: v for k, v in (("bos_token_id", cfg.bos_token_id), ("eos_token_id", cfg.eos_token_id)) if v is not None}
    atomic_write_json(path / GENERATION_CONFIG_NAME, gen)
