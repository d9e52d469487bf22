"""
Every reader of a checkpoint beside llama.py: a directory in either layout (Meta's params.json +
consolidated.*.pth, Hugging Face's config.json + *.safetensors), its tokenizer (Meta's
tokenizer.model or Hugging Face's tokenizer.json), finetune runs (a base checkpoint plus what the
run trained) and PEFT LoRA adapters; and the spellings shared with the writers (byte-level token
strings, BPE merges, the chat template). No command line: convert.py writes every format.

    args, state_dict = checkpoints.load_checkpoint("Llama-3.2-1B")  # either layout
    tokenizer = checkpoints.load_tokenizer("Llama-3.2-1B")  # tokenizer.model or tokenizer.json
    model = checkpoints.load_finetuned(model, "out")  # a finetune run or PEFT adapter, merged

A directory with tokenizer.json alone (no tokenizer.model) works everywhere a checkpoint is read.
"""

import base64
import math
from dataclasses import replace
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

import llama
from llama import InputError, log


# -----------------------------------------------------------------------------
# Reading either layout
# Hugging Face's layout: config.json + model.safetensors (or shards listed in
# model.safetensors.index.json). The same tensors under other names, except that HF permutes the
# rows of wq and wk: its rotary code pairs dimension i with i + head_dim/2 ("rotate_half"), where
# Meta pairs 2i with 2i+1 (complex numbers).

HF_REQUIRED = {"hidden_size": int, "intermediate_size": int, "num_hidden_layers": int,
               "num_attention_heads": int, "vocab_size": int, "rms_norm_eps": float}
HF_OPTIONAL = {"num_key_value_heads": int, "head_dim": int, "rope_theta": float,
               "tie_word_embeddings": bool, "max_position_embeddings": int}


META_REQUIRED = {"dim": int, "n_layers": int, "n_heads": int, "vocab_size": int, "multiple_of": int,
                 "norm_eps": float, "rope_theta": float}
META_OPTIONAL = {"n_kv_heads": int, "ffn_dim_multiplier": float, "use_scaled_rope": bool}


def check_types(cfg, required, optional, where):
    """A config's keys and their values' types, before anything reads them: one-line errors."""
    if missing := [k for k in required if k not in cfg]:
        raise InputError(f"{where} is missing required keys {missing}; is the file complete?")
    for key, want in {**required, **optional}.items():
        v = cfg.get(key)  # (an int is a float too; True is no number)
        if v is not None and not (type(v) is want if want is bool else type(v) in (int, float)
                                  and (want is float or float(v).is_integer())):
            raise InputError(f"{where}: '{key}' should be {want.__name__}, got {v!r}; fix the file")


def read_meta_args(d):
    """params.json -> ModelArgs: read once, its keys and types checked first."""
    params, where = llama.read_json(d / "params.json"), str(d / "params.json")
    check_types(params, META_REQUIRED, META_OPTIONAL, where)
    if unknown := sorted(set(params) - set(META_REQUIRED) - set(META_OPTIONAL)):
        log(f"note: {where} has keys this text-only model does not use: {unknown}")
    return llama.args_from_meta_params(params, where)


def args_from_hf_config(cfg, where="config.json"):
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise InputError(f"{where} describes {archs or cfg.get('model_type')}, not a Llama model "
                         f"(LlamaForCausalLM); this code runs Llama 3.x only")
    check_types(cfg, HF_REQUIRED, HF_OPTIONAL, where)
    # transformers 4 writes rope_theta + rope_scaling; transformers 5, both inside rope_parameters
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
        raise InputError(f"{where} has no rope_theta; is the file complete?")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(f"{where}: rope_type {rope_type!r} is not Llama 3's ('llama3' or none)")
    n_heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    if (dim % n_heads or n_heads % n_kv_heads
            or cfg.get("head_dim", dim // n_heads) != dim // n_heads):
        raise InputError(f"{where}: hidden_size {dim}, {n_heads} heads, {n_kv_heads} KV heads and "
                         f"head_dim {cfg.get('head_dim')} do not fit together as in Llama 3")
    scaled = rope_type == "llama3"
    return llama.ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=cfg["vocab_size"], ffn_hidden_dim=cfg["intermediate_size"],
        norm_eps=float(cfg["rms_norm_eps"]), rope_theta=float(rope_theta), use_scaled_rope=scaled,
        rope_scaling_factor=float(rope.get("factor", 8.0)) if scaled else 8.0,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def hf_names(n_layers):
    """Meta name -> HF name, for every weight."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight",
             "norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
    per_layer = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
                 "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
                 "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
                 "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
                 "ffn_norm": "post_attention_layernorm"}
    for i in range(n_layers):
        for meta, hf in per_layer.items():
            names[f"layers.{i}.{meta}.weight"] = f"model.layers.{i}.{hf}.weight"
    return names


def permute_rows_to_hf(w, n_heads):
    # per head, rows (0,1),(2,3),... -> rows (0, h/2),(1, h/2+1),...
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def permute_rows_from_hf(w, n_heads):
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def load_hf_checkpoint(ckpt_dir):
    """config.json + *.safetensors -> (ModelArgs, state_dict in Meta's names), memory-mapped."""
    ckpt_dir = Path(ckpt_dir)
    args = args_from_hf_config(llama.read_json(ckpt_dir / "config.json"),
                               str(ckpt_dir / "config.json"))
    index = ckpt_dir / "model.safetensors.index.json"
    files = ["model.safetensors"]
    if index.exists():
        files = sorted(set((llama.read_json(index).get("weight_map") or {}).values()))
        for f in files:
            if not (ckpt_dir / f).exists():
                raise InputError(f"{index.name} lists {f} but it is not in {ckpt_dir}; "
                                 f"download it again")
    hf_to_meta = {hf: meta for meta, hf in hf_names(args.n_layers).items()}
    state_dict = {}
    log(f"loading {len(files)} safetensors file(s) from {ckpt_dir}")
    for i, f in enumerate(files):
        try:
            # memory-mapped: tensors are read when used
            handle = safe_open(ckpt_dir / f, framework="pt")
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as e:
            raise InputError(f"cannot read {ckpt_dir / f}: {str(e).splitlines()[0]}; the file is "
                             f"truncated or corrupt, download it again") from None
        for name, t in tensors.items():
            if name not in hf_to_meta:
                raise InputError(f"{f} holds '{name}', which is not a Llama weight for this "
                                 f"config.json")
            state_dict[hf_to_meta[name]] = t
        log(f"  mapped {f} ({i + 1}/{len(files)})")
    for key, n_heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
        for i in range(args.n_layers):
            t = state_dict.get(f"layers.{i}.attention.{key}.weight")
            # a wrong shape is left for build_model to name
            if t is not None and t.shape[0] % (2 * n_heads) == 0:
                # in place: the mapping is private copy-on-write, so the file is untouched
                # and no copy stays
                t.copy_(permute_rows_from_hf(t, n_heads))
    if not args.tie_embeddings and "output.weight" not in state_dict:
        raise InputError(f"{ckpt_dir} has no lm_head.weight but config.json says the output is "
                         f"not tied")
    return llama.tie_output(args, state_dict)


def checkpoint_layout(ckpt_dir):
    """-> ("hf", dir) or ("meta", dir) for a checkpoint directory, or a one-line error."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise InputError(f"checkpoint directory {ckpt_dir} does not exist; pass the folder "
                         f"holding the weights")
    safetensors = (any(ckpt_dir.glob("*.safetensors"))
                   or (ckpt_dir / "model.safetensors.index.json").exists())
    if (ckpt_dir / "config.json").exists() and safetensors:
        return "hf", ckpt_dir
    for d in (ckpt_dir, ckpt_dir / "original"):
        if (d / "params.json").exists():
            return "meta", d
    if (ckpt_dir / "config.json").exists():
        raise InputError(f"{ckpt_dir} has config.json but no *.safetensors weights; download them")
    raise InputError(f"{ckpt_dir} holds neither layout: expected params.json + "
                     f"consolidated.*.pth (Meta) or config.json + *.safetensors (Hugging Face)")


def read_args(ckpt_dir):
    """The model's shape from its config alone (no weights): for checks before anything slow."""
    layout, d = checkpoint_layout(ckpt_dir)
    if layout == "hf":
        return args_from_hf_config(llama.read_json(d / "config.json"), str(d / "config.json"))
    return read_meta_args(d)


def load_checkpoint(ckpt_dir):
    """A checkpoint directory in either layout -> (ModelArgs, state_dict in Meta's names). A Meta
    directory, an HF directory, or an HF repository root that also has Meta's files in original/
    (safetensors win)."""
    layout, d = checkpoint_layout(ckpt_dir)
    if layout == "hf" and (d / "original" / "params.json").exists():
        log(f"{d} has both layouts: using the safetensors (HF), not original/ (Meta)")
    if layout == "hf":
        return load_hf_checkpoint(d)
    args, state_dict = llama.load_meta_checkpoint(d, read_meta_args(d))
    return drop_kv_copies(args, state_dict, len(list(d.glob("consolidated.*.pth"))))


def kv_copies(wk, args):
    """How many consecutive files hold the same K/V head (1: none), from layer 0's wk in each file.
    Meta's 405B for 16 ranks says n_kv_heads 16 in params.json: each of its 8 K/V heads is stored
    twice, one per file."""
    copies = 1
    while copies < len(wk) and wk[0].shape[0] == args.head_dim and torch.equal(wk[0], wk[copies]):
        copies += 1
    return copies if len(wk) % copies == 0 else 1


def drop_kv_copies(args, state_dict, n_files):
    """Merged from n_files with each K/V head in `copies` consecutive files -> one of each, checked
    equal (copies that differ mean damaged files): the model it was before it was copied."""
    copies = kv_copies(state_dict["layers.0.attention.wk.weight"].chunk(n_files), args)
    out = dict(state_dict)
    for key, t in state_dict.items():
        if copies > 1 and key.endswith(("wk.weight", "wv.weight")):
            parts = t.chunk(n_files)
            for i in range(0, n_files, copies):
                if not all(torch.equal(parts[i], p) for p in parts[i + 1:i + copies]):
                    raise InputError(f"'{key}': files {i}..{i + copies - 1} should hold copies of "
                                     f"one K/V head but differ; the files are damaged")
            out[key] = torch.cat(parts[::copies])
    return replace(args, n_kv_heads=args.n_kv_heads // copies), out


def find_tokenizer(ckpt_dir):
    """tokenizer.model (Meta's, tiktoken), else tokenizer.json (HF's), in DIR or DIR/original."""
    checkpoint_layout(ckpt_dir)  # a missing or wrong directory is named first
    d = Path(ckpt_dir)
    for path in (d / "tokenizer.model", d / "original" / "tokenizer.model",
                 d / "tokenizer.json", d / "original" / "tokenizer.json"):
        if path.exists():
            return path
    raise InputError(f"no tokenizer.model or tokenizer.json in {d} or {d / 'original'}; "
                     f"copy it from the model's download")


def load_tokenizer(ckpt_dir):
    return read_tokenizer(find_tokenizer(ckpt_dir))


def read_tokenizer(path):
    path = Path(path)
    return read_tokenizer_json(path) if path.suffix == ".json" else read_tokenizer_model(path)


def read_tokenizer_model(path):
    """Meta's tokenizer.model: one "base64(token bytes) rank" pair per line."""
    try:
        ranks = {base64.b64decode(token, validate=True): int(rank) for token, rank in
                 (line.split() for line in Path(path).read_text().splitlines() if line.strip())}
    except (ValueError, UnicodeDecodeError):
        raise InputError(f"{path} is not a Llama 3 tokenizer.model (base64 token and rank per "
                         f"line); use the one that came with the weights") from None
    if len(ranks) < 256 or sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path} is damaged: it needs ranks 0..N-1 covering at least the 256 "
                         f"bytes; use the tokenizer.model that came with the weights")
    return llama.Tokenizer(ranks, Path(path).name)


# -----------------------------------------------------------------------------
# tokenizer.json: Hugging Face's file for the same byte-level BPE, read as plain JSON
# model.vocab maps token strings to ids, each byte spelled as one printable character (GPT-2's
# byte-to-unicode table); model.merges lists the pairs to merge, first listed first. tiktoken
# instead merges the pair whose result has the lowest rank. Llama 3's tokenizer.json was made from
# tokenizer.model by transformers' tiktoken converter: its vocab ids ARE the ranks, and its merges
# are listed in the order of the merged token's id, which makes the two algorithms one
# (test_formats.py checks transformers encodes as tiktoken does). So the ranks are read as the
# vocab ids, after checking that the merges are in id order. The spellings (token_string,
# bpe_merges, CHAT_TEMPLATE) are shared with the writers of tokenizer.json and GGUF.

def byte_to_unicode():
    """GPT-2's table: printable bytes as themselves, the others as chr(256 + n) in byte order."""
    # "!".."~" "¡".."¬" "®".."ÿ"
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    table, n = {}, 0
    for b in range(256):
        table[b] = chr(b) if b in printable else chr(256 + n)
        n += b not in printable
    return table


def token_string(token):
    return "".join(BYTE_TO_UNICODE[b] for b in token)


BYTE_TO_UNICODE = byte_to_unicode()
UNICODE_TO_BYTE = {c: b for b, c in BYTE_TO_UNICODE.items()}


def read_tokenizer_json(path):
    """tokenizer.json -> llama.Tokenizer, or a one-line error when it is not Llama 3's tokenizer."""
    tj = llama.read_json(path)
    model, pre = tj.get("model") or {}, tj.get("pre_tokenizer") or {}
    if (model.get("type") != "BPE" or model.get("byte_fallback")
            or not isinstance(model.get("vocab"), dict)):
        kind = "SentencePiece-style BPE" if model.get("byte_fallback") else model.get("type")
        raise InputError(f"{path} holds a {kind} tokenizer, not Llama 3's byte-level BPE; "
                         f"use the tokenizer of a Llama 3 model")
    steps = pre.get("pretokenizers", [pre])
    regexes = [(s.get("pattern") or {}).get("Regex") for s in steps if s.get("type") == "Split"]
    if (regexes != [llama.LLAMA3_SPLIT_PATTERN]
            or [s.get("type") for s in steps][-1:] != ["ByteLevel"]):
        raise InputError(f"{path}: the pre-tokenizer is not Llama 3's (its split pattern, then "
                         f"bytes); use the tokenizer of a Llama 3 model")
    added = {t["content"]: t["id"] for t in tj.get("added_tokens") or []}
    try:
        ranks = {bytes(UNICODE_TO_BYTE[c] for c in s): i
                 for s, i in model["vocab"].items() if s not in added}
    except KeyError:
        raise InputError(f"{path}: a vocab entry is not in byte-level spelling; the file is not "
                         f"Llama 3's") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise InputError(f"{path}: the vocab ids are not 0..{len(ranks) - 1}; the file is damaged")
    specials = {i: s for s, i in added.items() if i >= len(ranks)}
    if specials != {len(ranks) + i: s for i, s in enumerate(llama.SPECIAL_TOKENS)}:
        raise InputError(f"{path}: the special tokens from id {len(ranks)} on are not Llama 3's "
                         f"256 (<|begin_of_text|> ...); use the tokenizer of a Llama 3 model")
    vocab, last = model["vocab"], -1
    for m in model.get("merges") or []:
        a, b = m.split(" ") if isinstance(m, str) else m  # "a b" (tokenizers < 0.20) or ["a", "b"]
        merged = vocab.get(a + b, -1)
        if merged < last:
            raise InputError(f"{path}: the merges are not in vocab-id order ('{a}' + '{b}'), "
                             f"so the ids are not BPE ranks; this is not a tokenizer.json of "
                             f"Llama 3's kind")
        last = merged
    return llama.Tokenizer(ranks, Path(path).name)


def bpe_merges(ranks):
    """Every pair of tokens that forms a token, in the order of the formed token's rank (ties: by
    the ranks of the two parts), as Hugging Face's tiktoken converter lists them."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        pairs = [(token[:i], token[i:]) for i in range(1, len(token))
                 if token[:i] in ranks and token[i:] in ranks]
        merges += sorted(pairs, key=lambda p: (ranks[p[0]], ranks[p[1]]))
    return merges


# Our chat format (Meta's ChatFormat, llama.Tokenizer.encode_dialog_prompt) as a Jinja template,
# so that transformers' apply_chat_template gives the same tokens. It is Meta-Llama-3-8B-Instruct's
# template without its `| trim` of each message (Meta's code does not strip) and with tool ->
# ipython and <|eom_id|> after an assistant message with stop_reason end_of_message. The 3.1+ hub
# template is not used: it always writes a system header with "Cutting Knowledge Date: December
# 2023 / Today Date: ..." and tool instructions, which Meta's ChatFormat (and so ours) does not.
CHAT_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{%- set role = 'ipython' if message['role'] in ['tool', 'ipython'] else message['role'] %}"
    "{{- '<|start_header_id|>' + role + '<|end_header_id|>\n\n' + message['content'] }}"
    "{%- if message['role'] == 'assistant' and message.get('stop_reason') == 'end_of_message' %}"
    "{{- '<|eom_id|>' }}{%- else %}{{- '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}")


# -----------------------------------------------------------------------------
# Finetune runs: a base checkpoint plus what the run trained (LoRA adapters, norms, or everything)

def read_run(out_dir):
    """The settings a finetune run saved with its checkpoint (checkpoint/run.json)."""
    llama.recover_directory(Path(out_dir) / "checkpoint")
    path = Path(out_dir) / "checkpoint" / "run.json"
    if not path.exists():
        raise InputError(f"{out_dir} holds no finetune checkpoint ({path.name} missing); pass the "
                         f"--out_dir of a finetune run")
    return llama.read_json(path)


def apply_run_lora(model, run):
    """Give a model a finetune run's LoRA modules (if it used LoRA), so its saved weights fit. A run
    started from a PEFT adapter (--lora_init) has that adapter's modules, rank and alpha."""
    if run.get("lora_init") and run["mode"] in ("lora", "lora+norm"):
        return load_peft_adapter(model, run["lora_init"])
    if run["mode"] in ("lora", "lora+norm"):
        llama.apply_lora(model, run["lora_targets"], run["lora_rank"], run["lora_alpha"],
                         run["lora_dropout"])
    return model


def load_trained(model, out_dir):
    """Load the weights a finetune run saved (LoRA adapters, norms or all) into a model like it."""
    path = Path(out_dir) / "checkpoint" / "trainable.safetensors"
    saved, params = load_file(path), dict(model.named_parameters())
    for name, t in saved.items():
        if name not in params or params[name].shape != t.shape:
            raise InputError(f"{path}: '{name}' does not fit this model: a run of another one")
    dcp, into = llama.state_dicts()
    dcp.set_model_state_dict(model, saved, options=into)  # (into FSDP's shards too: each its part)
    return model


def load_training_state(out_dir, model, optimizer):
    """llama.save_training_state's mirror: weights, optimizer and random state exactly as they were
    at the saved step. -> (step, log lines up to it), where llama.train goes on from."""
    state = torch.load(Path(out_dir) / "checkpoint" / "state.pt", weights_only=True)
    load_trained(model, out_dir)
    dcp, into = llama.state_dicts()
    dcp.set_optimizer_state_dict(model, optimizer, state["optimizer"], options=into)
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    log(f"resumed {out_dir} at step {state['step']}")
    return state["step"], (Path(out_dir) / "checkpoint" / "log.jsonl").read_text().splitlines()


def load_finetuned(model, run_dir):
    """A base model with a finetune run's weights merged in (in float32, then back to the model's
    dtype). run_dir: the --out_dir of a finetune run, or a PEFT LoRA adapter directory
    (adapter_config.json)."""
    dtype = model.tok_embeddings.weight.dtype
    if is_peft_adapter(run_dir):
        model, what = load_peft_adapter(model, run_dir), "PEFT LoRA adapter"
    else:
        run = read_run(run_dir)
        model = load_trained(apply_run_lora(model, run), run_dir)
        what = f"{run['mode']} weights (step {run['step']})"
    model = llama.merge_lora(model)
    for p in model.parameters():
        p.data, p.requires_grad = p.data.to(dtype), False
    log(f"applied the {what} of {run_dir}")
    return model


def check_finetuned(run_dir):
    """A finetune run or a PEFT adapter, checked from its settings alone, before loading weights."""
    if is_peft_adapter(run_dir):
        return peft_settings(run_dir)
    return read_run(run_dir)


# -----------------------------------------------------------------------------
# PEFT LoRA adapters (Hugging Face's peft library), read
# adapter_config.json + adapter_model.safetensors, keyed by HF module names:
# base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight (r, in) and .lora_B.weight
# (out, r), the update being (lora_alpha / r) B A, as ours. lora_A reads the input, which HF does
# not permute; lora_B's rows are q_proj/k_proj's output rows, which HF permutes as it does the
# weights: so B is permuted, A is not.

PEFT_MODULES = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                "w2": "down_proj", "w3": "up_proj", "output": "lm_head"}
PEFT_UNSUPPORTED = {"use_dora": "DoRA", "rank_pattern": "per-module ranks",
                    "alpha_pattern": "per-module alphas",
                    "modules_to_save": "modules_to_save", "fan_in_fan_out": "fan_in_fan_out",
                    "lora_bias": "LoRA biases", "target_parameters": "target_parameters"}


def is_peft_adapter(path):
    return (Path(path) / "adapter_config.json").exists()


def peft_settings(adapter_dir):
    """adapter_config.json, checked: a plain LoRA adapter, the only kind our LoRALinear computes."""
    where = Path(adapter_dir) / "adapter_config.json"
    cfg = llama.read_json(where)
    if cfg.get("peft_type") != "LORA":
        raise InputError(f"{where}: peft_type {cfg.get('peft_type')!r} is not LORA; only LoRA "
                         f"adapters apply")
    used = [what for key, what in PEFT_UNSUPPORTED.items() if cfg.get(key)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias {cfg['bias']!r}")
    if used:
        raise InputError(f"{where} uses {', '.join(used)}, which this code does not run; merge the "
                         f"adapter with peft (merge_and_unload) and load the merged model instead")
    if not isinstance(cfg.get("r"), int) or not isinstance(cfg.get("lora_alpha"), (int, float)):
        raise InputError(f"{where} has no integer r and number lora_alpha; is the file complete?")
    check_types(cfg, {}, {"lora_dropout": float}, str(where))
    return cfg


def peft_key(args, module_name):
    """Our module name (layers.0.attention.wq, output) -> peft's key prefix for it."""
    return ("base_model.model."
            + hf_names(args.n_layers)[module_name + ".weight"].removesuffix(".weight"))


def permute_lora_b(t, module_name, args, to_hf):
    """lora_B of wq/wk has the weight's output rows: permuted as HF permutes them."""
    n_heads = {"wq": args.n_heads, "wk": args.n_kv_heads}.get(module_name.rsplit(".", 1)[-1])
    if n_heads is None:
        return t
    return (permute_rows_to_hf if to_hf else permute_rows_from_hf)(t, n_heads)


def lora_modules(model):
    """{our module name: LoRALinear} of a model."""
    names = {id(m): n for n, m in model.named_modules()}
    return {names[id(getattr(module, name))]: getattr(module, name)
            for module, name in llama.projections(model)
            if isinstance(getattr(module, name), llama.LoRALinear)}


def load_peft_adapter(model, adapter_dir):
    """Give our model a PEFT LoRA adapter's modules and weights (unmerged: merge_lora folds them
    in). The adapter's tensors say which modules it adapts (target_modules may be a regular
    expression)."""
    cfg, adapter_dir = peft_settings(adapter_dir), Path(adapter_dir)
    path = adapter_dir / "adapter_model.safetensors"
    if not path.exists():
        raise InputError(f"{adapter_dir} has adapter_config.json but no adapter_model.safetensors; "
                         f"save the adapter with safetensors (peft's default)")
    args, r = model.args, cfg["r"]
    # use_rslora scales by alpha / sqrt(r) instead of alpha / r: the same as alpha * sqrt(r) our way
    alpha = cfg["lora_alpha"] * (math.sqrt(r) if cfg.get("use_rslora") else 1)
    ours = {}
    for meta in hf_names(args.n_layers):
        module = meta.removesuffix(".weight")
        if module.rsplit(".", 1)[-1] in PEFT_MODULES:
            ours[peft_key(args, module)] = module
    saved, pairs = load_file(path), {}
    for key, t in saved.items():
        prefix, _, leaf = key.rpartition(".lora_")
        if key.endswith(".base_layer.weight"):
            # peft's copy of a base weight (lm_head as a target): the same as our base model's
            continue
        if prefix not in ours or leaf not in ("A.weight", "B.weight"):
            raise InputError(f"{path}: '{key}' is not a LoRA weight of a projection of this model "
                             f"(q/k/v/o, gate/up/down, lm_head); is the adapter for another model?")
        pairs.setdefault(ours[prefix], {})[leaf[0]] = t
    targets = sorted({n.rsplit(".", 1)[-1] for n in pairs})
    llama.apply_lora(model, targets, r, alpha, cfg.get("lora_dropout", 0.0))
    for name, module in lora_modules(model).items():
        ab = pairs.get(name)
        if ab is None:  # a layer the adapter leaves alone: B = 0, the base layer's output
            module.lora_b.data.zero_()
            continue
        if set(ab) != {"A", "B"}:
            raise InputError(f"{path}: {name} has lora_{''.join(ab)} only; the file is incomplete")
        for p, t in ((module.lora_a, ab["A"]), (module.lora_b, ab["B"])):
            if p.shape != t.shape:
                raise InputError(f"{path}: {name} has a LoRA weight of shape {tuple(t.shape)}, not "
                                 f"{tuple(p.shape)}; the adapter is for another model or rank")
        module.lora_a.data = ab["A"].float().to(module.lora_a.device)
        module.lora_b.data = (
            permute_lora_b(ab["B"].float(), name, args, False).to(module.lora_b.device))
    return model


