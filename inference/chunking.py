"""Split documents into chunks small enough to embed, keeping where each came from.

Sizes are in characters (Python string length), not tokens: they are exact, free to
compute and independent of the embedding model. For English prose a BERT WordPiece token
is ~4-5 characters, so the default 800 characters stays under all-MiniLM-L6-v2's
256-token window with room for the heading path that `Chunk.contextual_text` prepends.

Markdown: ATX headings (`#` .. `######`, outside fenced code) open sections; a chunk
never spans two sections and carries its heading path (["Guide", "Mitigation"]). Within a
section, paragraphs (blank-line separated; a fenced code block counts as one paragraph)
are packed greedily up to the target size. A paragraph larger than the target is split at
line ends, then sentence ends, then spaces. Setext headings (underlined with === / ---)
are not recognised. Plain text: the same, without headings.

Overlap: each chunk after the first in a section starts with up to `overlap_size`
characters from the end of the previous one (cut at a space), so a sentence that straddles
a boundary is whole in at least one chunk. Every chunk's text is exactly
`source[start:end]`, so callers can cite or highlight it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

DEFAULT_TARGET = 800
DEFAULT_OVERLAP = 100

_HEADING = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?(?:[ \t]+#+)?[ \t]*$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SENTENCE_END = re.compile(r"[.!?。！？][)\"'»”]?\s+")


@dataclass(frozen=True)
class Chunk:
    text: str
    heading_path: tuple[str, ...]
    start: int   # offsets into the source: text == source[start:end]
    end: int
    index: int   # position in the document's chunk list

    def contextual_text(self, separator: str = " > ") -> str:
        """The text with its heading path in front: what to embed, so a chunk that says
        "Switch the pooler to transaction mode" is still found for its guide's title."""
        if not self.heading_path:
            return self.text
        return f"{separator.join(self.heading_path)}\n\n{self.text}"


def chunk_markdown(text: str, target_chunk_size: int = DEFAULT_TARGET,
                   overlap_size: int = DEFAULT_OVERLAP) -> list[Chunk]:
    return _chunk(text, target_chunk_size, overlap_size, markdown=True)


def chunk_text(text: str, target_chunk_size: int = DEFAULT_TARGET,
               overlap_size: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Plain text: paragraphs packed into chunks, no headings."""
    return _chunk(text, target_chunk_size, overlap_size, markdown=False)


def chunk_document(text: str, *, markdown: bool | None = None, target_chunk_size: int = DEFAULT_TARGET,
                   overlap_size: int = DEFAULT_OVERLAP) -> list[Chunk]:
    """Markdown if told so, or (markdown=None) if the text has at least one ATX heading."""
    if markdown is None:
        markdown = any(_HEADING.match(line) for line in text.splitlines())
    return _chunk(text, target_chunk_size, overlap_size, markdown=markdown)


# --------------------------------------------------------------------------- internals

def _chunk(text: str, target: int, overlap: int, markdown: bool) -> list[Chunk]:
    if target < 20:
        raise ValueError("target_chunk_size must be at least 20 characters")
    if not 0 <= overlap <= target // 2:
        raise ValueError("overlap_size must be between 0 and half of target_chunk_size")
    chunks: list[Chunk] = []
    for path, blocks in _sections(text, markdown):
        spans = [piece for start, end in blocks for piece in _split_large(text, start, end, target - overlap)]
        for start, end in _pack(text, spans, target, overlap):
            chunks.append(Chunk(text[start:end], path, start, end, len(chunks)))
    return chunks


def _sections(text: str, markdown: bool) -> list[tuple[tuple[str, ...], list[tuple[int, int]]]]:
    """[(heading path, [(start, end) of each paragraph])] in document order."""
    sections: list[tuple[tuple[str, ...], list[tuple[int, int]]]] = []
    stack: list[tuple[int, str]] = []          # (level, title) of the open headings
    blocks: list[tuple[int, int]] = []
    block_start: int | None = None
    block_end = 0
    fence: str | None = None                   # the opening fence while inside code

    def close_block() -> None:
        nonlocal block_start
        if block_start is not None:
            blocks.append((block_start, block_end))
            block_start = None

    def close_section() -> None:
        nonlocal blocks
        close_block()
        if blocks:
            sections.append((tuple(title for _, title in stack), blocks))
        blocks = []

    pos = 0
    for line in text.splitlines(keepends=True):
        line_start, pos = pos, pos + len(line)
        content = line.rstrip("\r\n")
        if fence is not None:                  # inside code: only the closing fence matters
            block_end = line_start + len(content)
            stripped = content.strip()
            if stripped.startswith(fence[0] * len(fence)) and not stripped.strip(fence[0]):
                fence = None
            continue
        fence_match = _FENCE.match(content)
        if fence_match:
            fence = fence_match.group(1)
            if block_start is None:
                block_start = line_start
            block_end = line_start + len(content)
            continue
        heading = _HEADING.match(content) if markdown else None
        if heading:
            close_section()
            level, title = len(heading.group(1)), (heading.group(2) or "").strip()
            while stack and stack[-1][0] >= level:
                stack.pop()
            stack.append((level, title))
            continue
        if not content.strip():
            close_block()
            continue
        if block_start is None:
            block_start = line_start + (len(content) - len(content.lstrip()))
        block_end = line_start + len(content.rstrip())
    close_section()
    return sections


def _split_large(text: str, start: int, end: int, limit: int) -> list[tuple[int, int]]:
    """Cut a paragraph longer than `limit` at the last line end, sentence end or space
    before the limit (in that order of preference); a hard cut only for unbroken text."""
    pieces = []
    while end - start > limit:
        window = text[start:start + limit + 1]
        cut = window.rfind("\n")
        if cut < limit // 3:
            ends = [m.end() for m in _SENTENCE_END.finditer(window)]
            cut = ends[-1] if ends and ends[-1] >= limit // 3 else window.rfind(" ")
        if cut < limit // 3:
            cut = limit
        piece_end = start + cut
        pieces.append((start, start + len(text[start:piece_end].rstrip())))
        start = piece_end
        while start < end and text[start].isspace():
            start += 1
    if start < end:
        pieces.append((start, end))
    return pieces


def _pack(text: str, spans: list[tuple[int, int]], target: int, overlap: int) -> list[tuple[int, int]]:
    """Greedy packing of consecutive spans into chunks of at most `target` characters."""
    chunks: list[tuple[int, int]] = []
    current: tuple[int, int] | None = None
    for start, end in spans:
        if current is None:
            current = (start, end)
        elif end - current[0] <= target:
            current = (current[0], end)
        else:
            chunks.append(current)
            current = (_overlap_start(text, current, start, end, target, overlap), end)
    if current is not None:
        chunks.append(current)
    return chunks


def _overlap_start(text: str, previous: tuple[int, int], start: int, end: int, target: int, overlap: int) -> int:
    """Where the next chunk begins: a word boundary within the previous chunk's last
    `overlap` characters, or `start` when there is no room or no overlap."""
    if overlap == 0:
        return start
    earliest = max(previous[0], previous[1] - overlap, end - target)
    if earliest >= previous[1]:
        return start
    space = text.find(" ", earliest, previous[1])
    candidate = earliest if earliest == previous[0] or text[earliest - 1].isspace() else \
        (space + 1 if space != -1 else start)
    while candidate < previous[1] and text[candidate].isspace():
        candidate += 1
    return candidate if candidate < previous[1] else start
