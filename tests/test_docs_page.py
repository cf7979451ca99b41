"""/docs in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) against `python -m server
--rest-port` with an API key: the page names the version and the model, Authorize sends the key, Try it out works."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server import __version__
from tests.subprocess_server import ServerProcess, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Locator

KEY = "docs-page-key"
MODEL = "panda-tiny"
BODY = {"model": MODEL, "query": "what is panda?", "documents": ["hi", "The giant panda is a bear species."]}
TIMEOUT_MS = 30_000  # each wait in the page; the whole test stays well under a minute on a busy machine


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y --no-install-recommends chromium")
    return path


@pytest.fixture(scope="module")
def docs_server(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerProcess, str]]:
    rest_port = free_port()
    log = tmp_path_factory.mktemp("docs") / "server.log"
    srv = ServerProcess(
        model_dir, log, "--model", f"{MODEL}={model_dir}", "--api-key", KEY, "--rest-port", str(rest_port)
    )
    yield srv, f"http://127.0.0.1:{rest_port}"
    srv.stop()


def served_models(target: str) -> list[pb.GetModelInfoResponse]:
    """GetModelInfo of every served model, once all of them have loaded (ServerProcess waits for the first)."""
    metadata = [("authorization", f"Bearer {KEY}")]
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.RerankerStub(channel)
        names = stub.GetModelInfo(pb.GetModelInfoRequest(), metadata=metadata, timeout=10).models
        deadline = time.monotonic() + 60
        while True:
            try:
                return [
                    stub.GetModelInfo(pb.GetModelInfoRequest(model=n), metadata=metadata, timeout=10) for n in names
                ]
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.UNAVAILABLE or time.monotonic() > deadline:  # type: ignore[attr-defined]
                    raise
                time.sleep(0.2)


def test_docs_page_names_the_service_and_try_it_out_works_after_authorize(
    docs_server: tuple[ServerProcess, str],
) -> None:
    from playwright.sync_api import sync_playwright

    srv, url = docs_server
    models = served_models(srv.target)
    assert [m.model for m in models][1:] == [MODEL]  # ServerProcess names the first after its directory
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True)
        try:
            page = browser.new_page()
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(f"{url}/docs")
            info = page.locator(".information-container .info")
            assert "Reranker REST bridge" in info.locator(".title").inner_text()
            assert info.locator(".version").first.inner_text().strip() == __version__  # the package's, not a constant
            description = info.locator(".description").inner_text()
            for model in models:  # each with its family as the server reports it (GetModelInfo.family)
                assert f"{model.model}: {f'{model.family} reranker, ' if model.family else ''}cpu" in description
            # One section per dialect; /reank under legacy 2, struck through as the legacy spelling.
            tags = page.locator(".opblock-tag-section h3 .opblock-tag, .opblock-tag-section h3 a span")
            names = {t.strip() for t in tags.all_inner_texts()}
            assert {"legacy 1", "legacy 2", "TEI", "Infinity", "Cohere v1", "Cohere v2"} <= names, names
            assert page.locator('.opblock-deprecated [data-path="/reank"]').count() == 1

            v2 = page.locator(".opblock-post", has=page.locator('[data-path="/v2/rerank"]'))
            v2.locator(".opblock-summary").click()
            v2.locator("button.try-out__btn").click()
            v2.locator("textarea.body-param__text").fill(json.dumps(BODY))
            assert execute(v2) == "401"  # the server has a key and none was sent
            v2.locator("button.btn-clear").click()

            page.locator(".scheme-container button.authorize").click()
            page.locator(".auth-container input").fill(KEY)
            page.locator(".auth-btn-wrapper button.authorize").click()
            page.locator(".auth-btn-wrapper button.btn-done").click()
            assert execute(v2) == "200"
            answer = json.loads(v2.locator(".live-responses-table .response-col_description pre").first.inner_text())
            assert [r["index"] for r in answer["results"]] in ([0, 1], [1, 0])
        finally:
            browser.close()


def execute(operation: Locator) -> str:
    """Press Execute and read the HTTP status of the live answer."""
    operation.locator("button.execute").click()
    status = operation.locator(".live-responses-table .response .response-col_status")
    status.first.wait_for()
    return status.first.inner_text().strip()
