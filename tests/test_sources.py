"""Tests of jaxllm.data.sources: spec parsing, every source kind, every input error."""

import hashlib
import json
import os

import pytest

from jaxllm.data import sources
from jaxllm.data.sources import DataError, SourceSpec, SourceStats


def read(spec: str, data_root: str = "", **kwargs) -> tuple[list[str], SourceStats]:
    (source,) = sources.parse_sources(spec, data_root)
    stats = SourceStats()
    return list(sources.read_documents(source, stats, **kwargs)), stats


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def test_parse_kinds_fields_and_defaults():
    specs = sources.parse_sources(
        " text:{data_root}/a/*.txt ; jsonl:b.jsonl#meta.body ; tfds:tiny/cfg:train[:10]; stdlib: ",
        data_root="/root",
    )
    assert specs == [
        SourceSpec("text", "/root/a/*.txt", None, None, "text:{data_root}/a/*.txt"),
        SourceSpec("jsonl", "b.jsonl", "meta.body", None, "jsonl:b.jsonl#meta.body"),
        SourceSpec("tfds", "tiny/cfg:train[:10]", "text", None, "tfds:tiny/cfg:train[:10]"),
        SourceSpec("stdlib", "train", None, None, "stdlib:"),
    ]
    assert sources.parse_sources("jsonl:x.jsonl")[0].field == "text"
    assert sources.parse_sources("stdlib:validation")[0].location == "validation"


def test_parse_weights():
    specs = sources.parse_sources("stdlib:train@3; jsonl:x.jsonl#t@0.5; tfds:n:train#f@1e-1")
    assert [s.weight for s in specs] == [3.0, 0.5, 0.1]
    assert [s.field for s in specs] == [None, "t", "f"]
    assert specs[1].text == "jsonl:x.jsonl#t@0.5"


@pytest.mark.parametrize(
    "spec, fragment",
    [
        ("stdlib:train@2; text:a.txt", "mixes weighted and unweighted"),
        ("text:a.txt; jsonl:b.jsonl@1", "'text:a.txt'"),
        ("parquet:a.parquet", "unknown source kind 'parquet'"),
        ("a.txt", "unknown source kind"),
        ("text:a.txt@0", "bad weight '0'"),
        ("text:a.txt@-1", "bad weight"),
        ("text:a.txt@abc", "bad weight 'abc'"),
        ("text:a.txt@inf", "bad weight"),
        ("text:{data_root}/a.txt", "data_root is empty"),
        ("text:a.txt;;stdlib:", "empty entry"),
        ("", "empty"),
        ("text:a.txt#field", "no '#field'"),
        ("tfds:mnist", "tfds:NAME[/CONFIG]:SPLIT"),
        ("stdlib:test", "unknown stdlib split 'test'"),
    ],
)
def test_parse_errors(spec, fragment):
    with pytest.raises(DataError) as e:
        sources.parse_sources(spec)
    assert fragment in str(e.value)


# ---------------------------------------------------------------------------------------------
# text:
# ---------------------------------------------------------------------------------------------


def test_text_blank_line_separated(tmp_path):
    (tmp_path / "a.txt").write_text(
        "\n\nfirst doc\n  indented line\n\n \t \n\nsecond doc\r\n\r\nthird\n\tdoc\n\n\n"
    )
    docs, stats = read(f"text:{tmp_path}/a.txt")
    assert docs == ["first doc\n  indented line", "second doc", "third\n\tdoc"]
    # The leading and trailing separators leave empty pieces: skipped and counted.
    assert (stats.documents, stats.files, stats.skipped_empty) == (3, 1, 2)


def test_text_glob_is_sorted_and_skips_index_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("bee")
    (tmp_path / "a.txt").write_text("ay")
    (tmp_path / "sub" / "c.txt").write_text("sea\n\nsee")
    docs, stats = read(f"text:{tmp_path}/**/*.txt")
    assert docs == ["ay", "bee", "sea", "see"]
    assert stats.files == 3
    (tmp_path / "a.index.jsonl").write_text('{"byte_start": 0, "byte_end": 1}\n')
    docs, _ = read(f"text:{tmp_path}/*")
    assert docs == ["a", "bee"]  # the index is used for a.txt, never read as text itself


def test_text_with_index_gives_exact_byte_slices(tmp_path):
    data = "Doc one.\n\nStill doc one.\nünï\n\n\nDoc two\n".encode()
    (tmp_path / "train.txt").write_bytes(data)
    starts = [0, data.index("ü".encode()), data.index(b"Doc two"), 3]
    ranges = [
        (0, data.index(b"\n\n\nDoc")),
        (starts[1], starts[1] + 5),
        (starts[2], len(data)),
        (3, 3),
    ]
    with open(tmp_path / "train.index.jsonl", "w") as f:
        for i, (s, e) in enumerate(ranges):
            f.write(json.dumps({"id": f"d{i}", "byte_start": s, "byte_end": e}) + "\n")
    docs, stats = read(f"text:{tmp_path}/train.txt")
    assert docs == [data[s:e].decode() for s, e in ranges[:3]]
    assert docs[0] == "Doc one.\n\nStill doc one.\nünï"  # blank lines inside a document survive
    assert docs[1] == "ünï"
    assert (stats.documents, stats.skipped_empty) == (3, 1)


@pytest.mark.parametrize(
    "index_line, fragment",
    [
        ('{"byte_start": 0, "byte_end": 99}', "out of range"),
        ('{"byte_start": 5, "byte_end": 2}', "out of range"),
        ('{"byte_start": 0}', "integer 'byte_end'"),
        ('{"byte_start": "0", "byte_end": 2}', "integer 'byte_start'"),
        ('{"byte_start": 0, "byte_end": 1', "malformed index entry"),
        ("[0, 1]", "not a JSON object"),
        ('{"byte_start": 1, "byte_end": 3}', "splits a UTF-8 character"),
    ],
)
def test_text_index_errors(tmp_path, index_line, fragment):
    (tmp_path / "t.txt").write_text("éa\n")  # 'é' is bytes 0-1
    (tmp_path / "t.index.jsonl").write_text(
        '{"byte_start": 0, "byte_end": 3}\n' + index_line + "\n"
    )
    with pytest.raises(DataError) as e:
        read(f"text:{tmp_path}/t.txt")
    assert "t.index.jsonl:2: " in str(e.value)
    assert fragment in str(e.value)


# ---------------------------------------------------------------------------------------------
# jsonl:
# ---------------------------------------------------------------------------------------------


def test_jsonl_nested_field_blank_lines_and_empty_docs(tmp_path):
    records = [
        {"meta": {"body": "alpha\nbeta"}},
        {"meta": {"body": "  "}},
        {"meta": {"body": "gamma ✓"}, "other": 1},
    ]
    lines = [json.dumps(r, ensure_ascii=False) for r in records]
    (tmp_path / "x.jsonl").write_text(lines[0] + "\n\n" + lines[1] + "\n" + lines[2] + "\n")
    docs, stats = read(f"jsonl:{tmp_path}/x.jsonl#meta.body")
    assert docs == ["alpha\nbeta", "gamma ✓"]
    assert (stats.documents, stats.skipped_empty, stats.files) == (2, 2, 1)
    (tmp_path / "y.jsonl").write_text('{"text": "default field"}\n')
    assert read(f"jsonl:{tmp_path}/y.jsonl")[0] == ["default field"]


@pytest.mark.parametrize(
    "line, fragment",
    [
        ('{"text": "a"', "x.jsonl:2: malformed JSON line"),
        ('{"body": "a"}', "x.jsonl:2: record has no field 'text'"),
        ('{"text": 3}', "x.jsonl:2: field 'text' is int, not a string"),
        ('{"text": null}', "field 'text' is NoneType"),
        ('["text"]', "x.jsonl:2: record has no field 'text'"),
    ],
)
def test_jsonl_errors_name_file_and_line(tmp_path, line, fragment):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(DataError) as e:
        read(f"jsonl:{tmp_path}/x.jsonl")
    assert fragment in str(e.value)


def test_jsonl_nested_field_missing(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"meta": {"title": "t"}}\n{"meta": "flat"}\n')
    with pytest.raises(DataError, match=r"x.jsonl:1: record has no field 'meta.body'"):
        read(f"jsonl:{tmp_path}/x.jsonl#meta.body")


# ---------------------------------------------------------------------------------------------
# File errors shared by text: and jsonl:
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, name", [("text", "a.txt"), ("jsonl", "a.jsonl")])
def test_glob_without_matches(tmp_path, kind, name):
    with pytest.raises(DataError, match="matches no files") as e:
        read(f"{kind}:{tmp_path}/missing/*.{name.split('.')[1]}")
    assert f"{kind}:{tmp_path}/missing" in str(e.value)


@pytest.mark.parametrize("kind, name", [("text", "a.txt"), ("jsonl", "a.jsonl")])
@pytest.mark.parametrize("content", [b"", b" \n\t\n"])
def test_empty_file(tmp_path, kind, name, content):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match="file is empty") as e:
        read(f"{kind}:{tmp_path}/{name}")
    assert name in str(e.value)


def test_non_utf8_byte_text(tmp_path):
    data = b"line one\nline two\nbad \xff here\n"
    (tmp_path / "a.txt").write_bytes(data)
    offset = data.index(b"\xff")  # counted independently of the code under test: 22
    with pytest.raises(DataError) as e:
        read(f"text:{tmp_path}/a.txt")
    msg = str(e.value)
    assert f"{tmp_path}/a.txt" in msg
    assert f"byte offset {offset} (line 3)" in msg and "0xff" in msg


def test_non_utf8_byte_jsonl(tmp_path):
    data = b'{"text": "ok"}\n{"text": "ok"}\n{"text": "caf\xe9"}\n'
    (tmp_path / "a.jsonl").write_bytes(data)
    offset = data.index(b"\xe9")
    with pytest.raises(DataError, match=rf"a.jsonl: byte offset {offset} \(line 3\)"):
        read(f"jsonl:{tmp_path}/a.jsonl")


# ---------------------------------------------------------------------------------------------
# stdlib:
# ---------------------------------------------------------------------------------------------


def test_stdlib_splits_are_disjoint_hash_based_and_exclude_tests():
    root = sources.stdlib_root()
    train = sources.stdlib_files("train")
    validation = sources.stdlib_files("validation")
    assert len(validation) > 0 and len(train) > 20 * len(validation)
    train_paths = {rel for rel, _ in train}
    assert not train_paths & {rel for rel, _ in validation}
    assert [rel for rel, _ in train] == sorted(train_paths)
    # Independent walk: every .py file outside excluded directories is in exactly one split.
    expected = set()
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if not {"site-packages", "dist-packages", "test", "tests", "idle_test"} & set(parts[:-1]):
            expected.add(path.relative_to(root).as_posix())
    assert train_paths | {rel for rel, _ in validation} == expected
    for rel, _ in validation:
        assert int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 50 == 0
    for rel in list(train_paths)[:50]:
        assert int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 50 != 0
    assert "argparse.py" in train_paths | {rel for rel, _ in validation}


def test_stdlib_documents_are_whole_files():
    docs, stats = read("stdlib:validation")
    expected = [
        p.read_text() for _, p in sources.stdlib_files("validation") if p.read_bytes().strip()
    ]
    assert docs == expected
    assert stats.files == len(sources.stdlib_files("validation"))
    assert stats.documents + stats.skipped_empty + stats.skipped_undecodable == stats.files


def test_stdlib_skips_empty_and_undecodable(tmp_path, monkeypatch):
    (tmp_path / "lib").mkdir()
    files = {"a.py": b"x = 1\n", "b.py": b"", "c.py": b"s = '\xff'\n", "d.py": b"y = 2\n"}
    for name, data in files.items():
        (tmp_path / "lib" / name).write_bytes(data)
    (tmp_path / "lib" / "tests").mkdir()
    (tmp_path / "lib" / "tests" / "t.py").write_bytes(b"\xff broken on purpose")
    monkeypatch.setattr(sources, "stdlib_root", lambda: tmp_path / "lib")
    monkeypatch.setattr(sources, "stdlib_split", lambda rel: "train")
    docs, stats = read("stdlib:train")
    assert docs == ["x = 1\n", "y = 2\n"]
    assert (stats.files, stats.skipped_empty, stats.skipped_undecodable) == (4, 1, 1)


# ---------------------------------------------------------------------------------------------
# tfds:
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    import tfds_fixture  # noqa: PLC0415 (tests/ is on sys.path under pytest)

    return tfds_fixture.build(tmp_path_factory.mktemp("tfds"))


def test_tfds_source(tfds_dir, monkeypatch):
    import tfds_fixture  # noqa: PLC0415

    expected = sorted(text for text, _ in tfds_fixture.RECORDS["train"] if text)
    docs, stats = read("tfds:tiny_docs:train", tfds_data_dir=tfds_dir)
    assert sorted(docs) == expected  # tfds shuffles records when it writes them
    assert (stats.documents, stats.skipped_empty) == (3, 1)
    titles, _ = read("tfds:tiny_docs:train#meta.title", tfds_data_dir=tfds_dir)
    assert sorted(titles) == sorted(t for _, t in tfds_fixture.RECORDS["train"])
    monkeypatch.setenv("TFDS_DATA_DIR", tfds_dir)
    assert read("tfds:tiny_docs:validation")[0] == ["held-out document"]
    (source,) = sources.parse_sources("tfds:tiny_docs:train")
    assert sources.fingerprint(source) == sources.fingerprint(source, tfds_data_dir=tfds_dir)
    validation = sources.parse_sources("tfds:tiny_docs:validation")[0]
    assert sources.fingerprint(source) != sources.fingerprint(validation)


def test_tfds_errors(tfds_dir):
    with pytest.raises(DataError, match="cannot open tfds dataset 'no_such_dataset'"):
        read("tfds:no_such_dataset:train", tfds_data_dir=tfds_dir)
    with pytest.raises(DataError, match=r"tfds tiny_docs split train record \d+: record has no"):
        read("tfds:tiny_docs:train#meta.missing", tfds_data_dir=tfds_dir)


# ---------------------------------------------------------------------------------------------
# Mixtures and fingerprints
# ---------------------------------------------------------------------------------------------


def test_mixture_reads_sources_in_order(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo\n")
    (tmp_path / "b.jsonl").write_text('{"t": "three"}\n')
    specs = sources.parse_sources(
        "text:{data_root}/a.txt@2; jsonl:{data_root}/b.jsonl#t@1", str(tmp_path)
    )
    stats = SourceStats()
    assert list(sources.read_all_documents(specs, stats)) == ["one", "two", "three"]
    assert (stats.documents, stats.files) == (3, 2)


def test_fingerprint_tracks_file_changes(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello\n")
    (source,) = sources.parse_sources(f"text:{tmp_path}/*.txt")
    first = sources.fingerprint(source)
    assert sources.fingerprint(source) == first
    st = path.stat()
    path.write_text("jello\n")  # same size ...
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # ... newer mtime
    second = sources.fingerprint(source)
    assert second != first
    (tmp_path / "a.index.jsonl").write_text('{"byte_start": 0, "byte_end": 5}\n')
    assert sources.fingerprint(source) != second
    (tmp_path / "b.txt").write_text("another file\n")
    assert len({first, second, sources.fingerprint(source)}) == 3
    assert sources.fingerprint(sources.parse_sources("stdlib:train")[0]) != sources.fingerprint(
        sources.parse_sources("stdlib:validation")[0]
    )


def test_shared_pretrain_index_matches_documents(shared_data):
    docs, stats = read("text:{data_root}/pretrain/botchan/train.txt", str(shared_data))
    data = (shared_data / "pretrain/botchan/train.txt").read_bytes()
    entries = [
        json.loads(line) for line in (shared_data / "pretrain/botchan/train.index.jsonl").open()
    ]
    assert docs == [data[e["byte_start"] : e["byte_end"]].decode() for e in entries]
    assert stats.documents == len(entries) == 2
