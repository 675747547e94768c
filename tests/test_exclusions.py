"""Exclusion lists: digests as Re-LAION publishes them, read strictly, matched against image bytes and URLs."""

from __future__ import annotations

import gzip
import hashlib

import pytest

from pipeline.errors import InputError
from pipeline.exclusions import DigestSet, load_exclusions

IMAGE, URL = b"\xff\xd8 some jpeg bytes", "https://example.com/a.jpg"


def _write(path, text: str):
    path.write_text(text)
    return str(path)


def test_a_list_of_md5_and_sha256_digests_with_comments_and_blank_lines(tmp_path):
    uri = _write(tmp_path / "list.txt", f"# removed 2024-08\n{hashlib.sha256(IMAGE).hexdigest().upper()}\n\n"
                                        f"{hashlib.md5(URL.encode()).hexdigest()}  # a URL\n")
    exclusions = load_exclusions(uri)
    assert len(exclusions) == 2 and exclusions.sha256 == hashlib.sha256(open(uri, "rb").read()).hexdigest()
    assert exclusions.match(IMAGE, None) == "image sha256"
    assert exclusions.match(b"other bytes", URL) == "url md5"
    assert exclusions.match(b"other bytes", "https://example.com/b.jpg") is None
    assert exclusions.match(None, None) is None


def test_image_md5_and_url_sha256_match_too_and_a_gzipped_list_reads_as_text(tmp_path):
    path = tmp_path / "list.txt.gz"
    path.write_bytes(gzip.compress(f"{hashlib.md5(IMAGE).hexdigest()}\n{hashlib.sha256(URL.encode()).hexdigest()}\n"
                                   .encode()))
    exclusions = load_exclusions(str(path))
    assert exclusions.match(IMAGE, None) == "image md5"
    assert exclusions.match(b"x", URL) == "url sha256"


@pytest.mark.parametrize("text, message", [
    ("abc\n", "line 1 is not a hex MD5 (32 digits) or SHA-256 (64 digits): 'abc'"),
    (f"{'a' * 32}\n{'g' * 64}\n", "line 2 is not a hex MD5"),
    ("# nothing but comments\n\n", "the list holds no digests"),
])
def test_a_bad_line_or_an_empty_list_is_one_clear_error(tmp_path, text, message):
    uri = _write(tmp_path / "bad.txt", text)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_exclusions(uri)


def test_a_missing_list_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="no such file"):
        load_exclusions(str(tmp_path / "none.txt"))


def test_digests_ending_in_zero_bytes_are_found():
    digests = [bytes(31) + b"\x01", bytes(32), b"\x01" + bytes(31)]
    found = DigestSet(digests, 32)
    assert all(d in found for d in digests) and bytes(31) + b"\x02" not in found
