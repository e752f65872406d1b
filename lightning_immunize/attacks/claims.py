"""Several ``attack`` workers on one storage: each study is claimed by one worker at a time.

A claim is a trial of the study ``claims/<study key>`` in the shared Optuna storage (trial
numbers are handed out by the database, so two workers agree on who claimed first); it holds
while its worker writes a heartbeat at least every :data:`LEASE_SECONDS`. A worker that dies
stops beating and its study is claimed by the next worker that asks, which resumes the study
from what the storage holds — as a single worker resumes after a kill.
"""

from __future__ import annotations

import os
import socket
import threading
import time
import uuid

#: A claim whose last heartbeat is older than this is a dead worker's.
LEASE_SECONDS = 120.0
BEAT_KEY = "heartbeat"


def worker_name() -> str:
    """``host:pid:random`` — unique among the workers of one storage."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def process_alive(worker: str) -> bool:
    """Whether ``worker``'s process may still run: ``False`` only for a worker of this host
    whose process is gone (a killed worker's claim is then taken over at once, not after its
    lease)."""
    host, _, rest = worker.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class StudyClaims:
    """The studies one worker holds on a storage.

    Args:
        storage: an Optuna ``RDBStorage``.
        lease: seconds after which a silent claim is taken over.

    Example:
        >>> import optuna
        >>> store = optuna.storages.InMemoryStorage()
        >>> first, second = StudyClaims(store), StudyClaims(store)
        >>> first.claim("a"), second.claim("a"), second.claim("b")
        (True, False, True)
        >>> first.release("a"); second.claim("a")
        True
        >>> first.close(); second.close()
    """

    def __init__(self, storage, lease: float = LEASE_SECONDS, beat: bool = True) -> None:
        self.storage = storage
        self.lease = lease
        self.worker = worker_name()
        self.held: dict[str, int] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if beat:
            self._thread = threading.Thread(target=self._beat_forever, daemon=True)
            self._thread.start()

    def _study_id(self, key: str) -> int:
        import optuna

        name = f"claims/{key}"
        try:
            return self.storage.get_study_id_from_name(name)
        except KeyError:
            try:
                return self.storage.create_new_study([optuna.study.StudyDirection.MINIMIZE], name)
            except optuna.exceptions.DuplicatedStudyError:
                return self.storage.get_study_id_from_name(name)

    def claim(self, key: str) -> bool:
        """Claim study ``key``; ``True`` when this worker holds it (already, or now)."""
        import optuna

        if key in self.held:
            return True
        study_id = self._study_id(key)
        trial_id = self.storage.create_new_trial(study_id)
        self.storage.set_trial_system_attr(trial_id, BEAT_KEY, time.time())
        self.storage.set_trial_user_attr(trial_id, "worker", self.worker)
        now = time.time()
        running = self.storage.get_all_trials(
            study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)
        )
        live = [t for t in running
                if now - t.system_attrs.get(BEAT_KEY, 0.0) < self.lease
                and process_alive(t.user_attrs.get("worker", ""))]  # fmt: skip
        for t in running:  # a dead worker's claim: closed so that nobody waits for it
            if t not in live and t._trial_id != trial_id:
                self._finish(t._trial_id, optuna.trial.TrialState.FAIL)
        owner = min(live, key=lambda t: t.number)
        if owner._trial_id != trial_id:
            self._finish(trial_id, optuna.trial.TrialState.FAIL)
            return False
        with self._lock:
            self.held[key] = trial_id
        return True

    def release(self, key: str) -> None:
        """Give study ``key`` up (its work done, or this worker stopping)."""
        import optuna

        with self._lock:
            trial_id = self.held.pop(key, None)
        if trial_id is not None:
            self._finish(trial_id, optuna.trial.TrialState.COMPLETE)

    def _finish(self, trial_id: int, state) -> None:
        try:
            values = [0.0] if state.name == "COMPLETE" else None
            self.storage.set_trial_state_values(trial_id, state, values)
        except Exception:  # noqa: BLE001 - another worker closed it first
            pass

    def beat(self) -> None:
        """Renew every held claim."""
        with self._lock:
            held = list(self.held.values())
        for trial_id in held:
            self.storage.set_trial_system_attr(trial_id, BEAT_KEY, time.time())

    def _beat_forever(self) -> None:
        while not self._stop.wait(self.lease / 4):
            try:
                self.beat()
            except Exception:  # noqa: BLE001 - a busy database: the next beat retries
                pass

    def close(self) -> None:
        """Stop beating and release every claim."""
        self._stop.set()
        for key in list(self.held):
            self.release(key)
