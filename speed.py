"""
Speed paths beside llama.py, applied by swapping modules in at one assembly point (generate.load
and finetune.py call for_inference / for_training); llama.py itself keeps one plain path. Each
swapped-in module computes what the module it replaces computes (the tests compare them). One rule
for how: a module that keeps its weights becomes a subclass in place (its __class__: another
forward or backward), a module with state of its own (packed or stacked weights) replaces the old
one in its parent.

- CPU, bf16 generation (where oneDNN has native bf16 kernels): weights packed once into oneDNN's
  blocked layout (PackedLinear), wq|wk|wv and w1|w3 as one product each; the memory-mapped
  originals are handed back to the OS as they are packed.
- CPU, training: products with frozen bf16 weights run in float32 where bf16 products are slow
  (no AMX); RMSNorm, SwiGLU and LoRA backwards written out so that no float32 copy of an
  activation is kept; the output layer's cross-entropy a chunk at a time, never holding the
  (tokens, vocab) logits; freed memory handed back to the OS before each step and before the
  logits.
- Devices and dtypes: the best the machine has unless asked (bf16 on GPUs, float32 on CPUs).
- GPUs: the one-token decoding step compiled with torch.compile over a static KV cache
  (static_decoding), and compiled flex attention for packed documents (use_flex_attention).
"""

import ctypes
import functools
import math
import mmap
import os
import sys
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

import int8dot
import llama


# -----------------------------------------------------------------------------
# Devices and dtypes: the best the machine has, unless asked; a bad --device is one line

def default_device():
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype, device):
    """bf16 on GPUs that support it, float16 on other GPUs, float32 on CPU unless asked."""
    if dtype is not None:
        if dtype not in DTYPES:
            raise llama.InputError(f"unknown dtype {dtype!r}; use one of {', '.join(DTYPES)}")
        return DTYPES[dtype]
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device.type == "mps" else torch.float32


def resolve_device(device):
    """--device: cpu, cuda, cuda:N or mps, checked against what this torch can use."""
    try:
        device = torch.device(device or default_device())
    except RuntimeError:
        raise llama.InputError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise llama.InputError("--device cuda, but this torch has no CUDA (or no GPU is visible); "
                         "use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise llama.InputError("--device mps, but MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise llama.InputError(f"unsupported device {device}; use cpu, cuda or mps")
    return device


# -----------------------------------------------------------------------------
# Memory: hand pages back to the operating system

def release_freed_memory():
    """glibc keeps the pages of freed blocks for reuse, long after the tensors are gone: hand them
    back."""
    if sys.platform == "linux":
        ctypes.CDLL(None).malloc_trim(0)


def release_pages(t):
    """Drop a memory-mapped tensor's pages (madvise DONTNEED) once nothing will read it again; only
    whole pages inside it are touched. Without this the original stays resident beside its
    converted copy."""
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, end // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first and sys.platform == "linux" and t.device.type == "cpu":
        # 4: MADV_DONTNEED
        ctypes.CDLL(None).madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 4)


def convert(state_dict, device, dtype):
    """Each weight in dtype on device, dropping the source's pages as soon as it is converted:
    loading bf16 weights as float32 then peaks near the float32 copy alone, not both. Consumes
    state_dict."""
    out = {}
    for key in list(state_dict):
        t = state_dict.pop(key)
        out[key] = t.to(device=device, dtype=dtype)
        if out[key].data_ptr() != t.data_ptr():
            release_pages(t)
    return out


# -----------------------------------------------------------------------------
# CPU bf16 generation: pre-packed weights

@functools.cache
def cpu_has_amx():
    """AMX tiles (Intel Sapphire Rapids and later) multiply bf16 several times faster than
    AVX-512."""
    return bool(getattr(torch._C._cpu, "_init_amx", lambda: False)())


@functools.cache
def bf16_products_fast():
    """Whether bf16 matrix products beat float32 on this CPU: with AMX (Intel), or with AVX-512 BF16
    on AMD (Zen 4 and later), several times over; elsewhere (Intel without AMX) oneDNN's bf16
    products run at about half the float32 rate. From the CPU's flags, so every run of a machine
    takes the same branch (a resumed run then repeats the same arithmetic)."""
    try:
        info = open("/proc/cpuinfo").read()
    except OSError:
        return cpu_has_amx()
    return cpu_has_amx() or ("AuthenticAMD" in info and " avx512_bf16" in info)


# oneDNN's ISAs below AVX512_CORE_BF16 (ONEDNN_MAX_CPU_ISA can cap a CPU at one of them)
ONEDNN_ISAS_WITHOUT_BF16 = ("SSE41", "AVX", "AVX2", "AVX2_VNNI", "AVX2_VNNI_2", "AVX512_CORE",
                            "AVX512_CORE_VNNI")


def can_pack(device, dtype):
    """Only where oneDNN multiplies bf16 natively (AVX512_BF16 or AMX): there a packed weight's
    inner product and F.linear's matmul run the same brgemm kernel. Without it they are two other
    gemm kernels, one reading W and one W transposed, whose sums can round differently (and the
    packed layout is the plain one)."""
    cpu = getattr(torch._C._cpu, "_get_cpu_capability", dict)()
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", os.environ.get("DNNL_MAX_CPU_ISA", "ALL")).upper()
    return (device.type == "cpu" and dtype == torch.bfloat16
            and torch.ops.mkldnn._is_mkldnn_bf16_supported()
            and bool(cpu.get("avx512_bf16") or cpu.get("amx_bf16"))
            and isa not in ONEDNN_ISAS_WITHOUT_BF16)


class PackedLinear(nn.Module):
    """A frozen bf16 Linear for CPU inference, its weight arranged once in oneDNN's blocked layout.
    F.linear re-arranges a bf16 weight on every call, so one-token decoding reads each weight ~1.6x
    over; pre-arranged, it runs near memory bandwidth. Same kernel, same arithmetic: bit-identical
    results, for the weights that packs_like_linear allows."""

    def __init__(self, weight):
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1)

    def forward(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


class FusedProducts(nn.Module):
    """Several Linears that read the same input (wq, wk, wv; w1, w3) as one product of their
    weights stacked (linear: a PackedLinear, or a quantized layer's concat): one pass over the
    input and one call, each output row the same dot product as before. part(i) stands in for
    the i-th Linear."""

    def __init__(self, linear, sizes):
        super().__init__()
        self.linear, self.sizes = linear, sizes
        self.input, self.outputs, self.unread = None, None, set()

    def part(self, i):
        return FusedPart(self, i)

    def compute(self, x, i):
        if x is not self.input or i not in self.unread:
            self.input, self.outputs = x, self.linear(x).split(self.sizes, -1)
            self.unread = set(range(len(self.sizes)))
        out = self.outputs[i]
        self.unread.discard(i)
        if not self.unread:  # every part read: do not hold on to the activations
            self.input = self.outputs = None
        return out


class FusedPart(nn.Module):
    def __init__(self, fused, i):
        super().__init__()
        self.fused, self.i = [fused], i  # a list: the shared module is owned by its first part only

    def forward(self, x):
        return self.fused[0].compute(x, self.i)


ONEDNN_MIN_PRODUCT = 16 ** 3


def packs_like_linear(weight):
    """Whether F.linear multiplies by this weight in oneDNN for every number of rows: a bf16
    product of rows x in x out <= 16**3 multiply-adds takes another kernel, whose sums can round
    differently (on AMX: one value in a tiny model's one-token steps). Meta's F.linear decides
    per call; a packed or fused weight would always be oneDNN's, so smaller weights (only tiny
    models have them) stay plain Linears."""
    return weight.shape[0] * weight.shape[1] > ONEDNN_MIN_PRODUCT


def fuse_products(model, fuse):
    """wq, wk, wv and w1, w3 of every layer as FusedProducts of fuse(linears) (None: left
    apart), one group at a time: peak memory stays near one copy of the weights."""
    for module, names in [(m, n) for layer in model.layers
                          for m, n in ((layer.attention, ("wq", "wk", "wv")),
                                       (layer.feed_forward, ("w1", "w3")))]:
        linears = [getattr(module, n) for n in names]
        stacked = fuse(linears)
        if stacked is None:
            continue
        fused = FusedProducts(stacked, [m.out_features for m in linears])
        for i, (n, m) in enumerate(zip(names, linears)):
            if isinstance(m, nn.Linear):
                release_pages(m.weight)
            setattr(module, n, fused.part(i))
        module.fused_products = fused  # owns the stacked weight
    return model


def packed_stack(linears):
    """fuse_products' fuse for bf16 Linears: their weights stacked and packed. Not for quantized
    layers (they stack with their own concat), nor for small weights: fused, one would be
    multiplied by oneDNN where F.linear is not."""
    if all(type(m) is nn.Linear and packs_like_linear(m.weight) for m in linears):
        return PackedLinear(torch.cat([m.weight for m in linears]))
    return None


def quantized_stack(linears):
    """fuse_products' fuse for quantized layers of one kind: their concat (quantize.py's
    Int8Linear, Int4Linear, W8A8Linear, W4A8Linear), rows stacked as they are."""
    kind = type(linears[0])
    if all(type(m) is kind for m in linears) and hasattr(kind, "concat"):
        return kind.concat(linears)
    return None


def pack_for_cpu_inference(model):
    """Every projection (and the output, a packed copy when tied to the embedding) as packed
    products, wq|wk|wv and w1|w3 each as one."""
    fuse_products(model, packed_stack)
    for module, name in llama.projections(model):
        child = getattr(module, name)
        if isinstance(child, nn.Linear) and packs_like_linear(child.weight):
            setattr(module, name, PackedLinear(child.weight))
            if child.weight is not model.tok_embeddings.weight:
                release_pages(child.weight)
    return model


# -----------------------------------------------------------------------------
# GPU generation: the one-token step compiled over a static KV cache

class StaticKVCache(llama.KVCache):
    """Writes at a tensor position and returns the whole cache: the same shapes at every step, so
    torch.compile makes one graph for all positions (attention is masked past the position)."""

    def update(self, start_pos, k, v):
        idx = start_pos + torch.arange(k.shape[1], device=k.device)
        self.k.index_copy_(1, idx, k)
        self.v.index_copy_(1, idx, v)
        return self.k, self.v


def static_decoding(generator, compile=True):
    """Swap a llama.Llama's decoding step and KV cache for static-shape ones (compiled with
    torch.compile unless compile=False). The cache is kept between generations of the same batch
    size: a new one would mean a new compilation."""
    model, a = generator.model, generator.model.args
    compiled = torch.compile(model, dynamic=False) if compile else model

    @contextmanager
    def kv_cache(batch_size, max_len):
        w, cache = model.tok_embeddings.weight, model.layers[0].attention.cache
        if cache is None or cache.k.shape[0] != batch_size:
            for layer in model.layers:
                layer.attention.cache = StaticKVCache(batch_size, a.max_seq_len,
                                                      layer.attention.n_kv_heads, a.head_dim,
                                                      w.dtype, w.device)
        yield

    def step(tokens, start_pos, last_only=False):
        T, device = tokens.shape[1], tokens.device
        positions = start_pos + torch.arange(T, device=device)  # (T,)
        mask = torch.arange(a.max_seq_len, device=device)[None, :] <= positions[:, None]  # (T, S)
        forward = compiled if T == 1 else model  # prompts are prefilled eagerly: their lengths vary
        return forward(tokens, torch.tensor(start_pos, device=device), mask=mask,
                       positions=positions, last_only=last_only)

    generator.step, generator.kv_cache = step, kv_cache
    return generator


class DecodeAttention(llama.Attention):
    """For one-token steps on CPUs (--fast): torch's fused attention kernel takes 0.1-0.7 ms for a
    single query over 100-500 positions, more than the rest of the step's attention. This is
    Meta's arithmetic (scores, float32 softmax, values) with the query heads grouped by their K/V
    head, so K and V are read in place rather than repeated."""

    def attend(self, q, k, v, mask):
        if q.shape[1] > 1 or mask is not None:
            return super().attend(q, k, v, mask)
        return self.attend_one(q, k, v)

    def attend_one(self, q, k, v):
        B, S, n_kv, hd = k.shape
        q = q.reshape(B, n_kv, self.n_heads // n_kv, hd)  # (B, n_kv, n_rep, hd): head kv*n_rep + r
        scores = torch.matmul(q, k.permute(0, 2, 3, 1)) / math.sqrt(hd)  # (B, n_kv, n_rep, S)
        y = torch.matmul(F.softmax(scores.float(), dim=-1).type_as(q), v.transpose(1, 2))
        return y.reshape(B, 1, self.n_heads, hd)  # (B, 1, heads, hd)


class KernelAttention(DecodeAttention):
    """DecodeAttention's one-token step as one call of int8dot.py's C kernel (scores, softmax and
    values of every head, in float32) instead of about ten torch ops, each of which costs more
    than the arithmetic at one query. Where the C kernel builds, for bf16 and float32."""

    def attend_one(self, q, k, v):
        return int8dot.attend_one(q, k, v)


def decode_attention(dtype, head_dim):
    """The one-token attention class for this dtype: the C kernel's if it builds here."""
    return (KernelAttention if dtype in int8dot.ATTEND_DTYPES and head_dim % 16 == 0 and
            int8dot.available() else DecodeAttention)


def for_inference(model, device, dtype, compile=False):
    """The inference speed paths that apply on this device: on CPUs, packed weights for bf16 (not
    with compile: torch.compile cannot trace oneDNN's packed layout), wq|wk|wv and w1|w3 of
    quantized layers each as one product, and one-token attention without the fused kernel where
    the model uses it (--fast)."""
    cpu = torch.device(device).type == "cpu" and not compile
    if can_pack(torch.device(device), dtype) and not compile:
        pack_for_cpu_inference(model)
    if cpu:
        fuse_products(model, quantized_stack)
        plain = [layer.attention for layer in model.layers
                 if type(layer.attention) is llama.Attention and layer.attention.fused]
        attention = decode_attention(dtype, model.args.head_dim) if plain else None
        for module in plain:  # (the C is built only where --fast attention is used)
            module.__class__ = attention
    return model


# -----------------------------------------------------------------------------
# Training on CPUs: lean autograd Functions. Each keeps for backward only what its backward needs.

def matmul_dtype(x):
    """The dtype to multiply frozen weights in: float32 for bf16/fp16 on CPUs where bf16 products
    are slow (bf16_products_fast); x's own elsewhere. Both accumulate in float32."""
    if x.device.type != "cpu" or x.dtype not in (torch.bfloat16, torch.float16):
        return x.dtype
    return x.dtype if bf16_products_fast() else torch.float32


class Scratch:
    """Buffers reused by every call with the same slot name ("weight", "in", "out", "x_a", and
    quantize.py's "dequantized" ones): each holds one value at a time, which the caller consumes
    before asking for the slot again. Fresh 16-67 MB
    float32 temporaries would each cost page faults and heap growth."""
    buffers = {}

    @classmethod
    def get(cls, slot, shape, dtype, device):
        n, buf = math.prod(shape), cls.buffers.get(slot)
        if buf is None or buf.numel() < n or buf.dtype != dtype or buf.device != device:
            buf = cls.buffers[slot] = torch.empty(n, dtype=dtype, device=device)
        return buf[:n].view(shape)

    @classmethod
    def upcast(cls, t, dtype, slot="weight"):
        return t if t.dtype == dtype else cls.get(slot, t.shape, dtype, t.device).copy_(t)


def flat(t):
    return t.reshape(-1, t.shape[-1])  # (..., n) -> (rows, n)


def needs_grad(*tensors):
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


class RMSNormFunction(torch.autograd.Function):
    """llama.RMSNorm's forward, ops unchanged, with its backward written out: it keeps x and one
    number per row, not autograd's float32 copy of x."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        # x.float(), but float64 stays (gradcheck)
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        rstd = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        ctx.save_for_backward(x, weight, rstd)
        return (x32 * rstd).type_as(x) * weight

    @staticmethod
    def backward(ctx, grad):
        x, weight, rstd = ctx.saved_tensors
        normed = x.to(rstd.dtype) * rstd
        d_normed = (grad * weight).to(rstd.dtype)
        dx = rstd * (d_normed - normed * (d_normed * normed).mean(-1, keepdim=True))
        d_weight = None
        if ctx.needs_input_grad[1]:
            d_weight = (grad * normed.type_as(x)).flatten(0, -2).sum(0).to(weight.dtype)
        return dx.to(x.dtype), d_weight, None


class LeanRMSNorm(llama.RMSNorm):
    def forward(self, x):
        if needs_grad(x, self.weight):
            return RMSNormFunction.apply(x, self.weight, self.eps)
        return super().forward(x)


class SwiGLU(torch.autograd.Function):
    """silu(a) * b. Autograd would keep a, b and silu(a); a and b are enough (silu is cheap to
    redo)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return F.silu(a) * b

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        # silu_backward: what autograd itself runs
        return torch.ops.aten.silu_backward(grad * b, a), grad * F.silu(a)


class LeanFeedForward(llama.FeedForward):
    def forward(self, x):
        a, b = self.w1(x), self.w3(x)
        return self.w2(SwiGLU.apply(a, b) if needs_grad(a, b) else F.silu(a) * b)


class LoRAProduct(torch.autograd.Function):
    """y = x W^T + scale * (x_a A^T) B^T with W frozen and x_a = dropout(x), and its backward
    written out. Autograd would keep a float32 copy of x for each adapter (A and B are float32).
    Here only x_a (the activation itself, shared by wq, wk and wv) and the thin (tokens, rank)
    product are kept, and the products run in matmul_dtype, their float32 operands in scratch
    buffers."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_a, weight, lora_a, lora_b, scale):
        c = matmul_dtype(x)
        xc = Scratch.upcast(flat(x), c, "in")
        u = (flat(x_a).to(c) if x_a is not x else xc) @ lora_a.to(c).t()  # (tokens, rank)
        y = Scratch.get("out", (len(xc), weight.shape[0]), c, x.device) if c != x.dtype else None
        y = (torch.mm(xc, Scratch.upcast(weight, c).t(), out=y)
             .addmm_(u, lora_b.to(c).t(), alpha=scale))
        ctx.save_for_backward(x if weight.requires_grad else None, x_a, weight, lora_a, lora_b, u)
        ctx.scale, ctx.x_shape, ctx.dropout = scale, x.shape, x_a is not x
        return y.to(x.dtype).view(*x.shape[:-1], -1)  # (..., out)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x, x_a, weight, lora_a, lora_b, u = ctx.saved_tensors
        c, scale = u.dtype, ctx.scale
        dy = Scratch.upcast(flat(dy), c, "in")  # (tokens, out)
        du, d_lora_a, d_lora_b = adapter_grads(dy, x_a, lora_a, lora_b, u, scale)
        d_weight = (dy.t() @ flat(x).to(c)).to(weight.dtype) if ctx.needs_input_grad[2] else None
        dx = (Scratch.get("out", (len(dy), weight.shape[1]), c, dy.device) if c != x_a.dtype
              else None)
        dx = torch.mm(dy, Scratch.upcast(weight, c), out=dx)  # (tokens, in): frozen weight's share
        # the adapter's share, added to dx when x_a is x
        dx_a = du @ lora_a.to(c) if ctx.dropout else None
        if not ctx.dropout:
            dx.addmm_(du, lora_a.to(c))
        as_x = lambda g: None if g is None else g.to(x_a.dtype).view(ctx.x_shape)  # noqa: E731
        return as_x(dx), as_x(dx_a), d_weight, d_lora_a, d_lora_b, None


def adapter_grads(dy, x_a, lora_a, lora_b, u, scale):
    """The adapter's share of a LoRA backward pass, dy (tokens, out) and u = x_a A^T (tokens, rank)
    in the matmul dtype: du = scale dy B (tokens, rank), and the gradients of A and B."""
    c = dy.dtype
    du = (dy @ lora_b.to(c)).mul_(scale)  # (tokens, rank)
    d_lora_b = (dy.t() @ u).mul_(scale).to(lora_b.dtype)  # (out, rank)
    # its own scratch slot: dy may be in "in"
    d_lora_a = (du.t() @ Scratch.upcast(flat(x_a), c, "x_a")).to(lora_a.dtype)  # (rank, in)
    return du, d_lora_a, d_lora_b


class LeanLoRALinear(llama.LoRALinear):
    def forward(self, x):
        x_a = self.dropout(x) if self.dropout.p and self.training else x
        return LoRAProduct.apply(x, x_a, self.base.weight, self.lora_a, self.lora_b, self.scale)


class QuantizedLoRAProduct(torch.autograd.Function):
    """A LoRALinear over a quantized base (quantize.py's layers: base.product(x) and
    base.input_grad(dy)), y = base(x) + scale (x_a A^T) B^T with x_a = dropout(x), its backward
    written out as LoRAProduct's is: it keeps x_a and the thin (tokens, rank)
    product, where autograd would keep a float32 copy of x for each adapter."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, x_a, lora_a, lora_b, base, scale):
        c = matmul_dtype(x)
        u = flat(x_a).to(c) @ lora_a.to(c).t()  # (tokens, rank)
        y = flat(base.product(x))  # (tokens, out)
        y.add_(u @ lora_b.to(c).t(), alpha=scale)
        ctx.save_for_backward(x_a, lora_a, lora_b, u)
        ctx.base, ctx.scale, ctx.dropout = base, scale, x_a is not x
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, dy):
        x_a, lora_a, lora_b, u = ctx.saved_tensors
        grads = adapter_grads(flat(dy).to(u.dtype), x_a, lora_a, lora_b, u, ctx.scale)
        du, d_lora_a, d_lora_b = grads
        if not any(ctx.needs_input_grad[:2]):  # e.g. layer 0's wq: frozen embedding and norm
            return None, None, d_lora_a, d_lora_b, None, None
        dx, dx_a = ctx.base.input_grad(dy), (du @ lora_a.to(du.dtype)).view(x_a.shape)
        if not ctx.dropout:  # x_a is x: one gradient
            return dx.add_(dx_a), None, d_lora_a, d_lora_b, None, None
        return dx, dx_a.to(x_a.dtype), d_lora_a, d_lora_b, None, None


class QuantizedLoRALinear(llama.LoRALinear):
    def forward(self, x):
        x_a = self.dropout(x) if self.dropout.p and self.training else x
        return QuantizedLoRAProduct.apply(x, x_a, self.lora_a, self.lora_b, self.base, self.scale)


class HeadCrossEntropy(torch.autograd.Function):
    """Per-token cross-entropy of a frozen output layer's logits (LoRA, norm tuning). Token t's
    loss depends on its own hidden state alone, so the forward pass computes d loss_t / d h_t right
    away ((softmax - one-hot) W) and keeps only that (N, dim): the (N, vocab) float32 logits, their
    softmax and gradient are never kept for backward, which scales it row by row. Tokens go a chunk
    at a time, the weight a slice at a time, multiplied in matmul_dtype."""
    # (tokens, vocab) float32 logits of at most 256 MB; weight slices
    max_logits, weight_rows = 2**26, 8192

    @staticmethod
    def forward(ctx, h, weight, targets):  # h: (N, dim) final-normed hidden states, targets: (N,)
        c, vocab = matmul_dtype(h), weight.shape[0]
        # logits and losses: float32 (float64 in gradcheck)
        acc = torch.promote_types(c, torch.float32)
        losses = torch.empty(len(h), dtype=acc, device=h.device)
        grad_h = torch.zeros(h.shape, dtype=c, device=h.device) if ctx.needs_input_grad[0] else None
        rows, cols = max(1, HeadCrossEntropy.max_logits // vocab), HeadCrossEntropy.weight_rows
        for i in range(0, len(h), rows):
            hc, t = h[i:i + rows].to(c), targets[i:i + rows, None]
            logits = torch.empty(len(hc), vocab, dtype=acc, device=h.device)  # (rows, vocab)
            for j in range(0, vocab, cols):
                logits[:, j:j + cols] = hc @ Scratch.upcast(weight[j:j + cols], c).t()
            target_logit, top = logits.gather(1, t), logits.amax(1, keepdim=True)
            probs = logits.sub_(top).exp_()  # in place: one (rows, vocab) buffer throughout
            total = probs.sum(1, keepdim=True)
            losses[i:i + rows] = (total.log() + top - target_logit)[:, 0]
            if grad_h is not None:
                minus_one = torch.full(t.shape, -1.0, dtype=acc, device=h.device)
                d_logits = probs.div_(total).scatter_add_(1, t, minus_one)
                for j in range(0, vocab, cols):
                    grad_h[i:i + rows].addmm_(d_logits[:, j:j + cols].to(c),
                                              Scratch.upcast(weight[j:j + cols], c))
        ctx.save_for_backward(grad_h)
        ctx.dtype = h.dtype
        return losses

    @staticmethod
    def backward(ctx, grad_losses):
        grad_h, = ctx.saved_tensors
        return (grad_h * grad_losses[:, None]).to(ctx.dtype), None, None


class ChunkedCrossEntropy(llama.CrossEntropy):
    def forward(self, h, output, targets):
        if h.device.type == "cpu" and torch.is_grad_enabled():
            release_freed_memory()  # the forward pass's temporaries, before the logits
        if type(output) is not nn.Linear or needs_grad(output.weight):
            return super().forward(h, output, targets)
        return (HeadCrossEntropy.apply(h.flatten(0, 1), output.weight, targets.flatten())
                .view(targets.shape))


def for_training(model):
    """Swap in the lean training modules: each is a subclass of the module it replaces, with the
    same parameters and the same forward arithmetic (only the backward is written out), so the
    class is swapped in place. Call after apply_lora and set_trainable."""
    lean = {llama.RMSNorm: LeanRMSNorm, llama.FeedForward: LeanFeedForward,
            llama.LoRALinear: LeanLoRALinear, llama.CrossEntropy: ChunkedCrossEntropy}
    for module in model.modules():
        if type(module) is llama.LoRALinear and hasattr(module.base, "input_grad"):
            module.__class__ = QuantizedLoRALinear  # over quantize.py's layers
        elif type(module) in lean and (type(module) is not llama.LoRALinear
                                       or type(module.base) is nn.Linear):
            module.__class__ = lean[type(module)]
    if next(model.parameters()).device.type == "cpu":
        # hand back what the last backward pass freed, before each step
        model.register_forward_pre_hook(
            lambda module, args: release_freed_memory() if module.training else None)
    return model


# -----------------------------------------------------------------------------
# GPU training: flex attention skips the masked-out blocks of packed documents (compiled: GPUs only)

class FlexAttention(llama.Attention):
    """Attention through flex_attention, from the same masks (same weights: its class is swapped
    in). self.flex, shared by every layer: the kernel and the BlockMasks made so far (causal ones
    by shape, and the last document mask's: every layer of one forward pass gets the same mask,
    converted once)."""

    def attend(self, q, k, v, mask):
        from torch.nn.attention.flex_attention import create_block_mask

        # q: (B, T, heads, head_dim); mask: (B, 1, T, S) booleans or None: causal
        B, T, S, flex = q.shape[0], q.shape[1], k.shape[1], self.flex
        if mask is None:
            if (B, T, S) not in flex["causal"]:
                flex["causal"][B, T, S] = create_block_mask(lambda b, h, i, j: i >= j, B, None, T,
                                                            S, device=q.device)
            block = flex["causal"][B, T, S]
        else:
            if flex.get("mask") is not mask:
                flex.update(mask=mask, block=create_block_mask(
                    lambda b, h, i, j: mask[b, 0, i, j], B, None, T, S, device=q.device))
            block = flex["block"]
        y = flex["kernel"](q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                           block_mask=block, enable_gqa=q.shape[2] != k.shape[2])
        return y.transpose(1, 2)


def use_flex_attention(model):
    from torch.nn.attention.flex_attention import flex_attention

    kernel = (torch.compile(flex_attention, dynamic=False) if model.freqs_cis.is_cuda
              else flex_attention)
    shared = {"kernel": kernel, "causal": {}}
    for layer in model.layers:
        layer.attention.flex = shared
        layer.attention.__class__ = FlexAttention
    return model
