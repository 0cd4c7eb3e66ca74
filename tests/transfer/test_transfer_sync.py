"""A sync reproduces the source tree at the destination, rsync-style."""

import os
import time

from .conftest import CHUNK, assert_same_tree, make_tree, run_sender, spec_for, tree_state, write


def test_a_sync_makes_the_trees_identical(roots, receiver):
    src, _ = roots
    make_tree(src)
    result = run_sender(spec_for(receiver, src))
    assert_same_tree(src, receiver.dst)
    assert (receiver.dst / "links" / "outside").is_symlink()
    assert os.readlink(receiver.dst / "links" / "outside") == "/etc/hostname"
    assert os.readlink(receiver.dst / "links" / "dir-link") == "../big"
    total = sum(p.stat().st_size for p in src.rglob("*") if p.is_file() and not p.is_symlink())
    assert result.report["bytes_sent"] == total
    assert result.progress, "progress lines were printed"
    last = result.progress[-1]
    assert set(last) >= {"bytes_done", "bytes_total", "files_done", "files_total", "rate"}
    assert last["bytes_done"] == last["bytes_total"] == total


def test_a_second_run_with_nothing_changed_sends_no_file_data(roots, receiver):
    src, _ = roots
    make_tree(src, small_files=300)
    run_sender(spec_for(receiver, src))
    again = run_sender(spec_for(receiver, src))
    assert again.report["bytes_sent"] == 0
    assert again.report["files_sent"] == 0
    assert again.report["files_skipped"] > 300
    assert_same_tree(src, receiver.dst)


def test_changed_files_and_modes_are_updated(roots, receiver):
    src, _ = roots
    make_tree(src, small_files=50)
    run_sender(spec_for(receiver, src))
    write(src / "edge" / "chunk", os.urandom(CHUNK), mtime=1_200_000_000)
    (src / "modes" / "private").chmod(0o640)  # mode only: no data needs to travel
    result = run_sender(spec_for(receiver, src))
    assert result.report["bytes_sent"] == CHUNK
    assert_same_tree(src, receiver.dst)


def test_delete_removes_extraneous_files_but_not_excluded_ones(roots, receiver):
    src, _ = roots
    make_tree(src, small_files=20)
    run_sender(spec_for(receiver, src))
    write(receiver.dst / "extra.txt", b"x")
    write(receiver.dst / "extra-dir" / "deep" / "file", b"y")
    write(receiver.dst / "keep.log", b"excluded, so kept")
    plain = run_sender(spec_for(receiver, src, exclude=["*.log"]))
    assert plain.report["files_deleted"] == 0 and (receiver.dst / "extra.txt").exists()
    result = run_sender(spec_for(receiver, src, delete=True, exclude=["*.log"]))
    assert result.report["files_deleted"] == 4  # extra.txt, extra-dir, deep, file
    assert not (receiver.dst / "extra.txt").exists() and not (receiver.dst / "extra-dir").exists()
    assert (receiver.dst / "keep.log").exists()
    (receiver.dst / "keep.log").unlink()
    run_sender(spec_for(receiver, src))  # puts back the top directory's mtime we just changed
    assert_same_tree(src, receiver.dst)


def test_a_directory_replaces_a_file_and_back_with_delete(roots, receiver):
    src, _ = roots
    write(src / "thing" / "inside", b"1")
    write(src / "other", b"2")
    write(receiver.dst / "thing", b"a file where a directory goes")
    (receiver.dst / "other" / "sub").mkdir(parents=True)
    write(receiver.dst / "other" / "sub" / "f", b"a tree where a file goes")
    run_sender(spec_for(receiver, src, delete=True))
    assert_same_tree(src, receiver.dst)


def test_dry_run_reports_and_changes_nothing(roots, receiver):
    src, _ = roots
    make_tree(src, small_files=10)
    write(receiver.dst / "stale", b"x")
    before = tree_state(receiver.dst)
    result = run_sender(spec_for(receiver, src, dry_run=True, delete=True))
    assert tree_state(receiver.dst) == before
    would = result.report["would"]
    assert "delete stale" in would
    assert "send big/huge.bin" in would and "send links/outside" in would
    assert result.report["bytes_sent"] == 0


def test_exclude_follows_rsync_rules(roots, receiver):
    src, _ = roots
    write(src / "keep.txt", b"k")
    write(src / "skip.tmp", b"s")
    write(src / "a" / "skip.tmp", b"s")
    write(src / "a" / "build" / "out.o", b"o")
    write(src / "b" / "build", b"a file named build is kept by 'build/'")
    write(src / "c" / "d" / "e.txt", b"e")
    write(src / "top.txt", b"anchored")
    write(src / "c" / "top.txt", b"not anchored")
    run_sender(spec_for(receiver, src, exclude=["*.tmp", "build/", "c/d", "/top.txt"]))
    got = {p.relative_to(receiver.dst).as_posix() for p in receiver.dst.rglob("*")}
    assert got == {"keep.txt", "a", "b", "b/build", "c", "c/top.txt"}


def test_checksum_mode_compares_content(roots, receiver):
    src, _ = roots
    write(src / "same-size", b"aaaa", mtime=1_300_000_000)
    run_sender(spec_for(receiver, src))
    write(receiver.dst / "same-size", b"bbbb", mtime=1_300_000_000)  # same size and mtime, other content
    assert run_sender(spec_for(receiver, src)).report["bytes_sent"] == 0
    assert run_sender(spec_for(receiver, src, checksum=True)).report["bytes_sent"] == 4
    assert (receiver.dst / "same-size").read_bytes() == b"aaaa"
    assert run_sender(spec_for(receiver, src, checksum=True)).report["bytes_sent"] == 0


def test_bwlimit_caps_the_rate(roots, receiver):
    src, _ = roots
    write(src / "f.bin", os.urandom(6 * CHUNK))
    t0 = time.monotonic()
    run_sender(spec_for(receiver, src, bwlimit=4 * CHUNK))  # 1.5 s worth of data at this rate
    assert time.monotonic() - t0 >= 1.2
    assert_same_tree(src, receiver.dst)


def test_a_single_file_source_lands_in_the_destination_directory(roots, receiver):
    src, _ = roots
    write(src / "dir" / "one.bin", os.urandom(3 * CHUNK + 5))
    run_sender(spec_for(receiver, src, src_path="dir/one.bin", delete=True))
    assert (receiver.dst / "one.bin").read_bytes() == (src / "dir" / "one.bin").read_bytes()


def _compiled_code_refused(monkeypatch, destination) -> list:
    """The compiled writer meets the same refusal at every file it starts (it returns where it started)."""
    calls = []

    def refused(dfd, names, name_off, data, data_off, modes, chmod, owners, mtimes, skip, start, stop, work):
        calls.append(start)
        return start

    monkeypatch.setattr(destination.batchio, "publish_run", refused)
    return calls


def test_without_unnamed_temporaries_files_go_through_named_ones(roots, receiver, monkeypatch):
    from cm.transfer import destination

    monkeypatch.setattr(destination, "_UNNAMED", os.O_RDWR)  # opening "." read-write fails with EISDIR
    _compiled_code_refused(monkeypatch, destination)
    src, _ = roots
    make_tree(src, small_files=30)
    run_sender(spec_for(receiver, src))
    assert_same_tree(src, receiver.dst)


def test_when_proc_cannot_link_unnamed_files_they_are_copied(roots, receiver, monkeypatch):
    from cm.transfer import destination

    real_link = os.link

    def no_proc_link(src, dst, *args, **kwargs):
        if str(src).startswith("/proc/"):
            raise PermissionError("no /proc linking here")
        return real_link(src, dst, *args, **kwargs)

    monkeypatch.setattr(destination.os, "link", no_proc_link)
    _compiled_code_refused(monkeypatch, destination)
    src, _ = roots
    make_tree(src, small_files=30)
    run_sender(spec_for(receiver, src))
    assert_same_tree(src, receiver.dst)


def test_an_empty_directory_where_a_file_goes_is_replaced_without_delete(roots, receiver):
    src, _ = roots
    write(src / "was-a-dir", b"now a file")
    write(src / "big-was-a-dir", os.urandom(3 * CHUNK))
    os.symlink("target", src / "link-was-a-dir")
    for name in ("was-a-dir", "big-was-a-dir", "link-was-a-dir"):
        (receiver.dst / name).mkdir(parents=True)
    write(receiver.dst / "kept" / "file", b"not in the source, kept without --delete")
    run_sender(spec_for(receiver, src))
    assert (receiver.dst / "was-a-dir").read_bytes() == b"now a file"
    assert (receiver.dst / "big-was-a-dir").read_bytes() == (src / "big-was-a-dir").read_bytes()
    assert os.readlink(receiver.dst / "link-was-a-dir") == "target"
    assert (receiver.dst / "kept" / "file").exists()


def test_names_that_are_not_utf8_are_copied_byte_for_byte(roots, receiver):
    src, _ = roots
    raw = os.fsencode(src) + b"/caf\xe9 \xff.bin"  # Latin-1 bytes: not valid UTF-8
    with open(raw, "wb") as f:
        f.write(b"bytes")
    os.symlink(b"target-\xfe", os.fsencode(src) + b"/link-\xfe")
    run_sender(spec_for(receiver, src))
    assert_same_tree(src, receiver.dst)
    again = run_sender(spec_for(receiver, src))
    assert again.report["bytes_sent"] == 0 and again.report["files_sent"] == 0
