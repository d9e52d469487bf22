"""
Generate text with a Llama 3.x checkpoint (Meta's layout or Hugging Face's).

    python generate.py --ckpt_dir Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt_dir DIR --prompt "Once upon a time" --temperature 0.8 --top_p 0.95
    python generate.py --ckpt_dir DIR --prompt "A" --prompt "B"          # several prompts: one batch
    python generate.py --ckpt_dir DIR --dtype bfloat16 --fast --prompt "Hi"   # the fast CPU path
    python generate.py --ckpt_dir DIR --quantize int4 --quantized_file DIR/int4.safetensors --prompt "Hi"
    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --system "You are a pirate."
    python generate.py --ckpt_dir DIR --lora out --prompt "Once upon a time"   # with a finetune run

One prompt is streamed as it is generated; several run as one batch. In the chat, /reset clears the
history, /exit or Ctrl-D leaves, Ctrl-C stops the reply being written. Bad input exits with status 2
and one line. load() is where llama.py's model meets the files beside it: formats, speed, quantization.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

import checkpoints
import llama
import quantize as quant
import speed


def load(ckpt_dir, max_seq_len=2048, max_batch_size=4, device=None, dtype=None, seed=1, fast=False,
         rope_scaling_factor=None, lora=None, compile=False, quantize=None, group_size=32,
         quantized_file=None):
    """A llama.Llama for a checkpoint in either layout: a finetune run's weights merged in (lora: its
    out_dir, or a PEFT adapter), weights quantized (or read quantized from quantized_file, which is
    written on first use), and the speed paths that apply on this device."""
    device = llama.resolve_device(device)
    dtype = llama.resolve_dtype(dtype, device)
    t0 = time.time()
    tokenizer = checkpoints.load_tokenizer(ckpt_dir)
    args = replace(checkpoints.read_args(ckpt_dir), max_seq_len=max_seq_len)
    if rope_scaling_factor:
        args = replace(args, rope_scaling_factor=rope_scaling_factor)
    llama.check_vocab(tokenizer, args)
    if quantized_file and Path(quantized_file).exists():  # quantized before: skip the work
        with torch.device("meta"):
            model = llama.Transformer(args, fused=fast)
        model = quant.load_quantized(model, quantized_file, device)
    else:
        state_dict = checkpoints.load_checkpoint(ckpt_dir)[1]
        model = llama.build_model(args, speed.convert(state_dict, device, dtype), device, dtype, fast)
        if lora:
            model = checkpoints.load_finetuned(model, lora)
        if quantize:
            quant.quantize_model(model, quantize, group_size)
            if quantized_file:
                quant.save_quantized(model, quantized_file)
                llama.log(f"saved the quantized weights to {quantized_file}")
    n_params = sum(p.numel() for p in model.parameters())
    speed.for_inference(model, device, dtype, compile)
    g = llama.Llama(model, tokenizer, max_batch_size, seed, fast)
    if compile:
        speed.static_decoding(g)
    kind = quantize or ("quantized" if quantized_file else str(dtype).replace("torch.", ""))
    llama.log(f"loaded {n_params / 1e9:.2f}B parameters in {time.time() - t0:.1f}s ({device}, {kind})")
    return g


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True,
                   help="params.json + consolidated.*.pth, or config.json + *.safetensors")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling, in (0, 1] (default 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="k likeliest tokens only; 0: off (default)")
    p.add_argument("--seed", type=int, default=1, help="seed for sampling (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best one)")
    p.add_argument("--dtype", default=None, choices=list(llama.DTYPES),
                   help="default: bfloat16 on GPUs, float32 on CPUs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: one per core; on a busy machine fewer can be faster)")
    p.add_argument("--max_seq_len", type=int, default=2048, help="prompt + reply (default 2048)")
    p.add_argument("--max_batch_size", type=int, default=4, help="prompts in one batch (default 4)")
    p.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="llama3 RoPE factor of a Meta checkpoint (default 8, as Meta; Llama 3.2 "
                        "1B/3B were trained with 32; HF checkpoints carry the right one)")
    p.add_argument("--chat", action="store_true", help="chat with an instruct model (default off)")
    p.add_argument("--system", default=None, help="system prompt for --chat (default none)")
    p.add_argument("--lora", default=None, metavar="DIR",
                   help="merge in a finetune run's --out_dir or a PEFT adapter (default none)")
    p.add_argument("--quantize", default=None, choices=quant.MODES,
                   help="weight-only int8 (per channel) or int4 (per group) (default: off)")
    p.add_argument("--group_size", type=int, default=32, choices=quant.GROUP_SIZES,
                   help="inputs per int4 scale (default 32)")
    p.add_argument("--quantized_file", default=None,
                   help="read the quantized weights from this file; with --quantize, write it first")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token step: for GPUs, after a warm-up (default off)")
    p.add_argument("--fast", action="store_true", help="fused attention and last-position logits "
                                                       "(default off: Meta's exact arithmetic)")
    return p.parse_args(argv)


def check(a):
    """Everything that can be checked before loading the weights -> (prompts, their token ids)."""
    if not a.prompt and not a.chat:
        raise llama.InputError("no prompts given; pass --prompt \"...\" (repeat it), or --chat")
    if len(a.prompt) > a.max_batch_size and not a.chat:
        raise llama.InputError(f"{len(a.prompt)} prompts but --max_batch_size {a.max_batch_size}")
    for name in ("max_new_tokens", "threads"):
        if (getattr(a, name) or 1) < 1:
            raise llama.InputError(f"--{name} must be at least 1, got {getattr(a, name)}")
    llama.check_sampling(a.temperature, a.top_p, a.top_k)
    llama.resolve_device(a.device)
    context = checkpoints.read_args(a.ckpt_dir).context
    if not 2 <= a.max_seq_len <= context:
        raise llama.InputError(f"--max_seq_len must be between 2 and the model's context, {context}")
    if a.lora:
        checkpoints.check_finetuned(a.lora)
    if a.quantized_file and not a.quantize and not Path(a.quantized_file).exists():
        raise llama.InputError(f"{a.quantized_file} does not exist; add --quantize to write it")
    if a.quantized_file and a.lora:
        raise llama.InputError("--lora with --quantized_file: export the merged model "
                               "(checkpoints.py export), then quantize that")
    prompts = [p if a.chat else p.rstrip() for p in a.prompt]
    if prompts != a.prompt:  # "...is " ends in a lone space token: the model rarely saw one before a word
        llama.log("note: stripped trailing whitespace from the prompt(s) (it tokenizes badly)")
    tokenizer = checkpoints.load_tokenizer(a.ckpt_dir)
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    if not a.chat and max(map(len, ids)) >= a.max_seq_len:
        raise llama.InputError(f"a prompt of {max(map(len, ids))} tokens leaves no room for a reply "
                               f"in --max_seq_len {a.max_seq_len}; raise it")
    return prompts, ids


def main(argv=None):
    a = parse_args(argv)
    prompts, ids = check(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = load(a.ckpt_dir, a.max_seq_len, a.max_batch_size, a.device, a.dtype, a.seed, a.fast,
             a.rope_scaling_factor, a.lora, a.compile, a.quantize, a.group_size, a.quantized_file)
    if a.chat:
        return chat(g, a)
    llama.log(f"generating up to {a.max_new_tokens} tokens for {len(prompts)} prompt(s), temperature "
              f"{a.temperature}, top_p {a.top_p}, top_k {a.top_k}, seed {a.seed}")
    t0 = time.time()
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        n, t_first = 0, time.time()
        for token, text in g.stream(ids[0], a.max_new_tokens, a.temperature, a.top_p, a.top_k):
            t_first, n = (time.time() if n == 0 else t_first), n + (token is not None)
            print(text, end="", flush=True)
        print()
        rate = (n - 1) / (time.time() - t_first) if n > 1 else 0
        llama.log(f"{n} tokens in {time.time() - t0:.2f}s: the first after {t_first - t0:.2f}s, "
                  f"then {rate:.1f} tokens/s")
        lengths = [len(ids[0]) + n]
    else:
        outputs = g.generate(ids, a.max_new_tokens, a.temperature, a.top_p, a.top_k)[0]
        for prompt, out in zip(prompts, outputs):
            print(f"{prompt}{g.tokenizer.decode(out)}\n" + "-" * 40)
        n, seconds = sum(map(len, outputs)), time.time() - t0
        llama.log(f"{n} tokens in {seconds:.2f}s ({n / seconds:.1f} tokens/s in all)")
        lengths = [len(p) + len(o) for p, o in zip(ids, outputs)]
    if max(lengths) >= a.max_seq_len:
        llama.log(f"note: stopped at --max_seq_len {a.max_seq_len}; raise it for longer output")


def chat(g, a):
    """A terminal chat. The history is re-encoded each turn; when it no longer fits in max_seq_len
    with room for a reply, the oldest turns go (never the system prompt). --prompt messages are
    answered in turn, without reading the terminal."""
    tok, max_len = g.tokenizer, g.args.max_seq_len
    system = [{"role": "system", "content": a.system}] if a.system else []
    history = []

    def reply():
        nonlocal history
        tokens = tok.encode_dialog_prompt(system + history)
        while len(tokens) + a.max_new_tokens > max_len and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]  # a user message, its answer
            llama.log(f"[the conversation is too long for max_seq_len {max_len}: "
                      f"dropped the oldest turn]")
            tokens = tok.encode_dialog_prompt(system + history)
        if len(tokens) >= max_len:
            llama.log(f"[that message is too long for max_seq_len {max_len}; raise --max_seq_len]")
            return history.pop()
        text, n = "", min(a.max_new_tokens, max_len - len(tokens))
        try:
            for _, piece in g.stream(tokens, n, a.temperature, a.top_p, a.top_k):
                text += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stops this reply, not the chat
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": text})

    for message in a.prompt:
        history.append({"role": "user", "content": message})
        reply()
    if a.prompt:
        return
    llama.log("chat: /reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops a reply")
    while True:
        try:
            line = input("> ")
        except EOFError:
            return print()
        except KeyboardInterrupt:
            print()
            continue
        if line.strip() == "/exit":
            return
        if line.strip() == "/reset":
            history = []
            llama.log("[history cleared]")
        elif line.strip():
            history.append({"role": "user", "content": line})
            reply()


if __name__ == "__main__":
    try:
        main()
    except llama.InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
