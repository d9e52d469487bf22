"""
Generate text with a Llama 3.x checkpoint (Meta's layout or Hugging Face's).

    python generate.py --ckpt_dir Llama-3.2-1B --prompt "The capital of France is" --temperature 0
    python generate.py --ckpt_dir DIR --prompt "Once upon a time" --temperature 0.8 --max_new_tokens 200
    python generate.py --ckpt_dir DIR --prompt "A" --prompt "B"            # several prompts: one batch
    python generate.py --ckpt_dir DIR --dtype bfloat16 --fast               # the fast CPU path
    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --system "You are a pirate."   # chat
    python generate.py --ckpt_dir DIR --lora out --prompt "Once upon a time"   # with a finetune run

One prompt is streamed as it is generated; several run as one batch. In the chat, /reset clears the history,
/exit or Ctrl-D leaves, and Ctrl-C stops the reply being written. Bad input exits with status 2 and one line.
load() is the one place where llama.py's model meets the files beside it (formats, speed paths).
"""

import argparse
import sys
import time
from dataclasses import replace

import torch

import checkpoints
import llama
import speed


def load(ckpt_dir, max_seq_len=2048, max_batch_size=4, device=None, dtype=None, seed=1, fast=False,
         rope_scaling_factor=None, lora=None, compile=False):
    """A llama.Llama for a checkpoint in either layout, with a finetune run's weights merged in (lora: its
    out_dir) and the speed paths that apply on this device."""
    device = llama.resolve_device(device)
    dtype = llama.resolve_dtype(dtype, device)
    t0 = time.time()
    tokenizer = checkpoints.load_tokenizer(ckpt_dir)
    args, state_dict = checkpoints.load_checkpoint(ckpt_dir)
    llama.check_vocab(tokenizer, args)
    args = replace(args, max_seq_len=max_seq_len, rope_scaling_factor=rope_scaling_factor or
                   args.rope_scaling_factor)
    model = llama.build_model(args, speed.convert(state_dict, device, dtype), device, dtype, fused=fast)
    if lora:
        model = checkpoints.load_finetuned(model, lora)
    n_params = sum(p.numel() for p in model.parameters())
    speed.for_inference(model, device, dtype, compile)
    g = llama.Llama(model, tokenizer, max_batch_size, seed, fast)
    if compile:
        speed.static_decoding(g)
    llama.log(f"loaded {n_params / 1e9:.2f}B parameters in {time.time() - t0:.1f}s ({device}, "
              f"{str(dtype).replace('torch.', '')})")
    return g


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="checkpoint directory (params.json + consolidated.*.pth, "
                   "or config.json + *.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="new tokens at most (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1] (default 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens; 0: off (default)")
    p.add_argument("--seed", type=int, default=1, help="seed for sampling (default 1)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or mps (default: the best available)")
    p.add_argument("--dtype", default=None, choices=list(llama.DTYPES),
                   help="default: bfloat16 on GPUs, float32 on CPUs")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's, one per core; on a busy machine fewer can be faster)")
    p.add_argument("--max_seq_len", type=int, default=2048, help="longest prompt + generation (default 2048)")
    p.add_argument("--max_batch_size", type=int, default=4, help="most prompts in one batch (default 4)")
    p.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="the llama3 RoPE factor of a Meta checkpoint (default: 8, as Meta; Llama 3.2 1B/3B "
                        "were trained with 32; HF checkpoints carry the right one)")
    p.add_argument("--chat", action="store_true", help="chat with an instruct model (default off)")
    p.add_argument("--system", default=None, help="system prompt for --chat (default none)")
    p.add_argument("--lora", default=None, metavar="RUN_DIR",
                   help="merge in what a finetune run saved in RUN_DIR, or a PEFT LoRA adapter "
                        "directory (default none)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step: for GPUs, after a warm-up (default off)")
    p.add_argument("--fast", action="store_true",
                   help="fused attention and last-position logits (default off: Meta's exact arithmetic)")
    return p.parse_args(argv)


def check(a):
    """Everything that can be checked before loading the weights."""
    if not a.prompt and not a.chat:
        raise llama.InputError("no prompts given; pass --prompt \"...\" (repeat it for a batch), or --chat")
    if len(a.prompt) > a.max_batch_size and not a.chat:
        raise llama.InputError(f"{len(a.prompt)} prompts but --max_batch_size {a.max_batch_size}; raise it")
    if a.max_new_tokens < 1:
        raise llama.InputError(f"--max_new_tokens must be at least 1, got {a.max_new_tokens}")
    if a.threads is not None and a.threads < 1:
        raise llama.InputError(f"--threads must be at least 1, got {a.threads}")
    llama.check_sampling(a.temperature, a.top_p, a.top_k)
    llama.resolve_device(a.device)
    context = checkpoints.read_args(a.ckpt_dir).context
    if not 2 <= a.max_seq_len <= context:
        raise llama.InputError(f"--max_seq_len must be between 2 and the model's context of {context}")
    if a.lora:
        checkpoints.check_finetuned(a.lora)
    tokenizer = checkpoints.load_tokenizer(a.ckpt_dir)
    prompts = [p if a.chat else p.rstrip() for p in a.prompt]
    if any(p != q for p, q in zip(prompts, a.prompt)):
        # "...is " ends in a lone space token the model rarely saw before a word: output degrades
        llama.log("note: stripped trailing whitespace from the prompt(s) (it tokenizes badly)")
    ids = [tokenizer.encode(p, bos=True) for p in prompts]
    if not a.chat and max(len(t) for t in ids) >= a.max_seq_len:
        raise llama.InputError(f"a prompt of {max(len(t) for t in ids)} tokens does not fit --max_seq_len "
                               f"{a.max_seq_len} with room for a reply; raise --max_seq_len")
    return prompts, ids


def main(argv=None):
    a = parse_args(argv)
    prompts, ids = check(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = load(a.ckpt_dir, a.max_seq_len, a.max_batch_size, a.device, a.dtype, a.seed, a.fast,
             a.rope_scaling_factor, a.lora, a.compile)
    if a.chat:
        return chat(g, a)
    llama.log(f"generating up to {a.max_new_tokens} tokens for {len(prompts)} prompt(s), temperature "
              f"{a.temperature}, top_p {a.top_p}, top_k {a.top_k}, seed {a.seed}")
    t0 = time.time()
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        n, t_first = 0, None
        for token, text in g.stream(ids[0], a.max_new_tokens, a.temperature, a.top_p, a.top_k):
            t_first, n = t_first or time.time(), n + (token is not None)
            print(text, end="", flush=True)
        print()
        rate = (n - 1) / (time.time() - t_first) if n > 1 else 0
        llama.log(f"{n} tokens in {time.time() - t0:.2f}s: first after {t_first - t0:.2f}s, then {rate:.1f} tokens/s")
        lengths = [len(ids[0]) + n]
    else:
        outputs, _, _ = g.generate(ids, a.max_new_tokens, a.temperature, a.top_p, a.top_k)
        for prompt, out in zip(prompts, outputs):
            print(f"{prompt}{g.tokenizer.decode(out)}\n" + "-" * 40)
        n = sum(len(o) for o in outputs)
        llama.log(f"{n} tokens in {time.time() - t0:.2f}s ({n / (time.time() - t0):.1f} tokens/s in all)")
        lengths = [len(p) + len(o) for p, o in zip(ids, outputs)]
    if max(lengths) >= a.max_seq_len:
        llama.log(f"note: generation stopped at --max_seq_len {a.max_seq_len}; raise it for longer output")


def chat(g, a):
    """A terminal chat. The history is re-encoded each turn; when it no longer fits in max_seq_len with room
    for a reply, the oldest turns are dropped (never the system prompt). --prompt messages are answered in
    turn, without reading the terminal."""
    tok, max_len = g.tokenizer, g.args.max_seq_len
    system = [{"role": "system", "content": a.system}] if a.system else []
    history = []

    def reply():
        nonlocal history
        tokens = tok.encode_dialog_prompt(system + history)
        while len(tokens) + a.max_new_tokens > max_len and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]  # the oldest user message and answer
            llama.log(f"[the conversation is too long for max_seq_len {max_len}: dropped the oldest turn]")
            tokens = tok.encode_dialog_prompt(system + history)
        if len(tokens) >= max_len:
            llama.log(f"[that message is too long for max_seq_len {max_len}; raise --max_seq_len]")
            history.pop()
            return
        text = ""
        try:
            for _, piece in g.stream(tokens, min(a.max_new_tokens, max_len - len(tokens)), a.temperature,
                                     a.top_p, a.top_k):
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
            print()
            return
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
