"""README.md's examples, read from the README at test time and run as written against a live server.

Only the README's placeholders are filled in: ``localhost:8000`` (the live server), ``mm_…`` (a real key),
``ten_…`` (a real tenant). ``ft:all-MiniLM-L6-v2:reviews:1a2b3c4d`` is registered under that exact id for the
tenant (a tiny BERT: the HTTP path is what is checked). Shell lines run in bash with a real ``curl`` (given a
``-w`` to report the status) and the real CLI; Python blocks are exec'd with the real ``openai`` and
``huggingface_hub`` clients.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

import pytest

from modelmeter.settings import Settings
from tests.conftest import ADMIN_TOKEN
from tests.support.live_server import LiveServer
from tests.support.shared_data import sst2_rows

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FINE_TUNED = "ft:all-MiniLM-L6-v2:reviews:1a2b3c4d"
BLOCK = re.compile(r"^(?:#+ (?P<heading>[^\n]+)|```(?P<lang>\w*)\n(?P<code>.*?)^```)$", re.M | re.S)
# The sections whose examples call the platform, all run here; the last test fails when another one appears.
TENANT_SECTIONS = {"A first session", "Serving", "Fine-tuning", "Unit economics", "Idempotency-Key",
                   "Prepaid credits", "Batch API (OpenAI-compatible)"}


def blocks(lang: str) -> list[tuple[str, str]]:
    """(section heading, code) of each fenced ``lang`` block of README.md."""
    found, heading = [], ""
    for match in BLOCK.finditer(README.read_text(encoding="utf-8")):
        if match["heading"]:
            heading = match["heading"]
        elif match["lang"] == lang:
            found.append((heading, match["code"]))
    return found


def shell_lines(section: str) -> list[str]:
    return [line.strip() for heading, code in blocks("sh") if heading == section
            for line in code.replace("\\\n", " ").splitlines() if line.strip()]


def python_block(section: str) -> str:
    [code] = [code for heading, code in blocks("python") if heading == section]
    return code


def fill(text: str, placeholders: dict[str, str]) -> str:
    for placeholder, value in placeholders.items():
        text = text.replace(placeholder, value)
    return text


class Shell:
    """README shell lines run one by one, as pasted into one terminal: exports carry over, and a tenant id or key
    that a line prints fills the ``ten_…`` / ``mm_…`` placeholders of the lines after it."""

    def __init__(self, cwd: Path, settings: Settings, url: str) -> None:
        self.cwd = cwd
        self.exports: list[str] = []
        self.placeholders = {"localhost:8000": url.removeprefix("http://")}
        # The README's layout: ./.modelmeter is the data dir (holding the admin token), .venv/bin/modelmeter the CLI.
        (cwd / ".venv" / "bin").mkdir(parents=True)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        (cwd / ".modelmeter").symlink_to(settings.data_dir, target_is_directory=True)
        (settings.data_dir / "admin_token").write_text(ADMIN_TOKEN + "\n")
        cli = cwd / ".venv" / "bin" / "modelmeter"
        cli.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m modelmeter.cli "$@"\n')
        cli.chmod(0o755)
        self.env = {k: v for k, v in os.environ.items() if k not in {"MODELMETER_ADMIN_TOKEN", "MODELMETER_DATA_DIR"}}
        assert settings.database_url
        self.env |= {"MODELMETER_DATABASE_URL": settings.database_url,
                     "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}

    def run(self, line: str) -> Any:
        """A curl line's JSON body (asserting a 2xx status and no error envelope), any other line's output."""
        line = fill(line, self.placeholders)
        curl = line.startswith("curl ")
        command = line.replace("curl ", "curl -w '\\n%{http_code}' ", 1) if curl else line
        done = subprocess.run(["bash", "-ec", "\n".join([*self.exports, command])], cwd=self.cwd, env=self.env,
                              capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0, f"{line}\n{done.stdout}\n{done.stderr}"
        if line.startswith("export "):
            self.exports.append(line)
        for placeholder, printed in (("ten_…", r"^created (ten_\w+)"), ("mm_…", r"^key \(shown once\): (mm_\w+)")):
            if found := re.search(printed, done.stdout, re.M):
                self.placeholders[placeholder] = found[1]
        if not curl:
            return done.stdout
        body, status = done.stdout.rsplit("\n", 1)
        assert status.startswith("2"), f"{line}\n{status} {body}"
        payload = json.loads(body)
        assert "error" not in payload, f"{line}\n{payload}"
        return payload


def run_python(code: str, placeholders: dict[str, str]) -> tuple[dict[str, Any], list[Any]]:
    """Exec a README Python block statement by statement: its namespace, and its bare expressions' values."""
    code = fill(code, placeholders)
    opened: list[IO[Any]] = []

    def tracked_open(*args: Any, **kwargs: Any) -> IO[Any]:  # the README's inline open(), closed afterwards
        opened.append(open(*args, **kwargs))  # noqa: SIM115
        return opened[-1]

    namespace: dict[str, Any] = {"open": tracked_open}
    values = []
    try:
        for node in ast.parse(code).body:
            if isinstance(node, ast.Expr):
                values.append(eval(compile(ast.Expression(node.value), "README.md", "eval"), namespace))
            else:
                exec(compile(ast.Module([node], type_ignores=[]), "README.md", "exec"), namespace)
    finally:
        for file in opened:
            file.close()
    return namespace, values


@pytest.fixture
def shell(tmp_path: Path, settings: Settings, live_server: LiveServer) -> Shell:
    assert shutil.which("curl"), "the README's examples use curl"
    return Shell(tmp_path / "session", settings, live_server.url)


def test_a_first_session_and_the_admin_examples(shell: Shell) -> None:
    """The CLI creates the tenant and its key, then the curls run with them (and the admin token's export)."""
    session = [shell.run(line) for line in shell_lines("A first session")]
    models, tenants = session[-2:]
    assert "all-MiniLM-L6-v2" in [m["id"] for m in models["data"]]
    assert [(t["id"], t["name"], t["plan"]) for t in tenants["data"]] == [(shell.placeholders["ten_…"], "Acme", "pro")]
    # Its CLI line is left out: each CLI start imports torch (~7 s here), and the two above already run the CLI.
    [economics] = [shell.run(line) for line in shell_lines("Unit economics") if line.startswith("curl ")]
    assert economics["object"] == "list"


@pytest.mark.slow
def test_serving_examples(shell: Shell, make_tenant: Any, make_key: Any, register_model: Any) -> None:
    tenant = make_tenant(plan="pro")["id"]
    key = make_key(tenant)["key"]
    register_model(tenant, model_id=FINE_TUNED, labels=["negative", "positive"])
    shell.placeholders["mm_…"] = key
    embeddings, classified = [shell.run(line) for line in shell_lines("Serving")]  # curl -d: no Content-Type given
    assert [len(d["embedding"]) for d in embeddings["data"]] == [384, 384]
    assert set(classified["data"][0]["scores"]) == {"negative", "positive"}
    first, again = [shell.run(line) for line in shell_lines("Idempotency-Key") * 2]  # the retry is a replay
    assert again == first
    assert set(first["data"][0]["scores"]) == {"negative", "positive"}

    _, (embedded, labels) = run_python(python_block("Serving"), shell.placeholders)
    assert len(embedded.data[0].embedding) == 384
    assert {e.label for e in labels} == {"negative", "positive"}


def test_fine_tuning_example(shell: Shell, monkeypatch: pytest.MonkeyPatch, make_tenant: Any, make_key: Any,
                             shared_data: Path) -> None:
    """No worker runs here (``start_worker=False``): the jobs stay queued, so ``fine_tuned_model`` is still None;
    training through the same objects is tested in test_clients.py and test_real_finetune.py."""
    shell.placeholders["mm_…"] = make_key(make_tenant(plan="pro")["id"])["key"]
    monkeypatch.chdir(shell.cwd)
    Path("reviews.jsonl").write_text("".join(json.dumps({"text": text, "label": ["negative", "positive"][label]}) + "\n"
                                             for text, label in sst2_rows(shared_data, 40)))
    namespace, values = run_python(python_block("Fine-tuning"), shell.placeholders)
    status, events, fine_tuned_model, cancelled, full = values
    assert namespace["f"].purpose == "fine-tune"
    assert namespace["job"].model == "all-MiniLM-L6-v2"
    assert status in {"validating_files", "queued"}
    assert "Files validated; job queued." in [e.message for e in events.data]
    assert fine_tuned_model is None
    assert namespace["lora"].model_extra["training_type"] == {"type": "lora", "rank": 16, "alpha": 32}
    assert cancelled.status == "cancelled"
    assert full.model_extra["training_type"] == {"type": "full"}
    assert full.status in {"validating_files", "queued"}


def test_prepaid_credits_example(shell: Shell, make_tenant: Any, make_key: Any) -> None:
    """The operator's grant and list through the real CLI, then the tenant's view of the same balance."""
    tenant = make_tenant(plan="payg")["id"]
    shell.placeholders |= {"ten_…": tenant, "mm_…": make_key(tenant, scopes=["billing:read"])["key"]}
    shell.exports.append(f"export MODELMETER_ADMIN_TOKEN={ADMIN_TOKEN}")
    api_grant, granted, listed, body = [shell.run(line) for line in shell_lines("Prepaid credits")]
    assert (api_grant["object"], api_grant["amount_cents"], api_grant["source"]) == ("credit_grant", 500, "granted")
    assert granted.startswith("granted cg_")
    assert "Launch credit" in listed
    assert listed.rstrip().endswith("balance $30.00")
    assert (body["balance_cents"], [g["description"] for g in body["data"]]) == (3000, ["Launch credit",
                                                                                        "welcome credit"])


def test_batch_api_example(shell: Shell, monkeypatch: pytest.MonkeyPatch, make_tenant: Any, make_key: Any,
                           register_model: Any) -> None:
    """The live server's own batch runner serves the file while the README's loop waits for it."""
    tenant = make_tenant(plan="pro")["id"]
    shell.placeholders["mm_…"] = make_key(tenant)["key"]
    register_model(tenant, model_id=FINE_TUNED, labels=["negative", "positive"])
    monkeypatch.chdir(shell.cwd)
    tickets = ["Refund please, it broke", "Great service, thanks", "Where is my parcel?"]
    Path("tickets.jsonl").write_text("".join(json.dumps({"custom_id": f"ticket-{i}", "method": "POST",
                                                         "url": "/v1/classify",
                                                         "body": {"model": FINE_TUNED, "input": text}}) + "\n"
                                             for i, text in enumerate(tickets)))
    namespace, [(status, counts)] = run_python(python_block("Batch API (OpenAI-compatible)"),
                                               shell.placeholders)
    assert status == "completed"
    assert (counts.total, counts.completed, counts.failed) == (3, 3, 0)
    answers = [json.loads(line) for line in namespace["answers"]]
    assert sorted(a["custom_id"] for a in answers) == ["ticket-0", "ticket-1", "ticket-2"]
    assert {a["response"]["status_code"] for a in answers} == {200}


def test_every_example_that_calls_the_platform_is_run_here() -> None:
    calling = {heading for heading, code in blocks("sh") if "curl " in code}
    calling |= {heading for heading, _ in blocks("python")}
    assert calling == TENANT_SECTIONS
