"""
The terminal chat of generate.py --chat: Meta's chat format, the history re-encoded each turn and
cut from the oldest turn when it outgrows max_seq_len (never the system prompt); Ctrl-C stops a
reply, not the chat.

    python generate.py --ckpt_dir Llama-3.2-1B-Instruct --chat --system "You are a pirate."
"""

import torch.distributed as dist

import llama


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
            for _, piece in g.stream(tokens, min(a.max_new_tokens, max_len - len(tokens)),
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
