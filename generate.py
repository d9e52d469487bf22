"""
Generate text with a Llama 3.x checkpoint (Meta's layout or Hugging Face's).

    python generate.py --ckpt_dir ~/.llama/checkpoints/Llama3.2-1B --prompt "The capital of France is"
    python generate.py --ckpt_dir DIR --prompt "Once upon a time" --temperature 0.8 --top_p 0.95 --max_new_tokens 200
    python generate.py --ckpt_dir DIR --prompt "A" --prompt "B"          # several prompts: one batch
    python generate.py --ckpt_dir DIR --temperature 0 --dtype bfloat16   # greedy, in bf16
    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --system "You are a pirate."   # terminal chat
    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --prompt "What is RoPE?"      # one answer, no prompt

One prompt is streamed to the terminal as it is generated; several run as one batch and are printed when done.
In the chat, /reset clears the history, /exit or Ctrl-D leaves, and Ctrl-C stops the reply being written.
Bad input exits with status 2 and a one-line message.
"""

import argparse
import sys
import time

import llama


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="checkpoint directory (params.json + consolidated.*.pth, "
                   "or config.json + *.safetensors)")
    p.add_argument("--prompt", action="append", default=[], help="prompt text; repeat for a batch")
    p.add_argument("--max_new_tokens", type=int, default=256, help="stop after this many new tokens (default 256)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 is greedy (default 0.6)")
    p.add_argument("--top_p", type=float, default=0.9, help="nucleus sampling threshold in (0, 1] (default 0.9)")
    p.add_argument("--top_k", type=int, default=0, help="sample among the k likeliest tokens; 0 is off (default)")
    p.add_argument("--seed", type=int, default=1, help="seed for sampling (default 1)")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on GPU, float32 on CPU)")
    p.add_argument("--max_seq_len", type=int, default=2048, help="longest prompt + generation (default 2048)")
    p.add_argument("--max_batch_size", type=int, default=4, help="most prompts in one batch (default 4)")
    p.add_argument("--rope_scaling_factor", type=float, default=None,
                   help="override the llama3 RoPE factor of a Meta checkpoint (Meta uses 8; Llama 3.2 1B/3B "
                        "were trained with 32; HF checkpoints carry the right one)")
    p.add_argument("--chat", action="store_true", help="chat with an instruct model (Llama 3 chat format)")
    p.add_argument("--system", default=None, help="system prompt for --chat (kept when old turns are dropped)")
    p.add_argument("--lora", default=None, metavar="RUN_DIR",
                   help="apply what a finetune run saved in RUN_DIR (LoRA adapters, norm weights) to --ckpt_dir")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the one-token decoding step (static KV cache): for GPUs, after a warm-up")
    p.add_argument("--fast", action="store_true",
                   help="fused attention (flash on GPU) and last-position logits: faster prefill and long prompts; "
                        "default is Meta's exact arithmetic, bit-identical to its reference")
    return p.parse_args(argv)


def clean_prompts(prompts):
    cleaned = []
    for prompt in prompts:
        if prompt != prompt.rstrip():
            # "...is " ends in a lone space token the model rarely saw before a word: output degrades
            llama.log(f"note: stripped trailing whitespace from prompt {prompt[:30]!r}... (it tokenizes badly)")
        cleaned.append(prompt.rstrip())
    return cleaned


def main(argv=None):
    a = parse_args(argv)
    if not a.prompt and not a.chat:
        raise llama.InputError("no prompts given; pass --prompt \"...\" (repeat it for a batch), or --chat")
    llama.check_sampling(a.temperature, a.top_p, a.top_k)
    prompts = a.prompt if a.chat else clean_prompts(a.prompt)
    model = llama.Llama.build(a.ckpt_dir, max_seq_len=a.max_seq_len, max_batch_size=a.max_batch_size,
                              device=a.device, dtype=a.dtype, seed=a.seed,
                              rope_scaling_factor=a.rope_scaling_factor, fast=a.fast, finetuned=a.lora,
                              compile=a.compile)
    if a.chat:
        return chat(model, a)
    tok = model.tokenizer
    prompt_tokens = [tok.encode(p, bos=True) for p in prompts]
    llama.log(f"generating up to {a.max_new_tokens} tokens for {len(prompts)} prompt(s), "
              f"temperature {a.temperature}, top_p {a.top_p}, top_k {a.top_k}, seed {a.seed}")
    t0 = time.time()
    if len(prompts) == 1:
        print(prompts[0], end="", flush=True)
        n, t_first = 0, None
        for _, text in model.stream(prompt_tokens[0], a.max_new_tokens, a.temperature, a.top_p, a.top_k):
            t_first = t_first or time.time()
            n += 1
            print(text, end="", flush=True)
        print()
        if n:
            decode_s = time.time() - t_first
            llama.log(f"{n} tokens in {time.time() - t0:.2f}s: first token after {t_first - t0:.2f}s, "
                      f"then {(n - 1) / decode_s if n > 1 and decode_s > 0 else 0:.1f} tokens/s")
        return
    outputs, _ = model.generate(prompt_tokens, a.max_new_tokens, a.temperature, a.top_p, a.top_k)
    for prompt, out in zip(prompts, outputs):
        print(f"{prompt}{tok.decode(out)}\n" + "-" * 40)
    n = sum(len(o) for o in outputs)
    llama.log(f"{n} tokens in {time.time() - t0:.2f}s ({n / (time.time() - t0):.1f} tokens/s over the batch)")


def chat(model, a):
    """A terminal chat. The history is re-encoded each turn; when it no longer fits in max_seq_len with room for
    a reply, the oldest turns are dropped (never the system prompt). --prompt messages are answered in turn, no input."""
    tok, max_len = model.tokenizer, model.args.max_seq_len
    system = [{"role": "system", "content": a.system}] if a.system else []
    history = []

    def reply():
        nonlocal history
        tokens = tok.encode_dialog_prompt(system + history)
        while len(tokens) + a.max_new_tokens > max_len and len(history) > 1:
            history = history[2:] if len(history) > 2 else history[1:]  # the oldest user message and its answer
            print(f"[the conversation is too long for max_seq_len {max_len}: dropped the oldest turn]", file=sys.stderr)
            tokens = tok.encode_dialog_prompt(system + history)
        if len(tokens) >= max_len:
            print(f"[that message is too long for max_seq_len {max_len}; raise --max_seq_len]", file=sys.stderr)
            history.pop()
            return
        text = ""
        try:
            for _, piece in model.stream(tokens, min(a.max_new_tokens, max_len - len(tokens)), a.temperature, a.top_p, a.top_k):
                text += piece
                print(piece, end="", flush=True)
        except KeyboardInterrupt:  # stops this reply, not the chat
            print(" [stopped]", end="")
        print()
        history.append({"role": "assistant", "content": text})

    if a.prompt:
        for message in a.prompt:
            history.append({"role": "user", "content": message})
            reply()
        return
    print("chat: /reset clears the history, /exit or Ctrl-D leaves, Ctrl-C stops a reply", file=sys.stderr)
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
            print("[history cleared]", file=sys.stderr)
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
