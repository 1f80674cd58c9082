"""The file lock shared by data preparation and output folders: exclusive, names its holder, leaves nothing."""
import os
import threading
import time

import pytest

from data import lock as lock_module
from data.lock import LockHeld, file_lock

pytestmark = pytest.mark.skipif(lock_module.fcntl is None, reason="no file locks on this platform")


def test_a_held_lock_refuses_and_names_its_holder(tmp_path):
    path = tmp_path / ".lock"
    with file_lock(path, wait=False):
        assert path.read_text().startswith(f"pid {os.getpid()} on ")
        with pytest.raises(LockHeld) as held:
            with file_lock(path, wait=False):
                pytest.fail("two holders at once")
        assert held.value.holder.startswith(f"pid {os.getpid()} on ")
    assert not path.exists()
    with file_lock(path, wait=False):  # free again
        pass


def test_waiters_take_turns_one_at_a_time(tmp_path):
    """Holders remove the file on release while others wait on it: still never two holders at once."""
    path, inside, most, waits = tmp_path / ".lock", [0], [0], []
    guard = threading.Lock()

    def worker():
        for _ in range(5):
            with file_lock(path, on_wait=waits.append):
                with guard:
                    inside[0] += 1
                    most[0] = max(most[0], inside[0])
                time.sleep(0.002)
                with guard:
                    inside[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert most[0] == 1 and waits  # they did wait for each other, one at a time
    assert not path.exists()
