"""The page flags an answer that cites nothing of the patient's record (issue 16), in a real browser:
Debian's Chromium, headless, via playwright, against uvicorn on 127.0.0.1. Skipped without them."""

from __future__ import annotations

import re
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip("browser tests need Debian's chromium at /usr/bin/chromium", allow_module_level=True)
playwright_sync = pytest.importorskip("playwright.sync_api", reason="browser tests need the playwright package")

import uvicorn  # noqa: E402

from clinqa.models.base import ModelInfo  # noqa: E402
from clinqa.records.fhir import load_records  # noqa: E402
from clinqa.records.synth import synthesize_patients, write_patients  # noqa: E402
from clinqa.serve.app import create_app  # noqa: E402
from clinqa.serve.auth import KeyStore  # noqa: E402
from clinqa.serve.config import ServeConfig  # noqa: E402

HANDLE = re.compile(r"\[([A-Z][A-Za-z]+/[A-Za-z0-9\-.]{1,64})\]")


class SometimesCiting:
    """Cites the first record line, unless the question is about 'the other patient': then it answers
    from nowhere, with no citation."""

    info = ModelInfo(spec="fake", backend="fake", name="fake")

    def generate(self, prompts, config=None):
        out = []
        for p in prompts:
            if "other patient" in p:
                out.append("They have gout and take allopurinol.")
            else:
                h = [x for x in HANDLE.findall(p.split("END RECORD")[0]) if not x.startswith("Patient/")][:1]
                out.append("Recorded here " + " ".join(f"[{x}]" for x in h) + ".")
        return out


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-unsupported")
    write_patients(root / "bundles", synthesize_patients(1, seed=5))
    records = load_records(root / "bundles")
    key = KeyStore(root / "keys.sqlite").create("b", scopes="patient/*.read patient/*.ask")[1]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = ServeConfig(keys_db=root / "keys.sqlite", audit_db=root / "audit.sqlite", port=port)
    uv = uvicorn.Server(
        uvicorn.Config(
            create_app(config, predictor=SometimesCiting(), records=records),
            host="127.0.0.1",
            port=port,
            log_level="warning",
            access_log=False,
        )
    )
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield {"url": f"http://127.0.0.1:{port}", "key": key, "patient": records[0].patient_id}
    uv.should_exit = True
    thread.join(timeout=15)


def test_the_page_warns_about_an_unsupported_answer_and_clears_it(server):
    expect = playwright_sync.expect
    with playwright_sync.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
        )
        try:
            page = browser.new_page()
            page.set_default_timeout(15_000)
            page.goto(server["url"] + "/")
            page.fill("#api-key", server["key"])
            page.click("#save-key")
            page.select_option("#patient", server["patient"])
            expect(page.locator("#timeline li").first).to_be_visible()
            page.fill("#question", "What was the most recent hemoglobin of the other patient?")
            page.click("#ask")
            expect(page.locator("#answer")).to_contain_text("gout")
            expect(page.locator("#unsupported")).to_be_visible()
            expect(page.locator("#unsupported")).to_contain_text("cites nothing in this patient's record")
            page.fill("#question", "What was the most recent hemoglobin?")
            page.click("#ask")
            expect(page.locator("#citations li").first).to_be_visible()
            expect(page.locator("#unsupported")).to_be_hidden()
        finally:
            browser.close()
