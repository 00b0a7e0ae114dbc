"""One writer for every file genlab writes: complete or absent, whoever else writes the path."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from genlab.io import atomic_file, atomic_folder, copy_file_atomic, write_json_atomic


def test_two_writers_of_one_file_never_leave_a_reader_a_torn_file(tmp_path: Path) -> None:
    """Two writers (as every DDP rank once wrote metrics/evaluator.json) and a reader: each read
    is one writer's whole document, and no temporary file is left behind."""
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"writer": -1, "payload": []})
    documents = {w: {"writer": w, "payload": list(range(w, 40_000 + w))} for w in (0, 1)}
    failures: list[BaseException] = []
    done = threading.Event()

    def write(writer: int) -> None:
        try:
            for _ in range(60):
                write_json_atomic(path, documents[writer])
        except BaseException as exc:  # a failed write is a failure of the test
            failures.append(exc)

    def read() -> None:
        while not done.is_set():
            doc = json.loads(path.read_text())  # raises on a torn file
            if doc["writer"] >= 0 and doc != documents[doc["writer"]]:
                failures.append(AssertionError(f"a mixed document from writer {doc['writer']}"))

    writers = [threading.Thread(target=write, args=(w,)) for w in (0, 1)]
    reader = threading.Thread(target=read)
    reader.start()
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    done.set()
    reader.join()
    assert failures == []
    assert json.loads(path.read_text()) in documents.values()
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]


def test_a_write_that_fails_leaves_the_old_file_and_no_temporary_file(tmp_path: Path) -> None:
    path = tmp_path / "model.ckpt"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="disk full"), atomic_file(path) as f:
        f.write(b"half of the new")
        raise RuntimeError("disk full")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ckpt"]


def test_copy_makes_the_folder_and_copies_whole(tmp_path: Path) -> None:
    source = tmp_path / "best.ckpt"
    source.write_bytes(bytes(range(256)) * 1000)
    copy_file_atomic(source, tmp_path / "model" / "model.ckpt")
    assert (tmp_path / "model" / "model.ckpt").read_bytes() == source.read_bytes()


def test_a_folder_is_replaced_whole_or_not_at_all(tmp_path: Path) -> None:
    folder = tmp_path / "grids"
    with atomic_folder(folder) as new:
        (new / "a.png").write_bytes(b"first")
    with pytest.raises(RuntimeError, match="killed"), atomic_folder(folder) as new:
        (new / "b.png").write_bytes(b"half")
        raise RuntimeError("killed")
    assert [p.name for p in folder.iterdir()] == ["a.png"]  # the old folder, untouched
    with atomic_folder(folder) as new:
        (new / "b.png").write_bytes(b"second")
    assert [p.name for p in folder.iterdir()] == ["b.png"]  # nothing of the old one mixed in
    assert [p.name for p in tmp_path.iterdir()] == ["grids"]  # no temporary folder left


@pytest.mark.parametrize("umask", [0o002, 0o022, 0o077])
def test_outputs_get_the_permissions_the_umask_gives_a_new_file(tmp_path: Path, umask: int) -> None:
    """A written file and a swapped-in folder get what `open(path, "w")` and `mkdir` would give
    them under the process's umask, not the temporary file's private 0o600: a team sharing a
    project folder (umask 002) reads and updates each other's outputs. In a process of its own
    that sets the umask before genlab reads it."""
    code = (
        "import os, sys\n"
        "os.umask(int(sys.argv[2], 8))  # before genlab.io reads it\n"
        "from pathlib import Path\n"
        "from genlab.io import atomic_folder, copy_file_atomic, write_text_atomic\n"
        "root = Path(sys.argv[1])\n"
        "write_text_atomic(root / 'a.json', '{}')\n"
        "copy_file_atomic(root / 'a.json', root / 'b.ckpt')\n"
        "with atomic_folder(root / 'grids') as tmp:\n"
        "    (tmp / 'x.png').write_bytes(b'png')\n"
        "(root / 'plain').write_text('')\n"
        "(root / 'plain_dir').mkdir()\n"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path), oct(umask)], check=True)

    def mode(name: str) -> int:
        return stat.S_IMODE((tmp_path / name).stat().st_mode)

    assert mode("a.json") == mode("b.ckpt") == mode("plain") == 0o666 & ~umask
    assert mode("grids") == mode("plain_dir") == 0o777 & ~umask
