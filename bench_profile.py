"""
One decoded token split into its parts, for bf16 --fast and each quantized width: projections,
attention, RoPE, norms, SwiGLU, the output layer, sampling and the rest (dispatch), in ms and as a
share, with the bytes each part reads and the GB/s it reaches beside the machine's read bandwidth,
on bench.py's random checkpoint. Each implementation runs in a process of its own.

    python bench_profile.py --new_tokens 16          # Llama 3.2 1B shape
    python bench_profile.py --impls ours_w8a8,ours_int4 --rounds 3 --json
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import bench
import generate
import llama
import speed

PROFILED = ("ours_fast", *bench.QUANTIZED)  # bf16 --fast and each quantized width
PARTS = {"projections": "wq wk wv wo w1 w2 w3 (packed or quantized)",
         "attention": "scores, softmax, values, KV cache write (and RoPE, in kernels.c's call)",
         "rope": "RoPE on q and k (llama.apply_rope)", "norms": "RMSNorm", "swiglu": "silu(w1 x) * w3 x",
         "output": "the output layer", "sampling": "llama.sample",
         "rest": "the total less the parts: embedding, residual adds, the loop, dispatch"}


def layer_bytes(layer):
    """Bytes of weights one product of this layer reads (its format's, scales included; a fused
    wq|wk|wv or w1|w3 counted at its first part)."""
    if isinstance(layer, speed.FusedPart):
        return layer_bytes(layer.fused[0].linear) if layer.i == 0 else 0
    if isinstance(layer, speed.PackedLinear):
        return layer.packed.numel() * layer.packed.element_size()
    return sum(t.nbytes for t in [*layer.parameters(), *layer.buffers()])


TIMED = ("attn_proj", "ffn_proj", "attn_all", "ffn_all", "rope", "norms", "output", "sampling")


def part_timers(model, spent):
    """Adds each part's seconds into spent (TIMED keys): forward hooks on the modules
    (perf_counter; CPU ops are synchronous) and wrappers of llama.apply_rope and llama.sample,
    with speed.KernelBlock's one call off while they are on. -> a function that removes them all."""
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
    stacks = set()
    for module, name in llama.projections(model):
        if module is not model:  # attention's and the MLP's projections, apart
            key = "attn_proj" if isinstance(module, llama.Attention) else "ffn_proj"
            layer = getattr(module, name)
            if isinstance(layer, speed.FusedPart):  # timed at the stacked product, once: the
                layer = layer.fused[0].linear  # kernels' modules call it, not the parts
                if id(layer) in stacks:
                    continue
                stacks.add(id(layer))
            handles += hook(layer, key)
    for m in model.modules():
        for cls, key in ((llama.RMSNorm, "norms"), (llama.Attention, "attn_all"),
                         (llama.FeedForward, "ffn_all")):
            handles += hook(m, key) if isinstance(m, cls) else []
    rope, sample, one_call = llama.apply_rope, llama.sample, speed.KernelBlock.one_call
    llama.apply_rope, llama.sample = timed(rope, "rope"), timed(sample, "sampling")
    speed.KernelBlock.one_call = False  # the timers are on the modules: KernelBlock uses them

    def remove():
        llama.apply_rope, llama.sample = rope, sample
        speed.KernelBlock.one_call = one_call
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


STEPS = ("modules", "timed", "one call")  # the kinds of step profile_decode takes in turn


def profile_decode(g, prompt_len, new_tokens):
    """One decoded token (batch 1, greedy, as bench's decode) split into PARTS. The timers sit on
    the modules, so the split is of the modules' path (speed.KernelBlock.one_call off). Steps
    take turns: plain ones, ones with timers on every part (put on and taken off between steps,
    outside the clock), and plain ones through KernelBlock's one call a layer, so a slow spell of
    a shared machine hits all alike: each part is its median over the timed steps, the total the
    median of the plain ones, and 'rest' the total less the parts (the timers' own cost is in no
    part). -> ms and bytes read per part, and totals."""
    steps, remove, t, kind = {k: [] for k in STEPS}, None, None, None
    spent = dict.fromkeys(TIMED, 0.0)
    try:
        for i, (_, _, pos, _) in enumerate(g.generate_steps(
                bench.prompt_ids(prompt_len).tolist(), 6 + 3 * new_tokens, temperature=0)):
            now = time.perf_counter()
            if t is not None and pos > prompt_len + 5:  # the prompt and 5 warm-up steps uncounted
                steps[kind].append({"total": now - t, "pos": pos, **spent})
            if remove:
                remove = remove()
            kind = STEPS[i % 3]
            speed.KernelBlock.one_call = kind == "one call"
            if kind == "timed":
                remove = part_timers(g.model, spent)
            spent.update(dict.fromkeys(TIMED, 0.0))
            t = time.perf_counter()
    finally:
        if remove:
            remove()
        speed.KernelBlock.one_call = True
    timed = {k: 1e3 * statistics.median(s[k] for s in steps["timed"]) for k in TIMED}
    total = 1e3 * statistics.median(s["total"] for s in steps["modules"])
    ms = parts(timed)
    ms["rest"] = total - sum(ms.values())
    model, a = g.model, g.model.args
    kv = model.tok_embeddings.weight.element_size()  # the KV cache's dtype
    positions = [s["pos"] for kind in STEPS for s in steps[kind]]
    nbytes = {"projections": sum(layer_bytes(getattr(m, n)) for m, n in llama.projections(model)
                                 if m is not model),
              "output": layer_bytes(model.output),
              # K and V of every cached position (at the median step), every layer
              "attention": 2 * statistics.median(positions) * a.n_kv_heads * a.head_dim * kv
                           * a.n_layers,
              "sampling": a.vocab_size * 4}  # argmax over float32 logits
    # generate.py's default sampling, for comparison: Meta's sort of the whole vocabulary, and
    # --fast's top-k candidates, on logits whose nucleus is a few tens of tokens, as a real model's
    logits = torch.randn(1, a.vocab_size, generator=torch.Generator().manual_seed(0)) * 3
    top_p = {name: 1e3 * bench.best_time(lambda: f(logits, 0.6, 0.9, 0, g.generator))
             for name, f in (("sample", llama.sample), ("top_p_sample", speed.top_p_sample))}
    timed_total = 1e3 * statistics.median(s["total"] for s in steps["timed"])
    one_call = any(m in speed.KERNEL_BLOCKS for m in model.modules())  # the "one call" steps
    return {"total_ms": total, "timed_total_ms": timed_total, "parts_ms": ms, "bytes": nbytes,
            "one_call_ms": 1e3 * statistics.median(s["total"] for s in steps["one call"])
            if one_call else None,
            "tokens": len(steps["modules"]), "timed_tokens": len(steps["timed"]),
            "positions": [min(positions), max(positions)],
            "top_p_sampling_ms": top_p}


def profile_child(impl, ckpt, a):
    g = generate.load(ckpt, max_seq_len=a.prompt_len + 2 * a.new_tokens + 8, max_batch_size=1,
                      device="cpu", dtype="bfloat16", fast=True, quantize=bench.QUANTIZED.get(impl),
                      group_size=a.group_size)
    bandwidth = bench.read_bandwidth(1)  # here and now: a shared machine's changes from run to run
    with torch.inference_mode():
        return {**profile_decode(g, a.prompt_len, a.new_tokens), "read_bandwidth_gb_s": bandwidth}


def profile(ckpt, impls, a):
    """Each implementation's decoded token split into parts (the faster of
    --rounds runs, in turn), beside the read bandwidth measured in the same process."""
    bench.save_quantized_once(ckpt, impls, a.group_size)
    results = {"machine": bench.machine_info(a), "profile": {}}
    for _ in range(a.rounds):
        for impl in impls:
            cmd = [sys.executable, __file__, "--_child", impl, "--_ckpt", str(ckpt), "--threads",
                   str(a.threads), "--prompt_len", str(a.prompt_len), "--new_tokens",
                   str(a.new_tokens), "--group_size", str(a.group_size)]
            runs = (results["profile"].get(impl),
                    bench.run_json(cmd, f"{impl} bfloat16 profile of a decoded token"))
            results["profile"][impl] = min((r for r in runs if r), default=None,
                                           key=lambda r: r["total_ms"])
    bench.report(results, a, print_profile)


def print_profile(results):
    m = results["machine"]
    print(f"\n{m['shape']} shape on {m['cpu']}, {m['threads']} threads, torch {m['torch']}, "
          f"{m['date']}")
    for impl, r in results["profile"].items():
        if not r:
            continue
        total, (first, last), bandwidth = r["total_ms"], r["positions"], r["read_bandwidth_gb_s"]
        print(f"\n{impl} ({bench.QUANTIZED.get(impl, 'bf16')}): {total:.1f} ms a token "
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
        if r.get("one_call_ms"):
            print(f"  with kernels.c's one call a block (speed.KernelBlock, the default): "
                  f"{r['one_call_ms']:.1f} ms a token ({1e3 / r['one_call_ms']:.1f} tok/s) "
                  f"against the modules' {total:.1f} ms above")
        print(f"  (top-p sampling, generate.py's default 0.6 / 0.9, takes "
              f"{r['top_p_sampling_ms']['top_p_sample']:.1f} ms with --fast's top_p_sample, "
              f"{r['top_p_sampling_ms']['sample']:.1f} ms with Meta's sort, instead of "
              f"greedy's)")


def main():
    p = bench.parser(__doc__, prefill=False)
    p.add_argument("--impls", default=",".join(PROFILED),
                   help=f"comma-separated, of {', '.join(PROFILED)} (default all)")
    p.add_argument("--rounds", type=int, default=1,
                   help="runs of each implementation, taken in turn; the fastest is shown "
                        "(default 1)")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_ckpt", help=argparse.SUPPRESS)
    a = p.parse_args()
    unknown = set(a.impls.split(",")) - set(PROFILED)
    if unknown:
        p.error(f"--impls {','.join(sorted(unknown))} cannot be profiled; "
                f"use some of {','.join(PROFILED)}")
    if a._child:
        torch.set_num_threads(a.threads)
        return print(json.dumps(profile_child(a._child, a._ckpt, a)))
    profile(bench.make_checkpoint(a.shape, Path(a.ckpt_root) / a.shape), a.impls.split(","), a)


if __name__ == "__main__":
    main()
