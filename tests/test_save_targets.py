"""``trace.save`` writes regular files only (issue 24, items 1 and 9), and ``plot -o`` says what it wrote.

As root (common in containers) ``trace.save(os.devnull)`` or ``demo --save /dev/stdout`` renamed a
regular file over the device. Every device node here is made with ``os.mknod`` in the test's own
temporary folder (we run as root where it is allowed), every FIFO with ``os.mkfifo``: the real /dev is
never touched.
"""
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading

import pytest

import gradtrace
from gradtrace import GradtraceError, cli, storage
from test_storage import make_trace
from test_typed_records import LEGACY as FIXTURE

CAN_MKNOD = hasattr(os, "geteuid") and os.geteuid() == 0


@pytest.fixture(scope="module")
def trace():
    return make_trace()


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def save_with_a_deadline(trace, path, seconds=20):
    """save() in a thread: opening a FIFO for writing would block forever, and the test must say so."""
    outcome = {}

    def run():
        try:
            trace.save(path)
            outcome["saved"] = True
        except BaseException as e:  # noqa: BLE001  (handed to the test)
            outcome["error"] = e

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), "save() blocked (it opened the FIFO)"
    if "error" in outcome:
        raise outcome["error"]
    return outcome


def make_node(path, kind):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "character device":
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # the numbers of /dev/null, in our own folder
    elif kind == "block device":
        os.mknod(path, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        return sock
    elif kind == "folder":
        os.mkdir(path)
    return None


KINDS = ["fifo", "socket", "folder",
         pytest.param("character device", marks=pytest.mark.skipif(not CAN_MKNOD, reason="mknod needs root")),
         pytest.param("block device", marks=pytest.mark.skipif(not CAN_MKNOD, reason="mknod needs root"))]
WORDS = {"fifo": "a FIFO", "socket": "a socket", "folder": "a folder", "character device": "a character device",
         "block device": "a block device"}
CHECK = {"fifo": stat.S_ISFIFO, "socket": stat.S_ISSOCK, "folder": stat.S_ISDIR, "character device": stat.S_ISCHR,
         "block device": stat.S_ISBLK}


@pytest.mark.parametrize("kind", KINDS)
def test_save_refuses_what_is_not_a_regular_file(tmp_path, trace, kind):
    """Regression: a device (or any non-regular file) at the path was renamed over with the trace."""
    path = tmp_path / "target"
    keep = make_node(path, kind)
    with pytest.raises(GradtraceError, match=f": it is {WORDS[kind]}, not a regular file"):
        save_with_a_deadline(trace, path)
    assert CHECK[kind](os.lstat(path).st_mode), "the node was replaced"
    assert leftovers(tmp_path) == []
    if keep is not None:
        keep.close()


@pytest.mark.parametrize("kind", KINDS)
def test_save_refuses_a_symlink_to_what_is_not_a_regular_file(tmp_path, trace, kind):
    """Regression: a symlink to /proc/self/fd/1 (a terminal or pipe) was replaced by a regular file."""
    node = tmp_path / "node"
    keep = make_node(node, kind)
    link = tmp_path / "trace.json"
    link.symlink_to(node)
    with pytest.raises(GradtraceError, match=f": it is a symlink to {WORDS[kind]}, not a regular file"):
        save_with_a_deadline(trace, link)
    assert link.is_symlink() and CHECK[kind](os.stat(link).st_mode)
    assert leftovers(tmp_path) == []
    if keep is not None:
        keep.close()


def test_save_refuses_proc_self_fd_1_when_stdout_is_a_pipe(tmp_path):
    """Regression: a symlink to /proc/self/fd/1 was renamed over. In a child whose stdout is a pipe."""
    script = ("import gradtrace, sys\n"
              f"trace = gradtrace.load({str(FIXTURE)!r})\n"
              "try:\n    trace.save('/proc/self/fd/1')\n"
              "except gradtrace.GradtraceError as e:\n    sys.exit(str(e))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "'/proc/self/fd/1': it is a symlink to a FIFO, not a regular file" in proc.stderr


def test_save_writes_through_a_symlink_to_a_regular_file(tmp_path, trace):
    """Documented: the file the link names is replaced (atomically, in its own folder); the link stays."""
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "trace.json"
    target.write_text("old")
    os.chmod(target, 0o640)
    link = tmp_path / "latest.json"
    link.symlink_to(target)
    trace.save(link)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert json.loads(target.read_text())["format"] == "gradtrace-trace"
    assert stat.S_IMODE(os.stat(target).st_mode) == 0o640  # the replaced file keeps its mode
    assert leftovers(tmp_path) == [] and leftovers(tmp_path / "real") == []
    assert gradtrace.load(link).report() == trace.report()


def test_save_refuses_a_dangling_symlink(tmp_path, trace):
    link = tmp_path / "t.json"
    link.symlink_to(tmp_path / "nowhere" / "t.json")
    with pytest.raises(GradtraceError, match="is a symlink to a missing file"):
        trace.save(link)
    assert link.is_symlink() and not (tmp_path / "nowhere").exists()


def test_save_never_renames_over_a_node_that_appears_while_it_writes(tmp_path, trace, monkeypatch):
    """The check is made again right before the rename: a FIFO made at the path meanwhile is kept."""
    path = tmp_path / "t.json"
    real_dump = json.dump

    def dump_then_plant(data, f, **kwargs):
        real_dump(data, f, **kwargs)
        os.mkfifo(path)

    monkeypatch.setattr(storage.json, "dump", dump_then_plant)
    with pytest.raises(GradtraceError, match="it is a FIFO, not a regular file"):
        trace.save(path)
    assert stat.S_ISFIFO(os.lstat(path).st_mode) and leftovers(tmp_path) == []


def test_save_replaces_a_regular_file_and_creates_a_new_one(tmp_path, trace):
    (tmp_path / "old.json").write_text("{}")
    trace.save(tmp_path / "old.json")
    trace.save(tmp_path / "new.json")
    assert gradtrace.load(tmp_path / "old.json").report() == gradtrace.load(tmp_path / "new.json").report()


@pytest.mark.parametrize("path, message", [
    (3, r"trace.save\(path\) takes a file name \(str or os.PathLike\), got int"),
    (None, r"got NoneType"),
    ("a\0b.json", r"is not a usable file name \(it holds a NUL character\)"),
    ("", r"is not a usable file name \(it is empty\)"),
])
def test_save_refuses_what_is_not_a_file_name(trace, path, message):
    """Regression: save(3) raised TypeError, save('a\\0b') ValueError."""
    with pytest.raises(GradtraceError, match=message):
        trace.save(path)


@pytest.mark.parametrize("path", [3, "a\0b.json", b"x\0y", ""])
def test_load_refuses_what_is_not_a_file_name(path):
    with pytest.raises(GradtraceError, match="gradtrace.load"):
        gradtrace.load(path)


@pytest.mark.slow  # runs the demo probe
def test_demo_save_to_a_fifo_exits_2(tmp_path, capsys):
    """`demo --save /dev/stdout` as root would have replaced the device; a FIFO stands in for it here."""
    fifo = tmp_path / "stdout"
    os.mkfifo(fifo)
    assert cli.main(["demo", "--bug", "tiny_lr", "--save", str(fifo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gradtrace: error: cannot write trace to") and "it is a FIFO" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)


def test_plot_prints_the_file_it_wrote(tmp_path, capsys):
    """Regression: `plot -o out` wrote out.png but printed `wrote out`."""
    pytest.importorskip("matplotlib")
    make_trace().save(tmp_path / "t.json")
    for given, written in (("out", "out.png"), ("fig.svg", "fig.svg"), ("dots.", "dots.png")):
        assert cli.main(["plot", str(tmp_path / "t.json"), "-o", str(tmp_path / given)]) == 0
        assert capsys.readouterr().out == f"wrote {tmp_path / written}\n"
        assert (tmp_path / written).stat().st_size > 0
    assert not (tmp_path / "out").exists()
