//! Splitting document text into chunks: by characters with overlap, or along Markdown headings.
//!
//! Markdown structure is found by a hand-written line scanner rather than a full CommonMark parser:
//! chunking only needs headings, fences and block boundaries, and a line scanner that looks at the
//! first few bytes of each line is several times faster than building a full event stream.
//!
//! Both splitters are pure and decide chunk boundaries left to right from local context only (the
//! current window, or the current section and its blocks), never from the length of the whole
//! text. That is what keeps re-runs incremental: appending to a document changes only its last
//! chunk(s), and every earlier chunk stays byte-identical.

use std::borrow::Cow;

/// One chunk of a document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The chunk text (trimmed of leading/trailing blank lines).
    pub text: String,
    /// Heading trail above this chunk, outermost first, e.g. ["Install", "From source"]. Empty for `split_chars`.
    pub headings: Vec<String>,
    /// Byte offset of the chunk's first byte in the original text.
    pub start: usize,
}

/// Split into chunks of at most `size` characters (Unicode scalar values, not bytes), consecutive chunks
/// sharing about `overlap` characters. Prefer to break at a paragraph break ("\n\n"), else a newline,
/// else whitespace, searching backwards from the limit but never producing a chunk shorter than size/2
/// because of that preference (then cut hard at `size`). Never splits inside a UTF-8 char.
/// Requires size > 0 and overlap < size (callers validate; you may debug_assert).
///
/// Each chunk's text is exactly `text[start..start + text.len()]`. Only whitespace is dropped: blank
/// lines and trailing whitespace at chunk edges, and leading spaces when a chunk starts mid-line. The
/// next chunk starts `overlap` characters before the end of the previous one, moved to a word start
/// (back to the start of that word, at most `overlap` more characters, else forward to the next
/// one), so the shared part is "about" `overlap` characters. When `overlap` exceeds size/2, a
/// preferred break must also leave more than `overlap` characters, so that the split advances.
pub fn split_chars(text: &str, size: usize, overlap: usize) -> Vec<Piece> {
    debug_assert!(size > 0, "split_chars: size must be positive");
    debug_assert!(
        overlap < size,
        "split_chars: overlap must be smaller than size"
    );
    // Growing a large result vector by reallocation is a visible share of the run time.
    let step = size.saturating_sub(overlap).max(1);
    let mut out = Vec::with_capacity((text.len() / step).min(text.len() / 64) + 1);
    split_chars_into(text, 0, size, overlap, &mut out);
    out
}

/// Heading-aware Markdown split. Sections start at ATX (`#`..`######`) and setext headings; each
/// section's chunk carries the heading trail (ancestors + its own heading text, without `#`s).
/// A section whose text (heading line included) fits in `max_chars` is one chunk. A larger section is
/// split at block boundaries (blank lines between paragraphs, list items, etc.), packing consecutive
/// blocks greedily up to `max_chars`; fenced code blocks (``` or ~~~) are kept whole when they fit in
/// `max_chars`, and only a code block larger than `max_chars` is split, at line boundaries. A single
/// paragraph larger than max_chars falls back to `split_chars` on that paragraph with `overlap`.
/// Text before the first heading is its own section with an empty trail. Sections that contain only a
/// heading line and no body are not emitted on their own: their heading still appears in the trail of
/// their subsections. A `#` inside a fenced code block is NOT a heading. Whitespace-only chunks are never emitted.
///
/// Also recognised, so that their contents are not mistaken for headings: YAML (`---`) or TOML
/// (`+++`) front matter at the very start, HTML comments, block quotes, list items and indented
/// code. A leading byte-order mark is skipped. Heading text is the raw source text (inline markup
/// such as `**` or links is kept as written).
pub fn split_markdown(text: &str, max_chars: usize, overlap: usize) -> Vec<Piece> {
    debug_assert!(max_chars > 0, "split_markdown: max_chars must be positive");
    debug_assert!(
        overlap < max_chars,
        "split_markdown: overlap must be smaller than max_chars"
    );
    // A BOM would otherwise hide a heading on the first line and end up inside the first chunk.
    let base = if text.starts_with('\u{feff}') { 3 } else { 0 };
    let mut out = split_markdown_body(&text[base..], max_chars.max(1), overlap);
    if base > 0 {
        for piece in &mut out {
            piece.start += base;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Character-based splitting
// ---------------------------------------------------------------------------------------------

/// `split_chars` on `seg`, which sits at byte `base` of the original text.
fn split_chars_into(seg: &str, base: usize, size: usize, overlap: usize, out: &mut Vec<Piece>) {
    // Release builds get sane values instead of an endless loop if a caller skipped validation.
    let size = size.max(1);
    let overlap = overlap.min(size - 1);
    // A preferred break must leave more than `overlap` characters behind it, otherwise the next
    // chunk would not start after this one and the loop would not advance.
    let min_len = (size / 2).max(overlap + 1).min(size);
    let bytes = seg.as_bytes();
    let mut start = 0;
    // With overlap, the tail after the last real break can be nothing but the overlap itself.
    let mut emitted_end = 0;
    while start < bytes.len() {
        let min_pos = skip_chars(bytes, start, min_len);
        let limit = skip_chars(bytes, min_pos, size - min_len);
        if limit >= bytes.len() {
            push_piece(seg, base, start, bytes.len(), &mut emitted_end, out);
            break;
        }
        let (end, resume) = find_break(bytes, min_pos, limit).unwrap_or((limit, limit));
        let kept_start = push_piece(seg, base, start, end, &mut emitted_end, out);
        start = if overlap == 0 {
            resume
        } else {
            // The next chunk must start after this one's first kept character, or a chunk that
            // began with trimmed blank lines would be repeated with the same start.
            let floor = kept_start.unwrap_or(start);
            let pos = back_chars(bytes, end, overlap).max(skip_chars(bytes, floor, 1));
            word_start(bytes, pos, floor, back_chars(bytes, pos, overlap), resume)
        };
    }
}

/// Pushes the trimmed `seg[start..end]` unless it is blank or inside the previous piece; returns
/// where its trimmed text starts, if it has any.
fn push_piece(
    seg: &str,
    base: usize,
    start: usize,
    end: usize,
    emitted_end: &mut usize,
    out: &mut Vec<Piece>,
) -> Option<usize> {
    let (s, e) = trim_span(seg, start, end)?;
    if e > *emitted_end {
        *emitted_end = e;
        out.push(Piece {
            text: seg[s..e].to_owned(),
            headings: Vec::new(),
            start: base + s,
        });
    }
    Some(s)
}

/// The last preferred break in `min_pos..=limit`, as (chunk end, where the text resumes after the
/// separator). `limit` must be less than `bytes.len()`. Nothing after `limit` is read: a chunk that
/// looked past its window would change when text is appended, even though it is not the last.
fn find_break(bytes: &[u8], min_pos: usize, limit: usize) -> Option<(usize, usize)> {
    let mut newline = None;
    let mut space = None;
    let mut i = limit + 1;
    while i > min_pos {
        i -= 1;
        match bytes[i] {
            b'\n' => {
                // Whitespace-only lines and CRLF still make a paragraph break.
                let mut j = i + 1;
                while j < limit && matches!(bytes[j], b' ' | b'\t' | b'\r') {
                    j += 1;
                }
                if j <= limit && bytes[j] == b'\n' {
                    return Some((i, j + 1));
                }
                if newline.is_none() {
                    newline = Some((i, i + 1));
                }
            }
            b' ' | b'\t' | b'\r' | 0x0c if space.is_none() => space = Some((i, i + 1)),
            _ => {}
        }
    }
    newline.or(space)
}

/// Moves an overlap start `pos` to a word start so the next chunk does not begin mid-word: back to
/// the start of the word it is in (not before `lowest`, and strictly after `chunk_start` so the
/// split advances), else forward to the next word (not after `limit`), else `pos` itself.
fn word_start(bytes: &[u8], pos: usize, chunk_start: usize, lowest: usize, limit: usize) -> usize {
    if pos == 0 || pos >= bytes.len() || (is_space(bytes[pos - 1]) && !is_space(bytes[pos])) {
        return pos;
    }
    if !is_space(bytes[pos]) {
        let lowest = lowest.max(chunk_start + 1);
        let mut i = pos;
        while i > lowest && !is_space(bytes[i - 1]) {
            i -= 1;
        }
        if is_space(bytes[i - 1]) {
            return i;
        }
    }
    let mut i = pos;
    while i < limit && !is_space(bytes[i]) {
        i += 1;
    }
    if i >= limit {
        return pos;
    }
    while i < limit && is_space(bytes[i]) {
        i += 1;
    }
    i
}

fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0c)
}

fn is_continuation(b: u8) -> bool {
    (b as i8) < -0x40
}

/// Characters that start in `bytes`: the bytes that are not UTF-8 continuation bytes, so a slice
/// may cut a character at either end.
fn count_chars(bytes: &[u8]) -> usize {
    const HIGH: u64 = 0x8080_8080_8080_8080;
    let (words, tail) = bytes.as_chunks::<8>();
    // A continuation byte is 0b10xx_xxxx: bit 7 set, bit 6 (moved up by the shift) clear.
    let continuation: u32 = words
        .iter()
        .map(|w| {
            let x = u64::from_le_bytes(*w);
            (x & !(x << 1) & HIGH).count_ones()
        })
        .sum();
    let tail_continuation = tail.iter().filter(|&&b| is_continuation(b)).count();
    bytes.len() - continuation as usize - tail_continuation
}

fn char_len(s: &str) -> usize {
    count_chars(s.as_bytes())
}

/// Byte position `n` characters after `from` (a char boundary), or `bytes.len()` if fewer remain.
/// Costs O(n) bytes at most 4n, never a scan of the whole remaining text.
fn skip_chars(bytes: &[u8], from: usize, n: usize) -> usize {
    let mut pos = from;
    let mut left = n;
    while left > 0 && pos < bytes.len() {
        // The window holds `left` bytes, so it cannot hold more than `left` characters.
        let end = pos.saturating_add(left).min(bytes.len());
        left -= count_chars(&bytes[pos..end]);
        pos = end;
    }
    while pos < bytes.len() && is_continuation(bytes[pos]) {
        pos += 1;
    }
    pos
}

/// Byte position `n` characters before `to` (a char boundary), or 0 if fewer precede it.
fn back_chars(bytes: &[u8], to: usize, n: usize) -> usize {
    let mut pos = to;
    let mut left = n;
    while left > 0 && pos > 0 {
        let start = pos.saturating_sub(left);
        left -= count_chars(&bytes[start..pos]);
        pos = start;
    }
    while pos < to && is_continuation(bytes[pos]) {
        pos += 1;
    }
    pos
}

/// `text[start..end]` without leading blank lines and trailing whitespace; `None` if nothing is left.
/// Indentation of the first line is kept when the span starts at a line start (it matters in code),
/// and dropped when the span starts mid-line (it is then just the space after a break).
fn trim_span(text: &str, start: usize, end: usize) -> Option<(usize, usize)> {
    let body = text[start..end].trim_end();
    if body.is_empty() {
        return None;
    }
    let first = body.len() - body.trim_start().len();
    let s = match body.as_bytes()[..first].iter().rposition(|&b| b == b'\n') {
        Some(nl) => start + nl + 1,
        None if start == 0 || text.as_bytes()[start - 1] == b'\n' => start,
        None => start + first,
    };
    Some((s, start + body.len()))
}

// ---------------------------------------------------------------------------------------------
// Markdown splitting
// ---------------------------------------------------------------------------------------------

struct Heading<'a> {
    /// Start of the heading's first line (for setext, the first line of its paragraph).
    start: usize,
    /// Start of the line after the heading.
    body_start: usize,
    level: u8,
    text: Cow<'a, str>,
}

/// A span that the packer places whole into a chunk when it fits.
#[derive(Clone, Copy)]
struct Unit {
    start: usize,
    end: usize,
    /// Code or front matter: when too big it is split at line boundaries, not as prose.
    atomic: bool,
}

fn split_markdown_body(text: &str, max: usize, overlap: usize) -> Vec<Piece> {
    let overlap = overlap.min(max - 1);
    let front_matter = front_matter_end(text);
    // Sections in ordinary Markdown are typically a few hundred bytes to a few kilobytes; a
    // reasonable guess saves most of the reallocations of a large result.
    let mut out = Vec::with_capacity(text.len() / 512 + 1);
    let mut units = Vec::new();
    let ctx = Ctx { text, max, overlap };
    // Sections are emitted as the scan goes, in one pass: a section is complete once the next
    // heading (or the end of the text) is found.
    let mut headings = Headings::new(text, front_matter.unwrap_or(0));
    let mut current = headings.next();
    let preamble_end = current.as_ref().map_or(text.len(), |h| h.start);
    ctx.section(0, 0, preamble_end, front_matter, &mut units, &mut out);

    let mut stack: Vec<(u8, Cow<'_, str>)> = Vec::new();
    while let Some(h) = current {
        let next = headings.next();
        let end = next.as_ref().map_or(text.len(), |n| n.start);
        while stack.last().is_some_and(|(level, _)| *level >= h.level) {
            stack.pop();
        }
        let has_body = !text[h.body_start.min(end)..end].trim().is_empty();
        let first = out.len();
        if has_body {
            ctx.section(h.start, h.body_start, end, None, &mut units, &mut out);
        }
        stack.push((h.level, h.text));
        // Built once per section and moved into its last piece: allocation, not scanning, is
        // the main cost of this function on documents with many small sections.
        if let Some((last, rest)) = out[first..].split_last_mut() {
            let mut trail = Vec::with_capacity(stack.len());
            trail.extend(
                stack
                    .iter()
                    .filter(|(_, t)| !t.is_empty())
                    .map(|(_, t)| t.to_string()),
            );
            for piece in rest {
                piece.headings.clone_from(&trail);
            }
            last.headings = trail;
        }
        current = next;
    }
    out
}

struct Ctx<'a> {
    text: &'a str,
    max: usize,
    overlap: usize,
}

impl Ctx<'_> {
    /// Emit the section `start..end` whose heading occupies `start..body_start`, with empty trails.
    fn section(
        &self,
        start: usize,
        body_start: usize,
        end: usize,
        front_matter: Option<usize>,
        units: &mut Vec<Unit>,
        out: &mut Vec<Piece>,
    ) {
        let Some((s, e)) = trim_span(self.text, start, end) else {
            return;
        };
        // Greedy packing of a section that fits yields this same single chunk; skip the block scan.
        if e - s <= self.max || char_len(&self.text[s..e]) <= self.max {
            self.push(s, e, out);
            return;
        }
        units.clear();
        let body_start = body_start.min(end);
        if let Some((hs, he)) = trim_span(self.text, start, body_start) {
            units.push(Unit {
                start: hs,
                end: he,
                atomic: false,
            });
        }
        let mut from = body_start;
        if let Some(fm_end) = front_matter {
            if let Some((fs, fe)) = trim_span(self.text, 0, fm_end) {
                units.push(Unit {
                    start: fs,
                    end: fe,
                    atomic: true,
                });
            }
            from = fm_end;
        }
        collect_blocks(self.text, from, end, units);
        self.pack(units, out);
    }

    fn push(&self, s: usize, e: usize, out: &mut Vec<Piece>) {
        if let Some((s, e)) = trim_span(self.text, s, e) {
            out.push(Piece {
                text: self.text[s..e].to_owned(),
                headings: Vec::new(),
                start: s,
            });
        }
    }

    /// Greedy packing: a unit joins the current chunk while the chunk, gaps included, fits.
    fn pack(&self, units: &[Unit], out: &mut Vec<Piece>) {
        let text = self.text;
        // (start, end, chars) of the chunk being built.
        let mut cur: Option<(usize, usize, usize)> = None;
        for u in units {
            let chars = char_len(&text[u.start..u.end]);
            if let Some((cs, ce, cc)) = cur {
                let total = cc + char_len(&text[ce..u.start]) + chars;
                if total <= self.max {
                    cur = Some((cs, u.end, total));
                    continue;
                }
                self.push(cs, ce, out);
                cur = None;
            }
            if chars <= self.max {
                cur = Some((u.start, u.end, chars));
            } else if u.atomic {
                let lines: Vec<Unit> = line_units(text, u.start, u.end).collect();
                self.pack(&lines, out);
            } else {
                split_chars_into(&text[u.start..u.end], u.start, self.max, self.overlap, out);
            }
        }
        if let Some((cs, ce, _)) = cur {
            self.push(cs, ce, out);
        }
    }
}

/// Non-blank lines of `text[from..to]` as packing units.
fn line_units(text: &str, from: usize, to: usize) -> impl Iterator<Item = Unit> + '_ {
    Lines::new(text, from, to).filter_map(|l| {
        let (_, rest) = indentation(l.content);
        (!is_blank(rest)).then_some(Unit {
            start: l.start,
            end: l.start + l.content.len(),
            atomic: false,
        })
    })
}

/// Blocks of a section body: paragraphs and other runs of lines separated by blank lines, with a
/// new block at each list item, and each fenced code block as one atomic block.
fn collect_blocks(text: &str, from: usize, to: usize, units: &mut Vec<Unit>) {
    let mut cur: Option<(usize, usize)> = None;
    let mut fence: Option<(Fence, usize, usize)> = None;
    let mut in_comment = false;
    for line in Lines::new(text, from, to) {
        let line_end = line.start + line.content.len();
        if let Some((f, fs, _)) = fence {
            if f.closes(line.content) {
                units.push(Unit {
                    start: fs,
                    end: line_end,
                    atomic: true,
                });
                fence = None;
            } else {
                fence = Some((f, fs, line_end));
            }
            continue;
        }
        let (indent, rest) = indentation(line.content);
        if is_blank(rest) {
            flush_block(&mut cur, units);
            continue;
        }
        if in_comment {
            in_comment = !rest.contains("-->");
        } else if indent <= 3 {
            if let Some(f) = Fence::open(rest) {
                flush_block(&mut cur, units);
                fence = Some((f, line.start, line_end));
                continue;
            }
            if let Some(after) = rest.strip_prefix("<!--") {
                in_comment = !after.contains("-->");
            } else if is_list_item(rest, false) {
                flush_block(&mut cur, units);
            }
        }
        cur = Some(match cur {
            Some((s, _)) => (s, line_end),
            None => (line.start, line_end),
        });
    }
    if let Some((_, fs, fe)) = fence {
        // An unclosed fence runs to the end of the section, as in CommonMark.
        units.push(Unit {
            start: fs,
            end: fe,
            atomic: true,
        });
    }
    flush_block(&mut cur, units);
}

fn flush_block(cur: &mut Option<(usize, usize)>, units: &mut Vec<Unit>) {
    if let Some((start, end)) = cur.take() {
        units.push(Unit {
            start,
            end,
            atomic: false,
        });
    }
}

/// End of a YAML or TOML front matter block at the start of the document, if there is one.
fn front_matter_end(text: &str) -> Option<usize> {
    let mut lines = Lines::new(text, 0, text.len());
    let first = lines.next()?;
    let delim = first.content.trim_end();
    if delim != "---" && delim != "+++" {
        return None;
    }
    // A leading `---` is often a thematic break; only treat it as front matter if the next line
    // looks like a `key: value` or `key = value` entry.
    let second = lines.next()?;
    let key_sep = if delim == "---" { ':' } else { '=' };
    if second.content.starts_with('#') || !second.content.contains(key_sep) {
        return None;
    }
    std::iter::once(second).chain(lines).find_map(|l| {
        let t = l.content.trim_end();
        (t == delim || (delim == "---" && t == "...")).then_some(l.next)
    })
}

/// Section headings in order, outside code fences, HTML comments and front matter.
struct Headings<'a> {
    text: &'a str,
    lines: Lines<'a>,
    fence: Option<Fence>,
    in_comment: bool,
    /// Start of the paragraph a setext underline would turn into a heading.
    para: Option<usize>,
    /// Inside a list item, block quote or indented code until the next blank line: an underline
    /// there is not a setext heading.
    container: bool,
}

impl<'a> Headings<'a> {
    fn new(text: &'a str, from: usize) -> Self {
        Headings {
            text,
            lines: Lines::new(text, from, text.len()),
            fence: None,
            in_comment: false,
            para: None,
            container: false,
        }
    }
}

impl<'a> Iterator for Headings<'a> {
    type Item = Heading<'a>;

    fn next(&mut self) -> Option<Heading<'a>> {
        for line in self.lines.by_ref() {
            if let Some(f) = self.fence {
                if f.closes(line.content) {
                    self.fence = None;
                }
                continue;
            }
            if self.in_comment {
                self.in_comment = !line.content.contains("-->");
                continue;
            }
            let (indent, rest) = indentation(line.content);
            if is_blank(rest) {
                self.para = None;
                self.container = false;
                continue;
            }
            // Most lines are prose: only a few first bytes can start anything this scanner tracks.
            let special = matches!(
                rest.as_bytes()[0],
                b'`' | b'~' | b'#' | b'=' | b'-' | b'*' | b'_' | b'+' | b'<' | b'>' | b'0'..=b'9'
            );
            if indent <= 3 && special {
                if let Some(f) = Fence::open(rest) {
                    self.fence = Some(f);
                    self.para = None;
                    continue;
                }
                if let Some((level, heading)) = atx_heading(rest) {
                    self.para = None;
                    self.container = false;
                    return Some(Heading {
                        start: line.start,
                        body_start: line.next,
                        level,
                        text: Cow::Borrowed(heading),
                    });
                }
                if let (Some(level), Some(ps)) = (setext_level(rest), self.para) {
                    self.para = None;
                    return Some(Heading {
                        start: ps,
                        body_start: line.next,
                        level,
                        text: setext_text(&self.text[ps..line.start]),
                    });
                }
                if is_thematic_break(rest) {
                    self.para = None;
                    self.container = false;
                    continue;
                }
                if let Some(after) = rest.strip_prefix("<!--") {
                    self.in_comment = !after.contains("-->");
                    self.para = None;
                    continue;
                }
                if rest.starts_with('>') || is_list_item(rest, self.para.is_some()) {
                    self.para = None;
                    self.container = true;
                    continue;
                }
            }
            if self.para.is_none() && !self.container {
                if indent >= 4 {
                    self.container = true;
                } else {
                    self.para = Some(line.start);
                }
            }
        }
        None
    }
}

#[derive(Clone, Copy)]
struct Fence {
    ch: u8,
    len: usize,
}

impl Fence {
    /// `rest` is the line after its indentation.
    fn open(rest: &str) -> Option<Fence> {
        let b = rest.as_bytes();
        let ch = *b.first()?;
        if ch != b'`' && ch != b'~' {
            return None;
        }
        let len = b.iter().take_while(|&&c| c == ch).count();
        if len < 3 || (ch == b'`' && b[len..].contains(&b'`')) {
            return None;
        }
        Some(Fence { ch, len })
    }

    /// Any indentation is accepted for the closing line: an over-indented closer (common inside
    /// list items) would otherwise leave the fence open and swallow every heading after it.
    fn closes(self, line: &str) -> bool {
        let b = line.trim_ascii().as_bytes();
        b.len() >= self.len && b.iter().all(|&c| c == self.ch)
    }
}

/// One line: its content without the line terminator (`\n` or `\r\n`) and where the next starts.
struct Line<'a> {
    start: usize,
    content: &'a str,
    next: usize,
}

struct Lines<'a> {
    text: &'a str,
    pos: usize,
    end: usize,
    /// Newlines not yet returned in the 64-byte block at `block`, one bit per byte.
    mask: u64,
    block: usize,
}

impl<'a> Lines<'a> {
    fn new(text: &'a str, from: usize, to: usize) -> Self {
        let to = to.min(text.len());
        let from = from.min(to);
        Lines {
            text,
            pos: from,
            end: to,
            mask: newline_mask(&text.as_bytes()[from..to.min(from + 64)]),
            block: from,
        }
    }

    /// Next `\n` at or after the current block. Markdown lines are short: one bit mask per 64
    /// bytes costs several times less per line than a `memchr` call for every line.
    #[inline]
    fn next_newline(&mut self) -> Option<usize> {
        let bytes = self.text.as_bytes();
        while self.mask == 0 {
            self.block += 64;
            if self.block >= self.end {
                return None;
            }
            self.mask = newline_mask(&bytes[self.block..self.end.min(self.block + 64)]);
        }
        let at = self.block + self.mask.trailing_zeros() as usize;
        self.mask &= self.mask - 1;
        Some(at)
    }
}

/// Bit i set when `block[i]` is `\n`; `block` holds at most 64 bytes.
#[inline]
fn newline_mask(block: &[u8]) -> u64 {
    match <&[u8; 64]>::try_from(block) {
        Ok(full) => newline_mask_64(full),
        Err(_) => {
            let mut padded = [0u8; 64];
            let n = block.len().min(64);
            padded[..n].copy_from_slice(&block[..n]);
            newline_mask_64(&padded)
        }
    }
}

#[inline]
fn newline_mask_64(block: &[u8; 64]) -> u64 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
    let mut mask = 0;
    for (k, word) in block.as_chunks::<8>().0.iter().enumerate() {
        let x = u64::from_le_bytes(*word) ^ (ONES * u64::from(b'\n'));
        // Exact zero-byte test: unlike the shorter `(x - ONES) & !x` it has no false positives
        // after a match, which matters because every bit of the mask is used.
        let zero_bytes = !(((x & LOW7) + LOW7) | x | LOW7);
        // Gather the eight 0x80 flags into the top byte of the product.
        let bits = ((zero_bytes >> 7).wrapping_mul(0x0102_0408_1020_4080)) >> 56;
        mask |= bits << (8 * k);
    }
    mask
}

impl<'a> Iterator for Lines<'a> {
    type Item = Line<'a>;

    #[inline]
    fn next(&mut self) -> Option<Line<'a>> {
        if self.pos >= self.end {
            return None;
        }
        let start = self.pos;
        let (content_end, next) = match self.next_newline() {
            Some(i) => (i, i + 1),
            None => (self.end, self.end),
        };
        self.pos = next;
        let content = &self.text[start..content_end];
        let content = content.strip_suffix('\r').unwrap_or(content);
        Some(Line {
            start,
            content,
            next,
        })
    }
}

/// Indentation width in columns (a tab counts as 4) and the rest of the line.
fn indentation(line: &str) -> (usize, &str) {
    let mut cols = 0;
    let mut i = 0;
    for &b in line.as_bytes() {
        match b {
            b' ' => cols += 1,
            b'\t' => cols += 4 - cols % 4,
            _ => break,
        }
        i += 1;
    }
    (cols, &line[i..])
}

fn is_blank(rest: &str) -> bool {
    rest.bytes().all(|b| b.is_ascii_whitespace())
}

fn atx_heading(rest: &str) -> Option<(u8, &str)> {
    let level = rest.bytes().take_while(|&b| b == b'#').count();
    if level == 0 || level > 6 {
        return None;
    }
    let after = &rest[level..];
    if !after.is_empty() && !after.starts_with([' ', '\t']) {
        return None;
    }
    let content = after.trim_matches([' ', '\t']);
    // An optional closing run of `#`s counts only when separated by a space: `## C#` keeps its `#`.
    let without_closer = content.trim_end_matches('#');
    let heading = if without_closer.is_empty() {
        without_closer
    } else if without_closer.ends_with([' ', '\t']) {
        without_closer.trim_end_matches([' ', '\t'])
    } else {
        content
    };
    Some((level as u8, heading))
}

fn setext_level(rest: &str) -> Option<u8> {
    let t = rest.trim_end_matches([' ', '\t']).as_bytes();
    let level = match t.first()? {
        b'=' => 1,
        b'-' => 2,
        _ => return None,
    };
    t.iter().all(|&b| b == t[0]).then_some(level)
}

fn setext_text(para: &str) -> Cow<'_, str> {
    let mut lines = para.lines().map(str::trim).filter(|l| !l.is_empty());
    let first = lines.next().unwrap_or_default();
    match lines.next() {
        None => Cow::Borrowed(first),
        Some(second) => {
            let mut joined = format!("{first} {second}");
            for line in lines {
                joined.push(' ');
                joined.push_str(line);
            }
            Cow::Owned(joined)
        }
    }
}

fn is_thematic_break(rest: &str) -> bool {
    let b = rest.as_bytes();
    let Some(&ch) = b.first() else {
        return false;
    };
    if !matches!(ch, b'-' | b'*' | b'_') {
        return false;
    }
    let mut count = 0;
    for &c in b {
        if c == ch {
            count += 1;
        } else if c != b' ' && c != b'\t' {
            return false;
        }
    }
    count >= 3
}

/// Whether `rest` starts a list item. When it would interrupt a paragraph, CommonMark only allows
/// non-empty items, and ordered ones only numbered 1, so "2024. was a good year" stays prose.
fn is_list_item(rest: &str, interrupting: bool) -> bool {
    let b = rest.as_bytes();
    let (marker_len, ordered_one) = match b.first() {
        Some(b'-' | b'*' | b'+') => (1, true),
        Some(b'0'..=b'9') => {
            let digits = b.iter().take_while(|c| c.is_ascii_digit()).count();
            if digits > 9 || !matches!(b.get(digits), Some(b'.' | b')')) {
                return false;
            }
            (digits + 1, &b[..digits] == b"1")
        }
        _ => return false,
    };
    let after = &b[marker_len..];
    if !after.is_empty() && after[0] != b' ' && after[0] != b'\t' {
        return false;
    }
    !interrupting || (ordered_one && !after.iter().all(|c| c.is_ascii_whitespace()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn texts(pieces: &[Piece]) -> Vec<&str> {
        pieces.iter().map(|p| p.text.as_str()).collect()
    }

    fn starts(pieces: &[Piece]) -> Vec<usize> {
        pieces.iter().map(|p| p.start).collect()
    }

    fn trails(pieces: &[Piece]) -> Vec<Vec<&str>> {
        pieces
            .iter()
            .map(|p| p.headings.iter().map(String::as_str).collect())
            .collect()
    }

    /// Invariants shared by both splitters.
    fn check_pieces(input: &str, pieces: &[Piece], max: usize) {
        for p in pieces {
            assert_eq!(
                Some(p.text.as_str()),
                input.get(p.start..p.start + p.text.len()),
                "piece text must be the input slice at its start"
            );
            assert!(!p.text.trim().is_empty(), "whitespace-only piece {p:?}");
            assert!(
                p.text.chars().count() <= max,
                "piece over {max} chars: {p:?}"
            );
            assert_eq!(p.text.trim_end(), p.text, "trailing whitespace in {p:?}");
            assert!(
                !p.text.starts_with('\n') && !p.text.starts_with("\r\n"),
                "leading blank line in {p:?}"
            );
        }
    }

    /// Rebuilds the input from the chunks, dropping each chunk's overlap with the previous one and
    /// taking the gaps between chunks from the input after checking they are whitespace only.
    fn reconstruct(input: &str, pieces: &[Piece]) -> String {
        let mut out = String::new();
        let mut cursor = 0;
        for (i, p) in pieces.iter().enumerate() {
            let end = p.start + p.text.len();
            if i > 0 {
                assert!(
                    p.start > pieces[i - 1].start,
                    "starts must increase: {:?} then {p:?}",
                    pieces[i - 1]
                );
            }
            if p.start > cursor {
                let gap = &input[cursor..p.start];
                assert!(gap.trim().is_empty(), "lost text {gap:?}");
                out.push_str(gap);
                out.push_str(&p.text);
            } else {
                // The overlapping prefix must be exactly the previous chunk's tail.
                let shared = cursor - p.start;
                assert!(out.ends_with(&p.text[..shared]));
                out.push_str(&p.text[shared..]);
            }
            cursor = end;
        }
        let tail = &input[cursor..];
        assert!(tail.trim().is_empty(), "lost tail {tail:?}");
        out.push_str(tail);
        out
    }

    /// Every non-whitespace byte of the input is inside a chunk, except heading lines of sections
    /// that have no body. With `require_trail`, such a heading must also be in some chunk's trail
    /// (true when every empty section has subsections, as in real documents).
    fn assert_nothing_lost(input: &str, pieces: &[Piece], require_trail: bool) {
        let mut covered = vec![false; input.len()];
        for p in pieces {
            covered[p.start..p.start + p.text.len()].fill(true);
        }
        let headings: Vec<_> = Headings::new(input, front_matter_end(input).unwrap_or(0)).collect();
        for (i, b) in input.bytes().enumerate() {
            if b.is_ascii_whitespace() || covered[i] {
                continue;
            }
            let heading = headings
                .iter()
                .find(|h| (h.start..h.body_start).contains(&i));
            let context = String::from_utf8_lossy(&input.as_bytes()[i.saturating_sub(40)..]);
            let Some(h) = heading else {
                panic!("byte {i} is in no chunk and not a heading: {context:.80}");
            };
            if require_trail {
                assert!(
                    pieces
                        .iter()
                        .any(|p| p.headings.iter().any(|t| *t == h.text)),
                    "heading {:?} is in no chunk and no trail",
                    h.text
                );
            }
        }
    }

    /// Small deterministic generator, so property-style tests need no extra crate.
    struct Lcg(u64);

    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    fn generated_doc(rng: &mut Lcg, lines: usize) -> String {
        const WORDS: &[&str] = &[
            "the",
            "chunk",
            "é",
            "日本語",
            "🦀",
            "naïve",
            "x",
            "splitter",
            "🎉🎉",
            "token",
            "a",
        ];
        const ODD_LINES: &[&str] = &[
            "===\n",
            "> quoted # text\n",
            "<!-- note\n",
            "-->\n",
            "    indented # code\n",
            "\t- tabbed item\n",
            "1. first\n",
            "  \t \n",
            "~~~~\n",
            "line with crlf\r\n",
            "\r\n",
        ];
        let mut doc = String::new();
        let mut in_fence = false;
        for _ in 0..lines {
            match rng.below(16) {
                0 => doc.push('\n'),
                1 if !in_fence => {
                    doc.push_str(&"#".repeat(1 + rng.below(4)));
                    doc.push_str(" Title ");
                    doc.push_str(WORDS[rng.below(WORDS.len())]);
                    doc.push('\n');
                }
                2 => {
                    doc.push_str("```\n");
                    in_fence = !in_fence;
                }
                3 => doc.push_str("- item\n"),
                4 => doc.push_str("# comment?\n"),
                5 => doc.push_str("---\n"),
                6 | 7 => doc.push_str(ODD_LINES[rng.below(ODD_LINES.len())]),
                _ => {
                    let words = 1 + rng.below(30);
                    for w in 0..words {
                        if w > 0 {
                            doc.push(' ');
                        }
                        doc.push_str(WORDS[rng.below(WORDS.len())]);
                    }
                    doc.push('\n');
                }
            }
        }
        doc
    }

    // ---- split_chars ------------------------------------------------------------------------

    #[test]
    fn split_chars_breaks_at_whitespace() {
        let pieces = split_chars("aaaa bbbb cccc", 10, 0);
        assert_eq!(texts(&pieces), ["aaaa bbbb", "cccc"]);
        assert_eq!(starts(&pieces), [0, 10]);
        assert!(pieces.iter().all(|p| p.headings.is_empty()));
    }

    #[test]
    fn split_chars_overlap_starts_at_a_word() {
        let pieces = split_chars("aaaa bbbb cccc dddd", 10, 4);
        assert_eq!(texts(&pieces), ["aaaa bbbb", "bbbb cccc", "cccc dddd"]);
        assert_eq!(starts(&pieces), [0, 5, 10]);
    }

    #[test]
    fn split_chars_prefers_paragraph_then_newline_then_space() {
        // A paragraph break wins over a later newline and later spaces.
        let text = "one two three\n\nfour five\nsix seven";
        let pieces = split_chars(text, 24, 0);
        assert_eq!(texts(&pieces), ["one two three", "four five\nsix seven"]);
        assert_eq!(starts(&pieces), [0, 15]);

        // A paragraph break under size/2 chars in is not taken; the later newline is.
        let text = "one two three\n\nfour five\nsix seven eight";
        let pieces = split_chars(text, 30, 0);
        assert_eq!(
            texts(&pieces),
            ["one two three\n\nfour five", "six seven eight"]
        );
        assert_eq!(starts(&pieces), [0, 25]);

        // Without a paragraph break, the last newline wins over later spaces.
        let text = "one two three\nfour five six seven";
        let pieces = split_chars(text, 25, 0);
        assert_eq!(texts(&pieces), ["one two three", "four five six seven"]);
        assert_eq!(starts(&pieces), [0, 14]);
    }

    #[test]
    fn split_chars_ignores_breaks_that_would_make_short_chunks() {
        // The only break is at 2 chars, under size/2 = 5: cut hard at 10 instead.
        let pieces = split_chars("ab\n\ncdefghijklmnopqr", 10, 0);
        assert_eq!(texts(&pieces), ["ab\n\ncdefgh", "ijklmnopqr"]);
        assert_eq!(starts(&pieces), [0, 10]);
        // No whitespace at all: hard cuts.
        let pieces = split_chars("abcdefghijklmnopqrstuvw", 10, 0);
        assert_eq!(texts(&pieces), ["abcdefghij", "klmnopqrst", "uvw"]);
    }

    #[test]
    fn split_chars_hard_cut_with_overlap() {
        let pieces = split_chars("abcdefghijklmnop", 8, 3);
        assert_eq!(texts(&pieces), ["abcdefgh", "fghijklm", "klmnop"]);
        assert_eq!(starts(&pieces), [0, 5, 10]);
    }

    #[test]
    fn split_chars_counts_chars_not_bytes() {
        let text = "éééé 日本日本 🦀🦀🦀🦀";
        let pieces = split_chars(text, 5, 0);
        assert_eq!(texts(&pieces), ["éééé", "日本日本", "🦀🦀🦀🦀"]);
        assert_eq!(starts(&pieces), [0, 9, 22]);
        // Hard cuts land on char boundaries.
        let pieces = split_chars("日本語のテキスト🦀é", 3, 1);
        assert_eq!(
            texts(&pieces),
            ["日本語", "語のテ", "テキス", "スト🦀", "🦀é"]
        );
        check_pieces("日本語のテキスト🦀é", &pieces, 3);
    }

    #[test]
    fn split_chars_whitespace_and_empty_inputs() {
        assert!(split_chars("", 10, 2).is_empty());
        assert!(split_chars(" \n\n \t\n", 3, 1).is_empty());
        let pieces = split_chars("\n\n  indented\n\n", 100, 0);
        assert_eq!(texts(&pieces), ["  indented"]);
        assert_eq!(starts(&pieces), [2]);
    }

    #[test]
    fn split_chars_reconstructs_input() {
        let mut rng = Lcg(7);
        let doc = generated_doc(&mut rng, 400);
        for (size, overlap) in [(40, 0), (40, 10), (100, 30), (7, 6), (1, 0), (500, 499)] {
            let pieces = split_chars(&doc, size, overlap);
            check_pieces(&doc, &pieces, size);
            assert_eq!(
                reconstruct(&doc, &pieces),
                doc,
                "size {size} overlap {overlap}"
            );
        }
    }

    #[test]
    fn split_chars_is_deterministic_and_local() {
        let mut rng = Lcg(11);
        let doc = generated_doc(&mut rng, 300);
        let appended = format!("{doc}\nA new closing paragraph with a few more words in it.\n");
        for (size, overlap) in [(50, 0), (80, 20), (200, 60)] {
            let before = split_chars(&doc, size, overlap);
            assert_eq!(before, split_chars(&doc, size, overlap));
            let after = split_chars(&appended, size, overlap);
            let keep = before.len() - 1;
            assert!(keep > 3);
            assert_eq!(
                before[..keep],
                after[..keep],
                "size {size} overlap {overlap}"
            );
        }
    }

    // ---- split_markdown ---------------------------------------------------------------------

    const GUIDE: &str = "\
Intro text before any heading.

# Guide

Welcome.

## Install

### From source

Run make.

### From crates

Use cargo.

## Usage

Call it.

# Appendix

The end.
";

    #[test]
    fn split_markdown_sections_and_trails() {
        let pieces = split_markdown(GUIDE, 1000, 0);
        assert_eq!(
            texts(&pieces),
            [
                "Intro text before any heading.",
                "# Guide\n\nWelcome.",
                "### From source\n\nRun make.",
                "### From crates\n\nUse cargo.",
                "## Usage\n\nCall it.",
                "# Appendix\n\nThe end.",
            ]
        );
        assert_eq!(
            trails(&pieces),
            [
                vec![],
                vec!["Guide"],
                vec!["Guide", "Install", "From source"],
                vec!["Guide", "Install", "From crates"],
                vec!["Guide", "Usage"],
                vec!["Appendix"],
            ]
        );
        assert_eq!(starts(&pieces), [0, 32, 63, 91, 120, 140]);
        check_pieces(GUIDE, &pieces, 1000);
        assert_nothing_lost(GUIDE, &pieces, true);
    }

    #[test]
    fn split_markdown_hash_in_code_is_not_a_heading() {
        let doc = "\
# Build

```sh
# install deps
make
## not a heading either
```

~~~~
# tilde fence
```
# still code: a shorter, different fence does not close it
~~~~

    # indented code

After.
";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].text, doc.trim_end());
        assert_eq!(trails(&pieces), [vec!["Build"]]);
    }

    #[test]
    fn split_markdown_setext_headings() {
        let doc = "\
Title
=====

Intro.

Part one
--------

Text one.

Not a heading:

---

Text two.
";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(
            texts(&pieces),
            [
                "Title\n=====\n\nIntro.",
                "Part one\n--------\n\nText one.\n\nNot a heading:\n\n---\n\nText two.",
            ]
        );
        assert_eq!(trails(&pieces), [vec!["Title"], vec!["Title", "Part one"]]);
        assert_eq!(starts(&pieces), [0, 21]);
    }

    #[test]
    fn split_markdown_list_and_quote_underlines_are_not_setext() {
        let doc = "# T\n\n- item\n---\n\n> quote\n---\n\nend\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(texts(&pieces), [doc.trim_end()]);
        assert_eq!(trails(&pieces), [vec!["T"]]);
    }

    #[test]
    fn split_markdown_front_matter_is_not_a_heading() {
        let doc = "---\ntitle: Doc\ntags: [a]\n---\n\n# Real\n\nBody.\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(
            texts(&pieces),
            ["---\ntitle: Doc\ntags: [a]\n---", "# Real\n\nBody."]
        );
        assert_eq!(trails(&pieces), [vec![], vec!["Real"]]);
    }

    #[test]
    fn split_markdown_atx_heading_forms() {
        let doc = "#NotHeading\n\n## C# ##\n\nx\n\n  ### Indented ###   \n\ny\n\n#\n\nz\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(
            texts(&pieces),
            [
                "#NotHeading",
                "## C# ##\n\nx",
                "  ### Indented ###   \n\ny",
                "#\n\nz"
            ]
        );
        assert_eq!(
            trails(&pieces),
            [vec![], vec!["C#"], vec!["C#", "Indented"], vec![]]
        );
    }

    #[test]
    fn split_markdown_crlf_and_bom() {
        let doc = "\u{feff}# One\r\n\r\nA.\r\n\r\nTwo\r\n===\r\n\r\nB.\r\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(texts(&pieces), ["# One\r\n\r\nA.", "Two\r\n===\r\n\r\nB."]);
        assert_eq!(trails(&pieces), [vec!["One"], vec!["Two"]]);
        assert_eq!(starts(&pieces), [3, 18]);
    }

    #[test]
    fn split_markdown_unclosed_fence_and_comment_run_to_the_end() {
        let doc = "# A\n\ntext\n\n```\n# not a heading\n\nstill code\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(texts(&pieces), [doc.trim_end()]);
        let pieces = split_markdown(doc, 12, 0);
        assert_eq!(
            texts(&pieces),
            ["# A\n\ntext", "```", "# not a", "heading", "still code"]
        );
        assert!(trails(&pieces).iter().all(|t| t == &["A"]));

        let doc = "# A\n\n<!--\n# hidden\n-->\n\n# B\n\nb\n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(texts(&pieces), ["# A\n\n<!--\n# hidden\n-->", "# B\n\nb"]);
        assert_eq!(trails(&pieces), [vec!["A"], vec!["B"]]);
    }

    #[test]
    fn degenerate_inputs_do_not_panic() {
        let inputs = [
            "",
            "\r",
            "\n",
            "#",
            "# ",
            "##",
            "```",
            "~~~",
            "---",
            "===",
            "- ",
            "1.",
            ">",
            "<!--",
            "\u{feff}",
            "\u{feff}#",
            "\u{feff}---\na: b\n---",
            "---\na: b",
            "+++\na = 1\n+++\n",
            "é",
            "🦀\n\n🦀",
            "\t\t\n \n",
            "a\r\n===\r\n",
            "```\n```\n```",
        ];
        for input in inputs {
            for max in [1, 2, 3, 5, 100] {
                for overlap in [0, max / 2, max - 1] {
                    let pieces = split_markdown(input, max, overlap);
                    check_pieces(input, &pieces, max);
                    let pieces = split_chars(input, max, overlap);
                    check_pieces(input, &pieces, max);
                }
            }
        }
    }

    #[test]
    fn split_markdown_packs_blocks_greedily() {
        let doc = "## Big\n\naaaa aaaa\n\nbbbb bbbb\n\ncccc cccc\n- d1\n- d2\n";
        // The whole section is 52 chars; with 24 the blocks are packed, and a list item starts a
        // new block even without a blank line before it.
        let pieces = split_markdown(doc, 24, 0);
        assert_eq!(
            texts(&pieces),
            [
                "## Big\n\naaaa aaaa",
                "bbbb bbbb\n\ncccc cccc",
                "- d1\n- d2"
            ]
        );
        assert_eq!(starts(&pieces), [0, 19, 40]);
        assert!(trails(&pieces).iter().all(|t| t == &["Big"]));
    }

    #[test]
    fn split_markdown_keeps_code_fence_whole_when_it_fits() {
        let code = "```rust\nfn main() {\n\n    // # not a heading\n\n}\n```";
        let doc = format!("# Code\n\nSome intro paragraph here.\n\n{code}\n\nAfter the code.\n");
        let pieces = split_markdown(&doc, 60, 0);
        assert_eq!(
            texts(&pieces),
            [
                "# Code\n\nSome intro paragraph here.",
                code,
                "After the code."
            ]
        );
        assert!(trails(&pieces).iter().all(|t| t == &["Code"]));
    }

    #[test]
    fn split_markdown_splits_big_code_fence_at_lines() {
        let doc = "# C\n\n```\nline one\nline two\n\nline three\nline four\n```\n";
        let pieces = split_markdown(doc, 20, 0);
        assert_eq!(
            texts(&pieces),
            [
                "# C",
                "```\nline one",
                "line two\n\nline three",
                "line four\n```"
            ]
        );
        check_pieces(doc, &pieces, 20);
    }

    #[test]
    fn split_markdown_big_paragraph_falls_back_to_split_chars() {
        let doc = "# P\n\nalpha beta gamma delta epsilon zeta eta\n";
        let pieces = split_markdown(doc, 20, 6);
        assert_eq!(
            texts(&pieces),
            [
                "# P",
                "alpha beta gamma",
                "gamma delta epsilon",
                "epsilon zeta eta"
            ]
        );
        assert_eq!(starts(&pieces), [0, 5, 16, 28]);
        assert!(trails(&pieces).iter().all(|t| t == &["P"]));
    }

    #[test]
    fn split_markdown_heading_only_sections_not_emitted() {
        let doc = "# Top\n\n## Empty\n\n\n## Mid\n### Leaf\nLeaf text.\n# Last\n   \n";
        let pieces = split_markdown(doc, 1000, 0);
        assert_eq!(texts(&pieces), ["### Leaf\nLeaf text."]);
        assert_eq!(trails(&pieces), [vec!["Top", "Mid", "Leaf"]]);
        assert!(split_markdown("", 10, 0).is_empty());
        assert!(split_markdown("\n \n# Only\n\n", 10, 0).is_empty());
    }

    #[test]
    fn split_markdown_unicode() {
        let doc = "# Résumé 日本\n\nÉtude 🦀 naïve café. 日本語の文章です。\n\n## 絵文字 🎉\n\n🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉\n";
        let pieces = split_markdown(doc, 12, 3);
        check_pieces(doc, &pieces, 12);
        assert_nothing_lost(doc, &pieces, true);
        assert_eq!(
            texts(&pieces),
            [
                "# Résumé 日本",
                "Étude 🦀",
                "🦀 naïve",
                "naïve café.",
                "café. 日本語の文章",
                "日本語の文章です。",
                "## 絵文字 🎉",
                "🎉🎉🎉🎉🎉🎉🎉🎉🎉🎉",
            ]
        );
        assert_eq!(trails(&pieces)[7], ["Résumé 日本", "絵文字 🎉"]);
    }

    const README: &str = r#"---
title: kegline
---

Kegline turns documents into datasets.

# kegline

[![CI](https://example.invalid/badge.svg)](https://example.invalid)

A CLI that turns **documents** into fine-tuning datasets for LLMs, incrementally.

## Install

### From source

```sh
# clone and build
git clone https://example.invalid/kegline
cd kegline
cargo install --path .
```

### Prebuilt

Download a release and put `keg` on your `PATH`.

## Usage

1. Write a `keg.yaml`:

   ```yaml
   # where documents come from
   sources:
     - docs/**/*.md
   ```

2. Run `keg build`.
3. Look at `out/`.

| flag | meaning |
|------|---------|
| `-j` | jobs    |

Configuration
-------------

Chunking is controlled by `chunk.size` and `chunk.overlap`. Sizes are in characters, not bytes,
so that text in any script is treated fairly. Overlap repeats the end of one chunk at the start of
the next, which helps a model see context across the boundary.

<!--
# TODO: this comment is not a heading
-->

> # Quoted heading is not a section
> Still quoted.

## FAQ

### Why?

Because re-running should be cheap.

* * *

Thanks!
"#;

    #[test]
    fn split_markdown_realistic_doc_loses_nothing() {
        for (max, overlap) in [(2000, 0), (300, 50), (120, 20), (40, 10), (8, 2)] {
            let pieces = split_markdown(README, max, overlap);
            check_pieces(README, &pieces, max);
            assert_nothing_lost(README, &pieces, true);
        }
        let pieces = split_markdown(README, 2000, 0);
        assert_eq!(
            trails(&pieces),
            [
                vec![],
                vec!["kegline"],
                vec!["kegline", "Install", "From source"],
                vec!["kegline", "Install", "Prebuilt"],
                vec!["kegline", "Usage"],
                vec!["kegline", "Configuration"],
                vec!["kegline", "FAQ", "Why?"],
            ]
        );
        assert_eq!(
            pieces[0].text,
            "---\ntitle: kegline\n---\n\nKegline turns documents into datasets."
        );
        assert!(
            pieces[2]
                .text
                .starts_with("### From source\n\n```sh\n# clone")
        );
        assert!(
            pieces[5]
                .text
                .starts_with("Configuration\n-------------\n\nChunking")
        );
        assert!(pieces[5].text.ends_with("> Still quoted."));
        assert_eq!(
            pieces[6].text,
            "### Why?\n\nBecause re-running should be cheap.\n\n* * *\n\nThanks!"
        );
    }

    #[test]
    fn split_markdown_is_deterministic_and_local() {
        let appended = format!("{README}\nOne more closing paragraph.\n");
        for (max, overlap) in [(2000, 0), (150, 30), (60, 10)] {
            let before = split_markdown(README, max, overlap);
            assert_eq!(before, split_markdown(README, max, overlap));
            let after = split_markdown(&appended, max, overlap);
            let keep = before.len() - 1;
            assert!(keep >= 6);
            assert_eq!(before[..keep], after[..keep], "max {max} overlap {overlap}");
            let last = after.last().map(|p| p.text.as_str()).unwrap_or_default();
            assert!(last.ends_with("Thanks!\n\nOne more closing paragraph."));
        }
    }

    #[test]
    fn chunks_never_exceed_limit_on_generated_inputs() {
        let mut rng = Lcg(42);
        for round in 0..60 {
            let lines = 20 + rng.below(200);
            let doc = generated_doc(&mut rng, lines);
            let size = 1 + rng.below(if round % 3 == 0 { 8 } else { 300 });
            let overlap = rng.below(size);
            let pieces = split_chars(&doc, size, overlap);
            check_pieces(&doc, &pieces, size);
            assert_eq!(reconstruct(&doc, &pieces), doc);
            let pieces = split_markdown(&doc, size, overlap);
            check_pieces(&doc, &pieces, size);
            assert_nothing_lost(&doc, &pieces, false);

            // Locality on arbitrary inputs too: only the last chunk may change on append.
            let appended = format!("{doc}\n\nAppended closing paragraph, with é and 🦀.\n");
            for split in [split_chars, split_markdown] {
                let before = split(&doc, size, overlap);
                let after = split(&appended, size, overlap);
                let keep = before.len().saturating_sub(1);
                if let Some(k) = (0..keep).find(|&k| before[k] != after[k]) {
                    panic!(
                        "round {round} size {size} overlap {overlap}: piece {k} of {} differs\n{:?}\n{:?}\nnext {:?}\ndoc len {} tail {:?}",
                        before.len(),
                        before[k],
                        after[k],
                        before.get(k + 1),
                        doc.len(),
                        &doc[doc.len().saturating_sub(60)..]
                    );
                }
            }
        }
    }

    /// Nanoseconds this thread has run on a CPU, so a busy machine does not skew the figure.
    fn thread_cpu_ns() -> Option<u64> {
        let stat = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
        stat.split_whitespace().next()?.parse().ok()
    }

    /// ~50 MB of ordinary Markdown through both splitters; run with
    /// `cargo test --release --lib chunker -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn chunker_throughput() {
        use std::fmt::Write as _;
        use std::time::Instant;

        let mut doc = String::with_capacity(52 << 20);
        let mut n = 0;
        while doc.len() < 50 << 20 {
            n += 1;
            let _ = write!(
                doc,
                "# Chapter {n}\n\nThis chapter explains part {n} of the system in some detail, with \
                 enough prose to look like real documentation written by people.\n\n\
                 ## Overview {n}\n\nThe overview covers the main ideas. It has several sentences. \
                 Each one adds a little more context, and some of them are rather long so that \
                 lines wrap the way they do in real files.\nA second line follows directly.\n\n\
                 - first item with `code`\n- second item with a [link](https://example.invalid/{n})\n\
                 - third item\n\n### Example {n}\n\n```rust\n# not a heading\nfn main() {{\n    \
                 println!(\"{n}\");\n}}\n```\n\n| a | b |\n|---|---|\n| {n} | x |\n\n\
                 Notes {n}\n--------\n\nCafé, naïve, 日本語 and 🦀 appear now and then.\n\n"
            );
            if n % 10 == 0 {
                // An occasional long section exercises block packing and the fallbacks.
                doc.push_str("## Long section\n\n");
                for k in 0..40 {
                    let _ = write!(
                        doc,
                        "Paragraph {k} of a long section that goes on for a while so the section \
                         is far bigger than one chunk and has to be packed block by block.\n\n"
                    );
                }
            }
        }
        let mb = doc.len() as f64 / 1e6;
        println!("input: {mb:.1} MB of Markdown");
        type Splitter = fn(&str, usize, usize) -> Vec<Piece>;
        let splitters: [(&str, Splitter); 2] = [
            ("split_chars", split_chars),
            ("split_markdown", split_markdown),
        ];
        // Run 1 also pays the first touch of the output memory; later runs show the steady state.
        for (name, split) in splitters {
            for run in 1..=3 {
                let (wall, cpu) = (Instant::now(), thread_cpu_ns());
                let pieces = split(&doc, 2000, 200);
                let wall = wall.elapsed().as_secs_f64();
                let cpu = thread_cpu_ns()
                    .zip(cpu)
                    .map(|(b, a)| b.saturating_sub(a) as f64 / 1e9);
                let cpu_rate = cpu.map_or("n/a".into(), |c| format!("{:.0} MB/s", mb / c));
                println!(
                    "{name:>14} run {run}: {:.0} MB/s wall, {cpu_rate} on-CPU, {} pieces of {} \
                     bytes on average",
                    mb / wall,
                    pieces.len(),
                    doc.len() / pieces.len().max(1)
                );
                drop(pieces);
            }
        }
    }
}
