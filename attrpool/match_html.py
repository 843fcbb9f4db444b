"""One self-contained HTML page of matches: each image (inlined as base64 PNG) beside its matched
attributes, scores drawn as bars. Viewable offline; nothing is fetched."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

from ..common import atomic_write_text

_STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;background:#fafafa;color:#222}
.card{display:flex;gap:20px;background:#fff;border:1px solid #ddd;border-radius:8px;padding:14px;margin:12px 0}
.card img{width:160px;height:160px;object-fit:contain;image-rendering:pixelated;background:#eee}
.key{font-weight:600;margin-bottom:8px;word-break:break-all}
table{border-collapse:collapse}td{padding:2px 8px;font-size:14px}td.attr{width:220px}td.bar-cell{width:170px}
.bar{background:#4a7bd0;height:12px;border-radius:3px}
.kind{color:#777;font-size:12px}.src{color:#555;font-size:12px}
"""


def _thumbnail(img) -> str:
    img = img.copy()
    img.thumbnail((256, 256))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def write_match_html(path: Path, pool: str, items: list[tuple[str, object, list]], failures: list[tuple[str, str]]) -> None:
    """items: (image key, PIL image, [Match]) in display order."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>uniil attribute matches</title>"
             f"<style>{_STYLE}</style></head><body><h1>Attribute matches</h1>"
             f"<p>pool <code>{html.escape(pool)}</code>, {len(items)} image(s)</p>"]
    for key, img, matches in items:
        top = max((m.score for m in matches), default=1.0) or 1.0
        rows = "".join(
            f"<tr class='match'><td class='attr'>{html.escape(m.attribute)}</td>"
            f"<td class='bar-cell'><div class='bar' style='width:{max(2.0, 160 * max(m.score, 0) / top):.0f}px'></div></td>"
            f"<td class='score'>{m.score:.3f}</td><td class='kind'>{m.kind}</td>"
            f"<td class='src'>{html.escape(', '.join(m.sources[:4]))}</td></tr>" for m in matches)
        parts.append(f"<div class='card'><img alt='{html.escape(key)}' src='{_thumbnail(img)}'>"
                     f"<div><div class='key'>{html.escape(key)}</div><table>{rows}</table></div></div>")
    if failures:
        parts.append("<h2>Skipped</h2><ul>" + "".join(
            f"<li>{html.escape(k)}: {html.escape(r)}</li>" for k, r in failures) + "</ul>")
    # Records how many thumbnails decoded, so a headless browser (and the tests) can tell.
    parts.append("<script>window.addEventListener('load',()=>{document.body.dataset.imagesLoaded="
                 "[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;});</script>")
    parts.append("</body></html>")
    atomic_write_text(path, "".join(parts))
