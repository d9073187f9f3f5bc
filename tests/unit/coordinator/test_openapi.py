"""The OpenAPI document declares every error a route gives, with the one error body; a schema-driven sweep of
bad requests gets only declared statuses."""

from __future__ import annotations

import itertools
from typing import Any

from tests.helpers.pool import OpenPool, payload

BAD_VALUES = ["-1", "abc", str(2**63), "0", "7", "1e3", "%00", "x" * 80]
OK = {200, 206, 307}


def _operations(spec: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    return [(path, method, op) for path, item in spec["paths"].items() for method, op in item.items()]


def test_every_error_response_has_the_error_body(open_pool: OpenPool) -> None:
    with open_pool() as pool:
        spec = pool.client.get("/openapi.json").json()
    assert spec["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for path, method, op in _operations(spec):
        codes = {int(c) for c in op["responses"] if c[0] in "45"}
        assert 500 in codes, f"{method} {path}"
        for code in codes - {416}:
            ref = op["responses"][str(code)]["content"]["application/json"]["schema"]["$ref"]
            assert ref.endswith("/ErrorBody"), f"{method} {path} {code}"


def test_bad_requests_get_only_declared_statuses(open_pool: OpenPool) -> None:
    """Every parameter of every operation takes each bad value in turn, and the signed POSTs take unsigned,
    garbage and oversized bodies: each answer's status is one the operation declares."""
    with open_pool() as pool:
        miner = pool.miner()
        miner.upload(0, payload(0, 0))
        spec = pool.client.get("/openapi.json").json()
        undeclared: list[str] = []
        for path, method, op in _operations(spec):
            declared = OK | {int(c) for c in op["responses"] if c != "default"}
            params = op.get("parameters", [])
            names = [p["name"] for p in params if p["in"] == "path"]
            queries = [p["name"] for p in params if p["in"] == "query"]
            for values in itertools.product(BAD_VALUES, repeat=len(names)) if names else [()]:
                url = path
                for name, value in zip(names, values, strict=True):
                    url = url.replace("{" + name + "}", value)
                for query in [None, *queries]:
                    full = url if query is None else f"{url}?{query}={values[0] if values else 'abc'}"
                    if method == "get":
                        answers = [pool.client.get(full)]
                    else:
                        answers = [
                            pool.client.post(full, content=b"{}"),
                            miner.post(full, b"\xff" * 100),
                            pool.client.post(full, content=b"0" * (5 * 2**20)),
                        ]
                    undeclared += [
                        f"{method.upper()} {full} -> {r.status_code}"
                        for r in answers
                        if r.status_code not in declared
                    ]
                    bodies = [r for r in answers if r.status_code >= 400 and r.status_code != 416]
                    assert all(set(r.json()) == {"error"} for r in bodies), full
        assert not undeclared, "\n".join(undeclared[:20])
