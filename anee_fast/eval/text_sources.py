"""Named English text sources read offline from this machine, so distillation sees more than one
domain: Python's pydoc topics, man pages, Debian's package documentation, fortunes.

Each source (SOURCES: name -> candidates(root)) lists its documents as (name, read) pairs, where
read() gives the text ("" for one to skip), so slow ones (man pages) are rendered only when
taken. `source_documents` takes a deterministic sample of them (an order fixed by a hash of each
name, so the sample spreads over the whole listing), caps each document and the whole source (no
source dominates a mix), and returns them sorted by name.
`split_documents` holds out the last documents by name, whole, so held-out text is unseen text.
A source that is absent or yields nothing is an error, never an empty source.
"""
import gzip
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

from .corpus import evenly_spaced

MAN_ROOT = "/usr/share/man"
DOC_ROOT = "/usr/share/doc"
DEBIAN_REFERENCE = "/usr/share/debian-reference/debian-reference.en.txt.gz"
FORTUNE_ROOT = "/usr/share/games/fortunes"

DEFAULT_MAX_CHARS = 1_000_000
DEFAULT_DOC_CHARS = 20_000
HELDOUT_FRACTION = 0.2
# Sources whose documents are never cut: pydoc is also `anee-fast eval`'s text, which holds out the
# last 20% of its tokens; whole topics holding 20% of the characters from the end then cover all
# of it, so a corpus built here never trains on what eval scores.
UNCUT_SOURCES = ("pydoc",)
# Man pages of one command family (gcloud_*, git-*, EVP_*) and files of one package's docs kept at
# most: one tool's thousands of generated pages (or git's hundreds of release notes) would
# otherwise be most of the sample.
MAN_PAGES_PER_FAMILY = 3
DOC_FILES_PER_PACKAGE = 5

_STOPWORDS = frozenset("the of and to a in is that for it as with be on not this are by or you "
                       "from can if an".split())
_OVERSTRIKE = re.compile(r".\x08")


# ---- what every source shares ------------------------------------------------------------------

def source_documents(name: str, root=None, max_chars: int = DEFAULT_MAX_CHARS,
                     doc_chars: int = DEFAULT_DOC_CHARS, progress: bool = False) -> list:
    """[(document name, text)] of source `name`, sorted by name: documents taken in the order of a
    hash of their names until max_chars, each cut to doc_chars (but UNCUT_SOURCES'). root: where
    the source is read from (None: its place on this machine)."""
    if name not in SOURCES:
        raise ValueError(f"unknown text source {name!r}; known: {', '.join(SOURCES)}")
    for what, value in (("max_chars", max_chars), ("doc_chars", doc_chars)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an integer >= 1, got {value!r}")
    candidates = SOURCES[name](root)
    taken, total = [], 0
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=max_chars, desc=f"reading {name}", unit="char", unit_scale=True)
    try:
        for doc_name, read in sorted(candidates, key=_hash_order):
            text = read() if name in UNCUT_SOURCES else _cut(read(), doc_chars)
            full = len(text) >= max_chars - total
            text = _cut(text, max_chars - total)      # the last one is cut to fill the cap
            if text:
                taken.append((doc_name, text))
                total += len(text)
                if bar is not None:
                    bar.update(len(text))
            if full:
                break
    finally:
        if bar is not None:
            bar.close()
    if not taken:
        raise ValueError(f"the text source {name!r} yielded no English text ({len(candidates)} "
                         f"candidate documents{'' if root is None else f' under {root}'})")
    return sorted(taken)


def split_documents(documents, heldout_fraction: float = HELDOUT_FRACTION) -> tuple:
    """(train, heldout) lists of documents: the last documents by name, whole, holding at least
    heldout_fraction of the characters, are held out (at least one document on each side)."""
    if not 0.0 < heldout_fraction < 1.0:
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    documents = sorted(documents)
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to hold whole ones out, got {len(documents)}: "
                         "give the source more text (a larger max_chars)")
    total = sum(len(text) for _, text in documents)
    cut, heldout_chars = len(documents), 0
    while cut > 1 and heldout_chars < heldout_fraction * total:
        cut -= 1
        heldout_chars += len(documents[cut][1])
    return documents[:cut], documents[cut:]


def _hash_order(candidate) -> bytes:
    return hashlib.sha256(candidate[0].encode()).digest()


def join_documents(documents) -> str:
    """One text of the documents, a blank line between them."""
    return "\n\n".join(text for _, text in documents)


def _cut(text: str, limit: int) -> str:
    """text, or its beginning within limit characters, ended at the last paragraph break in its
    second half, else the last line break, sentence end or space; "" when there is none (a
    fragment of a word is no text)."""
    if len(text) <= limit:
        return text
    head = text[:limit + 1]           # a break right after the limit still ends a whole part
    for mark in ("\n\n", "\n", ". ", " "):
        end = head.rfind(mark)
        if end > limit // 2:
            return head[:end + 1 if mark == ". " else end].rstrip()
    return ""


def _clean(text: str) -> str:
    """Overstrike (bold/underline by backspace) removed, no-break spaces made spaces, trailing
    spaces and outer blank lines stripped."""
    text = _OVERSTRIKE.sub("", text).replace("\u00a0", " ")
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _is_english(text: str) -> bool:
    """Mostly ASCII, and enough of the commonest English words to be prose (not code, tables or
    another language)."""
    if not text or sum(c.isascii() for c in text) < 0.95 * len(text):
        return False
    words = re.findall(r"[a-z']+", text.lower())
    return len(words) >= 20 and sum(w in _STOPWORDS for w in words) >= 0.15 * len(words)


def _decoded(data: bytes):
    """UTF-8 text of file bytes, or None for a binary or non-UTF-8 file."""
    if b"\x00" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _read_maybe_gzip(path: Path):
    """The text of a plain or .gz file, or None when it is not UTF-8 text."""
    try:
        data = path.read_bytes()
        if path.suffix == ".gz":
            data = gzip.decompress(data)
    except (OSError, EOFError, gzip.BadGzipFile):
        return None
    return _decoded(data)


def _per_family(items, family_of, limit: int) -> list:
    """At most `limit` items of each family, evenly spaced within it, in the items' order."""
    families = {}
    for index, item in enumerate(items):
        families.setdefault(family_of(item), []).append(index)
    return [items[i] for i in sorted(i for group in families.values()
                                     for i in evenly_spaced(group, limit))]


def _root_dir(root, default: str, source: str, hint: str) -> Path:
    path = Path(default if root is None else root)
    if not path.is_dir():
        raise FileNotFoundError(f"the text source {source!r} needs {path} ({hint})")
    return path


# ---- pydoc ---------------------------------------------------------------------------------------

def pydoc_candidates(root=None) -> list:
    """The pydoc topics (`help()` texts shipped with CPython); root must be None."""
    if root is not None:
        raise ValueError("the pydoc source reads pydoc_data.topics and takes no root directory")
    from pydoc_data.topics import topics
    return [(key, lambda text=text: _clean(text)) for key, text in topics.items()]


# ---- man pages -----------------------------------------------------------------------------------

def man_candidates(root=None) -> list:
    """Man pages of sections 1-9 under root (English ones: language subfolders are skipped),
    symbolic links skipped, at most MAN_PAGES_PER_FAMILY per command family, each rendered to
    80 columns of plain text when read."""
    base = _root_dir(root, MAN_ROOT, "man", "install man pages, e.g. apt-get install manpages")
    if shutil.which("man") is None:
        raise FileNotFoundError("the text source 'man' renders pages with the man command "
                                "(apt-get install man-db)")
    pages = sorted(p for p in base.glob("man[1-9]*/*") if p.is_file() and not p.is_symlink())
    pages = _per_family(pages, lambda page: re.split(r"[._-]", page.name, maxsplit=1)[0],
                        MAN_PAGES_PER_FAMILY)
    return [(str(page.relative_to(base)), lambda page=page: render_man_page(page))
            for page in pages]


def render_man_page(path) -> str:
    """A man page as plain text (no hyphenation or justification, 80 columns), or "" for a page
    that only includes another (.so) or that man cannot render."""
    source = _read_maybe_gzip(Path(path))
    if source is None or source.lstrip().startswith(".so "):
        return ""
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"}
    env.update(MANWIDTH="80", LC_ALL="C.UTF-8", MANPAGER="cat", PAGER="cat")
    try:
        done = subprocess.run(["man", "--nh", "--nj", "-P", "cat", "-l", str(path)], env=env,
                              capture_output=True, timeout=60)
    except subprocess.TimeoutExpired:
        return ""
    text = _decoded(done.stdout) if done.returncode == 0 else None
    return _clean(text) if text else ""


# ---- Debian documentation -----------------------------------------------------------------------

def debian_doc_candidates(root=None) -> list:
    """README* and *.txt files (plain or .gz) under root (default /usr/share/doc) that read as
    English prose, without changelogs, copyright files and HTML, at most DOC_FILES_PER_PACKAGE
    per package folder; with the default root, also the Debian Reference's sections when
    debian-reference-en is installed. The files are small: they are read here, so the cap per
    package counts prose files only."""
    base = _root_dir(root, DOC_ROOT, "debian-doc", "Debian package documentation")
    prose = [(path, _prose_file(path)) for path in sorted(base.rglob("*")) if _is_doc_file(path)]
    kept = _per_family([(path, text) for path, text in prose if text],
                       lambda item: item[0].relative_to(base).parts[0], DOC_FILES_PER_PACKAGE)
    candidates = [(f"doc/{path.relative_to(base)}", lambda text=text: text) for path, text in kept]
    if root is None and os.path.isfile(DEBIAN_REFERENCE):
        candidates += debian_reference_sections(DEBIAN_REFERENCE)
    return candidates


def _is_doc_file(path: Path) -> bool:
    name = path.name.lower().removesuffix(".gz")
    if not path.is_file() or path.is_symlink():
        return False
    if name.startswith(("changelog", "copyright")) or name.endswith((".html", ".htm", ".pdf")):
        return False
    return name.startswith("readme") or name.endswith(".txt")


def _prose_file(path: Path) -> str:
    text = _read_maybe_gzip(path)
    text = _clean(text) if text else ""
    return text if _is_english(text) else ""


def debian_reference_sections(path) -> list:
    """[(name, read)] of the Debian Reference's plain text cut at its numbered headings (1.1,
    1.1.1, A.2, ...), each named like debian-reference/01.01.01 so names sort in book order; the
    front matter (title, contents, preface) before chapter 1 is left out."""
    text = _read_maybe_gzip(Path(path))
    if text is None:
        raise ValueError(f"{path} is not gzip-compressed UTF-8 text")
    # Headings in the body put a no-break space after the number (the lists at the front use a
    # plain one).
    first = re.search("^Chapter\u00a01\\.", text, re.MULTILINE)
    if first is None:
        raise ValueError(f"{path} has no 'Chapter 1.' heading: not the Debian Reference's text")
    heading = re.compile("^((?:[0-9]+|[A-Z])(?:\\.[0-9]+)+)\\.\u00a0", re.MULTILINE)
    marks = list(heading.finditer(text, first.start()))
    sections = []
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        number = ".".join(part.zfill(2) if part.isdigit() else part
                          for part in mark.group(1).split("."))
        body = _clean(text[mark.start():end])
        if "\n" in body:         # not a heading alone, directly followed by its first subsection
            sections.append((f"debian-reference/{number}", lambda body=body: body))
    return sections


# ---- fortunes ------------------------------------------------------------------------------------

def fortune_candidates(root=None) -> list:
    """Each fortune of the fortune files under root (default /usr/share/games/fortunes) as one
    document, named FILE/NNNNN; index (.dat) files, links and mostly non-letter entries (ASCII
    art) are skipped."""
    base = _root_dir(root, FORTUNE_ROOT, "fortunes", "apt-get install fortunes")
    candidates = []
    for path in sorted(base.iterdir()):
        if not path.is_file() or path.is_symlink() or path.suffix in (".dat", ".u8"):
            continue
        text = _decoded(path.read_bytes())
        if text is None:
            continue
        for i, entry in enumerate(re.split(r"^%$", text, flags=re.MULTILINE)):
            entry = _clean(entry)
            if _is_words(entry):
                candidates.append((f"{path.name}/{i:05d}", lambda entry=entry: entry))
    return candidates


def _is_words(text: str) -> bool:
    """Text that is mostly letters and spaces rather than drawing characters."""
    visible = [c for c in text if not c.isspace()]
    return bool(visible) and sum(c.isalpha() for c in visible) >= 0.6 * len(visible)


SOURCES = {"pydoc": pydoc_candidates, "man": man_candidates, "debian-doc": debian_doc_candidates,
           "fortunes": fortune_candidates}
