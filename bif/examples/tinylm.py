"""Built-in example: a tiny GPT-2-style causal LM trained on a generated corpus with planted facts.

``bif example tinylm [DIR]`` (default ``runs/example/tinylm``) writes into DIR:

- a Hugging Face model directory: ``config.json``, ``model.safetensors`` (a 2-layer GPT-2
  built from a ``transformers.GPT2Config``, trained here on CPU in seconds) and the tokenizer
  files (a word-level ``tokenizers.Tokenizer`` built locally, wrapped in
  ``PreTrainedTokenizerFast``; nothing is downloaded);
- the corpus ``train.jsonl`` and ``query.jsonl`` (``{"text": ...}`` per line);
- ``facts.json``: the planted key -> value facts, which train samples state each fact and at
  which token position its value sits, and which query samples / positions use it.

Every text is a few sentences of filler ("the red cat sees a small dog .") drawn from a
tiny grammar. A *fact* sentence "the code of KEY is VALUE ." plants one of
``num_facts`` fixed key -> value pairs; ``copies`` train texts state each fact (at a random
sentence slot), the other train texts are filler only. Each query text states one fact,
so the query's VALUE token can only be predicted from the train texts that carry that fact:
those should rank at the top of its attribution. Positions are token indices in the text
(one token per word, no special tokens), the positions ``bif.lm`` stores.

``bif run bif/examples/tinylm.yaml`` attributes it with ``bif.lm:build``.
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass

import torch

DEFAULT_DIR = "runs/example/tinylm"
ADJECTIVES = ["red", "blue", "big", "small", "old", "new"]
NOUNS = ["cat", "dog", "bird", "fish", "man", "girl"]
VERBS = ["sees", "likes", "finds", "hears"]
DETS = ["the", "a"]
KEYS = ["alpha", "bravo", "delta", "echo", "golf", "hotel", "india", "kilo", "lima", "mike", "oscar", "papa"]
VALUES = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "zero", "many"]
SPECIAL = ["[PAD]", "[UNK]", "[EOS]"]
FACT_TEMPLATE = ["the", "code", "of", "{key}", "is", "{value}", "."]
VALUE_OFFSET = FACT_TEMPLATE.index("{value}")  # token index of VALUE within a fact sentence


@dataclass(frozen=True)
class TinyLMSpec:
    """Sizes of the example: corpus, model and training (defaults train in a few seconds on CPU)."""

    num_facts: int = 8  # planted key -> value pairs (<= 12)
    copies: int = 4  # train texts stating each fact
    num_filler: int = 32  # train texts without a fact
    sentences: int = 2  # sentences per train text (one of them the fact, if any)
    queries_per_fact: int = 2  # query texts per fact: the bare fact, then filler + fact
    n_embd: int = 32
    n_layer: int = 2
    n_head: int = 2
    steps: int = 300  # full-batch AdamW steps
    lr: float = 1e-2
    weight_decay: float = 1e-2


def vocabulary() -> list[str]:
    """Every word of the corpus, specials first (ids are list positions)."""
    words = SPECIAL + DETS + ADJECTIVES + NOUNS + VERBS + ["and", ".", "code", "of", "is"] + KEYS + VALUES
    assert len(set(words)) == len(words)
    return words


def _filler(rng: random.Random) -> list[str]:
    """One filler sentence: DET ADJ NOUN VERB DET ADJ NOUN ."""
    return [rng.choice(DETS), rng.choice(ADJECTIVES), rng.choice(NOUNS), rng.choice(VERBS),
            rng.choice(DETS), rng.choice(ADJECTIVES), rng.choice(NOUNS), "."]


def _fact(key: str, value: str) -> list[str]:
    return [w.format(key=key, value=value) for w in FACT_TEMPLATE]


def make_corpus(spec: TinyLMSpec, seed: int) -> tuple[list[str], list[str], dict]:
    """(train texts, query texts, facts) for ``spec``; deterministic in ``seed``.

    ``facts["facts"][f]`` = {key, value, train_samples, train_positions, query_samples,
    query_positions}: the samples stating fact f and the token position of its VALUE in each.
    """
    if not 1 <= spec.num_facts <= len(KEYS):
        raise ValueError(f"num_facts must be in 1..{len(KEYS)}, got {spec.num_facts}")
    rng = random.Random(seed)
    keys = rng.sample(KEYS, spec.num_facts)
    values = rng.sample(VALUES, spec.num_facts)
    facts = [{"key": k, "value": v, "train_samples": [], "train_positions": [], "query_samples": [],
              "query_positions": []} for k, v in zip(keys, values)]
    docs: list[tuple[list[str], int | None, int | None]] = []  # (words, fact, value position)
    for f in range(spec.num_facts):
        for _ in range(spec.copies):
            slot = rng.randrange(spec.sentences)
            words: list[str] = []
            pos = None
            for s in range(spec.sentences):
                if s == slot:
                    pos = len(words) + VALUE_OFFSET
                    words += _fact(keys[f], values[f])
                else:
                    words += _filler(rng)
            docs.append((words, f, pos))
    for _ in range(spec.num_filler):
        docs.append(([w for _ in range(spec.sentences) for w in _filler(rng)], None, None))
    rng.shuffle(docs)
    train = []
    for i, (words, f, pos) in enumerate(docs):
        train.append(" ".join(words))
        if f is not None:
            facts[f]["train_samples"].append(i)
            facts[f]["train_positions"].append(pos)
    query = []
    for f in range(spec.num_facts):
        for q in range(spec.queries_per_fact):
            words = _filler(rng) if q > 0 else []
            pos = len(words) + VALUE_OFFSET
            facts[f]["query_samples"].append(len(query))
            facts[f]["query_positions"].append(pos)
            query.append(" ".join(words + _fact(keys[f], values[f])))
    meta = {"seed": seed, "num_train": len(train), "num_query": len(query), "value_offset": VALUE_OFFSET,
            "facts": facts}
    return train, query, meta


def make_tokenizer():
    """A word-level fast tokenizer over :func:`vocabulary`, built locally (no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(vocabulary())}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


def make_model(spec: TinyLMSpec, *, n_positions: int, seed: int) -> torch.nn.Module:
    """A freshly initialized GPT-2 of ``spec``'s sizes (dropout off), seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=len(vocabulary()), n_positions=n_positions, n_embd=spec.n_embd,
                     n_layer=spec.n_layer, n_head=spec.n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                     bos_token_id=SPECIAL.index("[EOS]"), eos_token_id=SPECIAL.index("[EOS]"),
                     pad_token_id=SPECIAL.index("[PAD]"))
    torch.manual_seed(seed)
    return GPT2LMHeadModel(cfg)


def train(model: torch.nn.Module, batch: dict[str, torch.Tensor], spec: TinyLMSpec, *, seed: int) -> list[float]:
    """Full-batch AdamW (one-cycle schedule) on the mean valid-token loss (:func:`bif.lm.train_full_batch`, which
    ``bif.lm.build``'s ``fit`` also uses); returns the loss every 50 steps (and the last)."""
    from bif.lm import train_full_batch

    return train_full_batch(model, batch, steps=spec.steps, lr=spec.lr, weight_decay=spec.weight_decay, seed=seed)


def fact_accuracy(model: torch.nn.Module, batch: dict[str, torch.Tensor], meta: dict) -> float:
    """Share of query VALUE tokens that the model predicts (argmax) correctly."""
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    hits = []
    for fact in meta["facts"]:
        for q, pos in zip(fact["query_samples"], fact["query_positions"]):
            hits.append(int(logits[q, pos - 1].argmax()) == int(batch["input_ids"][q, pos]))
    return sum(hits) / len(hits)


def save_example(out_dir: str = DEFAULT_DIR, *, seed: int = 0, spec: TinyLMSpec | None = None) -> dict:
    """Generate the corpus, train the tiny LM, and save model, tokenizer, corpus and facts.json to ``out_dir``.

    Returns a summary: the directory, the loss history, the query fact accuracy, seconds.
    """
    spec = spec or TinyLMSpec()
    t0 = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small gains nothing from more; spare cores stay free
    try:
        return _save_example(out_dir, seed=seed, spec=spec, t0=t0)
    finally:
        torch.set_num_threads(threads)


def _save_example(out_dir: str, *, seed: int, spec: TinyLMSpec, t0: float) -> dict:
    from bif.lm import tokenize

    train_texts, query_texts, meta = make_corpus(spec, seed)
    tokenizer = make_tokenizer()
    tr = tokenize(tokenizer, train_texts, max_length=512)
    qu = tokenize(tokenizer, query_texts, max_length=512)
    n_positions = max(tr.input_ids.shape[1], qu.input_ids.shape[1])
    model = make_model(spec, n_positions=n_positions, seed=seed)
    history = train(model, {"input_ids": tr.input_ids, "attention_mask": tr.attention_mask}, spec, seed=seed)
    model.eval()
    accuracy = fact_accuracy(model, {"input_ids": qu.input_ids, "attention_mask": qu.attention_mask}, meta)
    os.makedirs(out_dir, exist_ok=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Writing model shards" would clutter the command's output
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    for name, texts in (("train.jsonl", train_texts), ("query.jsonl", query_texts)):
        with open(os.path.join(out_dir, name), "w") as f:
            f.writelines(json.dumps({"text": t}) + "\n" for t in texts)
    meta = {**meta, "spec": spec.__dict__, "loss_history": history, "query_fact_accuracy": accuracy,
            "max_length": n_positions}
    with open(os.path.join(out_dir, "facts.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return {"dir": out_dir, "loss_history": history, "query_fact_accuracy": accuracy,
            "seconds": time.perf_counter() - t0}
