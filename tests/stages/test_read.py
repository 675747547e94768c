import hashlib
import io

from pipeline import schema as S
from pipeline.exclusions import load_exclusions
from pipeline.io.sidecar import read_sidecar
from pipeline.io.tar_reader import read_tar
from pipeline.stages.read import join_shard, read_shard_rows, to_table
from tests.tarfiles import make_sidecar, make_tar, sidecar_row


def _rows(tar_bytes, sidecar_rows=None):
    tar = read_tar(io.BytesIO(tar_bytes)) if tar_bytes is not None else None
    sidecar = read_sidecar(io.BytesIO(make_sidecar(sidecar_rows))) if sidecar_rows is not None else None
    return {r[S.KEY]: r for r in join_shard(tar, None if tar_bytes is not None else "no tar", sidecar, None)}


def test_captions_come_from_the_sidecar_and_failed_downloads_get_their_own_rows():
    rows = _rows(make_tar([("000.jpg", b"J"), ("000.txt", b"tar caption")]),
                 [sidecar_row("000", caption="sidecar caption"), sidecar_row("001", status="failed_to_download")])
    assert rows["000"][S.CAPTION] == "sidecar caption"
    assert rows["000"][S.STATUS] == "ok" and rows["000"][S.ORIGINAL_WIDTH] == 640
    assert rows["001"][S.STATUS] == S.Status.DOWNLOAD_FAILED.value
    assert "404" in rows["001"][S.ERROR]
    assert rows["001"][S.DOWNLOAD_STATUS] == "failed_to_download"


def test_without_a_sidecar_the_caption_comes_from_the_txt_member_even_if_not_utf8():
    rows = _rows(make_tar([("a.jpg", b"J"), ("a.txt", b"caf\xe9")]))
    assert rows["a"][S.CAPTION] == "caf\ufffd"


def test_a_sample_without_image_and_a_sidecar_success_without_sample_are_both_no_image():
    rows = _rows(make_tar([("a.txt", b"only a caption")]), [sidecar_row("b")])
    assert rows["a"][S.STATUS] == rows["b"][S.STATUS] == S.Status.NO_IMAGE.value


def test_broken_json_member_is_a_warning_and_the_image_is_still_scored():
    rows = _rows(make_tar([("a.jpg", b"J"), ("a.json", b"{not json")]))
    assert rows["a"][S.STATUS] == "ok"
    assert rows["a"][S.ERROR].startswith("warning: json member is not valid JSON")


def test_an_unreadable_tar_with_a_sidecar_names_every_sidecar_key():
    rows = _rows(b"garbage" * 200, [sidecar_row("a"), sidecar_row("b", status="failed_to_download")])
    assert rows["a"][S.STATUS] == S.Status.SHARD_ERROR.value
    assert rows["b"][S.STATUS] == S.Status.DOWNLOAD_FAILED.value
    assert len(rows) == 2


def test_an_unreadable_tar_without_sidecar_is_one_row_naming_the_shard():
    rows = _rows(b"")
    assert list(rows) == [S.SHARD_ROW_KEY]
    assert rows[S.SHARD_ROW_KEY][S.STATUS] == S.Status.SHARD_ERROR.value


def test_an_empty_but_valid_tar_is_still_one_row():
    rows = _rows(make_tar([]))
    assert rows[S.SHARD_ROW_KEY][S.ERROR] == "shard has no samples"


def test_a_sidecar_without_its_tar_reports_every_key(tmp_path):
    sidecar = tmp_path / "00007.parquet"
    sidecar.write_bytes(make_sidecar([sidecar_row("a"), sidecar_row("b", status="failed_to_download")]))
    rows = {r[S.KEY]: r for r in read_shard_rows(None, str(sidecar))}
    assert rows["a"][S.STATUS] == S.Status.SHARD_ERROR.value and "no tar" in rows["a"][S.ERROR]
    assert rows["b"][S.STATUS] == S.Status.DOWNLOAD_FAILED.value


def test_unscored_image_formats_say_so():
    rows = _rows(make_tar([("a.gif", b"GIF89a")]))
    assert rows["a"][S.STATUS] == S.Status.UNSUPPORTED_FORMAT.value


def test_to_table_counts_the_shard_rows():
    table = to_table(join_shard(read_tar(io.BytesIO(make_tar([("a.jpg", b"1"), ("b.jpg", b"2")]))), None, None, None),
                     "s.tar", "u")
    assert table[S.SHARD_ROWS].to_pylist() == [2, 2]
    assert table[S.UNIT].to_pylist() == ["u", "u"]


def test_every_image_gets_the_sha256_of_its_bytes_and_rows_without_one_none():
    rows = _rows(make_tar([("a.jpg", b"JPEG-A"), ("b.txt", b"caption only")]))
    assert rows["a"][S.IMAGE_SHA256] == hashlib.sha256(b"JPEG-A").hexdigest()
    assert rows["b"][S.IMAGE_SHA256] is None


def test_listed_images_and_urls_are_excluded_and_keep_their_rows(tmp_path):
    tar = tmp_path / "00000.tar"
    tar.write_bytes(make_tar([("a.jpg", b"JPEG-A"), ("b.jpg", b"JPEG-B"), ("c.jpg", b"JPEG-C")]))
    sidecar = tmp_path / "00000.parquet"
    sidecar.write_bytes(make_sidecar([sidecar_row("a", url="http://x/a.jpg"), sidecar_row("b", url="http://x/b.jpg"),
                                      sidecar_row("c", url="http://x/c.jpg"),
                                      sidecar_row("d", url="http://x/d.jpg", status="failed_to_download")]))
    listed = tmp_path / "list.txt"
    listed.write_text(f"{hashlib.sha256(b'JPEG-A').hexdigest()}\n{hashlib.md5(b'http://x/d.jpg').hexdigest()}\n")

    rows = {r[S.KEY]: r for r in read_shard_rows(str(tar), str(sidecar), exclusions=load_exclusions(str(listed)))}

    assert {k: r[S.STATUS] for k, r in rows.items()} == {"a": "excluded", "b": "ok", "c": "ok", "d": "excluded"}
    assert rows["a"][S.IMAGE] is None and rows["a"][S.ERROR] == "on the exclusion list (image sha256; was ok)"
    assert rows["d"][S.ERROR] == "on the exclusion list (url md5; was download_failed)"
    assert rows["b"][S.IMAGE] == b"JPEG-B"
