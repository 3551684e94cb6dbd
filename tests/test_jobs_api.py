"""The jobs HTTP API (issue 16 item 7-8) on a real uvicorn server on 127.0.0.1, its job
service running, against the real authorization server; and BrokerClient's job methods."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from support import Served, login, wait_for
from tokenbroker import Broker, BrokerClient, parse_settings
from tokenbroker.api.app import create_app
from tokenbroker.client.sse import EventParser
from tokenbroker.config import JobsSettings
from tokenbroker.core.crypto import generate_key
from tokenbroker.engine.consumers import hash_key, new_key
from tokenbroker.errors import JobNotRetryableError, UnknownJobError
from tokenbroker.jobs.events import Completed, PhaseUpdate
from tokenbroker.jobs.service import JobService
from tokenbroker.testing import AuthorizationServer
from tokenbroker.testing.faults import Fault

FAST = {"heartbeat_seconds": 0.2, "lease_seconds": 1.0, "poll_seconds": 0.05}
ACCOUNTS = [("alice", "alice-pw"), ("bob", "bob-pw"), ("carol", "carol-pw")]


class Stage:
    """A broker with providers ``db`` (a login pool) and ``svc``; consumers ``ops`` (db, svc,
    jobs), ``dbops`` (db, jobs), ``reader`` (db, no jobs); the API served, its jobs run
    (or not, with ``run=False``)."""

    def __init__(
        self,
        server: AuthorizationServer,
        run: bool = True,
        defaults: dict[str, Any] | None = None,
        **jobs: Any,
    ) -> None:
        server.add_account("carol", "carol-pw")
        self.keys = {name: new_key() for name in ("ops", "dbops", "reader")}
        allow = {"ops": ["db", "svc", "jobs"], "dbops": ["db", "jobs"], "reader": ["db"]}
        credentials = [{"username": u, "password": p} for u, p in ACCOUNTS]
        config = {
            "store": "memory",
            "encryption_keys": [generate_key()],
            "defaults": defaults or {},
            "providers": {
                "db": login(server, credentials=credentials),
                "svc": {**login(server), "credentials": credentials[:1]},
            },
            "consumers": {
                name: {"api_key_sha256": hash_key(key), "allow": allow[name]}
                for name, key in self.keys.items()
            },
        }
        self.broker = Broker(parse_settings(yaml.safe_dump(config), {}))
        self.service = JobService(self.broker, settings=JobsSettings(**{**FAST, **jobs}))
        if run:
            self.service.start_background()
        self.app = create_app(self.broker, job_service=self.service)
        self.served = Served(self.app)
        self.http: httpx.Client = self.served.__enter__()
        self.url = self.served.url

    def auth(self, name: str = "ops") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name]}"}

    def start(self, kind: str = "warm", name: str = "ops", **params: Any) -> httpx.Response:
        params = params or {"provider": "db"}
        return self.http.post(
            "/v1/jobs", json={"kind": kind, "params": params}, headers=self.auth(name)
        )

    def finished(self, job_id: str) -> dict[str, Any]:
        wait_for(lambda: self.service.require(job_id).status.final, "the job to end", 15)
        body: dict[str, Any] = self.http.get(f"/v1/jobs/{job_id}", headers=self.auth()).json()
        return body

    def close(self) -> None:
        self.served.__exit__()
        self.service.stop_background()
        self.broker.close()


@pytest.fixture
def stage(auth_server: AuthorizationServer) -> Iterator[Stage]:
    staged = Stage(auth_server)
    yield staged
    staged.close()


def logins_by_account(server: AuthorizationServer) -> dict[str, int]:
    """How many login requests the server saw per user name."""
    counts: dict[str, int] = {}
    for record in server.requests:
        if record.grant == "login" and isinstance(record.json, dict):
            name = record.json.get("username")
            counts[name] = counts.get(name, 0) + 1
    return counts


def stream_events(response: httpx.Response) -> list[tuple[str, str, str]]:
    """``(id, event, data)`` of every event of a finished streamed response, heartbeats out."""
    parser = EventParser()
    seen = []
    for chunk in response.iter_text():
        seen.extend(parser.feed(chunk))
    return [(e.id, e.event, e.data) for e in seen if e.event != "heartbeat"]


def test_post_is_idempotent_and_the_job_ends_done(stage: Stage) -> None:
    """POST answers 202 with links and no-store; the same kind and params while active is the
    same job with cached: true; the job is readable and ends done at 100."""
    stage.service.stop_background()  # keep the job queued while it is asked for twice
    first = stage.start()
    again = stage.start(name="dbops")
    assert first.status_code == again.status_code == 202
    assert first.headers["cache-control"] == "no-store"
    body = first.json()
    assert body["cached"] is False and again.json()["cached"] is True
    assert again.json()["job_id"] == body["job_id"]
    assert re.fullmatch(r"job_[A-Za-z0-9_-]{22}", body["job_id"])
    assert body["links"] == {
        "self": f"/v1/jobs/{body['job_id']}",
        "stream": f"/v1/jobs/{body['job_id']}/stream",
    }
    stage.service.start_background()
    done = stage.finished(body["job_id"])
    assert (done["status"], done["progress"], done["items"]["ok"]) == ("done", 100, 3)
    assert done["requested_by"] == "ops"


def test_unknown_ids_are_404_never_a_default_state(stage: Stage) -> None:
    """An unknown (well-formed or not) job id is 404 job_not_found on every job route."""
    for job_id in ("job_" + "A" * 22, "nope"):
        for method, path in (
            ("GET", f"/v1/jobs/{job_id}"),
            ("GET", f"/v1/jobs/{job_id}/stream"),
            ("POST", f"/v1/jobs/{job_id}/retry"),
            ("POST", f"/v1/jobs/{job_id}/cancel"),
        ):
            answer = stage.http.request(method, path, headers=stage.auth())
            assert answer.status_code == 404, (method, path)
            assert answer.json()["error"]["code"] == "job_not_found"
            assert answer.headers["cache-control"] == "no-store"


def test_permissions_follow_the_error_table(stage: Stage) -> None:
    """Without the jobs word every jobs route is the 404 of an unknown route; a consumer may
    start no job of a provider it may not use (404 like an unknown provider), and another
    consumer's job of such a provider is 404 byte-identical to an unknown id."""
    unknown_route = stage.http.get("/v1/nothing-here", headers=stage.auth("reader"))
    for method, path in (("POST", "/v1/jobs"), ("GET", "/v1/jobs"), ("GET", "/v1/jobs/x")):
        refused = stage.http.request(method, path, headers=stage.auth("reader"), json={})
        assert (refused.status_code, refused.content) == (404, unknown_route.content)
    for params in ({"provider": "svc"}, {"provider": "no-such"}):
        answer = stage.start(name="dbops", **params)
        assert answer.status_code == 404 and answer.json()["error"]["code"] == "not_found"
    rotate = stage.start("rotate_key", name="dbops", concurrency=1)
    assert rotate.status_code in (400, 404)  # needs every provider (or rejects the param)
    rotate = stage.http.post(
        "/v1/jobs", json={"kind": "rotate_key", "params": {}}, headers=stage.auth("dbops")
    )
    assert rotate.status_code == 404 and rotate.json()["error"]["code"] == "not_found"
    svc_job = stage.start(provider="svc").json()["job_id"]
    hidden = stage.http.get(f"/v1/jobs/{svc_job}", headers=stage.auth("dbops"))
    unknown = stage.http.get("/v1/jobs/job_" + "B" * 22, headers=stage.auth("dbops"))
    assert (hidden.status_code, hidden.content) == (404, unknown.content)
    listed = stage.http.get("/v1/jobs", headers=stage.auth("dbops")).json()["jobs"]
    assert svc_job not in [j["job_id"] for j in listed]
    mine = stage.http.get("/v1/jobs", headers=stage.auth("ops")).json()["jobs"]
    assert svc_job in [j["job_id"] for j in mine]


def test_job_errors_come_from_the_one_table(stage: Stage) -> None:
    """Unknown kind: 400 listing the kinds; bad params: 400 naming the field; too many
    active jobs: 429 with Retry-After; retry of a job with nothing to retry: 409."""
    unknown = stage.start("nope")
    assert unknown.status_code == 400 and unknown.json()["error"]["code"] == "unknown_job_kind"
    assert all(k in unknown.json()["error"]["message"] for k in ("warm", "rotate_key"))
    bad = stage.start(provider="db", colour="red")
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "invalid_job_params"
    assert "params.colour" in bad.json()["error"]["message"]
    assert "red" not in bad.text
    done = stage.finished(stage.start().json()["job_id"])
    again = stage.http.post(f"/v1/jobs/{done['job_id']}/retry", headers=stage.auth())
    assert again.status_code == 409 and again.json()["error"]["code"] == "job_not_retryable"
    stage.service.stop_background()
    for n in range(4):  # jobs.max_running_per_consumer = 4 active jobs
        assert stage.start(provider="db", concurrency=n + 1).status_code == 202
    refused = stage.start(provider="db", concurrency=9)
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    assert int(refused.headers["retry-after"]) >= 1


def test_a_full_queue_answers_429_too_many_jobs_with_retry_after(
    auth_server: AuthorizationServer,
) -> None:
    """With jobs.max_running 1 and max_queued 2, POST /v1/jobs queues up to 3 active jobs
    (any consumer); the next is 429 too_many_jobs with Retry-After and creates no job; a
    repeat of an active job is still its 202 cached answer; a canceled job frees room."""
    stage = Stage(auth_server, run=False, max_running=1, max_queued=2)
    try:
        ids = [stage.start(provider="db", concurrency=n).json()["job_id"] for n in (1, 2)]
        ids.append(stage.start(name="dbops", provider="db", concurrency=3).json()["job_id"])
        refused = stage.start(name="dbops", provider="db", concurrency=4)
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
        assert int(refused.headers["retry-after"]) >= 1
        listed = stage.http.get("/v1/jobs", headers=stage.auth()).json()["jobs"]
        assert sorted(j["job_id"] for j in listed) == sorted(ids)
        repeat = stage.start(provider="db", concurrency=1)
        assert (repeat.status_code, repeat.json()["cached"]) == (202, True)
        assert repeat.json()["job_id"] == ids[0]
        canceled = stage.http.post(f"/v1/jobs/{ids[0]}/cancel", headers=stage.auth())
        assert canceled.json()["status"] == "canceled"
        assert stage.start(name="dbops", provider="db", concurrency=4).status_code == 202
    finally:
        stage.close()


def test_http_retry_of_a_partial_job_asks_again_for_only_the_failed_item(
    auth_server: AuthorizationServer,
) -> None:
    """Three 503s for alice make a POSTed warm job partial (alice transient, retryable)
    after exactly 3 logins for her; POST /v1/jobs/{id}/retry starts a job for alice alone
    and the authorization server sees one more login, for alice only."""
    stage = Stage(auth_server, defaults={"retries": 0})
    try:
        auth_server.reset_records()
        auth_server.inject(Fault(status=503), times=3, path="/api/login")
        job = stage.finished(stage.start(provider="db", concurrency=1).json()["job_id"])
        assert job["status"] == "partial"
        assert [(f["item"], f["retryable"]) for f in job["failed"]] == [("alice", True)]
        assert logins_by_account(auth_server) == {"alice": 3, "bob": 1, "carol": 1}
        auth_server.reset_records()
        retried = stage.http.post(f"/v1/jobs/{job['job_id']}/retry", headers=stage.auth())
        assert retried.status_code == 202 and retried.json()["job_id"] != job["job_id"]
        again = stage.finished(retried.json()["job_id"])
        assert (again["status"], again["items"]) == ("done", {"total": 1, "ok": 1, "failed": 0})
        assert logins_by_account(auth_server) == {"alice": 1}
    finally:
        stage.close()


def test_last_event_id_resume_and_204_for_a_finished_stream(stage: Stage) -> None:
    """A finished job's stream sends every event numbered 1..n ending with completed;
    Last-Event-ID: k returns exactly the events after k; Last-Event-ID: n answers 204."""
    job_id = stage.start().json()["job_id"]
    stage.finished(job_id)
    url = f"/v1/jobs/{job_id}/stream"
    with stage.http.stream("GET", url, headers=stage.auth()) as whole:
        assert whole.status_code == 200
        assert whole.headers["cache-control"] == "no-store"
        assert whole.headers["x-accel-buffering"] == "no"
        events = stream_events(whole)
    ids = [int(i) for i, _, _ in events]
    assert ids == list(range(1, len(ids) + 1)) and events[-1][1] == "completed"
    for k in (1, len(ids) // 2, len(ids) - 1):
        headers = {**stage.auth(), "Last-Event-ID": str(k)}
        with stage.http.stream("GET", url, headers=headers) as resumed:
            assert stream_events(resumed) == events[k:]
    delivered = stage.http.get(url, headers={**stage.auth(), "Last-Event-ID": str(len(ids))})
    assert delivered.status_code == 204 and delivered.content == b""
    bad = stage.http.get(url, headers={**stage.auth(), "Last-Event-ID": "x"})
    assert bad.status_code == 400


def test_a_live_stream_follows_the_job_to_its_end(
    stage: Stage, auth_server: AuthorizationServer
) -> None:
    """A stream opened while the job runs gets phase updates with monotonic progress and the
    final completed event, then ends; BrokerClient.stream yields the same as typed events and
    resumes after a given id."""
    auth_server.latency = 0.1
    job_id = stage.start(provider="db", concurrency=1).json()["job_id"]
    with stage.http.stream("GET", f"/v1/jobs/{job_id}/stream", headers=stage.auth()) as live:
        events = stream_events(live)
    assert events[-1][1] == "completed"
    client = BrokerClient(stage.url, api_key=stage.keys["ops"])
    try:
        typed = [e for e in client.stream(job_id) if e.name != "heartbeat"]
        assert [e.seq for e in typed] == [int(i) for i, _, _ in events]
        assert isinstance(typed[-1], Completed)
        progress = [e.progress for e in typed if isinstance(e, PhaseUpdate)]
        assert progress == sorted(progress)
        assert [e.seq for e in client.stream(job_id, last_event_id=2)] == [e.seq for e in typed[2:]]
        assert client.job(job_id)["status"] == "done"
        assert job_id in [j["job_id"] for j in client.jobs(kind="warm")["jobs"]]
        with pytest.raises(JobNotRetryableError):
            client.retry_job(job_id)
        with pytest.raises(UnknownJobError):
            client.job("job_" + "C" * 22)
        with pytest.raises(UnknownJobError):
            list(client.stream("job_" + "C" * 22))
        started = client.start_job("warm", {"provider": "db"})
        assert started["status"] in ("queued", "running", "done")
        assert client.cancel_job(started["job_id"])["job_id"] == started["job_id"]
    finally:
        client.close()


def test_a_thousand_streams_opened_and_dropped_leave_no_subscriber(
    auth_server: AuthorizationServer,
) -> None:
    """1,000 streams of a queued job through the real route hold 1,000 stream subscriptions
    fanned out from one subscription to the job, and tokenbroker_sse_streams 1000; once the
    clients drop, all are back to 0."""
    stage = Stage(auth_server, run=False)
    try:
        job_id = stage.start().json()["job_id"]
        url = f"{stage.url}/v1/jobs/{job_id}/stream"

        async def hold(count: int, opened: asyncio.Event, drop: asyncio.Event) -> int:
            limits = httpx.Limits(max_connections=count, max_keepalive_connections=0)
            async with httpx.AsyncClient(limits=limits, timeout=60) as client:

                async def one() -> int:
                    async with client.stream("GET", url, headers=stage.auth()) as response:
                        status = response.status_code
                        await drop.wait()
                    return status

                tasks = [asyncio.ensure_future(one()) for _ in range(count)]
                opened.set()
                statuses = await asyncio.gather(*tasks)
            return sum(1 for s in statuses if s == 200)

        async def main() -> int:
            opened, drop = asyncio.Event(), asyncio.Event()
            holder = asyncio.ensure_future(hold(1000, opened, drop))
            await opened.wait()
            deadline = asyncio.get_running_loop().time() + 120
            feeds = stage.app.state.job_feeds
            while feeds.streams < 1000:
                assert asyncio.get_running_loop().time() < deadline, feeds.streams
                await asyncio.sleep(0.05)
            assert (len(feeds), len(stage.service.hub)) == (1, 1)  # one reader for the job
            metrics = httpx.get(f"{stage.url}/metrics", timeout=10).text
            assert re.search(r"^tokenbroker_sse_streams 1000(\.0)?$", metrics, re.M)
            drop.set()
            return await holder

        assert asyncio.run(main()) == 1000
        feeds = stage.app.state.job_feeds
        wait_for(lambda: feeds.streams == 0, "stream subscriptions to be freed", 30)
        wait_for(lambda: len(stage.service.hub) == 0, "the job's subscription freed", 30)
        wait_for(lambda: stage.app.state.streams.open == 0, "the stream gauge to be 0", 30)
        metrics = httpx.get(f"{stage.url}/metrics", timeout=10).text
        assert re.search(r"^tokenbroker_sse_streams 0(\.0)?$", metrics, re.M)
    finally:
        stage.close()
