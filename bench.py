"""
Benchmarks: llama.py against Hugging Face transformers on the same random-weight checkpoint, in one
run, with the same prompt and thread count, plus the machine's memory bandwidth and the decode
roofline it implies.

    python bench.py                                  # Llama 3.2 1B shape, float32 and bf16
    python bench.py --shape 8B --dtypes bfloat16 --new_tokens 16 --skip_batch8 --skip_prefill
    python bench.py --json                           # the same figures as JSON
    python bench_profile.py --new_tokens 16          # one decoded token split into its parts
    python bench_scale.py --new_tokens 32            # tensor parallel and FSDP2, per process

Checkpoints are made on first use under bench_ckpt/ (random weights of the real shape, HF layout;
never committed). Every measurement runs in a fresh process so that its peak resident memory
(VmHWM) is its own.
"""

import argparse
import copy
import json
import platform
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import checkpoints
import convert
import finetune
import generate
import llama
import quantize
import speed
import kernels

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
    # the same int8 weights; each layer lays out its own copy
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
        model = llama.build_model(args, speed.to_device(sd, "cpu", dtype), "cpu", dtype)
        # finetune.py's LoRA (rank 8, alpha 16, every projection; QLoRA over a quantized base)
        finetune.assemble(model, {**finetune.DEFAULTS, "quantize": QUANTIZED.get(impl),
                                  "group_size": a.group_size,
                                  "activation_checkpointing": a.activation_checkpointing}, "cpu")

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
                                  quantize=mode, group_size=a.group_size).model
            for m in model.modules():  # w4a8, w8a8: the kernel on every row, as in decoding
                if isinstance(m, (quantize.W4A8Linear, quantize.W8A8Linear)):
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
    out = {}
    t0 = time.perf_counter()
    if impl == "transformers":
        from transformers import LlamaForCausalLM

        hf = LlamaForCausalLM.from_pretrained(ckpt, dtype=dtype).eval()
    else:
        g = generate.load(ckpt, max_seq_len=1024, max_batch_size=8, device="cpu", dtype=dtype_name,
                          fast=impl != "ours", quantize=QUANTIZED.get(impl),
                          group_size=a.group_size)
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
                    g.model(ids, 0, last_only=g.last_only)
            out["prefill_tok_s"] = a.prefill_len / (time.perf_counter() - t)
    out["peak_rss_gb"] = peak_rss_gb()
    print(json.dumps(out))


def best(old, new):
    """The better of two runs' figures: the higher rate, the lower time and memory."""
    if old is None or new is None:
        return None
    return {k: (max if k.endswith("tok_s") else min)(v, old.get(k, v)) for k, v in new.items()}


def run_child(impl, ckpt, dtype, a, lora=False):
    cmd = [sys.executable, __file__, "--_child", impl, "--_ckpt", str(ckpt), "--dtypes", dtype,
           "--threads", str(a.threads), "--prompt_len", str(a.prompt_len),
           "--new_tokens", str(a.new_tokens), "--prefill_len", str(a.prefill_len),
           "--lora_steps", str(a.lora_steps), "--accuracy_tokens", str(a.accuracy_tokens),
           "--group_size", str(a.group_size)] \
        + ["--skip_batch8"] * a.skip_batch8 \
        + ["--skip_prefill"] * a.skip_prefill \
        + ["--activation_checkpointing"] * a.activation_checkpointing + ["--_lora"] * lora
    return run_json(cmd, f"{impl} {dtype}{' LoRA step' if lora else ''}")


def run_json(cmd, what):
    """A measurement in a process of its own -> the JSON of its last line of output, or None (and
    why, logged) when it failed."""
    llama.log(f"measuring {what} ...")
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode:
        llama.log(f"  {what} failed: "
                  f"{r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}")
        return None
    return json.loads(r.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report

def parser(doc, prefill=True):
    """The flags of every benchmark command (bench.py, bench_profile.py, bench_scale.py): the
    shape, the threads, the lengths of a run (prefill=False: decoding only), and where its
    checkpoint and its results go."""
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(convert.SHAPES), default="1B",
                   help="the random checkpoint's shape (default 1B)")
    p.add_argument("--threads", type=int, default=torch.get_num_threads(),
                   help="threads in all (default: torch's, the cores)")
    p.add_argument("--prompt_len", type=int, default=64, help="tokens before decoding (default 64)")
    p.add_argument("--new_tokens", type=int, default=128, help="decoded tokens (default 128)")
    if prefill:
        p.add_argument("--prefill_len", type=int, default=512,
                       help="tokens of the prefill and of a training step's row (default 512)")
        p.add_argument("--lora_steps", type=int, default=3,
                       help="timed training steps, after one warm-up (default 3)")
    p.add_argument("--group_size", type=int, default=32, choices=quantize.GROUP_SIZES,
                   help="inputs per scale of int4 and w4a8 (default 32; w4a8 takes 32, 64, 128)")
    p.add_argument("--json", action="store_true", help="print the results as JSON (default off)")
    p.add_argument("--ckpt_root", default=str(HERE / "bench_ckpt"),
                   help="where the random checkpoints are made, once per shape "
                        "(default bench_ckpt/)")
    return p


def report(results, a, table):  # as JSON with --json, else as table(results) prints it
    if a.json:
        print(json.dumps(results, indent=2))
    else:
        table(results)


def parse_args():
    p = parser(__doc__)
    p.add_argument("--dtypes", default="float32,bfloat16",
                   help="comma-separated (default float32,bfloat16)")
    p.add_argument("--impls", default="ours,ours_fast,transformers,ours_int8,ours_w8a8,ours_int4,"
                   "ours_w4a8", help="comma-separated implementations; ours_int8/w8a8/int4/w4a8 "
                   "(bf16 runs only) are generate.py --fast --quantize")
    p.add_argument("--accuracy_tokens", type=int, default=400,
                   help="teacher-forced tokens of text for the quantized models' accuracy")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each implementation, taken in turn; each figure is the best of "
                        "them (other tenants of a shared machine only ever slow a run)")
    p.add_argument("--machine_gib", type=float, default=2.0,
                   help="GiB read to measure the machine's bandwidth and kernels (less: quicker, "
                        "rougher; more than the caches hold)")
    p.add_argument("--skip_batch8", action="store_true")
    p.add_argument("--skip_prefill", action="store_true")
    p.add_argument("--skip_lora", action="store_true")
    p.add_argument("--skip_decode", action="store_true", help="only the LoRA step")
    p.add_argument("--activation_checkpointing", action="store_true", help="for our LoRA step")
    p.add_argument("--llama_cpp", default=None,
                   help="a llama.cpp build (bash ../shared/llamacpp/build.sh DIR gives one): its "
                        "BF16, Q8_0 and Q4_0 of the same weights (our GGUF export, then "
                        "llama-quantize) run by llama-bench in the bf16 rounds, in turn with ours "
                        "(default none)")
    p.add_argument("--_lora", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.llama_cpp and not all((Path(a.llama_cpp) / "build" / "bin" / tool).exists()
                               for tool in ("llama-bench", "llama-quantize")):
        p.error(f"--llama_cpp {a.llama_cpp} has no build/bin/llama-bench and llama-quantize; "
                f"build them with: bash ../shared/llamacpp/build.sh {a.llama_cpp}")
    try:
        for impl in set(a.impls.split(",")) & set(QUANTIZED):
            quantize.check_settings(QUANTIZED[impl], a.group_size)
    except llama.InputError as e:
        p.error(str(e))
    return a


def main():
    a = parse_args()
    if a._child:
        return child(a._child, a._ckpt, a.dtypes, a)

    ckpt = make_checkpoint(a.shape, Path(a.ckpt_root) / a.shape)
    impls = [i for i in a.impls.split(",") if i != "transformers" or installed("transformers")]
    machine, bandwidth, rates = measure_machine(a)
    results = {"machine": machine, "runs": {
        dtype: run_implementations(ckpt, dtype, impls, bandwidth, rates, a)
        for dtype in a.dtypes.split(",")}}
    report(results, a, print_table)


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
        save_quantized_once(ckpt, impls, a.group_size)
    runs = {impl: {} for impl in impls if impl not in QUANTIZED or dtype == "bfloat16"}
    kinds = {LLAMA_CPP_PEERS[i] for i in runs if i in LLAMA_CPP_PEERS}  # only ours' peers
    peer = {k: path for k, path in llama_cpp_models(ckpt, a).items() if k in kinds} \
        if a.llama_cpp and dtype == "bfloat16" else {}
    ours = list(runs)  # (llama.cpp's rows join runs below: they are not ours to run)
    for _ in range(0 if a.skip_decode else a.rounds):  # in turn: a slow spell hits one run
        for impl in ours:
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


def save_quantized_once(ckpt, impls, group_size):
    """The quantized implementations' files, made once, then read at each load."""
    for impl in impls:
        if impl in QUANTIZED and not quantize.saved_path(ckpt, QUANTIZED[impl],
                                                         group_size).exists():
            subprocess.run([sys.executable, str(HERE / "quantize.py"), "--ckpt_dir", str(ckpt),
                            "--mode", quantize.weights_format(QUANTIZED[impl]),
                            "--group_size", str(group_size)], check=True)


def machine_info(a):
    return {"cpu": cpu_name(), "threads": a.threads, "amx": speed.cpu_has_amx(),
            "bf16_products_fast": speed.bf16_products_fast(),
            "bf16_training_products": str(speed.matmul_dtype(torch.ones(1, dtype=torch.bfloat16))),
            "bf16_packed_decoding": speed.can_pack(torch.device("cpu"), torch.bfloat16),
            "c_kernels": "AVX-512 VNNI" if kernels.has_vnni() else "plain C",
            "torch": torch.__version__, "python": platform.python_version(),
            "shape": a.shape, "date": time.strftime("%Y-%m-%d")}


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
          f"bf16 decoding with packed weights: {m['bf16_packed_decoding']}; kernels.c's kernels: "
          f"{m['c_kernels']}")
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
