"""The ``remote`` client never trusts a reply: every kind of bad answer from a fake server."""

from __future__ import annotations

import base64
import json
import logging

import numpy as np
import pytest
import torch
from test_samplers_backends import problem

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

from scqbm.samplers import (
    RemoteSampler,
    ServiceConfigurationError,
    ServiceUnavailable,
)
from scqbm.samplers._wire import encode_bits
from scqbm.samplers.service import BackgroundServer

N, READS = 10, 16


def good_reply():
    samples = np.random.default_rng(0).integers(0, 2, size=(READS, N))
    return {"samples": encode_bits(samples), "info": {"backend": "gibbs", "seconds": 0.01}}


def packed(rows, cols, nbytes=None, fill=0):
    data = bytes([fill]) * (rows * -(-cols // 8) if nbytes is None else nbytes)
    return base64.b64encode(data).decode()


BAD_REPLIES = {
    "too_few_bytes": {"samples": {"shape": [READS, N], "data": packed(READS, N, 20)}},
    "extra_bytes": {"samples": {"shape": [READS, N], "data": packed(READS, N, 33)}},
    "float_shape": {"samples": {"shape": [16.7, N], "data": packed(READS, N)}},
    "wrong_reads": {"samples": {"shape": [READS - 1, N], "data": packed(READS - 1, N)}},
    "wrong_units": {"samples": {"shape": [READS, N + 1], "data": packed(READS, N + 1)}},
    "stray_bits": {"samples": {"shape": [READS, N], "data": packed(READS, N, fill=0xFF)}},
    "bad_base64": {"samples": {"shape": [READS, N], "data": "@@@"}},
    "no_samples": {"info": {}},
    "not_an_object": [1, 2, 3],
    "info_wrong_type": {**good_reply(), "info": {"seconds": "fast"}},
    "info_not_a_dict": {**good_reply(), "info": [1]},
    "info_bool_as_count": {**good_reply(), "info": {"sweeps": True}},
}


class Fake:
    """ASGI app answering ``/v1/sample`` with a fixed status and body."""

    def __init__(self):
        self.status, self.body, self.requests = 200, b"{}", 0

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return
        self.requests += 1
        await send(
            {
                "type": "http.response.start",
                "status": self.status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": self.body})


@pytest.fixture(scope="module")
def fake():
    app = Fake()
    server = BackgroundServer(app).start()
    yield app, server
    server.stop()


def sampler(url, **kwargs):
    return RemoteSampler(N, url, token="t", max_retries=1, backoff=0.0, **kwargs)


def test_a_good_reply_is_accepted_and_unknown_info_keys_are_dropped(fake):
    app, server = fake
    reply = good_reply()
    reply["info"].update(fallback=1000, evil={"x": 1}, sweeps=51)
    app.status, app.body = 200, json.dumps(reply).encode()
    h, W, _ = problem("bm", N)
    result = sampler(server.url).sample(h, W, READS)
    assert result.samples.shape == (READS, N)
    assert "fallback" not in result.info and "evil" not in result.info
    assert result.info["sweeps"] == 51 and result.info["attempts"] == 1


@pytest.mark.parametrize("kind", sorted(BAD_REPLIES))
def test_bad_replies_are_an_unavailable_service(fake, kind, caplog):
    app, server = fake
    app.status, app.body = 200, json.dumps(BAD_REPLIES[kind]).encode()
    h, W, _ = problem("bm", N)
    app.requests = 0
    with pytest.raises(ServiceUnavailable, match="malformed answer"):
        sampler(server.url).sample(h, W, READS)
    assert app.requests == 2  # retried like a 5xx
    # Under the fallback policy training goes on with local chains, counted.
    fallback = sampler(server.url, on_failure="fallback")
    with caplog.at_level(logging.WARNING, logger="scqbm.samplers._remote"):
        result = fallback.sample(h, W, READS)
    assert result.info["fallback"] == 1 and fallback.fallbacks == 1


def test_non_json_and_oversized_replies_fall_back(fake):
    app, server = fake
    h, W, _ = problem("bm", N)
    for body in (b"<html>not json</html>", b"[" * 100_000, b" " * (3 << 20)):
        app.status, app.body = 200, body
        fallback = sampler(server.url, on_failure="fallback")
        assert fallback.sample(h, W, READS).info["fallback"] == 1


@pytest.mark.parametrize("status", [401, 403])
def test_auth_failures_stop_at_once_even_under_fallback(fake, status):
    app, server = fake
    app.status = status
    app.body = json.dumps({"error": {"code": "x", "message": "Invalid token."}}).encode()
    app.requests = 0
    h, W, _ = problem("bm", N)
    with pytest.raises(ServiceConfigurationError, match=rf"Configuration error.*HTTP {status}"):
        sampler(server.url, on_failure="fallback").sample(h, W, READS)
    assert app.requests == 1


def test_decode_bits_is_exact():
    from scqbm.samplers._wire import ProtocolError, decode_bits

    samples = torch.randint(0, 2, (5, 13)).numpy()
    assert np.array_equal(decode_bits(encode_bits(samples), (5, 13)), samples)
    with pytest.raises(ProtocolError, match="needs 10"):
        decode_bits({"shape": [5, 13], "data": packed(5, 13, 9)}, (5, 13))
