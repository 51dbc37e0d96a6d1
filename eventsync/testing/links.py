"""Links in stored content, the way BookStack's reference code reads and rewrites them.

- `anchor_hrefs`: CrossLinkParser::getLinksFromContent, the href of every `<a href>`.
- `rewrite_hrefs`: ReferenceUpdater::updateLinksInHtml, `str_ireplace(old, new, href)` on
  every `<a href>` (and nowhere else in the html).
- `rewrite_markdown`: ReferenceUpdater::updateLinksInMarkdown, inline `[text](url)` and
  reference `[id]: url` links only.
- `description_html` / `html_to_description`: HasHtmlDescription::descriptionHtml and
  BaseRepo::updateDescription.
"""

from __future__ import annotations

import html as html_lib
import re
from collections.abc import Iterator

# DOMDocument lower-cases tag and attribute names; the first href attribute wins.
_ANCHOR = re.compile(r"<a\b[^>]*>", re.IGNORECASE)
_HREF = re.compile(
    r"""(?<=\s)href\s*=\s*(?:"(?P<dq>[^"]*)"|'(?P<sq>[^']*)'|(?P<bare>[^\s"'=<>`]+))""",
    re.IGNORECASE,
)
_TAG = re.compile(r"<[^>]*>")


def _href_spans(html: str) -> Iterator[tuple[int, int, str]]:
    """(start, end, decoded value) of each anchor's href value, in document order."""
    for anchor in _ANCHOR.finditer(html):
        match = _HREF.search(anchor.group(0))
        if match is None:
            continue
        group = next(g for g in ("dq", "sq", "bare") if match.group(g) is not None)
        start, end = match.span(group)
        yield anchor.start() + start, anchor.start() + end, html_lib.unescape(match.group(group))


def anchor_hrefs(html: str) -> list[str]:
    return [value for _, _, value in _href_spans(html or "")]


def str_ireplace(search: str, replace: str, subject: str) -> str:
    """PHP's str_ireplace: every case-insensitive occurrence, left to right."""
    if not search:
        return subject
    return re.sub(re.escape(search), lambda _: replace, subject, flags=re.IGNORECASE | re.ASCII)


def rewrite_hrefs(html: str, old: str, new: str) -> str:
    if not html:
        return html
    out: list[str] = []
    last = 0
    for start, end, value in _href_spans(html):
        updated = str_ireplace(old, new, value)
        if updated == value:
            continue
        quoted = '"' + updated.replace("&", "&amp;").replace('"', "&quot;") + '"'
        # Replace the value together with its quotes (bare values have none).
        if html[start - 1 : start] in ('"', "'"):
            start, end = start - 1, end + 1
        out += [html[last:start], quoted]
        last = end
    out.append(html[last:])
    return "".join(out)


def rewrite_markdown(markdown: str, old: str, new: str) -> str:
    if not markdown:
        return markdown
    quoted = re.escape(old)
    flags = re.IGNORECASE | re.ASCII  # PCRE /i without /u
    markdown = re.sub(
        r"(\[.*?\]\()" + quoted + r"(.*?\))", lambda m: m[1] + new + m[2], markdown, flags=flags
    )
    return re.sub(
        r"(\[.*?\]:\s?)" + quoted + r"(.*?)($|\s)",
        lambda m: m[1] + new + m[2] + m[3],
        markdown,
        flags=flags,
    )


def laravel_e(text: str) -> str:
    """Laravel's e(): htmlspecialchars with ENT_QUOTES."""
    return (
        text.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&quot;")
        .replace("'", "&#039;")
    )


def description_html(description: str, stored: str = "") -> str:
    """HasHtmlDescription::descriptionHtml: the stored html, else the text as a paragraph."""
    if stored:
        return stored
    text = re.sub(r"(\r\n|\n|\r)", r"<br />\1", laravel_e(description))  # nl2br
    return f"<p>{text}</p>"


def html_to_description(html: str) -> str:
    """BaseRepo::updateDescription: html_entity_decode(strip_tags($html))."""
    return html_lib.unescape(_TAG.sub("", html))
