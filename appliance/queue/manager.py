"""The queue manager's scheduling parts: when to look at an entry, how many at once.

- ``QueueSettings``: the ``[queue]`` numbers (retry schedule, max_age,
  delay_warning, concurrency, per_domain) plus the retry jitter.
- ``WakeupSchedule``: "look at queue id X at time T" for any number of entries
  with ONE timer: a heap ordered by time, the timer armed for the earliest.
  Thousands of deferred messages cost one DelayedCall, not thousands.
- ``Dispatcher``: starts outbound work while at most ``concurrency`` jobs run
  in all and at most ``per_domain`` per destination domain; waiting jobs of a
  domain run in the order they came, domains take turns so one busy domain
  cannot starve the others.

The QueueRunner (appliance.queue.runner) uses both; neither knows about mail.
"""

import collections
import dataclasses
import heapq
import itertools

from twisted.internet import defer

RETRY_SCHEDULE = (60.0, 300.0, 900.0, 1800.0, 3600.0)   # the last step repeats
JITTER = 0.1          # a retry waits up to 10% longer than its step: no thundering herd


@dataclasses.dataclass(frozen=True)
class QueueSettings:
    """How the queue retries and how much it sends at once.

    ``max_age`` None never expires a recipient; ``delay_warning`` 0 sends no
    "still trying" DSN; ``jitter`` is the fraction by which a retry may be
    later than its step (0 makes the schedule exact).
    """

    retry: tuple = RETRY_SCHEDULE
    max_age: float = None
    delay_warning: float = 0.0
    concurrency: int = 50
    per_domain: int = 5
    jitter: float = 0.0

    def __post_init__(self):
        if not self.retry or any(step <= 0 for step in self.retry):
            raise ValueError("retry needs at least one positive step")
        if self.concurrency < 1 or self.per_domain < 1:
            raise ValueError("concurrency and per_domain must be at least 1")

    @classmethod
    def from_config(cls, cfg):
        q = cfg.queue
        return cls(retry=tuple(q.retry), max_age=q.max_age, delay_warning=q.delay_warning,
                   concurrency=q.concurrency, per_domain=q.per_domain, jitter=JITTER)

    def backoff(self, attempts, random):
        """Seconds to wait after the ``attempts``-th failed attempt (1-based)."""
        step = self.retry[min(max(attempts, 1), len(self.retry)) - 1]
        return step * (1.0 + self.jitter * random())


class WakeupSchedule:
    """Calls ``wake(key)`` at the time last set for ``key``, with one timer.

    ``at(key, when)`` replaces any earlier setting for ``key``. Superseded
    heap items are skipped when they surface (and compacted away when they
    outnumber the live ones), so rescheduling is O(log n).
    """

    def __init__(self, clock, wake):
        self.clock = clock
        self.wake = wake
        self._heap = []                    # (when, seq, key)
        self._live = {}                    # key -> (when, seq)
        self._seq = itertools.count()
        self._timer = None

    def __len__(self):
        return len(self._live)

    def __contains__(self, key):
        return key in self._live

    def when(self, key):
        """The time ``key`` is due, or None."""
        found = self._live.get(key)
        return found[0] if found else None

    def at(self, key, when):
        seq = next(self._seq)
        self._live[key] = (when, seq)
        heapq.heappush(self._heap, (when, seq, key))
        if len(self._heap) > 2 * len(self._live) + 64:
            self._heap = [(w, s, k) for k, (w, s) in self._live.items()]
            heapq.heapify(self._heap)
        self._arm()

    def cancel(self, key):
        if self._live.pop(key, None) is not None:
            self._arm()

    def stop(self):
        """Forget everything and disarm the timer."""
        self._heap.clear()
        self._live.clear()
        self._disarm()

    def _top(self):
        """The earliest live item, dropping superseded ones on the way."""
        while self._heap:
            when, seq, key = self._heap[0]
            if self._live.get(key) == (when, seq):
                return when
            heapq.heappop(self._heap)
        return None

    def _disarm(self):
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _arm(self):
        when = self._top()
        if when is None:
            self._disarm()
            return
        if self._timer is not None and self._timer.active() and \
                self._timer.getTime() == max(when, self.clock.seconds()):
            return
        self._disarm()
        self._timer = self.clock.callLater(max(0.0, when - self.clock.seconds()), self._fire)

    def _fire(self):
        self._timer = None
        now = self.clock.seconds()
        due = []
        while True:
            when = self._top()
            if when is None or when > now:
                break
            _, _, key = heapq.heappop(self._heap)
            del self._live[key]
            due.append(key)
        # Arm first: a wake() that calls at() again finds a consistent schedule.
        self._arm()
        for key in due:
            self.wake(key)


class _Job:
    __slots__ = ("key", "work", "result", "running")

    def __init__(self, key, work):
        self.key = key
        self.work = work
        self.result = defer.Deferred(self._cancel_waiting)
        self.running = None        # the work's Deferred once started

    def _cancel_waiting(self, _deferred):
        if self.running is not None:
            self.running.cancel()


class Dispatcher:
    """Runs ``work()`` callables with a global cap and a cap per key (domain).

    ``submit(key, work)`` returns a Deferred that fires with what ``work()``
    (a Deferred or plain value) produced, once a slot was free and the work
    ended. Cancelling it before the start drops the job; after the start it
    cancels the work's Deferred.
    """

    def __init__(self, concurrency, per_key):
        self.concurrency = concurrency
        self.per_key = per_key
        self.active = 0
        self.active_by_key = collections.Counter()
        self.peak = 0                       # the most jobs ever running at once
        self.peak_by_key = collections.Counter()
        self._waiting = {}                  # key -> deque of _Job
        self._turns = collections.deque()   # keys with waiting jobs and a free slot
        self._in_turns = set()
        self._running = set()
        self.stopped = False

    @property
    def waiting(self):
        return sum(len(jobs) for jobs in self._waiting.values())

    def submit(self, key, work):
        job = _Job(key, work)
        if self.stopped:
            job.result.errback(defer.CancelledError("dispatcher stopped"))
            return job.result
        self._waiting.setdefault(key, collections.deque()).append(job)
        self._offer(key)
        self._dispatch()
        return job.result

    def stop(self):
        """Drop every waiting job and cancel the running ones."""
        self.stopped = True
        waiting, self._waiting = self._waiting, {}
        self._turns.clear()
        self._in_turns.clear()
        for jobs in waiting.values():
            for job in jobs:
                if not job.result.called:
                    job.result.cancel()
        for job in list(self._running):
            job.result.cancel()

    def _offer(self, key):
        """Give ``key`` a turn if it has waiting jobs and a free slot."""
        if key in self._waiting and key not in self._in_turns and \
                self.active_by_key[key] < self.per_key:
            self._turns.append(key)
            self._in_turns.add(key)

    def _dispatch(self):
        while self.active < self.concurrency and self._turns:
            key = self._turns.popleft()
            self._in_turns.discard(key)
            jobs = self._waiting[key]
            job = jobs.popleft()
            if not jobs:
                del self._waiting[key]
            if job.result.called:           # cancelled while waiting
                self._offer(key)
                continue
            self._start(job)
            self._offer(key)

    def _start(self, job):
        self.active += 1
        self.active_by_key[job.key] += 1
        self.peak = max(self.peak, self.active)
        self.peak_by_key[job.key] = max(self.peak_by_key[job.key], self.active_by_key[job.key])
        self._running.add(job)
        job.running = defer.maybeDeferred(job.work)
        job.running.addBoth(self._finished, job)

    def _finished(self, result, job):
        self._running.discard(job)
        self.active -= 1
        self.active_by_key[job.key] -= 1
        if not self.active_by_key[job.key]:
            del self.active_by_key[job.key]
        if not self.stopped:
            self._offer(job.key)
            self._dispatch()
        if job.result.called:
            return None      # cancelled: the caller already has its CancelledError
        job.result.callback(result)     # a Failure goes down the errback chain
        return None
