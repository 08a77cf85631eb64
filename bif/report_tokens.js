// report.html's token view (bif/report_tokens.py embeds this file and its data; no network).
// Data: JSON in <script id="bif-token-data">: queries, trains (shown sequences), pairs (one per
// query sequence and listed train sequence: q_by_t, t_by_q, tt). State comes from / goes to the
// URL hash: #q=<query sample>&t=<train sample>&ttok=<train position>&qtok=<query position>&dir=q|t.
(function () {
  "use strict";
  const D = JSON.parse(document.getElementById("bif-token-data").textContent);
  const $ = (id) => document.getElementById(id);
  const POS = [178, 24, 43], NEG = [33, 102, 172];  // RdBu ends: red = positive, blue = negative
  // tsel / qsel: index into the shown tokens; shared: one colour scale for all partners of the first sequence
  const st = { dir: "q", pair: 0, tsel: null, qsel: null, shared: false };
  D.queries.forEach((s) => (s.pairs = []));
  D.trains.forEach((s) => (s.pairs = []));
  D.pairs.forEach((p, i) => { D.queries[p.q].pairs.push(i); D.trains[p.t].pairs.push(i); });
  const absb = (i) => Math.abs(D.pairs[i].bif === null ? 0 : D.pairs[i].bif);
  D.trains.forEach((s) => s.pairs.sort((a, b) => absb(b) - absb(a)));

  function colour(v, vmax) {
    const s = vmax > 0 ? Math.max(-1, Math.min(1, v / vmax)) : 0;
    const c = s >= 0 ? POS : NEG, a = Math.abs(s);
    return c.map((x) => Math.round(255 + a * (x - 255)));
  }
  // a missing token value: not in the top-k lists (sparse), or NaN in bif_tokens.zarr (dense: not computed)
  const fmt = (v) => (v === null ? (D.mode === "sparse" ? "not listed" : "NaN") : Number(v).toPrecision(4));
  const fmtSeq = (v) => (v === null ? "n/a" : Number(v).toPrecision(4));  // sequence level (bif.zarr)
  const text = (seq, i) => {
    const t = seq.tok[i];
    return t ? t.replace(/\n/g, "\u21b5\n") : "#" + seq.pos[i];
  };
  const quote = (seq, i) => (seq.tok[i] ? JSON.stringify(seq.tok[i]) : "#" + seq.pos[i]);
  // a select option's preview of a sequence: its first characters
  const preview = (seq) => {
    const t = seq.tok.join(D.spaced ? "" : " ").replace(/\s+/g, " ").trim();
    return t ? ": " + (t.length > 40 ? t.slice(0, 40) + "\u2026" : t) : "";
  };

  const maxabs = (vs) => vs.reduce((m, v) => (v !== null && isFinite(v) ? Math.max(m, Math.abs(v)) : m), 0);

  function panel(kind, seq, values, sel, heading, note, onpick, scale) {
    const div = document.createElement("div");
    div.className = "tv-panel";
    div.id = "tv-" + kind;
    const h = document.createElement("h4");
    h.textContent = heading;
    div.appendChild(h);
    const vmax = scale === null ? maxabs(values) : scale;
    const box = document.createElement("div");
    box.className = "tv-tokens" + (D.spaced ? "" : " gaps");
    seq.pos.forEach((pos, i) => {
      const v = values[i], span = document.createElement("span");
      span.className = "tok" + (v === null ? " na" : "") + (i === sel ? " sel" : "");
      span.textContent = text(seq, i);
      span.dataset.pos = pos;
      span.dataset.v = v === null ? "" : String(v);
      if (v !== null) {
        const c = colour(v, vmax);
        span.style.background = "rgb(" + c.join(",") + ")";
        if (Math.abs(v) > 0.6 * vmax) span.style.color = "#fff";
      }
      const tip = kind + " " + seq.sample + " \u00b7 position " + pos + " \u00b7 token " + quote(seq, i) +
        " \u00b7 bif " + fmt(v);
      span.title = tip;
      span.addEventListener("mouseover", () => ($("tv-info").textContent = tip));
      span.addEventListener("click", () => onpick(i));
      box.appendChild(span);
    });
    div.appendChild(box);
    const more = seq.n_tokens - seq.pos.length;
    if (more > 0 || note) {
      const p = document.createElement("p");
      p.className = "tv-note";
      p.textContent = [note, more > 0 ? more + " later tokens not shown" : ""].filter(Boolean).join("; ");
      div.appendChild(p);
    }
    const leg = document.createElement("div");
    leg.className = "tv-legend";
    const m = vmax > 0 ? vmax.toPrecision(3) : "0";
    leg.innerHTML = '<span class="tv-lo"></span><span class="tv-bar"></span><span class="tv-hi"></span>' +
      "<span>centre 0 \u00b7 red: raises the query's loss \u00b7 blue: lowers it \u00b7 " +
      (scale === null ? "scale: this panel" : "scale: shared by the listed partners") + "</span>";
    leg.querySelector(".tv-lo").textContent = "\u2212" + m;
    leg.querySelector(".tv-hi").textContent = "+" + m;
    div.dataset.vmax = String(vmax);
    div.appendChild(leg);
    return div;
  }

  function fillSelects() {
    const first = $("tv-first"), second = $("tv-second"), p = D.pairs[st.pair];
    const firsts = st.dir === "q" ? D.queries : D.trains, fi = st.dir === "q" ? p.q : p.t;
    $("tv-first-label").textContent = st.dir === "q" ? "Query sequence" : "Train sequence";
    $("tv-second-label").textContent = st.dir === "q" ? "Train sequence" : "Query sequence";
    first.innerHTML = "";
    firsts.forEach((s, i) => first.add(new Option((st.dir === "q" ? "query " : "train ") + s.sample + preview(s), i,
      false, i === fi)));
    second.innerHTML = "";
    firsts[fi].pairs.forEach((pi) => {
      const o = D.pairs[pi], seq = st.dir === "q" ? D.trains[o.t] : D.queries[o.q];
      const other = (st.dir === "q" ? "train " : "query ") + seq.sample;
      second.add(new Option(other + " (bif " + fmtSeq(o.bif) + ")" + preview(seq), pi, false, pi === st.pair));
    });
    $("tv-dir").value = st.dir;
    $("tv-scale").value = st.shared ? "shared" : "panel";
  }

  function writeHash() {
    const p = D.pairs[st.pair], Q = D.queries[p.q], T = D.trains[p.t];
    let h = "q=" + Q.sample + "&t=" + T.sample + "&dir=" + st.dir;
    if (st.tsel !== null) h += "&ttok=" + T.pos[st.tsel];
    if (st.qsel !== null) h += "&qtok=" + Q.pos[st.qsel];
    if (st.shared) h += "&scale=shared";
    try { history.replaceState(null, "", "#" + h); } catch (e) { /* file:// in some browsers */ }
  }

  function render() {
    const p = D.pairs[st.pair], Q = D.queries[p.q], T = D.trains[p.t];
    const sparse = D.mode === "sparse" ? " (sparse: listed top-k entries only)" : "";
    let qv, qh, qnote = "", tv, th, tnote = "";
    if (st.tsel !== null) {
      qv = p.tt ? p.tt[st.tsel] : Q.pos.map(() => null);
      qh = "query " + Q.sample + ": each token coloured by the influence of train token " + quote(T, st.tsel) +
        " (train " + T.sample + ", position " + T.pos[st.tsel] + "), bif[train token, query token]" + sparse;
      if (!p.tt) qnote = "token x token values of this pair are not embedded (cap max_pair_values)";
    } else {
      qv = p.q_by_t;
      qh = "query " + Q.sample + ": each token coloured by the influence of the whole train sequence " + T.sample +
        (D.mode === "dense" ? ", bif_seq_tok[train, query token]" : sparse);
    }
    if (st.qsel !== null) {
      tv = p.tt ? p.tt.map((row) => row[st.qsel]) : T.pos.map(() => null);
      th = "train " + T.sample + ": each token coloured by its influence on query token " + quote(Q, st.qsel) +
        " (query " + Q.sample + ", position " + Q.pos[st.qsel] + "), bif[train token, query token]" + sparse;
      if (!p.tt) tnote = "token x token values of this pair are not embedded (cap max_pair_values)";
    } else {
      tv = p.t_by_q;
      th = "train " + T.sample + ": each token coloured by its influence on the whole query sequence " + Q.sample +
        (D.mode === "dense" ? ", bif_tok_seq[train token, query]" : sparse);
    }
    // shared scale: the largest |value| of the same quantity over every pair of the first-picked sequence
    const group = (st.dir === "q" ? Q : T).pairs.map((i) => D.pairs[i]);
    const qs = !st.shared ? null : maxabs([].concat(...group.map((g) => (st.tsel !== null
      ? (g.tt ? [].concat(...g.tt) : []) : g.q_by_t))));
    const ts = !st.shared ? null : maxabs([].concat(...group.map((g) => (st.qsel !== null
      ? (g.tt ? [].concat(...g.tt) : []) : g.t_by_q))));
    const qp = panel("query", Q, qv, st.qsel, qh, qnote, (i) => { st.qsel = st.qsel === i ? null : i; update(); }, qs);
    const tp = panel("train", T, tv, st.tsel, th, tnote, (i) => { st.tsel = st.tsel === i ? null : i; update(); }, ts);
    const box = $("tv-panels");
    box.innerHTML = "";
    const seqbif = document.createElement("p");
    seqbif.id = "tv-pair";
    seqbif.textContent = "Sequence level: bif[train " + T.sample + ", query " + Q.sample + "] = " + fmtSeq(p.bif) +
      (D.sequence_source && D.sequence_source !== "bif.zarr" ? " (" + D.sequence_source + ")" : "");
    box.appendChild(seqbif);
    if (st.dir === "q") { box.appendChild(qp); box.appendChild(tp); } else { box.appendChild(tp); box.appendChild(qp); }
    document.getElementById("token-view").dataset.pair = st.pair;
  }

  function update() { fillSelects(); render(); writeHash(); }

  function readHash() {
    const h = new URLSearchParams((location.hash || "").replace(/^#/, ""));
    if (h.get("dir") === "t") st.dir = "t";
    st.shared = h.get("scale") === "shared";
    const qs = h.get("q"), ts = h.get("t");
    // both given: that pair; one given: its strongest partner (as the selects pick)
    const qi = D.queries.findIndex((s) => String(s.sample) === qs);
    const ti = D.trains.findIndex((s) => String(s.sample) === ts);
    const both = D.pairs.findIndex((p) => p.q === qi && p.t === ti);
    if (both >= 0) st.pair = both;
    else if (st.dir === "t" && ti >= 0) st.pair = D.trains[ti].pairs[0];
    else if (qi >= 0) st.pair = D.queries[qi].pairs[0];
    else if (ti >= 0) st.pair = D.trains[ti].pairs[0];
    const p = D.pairs[st.pair];
    const at = (seq, v) => { const k = v === null ? -1 : seq.pos.indexOf(Number(v)); return k >= 0 ? k : null; };
    st.tsel = at(D.trains[p.t], h.get("ttok"));
    st.qsel = at(D.queries[p.q], h.get("qtok"));
  }

  $("tv-dir").addEventListener("change", (e) => { st.dir = e.target.value; update(); });
  $("tv-scale").addEventListener("change", (e) => { st.shared = e.target.value === "shared"; update(); });
  $("tv-first").addEventListener("change", (e) => {
    const seq = (st.dir === "q" ? D.queries : D.trains)[Number(e.target.value)];
    st.pair = seq.pairs[0]; st.tsel = null; st.qsel = null; update();
  });
  $("tv-second").addEventListener("change", (e) => {
    st.pair = Number(e.target.value); st.tsel = null; st.qsel = null; update();
  });
  readHash();
  update();
  // a link to a view scrolls to it once the page (and its images) laid out
  if (/(^#|&)(q|t)=/.test(location.hash)) {
    const go = () => $("tv-panels").scrollIntoView({ block: "start" });
    if (document.readyState === "complete") go(); else window.addEventListener("load", go);
  }
})();
