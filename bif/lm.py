"""A ready problem factory for any Hugging Face ``transformers`` causal language model.

``problem: "bif.lm:build"`` with ``problem_args``::

    model: runs/example/tinylm          # a local directory or fsspec URI of a saved model
                                        # (config.json, weights, tokenizer files)
    train: runs/example/tinylm/train.jsonl   # texts: .jsonl / .json (one object per line),
    query: runs/example/tinylm/query.jsonl   # .parquet, or .txt (one text per non-empty line)
    text_field: text                    # the JSONL field / Parquet column holding the text
    max_length: 128                     # tokens per text (longer texts are truncated)
    padding: longest                    # pad both splits to the longest text of either, or max_length
    fused_activations: true             # torch's fused tanh-GELU for gelu_new / gelu_fast (same function)
    fit_steps: 300                      # optional: the problem gets `fit` (for `bif lds`), below
    fit_lr: 0.01
    fit_weight_decay: 0.01

The model and its tokenizer are loaded with ``local_files_only=True`` from the directory
(an fsspec URI is first copied to a temporary directory): nothing is ever downloaded from
a hub, and a missing directory is a :class:`bif.errors.ProblemError` that says so.

Every text is tokenized once by the model's own tokenizer (truncated to ``max_length``,
right-padded with the tokenizer's pad id, else its eos id, else 0, to one length T for both
splits). A sample is a dict
``{"input_ids": (T,) int64, "attention_mask": (T,) int64}``; torch's default collate stacks
them to (B, T).

The loss is per token: ``loss(model, batch) -> (losses (B, T) float32, mask (B, T) bool)``
(the contract of issue 9). Position t holds the next-token loss of token t given tokens
< t, ``-log p(x_t | x_<t)``; so position 0 (no prediction) and padding are masked:
``mask[:, t] = attention_mask[:, t] & attention_mask[:, t-1]`` for t >= 1, ``mask[:, 0] = False``.
Masked entries of ``losses`` are 0. ``render_tokens(split, i)`` gives the text of token t of
sample i at every position t (length T, "" at padding), i.e. the token whose loss sits at t.
The model runs in float32 (on CPU, or CUDA when the chain puts it there).

``fused_activations: true`` (the default) swaps transformers' Python-formula tanh-GELUs
(``gelu_new``: GPT-2, GPT-J, ...; ``gelu_fast``) for torch's fused ``gelu(approximate="tanh")``,
the same function in one kernel (:func:`fuse_activations`). Each forward and backward of a small
model spends a large share of its time in those eight elementwise ops: a draw of the tinylm
example (2 SGLD steps and one evaluation of 80 texts) is ~14% faster. Losses differ by float32
rounding only (<= 2e-6 on the example); the weights, and so the run's identity, are unchanged.

``fit_steps`` gives the problem a ``fit(dataset, seed)`` for `bif lds`: a fresh model of the same config, seeded,
trained from scratch on the subset by :func:`train_full_batch` (full-batch AdamW with a one-cycle schedule on the
mean valid-token loss, as the tiny LM example is trained). It suits small models that train in seconds; a larger
model's own recipe belongs in a problem module of its own.
"""
from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from bif.errors import ProblemError
from bif.problem import Problem

TEXT_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")
#: What a Dask worker that runs this problem imports ahead of its first chain (the transformers
#: model and tokenizer classes: ~5 s of one core); see ``bif.flows.runtime.FORKSERVER_PRELOAD``.
WORKER_PRELOAD = ("transformers.models.auto.modeling_auto", "transformers.models.auto.tokenization_auto")
PADDING = ("longest", "max_length")


class TokenizedTexts(Dataset):
    """Texts tokenized once: ``input_ids`` and ``attention_mask`` (N, T) int64, right-padded."""

    def __init__(self, texts: Sequence[str], input_ids: torch.Tensor, attention_mask: torch.Tensor):
        self.texts = list(texts)
        self.input_ids = input_ids  # (N, T)
        self.attention_mask = attention_mask  # (N, T)

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[i], "attention_mask": self.attention_mask[i]}


#: cross_entropy's ignore_index: the target of a position with no next token, or one whose pair is padding
_IGNORE = -100


def token_losses(model: torch.nn.Module, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token next-token losses of a collated batch: ``(losses (B, T) float32, mask (B, T) bool)``.

    ``losses[b, t] = -log p(x_t | x_<t)`` for t >= 1; position 0 and padding are masked
    (``mask`` False) and hold 0.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]  # (B, T), (B, T)
    logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits  # (B, T, V)
    b, t, v = logits.shape
    valid = attn > 0
    # position s predicts token s+1: the targets are shifted and padded (ignored: -100, loss 0), not the logits,
    # whose (B, T-1, V) slice would be copied (as transformers' own causal-LM loss does). One logits-sized buffer
    # less: evaluating 8 x 128 tokens of a 50,257-token vocabulary peaked 432 MB above the model instead of 635 MB
    targets = F.pad(ids[:, 1:].masked_fill(~(valid[:, 1:] & valid[:, :-1]), _IGNORE), (0, 1), value=_IGNORE)
    nll = F.cross_entropy(logits.reshape(-1, v).float(), targets.reshape(-1), reduction="none",
                          ignore_index=_IGNORE).view(b, t)  # (B, T): nll[:, s] = -log p(x_{s+1} | x_<=s)
    # rolled one to the right: position t holds x_t's loss; position 0 gets the last column, ignored (0, False)
    return nll.roll(1, dims=1), (targets != _IGNORE).roll(1, dims=1)


#: transformers activation classes that compute 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))) in Python
#: ops (names as in ``transformers.activations``); :func:`fuse_activations` replaces them.
TANH_GELU_CLASSES = ("NewGELUActivation", "FastGELUActivation")


def fuse_activations(model: torch.nn.Module) -> int:
    """Replace every tanh-approximated GELU written as Python ops by ``torch.nn.GELU(approximate="tanh")``.

    Same function, one fused kernel forward and backward instead of ~8 elementwise ops each way.
    Only modules whose class is exactly one of :data:`TANH_GELU_CLASSES` are replaced (a subclass
    may compute something else); activations have no parameters or buffers, so the state dict is
    unchanged. Returns how many modules were replaced.
    """
    from transformers import activations

    classes = tuple(c for c in (getattr(activations, n, None) for n in TANH_GELU_CLASSES) if c is not None)
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) in classes:
                setattr(parent, name, torch.nn.GELU(approximate="tanh"))
                count += 1
    return count


def local_model_dir(uri: str, *, storage_options: Mapping[str, Any] | None = None) -> str:
    """A local directory holding the model at ``uri``: ``uri`` itself if local, else a temporary copy.

    Never downloads from a hub: ``uri`` must be an existing directory (local or fsspec) with a
    ``config.json``. The temporary copy is removed when the process exits.
    """
    from bif.store.fs import is_local
    from bif.store.tables import Folder

    how = ("bif never downloads models from a hub: save the model and its tokenizer with "
           "save_pretrained(DIR) (or `huggingface-cli download NAME --local-dir DIR` on a machine "
           "with internet) and pass that DIR (a local path or an fsspec URI) as problem_args.model")
    folder = Folder(uri, storage_options)
    fs, path = folder.fs, folder.root
    try:
        is_dir = fs.isdir(path)
        has_config = is_dir and folder.exists("config.json")
    except Exception as err:  # noqa: BLE001 - an unreachable store
        raise ProblemError(f"cannot read the model directory {uri!r}: {type(err).__name__}: {err}") from None
    if not is_dir:
        raise ProblemError(f"model directory {uri!r} does not exist; {how}")
    if not has_config:
        raise ProblemError(f"model directory {uri!r} has no config.json, so it is not a saved transformers "
                           f"model; {how}")
    if is_local(fs):
        return path
    tmp = tempfile.mkdtemp(prefix="bif-lm-model-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    for name in fs.ls(path, detail=False):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if fs.isfile(name):  # a model directory is flat; subfolders (e.g. checkpoints) are not needed
            fs.get(name, os.path.join(tmp, base))
    return tmp


def read_texts(uri: str, *, text_field: str = "text", storage_options: Mapping[str, Any] | None = None,
               limit: int | None = None) -> list[str]:
    """The texts of a .jsonl / .json (one JSON object or string per line), .parquet or .txt file.

    ``text_field``: the JSON field or Parquet column holding the text. ``limit``: keep the
    first ``limit`` texts. Empty .txt lines are skipped.
    """
    from bif.store.fs import read_uri

    suffix = next((s for s in TEXT_SUFFIXES if uri.lower().endswith(s)), None)
    if suffix is None:
        raise ProblemError(f"texts {uri!r}: unknown format; use a file ending in one of {list(TEXT_SUFFIXES)}")
    try:
        data = read_uri(uri, storage_options)
    except FileNotFoundError:
        raise ProblemError(f"texts file {uri!r} does not exist; check problem_args train / query") from None
    if suffix == ".parquet":
        from bif.store.tables import Folder

        parent, _, name = uri.rstrip("/").rpartition("/")
        table = Folder(parent or ".", storage_options).read_table(name)
        if text_field not in table.columns:
            raise ProblemError(f"Parquet file {uri!r} has no column {text_field!r} (columns: {list(table.columns)}); "
                               "set problem_args.text_field")
        texts = table[text_field].tolist()
    elif suffix == ".txt":
        texts = [line for line in data.decode("utf-8").splitlines() if line.strip()]
    else:
        texts = []
        for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise ProblemError(f"{uri!r} line {n} is not JSON ({err}); one JSON object per line") from None
            if isinstance(obj, str):
                texts.append(obj)
            elif isinstance(obj, dict) and text_field in obj:
                texts.append(obj[text_field])
            else:
                raise ProblemError(f"{uri!r} line {n} has no field {text_field!r}; set problem_args.text_field")
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise ProblemError(f"{uri!r}: text {bad[0]} is {type(texts[bad[0]]).__name__}, not a string")
    texts = texts[:limit] if limit is not None else texts
    if not texts:
        raise ProblemError(f"{uri!r} holds no texts")
    return texts


def tokenize(tokenizer: Any, texts: Sequence[str], *, max_length: int, padding: str = "longest") -> TokenizedTexts:
    """Tokenize ``texts`` with ``tokenizer`` (truncated to ``max_length``), right-padded to one length T.

    ``padding``: "longest" (T = the longest text, at most ``max_length``) or "max_length".
    The pad id is the tokenizer's pad id, else its eos id, else 0 (padding is masked anyway).
    """
    if padding not in PADDING:
        raise ProblemError(f"padding {padding!r} is not one of {list(PADDING)}")
    if int(max_length) < 2:
        raise ProblemError(f"max_length {max_length} leaves no next-token loss; use max_length >= 2")
    enc = tokenizer(list(texts), truncation=True, max_length=int(max_length), padding=False)["input_ids"]
    longest = max(len(e) for e in enc)
    width = int(max_length) if padding == "max_length" else max(longest, 1)
    pad = pad_id(tokenizer)
    ids = torch.full((len(enc), width), int(pad), dtype=torch.int64)
    attn = torch.zeros((len(enc), width), dtype=torch.int64)
    for i, e in enumerate(enc):
        ids[i, :len(e)] = torch.as_tensor(e, dtype=torch.int64)
        attn[i, :len(e)] = 1
    return TokenizedTexts(texts, ids, attn)


def pad_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad id, else its eos id, else 0."""
    return int(next((p for p in (tokenizer.pad_token_id, tokenizer.eos_token_id) if p is not None), 0))


def pad_to(ds: TokenizedTexts, width: int, pad: int) -> TokenizedTexts:
    """``ds`` right-padded with ``pad`` (attention mask 0) to ``width`` tokens (itself if already that wide)."""
    extra = int(width) - ds.input_ids.shape[1]
    if extra <= 0:
        return ds
    return TokenizedTexts(ds.texts, F.pad(ds.input_ids, (0, extra), value=int(pad)),
                          F.pad(ds.attention_mask, (0, extra), value=0))


def load_pretrained(model_dir: str, *, fused_activations: bool = True) -> tuple[torch.nn.Module, Any]:
    """(model in float32 eval mode, tokenizer) from a local directory, offline (local_files_only).

    ``fused_activations``: apply :func:`fuse_activations` to the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # "Loading weights" bars would clutter every chain's log
    try:
        model, tokenizer = _load_pretrained(model_dir, AutoModelForCausalLM, AutoTokenizer)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if fused_activations:
        fuse_activations(model)
    return model, tokenizer


def _load_pretrained(model_dir: str, auto_model: Any, auto_tokenizer: Any) -> tuple[torch.nn.Module, Any]:
    try:
        tokenizer = auto_tokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - transformers raises OSError / ValueError / KeyError
        raise ProblemError(f"cannot load a tokenizer from {model_dir!r}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:300] if str(err) else ''}; save it with "
                           "tokenizer.save_pretrained(DIR) next to the model") from None
    try:
        model = auto_model.from_pretrained(model_dir, local_files_only=True, dtype=torch.float32)
    except Exception as err:  # noqa: BLE001
        raise ProblemError(f"cannot load a causal LM from {model_dir!r}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None
    return model.float().eval(), tokenizer


def token_texts(tokenizer: Any, ids: Sequence[int], valid: Sequence[int | bool]) -> list[str]:
    """Each token's text as it reads in its sequence ("" where ``valid`` is 0): what the token adds to the decoded
    sequence, the space before it included, i.e. the decoding of it after the valid token before it, less that
    token's own decoding (the token's own decoding where that is no prefix, the first token's own decoding).

    Decoding a token alone drops the space before a word for SentencePiece ("▁") and WordPiece-style decoders:
    the tiny LM's contexts read "thesmall⟦fish⟧finds" (byte-level BPE keeps it: "Ġfish" decodes to " fish").
    Joined, these texts give the decoded sequence. Two batched decodes per sequence."""
    kw = {"skip_special_tokens": False, "clean_up_tokenization_spaces": False}
    where = [t for t, ok in enumerate(valid) if ok]
    toks = [int(ids[t]) for t in where]
    alone = tokenizer.batch_decode([[i] for i in toks], **kw) if toks else []
    pairs = tokenizer.batch_decode([[a, b] for a, b in zip(toks, toks[1:])], **kw) if len(toks) > 1 else []
    texts = alone[:1] + [pair[len(prev):] if pair.startswith(prev) else own
                         for pair, prev, own in zip(pairs, alone, alone[1:])]
    out = [""] * len(ids)
    for t, text in zip(where, texts):
        out[t] = text
    return out


def train_full_batch(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], *, steps: int, lr: float,
                     weight_decay: float, seed: int) -> list[float]:
    """Full-batch AdamW (one-cycle schedule) on the mean valid-token loss (:func:`token_losses`) of ``batch``;
    returns the loss every 50 steps (and the last). The tiny LM example's training and ``build``'s ``fit``."""
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    history = []
    for step in range(steps):
        losses, mask = token_losses(model, batch)
        loss = losses[mask].mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0 or step == steps - 1:
            history.append(float(loss.detach()))
    return history


def _fit_from_scratch(net: torch.nn.Module, *, steps: int, lr: float, weight_decay: float, fused_activations: bool):
    """``fit(dataset, seed)``: a fresh model of ``net``'s config, seeded, trained on ``dataset`` by
    :func:`train_full_batch`; float32, eval mode."""
    if int(steps) < 1:
        raise ProblemError(f"fit_steps must be >= 1, got {steps}")

    def fit(dataset: Dataset, seed: int) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        from bif.sampling.chain import collate_indices

        torch.manual_seed(int(seed))
        model = AutoModelForCausalLM.from_config(net.config).float()
        if fused_activations:
            fuse_activations(model)
        train_full_batch(model, collate_indices(dataset, torch.arange(len(dataset))), steps=int(steps), lr=lr,
                         weight_decay=weight_decay, seed=int(seed))
        return model.eval()

    return fit


def build(model: str, train: str, query: str | None = None, *, text_field: str = "text", max_length: int = 128,
          padding: str = "longest", n_train: int | None = None, n_query: int | None = None,
          fused_activations: bool = True, storage_options: Mapping[str, Any] | None = None,
          fit_steps: int | None = None, fit_lr: float = 1e-2, fit_weight_decay: float = 1e-2) -> Problem:
    """The problem of a saved causal LM and two text files (see the module docstring).

    ``model``: directory (local or fsspec URI) with config.json, weights and tokenizer.
    ``train`` / ``query``: text files (query defaults to train). ``n_train`` / ``n_query``:
    keep the first texts only. ``fused_activations``: :func:`fuse_activations` (default on; the
    same function, faster). ``storage_options``: fsspec options for these URIs (they are
    stored with the config's problem_args: prefer ambient credentials, e.g. ``AWS_*``). ``fit_steps``: the
    problem gets ``fit`` (from scratch, :func:`train_full_batch` with ``fit_lr`` and ``fit_weight_decay``).
    """
    model_dir = local_model_dir(model, storage_options=storage_options)
    net, tokenizer = load_pretrained(model_dir, fused_activations=fused_activations)
    sets = {}
    for split, uri, limit in (("train", train, n_train), ("query", query or train, n_query)):
        texts = read_texts(uri, text_field=text_field, storage_options=storage_options, limit=limit)
        sets[split] = tokenize(tokenizer, texts, max_length=max_length, padding=padding)
    # one length T for both splits (padding is masked, so no loss changes): a draw then evaluates
    # train and query in one forward pass (bif.sampling.chain.SGLDChain._joint_evaluation)
    width = max(ds.input_ids.shape[1] for ds in sets.values())
    sets = {split: pad_to(ds, width, pad_id(tokenizer)) for split, ds in sets.items()}
    cache: dict[tuple[str, int], list[str]] = {}

    def render_tokens(split: str, index: int) -> list[str]:
        """Text of token t of sample ``index`` at every position t ("" at padding), its space included
        (:func:`token_texts`)."""
        key = (split, int(index))
        if key not in cache:
            ds = sets[split]
            cache[key] = token_texts(tokenizer, ds.input_ids[int(index)].tolist(),
                                     ds.attention_mask[int(index)].tolist())
        return list(cache[key])

    def render(split: str, index: int) -> str:
        return sets[split].texts[int(index)]

    fit = None if fit_steps is None else _fit_from_scratch(net, steps=fit_steps, lr=fit_lr,
                                                           weight_decay=fit_weight_decay,
                                                           fused_activations=fused_activations)
    return Problem(model=net, train=sets["train"], query=sets["query"], loss=token_losses, render=render,
                   render_tokens=render_tokens, fit=fit, extras={"tokenizer": tokenizer, "model_dir": model_dir})
