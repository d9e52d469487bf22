"""
nano-llama3: Llama 3.x (3.1 8B/70B/405B, 3.2 1B/3B, 3.3 70B) in one file of PyTorch.

Read it top to bottom:
  1. config        - the model's shape, read from Meta's params.json or HF's config.json
  2. tokenizer     - tiktoken BPE with Llama 3's split pattern and 256 special tokens
  3. model         - RMSNorm, RoPE with llama3 frequency scaling, grouped-query attention, SwiGLU
  4. checkpoints   - load (Meta or Hugging Face layout) and save, memory-mapped, built on the meta device
  5. generation    - Meta's sampling loop (greedy, temperature/top-p/top-k), batched and streaming
  6. LoRA          - low-rank adapters that merge losslessly into the base weights
  7. finetuning    - packed documents with BOS-aware attention masking, and the training loop

Token-exact with Meta's reference implementation (see reference.py and test_llama.py).
"""

import codecs
import json
import math
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


class InputError(ValueError):
    """Bad input from the user (files, shapes, settings). The message names the problem and the fix."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# -----------------------------------------------------------------------------
# 1. Config
# One dataclass describes every Llama 3.x text model. The fields follow Meta's params.json;
# the RoPE scaling fields are explicit because Meta's code hard-codes them.


@dataclass
class ModelArgs:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int  # < n_heads means grouped-query attention: each K/V head serves n_heads // n_kv_heads queries
    vocab_size: int
    ffn_hidden_dim: int  # SwiGLU width, derived from multiple_of / ffn_dim_multiplier in Meta's params.json
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    # Llama 3.1+ stretch the low RoPE frequencies to reach 128k context ("llama3" scaling).
    # Meta's params.json says only use_scaled_rope, and Meta's reference hard-codes factor 8: right for
    # 3.1 and 3.3, but Llama 3.2 1B/3B were trained with factor 32 (their HF config.json says so).
    use_scaled_rope: bool = False
    rope_scaling_factor: float = 8.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    rope_original_context: int = 8192
    tie_embeddings: bool = False  # Llama 3.2 1B/3B share the output matrix with the token embedding
    max_seq_len: int = 2048  # the longest sequence this run will process (a runtime choice, not the checkpoint's)
    # kept only to write params.json back exactly as Meta does
    multiple_of: int = 256
    ffn_dim_multiplier: float | None = None

    @property
    def head_dim(self):
        return self.dim // self.n_heads


META_REQUIRED = {"dim": int, "n_layers": int, "n_heads": int, "vocab_size": int, "multiple_of": int,
                 "norm_eps": float, "rope_theta": float}
META_OPTIONAL = {"n_kv_heads": int, "ffn_dim_multiplier": float, "use_scaled_rope": bool}


def check_types(cfg, types, where):
    for key, want in types.items():
        value = cfg.get(key)
        if value is None:
            continue
        ok = isinstance(value, bool) if want is bool else (
            isinstance(value, (int, float)) and not isinstance(value, bool) and (want is float or float(value).is_integer()))
        if not ok:
            raise InputError(f"{where}: '{key}' should be {want.__name__}, got {value!r}; fix the file")


def meta_ffn_hidden_dim(dim, multiple_of, ffn_dim_multiplier):
    # Meta's rule: 2/3 of 4*dim (SwiGLU has three matrices, keep the parameter count of a 4*dim MLP),
    # times an optional multiplier, rounded up to a multiple of multiple_of.
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def args_from_meta_params(params, where="params.json"):
    missing = [k for k in META_REQUIRED if k not in params]
    if missing:
        raise InputError(f"{where} is missing required keys {missing}; is this a Llama 3 params.json?")
    check_types(params, {**META_REQUIRED, **META_OPTIONAL}, where)
    unknown = sorted(set(params) - set(META_REQUIRED) - set(META_OPTIONAL))
    if unknown:
        log(f"note: {where} has keys this text-only model does not use: {unknown}")
    n_heads = int(params["n_heads"])
    n_kv_heads = int(params.get("n_kv_heads") or n_heads)
    if params["dim"] % n_heads or n_heads % n_kv_heads:
        raise InputError(f"{where}: dim ({params['dim']}) must divide by n_heads ({n_heads}) "
                         f"and n_heads by n_kv_heads ({n_kv_heads})")
    return ModelArgs(
        dim=int(params["dim"]), n_layers=int(params["n_layers"]), n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=int(params["vocab_size"]),
        ffn_hidden_dim=meta_ffn_hidden_dim(params["dim"], params["multiple_of"], params.get("ffn_dim_multiplier")),
        norm_eps=float(params["norm_eps"]), rope_theta=float(params["rope_theta"]),
        use_scaled_rope=bool(params.get("use_scaled_rope", False)),
        multiple_of=int(params["multiple_of"]), ffn_dim_multiplier=params.get("ffn_dim_multiplier"))


# -----------------------------------------------------------------------------
# 2. Tokenizer
# Byte-level BPE (tiktoken) over the 128,000 ranks in tokenizer.model, then 256 special tokens.
# User text is always encoded as plain text: "<|eot_id|>" typed by a user is 9 ordinary tokens,
# so nobody can forge a turn boundary. Special tokens are added only by code, by id.

SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>", "<|step_id|>", "<|start_header_id|>", "<|end_header_id|>",
    "<|eom_id|>",  # end of message: the model wants a tool to run and will continue after
    "<|eot_id|>",  # end of turn
    "<|python_tag|>", "<|image|>",
]
SPECIAL_TOKENS += [f"<|reserved_special_token_{i}|>" for i in range(2, 256 - len(SPECIAL_TOKENS) + 2)]

LLAMA3_SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                        r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TIKTOKEN_MAX_ENCODE_CHARS = 400_000  # tiktoken panics on much longer inputs
MAX_NO_WHITESPACES_CHARS = 25_000  # and is quadratic on very long runs of (non-)whitespace: split them


class Tokenizer:
    def __init__(self, model_path):
        import base64
        import tiktoken

        ranks = {}
        for line in Path(model_path).read_text(encoding="utf-8").splitlines():
            if line.strip():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        self.special_tokens = {tok: len(ranks) + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=Path(model_path).name, pat_str=LLAMA3_SPLIT_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.n_words = len(ranks) + len(SPECIAL_TOKENS)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_tokens = [self.eos_id, self.eom_id, self.eot_id]

    def encode(self, s, bos=False, eos=False):
        assert isinstance(s, str), f"encode takes a str, got {type(s).__name__}"
        ids = []
        for i in range(0, len(s), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(s[i:i + TIKTOKEN_MAX_ENCODE_CHARS], MAX_NO_WHITESPACES_CHARS):
                # disallowed_special=() : special-token strings in the text are encoded as plain text
                ids.extend(self.model.encode(piece, allowed_special=set(), disallowed_special=()))
        return [self.bos_id] * bos + ids + [self.eos_id] * eos

    def decode(self, ids):
        return self.model.decode(list(ids))

    # The chat format of the instruct models: <|begin_of_text|> then, per message,
    # <|start_header_id|>role<|end_header_id|>\n\n content <|eot_id|>, and an open assistant header to answer in.
    # An assistant message that called a tool ends with <|eom_id|> (end of message: the tool's answer comes next).
    ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "ipython", "ipython": "ipython"}

    def encode_header(self, role):
        return ([self.special_tokens["<|start_header_id|>"]] + self.encode(self.ROLES[role])
                + [self.special_tokens["<|end_header_id|>"]] + self.encode("\n\n"))

    def encode_message(self, message):
        eom = message["role"] == "assistant" and message.get("stop_reason") == "end_of_message"
        return self.encode_header(message["role"]) + self.encode(message["content"]) + [self.eom_id if eom else self.eot_id]

    def encode_dialog_prompt(self, messages, where="dialog"):
        """Prompt token ids for the assistant's next message (the format of Meta's ChatFormat)."""
        check_dialog(messages, where)
        return [self.bos_id] + [t for m in messages for t in self.encode_message(m)] + self.encode_header("assistant")

    def encode_dialog_for_training(self, messages, where="dialog"):
        """(tokens, train_on): the whole conversation, and which tokens carry loss (assistant content and its
        closing <|eot_id|>/<|eom_id|>; never the headers, the system prompt or the user's words)."""
        check_dialog(messages, where)
        tokens, train_on = [self.bos_id], [False]
        for m in messages:
            header, body = self.encode_header(m["role"]), self.encode_message(m)[len(self.encode_header(m["role"])):]
            tokens += header + body
            train_on += [False] * len(header) + [m["role"] == "assistant"] * len(body)
        return tokens, train_on

    def stream_decoder(self):
        """A function token_id -> new text. Holds back bytes of a UTF-8 character split across tokens."""
        utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        return lambda token_id: utf8.decode(self.model.decode_single_token_bytes(token_id))


def check_dialog(messages, where="dialog"):
    if not isinstance(messages, list) or not messages:
        raise InputError(f"{where}: a dialog is a non-empty list of {{\"role\": ..., \"content\": ...}} messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in Tokenizer.ROLES:
            raise InputError(f"{where}, message {i}: role must be one of {', '.join(Tokenizer.ROLES)}, "
                             f"got {m.get('role') if isinstance(m, dict) else m!r}")
        if not isinstance(m.get("content"), str):
            raise InputError(f"{where}, message {i}: content must be a string, got {type(m.get('content')).__name__}")


def split_long_runs(s, max_len):
    """Split s so that no piece holds more than max_len consecutive whitespace or non-whitespace chars (as Meta)."""
    run_len, run_is_space, start = 0, (s[0].isspace() if s else False), 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if is_space != run_is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_len:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


# -----------------------------------------------------------------------------
# 3. Model
# A decoder-only transformer: pre-norm blocks of attention then SwiGLU, each added to the residual.
# The arithmetic follows Meta's reference op for op (float32 norms and RoPE, float32 softmax), which is
# what makes the outputs token-exact.


def rms_norm(x, weight, eps):
    """Meta's ops: normalise in float32 even for bf16 activations, then scale in the model's dtype. -> (y, rstd)"""
    x32 = x.to(torch.promote_types(x.dtype, torch.float32))  # x.float(), but float64 stays (gradcheck)
    rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
    return (x32 * rstd).type_as(x) * weight, rstd


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # the autograd Function only when training: its Python dispatch alone costs ~1.5% of a decoding step
        if needs_grad(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return rms_norm(x, self.weight, self.eps)[0]


class RMSNormFunction(torch.autograd.Function):
    """rms_norm with its backward written out, so that training keeps x itself and one number per row, not
    autograd's float32 copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        y, rstd = rms_norm(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        d_normed = (grad * weight).to(rstd.dtype)
        dx = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        d_weight = (grad * normed.type_as(x)).flatten(0, -2).sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        return dx.to(x.dtype), d_weight, None


def rope_frequencies(args):
    """The rotation speed of each pair of head dimensions, with Llama 3.1's long-context scaling."""
    freqs = 1.0 / (args.rope_theta ** (torch.arange(0, args.head_dim, 2)[: args.head_dim // 2].float() / args.head_dim))
    if not args.use_scaled_rope:
        return freqs
    # llama3 scaling: wavelengths longer than the original context are slowed down by `factor`,
    # short ones are kept, and the band between is interpolated smoothly.
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
    return torch.polar(torch.ones_like(angles), angles)  # (max_seq_len, head_dim // 2) complex64: e^(i*pos*freq)


def apply_rope(x, freqs_cis):
    # x: (B, T, heads, head_dim). Meta's layout: dimensions (0,1), (2,3), ... are the (real, imag) pairs.
    # (Hugging Face stores wq/wk with rows permuted so that pairs are (i, i + head_dim/2); we undo that on load.)
    # freqs_cis: (T, head_dim // 2), or (B, T, head_dim // 2) when positions differ per row (packed documents)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))  # (B, T, heads, head_dim // 2)
    out = torch.view_as_real(xc * freqs_cis[..., None, :]).flatten(3)
    return out.type_as(x)


class KVCache:
    """Keys and values of the positions seen so far, one per layer; exists only inside Transformer.kv_cache().
    Layout (B, max_len, n_kv_heads, head_dim) as in Meta's code: same strides, so the same matmul kernels and
    bit-identical float32 results."""

    def __init__(self, batch_size, max_len, n_kv_heads, head_dim, dtype, device):
        shape = (batch_size, max_len, n_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    def update(self, start_pos, k, v):  # k, v: (B, T, n_kv_heads, head_dim)
        if torch.is_tensor(start_pos):  # static shapes (compiled decoding): write in place, return the whole cache
            idx = start_pos + torch.arange(k.shape[1], device=k.device)
            self.k.index_copy_(1, idx, k)
            self.v.index_copy_(1, idx, v)
            return self.k, self.v
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
        self.wqkv = None  # wq, wk and wv as one packed product (pack_for_cpu_inference)
        self.cache = None  # a KVCache while generating, otherwise None
        self.fused = True  # SDPA kernels; False: Meta's explicit arithmetic, bit-identical to it (see Llama.build)

    def forward(self, x, freqs_cis, start_pos, mask):
        B, T, _ = x.shape
        if self.wqkv is None:
            q, k, v = self.wq(x), self.wk(x), self.wv(x)
        else:
            q, k, v = self.wqkv(x).split([self.n_heads * self.head_dim] + [self.n_kv_heads * self.head_dim] * 2, -1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        q, k = apply_rope(q, freqs_cis), apply_rope(k, freqs_cis)
        if self.cache is not None:
            k, v = self.cache.update(start_pos, k, v)  # (B, start_pos + T, n_kv_heads, head_dim)
        if not self.fused:
            y = meta_attention(q, k, v, mask)
        elif not isinstance(mask, (torch.Tensor, type(None))):  # a flex-attention BlockMask (document masking, CUDA)
            y = flex_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), block_mask=mask,
                               enable_gqa=self.n_kv_heads != self.n_heads)
        else:
            # fused kernels (flash / memory-efficient); without a mask: causal for T > 1, everything for T == 1
            y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                                               is_causal=mask is None and T > 1, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, heads, T, head_dim) -> (B, T, dim)


def meta_attention(q, k, v, mask):
    """Meta's attention, op for op (and layout for layout): explicit scores, additive -inf mask, float32 softmax.
    q: (B, T, heads, head_dim); k, v: (B, S, n_kv_heads, head_dim)."""
    B, S, n_kv, hd = k.shape
    n_rep = q.shape[2] // n_kv
    # GQA: each K/V head serves n_rep query heads
    k = k[:, :, :, None, :].expand(B, S, n_kv, n_rep, hd).reshape(B, S, n_kv * n_rep, hd)
    v = v[:, :, :, None, :].expand(B, S, n_kv, n_rep, hd).reshape(B, S, n_kv * n_rep, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, heads, T or S, head_dim)
    scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(hd)
    T, S = q.shape[2], k.shape[2]
    if mask is None and T > 1:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    if mask is not None:
        scores = scores + torch.zeros(mask.shape, dtype=scores.dtype, device=q.device).masked_fill(~mask, float("-inf"))
    return torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v)


_compiled_flex_attention = None


def flex_attention(q, k, v, **kwargs):
    """Flex attention skips the masked-out blocks, but only once compiled (on GPUs); eagerly it is a reference."""
    global _compiled_flex_attention
    from torch.nn.attention.flex_attention import flex_attention as eager
    if not q.is_cuda:
        return eager(q, k, v, **kwargs)
    if _compiled_flex_attention is None:
        _compiled_flex_attention = torch.compile(eager, dynamic=False)
    return _compiled_flex_attention(q, k, v, **kwargs)


class SwiGLU(torch.autograd.Function):
    """silu(a) * b. Autograd would keep a, b and silu(a) for backward; a and b are enough (silu is cheap to redo),
    which saves (tokens, ffn_hidden_dim) activations per layer in training: 8 MB at 512 tokens of Llama 3.2 1B in bf16."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)  # the ops autograd itself would run


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)  # gate
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)  # down
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)  # up
        self.w13 = None  # w1 and w3 as one packed product (pack_for_cpu_inference)

    def forward(self, x):
        a, b = (self.w1(x), self.w3(x)) if self.w13 is None else self.w13(x).chunk(2, -1)
        return self.w2(SwiGLU.apply(a, b) if needs_grad(a, b) else F.silu(a) * b)  # w2(silu(w1 x) * w3 x)


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


# Training on CPUs. Products with frozen bf16 weights run in float32 (matmul_dtype); their float32 operands and
# results live in a few reused buffers (scratch), and freed memory goes back to the OS before each training step
# and before the output layer's logits (release_freed_memory). Without the last two, glibc's heap holds on to the
# float32 temporaries between the activations, and a LoRA step's peak memory is ~1 GB higher (1B, bf16, 512 tokens).

def matmul_dtype(x):
    """The dtype to multiply frozen weights in: float32 for bf16/fp16 on CPUs without AMX tiles, where oneDNN's
    bf16 products run at about half the float32 rate (170 vs 300 GFLOP/s on this project's 2-core Xeon); x's own
    elsewhere. Both accumulate in float32: only the speed differs."""
    global _cpu_has_amx
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return x.dtype
    if _cpu_has_amx is None:
        _cpu_has_amx = bool(getattr(torch._C._cpu, "_init_amx", lambda: False)())
    return x.dtype if _cpu_has_amx else torch.float32


def scratch(slot, shape, dtype, device):
    """A buffer reused by every call with this slot name ("weight", "in", "out"): it holds one value at a time,
    which the caller consumes before asking for the slot again. Fresh 16-67 MB tensors would each cost page faults."""
    n, buf = math.prod(shape), _scratch.get(slot)
    if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
        buf = _scratch[slot] = torch.empty(n, dtype=dtype, device=device)
    return buf[:n].view(shape)


def upcast(t, dtype, slot="weight"):
    return t if t.dtype == dtype else scratch(slot, t.shape, dtype, t.device).copy_(t)


_scratch, _cpu_has_amx = {}, None


def release_freed_memory():
    """glibc keeps the pages of freed blocks for reuse, long after the tensors are gone: hand them back."""
    if sys.platform == "linux":
        import ctypes
        ctypes.CDLL(None).malloc_trim(0)


def flat(t):
    return t.reshape(-1, t.shape[-1])  # (..., n) -> (rows, n)


class HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of the output layer's logits, for a frozen output weight (LoRA, norm tuning).
    Token t's loss depends on its own hidden state alone, so the forward pass computes d loss_t / d h_t right away
    ((softmax - one-hot) W) and keeps only that (N, dim): the (N, vocab) float32 logits (263 MB for 512 tokens of
    the 128K vocabulary), their softmax and their gradient are never kept for backward, which scales it row by
    row. Tokens go a chunk at a time, the weight a slice at a time, multiplied in matmul_dtype."""
    max_logits, weight_rows = 2**26, 8192  # (tokens, vocab) float32 logits of at most 256 MB; weight slices

    @staticmethod
    def forward(ctx, h, weight, targets):  # h: (N, dim) final-normed hidden states, targets: (N,)
        c, vocab = matmul_dtype(h), weight.shape[0]
        acc = torch.promote_types(c, torch.float32)  # logits and losses: float32 (float64 in the tests' gradcheck)
        losses = torch.empty(len(h), dtype=acc, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=c, device=h.device) if ctx.needs_input_grad[0] else None
        rows, cols = max(1, HeadCrossEntropy.max_logits // vocab), HeadCrossEntropy.weight_rows
        for i in range(0, len(h), rows):
            hc, t = h[i:i + rows].to(c), targets[i:i + rows, None]
            logits = torch.empty(len(hc), vocab, dtype=acc, device=h.device)  # (rows, vocab)
            for j in range(0, vocab, cols):
                logits[:, j:j + cols] = hc @ upcast(weight[j:j + cols], c).t()
            target_logit, top = logits.gather(1, t), logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one (rows, vocab) buffer throughout
            total = probs.sum(1, keepdim=True)
            losses[i:i + rows] = (total.log() + top - target_logit)[:, 0]
            if grad_h is not None:
                d_logits = probs.div_(total).scatter_add_(1, t, torch.full(t.shape, -1.0, dtype=acc, device=h.device))
                for j in range(0, vocab, cols):
                    grad_h[i:i + rows].addmm_(d_logits[:, j:j + cols].to(c), upcast(weight[j:j + cols], c))
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_h, = ctx.saved_tensors
        return (grad_h * grad_losses[:, None]).to(ctx.dtype), None, None


class Transformer(nn.Module):
    def __init__(self, args):
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(TransformerBlock(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = None if args.tie_embeddings else nn.Linear(args.dim, args.vocab_size, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(args), persistent=False)
        self.activation_checkpointing = False

    def forward(self, tokens, start_pos=0, mask=None, last_only=False, positions=None, targets=None):
        """tokens (B, T) -> float32 logits (B, T, vocab), or (B, 1, vocab) with last_only, or, given targets (B, T),
        the per-token cross-entropy losses (B, T) (training: see losses).

        start_pos > 0 continues a sequence held in the KV cache; a tensor start_pos keeps every shape static for
        torch.compile (attention then runs over the whole cache, masked past the position). mask, if given, is a boolean
        (B, 1, T, start_pos + T) "may attend" matrix, or a flex-attention BlockMask; positions (B, T) are the RoPE
        positions when they are not start_pos, start_pos + 1, ... (the finetune loop passes both for packed documents).
        """
        B, T = tokens.shape
        if torch.is_tensor(start_pos):
            return self.forward_static(tokens, start_pos, last_only)
        if targets is not None and tokens.device.type == "cpu" and torch.is_grad_enabled():
            release_freed_memory()  # what the last backward pass freed
        if start_pos + T > self.args.max_seq_len:
            raise InputError(f"sequence of {start_pos + T} tokens is longer than max_seq_len {self.args.max_seq_len}; "
                             f"raise max_seq_len")
        caching = self.layers[0].attention.cache is not None
        if start_pos and not caching:
            raise InputError("start_pos > 0 continues a cached sequence: run it inside `with model.kv_cache(...)`")
        if caching and T > 1 and start_pos > 0 and mask is None:
            # new tokens see the whole cache and each other causally: query i sits at position start_pos + i
            mask = torch.ones(T, start_pos + T, dtype=torch.bool, device=tokens.device).tril(start_pos)
        freqs_cis = self.freqs_cis[start_pos:start_pos + T] if positions is None else self.freqs_cis[positions]
        h = self.tok_embeddings(tokens)  # (B, T, dim)
        for layer in self.layers:
            if self.activation_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(layer, h, freqs_cis, start_pos, mask, use_reentrant=False)
            else:
                h = layer(h, freqs_cis, start_pos, mask)
        return self.head(h, last_only) if targets is None else self.losses(h, targets)

    def losses(self, h, targets):
        """Per-token cross-entropy (B, T) of the logits at h against targets. With the output weight frozen (LoRA,
        norm tuning), chunked: the (B, T, vocab) logits are never held (HeadCrossEntropy)."""
        weight = self.tok_embeddings.weight if self.output is None else getattr(self.output, "weight", None)
        if h.device.type == "cpu" and torch.is_grad_enabled():
            release_freed_memory()  # the forward pass's temporaries, before the logits
        if isinstance(self.output, (nn.Linear, type(None))) and not needs_grad(weight):
            return HeadCrossEntropy.apply(self.norm(h).flatten(0, 1), weight, targets.flatten()).view(targets.shape)
        return F.cross_entropy(self.head(h).flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)

    def head(self, h, last_only=False):
        """Final norm and output matrix (the embedding itself when tied) -> float32 logits (B, T or 1, vocab)."""
        h = self.norm(h[:, -1:] if last_only else h)
        return (F.linear(h, self.tok_embeddings.weight) if self.output is None else self.output(h)).float()

    def forward_static(self, tokens, start_pos, last_only):
        """The same computation with static shapes: what torch.compile turns into one graph for every position."""
        T, S = tokens.shape[1], self.layers[0].attention.cache.k.shape[1]
        positions = start_pos + torch.arange(T, device=tokens.device)  # (T,)
        mask = torch.arange(S, device=tokens.device)[None, :] <= positions[:, None]  # (T, S): the cache so far
        freqs_cis, h = self.freqs_cis[positions], self.tok_embeddings(tokens)
        for layer in self.layers:
            h = layer(h, freqs_cis, start_pos, mask)
        return self.head(h, last_only)

    @contextmanager
    def kv_cache(self, batch_size, max_len, keep=False):
        """Allocate a KV cache for one generation; it is freed when the block ends. keep=True (compiled decoding)
        keeps it for the next generation of the same size instead: a new cache would mean a new compilation."""
        a = self.args
        dtype, device = self.tok_embeddings.weight.dtype, self.tok_embeddings.weight.device
        old = self.layers[0].attention.cache
        if not (keep and old is not None and old.k.shape[:2] == (batch_size, max_len)):
            for layer in self.layers:
                layer.attention.cache = KVCache(batch_size, max_len, a.n_kv_heads, a.head_dim, dtype, device)
        try:
            yield
        finally:
            for layer in self.layers:
                layer.attention.cache = layer.attention.cache if keep else None

    def set_fused_attention(self, fused):
        for layer in self.layers:
            layer.attention.fused = fused


# -----------------------------------------------------------------------------
# 4. Checkpoints
# Meta's layout: params.json + consolidated.NN.pth (one shard per model-parallel rank) + tokenizer.model.
# Weights are memory-mapped and assigned into a model built on the meta device, so that no second copy is
# ever made: peak memory stays near the size of the weights.


def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def resolve_dtype(dtype, device):
    """bf16 on GPUs that support it, float16 on other GPUs, float32 on CPU unless asked."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is not None:
        if dtype not in DTYPES:
            raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(DTYPES)}")
        return DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def torch_load(path):
    # weights_only: a checkpoint can never run code; mmap: pages are read from disk only when used
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        raise InputError(f"cannot read {path}: {str(e).splitlines()[0]}; is the file complete?") from None


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


def merge_meta_shards(shards, args):
    merged = {}
    for key in shards[0]:
        if any(key not in s for s in shards):
            raise InputError(f"'{key}' is in consolidated.00.pth but not in every shard; the shards do not belong together")
        dim = meta_shard_dim(key)
        if dim is None or len(shards) == 1:
            merged[key] = shards[0][key]
            continue
        parts = [s[key] for s in shards]
        kv_rows = args.n_kv_heads * args.head_dim
        if key.endswith(("wk.weight", "wv.weight")) and sum(p.shape[0] for p in parts) > kv_rows:
            # more shards than K/V heads (405B on 16 ranks): consecutive shards hold copies of one head
            parts = parts[::sum(p.shape[0] for p in parts) // kv_rows]
        merged[key] = torch.cat(parts, dim=dim)
    return merged


def load_meta_checkpoint(ckpt_dir):
    """params.json + consolidated.*.pth -> (ModelArgs, state_dict in Meta's names)."""
    ckpt_dir = Path(ckpt_dir)
    paths = sorted(ckpt_dir.glob("consolidated.*.pth"))
    if not paths:
        raise InputError(f"no consolidated.*.pth in {ckpt_dir}; point --ckpt_dir at a Llama 3 checkpoint directory")
    args = args_from_meta_params(read_json(ckpt_dir / "params.json"), str(ckpt_dir / "params.json"))
    log(f"loading {len(paths)} shard(s) from {ckpt_dir}")
    shards = []
    for i, p in enumerate(paths):
        shards.append(torch_load(p))
        log(f"  mapped {p.name} ({i + 1}/{len(paths)})")
    return args, merge_meta_shards(shards, args)


# Hugging Face's layout: config.json + model.safetensors (or shards listed in model.safetensors.index.json).
# Same tensors under other names, except that HF permutes the rows of wq and wk: its rotary code pairs
# dimension i with i + head_dim/2 ("rotate_half"), where Meta pairs 2i with 2i+1 (complex numbers).

HF_REQUIRED = {"hidden_size": int, "intermediate_size": int, "num_hidden_layers": int, "num_attention_heads": int,
               "vocab_size": int, "rms_norm_eps": float}
HF_OPTIONAL = {"num_key_value_heads": int, "head_dim": int, "rope_theta": float, "tie_word_embeddings": bool,
               "max_position_embeddings": int}


def args_from_hf_config(cfg, where="config.json"):
    archs = cfg.get("architectures") or []
    if cfg.get("model_type") != "llama" or any(a != "LlamaForCausalLM" for a in archs):
        raise InputError(f"{where} describes {archs or cfg.get('model_type')}, not a Llama model (LlamaForCausalLM); "
                         f"this code runs Llama 3.x only")
    missing = [k for k in HF_REQUIRED if k not in cfg]
    if missing:
        raise InputError(f"{where} is missing required keys {missing}; is the file complete?")
    check_types(cfg, {**HF_REQUIRED, **HF_OPTIONAL}, where)
    # transformers 4 writes rope_theta + rope_scaling; transformers 5 writes both inside rope_parameters
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_theta = cfg.get("rope_theta", rope.get("rope_theta"))
    if rope_theta is None:
        raise InputError(f"{where} has no rope_theta; is the file complete?")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "llama3"):
        raise InputError(f"{where}: rope_type {rope_type!r} is not Llama 3's ('llama3' or none)")
    n_heads, dim = cfg["num_attention_heads"], cfg["hidden_size"]
    n_kv_heads = cfg.get("num_key_value_heads") or n_heads
    if dim % n_heads or n_heads % n_kv_heads or cfg.get("head_dim", dim // n_heads) != dim // n_heads:
        raise InputError(f"{where}: hidden_size {dim}, {n_heads} heads, {n_kv_heads} KV heads and head_dim "
                         f"{cfg.get('head_dim')} do not fit together as in Llama 3")
    scaled = rope_type == "llama3"
    return ModelArgs(
        dim=dim, n_layers=cfg["num_hidden_layers"], n_heads=n_heads, n_kv_heads=n_kv_heads,
        vocab_size=cfg["vocab_size"], ffn_hidden_dim=cfg["intermediate_size"], norm_eps=float(cfg["rms_norm_eps"]),
        rope_theta=float(rope_theta), use_scaled_rope=scaled,
        rope_scaling_factor=float(rope.get("factor", 8.0)) if scaled else 8.0,
        rope_low_freq_factor=float(rope.get("low_freq_factor", 1.0)),
        rope_high_freq_factor=float(rope.get("high_freq_factor", 4.0)),
        rope_original_context=int(rope.get("original_max_position_embeddings", 8192)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def hf_names(n_layers):
    """Meta name -> HF name, for every weight."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
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
    """config.json + *.safetensors -> (ModelArgs, state_dict in Meta's names)."""
    from safetensors import safe_open

    ckpt_dir = Path(ckpt_dir)
    args = args_from_hf_config(read_json(ckpt_dir / "config.json"), str(ckpt_dir / "config.json"))
    index = ckpt_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index).get("weight_map") or {}
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (ckpt_dir / f).exists():
                raise InputError(f"{index.name} lists {f} but it is not in {ckpt_dir}; download it again")
    else:
        files = ["model.safetensors"]
    hf_to_meta = {hf: meta for meta, hf in hf_names(args.n_layers).items()}
    state_dict = {}
    log(f"loading {len(files)} safetensors file(s) from {ckpt_dir}")
    for i, f in enumerate(files):
        try:
            handle = safe_open(ckpt_dir / f, framework="pt")  # memory-mapped: tensors are read when used
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception as e:
            raise InputError(f"cannot read {ckpt_dir / f}: {str(e).splitlines()[0]}; the file is truncated or "
                             f"corrupt, download it again") from None
        for name, t in tensors.items():
            if name not in hf_to_meta:
                raise InputError(f"{f} holds '{name}', which is not a Llama weight for this config.json")
            state_dict[hf_to_meta[name]] = t
        log(f"  mapped {f} ({i + 1}/{len(files)})")
    for key, n_heads in (("wq", args.n_heads), ("wk", args.n_kv_heads)):
        for i in range(args.n_layers):
            name = f"layers.{i}.attention.{key}.weight"
            if name in state_dict:
                if state_dict[name].shape[0] % (2 * n_heads):
                    break  # wrong shape: build_model names the tensor and the shapes
                # in place: the mapping is private copy-on-write, so the file is untouched and no second copy stays
                state_dict[name].copy_(permute_rows_from_hf(state_dict[name], n_heads))
    return args, state_dict


def find_tokenizer(ckpt_dir):
    for path in (Path(ckpt_dir) / "tokenizer.model", Path(ckpt_dir) / "original" / "tokenizer.model"):
        if path.exists():
            return path
    raise InputError(f"no tokenizer.model in {ckpt_dir} or {Path(ckpt_dir) / 'original'}; "
                     f"copy it from the original/ folder of the model's download")


def load_checkpoint(ckpt_dir):
    """Read a checkpoint directory in either layout -> (ModelArgs, state_dict in Meta's names).
    Accepts a Meta directory, an HF directory, or an HF repository root that also has Meta's files in original/."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise InputError(f"checkpoint directory {ckpt_dir} does not exist; pass the folder holding the weights")
    has_safetensors = any(ckpt_dir.glob("*.safetensors")) or (ckpt_dir / "model.safetensors.index.json").exists()
    if (ckpt_dir / "config.json").exists() and has_safetensors:
        if (ckpt_dir / "original" / "params.json").exists():
            log(f"{ckpt_dir} has both layouts: using the safetensors (HF), not original/ (Meta)")
        args, state_dict = load_hf_checkpoint(ckpt_dir)
        return args, resolve_tied_output(args, state_dict)
    for d in (ckpt_dir, ckpt_dir / "original"):
        if (d / "params.json").exists():
            args, state_dict = load_meta_checkpoint(d)
            return args, resolve_tied_output(args, state_dict)
    if (ckpt_dir / "config.json").exists():
        raise InputError(f"{ckpt_dir} has config.json but no *.safetensors weights; download the .safetensors files")
    raise InputError(f"{ckpt_dir} holds neither layout: expected params.json + consolidated.*.pth (Meta) "
                     f"or config.json + *.safetensors (Hugging Face)")


def resolve_tied_output(args, state_dict):
    """Tied when there is no separate output matrix, or when it is a copy of the embedding (Meta's 3.2 1B/3B
    files). Sets args.tie_embeddings and drops the copy."""
    output, embedding = state_dict.get("output.weight"), state_dict.get("tok_embeddings.weight")
    tied = output is None or (embedding is not None and output.shape == embedding.shape and torch.equal(output, embedding))
    if args.tie_embeddings and not tied:
        log("note: the config says tied embeddings but the checkpoint has its own output matrix: using it")
    args.tie_embeddings = tied
    return {k: v for k, v in state_dict.items() if not (tied and k == "output.weight")}


class PackedLinear(nn.Module):
    """A frozen Linear for bf16 inference on CPU, its weight arranged once in oneDNN's blocked layout. F.linear
    re-arranges a bf16 weight on every call, so one-token decoding reads each weight ~1.6x over; pre-arranged,
    it runs near memory bandwidth. Same kernel, same arithmetic: the results are bit-identical."""

    def __init__(self, weight):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def release_pages(t):
    """Drop a tensor's pages from memory (madvise DONTNEED) once nothing will read it again: after packing, the
    memory-mapped original would otherwise stay resident beside its copy. Only whole pages inside it are touched."""
    import ctypes
    import mmap

    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and sys.platform == "linux":
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)  # 4: MADV_DONTNEED


def pack_for_cpu_inference(model):
    """Replace every Linear (and the tied output) by a PackedLinear, one weight at a time: peak memory stays near
    one copy of the weights. For bf16 generation on CPUs with oneDNN bf16 support. wq, wk and wv become one product,
    and so do w1 and w3 (bit-identical: each output is the same dot product): 3% faster decoding."""
    tied = model.output is None
    if tied:  # the embedding stays as it is (for lookups); the output gets a packed copy
        model.output = PackedLinear(model.tok_embeddings.weight)
    for layer in model.layers:
        for module, fused, names in ((layer.attention, "wqkv", ("wq", "wk", "wv")), (layer.feed_forward, "w13", ("w1", "w3"))):
            setattr(module, fused, PackedLinear(torch.cat([getattr(module, n).weight for n in names])))
            for n in names:
                release_pages(getattr(module, n).weight)
                setattr(module, n, None)
    for module in [model] + [m for layer in model.layers for m in (layer.attention, layer.feed_forward)]:
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, PackedLinear(child.weight))
                release_pages(child.weight)
    return model


def build_model(args, state_dict, device, dtype, consume=False):
    """Assign the (memory-mapped) weights into a model built on the meta device. consume=True: the caller hands the
    state dict over, so each source tensor's pages are dropped as soon as it is converted (to another dtype or
    device): converting bf16 weights to float32 then peaks near the float32 copy alone, not both."""
    state_dict = resolve_tied_output(args, state_dict)
    with torch.device("meta"):
        model = Transformer(args)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state_dict)), sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        raise InputError(f"checkpoint does not match the config: missing {missing[:4]}, unexpected {unexpected[:4]}")
    for key, t in state_dict.items():
        if t.shape != expected[key].shape:
            raise InputError(f"'{key}' has shape {tuple(t.shape)} but the config implies {tuple(expected[key].shape)}; "
                             f"the config and the weights are from different models")
    converted = {}
    for key, t in state_dict.items():
        converted[key] = t.to(device=device, dtype=dtype)
        if consume and converted[key].data_ptr() != t.data_ptr():
            release_pages(t)
    model.load_state_dict(converted, assign=True, strict=True)
    model.freqs_cis = precompute_freqs_cis(args, device)
    return model.eval()


@contextmanager
def atomic_directory(out_dir):
    """Write a directory completely or not at all: files go to a temporary sibling, renamed into place at the end.
    A crash mid-save leaves only the temporary directory, never a directory that looks complete."""
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp{os.getpid()}")
    if tmp.exists():
        import shutil
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    yield tmp
    if out_dir.exists():  # replace: move the old one aside first so that out_dir is always whole
        import shutil
        old = out_dir.with_name(f".{out_dir.name}.old{os.getpid()}")
        out_dir.rename(old)
        tmp.rename(out_dir)
        shutil.rmtree(old)
    else:
        tmp.rename(out_dir)


def meta_params(args):
    """params.json as Meta writes it. multiple_of / ffn_dim_multiplier must reproduce ffn_hidden_dim."""
    multiple_of, multiplier = args.multiple_of, args.ffn_dim_multiplier
    if meta_ffn_hidden_dim(args.dim, multiple_of, multiplier) != args.ffn_hidden_dim:
        # from a Hugging Face config, which stores the width itself: find Meta's two numbers, the plainest first
        ratio = args.ffn_hidden_dim / int(2 * 4 * args.dim / 3)
        candidates = [(m, r) for r in (None, round(ratio, 1), round(ratio, 2), round(ratio, 4), ratio)
                      for m in (256, 1024, 4096, 32, 64, 128, 512, 2048) if args.ffn_hidden_dim % m == 0]
        fits = [(m, r) for m, r in candidates if meta_ffn_hidden_dim(args.dim, m, r) == args.ffn_hidden_dim]
        if not fits:
            raise InputError(f"FFN width {args.ffn_hidden_dim} cannot be written as Meta's multiple_of/ffn_dim_multiplier")
        multiple_of, multiplier = fits[0]
    params = {"dim": args.dim, "n_layers": args.n_layers, "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads,
              "vocab_size": args.vocab_size, "multiple_of": multiple_of, "ffn_dim_multiplier": multiplier,
              "norm_eps": args.norm_eps, "rope_theta": args.rope_theta, "use_scaled_rope": args.use_scaled_rope}
    return {k: v for k, v in params.items() if v is not None}


def save_meta_checkpoint(args, state_dict, out_dir, tokenizer_path, n_shards=1):
    """Write params.json, consolidated.NN.pth (split as Meta splits for model parallelism) and tokenizer.model."""
    import shutil

    if args.use_scaled_rope and args.rope_scaling_factor != 8.0:
        log(f"note: params.json cannot record the RoPE scaling factor {args.rope_scaling_factor:g} (readers assume 8): "
            f"pass --rope_scaling_factor {args.rope_scaling_factor:g} when loading {out_dir}")
    if "output.weight" not in state_dict:  # Meta's files always carry the output layer, tied or not
        state_dict = {**state_dict, "output.weight": state_dict["tok_embeddings.weight"]}
    with atomic_directory(out_dir) as tmp:
        (tmp / "params.json").write_text(json.dumps(meta_params(args), indent=2))
        for rank in range(n_shards):
            shard = {}
            for key, t in state_dict.items():
                dim = meta_shard_dim(key)
                shard[key] = (t if dim is None else t.chunk(n_shards, dim=dim)[rank]).clone()
            torch.save(shard, tmp / f"consolidated.{rank:02d}.pth")
        shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
    log(f"saved {out_dir} (Meta layout, {n_shards} shard(s))")


def hf_config(args):
    """config.json as the Llama 3.x repositories on the Hugging Face hub have it."""
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": args.dim,
           "intermediate_size": args.ffn_hidden_dim, "num_hidden_layers": args.n_layers,
           "num_attention_heads": args.n_heads, "num_key_value_heads": args.n_kv_heads, "head_dim": args.head_dim,
           "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps, "rope_theta": args.rope_theta,
           "max_position_embeddings": 131072 if args.use_scaled_rope else 8192,
           "tie_word_embeddings": args.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
           "mlp_bias": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16"}
    if args.use_scaled_rope:
        cfg["rope_scaling"] = {"rope_type": "llama3", "factor": args.rope_scaling_factor,
                               "low_freq_factor": args.rope_low_freq_factor,
                               "high_freq_factor": args.rope_high_freq_factor,
                               "original_max_position_embeddings": args.rope_original_context}
    return cfg


def save_hf_checkpoint(args, state_dict, out_dir, tokenizer_path, max_shard_bytes=5 * 2**30):
    """Write config.json, generation_config.json, model*.safetensors (sharded past max_shard_bytes, with an
    index) and the tokenizer under original/, as the HF hub repositories are laid out."""
    import shutil
    from safetensors.torch import save_file

    names = hf_names(args.n_layers)
    tensors = {}
    for key, t in state_dict.items():
        if key == "output.weight" and args.tie_embeddings:
            continue  # tied: HF stores the embedding only
        if key.endswith(("attention.wq.weight", "attention.wk.weight")):
            t = permute_rows_to_hf(t, args.n_heads if key.endswith("wq.weight") else args.n_kv_heads)
        tensors[names[key]] = t.contiguous()
    shards, size = [{}], 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    with atomic_directory(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(args), indent=2))
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "do_sample": True,
             "temperature": 0.6, "top_p": 0.9}, indent=2))
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update({name: fname for name in shard})
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        (tmp / "original").mkdir()
        shutil.copyfile(tokenizer_path, tmp / "original" / "tokenizer.model")
    log(f"saved {out_dir} (Hugging Face layout, {len(shards)} safetensors file(s))")


def save_checkpoint(args, state_dict, out_dir, tokenizer_path, layout):
    if layout not in ("meta", "hf"):
        raise InputError(f"unknown layout {layout!r}; use 'meta' or 'hf'")
    (save_meta_checkpoint if layout == "meta" else save_hf_checkpoint)(args, state_dict, out_dir, tokenizer_path)


def random_state_dict(args, seed=0, dtype=torch.bfloat16):
    """Random weights of a given shape (for tests, benchmarks and the offline demo: it produces gibberish).
    std 1/sqrt(dim) keeps activations O(1), so greedy outputs are varied and free of near-ties."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            sd[key] = (1 + 0.1 * torch.randn(shape, generator=g)).to(dtype)
        else:
            sd[key] = (torch.randn(shape, generator=g) / math.sqrt(args.dim)).to(dtype)
    return sd


# -----------------------------------------------------------------------------
# 5. Generation
# Meta's loop, kept exactly: the batch is decoded from the shortest prompt's length on, and positions that are
# still inside a longer prompt take the prompt's token instead of the sample. Same tensors, same order of random
# draws, so a seed gives Meta's tokens. It only stops earlier: once every row is finished.


def sample_top_p(probs, p, generator=None):
    """Nucleus sampling: keep the smallest set of tokens whose probability reaches p (Meta's code)."""
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
    probs = torch.softmax(logits / temperature, dim=-1)
    return sample_top_p(probs, top_p, generator).reshape(-1)


def check_sampling(temperature, top_p, top_k):
    if not temperature >= 0:
        raise InputError(f"temperature must be >= 0 (0 is greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise InputError(f"top_p must be in (0, 1], got {top_p}")
    if top_k < 0 or int(top_k) != top_k:
        raise InputError(f"top_k must be an integer >= 0 (0 turns it off), got {top_k}")


class Llama:
    def __init__(self, model, tokenizer, max_batch_size=4, seed=1, fast=False, compile=False):
        self.model, self.tokenizer, self.max_batch_size = model, tokenizer, max_batch_size
        # compile: one-token decoding steps as a torch.compile'd static-shape graph (for GPUs; see forward_static)
        self.decode_step = torch.compile(model, dynamic=False) if compile else None
        self.args = model.args
        self.device = model.tok_embeddings.weight.device
        self.generator = torch.Generator(self.device).manual_seed(seed)  # seeds sampling as Meta's global seed does
        self.fast = fast
        model.set_fused_attention(fast)

    @staticmethod
    def build(ckpt_dir, max_seq_len=2048, max_batch_size=4, device=None, dtype=None, seed=1,
              rope_scaling_factor=None, fast=False, finetuned=None, compile=False):
        """Load a checkpoint (Meta or Hugging Face layout) for generation.

        By default the arithmetic is Meta's, op for op and layout for layout (explicit attention, logits for every
        position): float32 and bf16 runs are bit-identical to Meta's reference, so even long sampled runs give
        Meta's tokens. fast=True uses fused attention kernels (SDPA: flash attention on GPU, O(T) memory for long
        prompts) and computes only the logits it needs; its logits agree with the default to ~1e-5 in float32,
        so greedy output is the same, but sampling from a nearly flat distribution can drift after many tokens.
        """
        t0 = time.time()
        device = torch.device(device or default_device())
        dtype = resolve_dtype(dtype, device)
        args, state_dict = load_checkpoint(ckpt_dir)
        args.max_seq_len = max_seq_len
        if rope_scaling_factor is not None:
            args.rope_scaling_factor = float(rope_scaling_factor)
        tokenizer = Tokenizer(find_tokenizer(ckpt_dir))
        if tokenizer.n_words != args.vocab_size:
            raise InputError(f"tokenizer has {tokenizer.n_words} tokens but the model's vocab_size is {args.vocab_size}; "
                             f"use the tokenizer.model that came with these weights")
        model = build_model(args, state_dict, device, dtype, consume=True)
        del state_dict
        if finetuned:  # a finetune run's output dir: its adapters / norms, merged (in float32) for full speed
            run = read_run(finetuned)
            model = merge_lora(load_trained(apply_run_lora(model, run), finetuned))
            for p in model.parameters():
                p.data, p.requires_grad = p.data.to(dtype), False
            log(f"applied the {run['mode']} weights of {finetuned} (step {run['step']})")
        n_params = sum(p.numel() for p in model.parameters())
        # (not for a compiled decoding step: torch.compile cannot trace oneDNN's packed layout)
        if device.type == "cpu" and dtype == torch.bfloat16 and torch.ops.mkldnn._is_mkldnn_bf16_supported() and not compile:
            pack_for_cpu_inference(model)
        log(f"loaded {n_params / 1e9:.2f}B parameters in "
            f"{time.time() - t0:.1f}s ({device}, {str(dtype).replace('torch.', '')})")
        return Llama(model, tokenizer, max_batch_size, seed, fast, compile)

    def check_prompts(self, prompt_tokens, max_gen_len):
        if not prompt_tokens:
            raise InputError("no prompts given; pass at least one prompt")
        if len(prompt_tokens) > self.max_batch_size:
            raise InputError(f"{len(prompt_tokens)} prompts but max_batch_size is {self.max_batch_size}; "
                             f"raise max_batch_size or pass fewer prompts")
        longest = max(len(t) for t in prompt_tokens)
        if longest == 0:
            raise InputError("a prompt has no tokens; start every prompt with <|begin_of_text|> (encode(..., bos=True))")
        if longest >= self.args.max_seq_len:
            raise InputError(f"a prompt of {longest} tokens does not fit max_seq_len {self.args.max_seq_len} "
                             f"(room is needed for at least one new token); raise max_seq_len or shorten the prompt")
        if max_gen_len < 1:
            raise InputError(f"max_gen_len must be at least 1, got {max_gen_len}")

    @torch.inference_mode()
    def generate_steps(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0, logprobs=False):
        """Meta's decoding loop as a generator. Yields (tokens, token_logprobs, cur_pos, done) after each step:
        tokens (B, total_len) holds prompts and generated ids up to cur_pos."""
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
        # Meta computes logits for every position; the last one alone is enough unless logprobs are asked for
        last_only = self.fast and not logprobs
        compiled = self.decode_step is not None
        with self.model.kv_cache(bsz, self.args.max_seq_len if compiled else total_len, keep=compiled):
            prev_pos = 0
            for cur_pos in range(min_len, total_len):
                if compiled and prev_pos > 0:  # one token at a time, same shapes every step
                    logits = self.decode_step(tokens[:, prev_pos:cur_pos], torch.tensor(prev_pos, device=self.device),
                                              last_only=last_only)
                else:
                    logits = self.model(tokens[:, prev_pos:cur_pos], prev_pos, last_only=last_only)
                next_token = sample(logits[:, -1], temperature, top_p, top_k, self.generator)
                next_token = torch.where(in_prompt[:, cur_pos], tokens[:, cur_pos], next_token)
                tokens[:, cur_pos] = next_token
                if logprobs:
                    token_logprobs[:, prev_pos + 1:cur_pos + 1] = -F.cross_entropy(
                        logits.transpose(1, 2), tokens[:, prev_pos + 1:cur_pos + 1], reduction="none", ignore_index=pad_id)
                generating = ~in_prompt[:, cur_pos]
                done |= generating & (torch.isin(next_token, stop_tokens) | (cur_pos + 1 - prompt_lens >= max_gen_len))
                yield tokens, token_logprobs, cur_pos, done
                prev_pos = cur_pos
                if done.all():
                    break

    def complete(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0, logprobs=False, echo=False):
        """-> per prompt: (token ids, logprobs or None, the stop token that ended it or None)."""
        for tokens, token_logprobs, _, _ in self.generate_steps(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs):
            pass
        results = []
        for i, prompt in enumerate(prompt_tokens):
            start, end = (0 if echo else len(prompt)), len(prompt) + max_gen_len
            toks = tokens[i, start:end].tolist()
            probs = token_logprobs[i, start:end].tolist() if logprobs else None
            new = toks[len(prompt) - start:]
            cut = next((j for j, t in enumerate(new) if t in self.tokenizer.stop_tokens), None)
            stop = None if cut is None else new[cut]
            if cut is not None:
                toks, probs = toks[:len(prompt) - start + cut], (probs[:len(prompt) - start + cut] if logprobs else None)
            results.append((toks, probs, stop))
        return results

    def generate(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0, logprobs=False, echo=False):
        """prompt_tokens: list of lists of ids. Returns (generated ids per prompt, logprobs per prompt or None).
        The prompt is included only with echo; the stop token is never included."""
        results = self.complete(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)
        return [r[0] for r in results], ([r[1] for r in results] if logprobs else None)

    def stream(self, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0):
        """One prompt; yields (token_id, text) as each token is generated. Text is decoded incrementally, so a
        character split across tokens appears whole, once its last byte has arrived. The stop token is not yielded."""
        to_text, n = self.tokenizer.stream_decoder(), len(prompt_tokens)
        for tokens, _, cur_pos, done in self.generate_steps([prompt_tokens], max_gen_len, temperature, top_p, top_k):
            if cur_pos < n:
                continue
            token = tokens[0, cur_pos].item()
            if token in self.tokenizer.stop_tokens:
                return
            yield token, to_text(token)

    def chat_completion(self, dialogs, temperature=0.6, top_p=0.9, top_k=0, max_gen_len=None, logprobs=False):
        """Answer each dialog (a list of {"role", "content"} messages ending with a user or tool message).
        Returns [{"generation": {"role": "assistant", "content": str, "stop_reason": ...}, "tokens": [...]}]."""
        for i, dialog in enumerate(dialogs):
            check_dialog(dialog, f"dialog {i}")
            if dialog[-1]["role"] not in ("user", "tool", "ipython"):
                raise InputError(f"dialog {i} ends with a {dialog[-1]['role']} message; a reply needs a user (or tool) "
                                 f"message last")
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode_dialog_prompt(d) for d in dialogs]
        reasons = {self.tokenizer.eot_id: "end_of_turn", self.tokenizer.eom_id: "end_of_message",
                   self.tokenizer.eos_id: "end_of_turn", None: "out_of_tokens"}
        return [{"generation": {"role": "assistant", "content": self.tokenizer.decode(toks), "stop_reason": reasons[stop]},
                 "tokens": toks, **({"logprobs": probs} if logprobs else {})}
                for toks, probs, stop in self.complete(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs)]

    def text_completion(self, prompts, temperature=0.6, top_p=0.9, top_k=0, max_gen_len=None, logprobs=False, echo=False):
        """Complete each prompt string. Returns [{"generation": str, "tokens": [ids], "logprobs": [...]?}]."""
        if max_gen_len is None:
            max_gen_len = self.args.max_seq_len - 1
        prompt_tokens = [self.tokenizer.encode(p, bos=True) for p in prompts]
        tokens, lps = self.generate(prompt_tokens, max_gen_len, temperature, top_p, top_k, logprobs, echo)
        return [{"generation": self.tokenizer.decode(t), "tokens": t, **({"logprobs": lp} if logprobs else {})}
                for t, lp in zip(tokens, lps or [None] * len(tokens))]


# -----------------------------------------------------------------------------
# 6. LoRA
# A frozen weight W gets a trainable low-rank update: y = W x + (alpha / rank) * B A x, with A (rank, in) and
# B (out, rank). B starts at zero, so before training the model is exactly the base model; afterwards
# W + (alpha / rank) B A merges back (computed in float32) and the model is plain Linear layers again.

LORA_TARGETS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3", "output")


class LoRAProduct(torch.autograd.Function):
    """y = x W^T + scale * (x_a A^T) B^T with W frozen and x_a = dropout(x), and its backward, written out. Autograd
    would keep a float32 copy of x for each adapter (A and B are float32): 40 MB per layer at 512 tokens of
    Llama 3.2 1B, for nothing. Here only x_a (the activation itself, shared by wq, wk and wv) and the thin
    (tokens, rank) product are kept, and the products run in matmul_dtype (float32 on most CPUs: ~1.8x faster),
    their float32 operands in scratch buffers."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_a, weight, lora_a, lora_b, scale):
        c = matmul_dtype(x)
        xc = upcast(flat(x), c, "in")
        u = (flat(x_a).to(c) if x_a is not x else xc) @ lora_a.to(c).t()  # (tokens, rank)
        y = scratch("out", (len(xc), weight.shape[0]), c, x.device) if c != x.dtype else None
        y = torch.mm(xc, upcast(weight, c).t(), out=y).addmm_(u, lora_b.to(c).t(), alpha=scale)  # (tokens, out)
        ctx.save_for_backward(x if weight.requires_grad else None, x_a, weight, lora_a, lora_b, u)
        ctx.scale, ctx.x_shape, ctx.dropout = scale, x.shape, x_a is not x
        return y.to(x.dtype).view(*x.shape[:-1], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, x_a, weight, lora_a, lora_b, u = ctx.saved_tensors
        c, scale = u.dtype, ctx.scale
        dy = upcast(flat(dy), c, "in")  # (tokens, out)
        du = (dy @ lora_b.to(c)).mul_(scale)  # (tokens, rank)
        d_lora_b = (dy.t() @ u).mul_(scale).to(lora_b.dtype)  # (out, rank)
        d_weight = (dy.t() @ flat(x).to(c)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        dx = scratch("out", (len(dy), weight.shape[1]), c, dy.device) if c != x_a.dtype else None
        dx = torch.mm(dy, upcast(weight, c), out=dx)  # (tokens, in): the frozen weight's share of the input gradient
        dx_a = du @ lora_a.to(c) if ctx.dropout else None  # the adapter's share, added to dx when x_a is x
        if not ctx.dropout:
            dx.addmm_(du, lora_a.to(c))
        d_lora_a = (du.t() @ upcast(flat(x_a), c, "in")).to(lora_a.dtype)  # (rank, in); dy is not needed any more
        as_x = lambda g: None if g is None else g.to(x_a.dtype).view(ctx.x_shape)  # noqa: E731
        return as_x(dx), as_x(dx_a), d_weight, d_lora_a, d_lora_b, None


class LoRALinear(nn.Module):
    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base, self.scale = base, alpha / rank
        device = base.weight.device
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, device=device))  # float32: trained
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, device=device))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises its weight
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        x_a = self.dropout(x) if self.dropout.p and self.training else x
        return LoRAProduct.apply(x, x_a, self.base.weight, self.lora_a, self.lora_b, self.scale)

    def merged(self):
        w = self.base.weight
        merged = nn.Linear(w.shape[1], w.shape[0], bias=False, device=w.device, dtype=w.dtype)
        merged.weight.data = (w.float() + self.scale * (self.lora_b.float() @ self.lora_a.float())).to(w.dtype)
        return merged


def check_lora(targets, rank):
    unknown = sorted(set(targets) - set(LORA_TARGETS))
    if unknown or not targets:
        raise InputError(f"unknown LoRA target(s) {unknown or targets}; choose among {', '.join(LORA_TARGETS)}")
    if rank < 1:
        raise InputError(f"LoRA rank must be at least 1, got {rank}")


def apply_lora(model, targets, rank, alpha, dropout=0.0):
    check_lora(targets, rank)
    if "output" in targets and model.output is None:  # tied: give the output layer its own module, same weight
        model.output = nn.Linear(model.args.dim, model.args.vocab_size, bias=False, device="meta")
        model.output.weight = model.tok_embeddings.weight
    for module in [model] + [m for layer in model.layers for m in (layer.attention, layer.feed_forward)]:
        for name in targets:
            if isinstance(getattr(module, name, None), nn.Linear):
                setattr(module, name, LoRALinear(getattr(module, name), rank, alpha, dropout))
    return model


def merge_lora(model):
    """Fold every adapter into its base weight; the result has no LoRA modules left."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, LoRALinear):
                setattr(module, name, child.merged())
    return model


def set_trainable(model, mode):
    """mode: full | lora | norm | lora+norm. Frozen weights get no gradient (and so no gradient buffers)."""
    if mode not in ("full", "lora", "norm", "lora+norm"):
        raise InputError(f"unknown mode {mode!r}; use full, lora, norm or lora+norm")
    for name, p in model.named_parameters():
        p.requires_grad_(mode == "full" or ("lora" in mode and ".lora_" in f".{name}")
                         or ("norm" in mode and name.endswith("norm.weight")))
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()  # trained weights are kept in float32; frozen ones stay in the load dtype
    return [p for p in model.parameters() if p.requires_grad]


def trainable_state_dict(model):
    return {n: p.detach().contiguous() for n, p in model.named_parameters() if p.requires_grad}


# -----------------------------------------------------------------------------
# 7. Finetuning
# Training sequences are fixed-length windows of a stream of documents, each <|begin_of_text|> ... <|end_of_text|>.
# Llama 3 was trained so that a token never attends past the BOS of its own document: the causal mask is
# block-diagonal, and RoPE positions restart at 0 at each BOS, so each document is computed exactly as if it
# were alone (the tests check this). A document cut at the window's start is a document of its own, seen without
# its beginning; one cut at the end simply stops. Nothing is learned across a boundary: targets that are a BOS
# (predicting the next document from the end of the last) carry no loss.


def document_mask(tokens, bos_id, flex=False):
    """tokens (B, T) -> (positions (B, T), mask). Built from O(T) document ids: a dense (B, 1, T, T) boolean mask
    for scaled-dot-product attention, or, with flex=True (CUDA), a sparse flex-attention BlockMask."""
    B, T = tokens.shape
    idx = torch.arange(T, device=tokens.device).expand(B, T)
    is_bos = tokens == bos_id
    if not is_bos[:, 1:].any():  # one document per row: plain causal attention (the fused kernels' fast path)
        return None, None
    doc = is_bos.cumsum(1)  # (B, T) document id of each token
    positions = idx - torch.where(is_bos, idx, 0).cummax(1).values  # distance from the document's BOS
    if flex:
        from torch.nn.attention.flex_attention import create_block_mask
        same_doc_causal = lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv)  # noqa: E731
        return positions, create_block_mask(same_doc_causal, B, None, T, T, device=tokens.device)
    causal = torch.ones(T, T, dtype=torch.bool, device=tokens.device).tril()
    return positions, ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def token_losses(model, x, y, bos_id, loss_mask=None, flex=False):
    """Per-token cross-entropy (B, T) and the weights (B, T) that say which tokens count."""
    positions, mask = document_mask(x, bos_id, flex)
    return model(x, mask=mask, positions=positions, targets=y), token_weights(y, bos_id, loss_mask)


def token_weights(y, bos_id, loss_mask=None):
    """Which targets count: never a BOS (that would be learning across documents); only masked-in ones if a mask."""
    return (y != bos_id) if loss_mask is None else (y != bos_id) & loss_mask


def download(url, path):
    """Download with a progress line, resuming a partial download (HTTP Range) and caching the result."""
    import urllib.request

    path = Path(path)
    if path.exists():
        return path
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            if have and r.status != 206:
                have = 0  # the server ignored the range: start over
            total = have + int(r.headers.get("Content-Length", 0))
            with open(part, "ab" if have else "wb") as f:
                done, t0 = have, time.time()
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    print(f"\rdownloading {path.name}: {done / 1e6:.0f}/{total / 1e6:.0f} MB "
                          f"({(done - have) / 1e6 / max(time.time() - t0, 1e-9):.1f} MB/s)", end="", file=sys.stderr)
    except OSError as e:  # URLError, HTTPError, timeouts, a broken connection: what arrived stays in the .part file
        raise InputError(f"cannot download {url} ({getattr(e, 'reason', e)}); check the connection and run again "
                         f"(it resumes), or pass --data FILE") from None
    print(file=sys.stderr)
    if total > have and done < total:  # the connection closed early: never call a partial file complete
        raise InputError(f"download of {url} stopped at {done:,} of {total:,} bytes; run again to resume")
    part.rename(path)
    return path


TINYSTORIES = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/TinyStoriesV2-GPT4-{}.txt"


def read_documents(path):
    """.txt: documents separated by blank lines (TinyStories: by <|endoftext|> lines); .jsonl: one JSON object per
    line, {"text": "..."} for a document or {"messages": [{"role", "content"}, ...]} for a conversation."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"data file {path} does not exist; pass --data tinystories or a .txt / .jsonl file")
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {i}: malformed JSON ({e.msg})") from None
                if isinstance(record, dict) and "messages" in record:
                    check_dialog(record["messages"], f"{path} line {i}")
                    docs.append(record["messages"])
                elif isinstance(record, dict) and isinstance(record.get("text"), str):
                    docs.append(record["text"])
                else:
                    raise InputError(f"{path} line {i}: expected {{\"text\": \"...\"}} or {{\"messages\": [...]}}")
    else:
        text = path.read_text(encoding="utf-8")
        docs = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.split("\n\n")
    docs = [d.strip() if isinstance(d, str) else d for d in docs if not isinstance(d, str) or d.strip()]
    if not docs:
        raise InputError(f"{path} holds no text; give it documents separated by blank lines")
    return docs


_worker_tokenizer = None


def _encode_documents(args):
    global _worker_tokenizer
    tokenizer_path, docs = args
    if _worker_tokenizer is None:
        _worker_tokenizer = Tokenizer(tokenizer_path)
    import numpy as np
    tokens, train_on = [], []
    for d in docs:
        ids, mask = ((_worker_tokenizer.encode(d, bos=True, eos=True), None) if isinstance(d, str)
                     else _worker_tokenizer.encode_dialog_for_training(d))
        tokens += ids
        train_on += [True] * len(ids) if mask is None else mask
    return np.array(tokens, dtype=np.uint32), np.array(train_on, dtype=np.uint8)


def tokenize_to_bin(docs, tokenizer_path, out_path, workers=None):
    """Tokenize documents in parallel (with progress) into a uint32 file: BOS doc EOS BOS doc EOS ...
    Conversations also get OUT.mask.bin: one byte per token, 1 where the token carries loss."""
    import multiprocessing as mp

    chunks = [(str(tokenizer_path), docs[i:i + 1000]) for i in range(0, len(docs), 1000)]
    chat = any(not isinstance(d, str) for d in docs)
    out_path, mask_path = Path(out_path), Path(out_path).with_suffix(".mask.bin")
    tmp, mask_tmp = Path(f"{out_path}.tmp"), Path(f"{mask_path}.tmp")
    with open(tmp, "wb") as f, open(mask_tmp, "wb") as fm, mp.get_context("spawn").Pool(workers or os.cpu_count()) as pool:
        n = 0
        for i, (ids, train_on) in enumerate(pool.imap(_encode_documents, chunks)):
            f.write(ids.tobytes())
            fm.write(train_on.tobytes() if chat else b"")
            n += len(ids)
            log(f"  tokenized {min((i + 1) * 1000, len(docs))}/{len(docs)} documents of {out_path.name}: {n:,} tokens")
    mask_tmp.rename(mask_path) if chat else mask_tmp.unlink()
    tmp.rename(out_path)  # last: the .bin existing means the split is complete
    return load_bin(out_path)


def load_bin(path):
    """-> (tokens, loss mask or None) as read-only np.memmaps."""
    import numpy as np

    mask = Path(path).with_suffix(".mask.bin")
    return (np.memmap(path, dtype=np.uint32, mode="r"),
            np.memmap(mask, dtype=np.uint8, mode="r") if mask.exists() else None)


def prepare_data(data, tokenizer_path, data_dir):
    """--data tinystories | FILE -> (train, val), each (tokens, loss mask or None), tokenized once and cached."""
    data_dir = Path(data_dir)
    out = [data_dir / "train.bin", data_dir / "val.bin"]
    source = data if data == "tinystories" else Path(data)
    if source != data and not source.exists():
        raise InputError(f"data file {source} does not exist; pass --data tinystories or a .txt / .jsonl file")
    stamp = {"source": str(source)} if source == data else {"source": str(source.resolve()), "bytes": source.stat().st_size,
                                                              "mtime": source.stat().st_mtime}
    if all(p.exists() for p in out) and (data_dir / "source.json").exists() and read_json(data_dir / "source.json") == stamp:
        return [load_bin(p) for p in out]  # tokenized before, from this very file
    for p in out:
        p.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    if data == "tinystories":
        splits = [read_documents(download(TINYSTORIES.format(s), data_dir / f"tinystories-{s}.txt")) for s in ("train", "valid")]
    else:
        docs = read_documents(data)
        n_val = max(1, len(docs) // 20) if len(docs) > 1 else 0
        splits = [docs[:len(docs) - n_val] or docs, docs[len(docs) - n_val:] or docs]  # last 5% for validation
    result = [tokenize_to_bin(docs, tokenizer_path, p) for docs, p in zip(splits, out)]
    (data_dir / "source.json").write_text(json.dumps(stamp))
    return result


def get_batch(data, step, batch_size, seq_len, seed, rank=0, world=1, device="cpu"):
    """The batch of one step, drawn from (seed, step) alone: resuming needs only the step, and the ranks of a
    DDP run take disjoint slices of the same global batch, so N processes see what one process would.
    data: (tokens, loss mask or None) -> inputs (B, T), targets (B, T), loss mask of the targets (B, T) or None."""
    tokens, mask = data
    if len(tokens) <= seq_len + 1:
        raise InputError(f"the data has {len(tokens)} tokens, too few for sequences of {seq_len}; "
                         f"use more data or a smaller --seq_len")
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(tokens) - seq_len - 1, (batch_size * world,), generator=g)
    starts = starts[rank * batch_size:(rank + 1) * batch_size].tolist()
    window = torch.stack([torch.from_numpy(tokens[s:s + seq_len + 1].astype("int64")) for s in starts]).to(device)
    loss_mask = None if mask is None else torch.stack(
        [torch.from_numpy(mask[s + 1:s + seq_len + 1].astype(bool)) for s in starts]).to(device)
    return window[:, :-1], window[:, 1:], loss_mask


def cosine_lr(step, lr, warmup, max_steps, min_lr_ratio=0.1):
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    return lr * (min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense, for MFU


def save_training_state(out_dir, model, optimizer, step, run_config):
    """trainable weights (safetensors) + optimizer, step, RNG states and the run's config, written atomically."""
    from safetensors.torch import save_file

    with atomic_directory(Path(out_dir) / "checkpoint") as tmp:
        save_file(trainable_state_dict(model), tmp / "trainable.safetensors", metadata={"format": "pt"})
        torch.save({"optimizer": optimizer.state_dict(), "step": step, "torch_rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}, tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps({**run_config, "step": step}, indent=2))


def read_run(out_dir):
    """The settings a finetune run saved with its checkpoint (checkpoint/run.json)."""
    path = Path(out_dir) / "checkpoint" / "run.json"
    if not path.exists():
        raise InputError(f"{out_dir} holds no finetune checkpoint ({path.name} missing); pass a finetune --out_dir")
    return read_json(path)


def apply_run_lora(model, run):
    """Give a model the LoRA modules of a finetune run (if it used LoRA), so that its saved weights fit."""
    if "lora" in run["mode"]:
        apply_lora(model, run["lora_targets"], run["lora_rank"], run["lora_alpha"], run["lora_dropout"])
    return model


def load_trained(model, out_dir):
    """Load the weights a finetune run saved (LoRA adapters, norms or all) into a model built like the run's."""
    from safetensors.torch import load_file

    path = Path(out_dir) / "checkpoint" / "trainable.safetensors"
    if not path.exists():
        raise InputError(f"no finetune checkpoint at {path}; pass the --out_dir of a finetune run")
    saved, params = load_file(path), dict(model.named_parameters())
    missing = sorted(set(saved) - set(params))
    if missing:
        raise InputError(f"{path} holds weights this model does not have ({missing[:3]}); wrong base model or mode")
    for name, t in saved.items():
        if params[name].shape != t.shape:
            raise InputError(f"{path}: '{name}' has shape {tuple(t.shape)}, the model {tuple(params[name].shape)}; "
                             f"the run used another base model")
        params[name].data = t.to(params[name].device)
    return model


def model_for_run(run, device, dtype, ckpt_dir=None):
    """The base checkpoint of a finetune run, with the run's LoRA modules in place (weights not loaded yet)."""
    args, state_dict = load_checkpoint(ckpt_dir or run["ckpt_dir"])
    context = 131072 if args.use_scaled_rope else 8192  # Llama 3.1+ / Llama 3.0
    if not 2 <= run["seq_len"] <= context:
        raise InputError(f"--seq_len {run['seq_len']} must be between 2 and the model's context of {context} tokens")
    args.max_seq_len = max(run["seq_len"], 256)
    model = apply_run_lora(build_model(args, state_dict, device, dtype, consume=True), run)
    set_trainable(model, run["mode"])
    return model


def finetune(cfg):
    """The training loop. cfg: the namespace finetune.py parses (see its --help for every field)."""
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    device = torch.device(cfg.device or default_device())
    if distributed:
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
    main_process = rank == 0
    say = log if main_process else (lambda msg: None)
    out_dir = Path(cfg.out_dir)
    run = {k: getattr(cfg, k) for k in ("ckpt_dir", "mode", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets",
                                         "seq_len", "data", "seed")}
    run["ckpt_dir"] = str(Path(cfg.ckpt_dir).resolve())
    if cfg.resume:
        if not (out_dir / "checkpoint" / "run.json").exists():
            raise InputError(f"--resume: no checkpoint in {out_dir}; start without --resume")
        saved = read_run(out_dir)
        different = [k for k in ("ckpt_dir", "mode", "lora_rank", "lora_targets") if saved[k] != run[k]]
        if different:
            raise InputError(f"--resume: {out_dir} was trained with other {different} "
                             f"({', '.join(f'{k}={saved[k]}' for k in different)}); use a new --out_dir")
    if cfg.mode not in ("full", "lora", "norm", "lora+norm"):
        raise InputError(f"unknown mode {cfg.mode!r}; use full, lora, norm or lora+norm")
    if "lora" in cfg.mode:  # before the (long) load
        check_lora(cfg.lora_targets, cfg.lora_rank)
    # bf16 weights with bf16 autocast on GPU; float32 on CPU unless asked (trainable weights are float32 either way)
    dtype = resolve_dtype(cfg.dtype, device)
    torch.manual_seed(cfg.seed)
    model = model_for_run(run, device, dtype)
    model.activation_checkpointing = cfg.activation_checkpointing
    tokenizer = Tokenizer(find_tokenizer(cfg.ckpt_dir))
    data_dir = out_dir / "data" if cfg.data != "tinystories" else Path(cfg.data_dir) / "tinystories"
    if main_process:
        train_data, val_data = prepare_data(cfg.data, find_tokenizer(cfg.ckpt_dir), data_dir)
    if distributed:
        torch.distributed.barrier()
    train_data, val_data = load_bin(data_dir / "train.bin"), load_bin(data_dir / "val.bin")
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    say(f"training {n_trainable:,} of {sum(p.numel() for p in model.parameters()):,} parameters ({cfg.mode}); "
        f"{len(train_data[0]):,} training tokens; {world} process(es) on {device}")
    decay = [p for p in params if p.dim() >= 2]  # weight decay on matrices only, never on norms
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=cfg.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    step = 0
    if cfg.resume:
        load_trained(model, out_dir)
        state = torch.load(out_dir / "checkpoint" / "state.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        torch.set_rng_state(state["torch_rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        say(f"resumed {out_dir} at step {step}")
    train_model = torch.nn.parallel.DistributedDataParallel(model) if distributed else model
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32 and device.type == "cuda")
    flex = device.type == "cuda"
    log_path = out_dir / "log.jsonl"
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        kept = [l for l in (log_path.read_text().splitlines() if log_path.exists() and cfg.resume else [])
                if json.loads(l)["step"] <= step]  # a resumed run rewrites what came after its checkpoint
        log_path.write_text("".join(l + "\n" for l in kept))

    def write_log(record):
        if main_process:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def all_sum(*values):
        t = torch.tensor(values, dtype=torch.float64, device=device)
        if distributed:
            torch.distributed.all_reduce(t)
        return t.tolist()

    def evaluate():
        model.eval()
        total, count = 0.0, 0.0
        with torch.no_grad(), autocast:
            for i in range(cfg.eval_batches):
                x, y, loss_mask = get_batch(val_data, i, cfg.batch_size, cfg.seq_len, cfg.seed + 1, rank, world, device)
                losses, weights = token_losses(model, x, y, tokenizer.bos_id, loss_mask, flex)
                total, count = total + (losses * weights).sum().item(), count + weights.sum().item()
        model.train()
        total, count = all_sum(total, count)
        return total / max(count, 1)

    def sample_text():
        g = Llama(model, tokenizer, max_batch_size=1, seed=cfg.seed, fast=True)
        model.eval()
        out = g.text_completion(["Once upon a time"], temperature=0.8, max_gen_len=48)[0]["generation"]
        model.train()
        return out

    model.train()
    try:
        while step < cfg.max_steps:
            t0 = time.time()
            lr = cosine_lr(step, cfg.lr, cfg.warmup_steps, cfg.max_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            batches = [get_batch(train_data, step * cfg.grad_accum + i, cfg.batch_size, cfg.seq_len, cfg.seed, rank,
                                 world, device) for i in range(cfg.grad_accum)]
            # normalise by the tokens of the whole step on all ranks, so that N processes x M micro-batches give
            # exactly the gradient of one big batch (DDP averages over ranks: multiply back by world)
            n_tokens = all_sum(sum(token_weights(y, tokenizer.bos_id, m).sum().item() for _, y, m in batches))[0]
            loss_sum = 0.0
            for i, (x, y, loss_mask) in enumerate(batches):
                sync = not distributed or i == cfg.grad_accum - 1
                with autocast, (train_model.no_sync() if not sync else torch.enable_grad()):
                    losses, weights = token_losses(train_model, x, y, tokenizer.bos_id, loss_mask, flex)
                    loss = (losses * weights).sum()
                    (loss * world / n_tokens).backward()
                loss_sum += loss.item()
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip).item()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            loss = all_sum(loss_sum)[0] / n_tokens
            dt = time.time() - t0
            tokens_per_s = cfg.batch_size * cfg.seq_len * cfg.grad_accum * world / dt
            record = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm, "tokens_per_s": tokens_per_s}
            line = f"step {step}/{cfg.max_steps} | loss {loss:.4f} | lr {lr:.2e} | {tokens_per_s:,.0f} tok/s"
            if device.type == "cuda":
                peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in torch.cuda.get_device_name(device)), None)
                if peak:  # 6 flops per parameter per token (forward + backward), times the processes
                    record["mfu"] = 6 * sum(p.numel() for p in model.parameters()) * tokens_per_s / (peak * world)
                    line += f" | MFU {100 * record['mfu']:.1f}%"
            say(line)
            write_log(record)
            if cfg.eval_every and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                val_loss = evaluate()
                say(f"step {step} | val loss {val_loss:.4f}")
                write_log({"step": step, "val_loss": val_loss})
            if cfg.sample_every and step % cfg.sample_every == 0 and main_process:
                say(f"sample: {sample_text()!r}")
            if main_process and (step % cfg.save_every == 0 or step == cfg.max_steps or step == cfg.stop_at):
                save_training_state(out_dir, model, optimizer, step, run)
            if step == cfg.stop_at:
                say(f"stopped at step {step} as asked (--stop_at); continue with --resume")
                break
    except KeyboardInterrupt:
        if main_process:
            say(f"\ninterrupted: saving step {step} to {out_dir} (continue with --resume)")
            save_training_state(out_dir, model, optimizer, step, run)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()
    return model


# -----------------------------------------------------------------------------
# Command line: checkpoint utilities.
#   python llama.py convert SRC DST --to hf|meta           convert a checkpoint between Meta's and HF's layouts
#   python llama.py export RUN_DIR DST --to hf|meta        merge a finetune run into its base: a full checkpoint
#   python llama.py random DIR [--shape tiny|1B|3B|8B]     a random-weight checkpoint (gibberish; for trying the code)

SHAPES = {  # real Llama 3.x shapes, and a tiny one for trying things out
    "tiny": dict(dim=256, n_layers=4, n_heads=8, n_kv_heads=2, ffn_hidden_dim=768, multiple_of=256, tie_embeddings=True),
    "1B": dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, ffn_hidden_dim=8192, multiple_of=256,
               ffn_dim_multiplier=1.5, tie_embeddings=True),
    "3B": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_hidden_dim=8192, multiple_of=256,
               ffn_dim_multiplier=1.0, tie_embeddings=True),
    "8B": dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_hidden_dim=14336, multiple_of=1024,
               ffn_dim_multiplier=1.3),
}


def bundled_tokenizer():
    """The real Llama 3 tokenizer.model shipped inside Meta's llama-models package (a test dependency)."""
    try:
        import llama_models
    except ImportError:
        raise InputError("no tokenizer given and llama-models is not installed; pass --tokenizer PATH") from None
    return Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description="nano-llama3 checkpoint utilities")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("convert", help="convert a checkpoint between Meta's and Hugging Face's layouts (lossless)")
    c.add_argument("src", help="checkpoint directory in either layout")
    c.add_argument("dst", help="output directory (written atomically)")
    c.add_argument("--to", choices=["hf", "meta"], required=True)
    c.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="the llama3 RoPE factor of a Meta source, which params.json cannot record (32 for 3.2 1B/3B)")
    e = sub.add_parser("export", help="merge a finetune run (LoRA / norms / full) into its base checkpoint")
    e.add_argument("run_dir", help="the --out_dir of a finetune run")
    e.add_argument("dst", help="output directory (written atomically)")
    e.add_argument("--to", choices=["hf", "meta"], required=True)
    e.add_argument("--dtype", default="bfloat16", help="dtype of the written weights (default bfloat16)")
    r = sub.add_parser("random", help="write a random-weight checkpoint of a real shape (its output is gibberish)")
    r.add_argument("out_dir")
    r.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    r.add_argument("--tokenizer", default=None, help="tokenizer.model to copy (default: the one in llama-models)")
    r.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    if a.command == "convert":
        args, state_dict = load_checkpoint(a.src)
        if a.rope_scaling_factor is not None:
            args.rope_scaling_factor = a.rope_scaling_factor
        save_checkpoint(args, state_dict, a.dst, find_tokenizer(a.src), a.to)
    if a.command == "export":
        run = read_run(a.run_dir)
        model = merge_lora(load_trained(model_for_run(run, "cpu", torch.float32), a.run_dir))  # merged in float32
        dtype = resolve_dtype(a.dtype, "cpu")
        state_dict = {k: v.to(dtype) for k, v in model.state_dict().items() if k != "freqs_cis"}
        args = model.args
        save_checkpoint(args, resolve_tied_output(args, state_dict), a.dst, find_tokenizer(run["ckpt_dir"]), a.to)
    if a.command == "random":
        args = ModelArgs(vocab_size=128256, use_scaled_rope=True, **SHAPES[a.shape])
        log(f"writing a random {a.shape}-shaped checkpoint to {a.out_dir}")
        save_meta_checkpoint(args, random_state_dict(args, a.seed), a.out_dir, a.tokenizer or bundled_tokenizer())



if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
