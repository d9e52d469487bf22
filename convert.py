"""
Every writer, and the conversion command line: a checkpoint or a finetune run written for another
tool. Meta's layout, Hugging Face's layout (tokenizer.json included), finetune runs merged into full
checkpoints or written as PEFT LoRA adapters, GGUF files for llama.cpp, and random-weight
checkpoints of real shapes for trying things offline. checkpoints.py reads them (all but GGUF).

    python convert.py convert Llama-3.2-1B/original Llama-3.2-1B-hf --to hf  # or --to meta
    python convert.py convert Llama-3.2-1B-hf Llama-3.2-1B.gguf --to gguf --gguf_dtype q8_0
    python convert.py export out merged --to hf        # a finetune run merged into its base
    python convert.py export out adapter --to peft     # a LoRA run's adapters, for peft
    python convert.py export out tuned.gguf --to gguf  # a finetune run merged, one GGUF file
    python generate.py --ckpt_dir Llama-3.2-1B-hf --lora adapter --prompt "Hi"  # a PEFT adapter
    python convert.py random tiny_random --shape tiny  # random weights, the real tokenizer

A directory with tokenizer.json alone (no tokenizer.model) works everywhere a checkpoint is read,
and every Hugging Face checkpoint written here has tokenizer.json, tokenizer_config.json and
special_tokens_map.json. GGUF needs the gguf package (pip install gguf), an optional dependency
imported only when a GGUF file is written.
"""

import argparse
import base64
import json
import math
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

import checkpoints
import llama
import speed
from llama import InputError, log


# -----------------------------------------------------------------------------
# Tokenizer files out: tokenizer.json (spelled as checkpoints.read_tokenizer_json reads it),
# tokenizer_config.json and special_tokens_map.json for Hugging Face, tokenizer.model for Meta

def tokenizer_json(tokenizer):
    """tokenizer.json as the hub's Llama 3.x repositories have it (prepending <|begin_of_text|>)."""
    bos = "<|begin_of_text|>"
    template = [{"SpecialToken": {"id": bos, "type_id": 0}},
                {"Sequence": {"id": "A", "type_id": 0}}]
    pair = template + [{"SpecialToken": {"id": bos, "type_id": 1}},
                       {"Sequence": {"id": "B", "type_id": 1}}]
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": s, "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for s, i in tokenizer.special_tokens.items()],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": llama.LLAMA3_SPLIT_PATTERN},
             "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
             "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [
            {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False,
             "use_regex": True},
            {"type": "TemplateProcessing", "single": template, "pair": pair, "special_tokens": {
                bos: {"id": bos, "ids": [tokenizer.bos_id], "tokens": [bos]}}}]},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                    "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None,
                  "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": {checkpoints.token_string(t): r for t, r in tokenizer.ranks.items()},
                  "merges": [f"{checkpoints.token_string(a)} {checkpoints.token_string(b)}"
                             for a, b in checkpoints.bpe_merges(tokenizer.ranks)]},
    }


def special_token(s):
    return {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def tokenizer_config(tokenizer, args):
    """tokenizer_config.json as on the hub, with the class every transformers version reads
    (transformers 5 writes TokenizersBackend, which older versions cannot load).
    clean_up_tokenization_spaces is off (the hub's files say true): decoding must give the text back
    exactly, " ." included."""
    return {"added_tokens_decoder": {str(i): {**special_token(s), "special": True}
                                     for s, i in tokenizer.special_tokens.items()},
            "bos_token": "<|begin_of_text|>", "chat_template": checkpoints.CHAT_TEMPLATE,
            "clean_up_tokenization_spaces": False, "eos_token": "<|end_of_text|>",
            "model_input_names": ["input_ids", "attention_mask"], "model_max_length": args.context,
            "tokenizer_class": "PreTrainedTokenizerFast"}


def write_tokenizer_model(tokenizer, path):
    """tokenizer.model: one "base64(token bytes) rank" line per token, in rank order, as Meta's."""
    lines = (f"{base64.b64encode(t).decode()} {r}\n"
             for t, r in sorted(tokenizer.ranks.items(), key=lambda kv: kv[1]))
    Path(path).write_text("".join(lines))


def copy_tokenizer_model(tokenizer_path, dst):
    """Meta's tokenizer.model at dst: copied, or written from a tokenizer.json's ranks."""
    if Path(tokenizer_path).suffix == ".json":
        write_tokenizer_model(checkpoints.read_tokenizer_json(tokenizer_path), dst)
    else:
        shutil.copyfile(tokenizer_path, dst)


def write_hf_tokenizer(tokenizer, args, out_dir):
    """tokenizer.json, tokenizer_config.json and special_tokens_map.json into out_dir."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_text(
        json.dumps(tokenizer_json(tokenizer), ensure_ascii=False))
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(tokenizer_config(tokenizer, args), indent=2))
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": special_token("<|begin_of_text|>"),
         "eos_token": special_token("<|end_of_text|>")}, indent=2))


# -----------------------------------------------------------------------------
# Writing either layout (atomically: a directory is complete or absent)

def meta_params(args):
    """params.json as Meta writes it. multiple_of / ffn_dim_multiplier must reproduce
    ffn_hidden_dim."""
    multiple_of, multiplier = args.multiple_of, args.ffn_dim_multiplier
    if llama.meta_ffn_hidden_dim(args.dim, multiple_of, multiplier) != args.ffn_hidden_dim:
        # from a Hugging Face config, which stores the width itself: find Meta's two numbers,
        # plainest first
        ratio = args.ffn_hidden_dim / int(2 * 4 * args.dim / 3)
        candidates = [(m, r)
                      for r in (None, round(ratio, 1), round(ratio, 2), round(ratio, 4), ratio)
                      for m in (256, 1024, 4096, 32, 64, 128, 512, 2048)
                      if args.ffn_hidden_dim % m == 0]
        fits = [(m, r) for m, r in candidates
                if llama.meta_ffn_hidden_dim(args.dim, m, r) == args.ffn_hidden_dim]
        if not fits:
            raise InputError(f"FFN width {args.ffn_hidden_dim} cannot be written as Meta's "
                             f"multiple_of/ffn_dim_multiplier")
        multiple_of, multiplier = fits[0]
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads,
              "n_kv_heads": args.n_kv_heads, "vocab_size": args.vocab_size,
              "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
              "use_scaled_rope": args.use_scaled_rope}
    return {k: v for k, v in params.items() if v is not None}


def save_meta_checkpoint(args, state_dict, out_dir, tokenizer_path, n_shards=1):
    """params.json, consolidated.NN.pth (split as Meta splits for model parallelism) and
    tokenizer.model."""
    if args.use_scaled_rope and args.rope_scaling_factor != 8.0:
        log(f"note: params.json cannot record the RoPE scaling factor {args.rope_scaling_factor:g} "
            f"(readers assume 8): pass --rope_scaling_factor {args.rope_scaling_factor:g} when "
            f"loading {out_dir}")
    if "output.weight" not in state_dict:  # Meta's files always carry the output layer, tied or not
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    with llama.atomic_directory(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(meta_params(args), indent=2))
        for rank in range(n_shards):
            shard = {}
            for key, t in state_dict.items():
                dim = llama.meta_shard_dim(key)
                shard[key] = (t if dim is None else t.chunk(n_shards, dim=dim)[rank]).clone()
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
        copy_tokenizer_model(tokenizer_path, tmp / "tokenizer.model")
    log(f"saved {out_dir} (Meta layout, {n_shards} shard(s))")


def hf_config(args):
    """config.json as the Llama 3.x repositories on the Hugging Face hub have it."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads,
           "head_dim": args.head_dim, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
           "rope_theta": args.rope_theta, "max_position_embeddings": args.context,
           "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu",
           "attention_bias": False, "mlp_bias": False, "bos_token_id": 128000,
           "eos_token_id": 128001, "torch_dtype": "bfloat16"}
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                               "low_freq_factor": args.rope_low_freq_factor,
                               "high_freq_factor": args.rope_high_freq_factor,
                               "original_max_position_embeddings": args.rope_original_context}
    return cfg


def hf_tensors(args, state_dict):
    """Meta-named weights -> HF-named ones (q/k rows permuted; a tied output stored once)."""
    names, tensors = checkpoints.hf_names(args.n_layers), {}
    for key, t in state_dict.items():
        if key == "output.weight" and args.tie_embeddings:
            continue
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            n_heads = args.n_heads if key.endswith("wq.weight") else args.n_kv_heads
            t = checkpoints.permute_rows_to_hf(t, n_heads)
        tensors[names[key]] = t.contiguous()
    return tensors


def save_hf_checkpoint(args, state_dict, out_dir, tokenizer_path, max_shard_bytes=5 * 2**30):
    """config.json, generation_config.json, model*.safetensors (sharded past max_shard_bytes, with
    an index), tokenizer.json + tokenizer_config.json + special_tokens_map.json, and Meta's
    tokenizer.model under original/, as the HF hub repositories are laid out.
    tokenizer_path: either tokenizer file."""
    tensors = hf_tensors(args, state_dict)
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with llama.atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(args), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
             "temperature": 0.6, "top_p": 0.9}, indent=2))
        weight_map = {}
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else \
                f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, tmp / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        if len(shards) > 1:
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        write_hf_tokenizer(checkpoints.read_tokenizer(tokenizer_path), args, tmp)
        (tmp / "original").mkdir()
        copy_tokenizer_model(tokenizer_path, tmp / "original" / "tokenizer.model")
    log(f"saved {out_dir} (Hugging Face layout, {len(shards)} safetensors file(s))")


# -----------------------------------------------------------------------------
# PEFT LoRA adapters out: the file layout and the names are checkpoints.py's (its PEFT section)

def save_peft_adapter(model_or_run_dir, out_dir, base_model_name_or_path=None):
    """A model with LoRA modules, or a LoRA finetune run's directory -> a PEFT adapter directory
    (written atomically) that peft's PeftModel.from_pretrained applies to the HF base model."""
    if isinstance(model_or_run_dir, torch.nn.Module):
        args, modules = model_or_run_dir.args, checkpoints.lora_modules(model_or_run_dir)
        pairs = {n: (m.lora_a, m.lora_b) for n, m in modules.items()}
        some = next(iter(modules.values()), None)
        rank, alpha = (some.lora_a.shape[0], some.scale * some.lora_a.shape[0]) if some else (0, 0)
        dropout = some.dropout.p if some else 0.0
    else:
        run_dir = Path(model_or_run_dir)
        run = checkpoints.read_run(run_dir)
        if run["mode"] != "lora":
            why = ("trained norms too, which an adapter cannot hold" if run["mode"] == "lora+norm"
                   else "trained no LoRA adapters")
            raise InputError(f"{run_dir} (mode {run['mode']}) {why}; export it --to hf "
                             f"(a merged model)")
        args = checkpoints.read_args(run["ckpt_dir"])
        saved = load_file(run_dir / "checkpoint" / "trainable.safetensors")
        pairs = {k.removesuffix(".lora_a"): (v, saved[k.removesuffix("_a") + "_b"])
                 for k, v in saved.items() if k.endswith(".lora_a")}
        rank, alpha, dropout = run["lora_rank"], run["lora_alpha"], run["lora_dropout"]
        base_model_name_or_path = base_model_name_or_path or str(run["ckpt_dir"])
    if not pairs:
        raise InputError(f"{model_or_run_dir} has no LoRA adapters to export")
    tensors = {}
    for name, (a, b) in pairs.items():
        key = checkpoints.peft_key(args, name)
        tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous()
        tensors[f"{key}.lora_B.weight"] = (
            checkpoints.permute_lora_b(b.detach().float(), name, args, True).contiguous())
    targets = sorted({checkpoints.PEFT_MODULES[n.rsplit(".", 1)[-1]] for n in pairs})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": alpha,
              "lora_dropout": dropout, "target_modules": targets, "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False,
              "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    with llama.atomic_directory(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2))
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    log(f"saved {out_dir} (PEFT LoRA adapter: r {rank}, alpha {alpha:g}, {', '.join(targets)})")


# -----------------------------------------------------------------------------
# GGUF out: one file holding a Llama 3.x model, its tokenizer and its chat template, for llama.cpp
# (and the tools built on it), written as llama.cpp's convert_hf_to_gguf.py writes a Llama 3
# checkpoint; the gguf package (pip install gguf) is optional, imported only in write_gguf.
# Names and types: llama.cpp's names for our weights. Its converter permutes HF's q_proj/k_proj
# rows back (LlamaModel.permute, the inverse of HF's permutation): a GGUF file holds wq/wk in
# Meta's interleaved layout, which is ours, so our tensors go in unchanged. 1-D tensors (the
# norms, rope_freqs) stay float32 in every file type.

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
    (1 for short wavelengths, the factor for long ones, interpolated between), i.e. llama's
    unscaled frequencies over its scaled ones."""
    return llama.rope_frequencies(replace(args, use_scaled_rope=False)) / \
        llama.rope_frequencies(args)


# -----------------------------------------------------------------------------
# GGUF, writing
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

    plan = {}  # each tensor's GGUF type
    for gname, t in tensors.items():
        q = qtype if t.dim() > 1 else Q.F32
        # rows must be whole blocks; llama.cpp falls back, as we do
        if q == Q.Q8_0 and t.shape[-1] % 32:
            log(f"note: {gname} has rows of {t.shape[-1]}, not a multiple of 32: written as f32")
            q = Q.F32
        plan[gname] = q
    with llama.atomic_file(path) as tmp:
        w = gguf.GGUFWriter(tmp, "llama")
        add_metadata(w, gguf, args, tokenizer, name, ftype)
        for gname, t in tensors.items():
            block, nbytes = gguf.GGML_QUANT_SIZES[plan[gname]]
            w.add_tensor_info(gname, tuple(t.shape), np.dtype(np.float32),
                              t.numel() // block * nbytes, raw_dtype=plan[gname])
        try:
            w.write_header_to_file(tmp)
            w.write_kv_data_to_file()
            w.write_ti_data_to_file()
            for gname, t in tensors.items():
                w.write_tensor_data(tensor_bytes(gguf, t, plan[gname]))
        finally:
            w.close()  # before the file moves into place (or is removed)
    log(f"saved {path} (GGUF, {dtype}, {len(tensors)} tensors)")


def tensor_bytes(gguf, t, q):
    """A tensor as the bytes of GGUF type q (numpy, rows as in torch: the writer reverses dims)."""
    Q = gguf.GGMLQuantizationType
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


# -----------------------------------------------------------------------------
# The command line's two steps: a model's weights as they now are, then one format by name

def state_dict_of(model):
    """A model's weights (Meta's names) and its args, tie_embeddings as the model now has it."""
    tied = model.output.weight is model.tok_embeddings.weight
    args = replace(model.args, tie_embeddings=tied)
    return args, {k: v for k, v in model.state_dict().items()
                  if not (tied and k == "output.weight")}


def save_checkpoint(args, state_dict, out_dir, tokenizer_path, layout, gguf_dtype="bf16"):
    if layout == "gguf":
        tokenizer = checkpoints.read_tokenizer(tokenizer_path)
        return write_gguf(args, state_dict, tokenizer, out_dir, gguf_dtype)
    save = {"meta": save_meta_checkpoint, "hf": save_hf_checkpoint}[layout]
    save(args, state_dict, out_dir, tokenizer_path)


# -----------------------------------------------------------------------------
# Random weights of real shapes (tests, benchmarks, trying things offline: they write gibberish)

SHAPES = {
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden_dim=768, multiple_of=256,
                 tie_embeddings=True),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192,
               multiple_of=256, ffn_dim_multiplier=1.5, tie_embeddings=True),
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192,
               multiple_of=256, ffn_dim_multiplier=1.0, tie_embeddings=True),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336,
               multiple_of=1024, ffn_dim_multiplier=1.3),
}


def random_state_dict(args, seed=0, dtype=torch.bfloat16):
    """std 1/sqrt(dim) keeps activations O(1): greedy outputs are varied and free of near-ties."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in llama.Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            sd[key] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            sd[key] = (torch.randn(shape, generator=g) / math.sqrt(args.dim)).to(dtype)
    if args.tie_embeddings:
        del sd["output.weight"]
    return sd


def bundled_tokenizer():
    """The real Llama 3 tokenizer.model in Meta's llama-models package (a test dependency)."""
    try:
        import llama_models
    except ImportError:
        raise InputError("no tokenizer given and llama-models is not installed; pass --tokenizer "
                         "PATH, or pip install llama-models") from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


# -----------------------------------------------------------------------------
# Command line

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert",
                       help="convert a checkpoint between Meta's and HF's layouts (lossless)")
    c.add_argument("src", help="checkpoint directory in either layout")
    c.add_argument("dst", help="output directory (written atomically; must not be src)")
    c.add_argument("--to", choices=["hf", "meta", "gguf"], required=True,
                   help="the layout to write (gguf: one file for llama.cpp, dst ending in .gguf)")
    c.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="the llama3 RoPE factor of a Meta source, which params.json cannot record "
                        "(32 for 3.2 1B/3B; default: 8, or what config.json says)")
    e = sub.add_parser("export", help="merge a finetune run (LoRA / norms / full) into its base "
                                      "checkpoint, or write its LoRA adapters for peft")
    e.add_argument("run_dir", help="the --out_dir of a finetune run")
    e.add_argument("dst", help="output directory, or file for --to gguf (written atomically)")
    e.add_argument("--to", choices=["hf", "meta", "peft", "gguf"], required=True,
                   help="the layout to write (peft: the adapters alone, for Hugging Face's peft)")
    e.add_argument("--dtype", choices=list(speed.DTYPES), default="bfloat16",
                   help="dtype of the written weights for hf/meta (default bfloat16)")
    for sp in (c, e):
        sp.add_argument("--gguf_dtype", choices=GGUF_DTYPES, default="bf16",
                        help="weights of a GGUF file (default bf16; norms stay f32)")
    r = sub.add_parser("random",
                       help="a random-weight checkpoint of a real shape (writes gibberish)")
    r.add_argument("out_dir", help="output directory")
    r.add_argument("--shape", choices=sorted(SHAPES), default="tiny", help="(default tiny)")
    r.add_argument("--tokenizer", default=None,
                   help="tokenizer.model to copy (default: llama-models')")
    r.add_argument("--seed", type=int, default=0, help="(default 0)")
    a = p.parse_args(argv)
    if a.command == "convert":
        if Path(a.src).resolve().is_relative_to(Path(a.dst).resolve()):  # dst is src or holds it
            raise InputError(f"convert would write {a.dst} over its own source; choose another "
                             f"output directory")
        args, state_dict = checkpoints.load_checkpoint(a.src)
        if a.rope_scaling_factor is not None:
            args = replace(args, rope_scaling_factor=a.rope_scaling_factor)
        save_checkpoint(args, state_dict, a.dst, checkpoints.find_tokenizer(a.src), a.to,
                        a.gguf_dtype)
    elif a.command == "export":
        if a.to == "peft":
            return save_peft_adapter(a.run_dir, a.dst)
        run = checkpoints.read_run(a.run_dir)
        model = llama.build_model(*checkpoints.load_checkpoint(run["ckpt_dir"]), "cpu",
                                  torch.float32)
        model = checkpoints.load_finetuned(model, a.run_dir)
        args, state_dict = state_dict_of(model)
        if a.to != "gguf":  # (GGUF: float32 to write_gguf, which rounds once, to --gguf_dtype)
            dtype = speed.DTYPES[a.dtype]
            state_dict = {k: v.to(dtype) for k, v in state_dict.items()}
        save_checkpoint(args, state_dict, a.dst, checkpoints.find_tokenizer(run["ckpt_dir"]), a.to,
                        a.gguf_dtype)
    else:
        args = llama.ModelArgs(vocab_size=128256, use_scaled_rope=True, **SHAPES[a.shape])
        log(f"writing a random {a.shape}-shaped checkpoint to {a.out_dir}")
        save_meta_checkpoint(args, random_state_dict(args, a.seed), a.out_dir,
                             a.tokenizer or bundled_tokenizer())


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
