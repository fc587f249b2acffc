"""Training data as fixed-length token blocks with a held-out eval split.

Batches are indexed by (step, micro-batch), so a resumed run sees exactly the batches an
uninterrupted run would have seen.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import List, Tuple

from effrun.errors import UserError

DATA_KINDS = ("text", "jsonl", "instruct", "synthetic")


def _text_files(dcfg) -> List[Path]:
    if dcfg.path:
        p = Path(dcfg.path).expanduser()
        if not p.exists():
            raise UserError(f"no such file or directory: {p}", key="data.path")
        return sorted(p.glob("*.txt")) if p.is_dir() else [p]
    if dcfg.name == "shakespeare":
        from effrun.assets import cache_dir

        d = cache_dir() / "shakespeare"
        if not (d / ".complete").exists():
            raise UserError("the shakespeare corpus is not fetched; run `effrun fetch` or `make assets`",
                            key="data")
        return sorted(d.glob("*.txt"))
    raise UserError("a text data config needs data.path", key="data.path")


def _read_text(path: Path) -> str:
    """A text file as str; a binary file (NUL bytes, or mostly undecodable) is refused."""
    raw = path.read_bytes()
    head = raw[:65536]
    text = raw.decode("utf-8", errors="replace")
    bad = head.decode("utf-8", errors="replace").count("\ufffd")
    if b"\x00" in head or bad > max(8, len(head) // 100):
        raise UserError(f"{path} is not UTF-8 text (a binary file?)", key="data.path")
    return text


def instruction_examples(n: int = 512, seed: int = 0) -> List[dict]:
    """A small instruction set we write ourselves: tasks a small model can learn in a few steps."""
    rng = random.Random(seed)
    words = ("king crown sword night storm love honour ghost letter queen forest duke fool battle "
             "ring dream moon poison castle tongue").split()
    rows = []
    for i in range(n):
        k = i % 4
        ws = rng.sample(words, 4)
        if k == 0:
            inst, resp = f"Reverse the order of these words: {' '.join(ws)}", " ".join(reversed(ws))
        elif k == 1:
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            inst, resp = f"Add {a} and {b}.", str(a + b)
        elif k == 2:
            inst, resp = f"Write these words in capitals: {' '.join(ws)}", " ".join(w.upper() for w in ws)
        else:
            inst, resp = f"Which of these words is longest: {', '.join(ws)}?", max(ws, key=len)
        rows.append({"instruction": inst, "response": resp})
    return rows


def _format_row(row: dict) -> str:
    if "text" in row:
        return str(row["text"])
    return f"### Instruction:\n{row['instruction']}\n### Response:\n{row['response']}\n\n"


def load_texts(dcfg) -> Tuple[str, str]:
    """(train_text, eval_text). Eval is held out by document (the last fraction of files/rows)."""
    if dcfg.kind == "text":
        files = _text_files(dcfg)
        docs = [_read_text(f) for f in files]
    elif dcfg.kind == "jsonl":
        if not dcfg.path:
            raise UserError("a jsonl data config needs data.path", key="data.path")
        import datasets

        datasets.disable_progress_bars()
        try:
            ds = datasets.load_dataset("json", data_files=str(Path(dcfg.path).expanduser()), split="train")
        except FileNotFoundError as e:
            raise UserError(f"no such file: {dcfg.path}", key="data.path") from e
        docs = [_format_row(r) for r in ds]
    elif dcfg.kind == "instruct":
        docs = [_format_row(r) for r in instruction_examples(seed=dcfg.seed)]
    else:
        raise UserError(f"data kind {dcfg.kind!r} has no text", key="data.kind", choices=DATA_KINDS)
    n_eval = max(1, int(round(len(docs) * dcfg.eval_fraction))) if len(docs) > 1 else 0
    train_docs, eval_docs = docs[: len(docs) - n_eval], docs[len(docs) - n_eval:]
    train, ev = "\n".join(train_docs), "\n".join(eval_docs)
    if not eval_docs:  # one document: hold out its tail
        cut = int(len(train) * (1 - dcfg.eval_fraction))
        train, ev = train[:cut], train[cut:]
    if dcfg.max_chars:
        train = train[: dcfg.max_chars]
        ev = ev[: max(dcfg.max_chars // 10, 20_000)]
    return train, ev


class TokenBlocks:
    """Token ids cut into blocks of seq_len+1 (inputs and shifted labels come from one block)."""

    def __init__(self, dcfg, tokenizer, vocab_size: int):
        import torch

        self.seq_len = dcfg.seq_len
        self.batch_size = dcfg.batch_size
        self.eval_batches = dcfg.eval_batches
        self.seed = dcfg.seed
        if dcfg.kind == "synthetic":
            g = torch.Generator().manual_seed(dcfg.seed)
            n = 256  # independent of the batch size: a run's samples do not depend on how it is batched
            self.train = torch.randint(0, vocab_size, (n, self.seq_len + 1), generator=g)
            self.eval = torch.randint(0, vocab_size, (max(1, dcfg.eval_batches) * dcfg.batch_size, self.seq_len + 1), generator=g)
        else:
            train_ids, eval_ids = self._tokenize(dcfg, tokenizer)
            self.train = self._blocks(train_ids, "train")
            self.eval = self._blocks(eval_ids, "eval")
        if self.train.max() >= vocab_size:
            raise UserError(f"token id {int(self.train.max())} >= model vocab {vocab_size}: the model and "
                            "tokenizer do not match", key="model.tokenizer")
        g = torch.Generator().manual_seed(self.seed)
        self.order = torch.randperm(len(self.train), generator=g)

    def _tokenize(self, dcfg, tokenizer):
        import torch

        from effrun.assets import cache_dir

        train, ev = load_texts(dcfg)
        key = hashlib.sha1(json.dumps([tokenizer.name, dcfg.kind, dcfg.name, dcfg.path, dcfg.max_chars,
                                       dcfg.eval_fraction, dcfg.seed, len(train), len(ev)]).encode()).hexdigest()[:12]
        f = cache_dir() / "tokens" / f"{dcfg.name}-{tokenizer.name}-{key}.pt"
        if f.exists():
            d = torch.load(f, weights_only=True)
            return d["train"], d["eval"]
        out = (torch.tensor(tokenizer.encode(train), dtype=torch.long), torch.tensor(tokenizer.encode(ev), dtype=torch.long))
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".tmp")
        torch.save({"train": out[0], "eval": out[1]}, tmp)
        tmp.replace(f)
        return out

    def _blocks(self, ids, split: str):
        n = len(ids) // (self.seq_len + 1)
        if n < 1:
            raise UserError(f"{split} split has {len(ids)} tokens, fewer than one block of "
                            f"seq_len+1 = {self.seq_len + 1}", key="data.seq_len")
        return ids[: n * (self.seq_len + 1)].view(n, self.seq_len + 1)

    def batch(self, index: int, batch_size: int | None = None):
        """The index-th training micro-batch: (input_ids, labels), deterministic in index."""
        bs = batch_size or self.batch_size
        import torch

        pos = (index * bs + torch.arange(bs)) % len(self.order)
        block = self.train[self.order[pos]]
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def eval_iter(self):
        bs = self.batch_size
        n = min(len(self.eval) // bs, self.eval_batches) if len(self.eval) >= bs else 1
        for i in range(n):
            block = self.eval[i * bs:(i + 1) * bs]
            yield block[:, :-1].contiguous(), block[:, 1:].contiguous()
