"""A commit that landed although the writer saw it fail (the connection broke after COMMIT reached the server): the
request was answered as failed, so its row must go once the database answers again (found by
tests/integration/test_dependency_faults.py as a usage row for a request answered 503)."""

from __future__ import annotations

import asyncio
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


def test_a_row_whose_request_was_answered_as_failed_is_removed(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    engine = db.make_engine(f"sqlite:///{tmp_path / 'ledger.db'}")
    db.upgrade(engine)
    with engine.begin() as conn:
        conn.execute(text("INSERT INTO tenant (id, name, email, plan, status, billing_status, created, credits_epoch, "
                          "updated) VALUES ('ten_1', 'T', 't@example.com', 'payg', 'active', 'ok', 0, 0, 0)"))
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
        await writer.record(UsageRecord("req_fine", "ten_1", "m", created=1_790_812_800))
        await writer.close()

    asyncio.run(main())
    assert _ids(engine) == {"req_fine"}
    engine.dispose()
