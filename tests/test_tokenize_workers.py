"""Tokenizer worker processes: the server's scores through them, a worker's death, and none outliving the server."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import grpc
import pytest
from FlagEmbedding.abc.inference.AbsReranker import AbsReranker

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.tokenize.exact import Instructions
from server.tokenize.workers import TokenizerWorkers, WorkerEvents
from tests.conftest import FP32_REORDERED, test_config
from tools.make_model import SENTENCES

DEADLINE_S = 60.0  # generous: worker start-up on a busy 2-core machine


def _wait_for(check: Any, what: str) -> None:
    end = time.monotonic() + DEADLINE_S
    while not check():
        if time.monotonic() > end:
            raise AssertionError(f"not within {DEADLINE_S:.0f} s: {what}")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


@pytest.mark.parametrize(
    "q, q_fmt, p, p_fmt",
    [
        (None, "{}{}", None, "{}{}"),
        ("Q: ", "{}{}", None, "{}{}"),
        (None, "{}{}", "P: ", "{}\\n{}"),
        ("find:", "<instruct>{}\\n<query>{}", "doc:", "{} -- {}"),
    ],
)
def test_instructions_equal_flagembeddings(q: str | None, q_fmt: str, p: str | None, p_fmt: str) -> None:
    """The worker's copy of get_detailed_inputs (it does not import FlagEmbedding) gives FlagEmbedding's texts."""
    ours = Instructions(q, q_fmt, p, p_fmt, None)
    theirs = SimpleNamespace(**dataclasses.asdict(ours))
    theirs.get_detailed_instruct = lambda *args: AbsReranker.get_detailed_instruct(theirs, *args)  # type: ignore[arg-type]
    pairs = [["what is panda?", "The giant panda"], ["hi", "a\nb"]]
    assert ours.get_detailed_inputs(pairs) == AbsReranker.get_detailed_inputs(theirs, pairs)  # type: ignore[arg-type]


@pytest.fixture
async def worker_server(model_dir: Path, engine: Any) -> Any:
    srv = RerankServer(test_config(model_dir, tokenize_workers=1), engine=engine)
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_scores_through_a_worker_equal_compute_score(worker_server: RerankServer, flag_reranker: Any) -> None:
    tokenizing = worker_server.service.scoring.tokenizing  # type: ignore[union-attr]
    assert tokenizing.workers is not None and len(tokenizing.workers.pids) == 1
    assert tokenizing.describe().startswith("1 process (started in")
    query, passages = "what is panda?", SENTENCES * 30  # 330 pairs: three slices, one worker
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_server.port}") as ch:
        reply = await pb_grpc.RerankerStub(ch).Rerank(pb.RerankRequest(query=query, candidates=passages))
    expected = flag_reranker.compute_score([[query, p] for p in passages])
    assert list(reply.scores) == pytest.approx(expected, **FP32_REORDERED)


async def test_a_worker_dying_fails_only_the_request_it_held(
    worker_server: RerankServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The worker is stopped (SIGSTOP) so the request is surely in its hands, then killed: that request gets
    UNAVAILABLE saying so; the death is logged and counted; a new worker serves the next requests."""
    workers = worker_server.service.scoring.tokenizing.workers  # type: ignore[union-attr]
    (pid,) = workers.pids
    os.kill(pid, signal.SIGSTOP)
    caplog.set_level(logging.ERROR, logger="server.tokenize.workers")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{worker_server.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        held = asyncio.ensure_future(stub.Rerank(pb.RerankRequest(query="q", candidates=SENTENCES)))
        await asyncio.to_thread(_wait_for, lambda: not workers._idle, "the request taken by the worker")
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await held
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert f"tokenizer worker (pid {pid}) died while tokenizing this request; retry" in err.value.details()
        await asyncio.to_thread(_wait_for, lambda: workers.pids not in ([], [pid]), "a replacement")
        reply = await stub.Rerank(pb.RerankRequest(query="q", candidates=SENTENCES), timeout=DEADLINE_S)
    assert len(reply.scores) == len(SENTENCES)
    assert workers.pids and pid not in workers.pids
    assert [r.getMessage() for r in caplog.records if "died" in r.getMessage()] == [
        f"tokenizer worker pid {pid} died (exit code -9); starting a new one"
    ]
    assert worker_server.metrics.tokenizer_worker_deaths._value.get() == 1


def test_a_worker_dead_while_idle_costs_no_request(engine: Any) -> None:
    deaths: list[int] = []
    workers = TokenizerWorkers(engine.encoder, 2, WorkerEvents(died=lambda: deaths.append(1)))
    workers.start()
    try:
        first, second = workers.pids
        os.kill(first, signal.SIGKILL)
        # Gone as a whole (its reaper waited for it): the main thread turns zombie before the others have exited.
        _wait_for(lambda: first not in workers.pids, "the worker reaped")
        for _ in range(4):  # each takes an idle worker; the dead one is passed over, never handed a request
            assert [list(e.input_ids) for e in workers.encode([("q", "a passage")])] == [
                list(e.input_ids) for e in engine.encode([("q", "a passage")])
            ]
        _wait_for(lambda: len(workers.pids) == 2 and first not in workers.pids, "a replacement")
        assert deaths == [1] and second in workers.pids
    finally:
        workers.close()
    assert not any(_alive(p) for p in (first, second))


def test_workers_exit_when_the_server_is_sigkilled(model_dir: Path, tmp_path: Path) -> None:
    """No worker outlives its server, even one killed without a chance to close them."""
    script = tmp_path / "parent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys, time
            from server.config import Config
            from server.engine.model import RerankerModel
            from server.tokenize.workers import TokenizerWorkers, WorkerEvents
            w = TokenizerWorkers(RerankerModel(Config(model={str(model_dir)!r})).encoder, 2)
            w.start()
            print(*w.pids, flush=True)
            time.sleep(600)
            """
        )
    )
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=str(root))
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=root, env=env)
    try:
        line = asyncio.run(asyncio.wait_for(asyncio.to_thread(parent.stdout.readline), DEADLINE_S * 2))  # type: ignore[union-attr]
        pids = [int(p) for p in line.split()]
        assert len(pids) == 2 and all(_alive(p) for p in pids)
    finally:
        parent.kill()
        parent.wait()
    _wait_for(lambda: not any(_alive(p) for p in pids), "the workers gone after their parent's SIGKILL")


def test_an_llm_rerankers_inputs_through_a_worker_equal_its_own(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A decoder-only reranker's PromptEncoder (bos, separators, prompt) pickles to a worker and gives the same ids."""
    from server.engine.load import load_engine
    from tools.make_model import build_llm_model

    path = build_llm_model(tmp_path_factory.mktemp("bge-reranker-gemma"), arch="gemma")
    llm = load_engine(test_config(path), str(path), "gemma")
    pairs = [("what is panda?", s) for s in SENTENCES] + [("q " * 200, "p " * 600)]
    workers = TokenizerWorkers(llm.encoder, 1)
    workers.start()
    try:
        for max_length in (None, 24):
            ours = [list(e.input_ids) for e in workers.encode(pairs, max_length)]
            assert ours == [list(e.input_ids) for e in llm.encode(pairs, max_length)]
    finally:
        workers.close()
