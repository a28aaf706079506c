"""
Attention visualizer: what every layer and head of a checkpoint attends to for one prompt, and what each
layer would predict.

A command-line front end over `nanochat.attention` (the same capture as the app's Attention page): it
loads a checkpoint, encodes the prompt (with <|bos|>), captures every layer's and head's attention
through the explicit path, and prints a per-head summary (KV group, window, entropy, mean distance,
BOS / previous-token / same-token shares) and the logit lens at one position; or the whole capture as
JSON; or a standalone figure: `--out FILE.html` (opens offline: data, script and style are inline) or
`--out FILE.png` (drawn with Pillow, which Streamlit already installs).

    python tools/attention_visualizer.py --checkpoint PATH --prompt "To be, or not to be" --layer 1 --out att.html

JSON (`--json`), stable keys: {"checkpoint", "step", "tokens": [{"id", "text"}], "n_layer", "n_head",
"n_kv_head", "layers": [{"layer", "window", "heads": [{"head", "kv_group", "attention": [[...]] (rows =
query positions, columns = key positions, full size), "scores": {"entropy", "mean_distance", "bos",
"previous", "same_token", "pattern"}}]}], "logit_lens": {"position", "layers": [{"layer", "top": [{"id",
"text", "prob"}]}]}}. --layer / --head keep only that layer / head.

Exit status: 0 ok; 1 the checkpoint or the prompt cannot be used (one line on stderr); 2 bad arguments.
It draws and formats; the attention math lives in nanochat/attention.py.
"""

from __future__ import annotations

import argparse
import html
import json
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (python tools/attention_visualizer.py) as well as with -m
    sys.path.insert(0, str(ROOT))

FIGURE_CELLS = 256  # the HTML's large view keeps at most this many positions per side (block-averaged beyond)
THUMB_CELLS = 64  # thumbnails and the PNG grid: at most this many
VISIBLE = str.maketrans({" ": "·", "\n": "↵", "\t": "⇥", "\r": "␍"})


class UsageError(Exception):
    """An argument the checkpoint makes invalid (a layer or head it does not have)."""


@dataclass(frozen=True)
class LensView:
    """A logit-lens row with its tokens' text (the lens itself knows ids only)."""
    layer: int
    token_ids: tuple[int, ...]
    probs: tuple[float, ...]
    texts: list[str]


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line on stderr, exit 2
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    ap = OneLineParser(prog="attention_visualizer",
                       description="Every layer's and head's attention for a prompt, and the per-layer logit lens.")
    ap.add_argument("--checkpoint", required=True, help="run directory (latest complete step) or one model_NNNNNN.pt / checkpoint.pt")
    ap.add_argument("--step", type=int, help="use this step of the run directory instead of the latest complete one")
    ap.add_argument("--prompt", required=True, help="the prompt text (<|bos|> is prepended); at most the model's context")
    ap.add_argument("--layer", type=int, help="only this layer (0-based) in the output and the figure")
    ap.add_argument("--head", type=int, help="only this query head (0-based) in the output and the figure")
    ap.add_argument("--position", type=int, default=-1,
                    help="token position for the logit lens (0-based; negative counts from the end; default -1 = last)")
    ap.add_argument("--top", type=int, default=5, help="tokens per layer in the logit lens (default 5)")
    ap.add_argument("--json", action="store_true", help="print the capture as JSON (shape in the module docstring)")
    ap.add_argument("--out", type=Path, help="write a figure: FILE.html (standalone, offline) or FILE.png")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
    return ap


def token_texts(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def selected(cap, layer: int | None, head: int | None) -> list[tuple[int, list[int]]]:
    if layer is not None and not 0 <= layer < cap.n_layer:
        raise UsageError(f"--layer {layer}: this model has layers 0..{cap.n_layer - 1}")
    if head is not None and not 0 <= head < cap.n_head:
        raise UsageError(f"--head {head}: this model has heads 0..{cap.n_head - 1}")
    layers = [layer] if layer is not None else list(range(cap.n_layer))
    heads = [head] if head is not None else list(range(cap.n_head))
    return [(ly, heads) for ly in layers]


def capture_json(label: str, step, cap, texts, scores, lens, position: int, picks) -> dict:
    by_key = {(s.layer, s.head): s for s in scores}
    layers = []
    for ly, heads in picks:
        rows = []
        for h in heads:
            s = by_key[(ly, h)]
            rows.append({"head": h, "kv_group": s.kv_group,
                         "attention": [[round(float(x), 6) for x in row] for row in cap.weights[ly][h].tolist()],
                         "scores": {"entropy": s.entropy, "mean_distance": s.mean_distance, "bos": s.bos,
                                    "previous": s.previous, "same_token": s.same_token, "pattern": s.pattern}})
        layers.append({"layer": ly, "window": cap.windows[ly], "heads": rows})
    return {"checkpoint": label, "step": step, "tokens": [{"id": i, "text": t} for i, t in zip(cap.token_ids, texts)],
            "n_layer": cap.n_layer, "n_head": cap.n_head, "n_kv_head": cap.n_kv_head, "layers": layers,
            "logit_lens": {"position": position, "layers": [
                {"layer": r.layer, "top": [{"id": i, "text": t, "prob": p} for i, t, p in zip(r.token_ids, r.texts, r.probs)]}
                for r in lens]}}


def summary_text(label: str, cap, texts, scores, lens, position: int, picks) -> str:
    keep = {(ly, h) for ly, heads in picks for h in heads}
    lines = [f"{label}: {len(cap.token_ids)} tokens, {cap.n_layer} layers x {cap.n_head} heads "
             f"({cap.n_kv_head} KV groups), windows {cap.windows}", "",
             f"{'layer':>5} {'head':>4} {'kv':>3} {'window':>6} {'entropy':>8} {'distance':>8} {'bos':>5} {'prev':>5} "
             f"{'same':>5}  pattern"]
    for s in scores:
        if (s.layer, s.head) in keep:
            lines.append(f"{s.layer:>5} {s.head:>4} {s.kv_group:>3} {s.window:>6} {s.entropy:>8.3f} {s.mean_distance:>8.2f} "
                         f"{s.bos:>5.2f} {s.previous:>5.2f} {s.same_token:>5.2f}  {s.pattern}")
    lines += ["", f"logit lens at position {position} ({texts[position].translate(VISIBLE)!r}): what each layer would predict next"]
    for r in lens:
        tops = "  ".join(f"{t.translate(VISIBLE)!r} {p:.3f}" for t, p in zip(r.texts, r.probs))
        lines.append(f"  layer {r.layer:>2}: {tops}")
    return "\n".join(lines)


# ---------------------------------------------------------------------- figures


def figure_data(cap, texts, scores, picks, cells: int) -> dict:
    """What the HTML figure embeds: each picked head's matrix, downsampled to at most `cells` a side."""
    from nanochat.attention import downsample

    by_key = {(s.layer, s.head): s for s in scores}
    heads = []
    factor = 1
    for ly, hs in picks:
        small, factor = downsample(cap.weights[ly][hs], cells)
        for j, h in enumerate(hs):
            s = by_key[(ly, h)]
            heads.append({"layer": ly, "head": h, "kv_group": s.kv_group, "window": cap.windows[ly],
                          "pattern": s.pattern, "entropy": round(s.entropy, 3),
                          "m": [[round(float(x), 4) for x in row] for row in small[j].tolist()]})
    return {"tokens": texts, "factor": factor, "n": len(texts), "heads": heads}


HTML = """<!doctype html>
<html><head><meta charset="utf-8"><title>Attention: __TITLE__</title>
<style>
body{font:14px system-ui,sans-serif;margin:20px;color:#222}
.grid{display:grid;gap:10px;grid-template-columns:repeat(__COLS__,max-content)}
.thumb{cursor:pointer;text-align:center;font-size:12px}.thumb canvas{border:1px solid #ccc}
.thumb.sel canvas{border:2px solid #d62728}
#big{margin-top:16px}.note{color:#666;font-size:12px}
</style></head><body>
<h2>Attention: __TITLE__</h2>
<p class="note">__NOTE__</p>
<div class="grid" id="grid"></div>
<div id="big"><h3 id="bigtitle"></h3><canvas id="bigc"></canvas><p class="note" id="hover">&nbsp;</p></div>
<script>
const D = __DATA__;
function color(v){const t=Math.sqrt(Math.max(0,Math.min(1,v)));
  return `rgb(${Math.round(255-t*247)},${Math.round(255-t*207)},${Math.round(255-t*148)})`;}
function draw(c,h,px,labels){const n=h.m.length,off=labels?70:0;c.width=n*px+off;c.height=n*px+off;const x=c.getContext('2d');
x.fillStyle='#fff';x.fillRect(0,0,c.width,c.height);
for(let i=0;i<n;i++)for(let j=0;j<=i&&j<n;j++){x.fillStyle=color(h.m[i][j]);x.fillRect(off+j*px,off+i*px,px,px);}
const w=h.window/D.factor;if(w<n){x.strokeStyle='#d62728';x.lineWidth=1;x.beginPath();
  x.moveTo(off,off+(w+1)*px);x.lineTo(off+(n-w-1)*px,off+n*px);x.stroke();}
if(labels){x.fillStyle='#333';x.font='10px monospace';for(let i=0;i<n;i++){const t=D.tokens[i];
x.save();x.translate(off+i*px+px*0.7,off-4);x.rotate(-Math.PI/2);x.fillText(t,0,0);x.restore();x.fillText(t,0,off+i*px+px*0.8);}}}
function vis(s){return s.replace(/ /g,'\\u00b7').replace(/\\n/g,'\\u21b5');}
D.tokens=D.tokens.map(vis);
const grid=document.getElementById('grid');const thumbs=[];
D.heads.forEach((h,k)=>{const d=document.createElement('div');d.className='thumb';const c=document.createElement('canvas');
const n=h.m.length;draw(c,h,Math.max(1,Math.floor(96/n)),false);
d.appendChild(c);d.appendChild(document.createElement('br'));
d.appendChild(document.createTextNode(`L${h.layer} H${h.head} (KV ${h.kv_group}) · ${h.pattern}`));
d.onclick=()=>show(k);grid.appendChild(d);thumbs.push(d);});
function show(k){const h=D.heads[k];thumbs.forEach((t,i)=>t.className='thumb'+(i===k?' sel':''));
const labels=D.factor===1&&h.m.length<=96;const px=Math.max(2,Math.floor(640/h.m.length));
document.getElementById('bigtitle').textContent=
  `Layer ${h.layer}, head ${h.head} (KV group ${h.kv_group}), window ${h.window}, entropy ${h.entropy} nats`;
const c=document.getElementById('bigc');draw(c,h,px,labels);const off=labels?70:0;
c.onmousemove=e=>{const r=c.getBoundingClientRect();const j=Math.floor((e.clientX-r.left-off)/px),i=Math.floor((e.clientY-r.top-off)/px);
if(i>=0&&j>=0&&i<h.m.length&&j<h.m.length){const q=D.factor===1?`query ${i} ${D.tokens[i]}`:`queries ${i*D.factor}-${(i+1)*D.factor-1}`;
const kk=D.factor===1?`key ${j} ${D.tokens[j]}`:`keys ${j*D.factor}-${(j+1)*D.factor-1}`;
document.getElementById('hover').textContent=`${q} → ${kk}: ${h.m[i][j].toFixed(4)}`;}};}
if(D.heads.length)show(0);
</script></body></html>
"""


def write_html(path: Path, title: str, cap, texts, scores, picks) -> None:
    data = figure_data(cap, texts, scores, picks, FIGURE_CELLS)
    n = len(texts)
    note = (f"{n} tokens. Rows are query positions, columns the keys they attend to (darker = more weight); the red "
            "line is the layer's sliding window: nothing left of it is visible. Click a thumbnail to enlarge it.")
    if data["factor"] > 1:
        note += (f" Downsampled: each cell covers {data['factor']} x {data['factor']} positions (the mean over its "
                 "queries of their total attention to its keys, so rows still sum to 1).")
    cols = min(len(picks[0][1]) if picks else 1, 8)
    page = (HTML.replace("__TITLE__", html.escape(title)).replace("__NOTE__", html.escape(note))
            .replace("__COLS__", str(cols)).replace("__DATA__", json.dumps(data).replace("</", "<\\/")))
    path.write_text(page, encoding="utf-8")


def write_png(path: Path, title: str, cap, scores, picks) -> None:
    """A grid of heatmaps (rows = layers, columns = heads) with each layer's window in red."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        raise UsageError("PNG output needs Pillow (pip install pillow); --out FILE.html needs nothing") from None
    from nanochat.attention import downsample

    n = min(len(cap.token_ids), THUMB_CELLS)
    px, pad, label_h = max(3, 192 // n), 12, 16
    side = max(n * px, 170)  # room for the label under a short prompt's small map
    cols = max(len(hs) for _, hs in picks)
    img = Image.new("RGB", (max(pad + cols * (side + pad), 8 * len(title) + 2 * pad),
                            24 + len(picks) * (side + label_h + pad)), "white")
    draw = ImageDraw.Draw(img)
    draw.text((pad, 6), title, fill=(30, 30, 30))
    by_key = {(s.layer, s.head): s for s in scores}
    for r, (ly, hs) in enumerate(picks):
        small, factor = downsample(cap.weights[ly][hs], THUMB_CELLS)
        y0 = 24 + r * (side + label_h + pad)
        for c, h in enumerate(hs):
            x0 = pad + c * (side + pad)
            s = by_key[(ly, h)]
            draw.text((x0, y0), f"L{ly} H{h} KV{s.kv_group} {s.pattern}", fill=(60, 60, 60))
            m = small[c].clamp(0, 1).sqrt()
            for i in range(m.size(0)):
                for j in range(i + 1):
                    t = float(m[i, j])
                    rgb = (round(255 - t * 247), round(255 - t * 207), round(255 - t * 148))
                    draw.rectangle([x0 + j * px, y0 + label_h + i * px, x0 + j * px + px - 1, y0 + label_h + i * px + px - 1],
                                   fill=rgb)
            w = cap.windows[ly] / factor
            if w < m.size(0):
                draw.line([(x0, y0 + label_h + (w + 1) * px), (x0 + (m.size(0) - w - 1) * px, y0 + label_h + m.size(0) * px)],
                          fill=(214, 39, 40))
    img.save(path)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.out is not None and args.out.suffix.lower() not in (".html", ".png"):
        print("attention_visualizer: error: --out must end in .html or .png (see --help)", file=sys.stderr)
        return 2
    if args.top < 1:
        print("attention_visualizer: error: --top must be >= 1 (see --help)", file=sys.stderr)
        return 2
    try:
        from nanochat.attention import AttentionInputError, capture, head_scores, logit_lens
        from nanochat.checkpoint_manager import CheckpointError, load_model
        from nanochat.tokenizer import TokenizerError
        from tools.generation_explorer import device_for
    except ImportError as e:  # a broken install, not bad input
        print(f"error: {e}", file=sys.stderr)
        return 1
    try:
        if not args.prompt:
            raise AttentionInputError("the prompt is empty")
        loaded = load_model(args.checkpoint, step=args.step, device=device_for(args.device))
        tok = loaded.tokenizer
        ids = tok.encode(args.prompt, prepend=tok.get_bos_token_id())
        cap = capture(loaded.model, ids)
        picks = selected(cap, args.layer, args.head)
        position = args.position if args.position >= 0 else len(ids) + args.position
        if not 0 <= position < len(ids):
            raise UsageError(f"--position {args.position}: the prompt has {len(ids)} tokens")
        texts = token_texts(tok, cap.token_ids)
        scores = head_scores(cap)
        lens = [LensView(r.layer, r.token_ids, r.probs, token_texts(tok, list(r.token_ids)))
                for r in logit_lens(loaded.model, cap, position, args.top)]
        label = loaded.checkpoint.label
        if args.out is not None:
            title = f"{label}: {args.prompt[:60]}"
            if args.out.suffix.lower() == ".html":
                write_html(args.out, title, cap, texts, scores, picks)
            else:
                write_png(args.out, title, cap, scores, picks)
        if args.json:
            print(json.dumps(capture_json(label, loaded.checkpoint.step, cap, texts, scores, lens, position, picks)))
        else:
            print(summary_text(label, cap, texts, scores, lens, position, picks))
            if args.out is not None:
                print(f"\nwrote {args.out}")
        return 0
    except BrokenPipeError:  # e.g. piped into `head`: stop quietly
        sys.stderr.close()
        return 0
    except (CheckpointError, TokenizerError, AttentionInputError, UsageError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
