"""The C++ word tokenizer (csrc/bit_cipher_text.cpp) against the Python loop it replaces.

tokenize_file takes the C++ path when the CPU module is built and no custom
tokenizer is given; the Python path is the contract. Every test runs both on
the same file and asks for the same ids, documents, vocabulary and chunks.
"""

import pickle

import numpy as np
import pytest
import torch

import embkern
from embkern.ops import bit_cipher as bc

pytestmark = pytest.mark.skipif(bc._word_table_type() is None, reason="needs the CPU module (embkern._C)")

# Lines that exercise every rule the two paths must share.
TRICKY = [
    b"Hello, World! hello_world 42 x2\n",
    b"CRLF line\r\n",
    b"lone CR\rnext after CR\n",
    b"double\r\r\n",
    b"\n",
    b"   \t  \n",  # blank (ASCII whitespace)
    b"\x1c\x1d \x1e\x1f\n",  # blank to str.strip() (information separators), no words
    b"\xc2\xa0\n",  # U+00A0 only: blank to str.strip(), not ASCII
    b"...!!! ,,,\n",  # not blank, no words
    "\u00c9T\u00c9 Caf\u00e9 na\u00efve \u0394\u0399\u039f\u03a3 stra\u00dfe\n".encode(),  # Unicode \w and lower()
    "\u0130stanbul \u212a elvin \u2160\u2161\n".encode(),  # lower() that changes length / compatibility forms
    b"bad \xff\xfe utf8 \xe2\x82\n",  # invalid UTF-8 -> U+FFFD (not \w)
    "\ufeffbom first\n".encode(),
    "\u4e2d\u6587 \u65e5\u672c\u8a9e mixed ASCII_words\n".encode(),
    b"\n",
    b"\n",
    b"tail   without   newline",
]


def _both(path, **kw):
    fast = embkern.tokenize_file(path, **kw)
    orig = bc._word_table_type
    bc._word_table_type = lambda: None
    try:
        slow = embkern.tokenize_file(path, **kw)
    finally:
        bc._word_table_type = orig
    return fast, slow


def _same(fast, slow, chunked):
    assert fast[2] == slow[2]
    if chunked:
        a, b = list(fast[0]), list(slow[0])
        assert len(a) == len(b)
        for (ia, oa), (ib, ob) in zip(a, b):
            assert ia.dtype == ib.dtype == torch.int32 and oa.dtype == ob.dtype == torch.int64
            assert torch.equal(ia, ib) and torch.equal(oa, ob)
    else:
        assert fast[0].dtype == slow[0].dtype and fast[1].dtype == slow[1].dtype
        assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("lowercase", [True, False])
@pytest.mark.parametrize("blank_line_docs", [False, True])
@pytest.mark.parametrize("min_count", [1, 2])
def test_tricky_lines_match_the_python_loop(tmp_path, lowercase, blank_line_docs, min_count):
    p = tmp_path / "t.txt"
    p.write_bytes(b"".join(TRICKY * 3))
    fast, slow = _both(p, lowercase=lowercase, blank_line_docs=blank_line_docs, min_count=min_count)
    _same(fast, slow, False)
    assert len(fast[2]) > 10 and fast[0].numel() > 30
    fast, slow = _both(p, lowercase=lowercase, blank_line_docs=blank_line_docs, min_count=min_count,
                       chunk_tokens=7)
    _same(fast, slow, True)


@pytest.mark.parametrize("blank_line_docs", [False, True])
@pytest.mark.parametrize("block", [1, 5, 64])
def test_block_cuts_change_nothing(tmp_path, monkeypatch, blank_line_docs, block):
    # tiny blocks: cuts after every line, inside CRLF pairs' reads, across blank-line documents
    rng = np.random.default_rng(0)
    lines = [TRICKY[i] for i in rng.integers(0, len(TRICKY) - 1, size=300)] + [TRICKY[-1]]
    p = tmp_path / "t.txt"
    p.write_bytes(b"".join(lines))
    ref = _both(p, blank_line_docs=blank_line_docs)[1]
    monkeypatch.setattr(bc, "BLOCK_BYTES", block)
    fast = embkern.tokenize_file(p, blank_line_docs=blank_line_docs)
    _same(fast, ref, False)
    fast_c = embkern.tokenize_file(p, blank_line_docs=blank_line_docs, chunk_tokens=13)
    slow_c = _both(p, blank_line_docs=blank_line_docs, chunk_tokens=13)[1]
    _same(fast_c, slow_c, True)


def test_random_bytes_match(tmp_path):
    # arbitrary bytes (control characters, high bytes, stray CRs): same words and documents
    rng = np.random.default_rng(1)
    alphabet = np.frombuffer(b"abcXYZ019_ \t\r\n\n.,\x0b\x0c\x1c\xc3\xa9\xe2\x80\xa8\xff", dtype=np.uint8)
    p = tmp_path / "r.txt"
    p.write_bytes(alphabet[rng.integers(0, alphabet.size, size=20_000)].tobytes())
    for blank in (False, True):
        fast, slow = _both(p, blank_line_docs=blank)
        _same(fast, slow, False)


def test_empty_and_wordless_files(tmp_path):
    for content in (b"", b"\n\n\r\n", b"... ,,,\n!!\n"):
        p = tmp_path / "e.txt"
        p.write_bytes(content)
        fast, slow = _both(p)
        _same(fast, slow, False)
        assert fast[0].numel() == 0 and fast[1].tolist() == [0] and fast[2] == []


def test_word_table_api():
    T = bc._word_table_type()
    split = bc._LineSplit(True)
    t = T()
    t.count(b"b a b\nc\xc3\xa9 B\n", True, split)
    assert t.words() == ["b", "a", "c\u00e9"] and t.counts().tolist() == [3, 1, 1] and len(t) == 3
    ids, offs = t.encode(b"a zzz b\n\nzzz\nB\n", True, False, split)
    assert ids.tolist() == [1, 0, 0] and offs.tolist() == [0, 2, 3]
    u = pickle.loads(pickle.dumps(t))
    assert u.words() == t.words() and u.counts().tolist() == t.counts().tolist()
    v = T()
    v.add(["x", "y"], [2, 5])
    v.add(["y", "z"])
    assert v.words() == ["x", "y", "z"] and v.counts().tolist() == [2, 5, 0]
    with pytest.raises(TypeError, match="data: expected bytes"):
        t.count("a str", True, split)
    with pytest.raises(TypeError, match="words: expected str"):
        v.add([1])
    with pytest.raises(ValueError, match="counts: expected one count per word"):
        v.add(["q"], [1, 2])
    with pytest.raises(ValueError, match="counts: expected one count per word"):
        v.add(["q", "r"], [1])


def test_split_errors_propagate():
    T = bc._word_table_type()
    t = T()

    def boom(raw):
        raise KeyError("from split")

    with pytest.raises(KeyError, match="from split"):
        t.count(b"ascii ok\n\xc3\xa9\n", True, boom)
    with pytest.raises(RuntimeError, match="split: expected"):
        t.count(b"\xc3\xa9\n", True, lambda raw: (["x"],))
