"""The chaos soak's checks can fail: a version that changes, or is not finite, is a violation."""

from __future__ import annotations

import json

import httpx

from benchmarks.chaos_checks import Checks


def test_the_checks_catch_a_version_that_changes_or_is_not_finite() -> None:
    answers = {"hash": "a" * 64, "loss": 3.0}

    def coordinator(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/round":
            return httpx.Response(200, json={"round": 0, "version": 1})
        if request.url.path == "/v1/versions/0":
            return httpx.Response(200, json={"param_hash": "0" * 64, "eval_loss": 5.0})
        if request.url.path == "/v1/versions/1":  # json.dumps writes NaN, as a broken server might
            body = {"param_hash": answers["hash"], "eval_loss": answers["loss"]}
            return httpx.Response(200, content=json.dumps(body).encode())
        return httpx.Response(404, json={"error": {"code": "not_found", "message": "no"}})

    checks = Checks()
    with httpx.Client(base_url="http://coordinator.test", transport=httpx.MockTransport(coordinator)) as http:
        checks.poll(http)
        assert checks.violations == []
        answers["hash"] = "b" * 64
        checks.poll(http)
        answers["loss"] = float("nan")
        checks.poll(http)
    assert len(checks.violations) == 3
    assert checks.violations[0].startswith("version 1 changed")
    assert any("held-out loss nan" in v for v in checks.violations)
