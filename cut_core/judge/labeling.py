"""Labeling against the warehouse: `label_pending` judges the pairs not judged yet, caches every
result in `judgments` and logs progress while it runs."""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
from typing import Any, Callable, Iterable, Mapping

from cut_core.data.polarity import POSITIVE
from cut_core.data.warehouse import content_key, judgment_status, store_judgments
from cut_core.judge.protocol import Judge, JudgeResult, log, scrub_result, usage_totals

# ---------------------------------------------------------------- labeling against the warehouse

def _pairs(rows: Iterable[tuple[str, str] | Mapping[str, Any]]) -> list[tuple[str, str]]:
    out = []
    for row in rows:
        if isinstance(row, Mapping):
            out.append((row["instruction"], row["response"]))
        else:
            instruction, response = row
            out.append((instruction, response))
    return out


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class JudgeProgress:
    """Counts judge calls as they finish and reports a line every `every_s` seconds while they run:
    "judge: 120/500 done (3 failed), 4.1 calls/s, ETA 1m32s". Used as a context manager around
    the calls: a daemon thread writes the periodic lines (so a batch whose calls take minutes
    still reports), and leaving the block writes the final line. `report` is any
    callable taking one string (the tasks pass their Prefect logger's info)."""

    def __init__(self, total: int, report: Callable[[str], None], *, every_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.report, self.every_s, self.clock = total, report, every_s, clock
        self.done = self.failed = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.start = clock()

    def add(self, result: JudgeResult) -> None:
        with self._lock:
            self.done += 1
            self.failed += result.status != "ok"

    def line(self) -> str:
        with self._lock:
            done, failed = self.done, self.failed
        elapsed = max(self.clock() - self.start, 1e-9)
        rate = done / elapsed
        eta = _duration((self.total - done) / rate) if rate > 0 else "unknown"
        return f"judge: {done}/{self.total} done ({failed} failed), {rate:.1f} calls/s, ETA {eta}"

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.report(self.line())
            except Exception:  # noqa: BLE001 - a broken log handler must not stop the judging
                log.exception("judge progress report failed")

    def __enter__(self) -> "JudgeProgress":
        self.start = self.clock()
        self._thread = threading.Thread(target=self._run, name="judge-progress", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.report(self.line())


def _takes_on_result(judge: Judge) -> bool:
    try:
        return "on_result" in inspect.signature(judge.judge_batch).parameters
    except (TypeError, ValueError):
        return False


def label_pending(con, judge: Judge, rows: Iterable[tuple[str, str] | Mapping[str, Any]], *,
                  chunk_size: int = 256, retry_failed: bool = True,
                  progress: Callable[[str], None] | None = None,
                  progress_every_s: float = 10.0) -> dict[str, int | None]:
    """Judge every (instruction, response) not yet judged OK by this judge; cache in `judgments`.

    The cache key is (judge.name, content_key(instruction, response)), so a rerun judges nothing
    that already has an OK judgment. Rows whose earlier call *failed* are sent again when
    `retry_failed` (the default): a failure is a missing judgment, not an answer. Results are
    written after every chunk, so an interrupted run keeps what it paid for.

    Counts (distinct pairs): requested, cached (already OK), retried (previously failed, sent
    again), judged (sent to the judge now) = ok + failed; positives + negatives = ok. Token usage
    of the calls made now (cached judgments cost nothing): prompt_tokens and completion_tokens,
    summed over the replies that reported `usage` (None when none did), and usage_unknown, the
    replies that did not (judges that make no HTTP calls report None, None, 0).

    `progress(line)` receives a line every `progress_every_s` seconds while calls run, and one at
    the end (JudgeProgress); a judge whose judge_batch takes `on_result` is counted call by call,
    any other chunk by chunk.
    """
    pairs = list(dict.fromkeys(_pairs(rows)))  # distinct, first-seen order
    keyed = {content_key(i, r): (i, r) for i, r in pairs}
    counts: dict[str, int | None] = dict(requested=len(keyed), cached=0, retried=0, judged=0, ok=0, failed=0,
                                         positives=0, negatives=0, prompt_tokens=None, completion_tokens=None,
                                         usage_unknown=0)
    if not keyed:
        return counts

    status = judgment_status(con, judge.name, list(keyed))
    counts["cached"] = sum(1 for s in status.values() if s == "ok")
    todo = [k for k in keyed if status.get(k) != "ok" and (retry_failed or k not in status)]
    counts["retried"] = sum(1 for k in todo if status.get(k) == "failed")
    if not todo:
        return counts

    tracker = JudgeProgress(len(todo), progress, every_s=progress_every_s) if progress else None
    per_call = tracker is not None and _takes_on_result(judge)
    with tracker if tracker is not None else contextlib.nullcontext():
        _judge_chunks(con, judge, keyed, todo, chunk_size, counts, tracker, per_call)
    return counts


def _judge_chunks(con, judge: Judge, keyed: dict, todo: list[str], chunk_size: int, counts: dict,
                  tracker: JudgeProgress | None, per_call: bool) -> None:
    for start in range(0, len(todo), chunk_size):
        keys = todo[start:start + chunk_size]
        items = [keyed[k] for k in keys]
        results = (judge.judge_batch(items, on_result=tracker.add) if per_call
                   else judge.judge_batch(items))
        if tracker is not None and not per_call:
            for res in results:
                tracker.add(res)
        if len(results) != len(keys):
            raise RuntimeError(f"judge {judge.name} returned {len(results)} results for {len(keys)} items")
        # Judges scrub their own texts; again here, because these are stored.
        results = [scrub_result(r, getattr(judge, "secrets", ())) for r in results]
        _store(con, judge.name, [(k, *keyed[k], res) for k, res in zip(keys, results)])
        counts["judged"] += len(keys)
        for res in results:
            counts["ok" if res.status == "ok" else "failed"] += 1
            if res.status == "ok":
                counts["positives" if res.polarity == POSITIVE else "negatives"] += 1
        usage = usage_totals(results)
        for key in ("prompt_tokens", "completion_tokens"):
            if usage[key] is not None:
                counts[key] = (counts[key] or 0) + usage[key]
        counts["usage_unknown"] += usage["usage_unknown"]


def _store(con, judge_name: str, rows: list[tuple[str, str, str, JudgeResult]]) -> None:
    # A failed result never carries a judgment or polarity into the table, whatever it holds.
    store_judgments(con, judge_name, [
        {"key": key, "instruction": instruction, "response": response,
         "judgment": res.judgment if res.status == "ok" else None,
         "polarity": res.polarity if res.status == "ok" else None,
         "status": "ok" if res.status == "ok" else "failed", "error": res.error, "attempts": res.attempts}
        for key, instruction, response, res in rows])
