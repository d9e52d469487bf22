"""
GGUF out: one file holding a Llama 3.x model, its tokenizer and its chat template, for llama.cpp
(and the tools built on it). Written as llama.cpp's convert_hf_to_gguf.py writes a Llama 3
checkpoint; the gguf package (pip install gguf) is an optional dependency, imported only here.
In its own file because checkpoints.py, which the command line goes through, already holds three
other formats.

    python checkpoints.py convert Llama-3.2-1B Llama-3.2-1B-q8_0.gguf --to gguf --gguf_dtype q8_0
    python checkpoints.py export out tuned.gguf --to gguf --gguf_dtype bf16  # a finetune run merged
"""

import math
import os
from pathlib import Path

import numpy as np
import torch

import checkpoints
import llama
from llama import InputError, log

# -----------------------------------------------------------------------------
# Names and types
# llama.cpp's names for our weights. Its converter permutes HF's q_proj/k_proj rows back
# (LlamaModel.permute, the inverse of HF's permutation): a GGUF file holds wq/wk in Meta's
# interleaved layout, which is ours, so our tensors go in unchanged. 1-D tensors (the norms,
# rope_freqs) stay float32 in every file type.

GGUF_NAMES = {"tok_embeddings": "token_embd", "norm": "output_norm", "output": "output",
              "attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate",
              "feed_forward.w3": "ffn_up", "feed_forward.w2": "ffn_down",
              "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}
GGUF_DTYPES = ("f32", "bf16", "q8_0")


def gguf_name(key):
    """Meta name -> llama.cpp name: layers.3.attention.wq.weight -> blk.3.attn_q.weight."""
    stem = key.removesuffix(".weight")
    if stem.startswith("layers."):
        _, i, rest = stem.split(".", 2)
        return f"blk.{i}.{GGUF_NAMES[rest]}.weight"
    return f"{GGUF_NAMES[stem]}.weight"


def rope_freq_factors(args):
    """llama.cpp's rope_freqs tensor for llama3 RoPE scaling: what each frequency is divided by
    (1 for short wavelengths, factor for long ones, interpolated between), computed as its
    converter computes it."""
    head_dim = args.head_dim
    freqs = 1.0 / (args.rope_theta
                   ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    factor, low, high = (args.rope_scaling_factor, args.rope_low_freq_factor,
                         args.rope_high_freq_factor)
    old_ctx = args.rope_original_context
    factors = []
    for freq in freqs.tolist():
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1.0)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return torch.tensor(factors, dtype=torch.float32)


# -----------------------------------------------------------------------------
# Writing
# Tensor infos first, then the data one tensor at a time (each converted just before it is
# written): memory stays near one tensor beyond the state dict. A temporary file replaces path at
# the end: complete or absent.

def write_gguf(args, state_dict, tokenizer, path, dtype="bf16", name="nano-llama3"):
    """Meta-named weights (a tied output omitted or not) + llama.Tokenizer -> a GGUF file at path.
    dtype: f32, bf16 or q8_0 (8-bit blocks of 32 with one f16 scale each) for the matrices."""
    try:
        import gguf
        from gguf import GGMLQuantizationType as Q
    except ImportError:
        raise InputError("writing GGUF needs the gguf package: pip install gguf") from None
    if dtype not in GGUF_DTYPES:
        raise InputError(f"GGUF dtype {dtype!r} is not one of {', '.join(GGUF_DTYPES)}")
    qtype = {"f32": Q.F32, "bf16": Q.BF16, "q8_0": Q.Q8_0}[dtype]
    ftype = {"f32": gguf.LlamaFileType.ALL_F32, "bf16": gguf.LlamaFileType.MOSTLY_BF16,
             "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype]
    tensors = {}
    if args.use_scaled_rope:
        tensors["rope_freqs.weight"] = rope_freq_factors(args)
    for key, t in state_dict.items():
        # tied: llama.cpp reuses token_embd
        if not (key == "output.weight" and args.tie_embeddings):
            tensors[gguf_name(key)] = t

    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    w = gguf.GGUFWriter(tmp, "llama")
    add_metadata(w, gguf, args, tokenizer, name, ftype)
    plan = {}
    for gname, t in tensors.items():
        q = qtype if t.dim() > 1 else Q.F32
        # rows must be whole blocks; llama.cpp falls back, as we do
        if q == Q.Q8_0 and t.shape[-1] % 32:
            log(f"note: {gname} has rows of {t.shape[-1]}, not a multiple of 32: written as f32")
            q = Q.F32
        block, nbytes = gguf.GGML_QUANT_SIZES[q]
        plan[gname] = q
        w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32),
                          t.numel() // block * nbytes, raw_dtype=q)
    try:
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for gname, t in tensors.items():
            w.write_tensor_data(tensor_bytes(gguf, t, plan[gname]))
        w.close()
        os.replace(tmp, path)
    finally:
        w.close()
        tmp.unlink(missing_ok=True)
    log(f"saved {path} (GGUF, {dtype}, {len(tensors)} tensors)")


def tensor_bytes(gguf, t, q):
    """A tensor as the bytes of GGUF type q (numpy, rows as in torch: the writer reverses dims)."""
    from gguf import GGMLQuantizationType as Q

    t = t.detach().cpu().contiguous()
    if q == Q.F32:
        return t.float().numpy()
    if q == Q.BF16:  # torch rounds to nearest even, as ggml does; exact for bf16 weights
        return t.to(torch.bfloat16).view(torch.uint8).numpy()
    return gguf.quants.quantize(t.float().numpy(), q)


def add_metadata(w, gguf, args, tokenizer, name, ftype):
    """The keys llama.cpp's converter writes for a Llama 3 model: shape, RoPE, and the tokenizer
    (GPT-2 style BPE: byte-level token strings, "a b" merges in rank order, pre-tokenizer
    "llama-bpe")."""
    w.add_name(name)
    w.add_vocab_size(args.vocab_size)
    w.add_context_length(args.context)
    w.add_embedding_length(args.dim)
    w.add_block_count(args.n_layers)
    w.add_feed_forward_length(args.ffn_hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_key_length(args.head_dim)
    w.add_value_length(args.head_dim)
    w.add_rope_dimension_count(args.head_dim)
    w.add_file_type(ftype)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)

    ranked = sorted(tokenizer.ranks, key=tokenizer.ranks.get)
    specials = sorted(tokenizer.special_tokens, key=tokenizer.special_tokens.get)
    if len(ranked) + len(specials) != args.vocab_size:
        raise InputError(f"the tokenizer has {len(ranked) + len(specials)} tokens but the model "
                         f"{args.vocab_size}; they are not from the same model")
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([checkpoints.token_string(t) for t in ranked] + specials)
    # every special token, reserved ones included, is "control" (llama.cpp's converter: special
    # added tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(ranked)
                      + [gguf.TokenType.CONTROL] * len(specials))
    w.add_token_merges([f"{checkpoints.token_string(a)} {checkpoints.token_string(b)}"
                        for a, b in checkpoints.bpe_merges(tokenizer.ranks)])
    w.add_bos_token_id(tokenizer.bos_id)
    w.add_eos_token_id(tokenizer.eos_id)
    w.add_eot_token_id(tokenizer.eot_id)
    w.add_eom_token_id(tokenizer.eom_id)
    w.add_add_bos_token(True)  # as the post-processor of tokenizer.json says (and no EOS)
    w.add_add_eos_token(False)
    w.add_chat_template(checkpoints.CHAT_TEMPLATE)
