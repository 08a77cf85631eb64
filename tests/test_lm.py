"""bif.lm, the Hugging Face causal-LM problem factory: inputs, padding mask, per-token losses, offline loading."""
from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pandas as pd
import pytest
import torch

from bif.errors import ConfigError, ProblemError
from bif.examples.tinylm import TinyLMSpec, make_model, make_tokenizer
from bif.lm import build, read_texts, token_losses

TEXTS = ["the red cat sees a dog .", "the code of alpha is one .", "a big fish .",
         "the small girl likes the old man . the code of kilo is nine ."]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """An untrained tiny GPT-2 with the example's word-level tokenizer, saved with save_pretrained."""
    d = tmp_path_factory.mktemp("tinylm")
    make_model(TinyLMSpec(n_embd=16, n_layer=1), n_positions=32, seed=0).save_pretrained(d)
    make_tokenizer().save_pretrained(d)
    return d


def _write_all(d, texts):
    """The texts as .jsonl (field 'body'), .parquet (column 'body') and .txt; returns the three paths."""
    jsonl, parquet, txt = d / "t.jsonl", d / "t.parquet", d / "t.txt"
    jsonl.write_text("".join(json.dumps({"body": t, "other": 1}) + "\n" for t in texts))
    pd.DataFrame({"body": texts, "n": range(len(texts))}).to_parquet(parquet)
    txt.write_text("\n".join(texts) + "\n\n")
    return jsonl, parquet, txt


def test_jsonl_parquet_and_txt_give_the_same_texts_and_tokens(model_dir, tmp_path):
    paths = _write_all(tmp_path, TEXTS)
    probs = [build(str(model_dir), str(p), text_field="body") for p in paths]
    for p in probs:
        assert p.train.texts == TEXTS and p.query.texts == TEXTS  # query defaults to train
        assert torch.equal(p.train.input_ids, probs[0].train.input_ids)
    words = TEXTS[3].split()
    vocab = make_tokenizer().get_vocab()
    assert probs[0].train.input_ids[3, :len(words)].tolist() == [vocab[w] for w in words]
    assert read_texts(str(paths[0]), text_field="body", limit=2) == TEXTS[:2]


def test_padding_is_right_and_masked_and_never_changes_a_texts_losses(model_dir, tmp_path):
    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prob = build(str(model_dir), str(tmp_path / "t.jsonl"))
    ds = prob.train
    lengths = [len(t.split()) for t in TEXTS]
    assert ds.input_ids.shape == (len(TEXTS), max(lengths))  # padding="longest"
    assert ds.attention_mask.sum(1).tolist() == lengths
    batch = {"input_ids": ds.input_ids, "attention_mask": ds.attention_mask}
    with torch.no_grad():
        losses, mask = prob.loss(prob.model, batch)
    assert losses.shape == mask.shape == ds.input_ids.shape and mask.dtype == torch.bool
    # mask = attention mask shifted: token t >= 1 of a text is a loss position, position 0 and padding are not
    assert mask.sum(1).tolist() == [n - 1 for n in lengths]
    assert not mask[:, 0].any() and (losses[~mask] == 0).all() and (losses[mask] > 0).all()
    for i, n in enumerate(lengths):  # each text alone (no padding) has the same losses
        alone = {"input_ids": ds.input_ids[i:i + 1, :n], "attention_mask": ds.attention_mask[i:i + 1, :n]}
        with torch.no_grad():
            ref, _ = token_losses(prob.model, alone)
        torch.testing.assert_close(losses[i, :n], ref[0], atol=1e-5, rtol=1e-5)
    # and they are the next-token cross-entropies, -log p(x_t | x_<t)
    with torch.no_grad():
        logp = torch.log_softmax(prob.model(input_ids=ds.input_ids[3:4]).logits[0], -1)
    expect = -logp[torch.arange(lengths[3] - 1), ds.input_ids[3, 1:lengths[3]]]
    torch.testing.assert_close(losses[3, 1:lengths[3]], expect, atol=1e-5, rtol=1e-5)
    # render_tokens: the text of the token whose loss sits at each position, with the space before it; "" at padding
    tokens = prob.render_tokens("train", 2)
    first, *rest = TEXTS[2].split()
    assert tokens == [first] + [f" {w}" for w in rest] + [""] * (max(lengths) - lengths[2])
    assert "".join(tokens) == TEXTS[2]
    assert prob.render("query", 1) == TEXTS[1]


def test_max_length_truncates_and_max_length_padding(model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    short = build(str(model_dir), str(tmp_path / "t.txt"), max_length=5)
    assert short.train.input_ids.shape == (4, 5) and short.train.attention_mask.sum(1).tolist() == [5, 5, 4, 5]
    wide = build(str(model_dir), str(tmp_path / "t.txt"), max_length=20, padding="max_length", n_query=2)
    assert wide.train.input_ids.shape == (4, 20) and len(wide.query) == 2
    pad = make_tokenizer().pad_token_id
    assert (wide.train.input_ids[wide.train.attention_mask == 0] == pad).all()
    with pytest.raises(ProblemError, match="padding 'left'"):
        build(str(model_dir), str(tmp_path / "t.txt"), padding="left")


def test_a_missing_model_is_a_clear_error_and_nothing_is_downloaded(model_dir, tmp_path):
    (tmp_path / "t.txt").write_text("a b\n")
    t0 = time.perf_counter()
    for name in (str(tmp_path / "nowhere"), "gpt2", "openai-community/gpt2"):
        with pytest.raises(ProblemError, match="does not exist; bif never downloads models from a hub"):
            build(name, str(tmp_path / "t.txt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ProblemError, match="has no config.json"):
        build(str(tmp_path / "empty"), str(tmp_path / "t.txt"))
    assert time.perf_counter() - t0 < 5  # no network round trips


def test_bad_text_inputs_are_clear_errors(model_dir, tmp_path):
    jsonl, parquet, _ = _write_all(tmp_path, TEXTS)
    with pytest.raises(ProblemError, match="line 1 has no field 'text'"):
        build(str(model_dir), str(jsonl))
    with pytest.raises(ProblemError, match="no column 'text'"):
        build(str(model_dir), str(parquet))
    with pytest.raises(ProblemError, match="does not exist"):
        build(str(model_dir), str(tmp_path / "missing.jsonl"))
    (tmp_path / "t.csv").write_text("x")
    with pytest.raises(ProblemError, match="unknown format"):
        build(str(model_dir), str(tmp_path / "t.csv"))


def test_model_and_texts_from_an_s3_uri_match_the_local_ones(model_dir, tmp_path, s3_bucket):
    import fsspec

    bucket, opts = s3_bucket
    fs = fsspec.filesystem("s3", **opts)
    for f in model_dir.iterdir():
        fs.put(str(f), f"{bucket}/models/tiny/{f.name}")
    jsonl, parquet, _ = _write_all(tmp_path, TEXTS)
    fs.put(str(parquet), f"{bucket}/data/t.parquet")
    remote = build(f"s3://{bucket}/models/tiny", f"s3://{bucket}/data/t.parquet", text_field="body",
                   storage_options=opts)
    local = build(str(model_dir), str(jsonl), text_field="body")
    assert remote.extras["model_dir"] != str(model_dir)  # a temporary copy
    assert torch.equal(remote.train.input_ids, local.train.input_ids)
    batch = {"input_ids": local.train.input_ids, "attention_mask": local.train.attention_mask}
    with torch.no_grad():
        torch.testing.assert_close(remote.loss(remote.model, batch)[0], local.loss(local.model, batch)[0])
    with pytest.raises(ProblemError, match="does not exist"):
        build(f"s3://{bucket}/models/none", f"s3://{bucket}/data/t.parquet", storage_options=opts)


def test_the_pipeline_loads_the_factory_and_its_safetensors_checkpoint(model_dir, tmp_path):
    """`problem: bif.lm:build` + `checkpoint: DIR/model.safetensors` (GPT-2's tied lm_head loads without error)."""
    from safetensors.torch import save_file

    from bif.problem import load_problem, model_hash

    (tmp_path / "t.txt").write_text("\n".join(TEXTS))
    args = {"model": str(model_dir), "train": str(tmp_path / "t.txt"), "max_length": 16}
    base = load_problem("bif.lm:build", args)
    moved = {k: v + 0.5 for k, v in base.model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in moved.items()}, str(tmp_path / "w.safetensors"))
    prob = load_problem("bif.lm:build", args, checkpoint=str(tmp_path / "w.safetensors"))
    assert model_hash(prob.model) != model_hash(base.model)
    torch.testing.assert_close(prob.model.lm_head.weight, moved["transformer.wte.weight"])  # still tied
    same = load_problem("bif.lm:build", args, checkpoint=str(model_dir / "model.safetensors"))
    assert model_hash(same.model) == model_hash(base.model)


def test_fused_activations_compute_the_same_losses_and_gradients(model_dir, tmp_path):
    """gelu_new as torch's fused tanh-GELU: same per-token losses and gradients (float32 rounding), same weights."""
    import copy

    from transformers.activations import NewGELUActivation

    from bif.lm import fuse_activations

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    plain = build(str(model_dir), str(tmp_path / "t.jsonl"), fused_activations=False)
    fused = build(str(model_dir), str(tmp_path / "t.jsonl"))
    assert any(isinstance(m, NewGELUActivation) for m in plain.model.modules())  # the example uses gelu_new
    assert not any(isinstance(m, NewGELUActivation) for m in fused.model.modules())
    assert sum(isinstance(m, torch.nn.GELU) for m in fused.model.modules()) == plain.model.config.n_layer
    sd_plain, sd_fused = plain.model.state_dict(), fused.model.state_dict()
    assert sd_plain.keys() == sd_fused.keys() and all(torch.equal(sd_plain[k], sd_fused[k]) for k in sd_plain)
    torch.manual_seed(0)
    with torch.no_grad():  # move off the untrained init so the activations see a spread of inputs
        for a, b in zip(plain.model.parameters(), fused.model.parameters()):
            a.add_(0.1 * torch.randn_like(a)); b.copy_(a)
    batch = {"input_ids": plain.train.input_ids, "attention_mask": plain.train.attention_mask}
    grads = []
    for prob in (plain, fused):
        prob.model.zero_grad()
        losses, mask = prob.loss(prob.model, batch)
        losses[mask].sum().backward()
        grads.append(torch.cat([p.grad.reshape(-1) for p in prob.model.parameters()]))
        if prob is plain:
            ref = losses.detach()
    assert torch.allclose(losses.detach(), ref, rtol=1e-5, atol=1e-5)
    assert float((grads[1] - grads[0]).norm() / grads[0].norm()) < 1e-5
    assert not torch.equal(losses.detach(), torch.zeros_like(ref))
    assert fuse_activations(copy.deepcopy(fused.model)) == 0  # nothing left to replace


def test_token_losses_never_copy_the_logits():
    """The (B, T, V) logits are the largest tensor of an evaluation; the per-token losses shift the targets, not the
    logits, so the only new tensor of that size is cross_entropy's own log-softmax (before: a copy of the logits'
    (B, T-1, V) slice as well: 635 instead of 432 MB above the model for 8 x 128 tokens of a 50,257-token
    vocabulary)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    b, t, v = 3, 7, 50
    logits = torch.randn(b, t, v)

    class Fixed(torch.nn.Module):
        def forward(self, input_ids, attention_mask, use_cache):
            return type("Out", (), {"logits": logits})()

    class LargeStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.storages = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for o in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(o, torch.Tensor) and o.untyped_storage().nbytes() >= b * (t - 1) * v * 4:
                    self.storages.add(o.untyped_storage().data_ptr())
            return out

    ids = torch.randint(0, v, (b, t))
    attn = torch.ones(b, t, dtype=torch.long)
    attn[1, 4:] = 0
    with torch.no_grad(), LargeStorages() as seen:
        losses, mask = token_losses(Fixed(), {"input_ids": ids, "attention_mask": attn})
    assert len(seen.storages - {logits.untyped_storage().data_ptr()}) == 1  # the log-softmax alone (before: 2)
    expect = -torch.log_softmax(logits, -1)[:, :-1].gather(2, ids[:, 1:, None])[..., 0]  # (B, T-1)
    assert mask.tolist() == [[False] + [True] * 6, [False, True, True, True, False, False, False],
                             [False] + [True] * 6]
    torch.testing.assert_close(losses[:, 1:][mask[:, 1:]], expect[mask[:, 1:]], rtol=0, atol=1e-6)
    assert (losses[~mask] == 0).all()


def _trained(kind: str):
    """A fast tokenizer of a family trained here on TEXTS (no download): byte-level BPE (GPT-2's), or SentencePiece's
    Metaspace over BPE (Llama's, T5's), whose decoders put a word's space in its first token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    if kind == "byte-level":
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
        alphabet = []
    tok.train_from_iterator(TEXTS * 5, trainers.BpeTrainer(vocab_size=120, special_tokens=["[UNK]", "[PAD]"],
                                                           initial_alphabet=alphabet))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.mark.parametrize("kind", ["word-level", "byte-level", "metaspace"])
def test_token_texts_keep_the_spaces_between_words(kind):
    """Each token's text reads as in its sequence: joined they give the text back, words with their spaces. (Each
    token decoded alone, the example's word-level tokenizer and SentencePiece's drop the space before a word:
    contexts read "thesmall⟦girl⟧likes".)"""
    from bif.lm import token_texts

    tok = make_tokenizer() if kind == "word-level" else _trained(kind)
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        texts = token_texts(tok, ids, [1] * len(ids))
        assert "".join(texts) == text, (kind, texts)
        assert len(texts) == len(ids) and all(texts)
        if kind != "byte-level":  # byte-level BPE keeps the space alone too; the others do not
            assert "".join(tok.decode([i]) for i in ids) != text
    # padding is "" and the valid token after it reads as after the valid one before it
    ids = tok(TEXTS[2])["input_ids"]
    pad = tok.pad_token_id
    texts = token_texts(tok, [ids[0], pad, *ids[1:], pad], [1, 0, *[1] * (len(ids) - 1), 0])
    assert texts[1] == texts[-1] == "" and "".join(texts) == TEXTS[2]


def test_a_token_context_marks_the_word_and_keeps_its_space_outside():
    import numpy as np

    from bif.tasks.tokens import _context

    words = np.array(["the", " small", " girl", " likes", " the", " old"], dtype=object)
    assert _context(words, 2, 0, 6) == "the small ⟦girl⟧ likes the old"
    assert _context(words, 0, 0, 6).startswith("⟦the⟧ small")
    assert _context(words, 5, 3, 6) == " likes the ⟦old⟧"


def test_bif_example_defaults_and_epochs(tmp_path, monkeypatch):
    """`bif example digits` saves where bif/examples/digits.yaml reads (it asked for the path), and --epochs reaches
    the tiny LM's training too (it trained its 300 steps whatever --epochs said)."""
    from bif.flows.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["example", "digits", "--epochs", "3"]) == 0
    state = torch.load(tmp_path / "runs" / "example" / "digits.pt", weights_only=True)
    assert state and all(isinstance(v, torch.Tensor) for v in state.values())
    assert main(["example", "tinylm", "lm", "--epochs", "4"]) == 0
    facts = json.loads((tmp_path / "lm" / "facts.json").read_text())
    assert facts["spec"]["steps"] == 4 and len(facts["loss_history"]) == 2  # steps 0 and 3 (every 50th and the last)


def test_fit_steps_retrains_from_scratch_and_the_baselines_take_hf_gradients(model_dir, tmp_path, monkeypatch):
    """``fit_steps`` gives the problem ``fit`` for `bif lds`: a fresh model of the same config trained on the subset
    alone (seeded: the same seed gives the same weights), which lowers the subset's loss. The baselines on the
    Hugging Face model: GradDot equals per-sequence gradients taken by plain autograd (torch.func's vmap failed in
    transformers' mask for the fused attention, which branches on the padding mask's values; the baselines' copy
    attends eagerly), EK-FAC (its wrapper passes keywords) and the influence function (the fused attention has no
    forward-mode derivative) run."""
    from torch.utils.data import Subset

    from bif.evaluation.baselines.graddot import graddot_scores
    from bif.evaluation.retrain import query_losses

    (tmp_path / "t.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    prob = build(str(model_dir), str(tmp_path / "t.jsonl"), fit_steps=40, fit_lr=0.02)
    assert build(str(model_dir), str(tmp_path / "t.jsonl")).fit is None
    sub = Subset(prob.train, [0, 1, 3])
    a, b, other = prob.fit(sub, 3), prob.fit(sub, 3), prob.fit(sub, 4)
    assert type(a) is type(prob.model) and a.config.to_dict() == prob.model.config.to_dict() and not a.training
    sa, sb, so = (m.state_dict() for m in (a, b, other))
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not all(torch.equal(sa[k], so[k]) for k in sa)
    trained, untrained = query_losses(prob, a), query_losses(prob, prob.model)  # the fixture's model is untrained
    assert trained[[0, 1, 3]].sum() < 0.5 * untrained[[0, 1, 3]].sum()

    def grad_of_text(i):
        ids, attn = prob.train.input_ids[i:i + 1], prob.train.attention_mask[i:i + 1]
        losses, mask = token_losses(prob.model, {"input_ids": ids, "attention_mask": attn})
        ps = [p for p in prob.model.parameters() if p.requires_grad]
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad((losses * mask).sum(), ps)])

    g = torch.stack([grad_of_text(i) for i in range(len(TEXTS))]).double()
    want = -(g @ g.T).numpy() / len(TEXTS)
    got = graddot_scores(prob, dtype=torch.float32).values
    assert abs(want).max() > 1e-3
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6 * abs(want).max())
    if importlib.util.find_spec("kronfluence"):  # EK-FAC without curvature: the same on its tracked nn.Linear head
        from bif.evaluation.baselines.ekfac import ekfac_scores

        def head_grad(i):  # d(sequence loss)/d(head weight) = sum over positions of dlogits_t outer hidden_t
            ids, attn = prob.train.input_ids[i:i + 1], prob.train.attention_mask[i:i + 1]
            out = prob.model(input_ids=ids, attention_mask=attn, output_hidden_states=True)
            logits, hidden = out.logits, out.hidden_states[-1]
            losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
            valid = (attn[0, 1:] * attn[0, :-1]).bool()
            (dlogits,) = torch.autograd.grad(losses[valid].sum(), logits)
            return torch.einsum("tv,td->vd", dlogits[0], hidden[0]).detach().reshape(-1)

        h = torch.stack([head_grad(i) for i in range(len(TEXTS))]).double()
        head_want = -(h @ h.T).numpy() / len(TEXTS)
        np.testing.assert_allclose(ekfac_scores(prob, strategy="identity").values, head_want, rtol=2e-4,
                                   atol=1e-6 * abs(head_want).max())
    # the influence function's Hessian-vector products: torch's fused CPU attention has no forward-mode or
    # double-backward derivative, so the baselines' copy attends eagerly; the explicit solve and CG then agree where
    # the damping makes H + λI positive definite
    # (only the attention's 1,088 parameters are trained here, to keep the explicit Hessian small)
    import copy
    import dataclasses

    from bif.evaluation.baselines import influence

    attn = copy.deepcopy(prob.model)
    for name, param in attn.named_parameters():
        param.requires_grad_(".attn." in name)
    on_attn = dataclasses.replace(prob, model=attn)
    explicit = influence.influence_scores(on_attn, damping=100.0, solver="explicit").values
    np.testing.assert_allclose(influence.influence_scores(on_attn, damping=100.0, solver="cg").values, explicit,
                               rtol=1e-6, atol=1e-9 * abs(explicit).max())
    assert abs(explicit).max() > 1e-4
    assert prob.model.config._attn_implementation == "sdpa"  # the problem's own model is left as it was
    monkeypatch.setattr(influence, "EXPLICIT_MAX_PARAMS", 1000)
    with pytest.raises(ConfigError, match=r"^the explicit influence solver would build a 4,624 x 4,624 Hessian "
                                         r"\(0\.2 GiB, and its eigendecomposition\); the model has more than 1,000 "
                                         r"parameters: leave influence out of --methods"):
        influence.influence_scores(prob, damping=1.0)
