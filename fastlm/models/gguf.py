"""GGUF in and out for the GPT-2 architecture: the single-file format llama.cpp runs.

``save_gguf(model, path, dtype, tokenizer)`` writes what llama.cpp's own converter
(``convert_hf_to_gguf.py``) writes for a Hugging Face GPT-2: the ``gpt2`` architecture's
metadata and tensor names, the byte-level BPE vocabulary and merges, the matrices in
``f32``, ``f16``, ``q8_0`` or ``q4_0`` (norms, biases and the position table stay float32, as
the converter keeps them). ``load_gguf(path)`` reads such a file (any of those four types, and
bf16) back into a fastlm ``GPT``; ``load_gguf_tokenizer(path)`` its tokenizer.
``GPT.from_pretrained("model.gguf")`` and ``Tokenizer.load("model.gguf")`` call these.

The container is read and written by the ``gguf`` package (llama.cpp's own Python library;
``pip install gguf``). A file read from disk may be hostile: the reader memory-maps it, and
every count, shape and type is checked against the configuration it declares before any
tensor is copied; unknown tensors, missing ones and shapes that disagree are errors.

Layouts: GGUF lists a tensor's dimensions innermost first; ``gguf`` gives and takes arrays in
row-major order, the order of ``nn.Linear.weight`` (out, in), which is the order llama.cpp's
GPT-2 expects for ``attn_qkv``, ``attn_output``, ``ffn_up`` and ``ffn_down``. A tied output
layer is written as ``token_embd`` alone (llama.cpp then uses it for the output too).
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from .._gguf import MAX_VOCAB, gguf_module as _gguf, is_gguf, reader as _reader, scalar as _scalar
from .._io import CheckpointError
from .config import GPTConfig

__all__ = ["save_gguf", "load_gguf", "load_gguf_tokenizer", "GGUF_TYPES", "is_gguf"]

ARCH = "gpt2"
GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
# fastlm's state-dict names <-> llama.cpp's GPT-2 tensor names (block i)
_BLOCK = {
    "ln_1.weight": "attn_norm.weight", "ln_1.bias": "attn_norm.bias",
    "attn.c_attn.weight": "attn_qkv.weight", "attn.c_attn.bias": "attn_qkv.bias",
    "attn.c_proj.weight": "attn_output.weight", "attn.c_proj.bias": "attn_output.bias",
    "ln_2.weight": "ffn_norm.weight", "ln_2.bias": "ffn_norm.bias",
    "mlp.c_fc.weight": "ffn_up.weight", "mlp.c_fc.bias": "ffn_up.bias",
    "mlp.c_proj.weight": "ffn_down.weight", "mlp.c_proj.bias": "ffn_down.bias",
}
_TOP = {"transformer.wte.weight": "token_embd.weight", "transformer.wpe.weight": "position_embd.weight",
        "transformer.ln_f.weight": "output_norm.weight", "transformer.ln_f.bias": "output_norm.bias",
        "lm_head.weight": "output.weight"}
# limits on what a file may declare before anything is sized by it
MAX_DIM = 1 << 16
MAX_LAYERS = 1024
MAX_CONTEXT = 1 << 22


def _names(n_layer: int) -> dict[str, str]:
    names = dict(_TOP)
    for i in range(n_layer):
        for k, v in _BLOCK.items():
            names[f"transformer.h.{i}.{k}"] = f"blk.{i}.{v}"
    return names


def check_gguf_config(cfg: GPTConfig) -> None:
    """The configurations llama.cpp's GPT-2 runs: LayerNorm with biases, learned positions,
    a GELU MLP, plain multi-head attention, and no switches beyond GPT-2's."""
    bad = []
    if cfg.arch != "gpt":
        bad.append(f"arch={cfg.arch!r}")
    if cfg.norm != "layernorm":
        bad.append(f"norm={cfg.norm!r}")
    if cfg.pos != "learned":
        bad.append(f"pos={cfg.pos!r}")
    if cfg.mlp != "gelu":
        bad.append(f"mlp={cfg.mlp!r}")
    if not cfg.bias:
        bad.append("bias=False")
    if cfg.n_kv_head != cfg.n_head:
        bad.append(f"n_kv_head={cfg.n_kv_head} (grouped-query)")
    if cfg.qk_norm:
        bad.append("qk_norm=True")
    if cfg.logit_softcap is not None:
        bad.append(f"logit_softcap={cfg.logit_softcap!r}")
    if bad:
        raise ValueError("GGUF export covers the GPT-2 architecture (llama.cpp's gpt2); this model has "
                         + ", ".join(bad))


def _tokenizer_fields(tok, vocab_size: int):
    """(tokens, types, merges, special ids) of a byte-level BPE tokenizer, for vocab_size ids;
    ids the tokenizer does not use get a placeholder token of type UNUSED."""
    from ..tokenizer.formats import byte_level_vocab

    gguf = _gguf()
    specials = {i: s for s, i in tok.special_tokens.items()}
    ordinary, pairs = byte_level_vocab(tok)
    tokens, types = [], []
    for i in range(vocab_size):
        if i in specials:
            tokens.append(specials[i])
            types.append(int(gguf.TokenType.CONTROL))
        elif i in ordinary:
            tokens.append(ordinary[i])
            types.append(int(gguf.TokenType.NORMAL))
        else:
            tokens.append(f"[fastlm-unused-{i}]")
            types.append(int(gguf.TokenType.UNUSED))
    merges = [f"{a} {b}" for a, b in pairs]
    return tokens, types, merges


def _blocks(weight: torch.Tensor, dtype: str) -> np.ndarray:
    """A (N, K) weight (K a multiple of 32) as GGUF's q8_0 or q4_0 bytes, (N, K / 32 * block
    bytes): per row, blocks of 32 values along K, each a float16 scale then its values (q8_0:
    32 int8; q4_0: 16 bytes, the low nibble of byte j value j and the high one value j + 16,
    stored + 8). The values are fastlm's own quantizers' (``reference.quantize_q8_0`` /
    ``quantize_q4_0``, the formats of ``decode_linear_q``), so a file fastlm writes holds the
    weights fastlm quantizes to. llama.cpp's quantizer differs only in dividing by the scale
    before its rounding to float16."""
    from .. import reference

    N, K = weight.shape
    nb = K // reference.QUANT_BLOCK
    if dtype == "q8_0":
        q, scales = reference.quantize_q8_0(weight)
        vals = q.view(N, nb, reference.QUANT_BLOCK).numpy().view(np.uint8)
    else:
        u, scales = reference.quantize_q4_0(weight)
        u = u.view(N, nb, reference.QUANT_BLOCK).numpy().astype(np.uint8)
        half = reference.QUANT_BLOCK // 2
        vals = (u[..., :half] & 0xF) | (u[..., half:] << 4)
    d = scales.view(N, nb).numpy().astype(np.float16).view(np.uint8).reshape(N, nb, 2)
    return np.ascontiguousarray(np.concatenate([d, vals], axis=-1).reshape(N, -1))


def save_gguf(model, path, dtype: str = "f32", tokenizer=None, name: str | None = None) -> Path:
    """Write ``model`` (a GPT-2-architecture fastlm ``GPT``) with ``tokenizer`` (a byte-level BPE
    ``Tokenizer``, whose vocabulary llama.cpp needs to load the file) to the GGUF file ``path``;
    the matrices in ``dtype`` ("f32", "f16", "q8_0" or "q4_0"). Written to a temporary name and
    renamed, so ``path`` is never left half-written."""
    gguf = _gguf()
    if dtype not in GGUF_TYPES:
        raise ValueError(f"dtype must be one of {', '.join(GGUF_TYPES)}, got {dtype!r}")
    cfg = model.config
    check_gguf_config(cfg)
    if tokenizer is None:
        raise ValueError("save_gguf needs the tokenizer: llama.cpp loads a GGUF model only with its vocabulary")
    if getattr(tokenizer, "pattern", "gpt2") not in ("gpt2", "r50k_base", "p50k_base"):
        raise ValueError(f"llama.cpp's GPT-2 pre-tokenizer is GPT-2's; this tokenizer splits by "
                         f"{tokenizer.pattern!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0}[dtype]
    qtype = {"f16": gguf.GGMLQuantizationType.F16, "q8_0": gguf.GGMLQuantizationType.Q8_0,
             "q4_0": gguf.GGMLQuantizationType.Q4_0}.get(dtype)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(tmp, ARCH)
    try:
        w.add_name(name or path.stem)
        w.add_context_length(cfg.block_size)
        w.add_embedding_length(cfg.n_embd)
        w.add_feed_forward_length(cfg.hidden_dim)
        w.add_block_count(cfg.n_layer)
        w.add_head_count(cfg.n_head)
        w.add_layer_norm_eps(cfg.layer_norm_epsilon)
        w.add_file_type(ftype)
        tokens, types, merges = _tokenizer_fields(tokenizer, cfg.vocab_size)
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre("gpt-2")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_merges(merges)
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else tokenizer.special_tokens.get("<|endoftext|>")
        bos = cfg.bos_token_id if cfg.bos_token_id is not None else eos
        if eos is not None:
            w.add_eos_token_id(int(eos))
        if bos is not None:
            w.add_bos_token_id(int(bos))
        w.add_add_bos_token(False)
        names = _names(cfg.n_layer)
        sd = model.state_dict()
        for key, t in sd.items():
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue
            if key not in names:
                raise ValueError(f"save_gguf: no GGUF name for {key}")
            a = t.detach().to(torch.float32).cpu().numpy()
            # matrices take the file's type; vectors and the position table stay float32
            if qtype is None or a.ndim != 2 or key == "transformer.wpe.weight" or (
                    qtype != gguf.GGMLQuantizationType.F16 and a.shape[1] % 32):
                w.add_tensor(names[key], np.ascontiguousarray(a))
            elif qtype == gguf.GGMLQuantizationType.F16:
                w.add_tensor(names[key], a.astype(np.float16))
            else:
                q = _blocks(t.detach().float().cpu(), dtype)
                w.add_tensor(names[key], q, raw_shape=q.shape, raw_dtype=qtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(path)
    return path


def _bounded(v, name, lo, hi):
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise CheckpointError(f"GGUF {name} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def gguf_config(reader) -> GPTConfig:
    arch = _scalar(reader, "general.architecture")
    if arch != ARCH:
        raise CheckpointError(f"GGUF architecture {arch!r}: fastlm reads GPT-2 ('gpt2') files")
    n_layer = _bounded(_scalar(reader, f"{ARCH}.block_count"), "block_count", 0, MAX_LAYERS)
    n_embd = _bounded(_scalar(reader, f"{ARCH}.embedding_length"), "embedding_length", 1, MAX_DIM)
    n_head = _bounded(_scalar(reader, f"{ARCH}.attention.head_count"), "head_count", 1, MAX_DIM)
    hidden = _bounded(_scalar(reader, f"{ARCH}.feed_forward_length"), "feed_forward_length", 1, 8 * MAX_DIM)
    ctx = _bounded(_scalar(reader, f"{ARCH}.context_length"), "context_length", 1, MAX_CONTEXT)
    eps = float(_scalar(reader, f"{ARCH}.attention.layer_norm_epsilon"))
    if not (0.0 < eps < 1.0) or not math.isfinite(eps):
        raise CheckpointError(f"GGUF layer_norm_epsilon must be in (0, 1), got {eps}")
    emb = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if emb is None:
        raise CheckpointError("GGUF file has no token_embd.weight")
    vocab = _bounded(int(emb.shape[-1]) if len(emb.shape) == 2 else -1, "vocabulary size", 1, MAX_VOCAB)
    has_out = any(t.name == "output.weight" for t in reader.tensors)
    eos = _scalar(reader, "tokenizer.ggml.eos_token_id", required=False)
    bos = _scalar(reader, "tokenizer.ggml.bos_token_id", required=False)
    try:
        return GPTConfig(vocab_size=vocab, block_size=ctx, n_layer=n_layer, n_head=n_head, n_embd=n_embd,
                         n_inner=hidden, layer_norm_epsilon=eps, tie_word_embeddings=not has_out,
                         eos_token_id=eos if isinstance(eos, int) and 0 <= eos < vocab else None,
                         bos_token_id=bos if isinstance(bos, int) and 0 <= bos < vocab else None)
    except ValueError as e:
        raise CheckpointError(f"GGUF configuration is not a valid GPT: {e}") from None


def load_gguf(cls, path, dtype=None, device=None) -> torch.nn.Module:
    """A fastlm model (``cls(config)``) with the weights of the GPT-2 GGUF file ``path``,
    dequantized to float32 (f16, bf16, q8_0 and q4_0 tensors).

    Every tensor's name, shape and type is checked against the model the header declares,
    built first on the meta device, before any memory is allocated: a model is made only when
    the file holds all of its weights (whose bytes the reader has mapped from the file), so a
    header cannot make fastlm allocate more than the file backs (8 floats per stored byte at
    most, for q4_0)."""
    gguf = _gguf()
    reader = _reader(path)
    cfg = gguf_config(reader)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in cls(cfg).state_dict().items()}
    names = {v: k for k, v in _names(cfg.n_layer).items()}
    want = {k for k in shapes if not (k == "lm_head.weight" and cfg.tie_word_embeddings)}
    readable = {gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16,
                gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.Q4_0}
    found = {}
    for t in reader.tensors:
        key = names.get(t.name)
        if key is None or key not in want:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} for a {cfg.n_layer}-layer GPT-2")
        if key in found:
            raise CheckpointError(f"{path}: tensor {t.name!r} appears twice")
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))  # GGUF lists dimensions innermost first
        if shape != shapes[key]:
            raise CheckpointError(f"{path}: {t.name} has shape {shape}, the configuration needs {shapes[key]}")
        if t.tensor_type not in readable:
            raise CheckpointError(f"{path}: {t.name} is stored as {t.tensor_type.name}; fastlm reads "
                                  "F32, F16, BF16, Q8_0 and Q4_0")
        found[key] = t
    missing = sorted(want - set(found))
    if missing:
        raise CheckpointError(f"{path}: missing tensors for {', '.join(missing[:5])}")
    model = cls(cfg)
    sd = model.state_dict()
    with torch.no_grad():
        for key, t in found.items():
            a = gguf.quants.dequantize(t.data, t.tensor_type) if t.tensor_type != gguf.GGMLQuantizationType.F32 \
                else np.asarray(t.data)
            a = np.array(a, dtype=np.float32).reshape(shapes[key])  # a copy: the reader's map is read-only
            if not np.isfinite(a).all():
                raise CheckpointError(f"{path}: {t.name} holds non-finite values")
            sd[key].copy_(torch.from_numpy(a))
    if dtype is not None:
        model = model.to(dtype)
    if device is not None:
        model = model.to(device)
    return model.eval()


def load_gguf_tokenizer(path):
    """The byte-level BPE tokenizer stored in the GGUF file ``path`` (``Tokenizer.load`` reads
    GGUF files too)."""
    from ..tokenizer import Tokenizer

    return Tokenizer.load(path)
