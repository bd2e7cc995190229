"""The building blocks of dori's self-contained HTML pages: style, the load-status script, images as data URIs
(the audit report, the control and detection sections all use them; none of them imports another page)."""

from __future__ import annotations

import base64
import html
import io

import numpy as np
import torch
from PIL import Image

THUMB = 128

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;color:#222;max-width:1400px}
table.results{border-collapse:collapse;margin:1em 0}
table.results td,table.results th{border:1px solid #bbb;padding:.25em .6em;text-align:right}
table.results td:first-child,table.results th:first-child{text-align:left}
section.item{border-top:1px solid #ccc;margin-top:1.5em;padding-top:.5em}
.gens{display:flex;flex-wrap:wrap;gap:4px}
figure{margin:0;text-align:center;font-size:.8em;display:inline-block}
.gens img{width:96px;height:auto;image-rendering:pixelated}
figure.train img{width:192px;height:auto;image-rendering:pixelated}
figure.hit figcaption{color:#b00;font-weight:bold}
.plots img{margin-right:1em}
pre{background:#f5f5f5;padding:.5em;overflow:auto}
"""

_STATUS_SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener('error', function (e) { errors.push(String(e.message)); });
  window.addEventListener('load', function () {
    var imgs = document.images, broken = 0;
    for (var i = 0; i < imgs.length; i++) {
      if (!imgs[i].complete || imgs[i].naturalWidth === 0) { broken++; }
    }
    var ok = broken === 0 && errors.length === 0;
    var el = document.documentElement;  // the status is for test tools: attributes, never page text
    el.setAttribute('data-images', String(imgs.length));
    el.setAttribute('data-broken', String(broken));
    el.setAttribute('data-errors', String(errors.length));
    el.setAttribute('data-status', ok ? 'ok' : 'error');
  });
})();
"""


def png_data_uri(image: torch.Tensor | np.ndarray | Image.Image, max_size: int | None = THUMB) -> str:
    """A uint8 (3, H, W) tensor, an (H, W, 3) array or a PIL image as a ``data:image/png`` URI."""
    if torch.is_tensor(image):
        image = image.permute(1, 2, 0).cpu().numpy()
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image.astype(np.uint8)))
    if max_size is not None and max(image.size) > max_size:
        image = image.copy()
        image.thumbnail((max_size, max_size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _figure_uri(draw, size=(4.0, 2.6)) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size, dpi=90)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    draw(ax)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(uri: str, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">'
