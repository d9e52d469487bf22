"""
nano-llama3: Llama 3.x (3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B) in one file of PyTorch.

Read it top to bottom:
  1. config       - the model's shape, from Meta's params.json
  2. tokenizer    - tiktoken BPE, Llama 3's split pattern, 256 special tokens, the chat format
  3. model        - RMSNorm, RoPE with llama3 scaling, grouped-query attention, SwiGLU, a KV cache
  4. checkpoints  - Meta's consolidated.*.pth shards, memory-mapped into a model built on "meta"
  5. generation   - Meta's sampling loop (greedy, temperature/top-p/top-k), batched, streaming, chat
  6. LoRA         - low-rank adapters and RMSNorm tuning, merged losslessly into the base weights
  7. finetuning   - packed documents with BOS-aware masking; the loop, with exact resume and DDP

By default the arithmetic is Meta's, op for op, so the output is token-exact with Meta's reference
implementation (reference.py runs it; test_llama.py compares). Everything optional (other
checkpoint layouts, fast paths, quantization, several processes) lives in the files beside this
one, applied by swapping modules in where a model is assembled."""

import codecs
import json
import math
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace

import tiktoken
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

class InputError(ValueError):
    """Bad user input (files, shapes, settings); the message names the problem and the fix."""

def log(msg):  # progress, to stderr; under torchrun only the first process (rank 0) speaks
    if os.environ.get("RANK", "0") == "0":
        print(msg, file=sys.stderr, flush=True)

# -----------------------------------------------------------------------------
# 1. Config
# One frozen dataclass describes every Llama 3.x text model. The fields follow Meta's params.json;
# the RoPE scaling fields are explicit because Meta's code hard-codes them.

@dataclass(frozen=True)
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads: grouped-query attention, each K/V head serves several query heads
    vocab_size: int
    ffn_hidden_dim: int  # SwiGLU width, from multiple_of / ffn_dim_multiplier in params.json
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1+ stretch the low RoPE frequencies to reach 128k context ("llama3" scaling).
    # params.json says only use_scaled_rope, and Meta's reference hard-codes factor 8: right for 3.1
    # and 3.3, but Llama 3.2 1B/3B were trained with factor 32 (their HF config.json says so).
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_embeddings: bool = False  # Llama 3.2 1B/3B share the output matrix with the embedding
    max_seq_len: int = 2048  # the longest sequence this run will process (a runtime choice)
    multiple_of: int = 256  # kept only to write params.json back as Meta does
    ffn_dim_multiplier: float | None = None
    fused_attention: bool = False  # SDPA kernels (flash attention on GPUs): faster, not bit-exact

    @property
    def head_dim(self):
        return self.dim // self.n_heads

    @property
    def context(self):
        return 131072 if self.use_scaled_rope else 8192  # what the model was trained for

def meta_ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    # 2/3 of 4*dim (SwiGLU has three matrices: keep the parameter count of a 4*dim MLP), times an
    # optional multiplier, rounded up to a multiple of multiple_of
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)

def args_from_meta_params(params, where="params.json"):  # Meta's keys, numbers of the right type
    dim, n_heads = int(params["dim"]), int(params["n_heads"])
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    if dim % n_heads or n_heads % n_kv_heads:
        raise InputError(f"{where}: dim ({dim}) must divide by n_heads ({n_heads}) "
                         f"and n_heads by n_kv_heads ({n_kv_heads})")
    multiple_of, multiplier = int(params["multiple_of"]), params.get("ffn_dim_multiplier")
    return ModelArgs(
        dim=dim, n_layers=int(params["n_layers"]), n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=int(params["vocab_size"]), norm_eps=float(params["norm_eps"]),
        rope_theta=float(params["rope_theta"]), use_scaled_rope=bool(params.get("use_scaled_rope")),
        ffn_hidden_dim=meta_ffn_hidden_dim(dim, multiple_of, multiplier),
        multiple_of=multiple_of, ffn_dim_multiplier=multiplier)

# -----------------------------------------------------------------------------
# 2. Tokenizer
# Byte-level BPE (tiktoken) over 128,000 ranks, then 256 special tokens. User text is always plain
# text: "<|eot_id|>" typed by a user is 9 ordinary tokens, so nobody can forge a turn boundary.

SPECIAL_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>", "<|image|>"]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>"
                   for i in range(2, 256 - len(SPECIAL_TOKENS) + 2)]

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken panics on much longer inputs
MAX_NO_WHITESPACES_CHARS = 25_000  # and is quadratic on long runs of (non-)whitespace: split them
ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython",
         "ipython": "ipython"}

class Tokenizer:
    def __init__(self, ranks, name="llama3"):
        """ranks: {token bytes: rank} of the 128,000 byte-level BPE tokens (tokenizer.model)."""
        self.ranks = ranks
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=name, pat_str=LLAMA3_SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(SPECIAL_TOKENS)
        ids = self.special_tokens
        self.bos_id, self.eos_id = ids["<|begin_of_text|>"], ids["<|end_of_text|>"]
        self.eot_id, self.eom_id = ids["<|eot_id|>"], ids["<|eom_id|>"]
        self.pad_id = ids["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s, bos=False, eos=False):
        assert isinstance(s, str), f"encode takes a str, got {type(s).__name__}"
        ids = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            chunk = s[i:i + TIKTOKEN_MAX_ENCODE_CHARS]
            for piece in split_long_runs(chunk, MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=(): special-token strings in the text are encoded as plain text
                ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.model.decode(list(ids))

    def stream_decoder(self):  # .decode(bytes) holds back a split character; final=True flushes it
        return codecs.getincrementaldecoder("utf-8")(errors="replace")

    # The chat format of the instruct models: <|begin_of_text|>, then per message
    # <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, and an open assistant header
    # to answer in. An assistant message that called a tool ends with <|eom_id|> (the tool answers).
    def encode_header(self, role):
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(ROLES[role])
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n"))

    def encode_message(self, message):  # -> (header, content with its <|eot_id|> or <|eom_id|>)
        eom = message["role"] == "assistant" and message.get("stop_reason") == "end_of_message"
        end = self.eom_id if eom else self.eot_id
        return self.encode_header(message["role"]), self.encode(message["content"]) + [end]

    def encode_dialog_prompt(self, messages, where="dialog"):  # for the assistant's next message
        return self.encode_dialog(messages, where)[0] + self.encode_header("assistant")

    def encode_dialog(self, messages, where="dialog"):
        """(tokens, train_on): the conversation, and which tokens carry loss in finetuning: the
        assistant's words and its closing <|eot_id|>/<|eom_id|>; never headers, system or user."""
        check_dialog(messages, where)
        tokens, train_on = [self.bos_id], [False]
        for m in messages:
            header, body = self.encode_message(m)
            tokens += header + body
            train_on += [False] * len(header) + [m["role"] == "assistant"] * len(body)
        return tokens, train_on

def check_dialog(messages, where="dialog"):
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: a dialog is a non-empty list of "
                         f"{{\"role\": ..., \"content\": ...}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            got = m.get("role") if isinstance(m, dict) else m
            raise InputError(f"{where}, message {i}: role must be one of {', '.join(ROLES)}, "
                             f"got {got!r}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}, message {i}: content must be a string, "
                             f"got {type(m.get('content')).__name__}")

def split_long_runs(s, max_len):
    """Split s so that no piece has a run of over max_len (non-)whitespace chars, as Meta does."""
    run_len, run_is_space, start = 0, (s[0].isspace() if s else False), 0
    for i, ch in enumerate(s):
        if ch.isspace() != run_is_space:
            run_len, run_is_space = 1, ch.isspace()
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]

# -----------------------------------------------------------------------------
# 3. Model
# A decoder-only transformer: pre-norm blocks of attention then SwiGLU, each added to the residual
# stream. The arithmetic follows Meta's reference op for op (float32 norms, RoPE and softmax), which
# is what makes the outputs token-exact. The KV cache exists only while generating.

class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in float32 even for bf16 activations (Meta's ops), then scale in the model dtype
        x32 = x.float()
        return ((x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
                * self.weight)

def rope_frequencies(args):
    """The rotation speed of each pair of head dimensions, with Llama 3.1's long-context scaling."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2).float() / args.head_dim))
    if not args.use_scaled_rope:
        return freqs
    # llama3 scaling: wavelengths longer than the original context are slowed down by `factor`,
    # short ones are kept, and the band between is interpolated smoothly
    factor, low, high, old_ctx = (args.rope_scaling_factor, args.rope_low_freq_factor,
                                  args.rope_high_freq_factor, args.rope_original_context)
    wavelen = 2 * math.pi / freqs
    new_freqs = torch.where(wavelen > old_ctx / low, freqs / factor, freqs)
    smooth = (old_ctx / wavelen - low) / (high - low)
    in_band = (wavelen >= old_ctx / high) & (wavelen <= old_ctx / low)
    return torch.where(in_band, (1 - smooth) * new_freqs / factor + smooth * new_freqs, new_freqs)

def precompute_freqs_cis(args, device=None):
    freqs = rope_frequencies(args).to(device)
    angles = torch.outer(torch.arange(args.max_seq_len, device=device, dtype=torch.float32), freqs)
    # (max_seq_len, head_dim // 2) complex numbers e^(i * pos * freq)
    return torch.polar(torch.ones_like(angles), angles)

def apply_rope(x, freqs_cis):
    # x: (B, T, heads, head_dim). Meta's layout: dimensions (0,1), (2,3), ... are (real, imag)
    # pairs. (Hugging Face permutes the rows of wq/wk so that pairs are (i, i + head_dim/2); undone
    # on load.) freqs_cis: (T, head_dim // 2), or (B, T, head_dim // 2) when positions differ by row
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, heads, hd // 2)
    return torch.view_as_real(xc * freqs_cis[..., None, :]).flatten(3).type_as(x)

class KVCache:
    """One layer's keys and values so far, (B, max_len, n_kv_heads, head_dim) as Meta's: the same
    strides give the same matmul kernels, so bit-identical float32 results."""
    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos, k, v):  # k, v: (B, T, n_kv_heads, head_dim)
        end = start_pos + k.shape[1]
        self.k[:, start_pos:end] = k
        self.v[:, start_pos:end] = v
        return self.k[:, :end], self.v[:, :end]

class Attention(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.wq = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.wk = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wv = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.wo = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.fused = args.fused_attention
        self.cache = None  # a KVCache while generating

    def forward(self, x, freqs_cis, start_pos, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_heads, self.head_dim)
        k = self.wk(x).view(B, T, self.n_kv_heads, self.head_dim)
        v = self.wv(x).view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, start_pos + T, n_kv_heads, head_dim)
        return self.wo(self.attend(q, k, v, mask).reshape(B, T, -1))

    def attend(self, q, k, v, mask):
        """q: (B, T, heads, head_dim); k, v: (B, S, n_kv_heads, head_dim); mask: (T, S) or
        (B, 1, T, S) booleans, True where a query may attend, or None: causal. -> q's shape"""
        if self.fused:  # without a mask: causal for T > 1, everything for T == 1 (decoding)
            y = F.scaled_dot_product_attention(
                q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                is_causal=mask is None and q.shape[1] > 1,
                enable_gqa=self.n_kv_heads != self.n_heads)
            return y.transpose(1, 2)
        # Meta's attention, op for op and layout for layout: each K/V head repeated for its query
        # heads, explicit scores, an additive -inf mask, float32 softmax
        B, S, n_kv, hd = k.shape
        n_rep, T = self.n_heads // n_kv, q.shape[1]
        k = k[:, :, :, None, :].expand(B, S, n_kv, n_rep, hd).reshape(B, S, n_kv * n_rep, hd)
        v = v[:, :, :, None, :].expand(B, S, n_kv, n_rep, hd).reshape(B, S, n_kv * n_rep, hd)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, hd)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)  # (B, heads, T, S)
        if mask is None and T > 1:
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        if mask is not None:
            scores = scores + torch.zeros(mask.shape, dtype=scores.dtype,
                                          device=q.device).masked_fill(~mask, float("-inf"))
        return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v).transpose(1, 2)

class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))  # SwiGLU

class TransformerBlock(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args.dim, args.ffn_hidden_dim)

    def forward(self, x, freqs_cis, start_pos, mask):
        h = x + self.attention(self.attention_norm(x), freqs_cis, start_pos, mask)
        return h + self.feed_forward(self.ffn_norm(h))

class CrossEntropy(nn.Module):
    """Per-token losses of the output layer's logits: (B, T, dim) final-normed states -> (B, T)."""
    def forward(self, h, output, targets):
        logits = output(h).float().flatten(0, 1)  # (B * T, vocab)
        return F.cross_entropy(logits, targets.flatten(), reduction="none").view(targets.shape)

class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight  # one matrix, used both ways
        self.cross_entropy = CrossEntropy()
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)

    def forward(self, tokens, start_pos=0, mask=None, positions=None, targets=None,
                last_only=False):
        """tokens (B, T) -> float32 logits (B, T or 1 with last_only, vocab), or per-token losses
        (B, T) given targets (nanoGPT's way: DDP wraps the whole step). start_pos > 0 continues the
        sequence in the KV cache; mask (T, S) or (B, 1, T, S): True where a token may attend
        (default causal); positions (B, T): RoPE positions (packed documents restart them)."""
        B, T = tokens.shape
        if mask is None and T > 1 and start_pos > 0:
            # new tokens see the whole cache and each other causally: query i sits at start_pos + i
            mask = torch.ones(T, start_pos + T, dtype=torch.bool,
                              device=tokens.device).tril(start_pos)
        freqs_cis = (self.freqs_cis[start_pos:start_pos + T] if positions is None
                     else self.freqs_cis[positions])
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos, mask)
        h = self.norm(h[:, -1:] if last_only else h)
        if targets is not None:
            return self.cross_entropy(h, self.output, targets)
        return self.output(h).float()

    @contextmanager
    def kv_cache(self, batch_size, max_len):  # for one generation, freed when the block ends
        w = self.tok_embeddings.weight
        for layer in self.layers:  # the layer's own head count: a tensor-parallel shard has fewer
            layer.attention.cache = KVCache(batch_size, max_len, layer.attention.n_kv_heads,
                                            self.args.head_dim, w.dtype, w.device)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.attention.cache = None

# -----------------------------------------------------------------------------
# 4. Checkpoints
# Meta's layout: params.json, consolidated.NN.pth (one per model-parallel rank), tokenizer.model.
# Weights are memory-mapped and assigned into a model built on the meta device: no second copy, so
# peak memory stays near the weights' size. Other layouts are renamed to Meta's keys before this.

def read_json(path):
    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON ({e}); fix or re-download it") from None

def meta_shard_dim(key):
    """The dimension along which Meta's model-parallel shards split a weight (None: replicated)."""
    if key.endswith("norm.weight"):
        return None
    if key.endswith(("attention.wo.weight", "feed_forward.w2.weight")):
        return 1  # row-parallel: split along the input features
    return 0  # column-parallel (wq, wk, wv, w1, w3, output) and the vocab-parallel embedding

def merge_meta_shards(shards):
    merged = {}
    for key in shards[0]:
        if any(key not in s for s in shards):
            raise InputError(f"'{key}' is in consolidated.00.pth but not in every shard; "
                             f"the shards do not belong together")
        dim, parts = meta_shard_dim(key), [s[key] for s in shards]
        merged[key] = parts[0] if dim is None or len(shards) == 1 else torch.cat(parts, dim=dim)
    return merged

def tie_output(args, state_dict):
    """Tied when there is no output matrix, or when it copies the embedding (Meta's 3.2 1B/3B)."""
    output, embedding = state_dict.get("output.weight"), state_dict.get("tok_embeddings.weight")
    tied = output is None or (embedding is not None and output.shape == embedding.shape
                              and torch.equal(output, embedding))
    state_dict = {k: v for k, v in state_dict.items() if not (tied and k == "output.weight")}
    return replace(args, tie_embeddings=tied), state_dict

def load_meta_checkpoint(ckpt_dir, args=None):
    """params.json (or args read from it) + consolidated.*.pth -> (ModelArgs, state_dict in Meta's
    names)."""
    ckpt_dir = Path(ckpt_dir)
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise InputError(f"no consolidated.*.pth in {ckpt_dir}; point --ckpt_dir at a Llama 3 "
                         f"checkpoint directory")
    args = args or args_from_meta_params(read_json(ckpt_dir / "params.json"),
                                         str(ckpt_dir / "params.json"))
    log(f"loading {len(paths)} shard(s) from {ckpt_dir}")
    shards = []
    for i, p in enumerate(paths):
        try:  # weights_only: a checkpoint can never run code; mmap: pages are read when used
            shards.append(torch.load(p, map_location="cpu", weights_only=True, mmap=True))
        except Exception as e:
            raise InputError(f"cannot read {p}: {str(e).splitlines()[0]}; is it whole?") from None
        log(f"  mapped {p.name} ({i + 1}/{len(paths)})")
    return tie_output(args, merge_meta_shards(shards))

def build_model(args, state_dict, device, dtype, shard=None):
    """Weights (Meta's names) assigned into a Transformer built on the meta device: no copy made.
    shard(model), if given, first cuts the empty model down to one process's part of it."""
    with torch.device("meta"):
        model = Transformer(args)
    if shard:
        shard(model)
    if args.tie_embeddings:
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the config: missing {missing[:4]}, "
                         f"unexpected {unexpected[:4]}")
    for key, t in state_dict.items():
        if t.shape != expected[key].shape:
            raise InputError(f"'{key}' has shape {tuple(t.shape)} but the config implies "
                             f"{tuple(expected[key].shape)}; the config and weights are from "
                             f"different models")
    model.load_state_dict({k: t.to(device=device, dtype=dtype) for k, t in state_dict.items()},
                          assign=True, strict=True)
    if args.tie_embeddings:  # assign=True gave each name its own Parameter: tie them again
        model.output.weight = model.tok_embeddings.weight
    model.freqs_cis = precompute_freqs_cis(args, device)
    return model.eval()

@contextmanager
def atomic_directory(out_dir):
    """Write a directory completely or not at all: into a temporary sibling, renamed into place. The
    old one is moved aside first, deleted last; a crash between the renames is undone next time."""
    out_dir = Path(out_dir)
    tmp, old = out_dir.with_name(f".{out_dir.name}.tmp"), out_dir.with_name(f".{out_dir.name}.old")
    recover_directory(out_dir)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out_dir.exists():
        out_dir.rename(old)
    tmp.rename(out_dir)
    shutil.rmtree(old, ignore_errors=True)

@contextmanager
def atomic_file(path):
    """Like atomic_directory, for one file: a reader sees the old file or the new, never a part.
    The temporary name is the process's own: two writing at once each write whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

def recover_directory(out_dir):
    out_dir = Path(out_dir)
    old = out_dir.with_name(f".{out_dir.name}.old")
    if old.exists() and not out_dir.exists():
        old.rename(out_dir)

# -----------------------------------------------------------------------------
# 5. Generation
# Meta's loop, kept exactly: decoding starts at the shortest prompt's length, and positions still
# inside a longer prompt take the prompt's token, not the sample. Same tensors, same order of random
# draws, so a seed gives Meta's tokens; it only stops earlier, once every row is finished.

def sample_top_p(probs, p, generator=None):
    """Nucleus sampling: the smallest set of tokens whose probability reaches p (Meta's code)."""
    probs_sort, probs_idx = torch.sort(probs, dim=-1, descending=True)
    mask = torch.cumsum(probs_sort, dim=-1) - probs_sort > p
    probs_sort[mask] = 0.0
    probs_sort.div_(probs_sort.sum(dim=-1, keepdim=True))
    next_token = torch.multinomial(probs_sort, num_samples=1, generator=generator)
    return torch.gather(probs_idx, -1, next_token)

def sample(logits, temperature, top_p, top_k=0, generator=None):
    """logits (B, vocab) -> next token ids (B,)."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return sample_top_p(torch.softmax(logits / temperature, dim=-1), top_p, generator).reshape(-1)

def check_sampling(temperature, top_p, top_k):
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or int(top_k) != top_k:
        raise InputError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k}")

def check_vocab(tokenizer, args):
    if tokenizer.n_words != args.vocab_size:
        raise InputError(f"tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is "
                         f"{args.vocab_size}; use the tokenizer that came with these weights")

class Llama:
    """Generation: with Meta's arithmetic, bit-identical to Meta's (float32, bf16, sampled too)."""
    def __init__(self, model, tokenizer, max_batch_size=4, seed=1, last_only=False, sampler=sample):
        # last_only: only the last position's logits (Meta computes all); sampler: sample's job
        check_vocab(tokenizer, model.args)
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        self.args, self.last_only, self.sampler = model.args, last_only, sampler
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # as Meta's global seed

    def kv_cache(self, batch_size, max_len):  # the cache one generation runs in
        return self.model.kv_cache(batch_size, max_len)

    def step(self, tokens, start_pos, last_only=False):  # one decoding step's logits
        return self.model(tokens, start_pos, last_only=last_only)

    def check_prompts(self, prompt_tokens, max_gen_len):
        longest = max(map(len, prompt_tokens), default=0)
        if not 1 <= len(prompt_tokens) <= self.max_batch_size:
            raise InputError(f"{len(prompt_tokens)} prompts; give 1 to max_batch_size "
                             f"({self.max_batch_size}) of them, or raise max_batch_size")
        if not 0 < longest < self.args.max_seq_len:
            raise InputError(f"a prompt of {longest} tokens: give each at least BOS, and room "
                             f"for a reply in max_seq_len {self.args.max_seq_len} (raise it)")
        if max_gen_len < 1:
            raise InputError(f"max_gen_len must be at least 1, got {max_gen_len}")

    @torch.inference_mode()
    def generate_steps(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0,
                       logprobs=False):
        """Meta's loop, yielding (tokens (B, total_len), token_logprobs, cur_pos, done) per step."""
        self.check_prompts(prompt_tokens, max_gen_len)
        check_sampling(temperature, top_p, top_k)
        bsz, pad_id = len(prompt_tokens), self.tokenizer.pad_id
        prompt_lens = torch.tensor([len(t) for t in prompt_tokens], device=self.device)
        min_len, max_len = min(len(t) for t in prompt_tokens), max(len(t) for t in prompt_tokens)
        total_len = min(self.args.max_seq_len, max_gen_len + max_len)
        tokens = torch.full((bsz, total_len), pad_id, dtype=torch.long, device=self.device)
        for i, t in enumerate(prompt_tokens):
            tokens[i, :len(t)] = torch.tensor(t, dtype=torch.long)
        in_prompt = tokens != pad_id
        token_logprobs = torch.zeros(tokens.shape, device=self.device) if logprobs else None
        stop_tokens = torch.tensor(self.tokenizer.stop_tokens, device=self.device)
        done = torch.zeros(bsz, dtype=torch.bool, device=self.device)
        last_only = self.last_only and not logprobs
        with self.kv_cache(bsz, total_len):
            prev_pos = 0
            for cur_pos in range(min_len, total_len):
                logits = self.step(tokens[:, prev_pos:cur_pos], prev_pos, last_only=last_only)
                next_token = self.sampler(logits[:, -1], temperature, top_p, top_k,
                                          self.generator)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                if logprobs:
                    token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                        logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1],
                        reduction="none", ignore_index=pad_id)
                generating = ~in_prompt[:, cur_pos]
                done |= generating & (torch.isin(next_token, stop_tokens)
                                      | (cur_pos + 1 - prompt_lens >= max_gen_len))
                yield tokens, token_logprobs, cur_pos, done
                prev_pos = cur_pos
                if done.all():
                    break

    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0,
                 logprobs=False, echo=False):
        """-> (new ids per prompt (with echo: the prompt too), their logprobs or None, the stop
        token that ended each, or None when it ran out of room). Stop tokens are not included."""
        steps = self.generate_steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs)
        for tokens, token_logprobs, _, _ in steps:
            pass
        out, lps, stops = [], [], []
        for i, prompt in enumerate(prompt_tokens):
            new = tokens[i, len(prompt):len(prompt) + max_gen_len].tolist()
            cut = next((j for j, t in enumerate(new) if t in self.tokenizer.stop_tokens), len(new))
            start, end = (0 if echo else len(prompt)), len(prompt) + cut
            out.append(tokens[i, start:end].tolist())
            lps.append(token_logprobs[i, start:end].tolist() if logprobs else None)
            stops.append(new[cut] if cut < len(new) else None)
        return out, (lps if logprobs else None), stops

    def chat_completion(self, dialogs, temperature=0.6, top_p=0.9, top_k=0, max_gen_len=None,
                        logprobs=False):
        """-> [{"generation": {"role": "assistant", "content", "stop_reason"}, "tokens"}]"""
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, f"dialog {i}")
            if dialog[-1]["role"] not in ("user", "tool", "ipython"):
                raise InputError(f"dialog {i} ends with a {dialog[-1]['role']} message; a reply "
                                 f"needs a user (or tool) message last")
        prompt_tokens = [self.tokenizer.encode_dialog_prompt(d) for d in dialogs]
        tokens, lps, stops = self.generate(prompt_tokens, max_gen_len or self.args.max_seq_len - 1,
                                           temperature, top_p, top_k, logprobs)
        reasons = {self.tokenizer.eot_id: "end_of_turn", self.tokenizer.eom_id: "end_of_message",
                   self.tokenizer.eos_id: "end_of_turn", None: "out_of_tokens"}
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(t),
                                "stop_reason": reasons[s]},
                 "tokens": t, **({"logprobs": lp} if logprobs else {})}
                for t, lp, s in zip(tokens, lps or [None] * len(tokens), stops)]

    def text_completion(self, prompts, temperature=0.6, top_p=0.9, top_k=0, max_gen_len=None,
                        logprobs=False, echo=False):
        """Complete each prompt string. -> [{"generation": str, "tokens": [ids], "logprobs"?}]"""
        prompt_tokens = [self.tokenizer.encode(p, bos=True) for p in prompts]
        tokens, lps, _ = self.generate(prompt_tokens, max_gen_len or self.args.max_seq_len - 1,
                                       temperature, top_p, top_k, logprobs, echo)
        return [{"generation": self.tokenizer.decode(t), "tokens": t,
                 **({"logprobs": lp} if logprobs else {})}
                for t, lp in zip(tokens, lps or [None] * len(tokens))]

# -----------------------------------------------------------------------------
# 6. LoRA and RMSNorm tuning
# A frozen weight W gets a trainable low-rank update: y = W x + (alpha / rank) B A x, A (rank, in),
# B (out, rank). B starts at zero, so training starts from the base model exactly; W + (alpha/rank)
# B A merges back in float32. Norm tuning trains the RMSNorm weights: a few thousand numbers.

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")
MODES = ("lora", "norm", "lora+norm", "full")

class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank  # base: any module with in/out_features
        device = next(iter(base.state_dict().values())).device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # float32
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = (self.dropout(x).to(self.lora_a.dtype) @ self.lora_a.t()) @ self.lora_b.t()
        return self.base(x) + (self.scale * update).to(x.dtype)

    def merged(self):
        w = self.base.weight
        merged = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        update = self.scale * (self.lora_b.float() @ self.lora_a.float())
        merged.weight.data = (w.float() + update).to(w.dtype)
        return merged

def check_lora(targets, rank):
    if not targets or set(targets) - set(LORA_TARGETS) or rank < 1:
        raise InputError(f"unknown LoRA target(s) {sorted(set(targets) - set(LORA_TARGETS))} or "
                         f"rank {rank}: choose among {', '.join(LORA_TARGETS)}, rank at least 1")

def projections(model):  # (module, name) of each matrix that LoRA or quantization can replace
    for layer in model.layers:
        yield from ((layer.attention, n) for n in ("wq", "wk", "wv", "wo"))
        yield from ((layer.feed_forward, n) for n in ("w1", "w2", "w3"))
    yield model, "output"

def apply_lora(model, targets, rank, alpha, dropout=0.0):
    check_lora(targets, rank)
    for module, name in projections(model):
        if name in targets:
            setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, dropout))
    return model

def merge_lora(model):  # every adapter folded into its base weight: no LoRA modules left
    for module, name in projections(model):
        if isinstance(getattr(module, name), LoRALinear):
            setattr(module, name, getattr(module, name).merged())
    return model

def set_trainable(model, mode):
    """Frozen weights get no gradient (so no gradient buffers); trained ones are kept in float32."""
    lora, norm = mode in ("lora", "lora+norm"), mode in ("norm", "lora+norm")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or (lora and name.endswith(("lora_a", "lora_b")))
                         or (norm and name.endswith("norm.weight")))
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
    return [p for p in model.parameters() if p.requires_grad]

# -----------------------------------------------------------------------------
# 7. Finetuning
# Training sequences are windows of a stream of documents, <|begin_of_text|> ... <|end_of_text|>.
# Llama 3 was trained so that a token never attends past its own document's BOS: the causal mask is
# block-diagonal and RoPE positions restart at each BOS, so each document is computed exactly as if
# alone (the tests check this). Nothing is learned across a boundary: BOS targets carry no loss.

def document_mask(tokens, bos_id):
    """tokens (B, T) -> RoPE positions (B, T) and "may attend" mask (B, 1, T, T), or (None, None)
    for one document per row: plain causal attention (the fused kernels' fast path)."""
    B, T = tokens.shape
    is_bos = tokens == bos_id
    if not is_bos[:, 1:].any():
        return None, None
    idx = torch.arange(T, device=tokens.device).expand(B, T)
    doc = is_bos.cumsum(1)  # (B, T) document id of each token
    positions = idx - torch.where(is_bos, idx, 0).cummax(1).values  # distance from its doc's BOS
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    return positions, ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]

def token_losses(model, x, y, bos_id, loss_mask=None):
    """Per-token losses (B, T), and which count: never a BOS target; with a mask, the masked-in."""
    positions, mask = document_mask(x, bos_id)
    return model(x, mask=mask, positions=positions, targets=y), token_weights(y, bos_id, loss_mask)

def token_weights(y, bos_id, loss_mask=None):
    return (y != bos_id) if loss_mask is None else (y != bos_id) & loss_mask

def get_batch(data, step, batch_size, seq_len, seed, rank=0, world=1, device="cpu"):
    """One step's (inputs, targets, their loss mask or None), drawn from (seed, step) alone: resume
    needs only the step, and DDP ranks take disjoint slices of the same global batch."""
    tokens, mask = data  # 1-D, longer than seq_len + 1 (and mask None or as long)
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size * world,), generator=g)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    window = torch.stack([torch.from_numpy(tokens[s:s + seq_len + 1].astype("int64"))
                          for s in starts]).to(device)
    loss_mask = None if mask is None else torch.stack(
        [torch.from_numpy(mask[s + 1:s + seq_len + 1].astype(bool)) for s in starts]).to(device)
    return window[:, :-1], window[:, 1:], loss_mask

def cosine_lr(step, lr, warmup, max_steps, min_lr_ratio=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    cos = math.cos(math.pi * min((step - warmup) / max(1, max_steps - warmup), 1.0))
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + cos))

# torch.distributed.checkpoint's state dicts: whole tensors, in one process or gathered from FSDP's
# shards (on rank 0, a layer at a time, into CPU memory); frozen weights left out. And back. Its
# import takes half a second that generation does not need: it is imported where used.
def state_dicts():
    from torch.distributed.checkpoint import state_dict as dcp
    return dcp, dcp.StateDictOptions(full_state_dict=True, strict=False)

def processes():  # (this process's rank, how many) in torch.distributed's group, else (0, 1)
    d = torch.distributed
    return (d.get_rank(), d.get_world_size()) if d.is_initialized() else (0, 1)

def save_training_state(out_dir, model, optimizer, step, run, log_lines):
    """Trained weights, optimizer, step, RNG states, settings and log up to this step, in one
    directory written atomically; log.jsonl beside it is replaced only then: never ahead of it.
    Every process calls it (FSDP gathers the shards); the first one writes."""
    out_dir, names = Path(out_dir), {n for n, p in model.named_parameters() if p.requires_grad}
    dcp, _ = state_dicts()
    whole = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    trained = {n: t.contiguous() for n, t in dcp.get_model_state_dict(model, options=whole)
               .items() if n in names}  # (buffers are left out too)
    optimizer_state = dcp.get_optimizer_state_dict(model, optimizer, options=whole)
    if processes()[0] != 0:
        return
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    with atomic_directory(out_dir / "checkpoint") as tmp:
        save_file(trained, tmp / "trainable.safetensors", metadata={"format": "pt"})
        torch.save({"optimizer": optimizer_state, "step": step,
                    "torch_rng": torch.get_rng_state(), "cuda_rng": cuda_rng}, tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps({**run, "step": step}, indent=2))
        (tmp / "log.jsonl").write_text("".join(line + "\n" for line in log_lines))
    with atomic_file(out_dir / "log.jsonl") as tmp:
        shutil.copyfile(out_dir / "checkpoint" / "log.jsonl", tmp)

@contextmanager
def stop_on_signals():
    """Ctrl-C (SIGINT) and SIGTERM (what schedulers send) only set stop["signal"]: the loop stops
    at the next step boundary and saves, so that a resumed run continues exactly from there."""
    stop = {"signal": None}
    previous = {s: signal.signal(s, lambda signum, _: stop.update(signal=signum))
                for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)

def adamw(model, run):
    """AdamW over the trainable parameters, with weight decay on matrices only, never on norms."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(
        [{"params": [p for p in params if p.dim() >= 2], "weight_decay": run["weight_decay"]},
         {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
        lr=run["lr"], betas=(0.9, 0.95), fused=params[0].device.type == "cuda")

def all_sum(values, device):  # summed over every process (float64)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if processes()[1] > 1:
        torch.distributed.all_reduce(t)
    return t.tolist()

def evaluate(model, batches, bos_id, autocast):
    """The mean loss a token over the batches of every process."""
    model.eval()
    total, count = 0.0, 0.0
    with torch.no_grad(), autocast:
        for x, y, loss_mask in batches:
            losses, weights = token_losses(model, x, y, bos_id, loss_mask)
            total, count = total + (losses * weights).sum().item(), count + weights.sum().item()
    model.train()
    total, count = all_sum([total, count], x.device)
    return total / max(count, 1)

def train_step(train_model, optimizer, batches, bos_id, autocast, grad_clip):
    """One optimizer step over the micro-batches of every process -> (the mean loss a token, the
    gradient norm). A DDP model syncs its gradients after the last micro-batch only."""
    world, device = processes()[1], batches[0][0].device
    # normalise by the tokens of the whole step on all ranks, so that N processes x M micro-batches
    # give exactly the gradient of one big batch (DDP averages over ranks: multiply back by world)
    n_tokens = all_sum([sum(token_weights(y, bos_id, m).sum().item() for _, y, m in batches)],
                       device)[0]
    loss_sum, ddp = 0.0, isinstance(train_model, nn.parallel.DistributedDataParallel)
    for i, (x, y, loss_mask) in enumerate(batches):
        sync = train_model.no_sync() if ddp and i < len(batches) - 1 else torch.enable_grad()
        with autocast, sync:
            losses, w = token_losses(train_model, x, y, bos_id, loss_mask)
            loss = (losses * w).sum()
            (loss * world / n_tokens).backward()
        loss_sum += loss.item()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    grad_norm = nn.utils.clip_grad_norm_(params, grad_clip)  # FSDP's: a DTensor
    grad_norm = getattr(grad_norm, "full_tensor", lambda: grad_norm)().item()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return all_sum([loss_sum], device)[0] / n_tokens, grad_norm

def train(model, optimizer, tokenizer, train_data, val_data, run, out_dir, start=(0, []),
          sample_text=None):
    """Train on (tokens, loss mask) data with run's settings (lr, batch_size, ...: saved with each
    checkpoint in out_dir), from start: (step, log lines), as a saved checkpoint left them.
    -> the signal that stopped it, "stop_at" or None. In several processes the model is whole in
    each (DDP wraps it here) or, with run["fsdp"], already sharded by fully_shard."""
    cfg, (rank, world) = SimpleNamespace(**run), processes()
    device, out_dir = model.tok_embeddings.weight.device, Path(out_dir)
    step, log_lines = start[0], list(start[1])
    # buffers (RoPE, quantized weights) are frozen and alike in every process: never sent
    train_model = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False) \
        if world > 1 and not cfg.fsdp else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    def batch(data, i, seed):  # this process's share of batch i
        return get_batch(data, i, cfg.batch_size, cfg.seq_len, seed, rank, world, device)
    model.train()
    with stop_on_signals() as stop:
        while step < cfg.max_steps:
            t0, lr = time.time(), cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [batch(train_data, step * cfg.grad_accum + i, cfg.seed)
                       for i in range(cfg.grad_accum)]
            loss, grad_norm = train_step(train_model, optimizer, batches, tokenizer.bos_id,
                                         autocast, cfg.grad_clip)
            step, n = step + 1, len(batches) * batches[0][0].numel() * world
            tokens_per_s = n / (time.time() - t0)
            log_lines.append(json.dumps({"step": step, "loss": loss, "lr": lr,
                                         "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}))
            log(f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | "
                f"{tokens_per_s:,.0f} tok/s")
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val_batches = (batch(val_data, i, cfg.seed + 1) for i in range(cfg.eval_batches))
                val_loss = evaluate(model, val_batches, tokenizer.bos_id, autocast)
                log_lines.append(json.dumps({"step": step, "val_loss": val_loss}))
                log(f"step {step} | val loss {val_loss:.4f}")
            if sample_text and cfg.sample_every and step % cfg.sample_every == 0:
                log(f"sample: {sample_text(model)!r}")
            # every rank learns of a signal that reached any of them, and all stop at the same step
            stopping = all_sum([stop["signal"] is not None], device)[0] > 0 or step == cfg.stop_at
            if step % cfg.save_every == 0 or step == cfg.max_steps or stopping:
                save_training_state(out_dir, model, optimizer, step, run, log_lines)
                log(f"saved step {step} to {out_dir / 'checkpoint'}")
            if stopping:
                log(f"stopped at step {step}, saved in {out_dir} to resume from")
                return stop["signal"] or "stop_at"
    return None
