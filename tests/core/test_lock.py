import fcntl
import os

import pytest

from offroad_seg.core import lock, storage
from offroad_seg.errors import CacheError


def test_lock_excludes_a_second_writer_and_leaves_no_file(tmp_path):
    path = tmp_path / lock.LOCK_NAME
    with lock.writer_lock(tmp_path, "extract"):
        assert path.exists()
        owner = rf"another `offroad-seg extract`.*pid {os.getpid()}"
        with pytest.raises(CacheError, match=owner), lock.writer_lock(tmp_path):
            pass
    assert not path.exists()
    with lock.writer_lock(tmp_path):  # free again
        pass


def test_stale_lock_file_of_a_dead_owner_is_taken(tmp_path):
    # what a SIGKILLed owner leaves: the file with its details, but no kernel lock
    (tmp_path / lock.LOCK_NAME).write_text('{"pid": 1, "host": "h", "since": "s"}')
    with lock.writer_lock(tmp_path):
        pass
    assert not (tmp_path / lock.LOCK_NAME).exists()


def test_waiter_that_locked_a_removed_file_takes_the_new_one(tmp_path, monkeypatch):
    # Race: we open the lock file, its owner unlinks it and releases, another process creates a
    # new file at the path; our flock then succeeds on the orphan. _acquire must notice and
    # lock the file the path names now, or two writers would both hold "the" lock.
    path = tmp_path / lock.LOCK_NAME
    real_flock = fcntl.flock
    replaced = []

    def flock_after_replacement(fd, op):
        if not replaced:
            os.unlink(path)
            path.write_text("")
            replaced.append(os.stat(path).st_ino)
        return real_flock(fd, op)

    monkeypatch.setattr(lock.fcntl, "flock", flock_after_replacement)
    with lock.writer_lock(tmp_path):
        assert os.stat(path).st_ino == replaced[0]
        other = os.open(path, os.O_RDWR)
        try:  # the file the path names is the locked one
            with pytest.raises(BlockingIOError):
                real_flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(other)


def test_cache_size_counts_files_and_tolerates_one_vanishing(tmp_path, monkeypatch):
    # a writer's lock file is removed on release while another rank may be counting bytes
    (tmp_path / "a").mkdir()
    (tmp_path / "zarr.json").write_bytes(b"x" * 10)
    (tmp_path / "a" / "c0").write_bytes(b"y" * 32)
    real_walk = os.walk

    def walk_listing_a_vanished_file(path):
        for root, dirs, files in real_walk(path):
            yield root, dirs, [*files, lock.LOCK_NAME]

    monkeypatch.setattr(storage.os, "walk", walk_listing_a_vanished_file)
    assert storage.bytes_stored(tmp_path, group=None) == 42


def test_a_section_lock_excludes_and_leaves_no_file(tmp_path):
    import threading

    path = tmp_path / ".sweep.lock"
    inside, overlaps = [], []

    def worker() -> None:
        for _ in range(30):
            with lock.section_lock(path):
                overlaps.append(len(inside))
                inside.append(1)
                os.sched_yield()
                inside.pop()

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(overlaps) == 120 and set(overlaps) == {0}  # never two holders at once
    assert not path.exists()
