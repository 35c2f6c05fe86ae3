"""Named text sources on fake directory trees: what each reads and skips, the caps, the errors of
an absent or empty source, and a split that holds out whole documents, the last by name."""
import gzip
import shutil

import pytest

from anee_fast.eval import text_sources
from anee_fast.eval.text_sources import (debian_reference_sections, join_documents,
                                         source_documents, split_documents)

PROSE = ("This is a short note about the package. It explains how the tool is used, what it is for "
         "and where the files of the program are kept on the system, so that a new user can start "
         "with it in a few minutes.")


def _page(title: str, words: str) -> str:
    return (f'.TH {title.upper()} 1 "2024" "test" "User Commands"\n.SH NAME\n{title} \\- {words}\n'
            f".SH DESCRIPTION\nThe {title} command is a test page. {PROSE}\n")


def _names(documents):
    return [name for name, _ in documents]


# ---- pydoc ---------------------------------------------------------------------------------------

def test_pydoc_documents_are_the_whole_topics_sorted_and_deterministic():
    from pydoc_data.topics import topics
    docs = source_documents("pydoc", doc_chars=500)
    assert _names(docs) == sorted(topics) and docs == source_documents("pydoc", doc_chars=500)
    assert all(topics[name].strip().startswith(text[:50]) for name, text in docs)
    assert max(len(text) for _, text in docs) > 500          # doc_chars does not cut them
    assert 4900 <= sum(len(t) for _, t in source_documents("pydoc", max_chars=5000)) <= 5000
    with pytest.raises(ValueError, match="takes no root"):
        source_documents("pydoc", root="/tmp")


# ---- man pages -----------------------------------------------------------------------------------

@pytest.mark.skipif(shutil.which("man") is None, reason="needs the man command")
def test_man_renders_pages_skips_links_stubs_languages_and_caps_families(tmp_path):
    man1 = tmp_path / "man1"
    man1.mkdir()
    (man1 / "widget.1").write_text(_page("widget", "turn the widgets"))
    (man1 / "zipper.1.gz").write_bytes(gzip.compress(_page("zipper", "close a zipper").encode()))
    (man1 / "stub.1").write_text(".so man1/widget.1\n")
    (man1 / "alias.1").symlink_to(man1 / "widget.1")
    for letter in "abcde":                      # one family of five pages: three are kept
        (man1 / f"cloud_{letter}.1").write_text(_page(f"cloud_{letter}", "a cloud command"))
    (tmp_path / "de" / "man1").mkdir(parents=True)
    (tmp_path / "de" / "man1" / "german.1").write_text(_page("german", "eine Seite"))

    candidates = text_sources.man_candidates(tmp_path)
    assert _names(candidates) == ["man1/cloud_a.1", "man1/cloud_b.1", "man1/cloud_d.1",
                                  "man1/stub.1", "man1/widget.1", "man1/zipper.1.gz"]
    docs = dict(source_documents("man", root=tmp_path))
    assert sorted(docs) == ["man1/cloud_a.1", "man1/cloud_b.1", "man1/cloud_d.1", "man1/widget.1",
                            "man1/zipper.1.gz"]                  # the .so stub renders to nothing
    widget = docs["man1/widget.1"]
    assert "NAME" in widget and "widget - turn the widgets" in widget and "\b" not in widget
    assert "so that a new user can start" in " ".join(widget.split())
    assert "close a zipper" in docs["man1/zipper.1.gz"]
    assert max(len(line) for line in widget.splitlines()) <= 80


def test_man_source_absent_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="'man' needs"):
        source_documents("man", root=tmp_path / "nowhere")


# ---- Debian documentation ------------------------------------------------------------------------

def test_debian_doc_reads_english_readmes_and_txt_and_skips_the_rest(tmp_path):
    pkg = tmp_path / "tool"
    (pkg / "examples").mkdir(parents=True)
    (pkg / "README").write_text(PROSE)
    (pkg / "README.Debian.gz").write_bytes(gzip.compress(("Debian notes. " + PROSE).encode()))
    (pkg / "examples" / "usage.txt").write_text("Usage. " + PROSE)
    (pkg / "changelog.gz").write_bytes(gzip.compress(PROSE.encode()))
    (pkg / "changelog.Debian.gz").write_bytes(gzip.compress(PROSE.encode()))
    (pkg / "copyright").write_text(PROSE)
    (pkg / "README.html").write_text(f"<p>{PROSE}</p>")
    (pkg / "notes.txt").write_bytes(b"\x00\x01binary" + PROSE.encode())
    (pkg / "latin.txt").write_bytes(("caf\xe9 " + PROSE).encode("latin-1"))
    (pkg / "README.ja").write_text("これは日本語の説明です。" * 20)
    (pkg / "table.txt").write_text("\n".join(f"{i} {i * i} 0x{i:04x} ok" for i in range(40)))
    (pkg / "NEWS").write_text(PROSE)                  # neither README* nor *.txt
    (pkg / "other.md").write_text(PROSE)

    docs = source_documents("debian-doc", root=tmp_path)
    assert _names(docs) == ["doc/tool/README", "doc/tool/README.Debian.gz",
                            "doc/tool/examples/usage.txt"]
    assert dict(docs)["doc/tool/README.Debian.gz"].startswith("Debian notes. This is")


def test_debian_doc_keeps_a_few_files_per_package(tmp_path):
    for i in range(12):
        (tmp_path / "big" / f"note{i:02d}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "big" / f"note{i:02d}.txt").write_text(f"Note {i}. {PROSE}")
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "README").write_text(PROSE)
    names = _names(source_documents("debian-doc", root=tmp_path))
    assert len([n for n in names if n.startswith("doc/big/")]) == text_sources.DOC_FILES_PER_PACKAGE
    assert "doc/small/README" in names


def test_debian_reference_is_cut_at_its_body_headings(tmp_path):
    nbsp = "\u00a0"
    text = (f"Debian Reference\n\n1.1. List of tables entry (plain space)\n\nPreface\n\n"
            f"3.1.{nbsp}Guiding rules\n\n    The preface is left out.\n\n"
            f"Chapter{nbsp}1.{nbsp}Tutorials\n\n    Chapter intro.\n\n"
            f"1.1.{nbsp}Console basics\n\n"
            f"1.1.1.{nbsp}The shell prompt\n\n"
            f"{nbsp}{nbsp} Upon starting the system, you log in.\n\n"
            f"1.2.{nbsp}Files\n\n    Everything is a file.\n\n"
            f"A.1.{nbsp}The maze\n\n    A note at the end.\n")
    path = tmp_path / "ref.txt.gz"
    path.write_bytes(gzip.compress(text.encode()))
    sections = [(name, read()) for name, read in debian_reference_sections(path)]
    assert _names(sections) == ["debian-reference/01.01.01", "debian-reference/01.02",
                                "debian-reference/A.01"]    # 1.1 is a heading alone: left out
    assert sections[0][1] == "1.1.1. The shell prompt\n\n   Upon starting the system, you log in."
    assert "preface" not in join_documents(sections)
    path.write_bytes(gzip.compress(b"no chapters here"))
    with pytest.raises(ValueError, match="Chapter 1"):
        debian_reference_sections(path)


def test_debian_doc_with_nothing_english_is_an_error_not_an_empty_source(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "README").write_text("x = 1\ny = 2\n" * 30)
    with pytest.raises(ValueError, match="'debian-doc' yielded no English text"):
        source_documents("debian-doc", root=tmp_path)
    with pytest.raises(FileNotFoundError, match="'debian-doc' needs"):
        source_documents("debian-doc", root=tmp_path / "absent")


# ---- fortunes ------------------------------------------------------------------------------------

def test_fortunes_one_document_per_fortune_without_indexes_links_and_art(tmp_path):
    (tmp_path / "people").write_text("A wise man once spoke.\n%\nB_\bo_\bl_\bd words.\n%\n"
                                     "  /\\_/\\\n ( o.o )\n  > ^ <\n%\nLast one.\n")
    (tmp_path / "people.dat").write_bytes(b"\x00\x00\x00\x02binary index")
    (tmp_path / "people.u8").symlink_to(tmp_path / "people")
    (tmp_path / "animals").write_text("Cats sleep a lot.\n")
    docs = source_documents("fortunes", root=tmp_path)
    assert docs == [("animals/00000", "Cats sleep a lot."),
                    ("people/00000", "A wise man once spoke."),
                    ("people/00001", "Bold words."), ("people/00003", "Last one.")]
    with pytest.raises(FileNotFoundError, match="apt-get install fortunes"):
        source_documents("fortunes", root=tmp_path / "absent")


# ---- caps, split, errors -------------------------------------------------------------------------

def test_caps_cut_documents_at_a_paragraph_and_stop_the_source(tmp_path):
    full = "\n\n".join(f"Part {i}. {PROSE}" for i in range(10))
    for i in range(30):
        (tmp_path / f"f{i:02d}").write_text(full)
    docs = source_documents("fortunes", root=tmp_path, max_chars=3000, doc_chars=1000)
    assert all(len(text) <= 1000 and full.startswith(text) and full[len(text)].isspace()
               for _, text in docs)
    assert sum(text.endswith("minutes.") for _, text in docs) >= len(docs) - 1  # paragraphs whole
    assert 2000 <= sum(len(text) for _, text in docs) <= 3000
    with pytest.raises(ValueError, match="max_chars"):
        source_documents("fortunes", root=tmp_path, max_chars=0)
    with pytest.raises(ValueError, match="unknown text source 'web'"):
        source_documents("web")


def test_split_holds_out_whole_documents_last_by_name():
    docs = [(f"doc{i}", "x" * (10 * (i + 1))) for i in range(10)][::-1]     # given unsorted
    train, heldout = split_documents(docs, 0.2)
    assert [n for n, _ in train + heldout] == sorted(n for n, _ in docs)
    assert {n for n, _ in train}.isdisjoint(n for n, _ in heldout)
    # The held-out tail is as short as it can be while holding >= 20% of the characters.
    total = sum(len(t) for _, t in docs)
    held = sum(len(t) for _, t in heldout)
    assert held >= 0.2 * total and held - len(heldout[0][1]) < 0.2 * total
    short, long = ("a", "x"), ("b", "y" * 100)
    assert split_documents([short, long], 0.5) == ([short], [long])
    assert split_documents([("a", long[1]), ("b", short[1])], 0.9) == ([("a", long[1])],
                                                                       [("b", short[1])])
    with pytest.raises(ValueError, match="at least 2 documents"):
        split_documents([("a", "text")])
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_documents(docs, 1.0)


def test_pydoc_holds_out_at_least_what_eval_holds_out():
    """Its topics are never cut, so the whole topics held out from the end hold at least the last
    20% of the text `anee-fast eval` scores (corpus_text: every topic, sorted by name)."""
    from pydoc_data.topics import topics
    from anee_fast.eval.corpus import corpus_text
    from anee_fast.eval.text_sources import source_documents, split_documents
    documents = source_documents("pydoc")
    assert len(documents) == len(topics)
    _, heldout = split_documents(documents)
    assert sum(len(text) for _, text in heldout) >= 0.2 * len(corpus_text())
