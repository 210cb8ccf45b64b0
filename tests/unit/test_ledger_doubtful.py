"""A commit that landed although the writer saw it fail (the connection broke after COMMIT reached the server): the
request was answered as failed, so its row must go once the database answers again (found by
tests/integration/test_dependency_faults.py as a usage row for a request answered 503)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from modelmeter import db
from modelmeter.billing import ledger
from modelmeter.billing.ledger import LedgerWriter, UsageRecord


def _ids(engine: Any) -> set[str]:
    with engine.connect() as conn:
        return {r[0] for r in conn.execute(text("SELECT request_id FROM usage_event"))}


def _ledger_db(tmp_path: Path) -> Any:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenant (id, name, email, plan, status, billing_status, created, credits_epoch, "
                          "updated) VALUES ('ten_1', 'T', 't@example.com', 'payg', 'active', 'ok', 0, 0, 0)"))
    return engine


def test_a_row_whose_request_was_answered_as_failed_is_removed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = _ledger_db(tmp_path)
    real = ledger.record_usage
    broken = {"on": True}

    def landed_then_broke(*, session: Any, records: Any, **kw: Any) -> int:
        if not broken["on"]:
            return real(session=session, records=records, **kw)
        with engine.begin() as other:  # the COMMIT reaches the server...
            real(session=other, records=records, **kw)
        # ...but its answer does not come back
        raise OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"))

    monkeypatch.setattr(ledger, "record_usage", landed_then_broke)
    writer = LedgerWriter(db.session_maker(engine))

    async def main() -> None:
        writer.start()
        with pytest.raises(OperationalError):
            await writer.record(UsageRecord("req_doubtful", "ten_1", "m", created=1_790_812_800))
        assert _ids(engine) == {"req_doubtful"}  # billed, though answered as failed
        broken["on"] = False
        await asyncio.sleep(ledger._FAIL_FAST_S)  # past the window in which groups fail without a try
        await writer.record(UsageRecord("req_fine", "ten_1", "m", created=1_790_812_800))
        await writer.close()

    asyncio.run(main())
    assert _ids(engine) == {"req_fine"}
    engine.dispose()


def test_groups_right_after_a_failed_commit_fail_at_once_then_the_next_tries(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A try through a black-holed database costs ~1 s (db.PG_FAIL_FAST): the groups that arrive within
    ``_FAIL_FAST_S`` of a failure are answered failed without one (nothing sent: nothing doubtful), and a slow
    failure is not retried on a new connection (it would only time out again)."""
    engine = _ledger_db(tmp_path)
    tries: list[str] = []
    real = ledger.record_usage
    down = {"on": True}

    def slow_failure(*, session: Any, records: Any, **kw: Any) -> int:
        tries.append(records[0].request_id)
        if down["on"]:
            time.sleep(ledger._RETRY_IF_FAILED_WITHIN_S)
            raise OperationalError("INSERT", {}, Exception("could not receive data from server: timed out"))
        return real(session=session, records=records, **kw)

    monkeypatch.setattr(ledger, "record_usage", slow_failure)
    monkeypatch.setattr(ledger, "_FAIL_FAST_S", 5.0)
    writer = LedgerWriter(db.session_maker(engine))

    async def main() -> None:
        writer.start()
        with pytest.raises(OperationalError):
            await writer.record(UsageRecord("req_1", "ten_1", "m", created=1_790_812_800))
        assert tries == ["req_1"]  # one try: it failed slowly
        with pytest.raises(OperationalError):
            await writer.record(UsageRecord("req_2", "ten_1", "m", created=1_790_812_800))
        assert tries == ["req_1"]  # within the window: failed without a try
        assert writer._doubtful == {"req_1"}
        down["on"] = False
        monkeypatch.setattr(ledger, "_FAIL_FAST_S", 0.0)
        await writer.record(UsageRecord("req_3", "ten_1", "m", created=1_790_812_800))
        await writer.close()

    asyncio.run(main())
    assert tries == ["req_1", "req_3"]
    assert _ids(engine) == {"req_3"}
    engine.dispose()
