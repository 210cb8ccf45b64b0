"""``modelmeter quickstart`` as a newcomer runs it: on an empty data dir, twice, then the examples it printed, pasted
(a real ``curl`` in bash; the ``openai`` and ``huggingface_hub`` snippets as Python), against a live server."""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import io
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from modelmeter.cli import main, quickstart
from modelmeter.gateway.app import create_app
from modelmeter.settings import Settings
from tests.conftest import ADMIN, ADMIN_TOKEN
from tests.support.live_server import serve_in_thread
from tests.support.net import free_port
from tests.support.shared_data import sst2_rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def serving(settings: Settings, port: int) -> Iterator[str]:
    """The gateway on ``settings`` (no worker) at ``port``, in a thread of this process."""
    with serve_in_thread(create_app(settings), port) as server:
        yield server.url


def run_quickstart(settings: Settings, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in {"MODELMETER_ADMIN_TOKEN"}}
    assert settings.database_url
    env |= {"MODELMETER_DATA_DIR": str(settings.data_dir), "MODELMETER_DATABASE_URL": settings.database_url,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "modelmeter.cli", "quickstart", "--url", url, *extra], env=env,
                          capture_output=True, text=True, timeout=600, check=False)
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}"
    return done


def example(output: str, title: str) -> str:
    """The block under ``# <title>`` in the quickstart's output (up to the next blank line)."""
    found = re.search(rf"^# {re.escape(title)}[^\n]*\n(.*?)(?:\n\n|\Z)", output, re.M | re.S)
    assert found, f"no '{title}' example in:\n{output}"
    return found[1]


def run_python(code: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        exec(compile(code, "quickstart example", "exec"), {})  # as pasted into python
    return printed.getvalue()


def check_examples(output: str) -> None:
    """The printed curl and Python examples, run as printed: labels are the sample's, and they are right."""
    curl = subprocess.run(["bash", "-c", example(output, "shell")], capture_output=True, text=True, timeout=120,
                          check=True)
    import json

    answer = json.loads(curl.stdout)
    assert set(answer["data"][0]["scores"]) == {"negative", "positive"}, answer
    assert answer["data"][0]["label"] == "positive", answer  # "a gripping, beautifully acted film"

    openai_printed = run_python(example(output, "Python, with openai"))
    labels = [label for label, _ in ast.literal_eval(openai_printed.strip())]
    assert labels == ["positive", "negative"], openai_printed

    hf_printed = run_python(example(output, "Python, with huggingface_hub"))
    assert re.match(r"\[TextClassificationOutputElement\(label='positive', score=0\.\d+\), "
                    r"TextClassificationOutputElement\(label='negative'", hf_printed.strip()), hf_printed


def readme_examples_with(url: str, key: str, model: str) -> None:
    """The README's serving examples (curl, openai, huggingface_hub), run with the quickstart's real key and model
    in place of the README's placeholders: what a newcomer pastes after the quickstart."""
    import json

    from tests.integration import test_readme_examples as readme

    placeholders = {"localhost:8000": url.removeprefix("http://"), "mm_…": key, readme.FINE_TUNED: model}
    answers = []
    for line in readme.shell_lines("Serving") + readme.shell_lines("Idempotency-Key"):
        done = subprocess.run(["bash", "-ec", readme.fill(line, placeholders)], capture_output=True, text=True,
                              timeout=120, check=True)
        answers.append(json.loads(done.stdout))
    embeddings, classified, keyed = answers
    assert [len(d["embedding"]) for d in embeddings["data"]] == [384, 384]
    assert classified["data"][0]["label"] == keyed["data"][0]["label"] == "positive"  # "a fine film"
    _, (embedded, labels) = readme.run_python(readme.python_block("Serving"), placeholders)
    assert len(embedded.data[0].embedding) == 384
    assert labels[0].label == "positive"


def test_quickstart_on_an_empty_data_dir_twice_then_its_examples_against_a_live_server(settings: Settings) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    started = time.monotonic()
    first = run_quickstart(settings, url)
    first_s = time.monotonic() - started
    out = first.stdout
    assert out.startswith(f"No server answers at {url}: doing it here, in this process")
    for piece, done in (("tenant", "created"), ("key", "issued"), ("file", "uploaded")):
        assert re.search(rf"^{piece} .*: {done}", out, re.M), out
    assert re.search(r"^model +ft:all-MiniLM-L6-v2:sentiment:\w+: trained in [\d.]+ s, accuracy 0\.\d+", out, re.M)
    assert f"Start the server (modelmeter serve --port {port}), then paste these:" in out
    assert "Epoch 3/3" in out  # its progress, from the job's events (lines: no terminal here)
    assert "LOAD REPORT" not in first.stderr
    [key] = set(re.findall(r"Bearer (mm_\w+)", out))
    [model] = set(re.findall(r"ft:all-MiniLM-L6-v2:sentiment:\w+", out))

    second = run_quickstart(settings, url)
    again = second.stdout
    assert "Nothing changed: the demo tenant, its key, the file and the model were all there." in again
    assert [line.split(": ", 1)[1].split()[0] for line in again.splitlines()[1:5]] == ["found"] * 4
    assert f"{model}: found" in again
    assert key not in again
    assert 'api_key="mm_…"' in again
    assert re.search(r"issue a new one: modelmeter key roll key_\w+$", again.rstrip())

    server_settings = settings.model_copy(update={"admin_token": None})  # the data dir's token, as serve reads it
    with serving(server_settings, port):
        third = run_quickstart(settings, url)  # a server answers now: it goes through it, and still finds it all
        assert third.stdout.startswith(f"A server answers at {url}: using its admin and tenant API")
        assert "Nothing changed" in third.stdout
        check_examples(out)
        readme_examples_with(url, key, model)
    print(f"quickstart on an empty data dir: {first_s:.1f} s")


def test_quickstart_through_a_running_server_whose_worker_is_off(shared_data: Path, settings: Settings, client: Any,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The admin and tenant API of a running server (started with --no-worker: the job is trained here), on a
    tenant and key made earlier: the key's secret is not known, so a short-lived setup key uploads and is revoked.
    A small sample and one epoch keep it short."""
    tenant = client.post("/admin/tenants", json={"name": "Demo", "email": quickstart.DEMO_EMAIL, "plan": "pro"},
                         headers=ADMIN).json()
    key = client.post(f"/admin/tenants/{tenant['id']}/keys", json={"name": "quickstart"}, headers=ADMIN).json()
    small = "".join(f'{{"text": "{t}", "label": "{["negative", "positive"][y]}"}}\n'
                    for t, y in sst2_rows(shared_data, 60, seed=3) if '"' not in t and "\\" not in t)
    monkeypatch.setattr(quickstart, "sample_bytes", lambda recipe=None: small.encode())
    monkeypatch.setattr(quickstart, "SENTIMENT", dataclasses.replace(quickstart.SENTIMENT, n_epochs=1))
    monkeypatch.setenv("MODELMETER_DATA_DIR", str(settings.data_dir))
    assert settings.database_url
    monkeypatch.setenv("MODELMETER_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("MODELMETER_ADMIN_TOKEN", ADMIN_TOKEN)
    with serving(settings, free_port()) as url:
        ran = CliRunner().invoke(main, ["quickstart", "--url", url, "--worker-wait", "0"])
    assert ran.exit_code == 0, ran.output
    out = ran.stdout
    assert out.startswith(f"A server answers at {url}: using its admin and tenant API")
    assert f"{tenant['id']} Demo <{quickstart.DEMO_EMAIL}> on plan pro: found" in out
    assert f"{key['id']} {key['prefix']}…{key['last4']}: found" in out
    assert "uploaded" in out
    assert "training here, in this process, as well" in out
    assert re.search(r"^model +ft:all-MiniLM-L6-v2:sentiment:\w+: trained in", out, re.M)
    assert f"modelmeter key roll {key['id']}" in out
    keys = client.get(f"/admin/tenants/{tenant['id']}/keys", headers=ADMIN).json()["data"]
    assert sorted((k["name"], k["status"]) for k in keys) == [("quickstart", "active"), ("quickstart-setup", "revoked")]


def test_quickstart_with_entities_trains_a_tagger_whose_printed_example_works(settings: Settings) -> None:
    """``--with-entities``: the sentiment classifier and a tagger on the packaged entity sample; the printed curl
    line for the tagger, run against a live server, finds the person, the company and the place."""
    import json

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    out = run_quickstart(settings, url, "--with-entities").stdout
    assert re.search(r"^file +file_\w+ entities_sample.jsonl \(800 tagged sentences", out, re.M), out
    found = re.search(r"^model +ft:all-MiniLM-L6-v2:entities:\w+: trained in [\d.]+ s, f1 (0\.\d+)", out, re.M)
    assert found, out
    assert float(found.group(1)) > 0.8  # templated sentences: a tagger learns them well
    curl = example(out, "named entities, shell")
    server_settings = settings.model_copy(update={"admin_token": None})
    with serving(server_settings, port):
        answer = json.loads(subprocess.run(["bash", "-ec", curl], capture_output=True, text=True, timeout=120,
                                           check=True).stdout)
    groups = {(e["entity_group"], e["word"]) for e in answer["data"][0]["entities"]}
    assert {("PER", "Maria Lopez"), ("ORG", "Northwind Bank"), ("LOC", "Lisbon")} <= groups, groups
