"""
Tests for quantize.py: int8 / int4 weight-only layers against float products with the dequantized
weight (written out here, not taken from quantize.py), the quantization error against its step,
a quantized tiny Transformer against its float twin, QLoRA gradients, and save/load round trips.

    python -m pytest -q test_quantize.py
"""

import copy
import functools
import math
from dataclasses import replace

import pytest
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

import kernels
import llama
import quantize
import speed
import train_speed
from llama import InputError

MODES = [("int8", None), ("int4", 32), ("int4", 64), ("int4", 128)]


def relative_error(y, ref):
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def random_weight(out_features, in_features, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features ** 0.5
    w[0, :5] *= 8  # a few outliers, so that scales differ between rows and groups
    return w


def reference_int8(q, scales):
    return q.float() * scales[:, None]  # (out, in)


def reference_int4(q, scales, zeros, group_size):
    s = scales.float().repeat_interleave(group_size, 1)  # (out, in)
    z = zeros.float().repeat_interleave(group_size, 1)
    return (q.float() - 8) * s + z


def quantized_layer(mode, group_size, w):
    """The layer built from the portable quantization, and its dequantized weight computed here."""
    if mode == "int8":
        q, s = quantize.quantize_int8(w)
        return quantize.Int8Linear(q, s), reference_int8(q, s)
    q, s, z = quantize.quantize_int4(w, group_size)
    return quantize.Int4Linear(q, s, z, group_size), reference_int4(q, s, z, group_size)


def tiny_model(tie=False, **dims):
    """tie=True: tied as Llama 3.2 1B (no output module, or one that shares the embedding);
    tie="shared": an output Linear whose weight is the embedding's. dims: other ModelArgs."""
    args = llama.ModelArgs(**{**dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                                     ffn_hidden_dim=192), **dims}, tie_embeddings=tie is True)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    if tie == "shared":
        model.output.weight = model.tok_embeddings.weight
    with torch.no_grad():
        for name, p in model.named_parameters():
            norm = name.endswith("norm.weight")
            p.copy_(1 + 0.1 * torch.randn_like(p) if norm else torch.randn_like(p) / 8)
    return model.eval()


def quantized_modules(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, quantize.QuantizedLinear)}


def dequantized_twin(model):
    """A float model whose every quantized layer is an nn.Linear holding the dequantized weight."""
    twin = copy.deepcopy(model)
    for name, m in quantized_modules(model).items():
        parent, _, attr = name.rpartition(".")
        linear = nn.Linear(m.in_features, m.out_features, bias=False)
        linear.weight.data = m.dequantize()
        setattr(twin.get_submodule(parent), attr, linear)
    return twin


# --- layers --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 200])  # the kernels, then slices of dequantized rows
def test_layer_equals_product_with_dequantized_weight(mode, group_size, dtype, rows, monkeypatch):
    monkeypatch.setattr(quantize, "SLICE_ELEMENTS", 64 * 256)  # several slices, the last one short
    layer, w = quantized_layer(mode, group_size, random_weight(208, 256))
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 208)
    exact = dtype == torch.float32 and rows > layer.kernel_max_rows  # no bfloat16 anywhere
    assert relative_error(y, x.float() @ w.t()) < (1e-6 if exact else 1e-2)
    assert torch.equal(layer.dequantize(), w)
    assert layer(x.view(1, rows, 256)).shape == (1, rows, 208)


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
def test_layer_takes_strided_and_unaligned_inputs(mode, group_size):
    layer, w = quantized_layer(mode, group_size, random_weight(208, 256))
    h = torch.randn(6, 3, 256, generator=torch.Generator().manual_seed(8)).bfloat16()
    buffer = h.flatten()
    for x in (h[:, -1], buffer[3:3 + 6 * 256].view(6, 256)):  # rows apart; an odd address
        assert relative_error(layer(x), x.float() @ w.t()) < 1e-2


def test_cpu_int4_packing_is_read_back_exactly(monkeypatch):
    q = torch.randint(0, 16, (208, 256), dtype=torch.uint8)  # whole blocks of rows and a short one
    whole = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.int(), 1)
    assert torch.equal(kernels.unpack_cpu_int4(whole, *kernels.cpu_int4_layout()), q)
    monkeypatch.setattr(quantize, "SLICE_ELEMENTS", 64 * 256)
    slices = quantize.row_slices(*q.shape)
    assert len(slices) > 1 and torch.equal(kernels.pack_int4(q, slices), whole)  # the same bytes
    assert torch.equal(quantize.unpack_nibbles(quantize.pack_nibbles(q)), q)


def test_quantization_error_is_within_half_a_step():
    w = random_weight(96, 256)
    q, s = quantize.quantize_int8(w)
    assert q.dtype == torch.int8 and q.abs().max() == 127
    assert ((w - reference_int8(q, s)).abs() <= s[:, None] / 2 * (1 + 1e-5)).all()
    for group_size in (32, 64, 128):
        q, s, z = quantize.quantize_int4(w, group_size)
        assert q.dtype == torch.uint8 and q.max() <= 15
        step = s.float().repeat_interleave(group_size, 1)
        # scale and zero are stored in bfloat16: the grid moves by at most 2^-8 of |zero| + 8 steps
        bound = step / 2 + 2 ** -8 * (z.float().abs().repeat_interleave(group_size, 1) + 8 * step)
        assert ((w - reference_int4(q, s, z, group_size)).abs() <= bound).all()
        assert (w - reference_int4(q, s, z, group_size)).abs().mean() < step.mean() / 3


def reference_w8a8(x, q, scales):
    """w8a8's arithmetic written out in float64: each row of x rounded to integers on its own
    scale (largest |x| -> 127), times the int8 weight, the scales applied after. The rounding as
    the kernel's, x * (127 / amax) in float32: another product can fall on the other side of .5
    (torch's 127 / tensor is 127 * (1 / tensor): a division of two tensors is the C's)"""
    x = x.float().reshape(-1, x.shape[-1])
    amax = x.abs().amax(1, keepdim=True)
    inverse = torch.where(amax > 0, torch.full_like(amax, 127) / amax, 0)
    xr = torch.round(x * inverse).double()
    return xr @ q.double().t() * scales.double() * amax.double() / 127


# tokens: 1 (decoding), 5 (one at a time), 6, 13 (tiles of 6, and the rest); in: 64 (one step);
# out: 4 (one block), 200 (rows past a panel of 64)
@pytest.mark.parametrize("out,n_in", [(4, 64), (200, 256), (68, 2048)])
@pytest.mark.parametrize("tokens", [1, 5, 6, 13])
@pytest.mark.parametrize("portable", [False, True])
def test_w8a8_kernel_equals_its_arithmetic_in_float64(out, n_in, tokens, portable):
    # both builds of the C kernel: plain C (any CPU), and AVX-512 VNNI where this CPU has it
    g = torch.Generator().manual_seed(out + tokens)
    q, s = quantize.quantize_int8(torch.randn(out, n_in, generator=g))
    x = torch.randn(tokens, n_in, generator=g) * 4
    x[tokens // 2] = 0  # a row of zeros: scale 0, no division by it
    w = kernels.w8a8_layout(q)
    assert torch.equal(kernels.w8a8_unlayout(w), q)
    for xi in (x, x.bfloat16()):  # bf16 activations are read as they are
        y = kernels.w8a8_matmul(xi, w, s, portable)
        assert y.dtype == torch.float32 and y.shape == (tokens, out)
        ref = reference_w8a8(xi, q, s)
        assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
        # per token: each row on its own, bit for bit, whichever tile computed it
        assert torch.equal(kernels.w8a8_matmul(xi[-1:], w, s, portable), y[-1:])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 7, 200])
def test_w8a8_layer_rounds_each_token_on_its_own_and_trains_like_int8(dtype, rows):
    int8 = quantize.Int8Linear.from_float(random_weight(208, 256))
    layer = quantize.W8A8Linear.from_float(random_weight(208, 256))
    assert torch.equal(layer.portable()["qweight"], int8.qweight)  # the int8 file's form
    x = torch.randn(rows, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (rows, 208)
    assert not layer(torch.zeros(2, 256, dtype=dtype)).any()  # a row of zeros gives zeros
    if layer.kernel_max_rows >= rows:  # the kernel (on AMX CPUs prefill is int8's: see below)
        assert relative_error(y, reference_w8a8(x, int8.qweight, int8.scales)) < \
            (1e-6 if dtype == torch.float32 else 1e-2)
        # a row of huge activations beside them changes no other row (a shared scale would round
        # them all to zero)
        outlier = torch.full((1, 256), 1e4, dtype=dtype)
        assert torch.equal(layer(torch.cat([x, outlier]))[:rows], y)
    # rounding activations to 127 levels costs about as much as rounding the weights did
    assert relative_error(y, x.float() @ reference_int8(int8.qweight, int8.scales).t()) < 1.5 / 127
    assert layer(x.view(1, rows, 256)).shape == (1, rows, 208)
    layer.kernel_max_rows = int8.kernel_max_rows = 0  # slices of dequantized rows: int8's exactly
    assert torch.equal(layer(x), int8(x))
    xg = x.float().requires_grad_()  # the gradient to the input: dy W, as int8's
    layer(xg).sum().backward()
    assert torch.allclose(xg.grad, int8.dequantize().sum(0).expand(rows, -1), atol=1e-5)


# --- models --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("tie", [False, True, "shared"])
def test_quantized_model_is_close_to_float(mode, group_size, tie):
    model = tiny_model(tie)
    float_model = copy.deepcopy(model)
    tokens = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(tokens)
    assert quantize.quantize_model(model, mode, group_size or 32) is model
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    layers = quantized_modules(model)
    assert len(layers) == 7 * model.args.n_layers + 1
    embedding = float_model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight, embedding)  # lookups stay in float
    x = torch.randn(5, 64 * 3, generator=torch.Generator().manual_seed(5))
    for name, layer in layers.items():  # each product near the float one (int4: 16 levels)
        tied = name == "output" and tie is True
        w = embedding if tied else float_model.get_submodule(name).weight
        xi = x[:, :layer.in_features]
        assert relative_error(layer(xi), xi @ w.t()) < (0.01 if mode == "int8" else 0.1)
    twin = dequantized_twin(model)
    with torch.no_grad():
        logits, prefix = model(tokens), model(tokens[:1, :5])  # slices of rows, then the kernels
        assert relative_error(logits, twin(tokens)) < 1e-5
        assert relative_error(prefix, twin(tokens[:1, :5])) < 2e-2
    # Through the layers the error grows, and random weights give nearly tied logits: loose bounds.
    assert relative_error(logits, expected) < (0.05 if mode == "int8" else 0.45)
    agree = (logits.argmax(-1) == expected.argmax(-1)).float().mean()
    assert agree > (0.9 if mode == "int8" else 0.4)


def test_w8a8_model_is_close_to_the_int8_model_and_decodes_as_it_prefills(tmp_path):
    int8 = quantize.quantize_model(tiny_model(), "int8")
    model = quantize.quantize_model(tiny_model(), "w8a8")
    quantize.save_quantized(model, tmp_path / "w8a8.safetensors")  # saved, it is the int8 file
    with safe_open(tmp_path / "w8a8.safetensors", "pt") as f:
        assert f.metadata()["quantize"] == "int8"
        assert torch.equal(f.get_tensor("output.qweight"), int8.output.qweight)
    layers = [m for m in model.modules() if isinstance(m, quantize.W8A8Linear)]
    assert len(layers) == 7 * model.args.n_layers + 1
    assert not any(isinstance(m, nn.Linear) for m in model.modules())
    for m in layers:
        m.kernel_max_rows = 24  # the kernel on every row, on every CPU
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        logits = model(tokens)
        assert relative_error(logits, int8(tokens)) < 0.05
        with model.kv_cache(2, 12):  # one token at a time: rows quantized alone, as in prefill
            model(tokens[:, :8])
            steps = [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)]
    assert relative_error(torch.cat(steps, 1), logits[:, 8:]) < 1e-5


@pytest.mark.parametrize("cls", [quantize.Int4Linear, quantize.W4A8Linear,
                                 quantize.W8A8Linear])
@pytest.mark.parametrize("rows", [(64, 128, 48), (48, 64)])  # a short block last; or first
def test_concat_equals_quantizing_the_stacked_weight(cls, rows):
    # joined from the kernel's buffers where the rows stack as they are (whole blocks of the CPU
    # int4 layout first), through the portable forms where not: either way the buffers of the
    # stacked float weight quantized at once (rows are quantized independently)
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(n, 256, generator=g) for n in rows]
    group = () if cls is quantize.W8A8Linear else (32,)  # (int8 rows have no groups)
    joined = cls.concat([cls.from_float(w, *group) for w in ws])
    whole = cls.from_float(torch.cat(ws), *group)
    assert (joined.out_features, joined.in_features) == (whole.out_features, 256)
    assert [n for n, _ in joined.named_buffers()] == [n for n, _ in whole.named_buffers()]
    assert all(torch.equal(getattr(joined, n), t) for n, t in whole.named_buffers())


@pytest.mark.parametrize("mode", ["int8", "int4", "w4a8", "w8a8"])
def test_stacked_products_give_the_separate_products_bit_for_bit(mode):
    """wq|wk|wv and w1|w3 as one layer each (speed.for_inference on CPUs): one call instead of
    three or two, and every output row still its own dot product, so the logits are exactly the
    separate layers', in prefill (dequantized slices, or w8a8's kernel) and in decoding (the
    kernels)."""
    separate = quantize.quantize_model(tiny_model(), mode)
    stacked = speed.for_inference(copy.deepcopy(separate), "cpu", torch.float32)
    parts = [m for m in stacked.modules() if isinstance(m, speed.FusedPart)]
    assert len(parts) == 5 * stacked.args.n_layers
    assert all(type(p.fused[0].linear) is type(separate.layers[0].attention.wo) for p in parts)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(7))
    outputs = []
    for model in (separate, stacked):
        with torch.no_grad(), model.kv_cache(2, 12):
            outputs.append([model(tokens[:, :8])] +
                           [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)])
    for a, b in zip(*outputs):
        assert torch.equal(a, b)


def w4a8_reference(x, q, scales, zeros):
    """w4a8's arithmetic written out in float64: x rounded per group of inputs to int8 on its
    own scale (largest |x| -> 127), times (q - 8) s, plus z times the group's exact sum of x."""
    tokens, groups = len(x), scales.shape[1]
    xg = x.double().view(tokens, groups, -1)  # (tokens, groups, group_size)
    amax = xg.abs().amax(-1, keepdim=True)
    xr = torch.round(xg * torch.where(amax > 0, 127 / amax, 0)) * amax / 127
    w = (q.double().view(len(q), groups, -1) - 8) * scales.double()[..., None]  # (out, groups, G)
    return (torch.einsum("ogi,tgi->to", w, xr) +
            torch.einsum("og,tg->to", zeros.double(), xg.sum(-1)))


# in: 2 groups (a block of 16 mostly padding), 18 (a block and a padded one), 64; tokens 1, 3
# and 19 (prefill: two tiles of 8 tokens, then 3 on their own)
@pytest.mark.parametrize("out,n_in,tokens", [(48, 64, 3), (96, 576, 1), (256, 2048, 19)])
@pytest.mark.parametrize("group_size", [32, 64])
@pytest.mark.parametrize("portable", [False, True])
def test_w4a8_kernel_equals_its_arithmetic_in_float64(out, n_in, tokens, group_size, portable):
    # both builds of the C kernel: plain C (any CPU), and AVX-512 VNNI where this CPU has it
    g = torch.Generator().manual_seed(out)
    w, x = torch.randn(out, n_in, generator=g), torch.randn(tokens, n_in, generator=g) * 4
    x[-1, :n_in // 2] = 0  # groups of zeros: scale 0, no division by it
    q, s, z = quantize.quantize_int4(w, group_size)
    packed = kernels.w4a8_layout(q, s, z, group_size)
    assert all(map(torch.equal, kernels.w4a8_unlayout(packed, n_in, group_size), (q, s, z)))
    dequantized = kernels.w4a8_dequantize(packed[1:], n_in, group_size)  # rows 4 onwards, in C
    assert torch.equal(dequantized, quantize.dequantize_int4(q, s, z)[4:])
    y = kernels.w4a8_matmul(x, packed, group_size, portable)
    assert y.dtype == torch.float32 and y.shape == (tokens, out)
    ref = w4a8_reference(x, q, s, z)
    assert (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for t in range(tokens):  # each token on its own
        alone = kernels.w4a8_matmul(x[t:t + 1], packed, group_size, portable)
        assert torch.equal(alone, y[t:t + 1])


def attention_reference(q, k, v):
    """softmax(q k^T / sqrt(hd)) v in float64, each K/V head shared by its group of query heads."""
    B, _, H, hd = q.shape
    kv = k.shape[2]
    q = q.double().reshape(B, kv, H // kv, hd)
    scores = torch.matmul(q, k.double().permute(0, 2, 3, 1)) / math.sqrt(hd)
    y = torch.matmul(torch.softmax(scores, -1), v.double().transpose(1, 2))
    return y.reshape(B, 1, H, hd)


# (B, heads, kv heads, hd, positions): 1B's, 3B's, multi-head, one position
@pytest.mark.parametrize("shape", [(1, 32, 8, 64, 150), (3, 24, 8, 128, 33), (2, 4, 4, 16, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
def test_one_query_attention_kernel_equals_softmax_attention_in_float64(shape, dtype, portable):
    B, H, kv, hd, S = shape
    g = torch.Generator().manual_seed(S)
    cache_k, cache_v = (torch.randn(B, S + 9, kv, hd, generator=g).to(dtype) * 3 for _ in "kv")
    q = (torch.randn(B, 1, H, hd, generator=g) * 3).to(dtype)
    k, v = cache_k[:, :S], cache_v[:, :S]  # views of a cache, as in decoding
    y = kernels.attend_one(q, k, v, portable)
    assert y.dtype == dtype and y.shape == q.shape
    ref = attention_reference(q, k, v)
    # float32 inside: float32's rounding; bf16 out: one rounding to bf16 (2^-9 relative)
    tol = 1e-5 if dtype == torch.float32 else 2 ** -8
    assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


# (B, heads, kv heads, hd, position): 1B's, 3B's head_dim with few heads, multi-head, position 0
@pytest.mark.parametrize("shape", [(1, 32, 8, 64, 150), (2, 6, 2, 128, 33), (2, 4, 4, 16, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
def test_rope_attend_kernel_equals_rope_cache_write_and_attention(shape, dtype, portable):
    """kernels.rope_attend_one against its steps done apart: llama.apply_rope (the model's RoPE,
    here on one position), the cache written at pos, the float64 softmax attention of the rounded
    query over positions 0..pos."""
    B, H, kv, hd, pos = shape
    g = torch.Generator().manual_seed(pos)
    args = llama.ModelArgs(dim=H * hd, n_layers=1, n_heads=H, n_kv_heads=kv, vocab_size=256,
                           ffn_hidden_dim=64, max_seq_len=pos + 9, use_scaled_rope=True)
    freqs = llama.precompute_freqs_cis(args)[pos:pos + 1]  # (1, hd / 2)
    qkv = (torch.randn(B, 1, (H + 2 * kv) * hd, generator=g) * 3).to(dtype)
    caches = [(torch.randn(B, pos + 9, kv, hd, generator=g) * 3).to(dtype) for _ in "kv"]
    k_cache, v_cache = (c.clone() for c in caches)
    y = kernels.rope_attend_one(qkv, torch.view_as_real(freqs[0]), k_cache, v_cache, pos, H,
                                portable)
    q, k, v = qkv.split([H * hd, kv * hd, kv * hd], -1)
    q, k = (llama.apply_rope(t.view(B, 1, -1, hd), freqs) for t in (q, k))
    for cache, new, written in zip(caches, (k, v.view(B, 1, kv, hd)), (k_cache, v_cache)):
        cache[:, pos:pos + 1] = new
        assert (written.double() - cache.double()).abs().max() <= 2 ** -7 * cache.abs().max()
    ref = attention_reference(q, caches[0][:, :pos + 1], caches[1][:, :pos + 1])
    tol = 1e-5 if dtype == torch.float32 else 2 ** -7  # bf16: RoPE's rounding, then the output's
    assert y.shape == (B, 1, H, hd) and (y.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("portable", [False, True])
def test_norm_and_swiglu_kernels_equal_the_models_torch_ops(dtype, portable):
    """kernels.rms_norm and swiglu against llama.RMSNorm and FeedForward's silu(a) * b: the same
    roundings; only the order of a sum, and exp's last bit, may differ (within one bf16 step)."""
    g = torch.Generator().manual_seed(3)
    norm = llama.RMSNorm(2053, 1e-5).to(dtype)  # 2053: a tail past 16 at a time
    with torch.no_grad():
        norm.weight.copy_(torch.rand(2053, generator=g) + 0.5)
    x = (torch.randn(3, 2053, generator=g) * 4).to(dtype)
    h = (torch.randn(3, 2 * 8200, generator=g) * 4).to(dtype)  # 8200: a tail past 16 at a time
    a, b = h.split(8200, -1)
    with torch.no_grad():
        pairs = ((kernels.rms_norm(x, norm.weight, norm.eps, portable), norm(x)),
                 (kernels.swiglu(h, portable), torch.nn.functional.silu(a) * b))
    for out, ref in pairs:
        tol = 1e-6 if dtype == torch.float32 else 2 ** -7
        assert out.dtype == dtype and (out.double() - ref.double()).abs().max() <= \
            tol * ref.abs().max().double()
        if dtype == torch.bfloat16:  # the same roundings: nearly every value the same bf16
            assert (out != ref).float().mean() < 0.02


def test_w4a8_model_decodes_with_the_kernel_and_prefills_with_it_or_as_int4():
    int4 = quantize.quantize_model(tiny_model(), "int4")
    model = quantize.quantize_model(tiny_model(), "w4a8")
    layers = [m for m in model.modules() if isinstance(m, quantize.W4A8Linear)]
    assert len(layers) == 7 * model.args.n_layers + 1
    # the same int4 weights, and the int4 file's form when saved
    for a, b in zip(layers, [m for m in int4.modules() if type(m) is quantize.Int4Linear]):
        assert all(torch.equal(a.portable()[k], b.portable()[k]) for k in b.portable())
    x = torch.randn(1, 64, generator=torch.Generator().manual_seed(1)).bfloat16()
    layer = model.layers[0].attention.wq
    assert torch.allclose(layer(x).double(), w4a8_reference(x.float(), *layer.unpacked()),
                          atol=1e-2, rtol=1e-2)  # (the kernel's float32, rounded to bf16)
    twin = dequantized_twin(int4)  # float layers holding the int4 model's weights
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        for m in layers:  # 48 rows a layer, more than the kernel takes: dequantized products
            m.kernel_max_rows = 16
        assert relative_error(model(tokens), twin(tokens)) < 1e-5
        for m in layers:  # the kernel on every row (prefill on VNNI CPUs without AMX)
            m.kernel_max_rows = 48
        assert relative_error(model(tokens), twin(tokens)) < 0.05
        with model.kv_cache(2, 12):  # two rows a step: the kernel, int8 activations
            model(tokens[:, :8])
            steps = [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)]
    assert relative_error(torch.cat(steps, 1), twin(tokens)[:, 8:12]) < 0.05


@pytest.mark.parametrize("amx,vnni,every_row", [(False, True, True), (True, True, False),
                                                (False, False, False)])
def test_w8a8_and_w4a8_kernels_take_prefill_only_on_vnni_cpus_without_amx(amx, vnni, every_row,
                                                                         monkeypatch):
    monkeypatch.setattr(speed, "cpu_has_amx", lambda: amx)
    monkeypatch.setattr(kernels, "has_vnni", lambda: vnni)
    quantize.vnni_kernel_max_rows.cache_clear()
    try:
        for layer in (quantize.W8A8Linear.from_float(random_weight(16, 64)),
                      quantize.W4A8Linear.from_float(random_weight(16, 64), 32)):
            assert (layer.kernel_max_rows >= 4096) == every_row and layer.kernel_max_rows >= 1
            layer.kernel_max_rows = 3  # one layer's own setting
            assert layer.kernel_max_rows == 3
    finally:
        quantize.vnni_kernel_max_rows.cache_clear()


@pytest.mark.parametrize("portable", [False, True])
def test_bf16_kernel_equals_the_product_in_float64_for_any_number_of_tokens(portable):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(96, 322, generator=g).bfloat16()
    x = torch.randn(29, 322, generator=g).bfloat16()  # two whole tiles of 12 tokens and a part
    packed = kernels.bf16_layout(w)
    assert torch.equal(kernels.bf16_unlayout(packed), w)
    y, ref = kernels.bf16_matmul(x, packed, portable=portable), x.double() @ w.double().t()
    assert y.dtype == torch.float32 and (y.double() - ref).abs().max() <= 1e-5 * ref.abs().max()
    for i in (0, 5, 28):  # each token alone, and in any tile: the same sums
        assert torch.equal(kernels.bf16_matmul(x[i:i + 1], packed, portable=portable), y[i:i + 1])
    assert torch.equal(kernels.bf16_matmul(x[3:10], packed, portable=portable), y[3:10])
    rounded = kernels.bf16_matmul(x, packed, torch.bfloat16, portable)
    assert torch.equal(rounded, y.bfloat16())  # rounded to nearest even, as torch rounds


def test_fast_bf16_decoding_uses_the_kernel_where_the_cpu_has_avx512_bf16(monkeypatch):
    """for_inference's choice forced both ways (it depends on the CPU): with AVX-512 BF16 and no
    AMX (and oneDNN's bf16, forced too), --fast bf16 projections are KernelLinears, and the model
    decodes as its own F.linear products do; without, no KernelLinear."""
    args = llama.ModelArgs(dim=128, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=512,
                           ffn_hidden_dim=256, fused_attention=True)
    torch.manual_seed(0)
    model = llama.Transformer(args)
    for p in model.parameters():
        p.data = (p.data / 4).bfloat16()
    monkeypatch.setattr(kernels, "has_bf16dot", lambda: False)
    plain = speed.for_inference(copy.deepcopy(model), "cpu", torch.bfloat16)
    assert not any(isinstance(m, speed.KernelLinear) for m in plain.modules())
    monkeypatch.setattr(kernels, "has_bf16dot", lambda: True)
    monkeypatch.setattr(speed, "cpu_has_amx", lambda: False)
    monkeypatch.setattr(speed, "can_pack", lambda device, dtype: True)
    fast = speed.for_inference(copy.deepcopy(model), "cpu", torch.bfloat16)
    assert {type(fast.output), type(fast.layers[0].attention.wo),
            type(fast.layers[0].feed_forward.fused_products.linear)} == {speed.KernelLinear}
    tokens = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), fast.kv_cache(2, 10), model.kv_cache(2, 10):
        for t0, t1 in ((0, 6), *((t, t + 1) for t in range(6, 10))):  # prefill, then steps
            y = [m(tokens[:, t0:t1], start_pos=t0) for m in (fast, model)]
            assert relative_error(*y) < 2e-2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_decoding_kernels_equal_the_models_own_steps(dtype):
    """--fast on CPUs (speed.for_inference): one-token steps through kernels.c (RoPE, the cache
    writes and the attention in one call over the stacked wq|wk|wv; RMSNorm; SwiGLU over w1|w3)
    against the same quantized weights in llama.py's own modules, step by step."""
    model = tiny_model()
    for p in model.parameters():  # (not .to(dtype): freqs_cis stays complex)
        p.data = p.data.to(dtype)
    model = quantize.quantize_model(model, "int8")
    fast = copy.deepcopy(model)
    fast.args = replace(fast.args, fused_attention=True)
    speed.for_inference(fast, "cpu", dtype)
    block = fast.layers[0]
    assert (type(block.attention), type(block.attention_norm), type(block.feed_forward)) == (
        speed.KernelAttention, speed.KernelRMSNorm, speed.KernelFeedForward)
    assert hasattr(block.attention, "fused_products") and hasattr(block.feed_forward,
                                                                 "fused_products")
    tokens = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(6))
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    with torch.no_grad(), model.kv_cache(2, 14), fast.kv_cache(2, 14):
        assert relative_error(fast(tokens[:, :8]), model(tokens[:, :8])) < tol
        for t in range(8, 14):
            step = [m(tokens[:, t:t + 1], start_pos=t) for m in (fast, model)]
            assert relative_error(*step) < tol
        written = [m.layers[1].attention.cache.k for m in (fast, model)]
        assert relative_error(*written) < tol  # the C wrote the cache as KVCache.update does


@pytest.mark.parametrize("mode", ["w4a8", "w8a8", "bf16"])
def test_kernel_block_gives_the_modules_steps_bit_for_bit(mode, monkeypatch):
    """speed.KernelBlock's one call of kernels.c a block (decode_block) against the same model's
    modules (one_call off: each kernel called from Python, the products' sums rounded by torch),
    step by step at batch 2: every logit and the cache it wrote the same bits; the plain C's
    build within bf16's rounding."""
    monkeypatch.setattr(speed, "cpu_has_amx", lambda: False)  # bf16: kernels.c's KernelLinear
    monkeypatch.setattr(kernels, "has_bf16dot", lambda: True)  # (its plain C where no BF16 dot)
    model = tiny_model(dim=128, ffn_hidden_dim=384)  # products past packs_like_linear's floor
    for p in model.parameters():
        p.data = p.data.bfloat16()
    model = model if mode == "bf16" else quantize.quantize_model(model, mode)
    model.args = replace(model.args, fused_attention=True)
    speed.for_inference(model, "cpu", torch.bfloat16)
    kind = {"bf16": speed.KernelLinear, "w8a8": quantize.W8A8Linear, "w4a8": quantize.W4A8Linear}
    assert type(model.layers[0].attention.wo) is kind[mode]
    tokens = torch.randint(0, 512, (2, 14), generator=torch.Generator().manual_seed(6))

    def steps():
        with torch.no_grad(), model.kv_cache(2, 14):
            model(tokens[:, :8])  # prefill: the modules
            out = [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 14)]
            return out + [model.layers[1].attention.cache.v.clone()]
    one_call = steps()
    assert all(type(b) is speed.KernelBlock and b in speed.KERNEL_BLOCKS for b in model.layers)
    copy.deepcopy(model)  # (the blocks' raw pointers stay out of the modules)
    monkeypatch.setattr(speed.KernelBlock, "one_call", False)
    modules = steps()
    assert all(torch.equal(a, b) for a, b in zip(one_call, modules))
    monkeypatch.setattr(speed.KernelBlock, "one_call", True)
    monkeypatch.setattr(kernels, "decode_block", functools.partial(kernels.decode_block,
                                                                   portable=True))
    assert all(relative_error(a, b) < 1e-2 for a, b in zip(steps(), modules))


def test_decode_block_refuses_a_block_it_cannot_take():
    """kernels.block_spec checks what the C will read as raw memory: shapes, dtypes, layouts."""
    model = quantize.quantize_model(tiny_model(), "w4a8")
    layer = speed.fuse_products(model, speed.quantized_stack).layers[0]
    a, f = layer.attention, layer.feed_forward
    products = [m.kernel_product() for m in (a.fused_products.linear, a.wo,
                                             f.fused_products.linear, f.w2)]
    norm = layer.attention_norm.weight.bfloat16()
    assert kernels.block_spec(norm, norm, 1e-5, 4, 2, 16, products).hidden == 192
    for bad in ([products[1], products[0], *products[2:]],  # wo where q|k|v goes
                [*products[:3], products[3][:1] + (products[3][1][:, :-1],) + products[3][2:]]):
        with pytest.raises(ValueError, match="decode_block|layout"):
            kernels.block_spec(norm, norm, 1e-5, 4, 2, 16, bad)
    with pytest.raises(ValueError, match="bfloat16 \\(dim,\\) norms"):
        kernels.block_spec(norm.float(), norm, 1e-5, 4, 2, 16, products)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_cached_decoding_matches_the_dequantized_twin(mode):
    model = quantize.quantize_model(tiny_model(), mode)
    twin = dequantized_twin(model)
    tokens = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad(), model.kv_cache(2, 12):
        model(tokens[:, :8])
        steps = [model(tokens[:, t:t + 1], start_pos=t) for t in range(8, 12)]  # (2, 1, vocab)
        expected = twin(tokens)[:, 8:]
    assert relative_error(torch.cat(steps, 1), expected) < 2e-2


def test_quantize_model_quantizes_the_base_of_lora_layers():
    model = llama.apply_lora(tiny_model(), ["wq", "wv"], rank=4, alpha=8)
    lora = model.layers[0].attention.wq
    quantize.quantize_model(model, "int8")
    assert model.layers[0].attention.wq is lora and isinstance(lora.base, quantize.Int8Linear)
    assert isinstance(model.layers[1].attention.wv.base, quantize.Int8Linear)
    assert {n for n, p in model.named_parameters() if "lora" in n} == {
        f"layers.{i}.attention.{w}.lora_{ab}" for i in (0, 1) for w in ("wq", "wv") for ab in "ab"}


# --- QLoRA ---------------------------------------------------------------------------------

class LoRA(nn.Module):
    """base(x) + scale * (x A^T) B^T: llama.LoRALinear's adapter, over any base module."""

    def __init__(self, base, rank=4, scale=2.0):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.base, self.scale = base, scale
        self.lora_a = nn.Parameter(torch.randn(rank, base.in_features, generator=g) / 10)
        self.lora_b = nn.Parameter(torch.randn(base.out_features, rank, generator=g) / 10)

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.lora_a.t()) @ self.lora_b.t()


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("rows", [3, 200])
def test_qlora_gradients_equal_the_float_reference(mode, group_size, rows, monkeypatch):
    monkeypatch.setattr(quantize, "SLICE_ELEMENTS", 64 * 256)
    layer, w = quantized_layer(mode, group_size, random_weight(208, 256))
    seen = []  # the rows of each dequantized slice: never the whole weight at once
    dequantized = layer.dequantized

    def record(*args):
        w = dequantized(*args)
        seen.append(len(w))
        return w

    monkeypatch.setattr(layer, "dequantized", record)
    lora, ref = LoRA(layer), LoRA(nn.Linear(256, 208, bias=False))
    ref.base.weight.data = w
    gen = torch.Generator().manual_seed(4)
    tokens = rows // 2 + 1
    x, dy = torch.randn(2, tokens, 256, generator=gen), torch.randn(2, tokens, 208, generator=gen)
    grads = []
    for module in (lora, ref):
        xi = x.clone().requires_grad_()
        loss = (module(xi) * dy).sum()
        grads.append(torch.autograd.grad(loss, [xi, module.lora_a, module.lora_b]))
    for got, want in zip(*grads):
        assert relative_error(got, want) < 1e-5
    assert seen and max(seen) <= 64
    assert not any(t.requires_grad for t in layer.buffers()) and not list(layer.parameters())


class FloatLinear(nn.Linear):  # a float32 weight, multiplied in the input's dtype
    def forward(self, x):
        return nn.functional.linear(x, self.weight.to(x.dtype))


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("fast_bf16", [True, False])  # bf16 products, or float32 ones
def test_lean_qlora_layer_equals_plain_lora_over_the_dequantized_weight(
        mode, group_size, dropout, fast_bf16, monkeypatch):
    # train_speed.QuantizedLoRALinear (its backward written out) against llama.LoRALinear over an
    # nn.Linear holding the dequantized weight (autograd); the same dropout mask from one seed
    monkeypatch.setattr(quantize, "SLICE_ELEMENTS", 64 * 256)
    monkeypatch.setattr(speed, "bf16_products_fast", lambda: fast_bf16)
    layer, w = quantized_layer(mode, group_size, random_weight(208, 256))
    ref = FloatLinear(256, 208, bias=False)
    ref.weight = nn.Parameter(w, requires_grad=False)
    lean, plain = (llama.LoRALinear(base, 8, 16, dropout) for base in (layer, ref))
    train_speed.for_training(nn.Sequential(lean))
    assert type(lean) is train_speed.QuantizedLoRALinear and type(plain) is llama.LoRALinear
    gen = torch.Generator().manual_seed(5)
    lean.lora_b.data = torch.randn(208, 8, generator=gen) / 10
    plain.lora_a.data, plain.lora_b.data = lean.lora_a.data.clone(), lean.lora_b.data.clone()
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 100, 256, generator=gen).to(dtype)  # 200 rows: the dequantized path
        dy = torch.randn(2, 100, 208, generator=gen).to(dtype)
        grads = []
        for m in (lean, plain):
            torch.manual_seed(0)
            xi = x.clone().requires_grad_()
            y = m.train()(xi)
            grads.append([y] + list(torch.autograd.grad((y.float() * dy).sum(), [xi] + [
                m.lora_a, m.lora_b])))
        tolerance = 1e-5 if dtype == torch.float32 else 2e-2
        for got, want in zip(*grads):
            assert got.dtype == want.dtype and relative_error(got, want) < tolerance
    # an input that needs no gradient (layer 0 under a frozen embedding): no dx is computed
    monkeypatch.setattr(layer, "input_grad", lambda dy: pytest.fail("computed an unused dx"))
    y = lean(x)
    got = torch.autograd.grad((y.float() * dy).sum(), [lean.lora_a, lean.lora_b])
    assert all(g is not None and g.abs().sum() > 0 for g in got)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_model_gradients_flow_through_quantized_layers(mode):
    model = quantize.quantize_model(tiny_model(), mode)
    twin = dequantized_twin(model)
    tokens = torch.randint(0, 512, (2, 80), generator=torch.Generator().manual_seed(7))
    grads = []
    for m in (model, twin):  # the norms and the embedding train; the twin's Linears are frozen
        trained = [p for n, p in m.named_parameters() if "norm" in n or "tok_embeddings" in n]
        grads.append(torch.autograd.grad(m(tokens, targets=tokens).mean(), trained))
    assert len(grads[0]) == 2 * 2 + 2
    for got, want in zip(*grads):
        assert relative_error(got, want) < 1e-4


@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 32)])
def test_gradcheck(mode, group_size):
    layer, _ = quantized_layer(mode, group_size, random_weight(16, 32))
    x = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))


# --- files ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,group_size", [("int8", None), ("int4", 64)])
@pytest.mark.parametrize("tie", [False, True, "shared"])
def test_save_load_round_trip(mode, group_size, tie, tmp_path):
    model = quantize.quantize_model(tiny_model(tie), mode, group_size or 32)
    path = tmp_path / "model.safetensors"
    quantize.save_quantized(model, path)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temporary file left
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"quantize": mode, "group_size": str(group_size)}
        if mode == "int4":  # the portable nibbles, not a kernel's layout
            assert f.get_tensor("layers.0.attention.wq.qweight").shape == (64, 32)
    with torch.device("meta"):
        on_meta = tiny_model(tie)
    tokens = torch.randint(0, 512, (2, 9))
    for loaded in (on_meta, tiny_model(tie)):  # built on the meta device, or with float weights
        quantize.load_quantized(loaded, path)
        want, got = model.state_dict(), loaded.state_dict()
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
        with torch.no_grad():
            assert torch.equal(model(tokens), loaded(tokens))


def test_bad_settings_raise_input_error_before_any_change(tmp_path):
    model = tiny_model()
    for mode, group_size, message in [("int3", 32, "unknown quantization"),
                                      ("int4", 48, "group size 48"),
                                      ("int4", 128, "64 inputs do not split")]:
        with pytest.raises(InputError, match=message):
            quantize.quantize_model(model, mode, group_size)
    assert not quantized_modules(model)
    with pytest.raises(InputError, match="no quantized layers"):
        quantize.save_quantized(model, tmp_path / "q.safetensors")
    save_file({"x": torch.zeros(1)}, tmp_path / "plain.safetensors")
    with pytest.raises(InputError, match="not a quantized model"):
        quantize.load_quantized(tiny_model(), tmp_path / "plain.safetensors")
    quantize.save_quantized(quantize.quantize_model(model, "int8"), tmp_path / "q.safetensors")
    other = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=512,
                            ffn_hidden_dim=256)
    with pytest.raises(InputError, match="config does not match"):
        quantize.load_quantized(llama.Transformer(other), tmp_path / "q.safetensors")
    # a file whose shapes the int8 kernel cannot take (it would crash, not raise)
    odd = llama.ModelArgs(dim=40, n_layers=1, n_heads=5, n_kv_heads=5, vocab_size=64,
                          ffn_hidden_dim=96)
    model = llama.Transformer(odd)
    for _, parent, attr in quantize.weight_slots(model):
        setattr(parent, attr, quantize.Int8Linear.from_float(getattr(parent, attr).weight))
    quantize.save_quantized(model, tmp_path / "odd.safetensors")
    with pytest.raises(InputError, match="multiple of 16 inputs"):
        quantize.load_quantized(llama.Transformer(odd), tmp_path / "odd.safetensors")
    # w8a8: CPUs only, and it reads int8 weights
    with pytest.raises(InputError, match="w8a8 runs on CPUs"):
        quantize.load_quantized(tiny_model(), tmp_path / "q.safetensors", "cuda", "w8a8")
    with pytest.raises(InputError, match="holds int8 weights, not int4"):
        quantize.load_quantized(tiny_model(), tmp_path / "q.safetensors", mode="int4")


# -----------------------------------------------------------------------------
# End to end: generate.py and finetune.py with --quantize

import json
import subprocess
import sys
import time
from pathlib import Path

import checkpoints
import convert
import generate
from test_llama import run_processes

HERE = Path(__file__).parent
META_TOKENIZER = Path(__import__("llama_models").__file__).parent / "llama3" / "tokenizer.model"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    args = llama.ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128256,
                           ffn_hidden_dim=192, multiple_of=32, use_scaled_rope=True)
    path = tmp_path_factory.mktemp("q") / "ckpt"
    convert.save_meta_checkpoint(args, convert.random_state_dict(args, seed=4), path,
                                 META_TOKENIZER)
    return path


def test_generate_py_quantized_from_the_saved_file_equals_quantized_at_load(tiny_ckpt):
    prompt = [128000, 791, 6864, 315]
    # w8a8 multiplies the int8 file's weights: quantized at load, then read from that file
    for mode, also in (("int8", "w8a8"), ("int4", "w4a8")):
        at_load = {m: generate.load(tiny_ckpt, max_seq_len=64, device="cpu", quantize=m)
                   for m in (mode, also) if m}
        assert isinstance(at_load[mode].model.layers[0].attention.wo, quantize.QuantizedLinear)
        expected = {m: g.generate([prompt], 12, temperature=0)[0] for m, g in at_load.items()}
        r = subprocess.run([sys.executable, str(HERE / "quantize.py"), "--ckpt_dir", str(tiny_ckpt),
                            "--mode", mode], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0 and quantize.saved_path(tiny_ckpt, mode).exists(), r.stderr
        for m in at_load:
            saved = generate.load(tiny_ckpt, max_seq_len=64, device="cpu", quantize=m)
            layer = {"w8a8": quantize.W8A8Linear, "w4a8": quantize.W4A8Linear}.get(
                m, quantize.QuantizedLinear)
            attention = saved.model.layers[0].attention  # wq|wk|wv stacked, wo alone
            assert isinstance(attention.wo, layer)
            assert isinstance(attention.fused_products.linear, layer)
            assert saved.generate([prompt], 12, temperature=0)[0] == expected[m]
            if m in ("int8", "int4"):  # the command line: once for each file (w8a8, w4a8)
                continue
            r = subprocess.run([sys.executable, str(HERE / "generate.py"), "--ckpt_dir",
                                str(tiny_ckpt), "--prompt", "The capital of", "--quantize", m,
                                "--temperature", "0", "--max_new_tokens", "8"],
                               capture_output=True, timeout=300)  # bytes: "\r\n" stays
            ids = saved.tokenizer.encode("The capital of", bos=True)
            want = saved.tokenizer.decode(saved.generate([ids], 8, temperature=0)[0][0])
            assert r.returncode == 0, r.stderr.decode()
            assert r.stdout.decode() == "The capital of" + want + "\n"


def test_bench_profile_parts_are_disjoint_and_timers_come_off(tiny_ckpt):
    # bench_profile.py's timers on one decoding step: every part is timed, the nested ones
    # (attention holds its projections and RoPE) are taken apart without counting anything twice,
    # so the parts fit inside the step; afterwards no hook or wrapper is left
    import bench
    import bench_profile

    rope, sample = llama.apply_rope, llama.sample
    for mode, weight_bytes in ((None, 2), ("int4", 0.5)):  # bf16 --fast and int4
        g = generate.load(tiny_ckpt, max_seq_len=64, device="cpu", dtype="bfloat16", fast=True,
                          quantize=mode)
        spent = dict.fromkeys(bench_profile.TIMED, 0.0)
        tokens = torch.tensor([[128000, 791, 6864]])
        with torch.inference_mode(), g.model.kv_cache(1, 8):
            g.model(tokens, 0, last_only=True)
            remove = bench_profile.part_timers(g.model, spent)
            t = time.perf_counter()
            llama.sample(g.model(tokens[:, :1], 3, last_only=True)[:, -1], 0, 1.0)
            step = time.perf_counter() - t
            remove()
        parts = bench_profile.parts(spent)
        attention = g.model.layers[0].attention  # RoPE inside kernels.c's one call, or apart
        one_call = type(attention) is speed.KernelAttention and hasattr(attention, "fused_products")
        assert (parts.pop("rope") == 0) == one_call
        assert all(v > 0 for v in parts.values()) and sum(parts.values()) <= step, parts
        assert llama.apply_rope is rope and llama.sample is sample
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in g.model.modules())
        profile = bench_profile.profile_decode(g, 4, 1)  # the whole profile, a few steps
        assert set(profile["parts_ms"]) == set(bench_profile.PARTS) and profile["total_ms"] > 0
        a = g.model.args  # the layers' matrices: all of them less the output layer
        params = bench.matmul_params(a) - a.vocab_size * a.dim
        assert weight_bytes <= profile["bytes"]["projections"] / params < weight_bytes + 0.2


def test_bench_profile_py_runs_and_refuses_what_it_cannot_profile(tmp_path):
    cmd = [sys.executable, str(HERE / "bench_profile.py"), "--shape", "tiny", "--prompt_len", "4",
           "--new_tokens", "2", "--ckpt_root", str(tmp_path)]
    r = subprocess.run([*cmd, "--impls", "ours_fast", "--json"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    run = json.loads(r.stdout)["profile"]["ours_fast"]
    assert set(run["parts_ms"]) == {"projections", "attention", "rope", "norms", "swiglu",
                                    "output", "sampling", "rest"} and run["total_ms"] > 0
    r = subprocess.run([*cmd, "--impls", "ours"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "error: --impls ours cannot be profiled" in r.stderr


def test_w8a8_refuses_what_it_cannot_do_before_loading(tiny_ckpt, monkeypatch):
    monkeypatch.setattr(checkpoints, "load_checkpoint", None)  # reading weights would fail
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a GPU machine
    for mode in ("w8a8", "w4a8"):
        for kw, message in ((dict(compile=True), "cannot trace"), (dict(device="cuda"), "on CPUs")):
            with pytest.raises(InputError, match=message):
                generate.load(tiny_ckpt, quantize=mode, **{"device": "cpu", **kw})
    with pytest.raises(InputError, match="use --group_size 32"):
        generate.load(tiny_ckpt, quantize="w4a8", group_size=256, device="cpu")


def test_qlora_gradients_equal_lora_over_the_dequantized_base(tiny_ckpt):
    # LoRA over an int4 base (with speed.py's training modules) against llama.py's plain LoRA over a
    # float base holding the dequantized weights: the same losses and adapter gradients
    def build():
        args, sd = checkpoints.load_checkpoint(tiny_ckpt)
        return llama.build_model(replace(args, fused_attention=True), sd, "cpu", torch.float32)

    quantized = quantize.quantize_model(build(), "int4", 32)
    twin = dequantize_into(build(), quantized)
    # 2 x 99 rows: past the kernels' row limit, the products use the dequantized weights in float32
    x = torch.randint(0, 128256, (2, 100), generator=torch.Generator().manual_seed(0))
    results = []
    for model, lean in ((quantized, True), (twin, False)):
        torch.manual_seed(0)
        llama.apply_lora(model, ["wq", "wk", "w2", "output"], 4, 8)
        llama.set_trainable(model, "lora")
        for m in model.modules():
            if isinstance(m, llama.LoRALinear):
                m.lora_b.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
        if lean:
            train_speed.for_training(model)
            assert type(model.layers[0].attention.wq) is train_speed.QuantizedLoRALinear
        losses, weights = llama.token_losses(model.train(), x[:, :-1], x[:, 1:], 128000)
        (losses * weights).sum().backward()
        results.append((losses.detach(), {n: p.grad for n, p in model.named_parameters()
                                          if p.requires_grad}))
    (l_q, g_q), (l_f, g_f) = results
    torch.testing.assert_close(l_q, l_f, atol=2e-4, rtol=2e-4)
    assert sorted(g_q) == sorted(g_f) and len(g_q) == 2 * (3 * 2 + 1)  # A and B of each adapter
    for name in g_q:
        torch.testing.assert_close(g_q[name], g_f[name], atol=1e-4, rtol=1e-3)


def dequantize_into(model, quantized):
    """Give a float model the dequantized weights of its quantized twin."""
    for (module, name), (qmodule, _) in zip(llama.projections(model), llama.projections(quantized)):
        weight = getattr(qmodule, name).dequantize(dtype=torch.float32)
        setattr(module, name, torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False))
        getattr(module, name).weight = torch.nn.Parameter(weight, requires_grad=False)
    return model


def stories(tmp_path):
    corpus = tmp_path / "stories.txt"
    corpus.write_text("\n\n".join(f"Tom had a red ball number {i}. Tom was happy."
                                  for i in range(300)))
    return corpus


def read_log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_finetune_over_an_int4_base_resumes_and_exports_into_the_float_base(tiny_ckpt, tmp_path):
    import finetune

    corpus = stories(tmp_path)
    common = ["--ckpt_dir", str(tiny_ckpt), "--data", str(corpus), "--seq_len", "32",
              "--batch_size", "2", "--grad_accum", "1", "--max_steps", "6", "--lr", "1e-2",
              "--eval_every", "3", "--eval_batches", "2", "--sample_every", "0", "--device", "cpu",
              "--quantize", "int4", "--dtype", "bfloat16", "--lora_dropout", "0.1"]
    model, _ = finetune.main(common + ["--out_dir", str(tmp_path / "whole")])
    assert isinstance(model.layers[0].attention.wq.base, quantize.Int4Linear)
    assert not isinstance(model.output, quantize.QuantizedLinear)  # streamed by the chunked loss
    finetune.main(common + ["--out_dir", str(tmp_path / "cut"), "--stop_at", "3"])
    finetune.main(["--out_dir", str(tmp_path / "cut"), "--resume"])
    logs = [[{k: v for k, v in record.items() if k != "tokens_per_s"}
             for record in read_log(tmp_path / d)] for d in ("whole", "cut")]
    assert logs[0] == logs[1] and len(logs[0]) == 8
    convert.main(["export", str(tmp_path / "whole"), str(tmp_path / "merged"), "--to", "hf",
                  "--dtype", "float32"])
    merged = generate.load(tmp_path / "merged", device="cpu").model
    base = llama.build_model(*checkpoints.load_checkpoint(tiny_ckpt), "cpu", torch.float32)
    assert all(isinstance(getattr(m, n), torch.nn.Linear) for m, n in llama.projections(merged))
    delta = (merged.layers[0].attention.wq.weight - base.layers[0].attention.wq.weight).abs().max()
    assert delta > 0  # the adapters merged into the unquantized base weights


def test_ddp_over_an_int4_base_matches_one_process(tiny_ckpt, tmp_path):
    # QLoRA in two processes of batch 2 against one of batch 4: the same losses
    common = ["--ckpt_dir", str(tiny_ckpt), "--data", str(stories(tmp_path)), "--seq_len", "32",
              "--grad_accum", "1", "--max_steps", "3", "--lr", "1e-2", "--eval_every", "0",
              "--sample_every", "0", "--device", "cpu", "--quantize", "int4"]
    script = str(HERE / "finetune.py")
    logs = []
    for name, n, batch in (("one", 1, "4"), ("two", 2, "2")):
        command = [script, "--batch_size", batch, *common, "--out_dir", str(tmp_path / name)]
        r = (run_processes(n, command) if n > 1 else
             subprocess.run([sys.executable, *command], capture_output=True, text=True,
                            timeout=300))
        assert r.returncode == 0, r.stderr[-2000:]
        logs.append(read_log(tmp_path / name))
    assert len(logs[0]) == 3
    for a, b in zip(*logs, strict=True):
        assert a["step"] == b["step"] and abs(a["loss"] - b["loss"]) < 1e-5 * abs(a["loss"])


def test_finetune_refuses_int4_training_on_cuda_before_loading(tiny_ckpt, tmp_path, monkeypatch):
    import finetune

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU, as far as it can tell
    corpus = tmp_path / "stories.txt"
    corpus.write_text("Tom had a ball.")
    monkeypatch.setattr(checkpoints, "load_checkpoint", lambda *a: pytest.fail("loaded weights"))
    with pytest.raises(InputError, match="use --quantize int8 to train on a GPU"):
        finetune.main(["--ckpt_dir", str(tiny_ckpt), "--data", str(corpus), "--device", "cuda",
                       "--quantize", "int4", "--out_dir", str(tmp_path / "run")])


def test_device_limits_of_each_mode_are_one_line_errors():
    # quantize.check_device holds them all (finetune.py and generate.py ask it before loading)
    with pytest.raises(InputError, match="use --quantize int8 to train on a GPU"):
        quantize.check_device("int4", "cuda", training=True)
    quantize.check_device("int4", "cuda")  # forward only: generation is allowed
    quantize.check_device("int8", "cuda", training=True)
    with pytest.raises(InputError, match="runs on CPUs"):
        quantize.check_device("w4a8", "cuda")
