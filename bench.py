"""
Benchmarks: llama.py against Hugging Face transformers on the same random-weight checkpoint, in one
run, with the same prompt and thread count, plus the machine's memory bandwidth and the decode
roofline it implies.

    python bench.py                                  # Llama 3.2 1B shape, float32 and bf16
    python bench.py --shape 8B --dtypes bfloat16 --new_tokens 16 --skip_batch8 --skip_prefill
    python bench.py --json                           # the same figures as JSON
    python bench.py --profile --new_tokens 16        # one decoded token split into its parts
    python bench.py --scale --new_tokens 32          # tensor parallel and FSDP2, per process

Checkpoints are made on first use under bench_ckpt/ (random weights of the real shape, HF layout;
never committed). Every measurement runs in a fresh process so that its peak resident memory
(VmHWM) is its own.
"""

import argparse
import copy
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import checkpoints
import convert
import generate
import llama
import parallel
import quantize
import speed
import w4a8

HERE = Path(__file__).parent


# ----------------------------------------------------------------------------- checkpoints

def make_checkpoint(shape, out_dir):
    """Random bf16 weights of a real shape, in HF's layout (made once; never committed)."""
    if (out_dir / "config.json").exists():
        return out_dir
    args = llama.ModelArgs(vocab_size=128256, use_scaled_rope=True, **convert.SHAPES[shape])
    llama.log(f"making a random {shape}-shaped checkpoint in {out_dir} (once)")
    convert.save_hf_checkpoint(args, convert.random_state_dict(args), out_dir,
                               convert.bundled_tokenizer(), max_shard_bytes=2 * 2**30)
    return out_dir


def weight_bytes(args, dtype_bytes):
    with torch.device("meta"):
        n = sum(p.numel() for p in llama.Transformer(args).parameters())
    return n * dtype_bytes


def decode_bytes_per_token(args, dtype_bytes):
    """Bytes of weights read to decode one token: every matrix, but only one row of an untied
    embedding."""
    n = weight_bytes(args, dtype_bytes)
    return n if args.tie_embeddings else n - (args.vocab_size - 1) * args.dim * dtype_bytes


def best_time(fn, repeats=5):
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)  # best of a few: the machine is shared


def read_bandwidth(gib):
    """GB/s of reading far more memory than the caches hold: the faster of a sum and of float32
    matrix-vector products (they read at different rates; the machine can do at least the better
    one)."""
    # 32 MiB matrices: each may fit the cache, all of them do not
    mats, v = torch.ones(max(1, round(gib * 32)), 4096, 2048), torch.ones(1, 2048)
    total = mats.numel() * 4 / best_time(mats.sum) / 1e9
    matvec = mats.numel() * 4 / best_time(lambda: [torch.nn.functional.linear(v, m)
                                                   for m in mats]) / 1e9
    return max(total, matvec)


def bf16_linear(w):
    """w as bf16 decoding multiplies it here: pre-packed for oneDNN where this CPU allows it."""
    if speed.can_pack(torch.device("cpu"), torch.bfloat16):
        return speed.PackedLinear(w)
    return lambda x: torch.nn.functional.linear(x, w)


def kernel_rates(copies=32):
    """The fastest kernels torch has here for what the model does: a bf16 matrix-vector product
    (weights pre-packed for oneDNN, as llama.py decodes; GB/s over copies x 32 MiB), and a
    512 x 2048 x 8192 matrix product (GFLOP/s) in float32 and in bf16 (weights pre-packed too)."""
    mats = [bf16_linear(torch.randn(8192, 2048, dtype=torch.bfloat16)) for _ in range(copies)]
    v = torch.ones(1, 2048, dtype=torch.bfloat16)
    rates = {"bf16_matvec_gb_s":
             copies * 8192 * 2048 * 2 / best_time(lambda: [m(v) for m in mats], 3) / 1e9}
    x, w = torch.randn(512, 2048), torch.randn(8192, 2048)
    rates["f32_gemm_gflop_s"] = (2 * 512 * 2048 * 8192
                                 / best_time(lambda: torch.nn.functional.linear(x, w)) / 1e9)
    packed, xb = mats[0], x.bfloat16()
    rates["bf16_gemm_gflop_s"] = 2 * 512 * 2048 * 8192 / best_time(lambda: packed(xb)) / 1e9
    del mats
    rates.update(quantized_kernel_rates(copies))
    return rates


def quantized_kernel_rates(copies=32):
    """The same for quantize.py's layers, in weights per second: the one-row kernel over copies x
    16M weights (decoding reads each weight once), and dequantizing slices of rows into bf16 (what
    each product of many rows does before its bf16 product). They bound the quantized rows:
    decoding at most this matrix-vector rate over bf16's (bf16_matvec_gb_s / 2 weights/s); prefill
    of n tokens at most 1 / (1 + bf16 GEMM rate / (2 n dequantize rate)) of bf16's. w8a8 converts
    no weight: its 512 x 2048 x 8192 product (activations rounded to int8 included) is its prefill
    rate."""
    w, v, rates = torch.randn(8192, 2048) / 45, torch.ones(1, 2048, dtype=torch.bfloat16), {}
    x = torch.randn(512, 2048, dtype=torch.bfloat16)
    int8 = quantize.Int8Linear.from_float(w)
    for mode, layer in (("int8", int8), ("int4", quantize.Int4Linear.from_float(w, 32))):
        layers = [copy.deepcopy(layer) for _ in range(copies)]
        rates[f"{mode}_matvec_gweights_s"] = copies * w.numel() / best_time(
            lambda: [m.kernel(v) for m in layers], 3) / 1e9
        slices = quantize.row_slices(*w.shape)
        rates[f"{mode}_dequantize_gweights_s"] = w.numel() / best_time(
            lambda: [layer.dequantized(a, b, torch.bfloat16) for a, b in slices]) / 1e9
        rates[f"{mode}_kernel_gemm_gflop_s"] = 2 * 512 * w.numel() / best_time(
            lambda: layer.kernel(x)) / 1e9  # the one-row kernel given 512 rows: slower still
    # the same int8 weights; each layer packs its own copy
    layers = [quantize.W8A8Linear(int8.qweight, int8.scales) for _ in range(copies)]
    rates["w8a8_matvec_gweights_s"] = copies * w.numel() / best_time(
        lambda: [m(v) for m in layers], 3) / 1e9
    rates["w8a8_gemm_gflop_s"] = 2 * 512 * w.numel() / best_time(lambda: layers[0](x)) / 1e9
    return rates


def matmul_params(args):
    """Parameters in matrix products per token: every layer's matrices and the output layer."""
    # an untied embedding is a lookup, not a product; nor are the norms
    untied_embedding = 0 if args.tie_embeddings else args.vocab_size * args.dim
    return weight_bytes(args, 1) - untied_embedding - (2 * args.n_layers + 1) * args.dim


# ------------------------------------------------------------- one measurement, in a child process

def peak_rss_gb():
    """This process's peak resident memory. VmHWM, not ru_maxrss: ru_maxrss carries the parent's
    peak over fork+exec."""
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status")
                    if l.startswith("VmHWM")) * 1024 / 1e9
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def prompt_ids(n, batch=1):
    g = torch.Generator().manual_seed(0)
    return torch.cat([torch.full((batch, 1), 128000),
                      torch.randint(1000, 100000, (batch, n - 1), generator=g)], 1)


def lora_step_child(impl, ckpt, dtype, a):
    """Tokens/s and peak memory of LoRA training steps: rank 8 on every attention and MLP
    projection, batch 1 x 512 tokens, AdamW; ours against transformers + peft."""
    tokens = prompt_ids(a.prefill_len + 1)
    x, y = tokens[:, :-1], tokens[:, 1:]
    if impl == "transformers":
        from peft import LoraConfig, get_peft_model
        from transformers import LlamaForCausalLM

        model = get_peft_model(LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype), LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=[
                "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        model.config.use_cache = False

        def loss_fn():  # HF shifts labels itself
            return model(input_ids=x, labels=tokens[:, :-1].clone()).loss
    else:
        args, sd = checkpoints.load_checkpoint(ckpt)
        args = replace(args, max_seq_len=a.prefill_len)
        args = replace(args, fused_attention=True)
        model = llama.build_model(args, speed.convert(sd, "cpu", dtype), "cpu", dtype)
        if impl in QUANTIZED:  # QLoRA: LoRA over the quantized base
            quantize.quantize_model(model, QUANTIZED[impl], release=speed.release_pages,
                                    output=False)  # as finetune.py does
        model = llama.apply_lora(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], 8, 16)
        llama.set_trainable(model, "lora")
        speed.for_training(model)
        model.activation_checkpointing = a.activation_checkpointing

        def loss_fn():
            losses, weights = llama.token_losses(model, x, y, 128000)
            return (losses * weights).sum() / weights.sum()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for _ in range(a.lora_steps + 1):  # the first step is a warm-up
        t = time.perf_counter()
        loss_fn().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
    return {"lora_step_tok_s": a.prefill_len / (sum(times[1:]) / len(times[1:])),
            "lora_peak_rss_gb": peak_rss_gb()}


# generate.py --fast --quantize MODE
QUANTIZED = {"ours_int8": "int8", "ours_w8a8": "w8a8", "ours_int4": "int4",
             "ours_w4a8": "w4a8"}


def accuracy_child(ckpt, a):
    """The quantized models against the bf16 model on the same weights, teacher-forced on real text
    (this README): relative error of the logits, KL(bf16 || quantized) and top-1 agreement."""
    text = (HERE / "README.md").read_text()
    g = generate.load(ckpt, max_seq_len=a.accuracy_tokens, device="cpu", dtype="bfloat16",
                      fast=True)
    tokens = torch.tensor([g.tokenizer.encode(text, bos=True)[:a.accuracy_tokens]])
    with torch.inference_mode():
        ref = g.model(tokens)[0]  # (T, vocab) float32
        out = {}
        for impl, mode in QUANTIZED.items():
            model = generate.load(ckpt, max_seq_len=a.accuracy_tokens, device="cpu", fast=True,
                                  quantize=mode).model
            for m in model.modules():  # w4a8: its kernel on every row, as in decoding
                if isinstance(m, quantize.W4A8Linear):
                    m.kernel_max_rows = tokens.shape[1]
            q = model(tokens)[0]
            kl = torch.nn.functional.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True,
                                            reduction="none").sum(-1)
            out[impl] = {"logits_rel_error": ((q - ref).norm() / ref.norm()).item(),
                         "kl_mean": kl.mean().item(), "top1_agreement":
                         (q.argmax(-1) == ref.argmax(-1)).float().mean().item(),
                         "tokens": tokens.shape[1]}
    return out


def child(impl, ckpt, dtype_name, a):
    torch.set_num_threads(a.threads)
    dtype = speed.DTYPES[dtype_name]
    if impl == "accuracy":
        print(json.dumps(accuracy_child(ckpt, a)))
        return
    if a._lora:
        print(json.dumps(lora_step_child(impl, ckpt, dtype, a)))
        return
    if a._profile:
        print(json.dumps(profile_child(impl, ckpt, a)))
        return
    out = {}
    t0 = time.perf_counter()
    if impl == "transformers":
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    else:
        g = generate.load(ckpt, max_seq_len=1024, max_batch_size=8, device="cpu", dtype=dtype_name,
                          fast=impl != "ours", quantize=QUANTIZED.get(impl))
    out["load_s"], out["load_peak_rss_gb"] = time.perf_counter() - t0, peak_rss_gb()

    def decode(batch, prompt_len, new):
        """-> (seconds to the first new token, tokens/s of the rest, new tokens per row)"""
        ids = prompt_ids(prompt_len, batch)
        if impl == "transformers":
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
            ttft = time.perf_counter() - t
            t = time.perf_counter()
            hf.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                        pad_token_id=0)
            total = time.perf_counter() - t
            return ttft, (new - 1) * batch / max(total - ttft, 1e-9), new
        t, t_first, steps = time.perf_counter(), None, 0
        for _, _, cur_pos, _ in g.generate_steps(ids.tolist(), new, temperature=0):
            t_first = t_first or time.perf_counter()
            steps += 1
        end = time.perf_counter()
        return t_first - t, (steps - 1) * batch / max(end - t_first, 1e-9), steps

    with torch.inference_mode():
        decode(1, 8, 4)  # warm-up
        out["ttft_s"], out["decode_b1_tok_s"], out["decode_b1_tokens"] = \
            decode(1, a.prompt_len, a.new_tokens)
        if not a.skip_batch8:
            _, out["decode_b8_tok_s"], _ = decode(8, a.prompt_len, a.new_tokens)
        if not a.skip_prefill:
            ids = prompt_ids(a.prefill_len)
            t = time.perf_counter()
            if impl == "transformers":
                hf(ids, logits_to_keep=1)
            else:
                with g.model.kv_cache(1, a.prefill_len):
                    g.model(ids, 0, last_only=g.fast)
            out["prefill_tok_s"] = a.prefill_len / (time.perf_counter() - t)
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


# --------------------------------------------------- profile: one decoded token split into parts

PROFILED = ("ours_fast", *QUANTIZED)  # bf16 --fast and each quantized width
PARTS = {"projections": "wq wk wv wo w1 w2 w3 (packed or quantized)",
         "attention": "scores, softmax, values, KV cache write",
         "rope": "RoPE on q and k", "norms": "RMSNorm", "swiglu": "silu(w1 x) * w3 x",
         "output": "the output layer", "sampling": "llama.sample",
         "rest": "the total less the parts: embedding, residual adds, the loop, dispatch"}


def layer_bytes(layer):
    """Bytes of weights one product of this layer reads (its format's, scales included; a fused
    wq|wk|wv or w1|w3 counted at its first part)."""
    if isinstance(layer, speed.FusedPart):
        return layer_bytes(layer.fused[0].linear) if layer.i == 0 else 0
    if isinstance(layer, speed.PackedLinear):
        return layer.packed.numel() * layer.packed.element_size()
    if isinstance(layer, quantize.W8A8Linear):  # oneDNN's packed int8 weight, and the scales
        return layer.out_features * layer.in_features + layer.scales.nbytes
    return sum(t.nbytes for t in [*layer.parameters(), *layer.buffers()])


TIMED = ("attn_proj", "ffn_proj", "attn_all", "ffn_all", "rope", "norms", "output", "sampling")


def part_timers(model, spent):
    """Adds each part's seconds into spent (TIMED keys): forward hooks on the modules
    (perf_counter; CPU ops are synchronous) and wrappers of llama.apply_rope and llama.sample.
    -> a function that removes them all."""
    def timed(fn, key):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[key] += time.perf_counter() - t
            return out
        return wrapper

    def hook(module, key):
        starts = []
        return [module.register_forward_pre_hook(lambda m, a: starts.append(time.perf_counter())),
                module.register_forward_hook(lambda m, a, out: spent.__setitem__(
                    key, spent[key] + time.perf_counter() - starts.pop()))]

    handles = hook(model.output, "output")
    for module, name in llama.projections(model):
        if module is not model:  # attention's and the MLP's projections, apart
            key = "attn_proj" if isinstance(module, llama.Attention) else "ffn_proj"
            handles += hook(getattr(module, name), key)
    for m in model.modules():
        for cls, key in ((llama.RMSNorm, "norms"), (llama.Attention, "attn_all"),
                         (llama.FeedForward, "ffn_all")):
            handles += hook(m, key) if isinstance(m, cls) else []
    rope, sample = llama.apply_rope, llama.sample
    llama.apply_rope, llama.sample = timed(rope, "rope"), timed(sample, "sampling")

    def remove():
        llama.apply_rope, llama.sample = rope, sample
        for h in handles:
            h.remove()
    return remove


def parts(spent):
    """part_timers' figures (nested: attention's include its projections and RoPE) -> PARTS but
    the rest."""
    return {"projections": spent["attn_proj"] + spent["ffn_proj"],
            "attention": spent["attn_all"] - spent["attn_proj"] - spent["rope"],
            "rope": spent["rope"], "norms": spent["norms"],
            "swiglu": spent["ffn_all"] - spent["ffn_proj"], "output": spent["output"],
            "sampling": spent["sampling"]}


def profile_decode(g, prompt_len, new_tokens):
    """One decoded token (batch 1, greedy, as bench's decode) split into PARTS. Steps alternate
    between plain ones and ones with timers on every part (put on and taken off between steps,
    outside the clock), so a slow spell of a shared machine hits both alike: each part is its
    median over the timed steps, the total the median of the plain ones, and 'rest' the total less
    the parts (the timers' own cost is in no part). -> ms and bytes read per part, and totals."""
    spent, steps, remove, t = dict.fromkeys(TIMED, 0.0), {False: [], True: []}, None, None
    for _, _, pos, _ in g.generate_steps(prompt_ids(prompt_len).tolist(), 5 + 2 * new_tokens,
                                         temperature=0):
        now = time.perf_counter()
        if t is not None and pos > prompt_len + 4:  # the prompt and 4 warm-up steps uncounted
            steps[remove is not None].append({"total": now - t, "pos": pos, **spent})
        remove = remove() if remove else part_timers(g.model, spent)  # on every other step
        spent.update(dict.fromkeys(TIMED, 0.0))
        t = time.perf_counter()
    if remove:
        remove()
    timed = {k: 1e3 * statistics.median(s[k] for s in steps[True]) for k in TIMED}
    total = 1e3 * statistics.median(s["total"] for s in steps[False])
    ms = parts(timed)
    ms["rest"] = total - sum(ms.values())
    model, a = g.model, g.model.args
    kv = model.tok_embeddings.weight.element_size()  # the KV cache's dtype
    positions = [s["pos"] for s in steps[False] + steps[True]]
    nbytes = {"projections": sum(layer_bytes(getattr(m, n)) for m, n in llama.projections(model)
                                 if m is not model),
              "output": layer_bytes(model.output),
              # K and V of every cached position (at the median step), every layer
              "attention": 2 * statistics.median(positions) * a.n_kv_heads * a.head_dim * kv
                           * a.n_layers,
              "sampling": a.vocab_size * 4}  # argmax over float32 logits
    logits = torch.randn(1, a.vocab_size)  # generate.py's default sampling, for comparison
    top_p = 1e3 * best_time(lambda: llama.sample(logits, 0.6, 0.9, 0, g.generator))
    timed_total = 1e3 * statistics.median(s["total"] for s in steps[True])
    return {"total_ms": total, "timed_total_ms": timed_total, "parts_ms": ms, "bytes": nbytes,
            "tokens": len(steps[False]), "timed_tokens": len(steps[True]),
            "positions": [min(positions), max(positions)],
            "top_p_sampling_ms": top_p}


def profile_child(impl, ckpt, a):
    g = generate.load(ckpt, max_seq_len=a.prompt_len + 2 * a.new_tokens + 8, max_batch_size=1,
                      device="cpu", dtype="bfloat16", fast=True, quantize=QUANTIZED.get(impl))
    bandwidth = read_bandwidth(1)  # here and now: a shared machine's changes from run to run
    with torch.inference_mode():
        return {**profile_decode(g, a.prompt_len, a.new_tokens), "read_bandwidth_gb_s": bandwidth}


def best(old, new):
    """The better of two runs' figures: the higher rate, the lower time and memory."""
    if old is None or new is None:
        return None
    return {k: (max if k.endswith("tok_s") else min)(v, old.get(k, v)) for k, v in new.items()}


def run_child(impl, ckpt, dtype, a, lora=False, profile=False):
    cmd = [sys.executable, __file__, "--_child", impl, "--_ckpt", str(ckpt), "--dtypes", dtype,
           "--threads", str(a.threads), "--prompt_len", str(a.prompt_len),
           "--new_tokens", str(a.new_tokens), "--prefill_len", str(a.prefill_len),
           "--lora_steps", str(a.lora_steps), "--accuracy_tokens", str(a.accuracy_tokens)] \
        + ["--skip_batch8"] * a.skip_batch8 \
        + ["--skip_prefill"] * a.skip_prefill \
        + ["--activation_checkpointing"] * a.activation_checkpointing + ["--_lora"] * lora \
        + ["--_profile"] * profile
    what = " LoRA step" if lora else " profile of a decoded token" if profile else ""
    llama.log(f"measuring {impl} {dtype}{what} ...")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        llama.log(f"  {impl} {dtype} failed: "
                  f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# --------------------------------------------------- scale: tensor parallel and FSDP2, per process
# The processes of one machine stand in for GPUs. They share its cores and memory bandwidth, and
# gloo sends each all-reduce through shared memory and the kernel: these runs show what each
# process holds, and only an upper bound on what communication costs; NCCL between GPUs is another
# world. Each run is its own torchrun; rank 0 prints every rank's figures.

SCALE_RUNS = (("decode", 1), ("decode", 2), ("ddp", 2), ("fsdp", 2))


def resident_gb(field="VmRSS"):
    return next(int(l.split()[1]) for l in open("/proc/self/status")
                if l.startswith(field)) * 1024 / 1e9


def reset_peak_rss():  # VmHWM starts again from VmRSS (Linux: clear_refs 5)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def tp_decode_child(ckpt, a):
    """Tensor-parallel bf16 --fast decoding, batch 1: this process's weights and tokens/s."""
    g = generate.load(ckpt, max_seq_len=a.prompt_len + a.new_tokens, device="cpu",
                      dtype="bfloat16", fast=True)
    planned = parallel.bytes_per_process(g.model.args, parallel.world()[1], "bf16")
    with torch.inference_mode():
        g.generate(prompt_ids(8).tolist(), 4, temperature=0)  # warm-up
        t, steps = None, 0
        for _ in g.generate_steps(prompt_ids(a.prompt_len).tolist(), a.new_tokens, temperature=0):
            t, steps = t or time.perf_counter(), steps + 1  # timed from the first new token
        tok_s = (steps - 1) / (time.perf_counter() - t)
    return {"planned_weights_gb": planned / 1e9, "rss_after_load_gb": resident_gb(),
            "peak_rss_gb": peak_rss_gb(), "decode_b1_tok_s": tok_s}


def train_step_child(kind, ckpt, a):
    """--scale_mode training steps (bf16 frozen weights, activation checkpointing, AdamW) under
    DDP (a whole copy in each process) or FSDP2 (fully_shard, as finetune.py --fsdp): this
    process's bytes of parameters, gradients and AdamW state, and its peak memory in the steps."""
    device = parallel.init_processes(torch.device("cpu"))
    args, sd = checkpoints.load_checkpoint(ckpt)
    args = replace(args, max_seq_len=a.prefill_len, fused_attention=True)
    # copies of the weights, not the checkpoint's mapped pages (which every process would count):
    # each process's own memory is what a GPU would hold
    sd = {k: t.to(torch.bfloat16, copy=True) for k, t in sd.items()}
    model = llama.build_model(args, sd, device, torch.bfloat16)
    del sd
    if "lora" in a.scale_mode:
        llama.apply_lora(model, ["wq", "wk", "wv", "wo", "w1", "w2", "w3"], 8, 16)
    params = llama.set_trainable(model, a.scale_mode)
    model.activation_checkpointing = True
    step_model = model
    if kind == "fsdp":
        parallel.shard_for_training(model, device)
        params = [p for p in model.parameters() if p.requires_grad]  # the shards
    else:
        step_model = torch.nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
    speed.for_training(model)
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    x = prompt_ids(a.prefill_len + 1)
    speed.release_freed_memory()
    before = resident_gb()
    reset_peak_rss()
    times = []
    for _ in range(a.lora_steps + 1):  # the first one is a warm-up (AdamW's state appears)
        t = time.perf_counter()
        losses, weights = llama.token_losses(step_model, x[:, :-1], x[:, 1:], 128000)
        ((losses * weights).sum() / weights.sum()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # the gradients stay, to be counted
        times.append(time.perf_counter() - t)
    states = [t for s in optimizer.state.values() for t in s.values() if t.dim()]
    gb = lambda ts: sum(parallel.local_bytes_of(t) for t in ts) / 1e9  # noqa: E731
    return {"params_gb": gb(model.parameters()), "grads_gb": gb(p.grad for p in params),
            "adamw_gb": gb(states), "rss_before_gb": before, "step_peak_rss_gb": peak_rss_gb(),
            "step_s": statistics.median(times[1:])}


def scale_child(kind, ckpt, a):
    torch.set_num_threads(a.threads)
    out = tp_decode_child(ckpt, a) if kind == "decode" else train_step_child(kind, ckpt, a)
    every = [None] * parallel.world()[1]
    torch.distributed.all_gather_object(every, out)
    print(json.dumps(every))  # (other ranks print to /dev/null)
    parallel.end_processes()


def scale(ckpt, a):
    """bench.py --scale: each of SCALE_RUNS under torchrun, the cores split among its processes."""
    results = {"machine": machine_info(a), "mode": a.scale_mode, "scale": []}
    for kind, n in SCALE_RUNS:
        threads = max(1, a.threads // n)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(n), __file__, "--_scale", kind, "--_ckpt", str(ckpt), "--threads",
               str(threads), "--prompt_len", str(a.prompt_len), "--new_tokens", str(a.new_tokens),
               "--prefill_len", str(a.prefill_len), "--lora_steps", str(a.lora_steps),
               "--scale_mode", a.scale_mode]
        llama.log(f"measuring {kind} over {n} process(es), {threads} thread(s) each ...")
        r = subprocess.run(cmd, capture_output=True, text=True)
        ranks = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
        if ranks is None:
            llama.log(f"  failed: {(r.stderr.strip().splitlines() or [r.returncode])[-1]}")
        results["scale"].append({"kind": kind, "processes": n, "threads": threads,
                                 "ranks": ranks})
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print_scale(results)


def print_scale(results):
    m = results["machine"]
    print(f"\n{m['shape']} shape on {m['cpu']}, {m['threads']} threads in all, torch "
          f"{m['torch']}, {m['date']}; gloo between processes of one machine: communication-"
          f"bound and sharing the cores, not a forecast for GPUs")
    print("tensor-parallel decoding, bf16 --fast, batch 1 (per process):")
    print(f"  {'N':>3}{'threads':>9}{'planned GB':>12}{'RSS GB':>9}{'peak GB':>9}{'tok/s':>8}")
    runs = {(r["kind"], r["processes"]): r for r in results["scale"] if r["ranks"]}
    for (kind, n), r in runs.items():
        if kind == "decode":
            for x in r["ranks"][:1]:  # (every rank holds the same bytes; rank 0's are shown)
                print(f"  {n:>3}{r['threads']:>9}{x['planned_weights_gb']:>12.2f}"
                      f"{x['rss_after_load_gb']:>9.2f}{x['peak_rss_gb']:>9.2f}"
                      f"{x['decode_b1_tok_s']:>8.2f}")
    print(f"training step, {results['mode']}, bf16 frozen weights, activation checkpointing "
          f"(per process, the largest rank):")
    print(f"  {'':6}{'params GB':>11}{'grads GB':>10}{'AdamW GB':>10}{'RSS GB':>9}{'peak GB':>9}"
          f"{'step s':>8}")
    for kind in ("ddp", "fsdp"):
        if (kind, 2) in runs:
            x = {k: max(rank[k] for rank in runs[kind, 2]["ranks"])
                 for k in runs[kind, 2]["ranks"][0]}
            print(f"  {kind:6}{x['params_gb']:>11.3f}{x['grads_gb']:>10.3f}{x['adamw_gb']:>10.3f}"
                  f"{x['rss_before_gb']:>9.2f}{x['step_peak_rss_gb']:>9.2f}{x['step_s']:>8.2f}")


# ----------------------------------------------------------------------------- report

def parse_args():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(convert.SHAPES), default="1B")
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated (default float32,bfloat16)")
    p.add_argument("--impls", default="ours,ours_fast,transformers,ours_int8,ours_w8a8,ours_int4,"
                   "ours_w4a8", help="comma-separated implementations; ours_int8/w8a8/int4/w4a8 "
                   "(bf16 runs only) are generate.py --fast --quantize")
    p.add_argument("--accuracy_tokens", type=int, default=400,
                   help="teacher-forced tokens of text for the quantized models' accuracy")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--prompt_len", type=int, default=64)
    p.add_argument("--new_tokens", type=int, default=128)
    p.add_argument("--prefill_len", type=int, default=512)
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each implementation, taken in turn; each figure is the best of "
                        "them (other tenants of a shared machine only ever slow a run)")
    p.add_argument("--machine_gib", type=float, default=2.0,
                   help="GiB read to measure the machine's bandwidth and kernels (less: quicker, "
                        "rougher; more than the caches hold)")
    p.add_argument("--skip_batch8", action="store_true")
    p.add_argument("--skip_prefill", action="store_true")
    p.add_argument("--lora_steps", type=int, default=3,
                   help="timed LoRA training steps (after one warm-up)")
    p.add_argument("--skip_lora", action="store_true")
    p.add_argument("--skip_decode", action="store_true", help="only the LoRA step")
    p.add_argument("--activation_checkpointing", action="store_true", help="for our LoRA step")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--ckpt_root", default=str(HERE / "bench_ckpt"),
                   help="where the random checkpoints are made, once per shape "
                        "(default bench_ckpt/)")
    p.add_argument("--profile", action="store_true",
                   help="only profile a decoded token: ms, bytes, GB/s of its parts, bf16 --fast "
                        "and the quantized --impls (default off)")
    p.add_argument("--scale", action="store_true",
                   help="only the scale view: tensor-parallel decoding over 1 and 2 processes, "
                        "and a training step's memory per process under DDP and FSDP2, each "
                        "under torchrun (default off)")
    p.add_argument("--scale_mode", default="lora", choices=llama.MODES,
                   help="what the --scale training step trains (default lora)")
    p.add_argument("--llama_cpp", default=None,
                   help="a llama.cpp build (bash ../shared/llamacpp/build.sh DIR gives one): its "
                        "BF16, Q8_0 and Q4_0 of the same weights (our GGUF export, then "
                        "llama-quantize) run by llama-bench in the bf16 rounds, in turn with ours "
                        "(default none)")
    p.add_argument("--_scale", help=argparse.SUPPRESS)
    p.add_argument("--_lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_cpp and not all((Path(a.llama_cpp) / "build" / "bin" / tool).exists()
                               for tool in ("llama-bench", "llama-quantize")):
        p.error(f"--llama_cpp {a.llama_cpp} has no build/bin/llama-bench and llama-quantize; "
                f"build them with: bash ../shared/llamacpp/build.sh {a.llama_cpp}")
    return a


def main():
    a = parse_args()
    if a._child:
        return child(a._child, a._ckpt, a.dtypes, a)
    if a._scale:
        return scale_child(a._scale, a._ckpt, a)

    ckpt = make_checkpoint(a.shape, Path(a.ckpt_root) / a.shape)
    impls = [i for i in a.impls.split(",") if i != "transformers" or installed("transformers")]
    if a.profile:
        return profile(ckpt, [i for i in impls if i in PROFILED], a)
    if a.scale:
        return scale(ckpt, a)
    machine, bandwidth, rates = measure_machine(a)
    results = {"machine": machine, "runs": {
        dtype: run_implementations(ckpt, dtype, impls, bandwidth, rates, a)
        for dtype in a.dtypes.split(",")}}
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print_table(results)


def measure_machine(a):
    """The machine's ceilings, measured once before the runs -> (its figures for the report,
    read bandwidth, kernel rates)."""
    llama.log("measuring the machine: read bandwidth, then the fastest kernels ...")
    bandwidth = read_bandwidth(a.machine_gib)
    rates = kernel_rates(copies=max(1, round(a.machine_gib * 16)))  # 1 GiB of bf16 at 2
    machine = {**machine_info(a), "read_bandwidth_gb_s": round(bandwidth, 1),
               **{k: round(v, 1) for k, v in rates.items()}}
    return machine, bandwidth, rates


def ceilings(args, dtype, bandwidth, rates):
    """What this machine's bandwidth and fastest kernels allow for each measured figure."""
    nbytes = 4 if dtype == "float32" else 2
    # either may be used for bf16 weights
    gemm = max(rates["f32_gemm_gflop_s"], rates["bf16_gemm_gflop_s"]) * 1e9
    matvec = bandwidth if dtype == "float32" else rates["bf16_matvec_gb_s"]
    return {
        "decode_kernel_tok_s": matvec * 1e9 / decode_bytes_per_token(args, nbytes),
        "prefill_tok_s": gemm / (2 * (matmul_params(args) - args.vocab_size * args.dim)),
        # forward + input gradients, frozen weights
        "lora_step_tok_s": gemm / (4 * matmul_params(args))}


def run_implementations(ckpt, dtype, impls, bandwidth, rates, a):
    """Each implementation in dtype: decoding and prefill (the best of --rounds, taken in turn),
    then the LoRA step and the quantized models' accuracy, beside the ceilings."""
    args = checkpoints.read_args(ckpt)
    nbytes = 4 if dtype == "float32" else 2
    if dtype == "bfloat16" and not a.skip_decode:
        save_quantized_once(ckpt, impls)
    runs = {impl: {} for impl in impls if impl not in QUANTIZED or dtype == "bfloat16"}
    peer = llama_cpp_models(ckpt, a) if a.llama_cpp and dtype == "bfloat16" else {}
    for _ in range(0 if a.skip_decode else a.rounds):  # in turn: a slow spell hits one run
        for impl in runs:
            runs[impl] = best(runs[impl], run_child(impl, ckpt, dtype, a))
        for kind, path in peer.items():
            runs[f"llama.cpp {kind}"] = best(runs.get(f"llama.cpp {kind}", {}),
                                             llama_bench(path, a))
    for impl in ("ours", "transformers", "ours_int4"):
        if impl in runs and not a.skip_lora and (impl != "transformers" or installed("peft")):
            runs[impl] = {**(runs[impl] or {}),
                          **(run_child(impl, ckpt, dtype, a, lora=True) or {})}
    if dtype == "bfloat16" and set(QUANTIZED) & set(impls) and not a.skip_decode:
        runs["quantization_accuracy"] = run_child("accuracy", ckpt, dtype, a)
    return {"weights_gb": weight_bytes(args, nbytes) / 1e9,
            "roofline_tok_s": bandwidth * 1e9 / decode_bytes_per_token(args, nbytes),
            "ceilings": ceilings(args, dtype, bandwidth, rates), **runs}


# llama.cpp on the same weights: each of ours beside the llama.cpp type of the same width
LLAMA_CPP_PEERS = {"ours_fast": "BF16", "ours_w8a8": "Q8_0", "ours_int8": "Q8_0",
                   "ours_int4": "Q4_0", "ours_w4a8": "Q4_0"}


def llama_cpp_models(ckpt, a):
    """Our GGUF export of the checkpoint in bf16, and llama-quantize's Q8_0 and Q4_0 of it, made
    once beside the checkpoint -> {type: path}."""
    out, tools = Path(ckpt) / "gguf", Path(a.llama_cpp) / "build" / "bin"
    models = {kind: out / f"{kind.lower()}.gguf" for kind in ("BF16", "Q8_0", "Q4_0")}
    if not models["BF16"].exists():
        out.mkdir(exist_ok=True)
        subprocess.run([sys.executable, str(HERE / "convert.py"), "convert", str(ckpt),
                        str(models["BF16"]), "--to", "gguf", "--gguf_dtype", "bf16"], check=True)
    for kind in ("Q8_0", "Q4_0"):
        if not models[kind].exists():
            with llama.atomic_file(models[kind]) as tmp:
                subprocess.run([str(tools / "llama-quantize"), str(models["BF16"]), str(tmp), kind],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return models


def llama_bench(model, a):
    """llama-bench on one GGUF file, on our thread count: decoding --new_tokens at batch 1 (from
    an empty context, where ours starts after a --prompt_len prompt) and a --prefill_len prefill."""
    r = subprocess.run([str(Path(a.llama_cpp) / "build" / "bin" / "llama-bench"), "-m",
                        str(model), "-t", str(a.threads), "-p", str(a.prefill_len), "-n",
                        str(a.new_tokens), "-r", "1", "-o", "json"],
                       capture_output=True, text=True, check=True)
    rows = json.loads(r.stdout)
    return {"decode_b1_tok_s": next(x["avg_ts"] for x in rows if x["n_gen"]),
            "prefill_tok_s": next(x["avg_ts"] for x in rows if x["n_prompt"])}


def save_quantized_once(ckpt, impls):
    """The quantized implementations' files, made once, then read at each load."""
    for impl in impls:
        if impl in QUANTIZED and not quantize.saved_path(ckpt, QUANTIZED[impl]).exists():
            subprocess.run([sys.executable, str(HERE / "quantize.py"), "--ckpt_dir", str(ckpt),
                            "--mode", quantize.weights_format(QUANTIZED[impl])], check=True)


def machine_info(a):
    return {"cpu": cpu_name(), "threads": a.threads, "amx": speed.cpu_has_amx(),
            "bf16_products_fast": speed.bf16_products_fast(),
            "bf16_training_products": str(speed.matmul_dtype(torch.ones(1, dtype=torch.bfloat16))),
            "bf16_packed_decoding": speed.can_pack(torch.device("cpu"), torch.bfloat16),
            "w4a8_kernel": "AVX-512 VNNI" if w4a8.has_vnni() else "plain C",
            "torch": torch.__version__, "python": platform.python_version(),
            "shape": a.shape, "date": time.strftime("%Y-%m-%d")}


def profile(ckpt, impls, a):
    """bench.py --profile: each implementation's decoded token split into parts (the faster of
    --rounds runs, in turn), beside the read bandwidth measured in the same process."""
    save_quantized_once(ckpt, impls)
    results = {"machine": machine_info(a), "profile": {}}
    for _ in range(a.rounds):
        for impl in impls:
            runs = (results["profile"].get(impl),
                    run_child(impl, ckpt, "bfloat16", a, profile=True))
            results["profile"][impl] = min((r for r in runs if r), default=None,
                                           key=lambda r: r["total_ms"])
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        print_profile(results)


def print_profile(results):
    m = results["machine"]
    print(f"\n{m['shape']} shape on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
          f"{m['date']}")
    for impl, r in results["profile"].items():
        if not r:
            continue
        total, (first, last), bandwidth = r["total_ms"], r["positions"], r["read_bandwidth_gb_s"]
        print(f"\n{impl} ({QUANTIZED.get(impl, 'bf16')}): {total:.1f} ms a token "
              f"({1e3 / total:.1f} tok/s), the median of {r['tokens']} steps without timers "
              f"between {r['timed_tokens']} with them ({r['timed_total_ms']:.1f} ms), positions "
              f"{first}-{last}, batch 1, greedy; read bandwidth {bandwidth:.1f} GB/s (measured "
              f"before it)")
        print(f"  {'part':12}{'ms':>8}{'share':>8}{'MB read':>10}{'GB/s':>8}{'of bw':>7}  what")
        for part, what in PARTS.items():
            ms, nbytes = r["parts_ms"][part], r["bytes"].get(part)
            rate = f"{nbytes / ms / 1e6:>8.1f}{nbytes / ms / 1e6 / bandwidth:>7.0%}" \
                if nbytes and ms > 0 else f"{'':>15}"
            mb = f"{nbytes / 1e6:>10.1f}" if nbytes else f"{'':>10}"
            print(f"  {part:12}{ms:>8.2f}{ms / total:>8.0%}{mb}{rate}  {what}")
        print(f"  (top-p sampling, generate.py's default 0.6 / 0.9, takes "
              f"{r['top_p_sampling_ms']:.1f} ms instead of greedy's)")


def installed(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def cpu_name():
    try:
        return next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


COLUMNS = [("load_s", "load s"), ("peak_rss_gb", "peak RSS GB"), ("ttft_s", "TTFT s"),
           ("decode_b1_tok_s", "decode b1 tok/s"), ("decode_b8_tok_s", "decode b8 tok/s"),
           ("prefill_tok_s", "prefill tok/s"), ("lora_step_tok_s", "LoRA tok/s"),
           ("lora_peak_rss_gb", "LoRA peak GB")]


def print_table(results):
    print_machine(results["machine"])
    if "int8_matvec_gweights_s" in results["machine"]:
        print_quantized_kernels(results["machine"])
    for dtype, r in results["runs"].items():
        print_runs(dtype, r)
        print_ratios(r)
        print_accuracy(r)


def print_machine(m):
    print(f"\n{m['shape']} shape on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
          f"{m['date']}; read bandwidth {m['read_bandwidth_gb_s']} GB/s")
    print(f"CPU branches: AMX {m['amx']}; bf16 LoRA products in {m['bf16_training_products']}; "
          f"bf16 decoding with packed weights: {m['bf16_packed_decoding']}; w4a8's kernel: "
          f"{m['w4a8_kernel']}")
    print(f"fastest kernels: bf16 matrix-vector {m['bf16_matvec_gb_s']} GB/s; 512x2048x8192 matrix "
          f"product {m['f32_gemm_gflop_s']} GFLOP/s float32, {m['bf16_gemm_gflop_s']} GFLOP/s bf16")


def print_quantized_kernels(m):
    bf16 = m["bf16_matvec_gb_s"] / 2  # G weights/s
    print("quantized kernels (G weights/s; the matrix-vector rate over bf16's, a ceiling for "
          "decoding; the prefill ceiling at 512 tokens from dequantizing):")
    for mode in quantize.FORMATS:
        deq = m[f"{mode}_dequantize_gweights_s"]
        prefill = 1 / (1 + m["bf16_gemm_gflop_s"] / (2 * 512 * deq))
        print(f"  {mode}: matrix-vector {m[f'{mode}_matvec_gweights_s']} "
              f"({m[f'{mode}_matvec_gweights_s'] / bf16:.2f}x bf16), dequantize {deq} "
              f"(prefill at most {prefill:.2f}x bf16; torch's {mode} kernel on 512 rows "
              f"{m[f'{mode}_kernel_gemm_gflop_s']} GFLOP/s, "
              f"{m[f'{mode}_kernel_gemm_gflop_s'] / m['bf16_gemm_gflop_s']:.2f}x bf16's)")
    w8a8 = m["w8a8_gemm_gflop_s"]
    print(f"  w8a8: matrix-vector {m['w8a8_matvec_gweights_s']} "
          f"({m['w8a8_matvec_gweights_s'] / bf16:.2f}x bf16), 512x2048x8192 product "
          f"{w8a8} GFLOP/s ({w8a8 / m['bf16_gemm_gflop_s']:.2f}x bf16's)")


def print_runs(dtype, r):  # the figures of each implementation beside the ceilings
    c = r["ceilings"]
    print(f"\n{dtype}: weights {r['weights_gb']:.2f} GB, decode roofline "
          f"{r['roofline_tok_s']:.1f} tok/s (with the fastest matrix-vector kernel: "
          f"{c['decode_kernel_tok_s']:.1f}); at the fastest matrix product: "
          f"prefill {c['prefill_tok_s']:.0f} tok/s, LoRA step {c['lora_step_tok_s']:.0f} tok/s")
    print(f"  {'':14}" + "".join(f"{name:>16}" for _, name in COLUMNS))
    peers = sorted(k for k in r if k.startswith("llama.cpp"))
    for impl in ("ours", "ours_fast", "transformers", *QUANTIZED, *peers):
        if r.get(impl):
            print(f"  {impl:14}" + "".join(f"{r[impl].get(k, float('nan')):>16.2f}"
                                           for k, _ in COLUMNS))


def print_ratios(r):  # ours against the roofline, transformers, and the quantized against bf16
    ours, hf = r.get("ours"), r.get("transformers")
    if ours and "decode_b1_tok_s" in ours:
        fast = r.get("ours_fast") or ours
        print(f"  decode b1 / roofline: "
              f"ours {ours['decode_b1_tok_s'] / r['roofline_tok_s']:.2f}, "
              f"ours_fast {fast['decode_b1_tok_s'] / r['roofline_tok_s']:.2f}; "
              f"peak RSS / weights: {ours['peak_rss_gb'] / r['weights_gb']:.2f}")
    if ours and hf:
        ratios = [f"{name} {ours[k] / hf[k]:.2f}x"
                  + (" (lower is better)" if k == "lora_peak_rss_gb" else "")
                  for k, name in COLUMNS[3:] if k in ours and k in hf]
        print("  ours / transformers: " + ", ".join(ratios))
    if r.get("ours_fast") and hf and "decode_b1_tok_s" in hf:
        print("  ours_fast / transformers: "
              + ", ".join(f"{name} {r['ours_fast'][k] / hf[k]:.2f}x"
                          for k, name in COLUMNS[3:6] if k in r["ours_fast"] and k in hf))
    for impl, kind in LLAMA_CPP_PEERS.items():  # against llama.cpp's type of the same width
        ours, peer = r.get(impl), r.get(f"llama.cpp {kind}")
        if ours and peer and "decode_b1_tok_s" in ours:
            print(f"  {impl} / llama.cpp {kind}: " + ", ".join(
                f"{name} {ours[k] / peer[k]:.2f}x" for k, name in COLUMNS[3:6:2]
                if k in peer and k in ours))
    for impl in QUANTIZED:  # quantized against bf16 on the same weights (--fast both)
        q, fast = r.get(impl), r.get("ours_fast")
        if q and fast and "decode_b1_tok_s" in q:
            print(f"  {impl} / ours_fast: " + ", ".join(f"{name} {q[k] / fast[k]:.2f}x"
                                                      for k, name in COLUMNS[1:6]
                                                      if k in q and k in fast))


def print_accuracy(r):
    for impl, acc in (r.get("quantization_accuracy") or {}).items():
        print(f"  {impl} vs bf16 over {acc['tokens']} tokens of text: logits' relative error "
              f"{acc['logits_rel_error']:.3f}, KL {acc['kl_mean']:.4f}, "
              f"top-1 agreement {acc['top1_agreement']:.3f}")


if __name__ == "__main__":
    main()
