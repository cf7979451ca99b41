"""Several models in one server: choose per request, fair sharing of the device, weights replaced without downtime."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import pytest
from FlagEmbedding import FlagReranker
from grpc_health.v1 import health_pb2, health_pb2_grpc

from reranker_proto import reranker_pb2 as pb
from reranker_proto import reranker_pb2_grpc as pb_grpc
from server.app import RerankServer
from server.config import ConfigError, load_config, parse_models
from server.engine.model import RerankerModel
from tests.conftest import FP32_REORDERED, test_config
from tests.ops_helpers import free_port, sample, scrape, until
from tests.subprocess_server import ServerProcess
from tools.make_model import SENTENCES, build_model

QUERY = "what is panda?"
PASSAGES = SENTENCES[:6]


@pytest.fixture(scope="session")
def other_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model's shape with other random weights (seed 1)."""
    return build_model(tmp_path_factory.mktemp("tiny-reranker-seed1"), "tiny", seed=1)


def reference(model_dir: Path, pairs: list[tuple[str, str]]) -> list[float]:
    flag = FlagReranker(str(model_dir), devices=["cpu"], use_fp16=False)
    return [float(s) for s in flag.compute_score([list(p) for p in pairs])]


def test_model_specs_from_flags_and_environment() -> None:
    c = load_config(["--model", "base=/m/bge-reranker-base", "--model", "/m/bge-reranker-v2-m3"], env={})
    assert c.models == [("base", "/m/bge-reranker-base"), ("bge-reranker-v2-m3", "/m/bge-reranker-v2-m3")]
    assert c.default_model == "base"
    env = {"RERANKER_MODELS": "a=/x/one, b=BAAI/bge-reranker-base", "RERANKER_MODEL": "/ignored"}
    assert load_config([], env=env).models == [("a", "/x/one"), ("b", "BAAI/bge-reranker-base")]
    assert load_config([], env={}).models == [("bge-reranker-base", "BAAI/bge-reranker-base")]
    with pytest.raises(SystemExit):
        load_config(["--model", "a=/x", "--model", "a=/y"], env={})
    with pytest.raises(ConfigError, match="NAME=PATH_OR_ID"):
        parse_models("=/x")


@pytest.fixture
async def two_models(model_dir: Path, other_model_dir: Path, engine: Any) -> AsyncIterator[RerankServer]:
    config = test_config(model_dir, model=f"one={model_dir},two={other_model_dir}")
    two = RerankerModel(config, str(other_model_dir), "two")
    srv = RerankServer(config, engines={"one": engine, "two": two})
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_each_request_is_scored_by_the_model_it_names(
    two_models: RerankServer, model_dir: Path, other_model_dir: Path
) -> None:
    pairs = [(QUERY, p) for p in PASSAGES]
    expected = {"one": reference(model_dir, pairs), "two": reference(other_model_dir, pairs)}
    assert expected["one"] != pytest.approx(expected["two"], abs=1e-3)  # the two really differ
    async with grpc.aio.insecure_channel(f"127.0.0.1:{two_models.port}") as ch:
        stub = pb_grpc.RerankerStub(ch)
        for name, want in [("", expected["one"]), ("one", expected["one"]), ("two", expected["two"])]:
            resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES, model=name))
            assert list(resp.scores) == pytest.approx(want, **FP32_REORDERED)
            assert resp.model == (name or "one")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES, model="three"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "three" in (err.value.details() or "") and "one, two" in (err.value.details() or "")
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(model="two"))
        assert (info.model, list(info.models)) == ("two", ["one", "two"])
        default = await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert default.model == "one" and len(default.revision) == 12 and default.revision != info.revision
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await stub.GetModelInfo(pb.GetModelInfoRequest(model="nope"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND


class SlowEngine:
    """The real engine, each forward pass taking at least `delay_s`; records which model each launch served."""

    def __init__(self, engine: Any, name: str, log: list[str], delay_s: float) -> None:
        self._engine, self._name, self._log, self._delay = engine, name, log, delay_s

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._engine, attr)

    def launch(self, batch: Sequence[Any]) -> Callable[[], list[float]]:
        self._log.append(self._name)
        time.sleep(self._delay)
        return self._engine.launch(batch)  # type: ignore[no-any-return]


async def test_a_flood_on_one_model_does_not_starve_another(
    model_dir: Path, other_model_dir: Path, engine: Any
) -> None:
    launches: list[str] = []
    two = RerankerModel(test_config(model_dir), str(other_model_dir), "two")
    config = test_config(model_dir, model=f"one={model_dir},two={other_model_dir}", batch_size=4, max_wait_ms=0.0)
    engines = {"one": SlowEngine(engine, "one", launches, 0.02), "two": SlowEngine(two, "two", launches, 0.02)}
    srv = RerankServer(config, engines=engines)  # type: ignore[arg-type]
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            flood = [
                asyncio.ensure_future(stub.Rerank(pb.RerankRequest(query=f"{QUERY} {i}", candidates=PASSAGES[:4])))
                for i in range(40)
            ]  # 40 batches of 4 for model one: about a second of device time
            batcher = srv.batcher("one")
            assert batcher is not None
            await until(lambda: batcher.stats.batches >= 3)
            started = len(launches)
            await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES[:4], model="two"), timeout=10)
            waited = launches[started:].index("two")
            assert waited <= 2, launches  # served after at most the flood's batches already queued on the thread
            await asyncio.gather(*flood)
            after = launches[started + waited + 1 :]
            assert "one" in after, launches  # ... before the flood drained
    finally:
        await srv.stop(0)


async def test_reload_swaps_changed_weights_and_keeps_serving_on_a_bad_one(
    model_dir: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    srv = RerankServer(test_config(live, metrics_port=free_port()))
    await srv.start()
    try:
        pairs = [(QUERY, p) for p in PASSAGES]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            before = await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert await srv.reloader.reload() == {"live": "unchanged"}
            _replace_weights(other_model_dir, live)
            assert await srv.reloader.reload() == {"live": "ok"}
            after = await stub.GetModelInfo(pb.GetModelInfoRequest())
            assert after.revision != before.revision
            resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES))
            assert list(resp.scores) == pytest.approx(reference(other_model_dir, pairs), **FP32_REORDERED)
            (live / "config.json").write_text("{not json")  # a broken replacement: the old weights keep serving
            assert await srv.reloader.reload() == {"live": "failed"}
            resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES))
            assert list(resp.scores) == pytest.approx(reference(other_model_dir, pairs), **FP32_REORDERED)
        m = await asyncio.to_thread(scrape, srv.metrics_port)
        assert sample(m, "reranker_model_reloads_total", model="live", result="ok") == 1
        assert sample(m, "reranker_model_reloads_total", model="live", result="failed") == 1
    finally:
        await srv.stop(0)


async def test_watch_models_reloads_once_the_files_stop_changing(
    model_dir: Path, other_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import server.engine.model

    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    real = server.engine.model.files_signature
    polls: list[object] = []
    copying = threading.Event()  # while set, every look at the directory finds it changed (a slow copy)

    def signature(path: str) -> object:
        sig = real(path)
        polls.append(sig)
        return (sig, len(polls)) if copying.is_set() else sig

    monkeypatch.setattr(server.engine.model, "files_signature", signature)
    srv = RerankServer(test_config(live, watch_models=0.05))
    await srv.start()
    reloads: list[dict[str, str]] = []
    reload = srv.reloader.reload

    async def spy() -> dict[str, str]:
        reloads.append(await reload())
        return reloads[-1]

    srv.reloader.reload = spy  # type: ignore[method-assign]
    try:
        before = srv.service.models["live"].engine.revision
        copying.set()
        _replace_weights(other_model_dir, live)
        seen = len(polls)
        await until(lambda: len(polls) >= seen + 4)  # four polls while the files keep changing: no reload tried
        assert reloads == [] and srv.service.models["live"].engine.revision == before
        copying.clear()  # the copy is done: the next two polls agree, and the model is reloaded
        await until(lambda: srv.service.models["live"].engine.revision != before, 60)
        assert reloads == [{"live": "ok"}]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            resp = await pb_grpc.RerankerStub(ch).Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES))
        pairs = [(QUERY, p) for p in PASSAGES]
        assert list(resp.scores) == pytest.approx(reference(other_model_dir, pairs), **FP32_REORDERED)
    finally:
        await srv.stop(0)


def _replace_weights(source: Path, live: Path) -> None:
    """Write the new model's files over the live directory, each by rename (as a deploy tool would)."""
    for f in source.iterdir():
        tmp = live / f".{f.name}.new"
        shutil.copyfile(f, tmp)
        os.replace(tmp, live / f.name)


def test_sighup_under_load_swaps_without_a_failed_call(model_dir: Path, other_model_dir: Path, tmp_path: Path) -> None:
    """16 clients call while the directory is replaced and SIGHUP arrives: every call succeeds, each answer is the old
    or the new model's, every call started after the swap gets the new one, health stays SERVING."""
    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    pairs = [(QUERY, p) for p in PASSAGES]
    old, new = reference(model_dir, pairs), reference(other_model_dir, pairs)
    server = ServerProcess(live, tmp_path / "server.log", "--max-wait-ms", "1")
    try:
        asyncio.run(_calls_through_a_swap(server, live, other_model_dir, old, new))
    finally:
        server.stop()


async def _calls_through_a_swap(
    server: ServerProcess, live: Path, other: Path, old: list[float], new: list[float]
) -> None:
    outcomes: list[tuple[float, str]] = []  # (start time, "old" | "new")
    errors: list[str] = []
    health: list[int] = []
    swapped_at: list[float] = []
    stop = threading.Event()

    def which(scores: list[float]) -> str:
        if scores == pytest.approx(old, **FP32_REORDERED):
            return "old"
        return "new" if scores == pytest.approx(new, **FP32_REORDERED) else "neither"

    async def client(stub: pb_grpc.RerankerStub) -> None:
        while not stop.is_set():
            t = time.monotonic()
            try:
                resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES), timeout=30)
                outcomes.append((t, which(list(resp.scores))))
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")

    async def watch(stub: pb_grpc.RerankerStub, probe: health_pb2_grpc.HealthStub, revision: str) -> None:
        while not stop.is_set():
            health.append((await probe.Check(health_pb2.HealthCheckRequest(), timeout=5)).status)
            info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)
            if info.revision != revision and not swapped_at:
                swapped_at.append(time.monotonic())
            await asyncio.sleep(0.02)

    async with grpc.aio.insecure_channel(server.target) as ch:
        stub, probe = pb_grpc.RerankerStub(ch), health_pb2_grpc.HealthStub(ch)
        revision = (await stub.GetModelInfo(pb.GetModelInfoRequest())).revision
        tasks = [asyncio.ensure_future(client(stub)) for _ in range(16)]
        tasks.append(asyncio.ensure_future(watch(stub, probe, revision)))
        await asyncio.sleep(0.5)
        await asyncio.to_thread(_replace_weights, other, live)
        server.proc.send_signal(signal.SIGHUP)
        await until(lambda: bool(swapped_at), 60)
        await until(lambda: sum(t > swapped_at[0] for t, _ in outcomes) >= 32, 60)  # answers to calls sent after it
        stop.set()
        await asyncio.gather(*tasks)
    assert swapped_at, f"no swap seen:\n{server.log()[-2000:]}"
    assert not errors, errors[:5]
    assert {o for _, o in outcomes} == {"old", "new"}, {o for _, o in outcomes}
    assert all(o == "new" for t, o in outcomes if t > swapped_at[0]), "an old answer after the swap"
    assert set(health) == {health_pb2.HealthCheckResponse.SERVING}
    assert "reloaded: revision" in server.log()


async def test_client_chooses_the_model(two_models: RerankServer, model_dir: Path, other_model_dir: Path) -> None:
    from clients import AsyncRerankerClient, ModelNotFoundError

    pairs = [(QUERY, p) for p in PASSAGES]
    async with AsyncRerankerClient(f"127.0.0.1:{two_models.port}") as client:
        out = await client.rerank(QUERY, PASSAGES, model="two")
        assert out.model == "two" and out.scores == pytest.approx(reference(other_model_dir, pairs), **FP32_REORDERED)
        assert await client.score_pairs(pairs, model="one") == pytest.approx(
            reference(model_dir, pairs), **FP32_REORDERED
        )
        info = await client.model_info("two")
        assert (info.model, info.models, len(info.revision)) == ("two", ["one", "two"], 12)
        with pytest.raises(ModelNotFoundError, match="one, two"):
            await client.rerank(QUERY, PASSAGES, model="three")


async def test_rest_routes_choose_models(
    two_models: RerankServer, model_dir: Path, other_model_dir: Path, aiohttp_client: Any
) -> None:
    from rest_bridge import BridgeConfig
    from rest_bridge.app import create_app

    pairs = [(QUERY, p) for p in PASSAGES]
    raw = {"one": reference(model_dir, pairs), "two": reference(other_model_dir, pairs)}
    config = BridgeConfig(grpc_target=f"127.0.0.1:{two_models.port}", legacy1_model="two", legacy2_model="two")
    bridge = await aiohttp_client(create_app(config))

    resp = await bridge.post("/v1/rerank", json={"model": "two", "query": QUERY, "documents": PASSAGES})
    body = await resp.json()
    assert resp.status == 200 and body["model"] == "two"
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert [by_index[i] for i in range(len(PASSAGES))] == pytest.approx(
        [sigmoid(x) for x in raw["two"]], **FP32_REORDERED
    )

    resp = await bridge.post(
        "/rerank", json={"model": "one", "query": QUERY, "documents": PASSAGES, "raw_scores": True}
    )
    body = await resp.json()
    assert body["model"] == "one"
    by_index = {r["index"]: r["relevance_score"] for r in body["results"]}
    assert [by_index[i] for i in range(len(PASSAGES))] == pytest.approx(raw["one"], **FP32_REORDERED)

    resp = await bridge.post("/rerank", json={"query": QUERY, "compare_to": PASSAGES})  # legacy 2: --legacy2-model
    assert (await resp.json())["data"] == pytest.approx([sigmoid(x) for x in raw["two"]], **FP32_REORDERED)
    legacy1 = {"text_pairs": [list(p) for p in pairs]}
    resp = await bridge.post("/bge-reranker-base/post", json=legacy1)
    assert (await resp.json())["rerank_scores"] == pytest.approx(raw["two"], **FP32_REORDERED)

    for path in ("/v1/rerank", "/v2/rerank"):
        resp = await bridge.post(path, json={"model": "rerank-v3.5", "query": QUERY, "documents": PASSAGES})
        assert resp.status == 404 and "one, two" in (await resp.json())["message"]
    resp = await bridge.post("/rerank", json={"model": "nope", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 404 and "loaded models: one, two" in (await resp.json())["error"]

    resp = await bridge.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["one", "two"]


async def test_rest_with_one_model_accepts_any_name(
    server: RerankServer, aiohttp_client: Any, flag_reranker: Any
) -> None:
    from rest_bridge import BridgeConfig
    from rest_bridge.app import create_app

    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{server.port}")))
    resp = await bridge.post("/v1/rerank", json={"model": "rerank-english-v3.0", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 200
    by_index = {r["index"]: r["relevance_score"] for r in (await resp.json())["results"]}
    expected = flag_reranker.compute_score([[QUERY, p] for p in PASSAGES], normalize=True)  # scored by the one model
    assert [by_index[i] for i in range(len(PASSAGES))] == pytest.approx(expected, **FP32_REORDERED)
    resp = await bridge.get("/models")
    assert [m["id"] for m in (await resp.json())["data"]] == [server.config.default_model]


def sigmoid(x: float) -> float:
    import math

    return 1 / (1 + math.exp(-x))


def test_weights_copied_over_in_place_change_nothing_until_sighup(
    model_dir: Path, other_model_dir: Path, tmp_path: Path
) -> None:
    """The served files overwritten in place (`cp` over them: truncated, then written), three times in a row and once
    with identical bytes, under load: every answer is still the old model's and the server stays up (the weights
    are the process's own, not a mapping of the file); SIGHUP then swaps in the new ones with no failed call."""
    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    pairs = [(QUERY, p) for p in PASSAGES]
    old, new = reference(model_dir, pairs), reference(other_model_dir, pairs)
    server = ServerProcess(live, tmp_path / "server.log", "--max-wait-ms", "1")
    try:
        asyncio.run(_calls_through_copies_in_place(server, live, model_dir, other_model_dir, old, new))
    finally:
        server.stop()


async def _calls_through_copies_in_place(
    server: ServerProcess, live: Path, first: Path, other: Path, old: list[float], new: list[float]
) -> None:
    answers: list[str] = []
    errors: list[str] = []
    stop = asyncio.Event()

    async def client(stub: pb_grpc.RerankerStub) -> None:
        while not stop.is_set():
            try:
                resp = await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES), timeout=30)
            except grpc.aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                continue
            scores = list(resp.scores)
            answers.append(
                "old"
                if scores == pytest.approx(old, **FP32_REORDERED)
                else "new"
                if scores == pytest.approx(new, **FP32_REORDERED)
                else "other"
            )

    def copy_over(source: Path) -> None:
        for f in source.iterdir():
            shutil.copyfile(f, live / f.name)  # in place: the same inode, truncated and rewritten

    async with grpc.aio.insecure_channel(server.target) as ch:
        stub = pb_grpc.RerankerStub(ch)
        revision = (await stub.GetModelInfo(pb.GetModelInfoRequest())).revision
        tasks = [asyncio.ensure_future(client(stub)) for _ in range(8)]
        for source in (other, first, other, other):  # the last copy writes the bytes already there
            await asyncio.to_thread(copy_over, source)
        seen = len(answers)
        await until(lambda: len(answers) >= seen + 16, 60)
        before = list(answers)
        server.proc.send_signal(signal.SIGHUP)

        async def swapped() -> bool:
            return (await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=5)).revision != revision

        deadline = time.monotonic() + 60
        while not await swapped():
            assert time.monotonic() < deadline, f"no reload after SIGHUP:\n{server.log()[-2000:]}"
            await asyncio.sleep(0.05)
        seen = len(answers)
        await until(lambda: len(answers) >= seen + 16, 60)
        stop.set()
        await asyncio.gather(*tasks)
    assert server.proc.poll() is None, f"the server died:\n{server.log()[-2000:]}"
    assert not errors, errors[:5]
    assert set(before) == {"old"}, {a for a in before}
    assert set(answers) <= {"old", "new"} and answers[-1] == "new"


def test_a_load_that_saw_its_files_change_is_refused(model_dir: Path, tmp_path: Path) -> None:
    from server.engine.model import ModelLoadError, Snapshot

    live = tmp_path / "live"
    shutil.copytree(model_dir, live)
    snapshot = Snapshot(str(live))
    snapshot.check()  # unchanged: fine
    os.utime(live / "model.safetensors", ns=(1, 1))  # as a copy in progress would leave it
    with pytest.raises(ModelLoadError, match="changed while they were being loaded"):
        snapshot.check()


async def test_a_named_model_still_loading_is_unavailable_and_an_unknown_one_not_found(
    model_dir: Path, other_model_dir: Path, engine: Any
) -> None:
    srv = RerankServer(test_config(model_dir, model=f"one={model_dir},two={other_model_dir}"), engine=engine)
    await srv.bind()  # listening, nothing loaded yet
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            stub = pb_grpc.RerankerStub(ch)
            for name, code, details in [
                ("two", grpc.StatusCode.UNAVAILABLE, "model 'two' is still loading; retry shortly"),
                ("three", grpc.StatusCode.NOT_FOUND, "model 'three' is not served here; loaded models: none yet"),
            ]:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await stub.Rerank(pb.RerankRequest(query=QUERY, candidates=PASSAGES, model=name))
                assert (err.value.code(), err.value.details()) == (code, details)
    finally:
        await srv.stop(0)


def _info_calls(srv: RerankServer) -> float:
    """GetModelInfo calls the server answered, from its metrics registry."""
    labels = {"method": "GetModelInfo", "code": "OK"}
    return srv.metrics.registry.get_sample_value("reranker_requests_total", labels) or 0.0


@pytest.fixture
async def three_models(model_dir: Path, other_model_dir: Path, engine: Any) -> AsyncIterator[RerankServer]:
    """one, two (other weights) and three (one's weights again), all loaded."""
    config = test_config(model_dir, model=f"one={model_dir},two={other_model_dir},three={model_dir}")
    two = RerankerModel(config, str(other_model_dir), "two")
    srv = RerankServer(config, engines={"one": engine, "two": two, "three": engine})
    await srv.start()
    yield srv
    await srv.stop(0)


async def test_the_bridge_caches_the_model_list_and_looks_again_for_a_name_it_does_not_know(
    three_models: RerankServer, model_dir: Path, aiohttp_client: Any
) -> None:
    from rest_bridge import BridgeConfig
    from rest_bridge.app import create_app

    three = three_models.service.models.pop("three")  # not loaded yet, as far as anyone can tell
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{three_models.port}")))
    before = _info_calls(three_models)
    for _ in range(3):
        resp = await bridge.post("/v1/rerank", json={"model": "one", "query": QUERY, "documents": PASSAGES})
        assert resp.status == 200 and (await resp.json())["model"] == "one"
    assert _info_calls(three_models) == before + 1  # the list was read once, then reused
    three_models.service.models["three"] = three  # loaded since the bridge looked
    resp = await bridge.post("/v1/rerank", json={"model": "three", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 200 and (await resp.json())["model"] == "three"
    assert _info_calls(three_models) == before + 1  # served (then loading) from the start: already in the list
    resp = await bridge.post("/v1/rerank", json={"model": "four", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 404 and "one, two, three" in await resp.text()
    assert _info_calls(three_models) == before + 2  # an unknown name made it look again
    resp = await bridge.get("/v1/models")
    assert [m["id"] for m in (await resp.json())["data"]] == ["one", "two", "three"]


async def test_server_rest_port_routes_legacy_models_by_flag(
    two_models: RerankServer, model_dir: Path, other_model_dir: Path
) -> None:
    import aiohttp

    from server.__main__ import _start_bridge

    argv = ["--model", f"one={model_dir},two={other_model_dir}", "--legacy1-model", "two", "--legacy2-model", "two"]
    config = dataclasses.replace(load_config([*argv, "--rest-port", "1"], {}), host="127.0.0.1", rest_port=free_port())
    assert (config.legacy1_model, config.legacy2_model) == ("two", "two")
    runner = await _start_bridge(config, grpc_target=f"127.0.0.1:{two_models.port}")
    pairs = [(QUERY, p) for p in PASSAGES]
    raw = reference(other_model_dir, pairs)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{config.rest_port}") as http:
            async with http.post("/bge-reranker-base/post", json={"text_pairs": [list(p) for p in pairs]}) as resp:
                assert (await resp.json())["rerank_scores"] == pytest.approx(raw, **FP32_REORDERED)
            async with http.post("/rerank", json={"query": QUERY, "compare_to": PASSAGES}) as resp:
                assert (await resp.json())["data"] == pytest.approx([sigmoid(x) for x in raw], **FP32_REORDERED)
    finally:
        await runner.cleanup()


async def test_a_model_still_loading_is_never_answered_by_another(
    two_models: RerankServer, aiohttp_client: Any
) -> None:
    from rest_bridge import BridgeConfig
    from rest_bridge.app import create_app

    two = two_models.service.models.pop("two")  # configured, still loading
    bridge = await aiohttp_client(create_app(BridgeConfig(grpc_target=f"127.0.0.1:{two_models.port}")))
    resp = await bridge.post("/v1/rerank", json={"model": "two", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 503, await resp.text()  # not "one"'s scores under the name "two"
    two_models.service.models["two"] = two  # loaded now
    resp = await bridge.post("/v1/rerank", json={"model": "two", "query": QUERY, "documents": PASSAGES})
    assert resp.status == 200 and (await resp.json())["model"] == "two"
