"""Paths are confined to their data root, lexically and on disk."""

import os

import pytest

from cm.transfer.paths import DirHandles, PathEscape, check_lexical, confine, wire_parts


@pytest.mark.parametrize("rel, expected", [
    ("", ""), ("/", ""), ("a/b", "a/b"), ("/a//b/", "a/b"), ("./a/./b", "a/b"), ("a/../b", "b"), ("a/b/..", "a"),
])
def test_lexical_normalisation(rel, expected):
    assert check_lexical(rel) == expected


@pytest.mark.parametrize("rel", ["..", "/..", "../etc", "/../../etc/passwd", "a/../../b", "a\0b"])
def test_lexical_escapes_are_refused(rel):
    with pytest.raises(PathEscape):
        check_lexical(rel)


def test_confine_resolves_inside_the_root(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    os.symlink("a/b", tmp_path / "inner")
    assert confine(tmp_path, "/") == tmp_path.resolve()
    assert confine(tmp_path, "/a/b") == (tmp_path / "a" / "b").resolve()
    assert confine(tmp_path, "inner/new/deeper") == (tmp_path / "a" / "b" / "new" / "deeper").resolve()


def test_confine_refuses_symlinks_leading_out(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "a" / "out")
    os.symlink("../../outside", root / "a" / "rel-out")
    for rel in ("a/out", "a/out/x", "a/rel-out/x", "../outside", "/../outside"):
        with pytest.raises(PathEscape):
            confine(root, rel)


@pytest.mark.parametrize("path", ["/abs", "../x", "a/../b", "a//b", "./a", "a\0b"])
def test_peer_paths_must_be_plain_relative(path):
    with pytest.raises(PathEscape):
        wire_parts(path)


def test_dir_handles_never_follow_symlinks(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "real" / "link")
    handles = DirHandles(tmp_path.resolve(), ("real",))
    try:
        handles.open(("made", "here"), create=True)
        assert (tmp_path / "real" / "made" / "here").is_dir()
        with pytest.raises(PathEscape):
            handles.open(("link", "x"), create=True)
        assert not (tmp_path / "elsewhere" / "x").exists()
    finally:
        handles.close()
