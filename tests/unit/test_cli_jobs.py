"""``modelmeter jobs list|show|events [--follow]``: any tenant's jobs, read through the service functions."""

from __future__ import annotations

import io
import json
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from modelmeter import clock, db
from modelmeter.cli import main
from modelmeter.cli.progress import ProgressDisplay, follow_job
from modelmeter.models.finetune import jobs
from modelmeter.models.finetune.tables import TenantFile
from modelmeter.ops import jobs as ops_jobs


@pytest.fixture
def runner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, database_url: str) -> CliRunner:
    monkeypatch.setenv("MODELMETER_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MODELMETER_DATABASE_URL", database_url)
    return CliRunner()


@pytest.fixture
def sessions(database_url: str) -> Any:
    engine = db.make_engine(database_url)
    yield db.session_maker(engine)
    engine.dispose()


def _json(runner: CliRunner, *args: str) -> Any:
    result = runner.invoke(main, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _tenant(runner: CliRunner, name: str) -> str:
    return str(_json(runner, "tenant", "create", "--name", name, "--email", f"{name.lower()}@x.test")["id"])


def _queue_job(sessions: Any, tenant_id: str) -> str:
    """A queued job on a (row-only) training file, as the API would create it."""
    with sessions() as session:
        file = TenantFile(id=f"file_{tenant_id[-12:]}", tenant_id=tenant_id, filename="t.jsonl", purpose="fine-tune",
                          bytes=10, format="jsonl", rows=4, labels_json='["negative", "positive"]', path="nowhere",
                          created_at=clock.now_s())
        session.add(file)
        session.flush()
        job = jobs.create_job(session=session, tenant_id=tenant_id, base_models=["base"], max_active=2,
                              data=jobs.JobCreate(model="base", training_file=file.id, suffix="demo"))
        session.commit()
        return job.id


def _train_fakely(sessions: Any, job_id: str, *, steps: int = 3, pause_s: float = 0.2) -> None:
    """What a worker writes: the claim, metrics events, then success with a result."""
    assert jobs.claim_next(sessions=sessions, worker_id="w:1:x") == job_id
    for step in range(1, steps + 1):
        time.sleep(pause_s)
        with sessions() as session:
            jobs.add_event(session=session, job_id=job_id, type_="metrics", message=f"Epoch 1/1, step {step}/{steps}",
                           data={"epoch": 1, "step": step, "total_steps": steps, "train_loss": 0.5,
                                 "examples_per_s": 100.0, "eta_s": float(steps - step)})
            session.commit()
    with sessions() as session:
        assert jobs.finish(session=session, job_id=job_id, owner="w:1:x", status="succeeded",
                           fine_tuned_model="ft:base:demo:12345678", finished_at=clock.now_s(),
                           result_json=json.dumps({"accuracy": 0.875, "macro_f1": 0.87, "n_validation": 8,
                                                   "wall_s": 1.5}))
        jobs.add_event(session=session, job_id=job_id, message="Job succeeded: ft:base:demo:12345678.")
        session.commit()


def test_list_and_show_any_tenants_jobs(runner: CliRunner, sessions: Any) -> None:
    acme, globex = _tenant(runner, "Acme"), _tenant(runner, "Globex")
    first, second = _queue_job(sessions, acme), _queue_job(sessions, globex)
    assert [j["id"] for j in _json(runner, "jobs", "list")["data"]] == [second, first]  # newest first
    only = _json(runner, "jobs", "list", "--tenant", acme)
    assert ([j["id"] for j in only["data"]], only["has_more"]) == ([first], False)
    shown = _json(runner, "jobs", "show", first)
    assert (shown["status"], shown["organization_id"], shown["training_type"]["type"]) == ("queued", acme, "lora")
    text = runner.invoke(main, ["jobs", "list"]).stdout
    assert [line.split()[:3] for line in text.splitlines()] == [[second, globex, "queued"], [first, acme, "queued"]]
    assert "status: queued" in runner.invoke(main, ["jobs", "show", first]).stdout


def test_missing_job_and_tenant_are_refused(runner: CliRunner) -> None:
    missing = runner.invoke(main, ["jobs", "show", "ftjob_nope"])
    assert missing.exit_code == 1
    assert "No such fine-tuning job: 'ftjob_nope'." in missing.output
    assert runner.invoke(main, ["jobs", "events", "ftjob_nope", "--follow"]).exit_code == 1
    assert "No tenant" in runner.invoke(main, ["jobs", "list", "--tenant", "ten_nope"]).output
    assert runner.invoke(main, ["jobs", "list"]).stdout.strip() == "no jobs"


def test_events_oldest_first_in_text_and_as_the_api_lists_them_in_json(runner: CliRunner, sessions: Any) -> None:
    job_id = _queue_job(sessions, _tenant(runner, "Acme"))
    _train_fakely(sessions, job_id, pause_s=0)
    lines = runner.invoke(main, ["jobs", "events", job_id]).stdout.splitlines()
    messages = [line.split("  ", 1)[1] for line in lines]  # after the time stamp
    assert messages[0].startswith("Validating training file: file_")
    assert messages[1:3] == ["Files validated; job queued.", "Job started by worker w:1:x."]
    assert messages[3:6] == [f"Epoch 1/1, step {n}/3" for n in (1, 2, 3)]
    assert lines[-1].endswith("Job succeeded: ft:base:demo:12345678.")
    listed = _json(runner, "jobs", "events", job_id)
    assert listed["object"] == "list"
    assert [e["message"] for e in listed["data"]] == messages[::-1]
    assert listed["data"][1]["data"]["step"] == 3


def test_follow_prints_events_until_the_job_ends(runner: CliRunner, sessions: Any) -> None:
    job_id = _queue_job(sessions, _tenant(runner, "Acme"))
    trainer = threading.Thread(target=_train_fakely, args=(sessions, job_id))
    trainer.start()
    try:
        followed = runner.invoke(main, ["jobs", "events", job_id, "--follow", "--interval", "0.05"])
    finally:
        trainer.join()
    assert followed.exit_code == 0, followed.output
    lines = followed.stdout.splitlines()
    assert [line for line in lines if "step" in line][-1].endswith("Epoch 1/1, step 3/3")  # no terminal: lines
    assert lines[-1] == f"{job_id} succeeded: ft:base:demo:12345678 (accuracy 0.8750)"
    jsonl = runner.invoke(main, ["jobs", "events", job_id, "--follow", "--json"])  # one event a line
    events = [json.loads(line) for line in jsonl.stdout.splitlines()]
    assert events[0]["message"].startswith("Validating training file:")
    assert events[-1]["message"] == "Job succeeded: ft:base:demo:12345678."
    assert [e["data"]["step"] for e in events if e["type"] == "metrics"] == [1, 2, 3]


def test_follow_exits_1_when_the_job_did_not_succeed(runner: CliRunner, sessions: Any) -> None:
    job_id = _queue_job(sessions, _tenant(runner, "Acme"))
    with sessions() as session:
        jobs.cancel_job(session=session, job=jobs.find_job(session=session, job_id=job_id))
        session.commit()
    followed = runner.invoke(main, ["jobs", "events", job_id, "--follow"])
    assert followed.exit_code == 1
    assert followed.stdout.splitlines()[-2:] == [followed.stdout.splitlines()[-2], f"{job_id} cancelled"]
    assert followed.stdout.splitlines()[-2].endswith("Job cancelled.")


def test_the_progress_bar_follows_metrics_events(sessions: Any, runner: CliRunner,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    job_id = _queue_job(sessions, _tenant(runner, "Acme"))
    _train_fakely(sessions, job_id, steps=4, pause_s=0)
    out = io.StringIO()
    display = ProgressDisplay(bar=True, out=out)
    job = follow_job(lambda after: ops_jobs.job_events(sessions=sessions, job_id=job_id, after_seq=after), display,
                     interval_s=0.01)
    assert job.status == "succeeded"
    assert "step" not in out.getvalue()  # metrics events move the bar instead of printing lines
    assert "Job succeeded" in out.getvalue()
    bar = capsys.readouterr().err
    assert "fine-tuning" in bar
    assert "4/4 steps, epoch 1, loss 0.5000, 100 examples/s, 0 s left" in bar
