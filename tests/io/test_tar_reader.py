import io

from pipeline.io.tar_reader import read_tar, split_key
from tests.tarfiles import make_tar


def test_members_of_one_key_form_one_sample_even_when_not_adjacent():
    data = make_tar([("a.jpg", b"A"), ("b.jpg", b"B"), ("a.txt", b"cap a"), ("b.txt", b"cap b")])
    contents = read_tar(io.BytesIO(data))
    assert list(contents.samples) == ["a", "b"]
    assert contents.samples["a"].text == b"cap a" and contents.samples["a"].image == b"A"
    assert contents.error is None


def test_offset_and_size_locate_the_image_bytes_in_the_tar():
    data = make_tar([("k1.txt", b"x" * 700), ("k1.png", b"PNGDATA" * 100), ("k2.webp", b"W" * 3)])
    contents = read_tar(io.BytesIO(data))
    for sample in contents.samples.values():
        assert data[sample.image_offset: sample.image_offset + sample.image_size] == sample.image
    assert contents.samples["k1"].image_format == "png"


def test_webdataset_key_rule_keeps_folders_and_cuts_at_the_first_dot():
    assert split_key("dir/000.seg.jpg") == ("dir/000", "seg.jpg")
    assert split_key("../../evil.JPG") == ("../../evil", "jpg")
    assert split_key("noext") is None


def test_duplicate_image_members_keep_the_first_and_say_so():
    contents = read_tar(io.BytesIO(make_tar([("a.jpg", b"1"), ("a.jpg", b"2")])))
    sample = contents.samples["a"]
    assert sample.image == b"1"
    assert "ignored" in sample.notes[0]


def test_a_file_that_is_not_a_tar_is_an_error_not_an_exception():
    contents = read_tar(io.BytesIO(b"this is not a tar at all" * 40))
    assert contents.samples == {}
    assert "not a readable tar" in contents.error or "tar ends badly" in contents.error


def test_an_empty_file_is_an_error():
    assert read_tar(io.BytesIO(b"")).error


def test_a_truncated_tar_keeps_the_samples_before_the_cut():
    data = make_tar([("a.jpg", b"A" * 600), ("b.jpg", b"B" * 5000)])
    contents = read_tar(io.BytesIO(data[:2500]))
    assert contents.samples["a"].image == b"A" * 600
    assert contents.error is not None or contents.samples["b"].error is not None
    assert contents.samples.get("b") is None or contents.samples["b"].image is None
