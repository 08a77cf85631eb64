"""report.html's token view: the embedded data equals the stored arrays, caps hold, colours follow signs.

The fixture writes a token run's outputs (tokens.parquet, topk_tokens.parquet, bif_tokens.zarr,
bif.zarr) from a known token x token matrix through xarray / pyarrow, in the layout of the LM
contract, with the tokens of bif_tokens.zarr in shuffled order (the view must not assume any).
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bif import report_tokens as RT
from bif import schema as S
from bif.report import SECTIONS, build_report_html, write_report
from bif.report_tokens import TokenViewLimits, token_view_data, token_view_html
from bif.store.run import RunStore

N_TRAIN, N_QUERY, T, TOPK = 7, 5, 9, 3
NOTES = Path("/work/notes/s3")


@dataclass(frozen=True)
class TokenRun:
    uri: str
    bif: np.ndarray  # (train tokens, query tokens), tokens in (sample, position) order
    train_tokens: pd.DataFrame  # sample, position, token; row i = row i of bif
    query_tokens: pd.DataFrame  # column j = row j

    def block(self, t: int, q: int) -> np.ndarray:
        return self.bif[np.ix_(self.train_tokens.index[self.train_tokens[S.SAMPLE] == t],
                               self.query_tokens.index[self.query_tokens[S.SAMPLE] == q])]

    def seq(self) -> np.ndarray:
        return np.array([[self.block(t, q).sum() for q in range(N_QUERY)] for t in range(N_TRAIN)])

    def text(self, split: str, sample: int) -> list[str]:
        df = self.train_tokens if split == S.TRAIN else self.query_tokens
        return df[df[S.SAMPLE] == sample].sort_values(S.POSITION)[S.TOKEN].tolist()


def _tokens(split: str, n: int, rng: np.random.Generator) -> pd.DataFrame:
    rows = []
    for s in range(n):
        valid = np.flatnonzero(rng.random(T) < 0.7)
        valid = valid if valid.size else np.array([0])
        for p in valid:  # masked positions (padding) get no row
            word = {(0, 2): "</script>&x", (1, 1): "new\nline"}.get((s, int(p)), f" {split[0]}{s}.{p}")
            rows.append((s, int(p), word))
    return pd.DataFrame(rows, columns=[S.SAMPLE, S.POSITION, S.TOKEN])


def make_token_run(root: Path, *, seed: int = 0) -> TokenRun:
    """A token run directory written from a known float32 matrix (see the module docstring)."""
    import xarray as xr

    rng = np.random.default_rng(seed)
    train, query = _tokens(S.TRAIN, N_TRAIN, rng), _tokens(S.QUERY, N_QUERY, rng)
    bif = rng.normal(size=(len(train), len(query))).astype(np.float32)
    bif[0, 0] = 0.0  # a zero value is white
    run = RunStore(str(root))
    frames = [df.assign(**{S.SPLIT: split, S.REF_LOSS: rng.random(len(df))}) for split, df in
              ((S.TRAIN, train), (S.QUERY, query))]
    run.write_table(S.TOKENS_FILE, pd.concat(frames, ignore_index=True)[list(S.TOKENS_COLUMNS)])
    # top-k train tokens of every query token, each sign
    rows = []
    for j, qrow in query.iterrows():
        for sign, order in (("positive", np.argsort(-bif[:, j], kind="stable")),
                            ("negative", np.argsort(bif[:, j], kind="stable"))):
            for rank, i in enumerate(order[:TOPK]):
                rows.append({S.QUERY_SAMPLE: qrow[S.SAMPLE], S.QUERY_POSITION: qrow[S.POSITION], S.SIGN: sign,
                             S.RANK: rank, S.TRAIN_SAMPLE: train[S.SAMPLE][i],
                             S.TRAIN_POSITION: train[S.POSITION][i], S.BIF: float(bif[i, j]),
                             S.BIF_CORR: float(np.tanh(bif[i, j])), S.QUERY_TOKEN: qrow[S.TOKEN],
                             S.TRAIN_TOKEN: train[S.TOKEN][i], S.TRAIN_CONTEXT: ""})
    run.write_table(S.TOPK_TOKENS_FILE, pd.DataFrame(rows)[list(S.TOPK_TOKENS_COLUMNS)])
    # bif_tokens.zarr, tokens shuffled along both token dims
    ti, qj = rng.permutation(len(train)), rng.permutation(len(query))
    tseg = np.eye(N_TRAIN, dtype=np.float32)[train[S.SAMPLE]]  # (train tokens, train) one-hot
    qseg = np.eye(N_QUERY, dtype=np.float32)[query[S.SAMPLE]]
    ds = xr.Dataset(
        {S.BIF: ((S.TRAIN_TOKEN_DIM, S.QUERY_TOKEN_DIM), bif[np.ix_(ti, qj)]),
         S.BIF_CORR: ((S.TRAIN_TOKEN_DIM, S.QUERY_TOKEN_DIM), np.tanh(bif[np.ix_(ti, qj)])),
         S.BIF_SEQ_TOK: ((S.TRAIN_DIM, S.QUERY_TOKEN_DIM), (tseg.T @ bif)[:, qj]),
         S.BIF_TOK_SEQ: ((S.TRAIN_TOKEN_DIM, S.QUERY_DIM), (bif @ qseg)[ti])},
        coords={S.TRAIN_SAMPLE: (S.TRAIN_TOKEN_DIM, train[S.SAMPLE].to_numpy()[ti]),
                S.TRAIN_POSITION: (S.TRAIN_TOKEN_DIM, train[S.POSITION].to_numpy()[ti]),
                S.QUERY_SAMPLE: (S.QUERY_TOKEN_DIM, query[S.SAMPLE].to_numpy()[qj]),
                S.QUERY_POSITION: (S.QUERY_TOKEN_DIM, query[S.POSITION].to_numpy()[qj]),
                S.TRAIN_DIM: np.arange(N_TRAIN), S.QUERY_DIM: np.arange(N_QUERY)})
    ds.to_zarr(run.url(S.BIF_TOKENS_ZARR), mode="w", consolidated=False, zarr_format=3)
    seq = tseg.T.astype(float) @ bif.astype(float) @ qseg.astype(float)
    xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), seq.astype(np.float32)),
                S.BIF_CORR: ((S.TRAIN_DIM, S.QUERY_DIM), np.tanh(seq).astype(np.float32))},
               coords={S.TRAIN_DIM: np.arange(N_TRAIN), S.QUERY_DIM: np.arange(N_QUERY)}).to_zarr(
        run.url(S.BIF_ZARR), mode="w", consolidated=False, zarr_format=3)
    return TokenRun(str(root), bif, train, query)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return make_token_run(tmp_path_factory.mktemp("tokview") / "run")


@pytest.fixture(scope="module")
def sparse(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("tokview-sparse") / "run"
    shutil.copytree(tok.uri, root)
    shutil.rmtree(root / S.BIF_TOKENS_ZARR)
    return TokenRun(str(root), tok.bif, tok.train_tokens, tok.query_tokens)


ALL = TokenViewLimits(max_queries=100, top_train=100, max_tokens=100, max_pair_values=10**6)


def embedded(text: str) -> dict:
    """The JSON the report embeds for the view (parsed back from the HTML)."""
    m = re.search(rf'<script type="application/json" id="{RT.DATA_ID}">(.*?)</script>', text, re.S)
    assert m is not None
    return json.loads(m.group(1))


def close(a, b) -> bool:
    a = np.array([np.nan if v is None else v for v in a], dtype=float)
    return np.allclose(a, np.asarray(b, dtype=float), rtol=1e-6, atol=1e-7, equal_nan=True)


# --- embedded data --------------------------------------------------------------------------------
def test_dense_view_embeds_the_stored_arrays(tok):
    text = token_view_html(tok.uri, limits=ALL)
    data = embedded(text)
    assert data["mode"] == "dense" and data["tt_dropped"] == 0
    seq = tok.seq()
    # every query, strongest |bif| first; every train sequence of each, largest |bif| first
    assert [s["sample"] for s in data["queries"]] == list(np.argsort(-np.abs(seq).max(0), kind="stable"))
    assert len(data["pairs"]) == N_TRAIN * N_QUERY
    for s, split in [(s, S.QUERY) for s in data["queries"]] + [(s, S.TRAIN) for s in data["trains"]]:
        df = tok.query_tokens if split == S.QUERY else tok.train_tokens
        assert s["pos"] == sorted(df[df[S.SAMPLE] == s["sample"]][S.POSITION].tolist())  # true positions
        assert s["tok"] == tok.text(split, s["sample"]) and s["n_tokens"] == len(s["pos"])
    differ = False
    for qi, q in enumerate(data["queries"]):
        pairs = [p for p in data["pairs"] if p["q"] == qi]
        by_seq = np.argsort(-np.abs(seq[:, q["sample"]]), kind="stable")
        tok_max = [np.abs(tok.block(t, q["sample"]).sum(0)).max() for t in range(N_TRAIN)]
        by_tok = np.argsort(-np.array(tok_max), kind="stable")
        want = list(dict.fromkeys(int(x) for pair in zip(by_seq, by_tok) for x in pair))
        differ = differ or list(by_seq) != list(by_tok)
        assert [data["trains"][p["t"]]["sample"] for p in pairs] == want
    assert differ  # the fixture tells the two rankings apart
    for p in data["pairs"]:
        t, q = data["trains"][p["t"]]["sample"], data["queries"][p["q"]]["sample"]
        block = tok.block(t, q)  # rows / columns in position order, as the fixture wrote them
        assert close(p["tt"], block) and close(p["q_by_t"], block.sum(0)) and close(p["t_by_q"], block.sum(1))
        assert close([p["bif"]], [seq[t, q]])


def check_against_store(data: dict, uri: str) -> int:
    """Every embedded value equals bif_tokens.zarr at the token's stored (sample, position), every text
    tokens.parquet's; returns the number of values checked. Reads the files directly."""
    import xarray as xr

    ds = xr.open_zarr(Path(uri) / S.BIF_TOKENS_ZARR, consolidated=False).load()
    toks = pd.read_parquet(Path(uri) / S.TOKENS_FILE).set_index([S.SPLIT, S.SAMPLE, S.POSITION])[S.TOKEN]
    for split, seqs in ((S.QUERY, data["queries"]), (S.TRAIN, data["trains"])):
        for s in seqs:
            assert s["tok"] == [toks[(split, s["sample"], p)] for p in s["pos"]]
    n = 0
    for p in data["pairs"]:
        T_, Q_ = data["trains"][p["t"]], data["queries"][p["q"]]
        qcols = [int(np.flatnonzero((ds[S.QUERY_SAMPLE].values == Q_["sample"]) &
                                    (ds[S.QUERY_POSITION].values == pos))[0]) for pos in Q_["pos"]]
        trows = [int(np.flatnonzero((ds[S.TRAIN_SAMPLE].values == T_["sample"]) &
                                    (ds[S.TRAIN_POSITION].values == pos))[0]) for pos in T_["pos"]]
        assert close(p["q_by_t"], ds[S.BIF_SEQ_TOK].sel({S.TRAIN_DIM: T_["sample"]}).values[qcols])
        assert close(p["t_by_q"], ds[S.BIF_TOK_SEQ].sel({S.QUERY_DIM: Q_["sample"]}).values[trows])
        if p["tt"] is not None:
            assert close(np.ravel(p["tt"]), ds[S.BIF].values[np.ix_(trows, qcols)].ravel())
            n += len(trows) * len(qcols)
        n += len(trows) + len(qcols)
    return n


def test_dense_view_reads_the_mixed_arrays_as_stored(tok):
    """q_by_t / t_by_q come from bif_seq_tok / bif_tok_seq themselves, located by the stored coordinates."""
    assert check_against_store(token_view_data(tok.uri, limits=ALL), tok.uri) > 0


def test_sparse_view_embeds_only_listed_entries(sparse):
    text = token_view_html(sparse.uri, limits=ALL)
    data = embedded(text)
    assert data["mode"] == "sparse" and "Sparse view" in text and "unknown, not 0" in text
    topk = pd.read_parquet(Path(sparse.uri) / S.TOPK_TOKENS_FILE).drop_duplicates(
        [S.QUERY_SAMPLE, S.QUERY_POSITION, S.TRAIN_SAMPLE, S.TRAIN_POSITION])
    n_listed = 0
    for p in data["pairs"]:
        T_, Q_ = data["trains"][p["t"]], data["queries"][p["q"]]
        listed = topk[(topk[S.QUERY_SAMPLE] == Q_["sample"]) & (topk[S.TRAIN_SAMPLE] == T_["sample"])]
        assert len(listed) > 0  # only train sequences with a listed token are paired
        want = np.full((len(T_["pos"]), len(Q_["pos"])), np.nan)
        for r in listed.itertuples(index=False):
            want[T_["pos"].index(getattr(r, S.TRAIN_POSITION)), Q_["pos"].index(getattr(r, S.QUERY_POSITION))] = \
                getattr(r, S.BIF)
        n_listed += int(np.isfinite(want).sum())
        assert close(np.ravel(p["tt"]), want.ravel())
        with np.errstate(invalid="ignore"):
            q_sum = np.where(np.isfinite(want).any(0), np.nansum(want, 0), np.nan)
            t_sum = np.where(np.isfinite(want).any(1), np.nansum(want, 1), np.nan)
        assert close(p["q_by_t"], q_sum) and close(p["t_by_q"], t_sum)
        assert close([p["bif"]], [sparse.seq()[T_["sample"], Q_["sample"]]])  # sequence level from bif.zarr
    assert n_listed == len(topk)  # every listed entry is shown once (all sequences shown)


def test_caps_are_honoured_and_said(tok):
    lim = TokenViewLimits(max_queries=2, top_train=3, max_tokens=4, max_pair_values=40)
    text = token_view_html(tok.uri, limits=lim)
    data = embedded(text)
    assert len(data["queries"]) == 2 and data["limits"] == {"max_queries": 2, "top_train": 3, "max_tokens": 4,
                                                            "max_pair_values": 40}
    assert all(sum(p["q"] == qi for p in data["pairs"]) == 3 for qi in range(2))
    assert len(data["trains"]) <= 6
    assert all(len(s["pos"]) <= 4 and len(s["tok"]) == len(s["pos"]) for s in data["queries"] + data["trains"])
    embedded_values = [len(p["tt"]) * len(p["tt"][0]) for p in data["pairs"] if p["tt"] is not None]
    assert sum(embedded_values) <= 40 and data["tt_dropped"] == len(data["pairs"]) - len(embedded_values) > 0
    assert f"2 of {N_QUERY} query sequences shown" in text
    long_ = sum(s["n_tokens"] > 4 for s in data["queries"] + data["trains"])
    assert long_ > 0 and f"{long_} sequences are longer than 4 tokens" in text
    assert f"embedded for {len(embedded_values)} of {len(data['pairs'])} pairs" in text
    # the shown tokens are each sequence's first ones, with their stored values
    for p in data["pairs"]:
        T_, Q_ = data["trains"][p["t"]], data["queries"][p["q"]]
        full = tok.block(T_["sample"], Q_["sample"])
        assert close(p["q_by_t"], full.sum(0)[:len(Q_["pos"])]) and close(p["t_by_q"], full.sum(1)[:len(T_["pos"])])
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        TokenViewLimits(max_tokens=0)


def test_report_stays_self_contained_and_escapes_token_text(tok):
    text = Path(write_report(tok.uri)).read_text()
    assert f"<h2>{RT.TITLE}</h2>" in text and 'id="token-view"' in text
    assert not re.search(r"(src|href)=\"(https?:|//)", text) and "<script src" not in text
    assert text.count("</script>") == 2  # the data and the code: the token "</script>&x" is escaped
    data = embedded(text)
    assert "</script>&x" in data["queries"][[s["sample"] for s in data["queries"]].index(0)]["tok"] or \
        "</script>&x" in [t for s in data["trains"] if s["sample"] == 0 for t in s["tok"]]


def test_sequence_level_runs_get_no_token_view(tmp_path):
    import xarray as xr

    uri = tmp_path / "seqrun"
    xr.Dataset({S.BIF: ((S.TRAIN_DIM, S.QUERY_DIM), np.ones((3, 2)))}).to_zarr(uri / S.BIF_ZARR, consolidated=False)
    assert token_view_data(str(uri)) is None
    text = build_report_html(str(uri))
    assert "token-view" not in text and RT.TITLE not in text and "<script" not in text
    assert text.count("<section") == len(SECTIONS)


# --- headless Chromium --------------------------------------------------------------------------
class _Spans(HTMLParser):
    """The token spans of each panel in a DOM dump: (panel id, pos, data-v, style, classes)."""

    def __init__(self):
        super().__init__()
        self.panel, self.depth, self.spans, self.headings, self._h = None, 0, [], {}, False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and (a.get("id") or "").startswith("tv-") and "tv-panel" in (a.get("class") or ""):
            self.panel = a["id"]
        if tag == "h4" and self.panel:
            self._h = True
        if tag == "span" and self.panel and "tok" in (a.get("class") or "").split():
            self.spans.append((self.panel, int(a["data-pos"]), a.get("data-v"), a.get("style") or "",
                               a.get("class"), a.get("title")))

    def handle_data(self, data):
        if self._h:
            self.headings[self.panel] = self.headings.get(self.panel, "") + data

    def handle_endtag(self, tag):
        if tag == "h4":
            self._h = False


def _chromium() -> str | None:
    return shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


def _flags(tmp_path: Path) -> list[str]:
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'prof'}"]


def _dom(chromium: str, tmp_path: Path, url: str) -> _Spans:
    out = subprocess.run([chromium, *_flags(tmp_path), "--virtual-time-budget=3000", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120).stdout
    parsed = _Spans()
    parsed.feed(out)
    return parsed


def _rgb(style: str) -> tuple[int, int, int] | None:
    m = re.search(r"background:\s*rgb\((\d+),\s*(\d+),\s*(\d+)\)", style)
    return tuple(int(x) for x in m.groups()) if m else None


def _expected_rgb(w: float, vmax: float) -> tuple[int, int, int]:
    """The diverging scale: white at 0 to (178, 24, 43) at +vmax, to (33, 102, 172) at -vmax."""
    s = max(-1.0, min(1.0, w / vmax)) if vmax > 0 else 0.0
    end = (178, 24, 43) if s >= 0 else (33, 102, 172)
    return tuple(int(np.floor(255 + abs(s) * (c - 255) + 0.5)) for c in end)


def _check_colours(spans, want: np.ndarray, vmax: float | None = None) -> None:
    """Each span shows its value and the hover text; its colour follows the value's sign (red +, blue -, white 0)."""
    assert len(spans) == len(want)
    vmax = float(np.nanmax(np.abs(want))) if vmax is None else vmax
    for (_, pos, v, style, cls, title), w in zip(spans, want):
        assert f"position {pos} " in title
        if np.isnan(w):
            assert v == "" and "na" in cls.split() and _rgb(style) is None and "not listed" in title
            continue
        assert float(v) == pytest.approx(w, rel=1e-6, abs=1e-7)
        assert float(title.rsplit(" bif ", 1)[1]) == pytest.approx(w, rel=1e-3, abs=1e-7)  # the hover text
        r, g, b = _rgb(style)
        if w > 0:  # white -> (178, 24, 43): red dominates
            assert r > g and r > b
        elif w < 0:  # white -> (33, 102, 172): blue dominates
            assert b > r and b > g
        else:
            assert (r, g, b) == (255, 255, 255)
        assert np.abs(np.subtract((r, g, b), _expected_rgb(float(w), vmax))).max() <= 1


def test_token_view_renders_in_headless_chromium(tok, sparse, tmp_path):
    chromium = _chromium()
    if chromium is None:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    uri = Path(write_report(tok.uri, token_limits=ALL))
    data = embedded(uri.read_text())
    q, t = data["queries"][0]["sample"], data["trains"][data["pairs"][1]["t"]]["sample"]
    block = tok.block(t, q)
    qpos = sorted(tok.query_tokens[tok.query_tokens[S.SAMPLE] == q][S.POSITION])
    tpos = sorted(tok.train_tokens[tok.train_tokens[S.SAMPLE] == t][S.POSITION])

    # whole sequences: query coloured by bif_seq_tok[t, .], train by bif_tok_seq[., q]
    dom = _dom(chromium, tmp_path, f"{uri.as_uri()}#q={q}&t={t}")
    qspans = [s for s in dom.spans if s[0] == "tv-query"]
    tspans = [s for s in dom.spans if s[0] == "tv-train"]
    assert [s[1] for s in qspans] == qpos and [s[1] for s in tspans] == tpos
    _check_colours(qspans, block.sum(0))
    _check_colours(tspans, block.sum(1))
    assert f"whole train sequence {t}" in dom.headings["tv-query"]

    # one train token (by position) and one query token picked through the hash
    i, j = len(tpos) // 2, len(qpos) - 1
    dom = _dom(chromium, tmp_path, f"{uri.as_uri()}#q={q}&t={t}&ttok={tpos[i]}&qtok={qpos[j]}&dir=t")
    qspans = [s for s in dom.spans if s[0] == "tv-query"]
    tspans = [s for s in dom.spans if s[0] == "tv-train"]
    _check_colours(qspans, block[i])
    _check_colours(tspans, block[:, j])
    assert [s[1] for s in tspans if "sel" in s[4].split()] == [tpos[i]]
    assert [s[1] for s in qspans if "sel" in s[4].split()] == [qpos[j]]
    assert f"position {tpos[i]}" in dom.headings["tv-query"]

    # a shared scale: the largest |bif_seq_tok| over all train sequences listed for this query
    # (shown with the weakest partner, so the colours differ from the per-panel scale)
    strength = [np.abs(tok.block(tt, q).sum(0)).max() for tt in range(N_TRAIN)]
    weak = int(np.argmin(strength))
    dom = _dom(chromium, tmp_path, f"{uri.as_uri()}#q={q}&t={weak}&scale=shared")
    assert max(strength) > strength[weak]
    _check_colours([s for s in dom.spans if s[0] == "tv-query"], tok.block(weak, q).sum(0), vmax=max(strength))

    # sparse: unlisted tokens are grey, listed ones coloured by their value's sign
    suri = Path(write_report(sparse.uri, token_limits=ALL))
    sdata = embedded(suri.read_text())
    p = sdata["pairs"][0]
    sq, st = sdata["queries"][p["q"]]["sample"], sdata["trains"][p["t"]]["sample"]
    dom = _dom(chromium, tmp_path, f"{suri.as_uri()}#q={sq}&t={st}")
    want = np.array([np.nan if v is None else v for v in p["q_by_t"]])
    _check_colours([s for s in dom.spans if s[0] == "tv-query"], want)

    # a screenshot to look at: the dense view with a train token picked (the window holds the whole page:
    # headless screenshots of a scrolled page come out blank above the fold)
    shot = tmp_path / "token_view.png"
    subprocess.run([chromium, *_flags(tmp_path), f"--screenshot={shot}", "--window-size=1100,2000",
                    "--virtual-time-budget=3000", f"{uri.as_uri()}#q={q}&t={t}&ttok={tpos[i]}&qtok={qpos[j]}"],
                   capture_output=True, timeout=120, check=True)
    assert shot.stat().st_size > 10_000
    if NOTES.is_dir():
        shutil.copy(shot, NOTES / "token_view.png")


def test_readme_states_the_default_limits():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = " ".join(readme[readme.index("### Token view"):readme.index("## Does it predict retraining?")].split())
    lim = TokenViewLimits()
    for phrase in (f"the {lim.max_queries} query sequences", f"the {lim.top_train} train sequences",
                   f"first {lim.max_tokens} tokens", f"{lim.max_pair_values:,} token x token".replace(",", " ")):
        assert phrase in section, phrase


def test_degenerate_token_runs_say_what_they_lack(tok, tmp_path):
    import xarray as xr

    # no token texts (the problem has no render_tokens): positions stand in, and the view says so
    uri = tmp_path / "notext"
    shutil.copytree(tok.uri, uri)
    tokens = pd.read_parquet(uri / S.TOKENS_FILE).assign(**{S.TOKEN: ""})
    RunStore(str(uri)).write_table(S.TOKENS_FILE, tokens)
    text = token_view_html(str(uri))
    assert not embedded(text)["has_text"] and "tokens are shown as #position" in text
    # a NaN in bif_tokens.zarr (an unfinished run) is counted, never shown as a value
    ds = xr.open_zarr(uri / S.BIF_TOKENS_ZARR, consolidated=False).load()
    ds[S.BIF_SEQ_TOK][:] = np.nan
    ds.to_zarr(uri / S.BIF_TOKENS_ZARR, mode="w", consolidated=False)
    data = token_view_data(str(uri), limits=ALL)
    n_nan = sum(len(p["q_by_t"]) for p in data["pairs"])
    assert all(v is None for p in data["pairs"] for v in p["q_by_t"])
    assert f"{n_nan} shown token values are NaN" in token_view_html(str(uri), limits=ALL)
    # tokens.parquet alone (the run stopped before its token results): the section says what is missing
    shutil.rmtree(uri / S.BIF_TOKENS_ZARR)
    (uri / S.TOPK_TOKENS_FILE).unlink()
    text = build_report_html(str(uri))
    assert f"<h2>{RT.TITLE}</h2>" in text and f"needs {S.BIF_TOKENS_ZARR}" in text and "<script" not in text


# --- a real token run --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.e2e
def test_report_of_a_real_token_run(tmp_path_factory, dask_address):
    """The flow's own report.html of lm-core's synthetic bigram LM (tests/token_problems.py): its token
    view embeds exactly what bif_tokens.zarr and tokens.parquet hold; without the token matrix the
    sparse view shows exactly topk_tokens.parquet's entries."""
    from bif.config import build_config
    from bif.flows.attribution import run_attribution

    out = tmp_path_factory.mktemp("tokreal") / "run"
    cfg = build_config({
        "problem": "token_problems:build", "output": str(out),
        "problem_args": {"n_train": 8, "n_query": 3, "length": 10, "prompt": 1, "min_len": 3},
        "sampler": {"num_chains": 2, "num_draws": 40, "num_burnin_steps": 10, "steps_per_draw": 2,
                    "step_size": 1e-3, "gamma": 100.0, "batch_size": 4, "seed": 3, "draws_per_block": 20},
        "covariance": {"topk": 3, "token_matrix": True}, "compute": {"address": dask_address}})
    manifest = run_attribution(cfg, show_progress=False)
    assert manifest["status"] == S.STATUS_COMPLETE
    text = (out / S.REPORT_FILE).read_text()  # written by the flow
    data = embedded(text)
    assert data["mode"] == "dense" and data["has_text"]
    assert len(data["queries"]) == 3 and len(data["pairs"]) == 3 * 8 and data["tt_dropped"] == 0
    assert check_against_store(data, str(out)) > 3 * 8 * 9
    # the sparse view of the same run: only topk_tokens.parquet's entries, each once
    shutil.rmtree(out / S.BIF_TOKENS_ZARR)
    sdata = embedded(token_view_html(str(out), limits=ALL))
    topk = pd.read_parquet(out / S.TOPK_TOKENS_FILE).drop_duplicates(
        [S.QUERY_SAMPLE, S.QUERY_POSITION, S.TRAIN_SAMPLE, S.TRAIN_POSITION])
    listed = {(r[0], r[1], r[2], r[3]): r[4] for r in topk[[S.QUERY_SAMPLE, S.QUERY_POSITION, S.TRAIN_SAMPLE,
                                                           S.TRAIN_POSITION, S.BIF]].itertuples(index=False)}
    shown = {}
    for p in sdata["pairs"]:
        T_, Q_ = sdata["trains"][p["t"]], sdata["queries"][p["q"]]
        for i, tp in enumerate(T_["pos"]):
            for j, qp in enumerate(Q_["pos"]):
                if p["tt"][i][j] is not None:
                    shown[(Q_["sample"], qp, T_["sample"], tp)] = p["tt"][i][j]
    assert shown.keys() == listed.keys()
    assert close(list(shown.values()), [listed[k] for k in shown])
