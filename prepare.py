"""
Data for finetuning: TinyStories (downloaded once, resumably) or your own documents, tokenized in
parallel into a flat uint32 file of BOS doc EOS BOS doc EOS ... that the training loop memory-maps.

    python prepare.py --ckpt_dir DIR    # TinyStories into data/tinystories/{train,val}.bin
    python prepare.py --ckpt_dir DIR --data my.txt --data_dir out/data

Formats: .txt, documents separated by blank lines (TinyStories: by <|endoftext|> lines); .jsonl,
one {"text": "..."} document or {"messages": [{"role", "content"}, ...]} conversation per line.
Conversations also get a .mask.bin: one byte per token, 1 where the token carries loss (the
assistant's words).
"""

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import urllib.request
from contextlib import nullcontext
from pathlib import Path

import numpy as np

import checkpoints
import llama
from llama import InputError, log

TINYSTORIES = ("https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
               "TinyStoriesV2-GPT4-{}.txt")


def download(url, path):
    """Download with a progress line, resuming a partial download (HTTP Range) and caching the
    result."""
    path = Path(path)
    if path.exists():
        return path
    part = path.with_name(path.name + ".part")
    path.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            if have and r.status != 206:
                have = 0  # the server ignored the range: start over
            total = have + int(r.headers.get("Content-Length", 0))
            with open(part, "ab" if have else "wb") as f:
                done, t0 = have, time.time()
                while chunk := r.read(1 << 20):
                    f.write(chunk)
                    done += len(chunk)
                    rate = (done - have) / 1e6 / max(time.time() - t0, 1e-9)
                    print(f"\rdownloading {path.name}: {done / 1e6:.0f}/{total / 1e6:.0f} MB "
                          f"({rate:.1f} MB/s)", end="", file=sys.stderr)
    except OSError as e:  # URLError, HTTPError, timeouts, a broken connection
        # what arrived stays in .part
        raise InputError(f"cannot download {url} ({getattr(e, 'reason', e)}); check the connection "
                         f"and run again (it resumes), or pass --data FILE") from None
    print(file=sys.stderr)
    # the connection closed early: never call a partial file complete
    if total > have and done < total:
        raise InputError(f"download of {url} stopped at {done:,} of {total:,} bytes; "
                         f"run again to resume")
    part.rename(path)
    return path


def check_source(data):
    """--data tinystories | FILE, checked before anything slow."""
    if data == "tinystories":
        return
    path = Path(data)
    if not path.is_file():
        raise InputError(f"data file {path} does not exist; "
                         f"pass --data tinystories or a .txt / .jsonl file")
    if path.suffix not in (".txt", ".jsonl", ".md", ""):
        log(f"note: {path.name} is read as plain text (documents separated by blank lines)")


def read_documents(path):
    """-> documents: strings, or message lists for conversations (see the module's docstring)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        docs = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path} line {i}: malformed JSON ({e.msg})") from None
                if isinstance(record, dict) and "messages" in record:
                    llama.check_dialog(record["messages"], f"{path} line {i}")
                    docs.append(record["messages"])
                elif isinstance(record, dict) and isinstance(record.get("text"), str):
                    docs.append(record["text"])
                else:
                    raise InputError(f"{path} line {i}: expected {{\"text\": \"...\"}} or "
                                     f"{{\"messages\": [...]}}")
    else:
        text = path.read_text(encoding="utf-8")
        docs = text.split("<|endoftext|>") if "<|endoftext|>" in text else text.split("\n\n")
    docs = [d.strip() if isinstance(d, str) else d
            for d in docs if not isinstance(d, str) or d.strip()]
    if not docs:
        raise InputError(f"{path} holds no text; give it documents separated by blank lines")
    return docs


worker = {}  # each tokenizing process's tokenizer, sent once when the process starts


def start_worker(tokenizer):
    worker["tokenizer"] = tokenizer


def encode_documents(docs):
    """documents -> (uint32 tokens, uint8 loss mask): one worker's share."""
    tokenizer, tokens, train_on = worker["tokenizer"], [], []
    for d in docs:
        ids, mask = ((tokenizer.encode(d, bos=True, eos=True), None) if isinstance(d, str)
                     else tokenizer.encode_dialog(d))
        tokens += ids
        train_on += [True] * len(ids) if mask is None else mask
    return np.array(tokens, dtype=np.uint32), np.array(train_on, dtype=np.uint8)


def tokenize_to_bin(docs, tokenizer, out_path, workers=None):
    """Tokenize documents in parallel, with progress, into out_path (and its .mask.bin for
    conversations). The .bin moves into place last: when it exists, the split is complete."""
    out_path = Path(out_path)
    chat = any(not isinstance(d, str) for d in docs)
    # plain documents train on every token: their mask goes nowhere
    mask_file = llama.atomic_file(out_path.with_suffix(".mask.bin")) if chat else \
        nullcontext(os.devnull)
    jobs = [docs[i:i + 1000] for i in range(0, len(docs), 1000)]
    workers = min(workers or os.cpu_count(), len(jobs))
    start_worker(tokenizer)  # a single job runs here: starting processes would take longer
    pool = (mp.get_context("spawn").Pool(workers, start_worker, (tokenizer,)) if workers > 1
            else None)
    with llama.atomic_file(out_path) as tmp, mask_file as mask_tmp:  # the mask moves first
        with open(tmp, "wb") as f, open(mask_tmp, "wb") as fm:
            n = 0
            for i, (ids, train_on) in enumerate(pool.imap(encode_documents, jobs) if pool else
                                                map(encode_documents, jobs)):
                f.write(ids.tobytes())
                fm.write(train_on.tobytes())
                n += len(ids)
                log(f"  tokenized {min((i + 1) * 1000, len(docs))}/{len(docs)} documents of "
                    f"{out_path.name}: {n:,} tokens")
    if pool:
        pool.close()
    return load_bin(out_path)


def load_splits(data_dir, seq_len, need_val=True):
    """(train, val) from data_dir, each checked to hold more than one sequence of seq_len."""
    splits = [load_bin(Path(data_dir) / f"{s}.bin") for s in ("train", "val")]
    for name, (tokens, _) in zip(("training", "validation"), splits):
        if len(tokens) <= seq_len + 1 and (name == "training" or need_val):
            raise InputError(f"the {name} data has {len(tokens)} tokens, too few for --seq_len "
                             f"{seq_len}; use more data or a smaller --seq_len")
    return splits


def load_bin(path):
    """-> (tokens, loss mask or None) as read-only np.memmaps."""
    mask = Path(path).with_suffix(".mask.bin")
    return (np.memmap(path, dtype=np.uint32, mode="r"),
            np.memmap(mask, dtype=np.uint8, mode="r") if mask.exists() else None)


def prepare_data(data, tokenizer, data_dir):
    """--data tinystories | FILE -> (train, val), each (tokens, loss mask or None), tokenized once
    and cached in data_dir (re-tokenized when the source file changes). A file's last 5% is for
    validation."""
    check_source(data)
    data_dir = Path(data_dir)
    out = [data_dir / "train.bin", data_dir / "val.bin"]
    source = Path(data).resolve()
    stamp = {"source": data} if data == "tinystories" else \
        {"source": str(source), "bytes": source.stat().st_size, "mtime": source.stat().st_mtime}
    stamp_path = data_dir / "source.json"
    if (all(p.exists() for p in out) and stamp_path.exists()
            and llama.read_json(stamp_path) == stamp):
        log(f"using the tokenized data in {data_dir}")
        return [load_bin(p) for p in out]
    for p in out:
        p.unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)
    if data == "tinystories":
        splits = [read_documents(download(TINYSTORIES.format(s), data_dir / f"tinystories-{s}.txt"))
                  for s in ("train", "valid")]
    else:
        docs = read_documents(data)
        n_val = max(1, len(docs) // 20) if len(docs) > 1 else 0
        splits = [docs[:len(docs) - n_val] or docs, docs[len(docs) - n_val:] or docs]
    result = [tokenize_to_bin(docs, tokenizer, p) for docs, p in zip(splits, out)]
    with llama.atomic_file(stamp_path) as tmp:  # written whole, or the next run tokenizes again
        tmp.write_text(json.dumps(stamp))
    log(f"tokenized data saved in {data_dir}")
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt_dir", required=True, help="checkpoint whose tokenizer to use")
    p.add_argument("--data", default="tinystories",
                   help="'tinystories' or a .txt / .jsonl file (default tinystories)")
    p.add_argument("--data_dir", default="data/tinystories",
                   help="output folder (default data/tinystories)")
    a = p.parse_args(argv)
    prepare_data(a.data, checkpoints.load_tokenizer(a.ckpt_dir), a.data_dir)


if __name__ == "__main__":
    try:
        main()
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
