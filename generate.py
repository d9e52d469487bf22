"""
Generate text with a Llama 3.x checkpoint (Meta's layout or Hugging Face's).

    python generate.py --ckpt_dir Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt_dir DIR --prompt "Once upon a time" --temperature 0.8 --top_p 0.95
    python generate.py --ckpt_dir DIR --prompt "A" --prompt "B"          # a batch of two
    python generate.py --ckpt_dir DIR --dtype bfloat16 --fast --prompt "Hi"   # the fast CPU path
    python generate.py --ckpt_dir DIR --quantize int4 --prompt "Hi"      # int4 weights
    python generate.py --ckpt_dir DIR --quantize w8a8 --prompt "Hi"      # int8 activations too
    python generate.py --ckpt_dir DIR --quantize w4a8 --prompt "Hi"      # int4 x int8 (C kernel)
    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --system "You are a pirate."
    python generate.py --ckpt_dir DIR --lora out --prompt "Once upon a time"   # with a finetune run
    torchrun --nproc_per_node 8 generate.py --ckpt_dir Llama-3.1-70B/original --prompt "Hi"

One prompt is streamed; several run as a batch. Chat: /reset clears the history, /exit or Ctrl-D
leaves, Ctrl-C stops a reply. Under torchrun the model is split over the processes (tensor
parallel, parallel.py); rank 0 prints. load() is where llama.py meets the files beside it.
"""

import argparse
import sys
import time
from dataclasses import replace

import torch
import torch.distributed as dist

import checkpoints
import llama
import parallel
import quantize as quant
import speed


def load(ckpt_dir, max_seq_len=2048, max_batch_size=4, device=None, dtype=None, seed=1, fast=False,
         rope_scaling_factor=None, lora=None, compile=False, quantize=None, group_size=32):
    """A llama.Llama for a checkpoint in either layout, with a finetune run (or PEFT adapter) merged
    in, weights quantized (or read as quantize.py saved them) and this device's speed paths."""
    device, t0 = speed.resolve_device(device), time.time()
    quant.check_device(quantize, device, compile)
    if quantize:
        quant.check_settings(quantize, group_size)
    dtype = speed.resolve_dtype(dtype or ("bfloat16" if quantize else None), device)  # the kernels'
    tokenizer = checkpoints.load_tokenizer(ckpt_dir)
    # --fast, decoded once: fused attention in the model's config; last-position logits and top-p
    # among the likeliest tokens (speed.top_p_sample: Meta's distribution, not its draws) in Llama
    settings = dict(max_seq_len=max_seq_len, fused_attention=fast,
                    **({"rope_scaling_factor": rope_scaling_factor} if rope_scaling_factor else {}))
    if parallel.under_torchrun():  # tensor parallel: this process's shard, quantized here
        check_tensor_parallel(ckpt_dir, lora)
        device = parallel.init_processes(device)
        model = parallel.load_tensor_parallel(ckpt_dir, device, dtype, settings)
        llama.check_vocab(tokenizer, model.args)
        if quantize:
            quant.quantize_model(model, quantize, group_size, absmax=parallel.row_absmax)
    else:
        model = load_model(ckpt_dir, device, dtype, settings, tokenizer, lora, quantize, group_size)
    speed.for_inference(model, device, dtype, compile)
    g = llama.Llama(model, tokenizer, max_batch_size, seed, last_only=fast,
                    sampler=speed.top_p_sample if fast else llama.sample)
    llama.log(f"loaded {ckpt_dir} in {time.time() - t0:.1f}s ({device}, {quantize or dtype})")
    return speed.static_decoding(g) if compile else g


def load_model(ckpt_dir, device, dtype, settings, tokenizer, lora, quantize, group_size):
    """One process's model: its config with settings (ModelArgs fields) replaced, a finetune run
    merged in, quantized (or read as quantize.py saved it)."""
    saved = quantize and not lora and quant.saved_path(ckpt_dir, quantize, group_size).exists()
    args, state_dict = (checkpoints.read_args(ckpt_dir), None) if saved else \
        checkpoints.load_checkpoint(ckpt_dir)
    args = replace(args, **settings)
    llama.check_vocab(tokenizer, args)
    if saved:  # quantized before: skip the work
        with torch.device("meta"):
            model = llama.Transformer(args)
        return quant.load_quantized(model, quant.saved_path(ckpt_dir, quantize, group_size),
                                    device, quantize)
    model = llama.build_model(args, speed.to_device(state_dict, device, dtype), device, dtype)
    if lora:
        model = checkpoints.load_finetuned(model, lora)
    if quantize:
        llama.log(f"quantizing to {quantize} (python quantize.py --ckpt_dir {ckpt_dir} --mode "
                  f"{quant.weights_format(quantize)} saves the result, for the next start)")
        quant.quantize_model(model, quantize, group_size, release=speed.release_pages)
    return model


def check_tensor_parallel(ckpt_dir, lora):
    """Under torchrun, before anything is loaded: an even split, and no run to merge."""
    parallel.check_tensor_parallel(checkpoints.read_args(ckpt_dir), parallel.world()[1])
    if lora:
        raise llama.InputError("--lora is merged into whole weights: merge it first (python "
                               "convert.py export RUN merged --to meta), then run merged")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add = p.add_argument
    add("--ckpt_dir", required=True, help="Meta (params.json) or HF (config.json) checkpoint")
    add("--prompt", action="append", default=[], help="prompt text; repeat it for a batch")
    add("--max_new_tokens", type=int, default=256, help="at most (default 256)")
    add("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    add("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default 0.9)")
    add("--top_k", type=int, default=0, help="the k likeliest tokens only; 0: off (default 0)")
    add("--seed", type=int, default=1, help="seed for sampling (default 1)")
    add("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best there is)")
    add("--dtype", default=None, choices=list(speed.DTYPES), help="default: bf16 on GPUs, else f32")
    add("--threads", type=int, default=None, help="CPU threads (default: one per core; fewer can "
        "be faster on a busy machine)")
    add("--max_seq_len", type=int, default=2048, help="prompt + reply (default 2048)")
    add("--max_batch_size", type=int, default=4, help="prompts in one batch (default 4)")
    add("--rope_scaling_factor", type=float, default=None, help="llama3 RoPE factor of a Meta "
        "checkpoint (default 8, as Meta's; 3.2 1B/3B were trained with 32)")
    add("--chat", action="store_true", help="chat with an instruct model (default off)")
    add("--system", default=None, help="system prompt for --chat (default none)")
    add("--lora", default=None, help="a finetune --out_dir or PEFT adapter to merge (default none)")
    add("--quantize", default=None, choices=quant.MODES, help="int8 or int4 weights; w8a8 / w4a8: "
        "int8 / int4 weights times int8 activations, faster on CPUs, a little less precise "
        "(default off)")
    add("--group_size", type=int, default=32, choices=quant.GROUP_SIZES,
        help="inputs per int4 scale (default 32)")
    add("--compile", action="store_true", help="torch.compile decoding, for GPUs (default off)")
    add("--fast", action="store_true", help="fused attention, last-position logits, top-p among "
        "the likeliest tokens (default off: Meta's exact arithmetic and draws)")
    return p.parse_args(argv)


def check(a):
    """Everything that can be checked before loading the weights -> (prompts, their token ids)."""
    if not a.prompt and not a.chat:
        raise llama.InputError("no prompts given; pass --prompt \"...\" (repeat it), or --chat")
    if len(a.prompt) > a.max_batch_size and not a.chat:
        raise llama.InputError(f"{len(a.prompt)} prompts but --max_batch_size {a.max_batch_size}")
    for name in ("max_new_tokens", "threads"):
        if getattr(a, name) is not None and getattr(a, name) < 1:
            raise llama.InputError(f"--{name} must be at least 1, got {getattr(a, name)}")
    llama.check_sampling(a.temperature, a.top_p, a.top_k)
    speed.resolve_device(a.device)
    context = checkpoints.read_args(a.ckpt_dir).context
    if not 2 <= a.max_seq_len <= context:
        raise llama.InputError(f"--max_seq_len must be in [2, the model's context: {context}]")
    if a.lora:
        checkpoints.check_finetuned(a.lora)
    if parallel.under_torchrun():
        check_tensor_parallel(a.ckpt_dir, a.lora)
    prompts = [p if a.chat else p.rstrip() for p in a.prompt]
    if prompts != a.prompt:  # "...is " ends in a lone space token, rarely seen before a word
        llama.log("note: stripped trailing whitespace from the prompt(s) (it tokenizes badly)")
    tokenizer = checkpoints.load_tokenizer(a.ckpt_dir)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    if not a.chat and max(map(len, ids)) >= a.max_seq_len:
        raise llama.InputError(f"a prompt of {max(map(len, ids))} tokens leaves no room for a "
                               f"reply in --max_seq_len {a.max_seq_len}; raise it")
    return prompts, ids


# -----------------------------------------------------------------------------
# The chat (--chat): Meta's chat format, the history re-encoded each turn and cut from the oldest
# turn when it outgrows max_seq_len (never the system prompt); Ctrl-C stops a reply, not the chat.

def stream(g, prompt_tokens, max_gen_len, temperature=0.6, top_p=0.9, top_k=0):
    """One prompt through a llama.Llama -> (token_id, new text) per token, then (None, text) for
    bytes left at the end (a character cut between tokens); the stop token is not yielded."""
    decoder, n = g.tokenizer.stream_decoder(), len(prompt_tokens)
    for tokens, _, cur_pos, _ in g.generate_steps([prompt_tokens], max_gen_len, temperature, top_p,
                                                  top_k):
        token = tokens[0, cur_pos].item()
        if cur_pos < n:
            continue
        if token in g.tokenizer.stop_tokens:
            break
        yield token, decoder.decode(g.tokenizer.model.decode_single_token_bytes(token))
    if rest := decoder.decode(b"", final=True):
        yield None, rest


def chat(g, a):
    """A terminal chat (or an answer per --prompt). When the history no longer fits max_seq_len with
    room for a reply, the oldest turns go, never the system prompt."""
    system = [{"role": "system", "content": a.system}] if a.system else []
    history, max_len = [], g.args.max_seq_len
    if not a.prompt:
        llama.log("chat: /reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops a reply")
    for line in shared(a.prompt or terminal_lines()):
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            llama.log("[history cleared]")
            continue
        history.append({"role": "user", "content": line})
        tokens = g.tokenizer.encode_dialog_prompt(system + history)
        while len(tokens) + a.max_new_tokens > max_len and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]  # a question and its answer
            llama.log(f"[too long for max_seq_len {max_len}: dropped the oldest turn]")
            tokens = g.tokenizer.encode_dialog_prompt(system + history)
        if len(tokens) >= max_len:
            llama.log(f"[that message is too long for max_seq_len {max_len}; raise --max_seq_len]")
            history.pop()
            continue
        text = ""
        try:
            for _, piece in stream(g, tokens, min(a.max_new_tokens, max_len - len(tokens)),
                                     a.temperature, a.top_p, a.top_k):
                text += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stops this reply, not the chat
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": text})


def terminal_lines():
    while True:
        try:
            line = input("> ")
        except EOFError:
            return print()
        except KeyboardInterrupt:
            print()
            continue
        if line.strip():
            yield line


def shared(lines):
    """Under torchrun (tensor parallel) only rank 0 reads the terminal: each line is broadcast, so
    every process computes the same turn. (Ctrl-C stops a reply on rank 0 only: use /exit.)"""
    if not dist.is_initialized():
        yield from lines
        return
    lines = iter(lines) if dist.get_rank() == 0 else None
    while True:
        box = [next(lines, None) if lines is not None else None]
        dist.broadcast_object_list(box, src=0)
        if box[0] is None:
            return
        yield box[0]


def main(argv=None):
    a = parse_args(argv)
    prompts, ids = check(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = load(a.ckpt_dir, a.max_seq_len, a.max_batch_size, a.device, a.dtype, a.seed, a.fast,
             a.rope_scaling_factor, a.lora, a.compile, a.quantize, a.group_size)
    if a.chat:
        return chat(g, a)
    llama.log(f"generating up to {a.max_new_tokens} tokens for {len(prompts)} prompt(s), "
              f"temperature {a.temperature}, top_p {a.top_p}, top_k {a.top_k}, seed {a.seed}")
    t0 = t_first = time.time()
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        outputs = [[]]
        for token, text in stream(g, ids[0], a.max_new_tokens, a.temperature, a.top_p,
                                  a.top_k):
            t_first = t_first if outputs[0] else time.time()
            outputs[0] += [token] if token is not None else []
            print(text, end="", flush=True)
        print()
    else:
        outputs = g.generate(ids, a.max_new_tokens, a.temperature, a.top_p, a.top_k)[0]
        for prompt, out in zip(prompts, outputs):
            print(f"{prompt}{g.tokenizer.decode(out)}\n" + "-" * 40)
    n, seconds = sum(map(len, outputs)), time.time() - t0
    first = f", the first after {t_first - t0:.2f}s" if len(prompts) == 1 else " in all"
    llama.log(f"{n} tokens in {seconds:.2f}s: {n / seconds:.1f} tokens/s{first}")
    if max(len(p) + len(o) for p, o in zip(ids, outputs)) >= a.max_seq_len:
        llama.log(f"note: stopped at --max_seq_len {a.max_seq_len}; raise it for longer output")


if __name__ == "__main__":
    try:
        main()
        parallel.end_processes()  # tensor parallel: its model let go first (see end_processes)
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
