"""HTTPS: a coordinator served with a certificate of a CA of the test's own (made on the fly). A miner that
trusts that CA (``--ca-cert``) mines through it; one that trusts only the system's authorities, or another
CA, stops at once with a one-line error and a non-zero exit; a certificate without its key is refused
before the coordinator starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from gradpool.processes import Processes
from tests.helpers.cli import gradpool
from tests.helpers.miners import QUICK_ROUNDS, mine_args
from tests.helpers.tls import make_tls

pytestmark = pytest.mark.integration


@pytest.mark.slow  # a coordinator and miner processes
def test_a_miner_trusts_the_coordinators_ca_and_nothing_else(tmp_path: Path, corpus_file: Path) -> None:
    tls, other = make_tls(tmp_path / "tls"), make_tls(tmp_path / "other", "other")
    procs = Processes(tmp_path / "logs", env=QUICK_ROUNDS)

    def miner(name: str, *extra: str) -> int:
        args = mine_args(url, tmp_path / f"{name}.pem", tmp_path / f"{name}-state")
        return procs.start(name, [*args, "--max-rounds", "1", *extra]).wait(timeout=120)

    try:
        serve = ["--state-dir", str(tmp_path / "coordinator"), "--corpus", str(corpus_file), "--port", "0"]
        serve += ["--ssl-certfile", str(tls.cert), "--ssl-keyfile", str(tls.key)]
        url = procs.start_coordinator(serve, tmp_path / "ready.json", timeout_s=120)
        assert url.startswith("https://127.0.0.1:")
        assert miner("trusting", "--ca-cert", str(tls.ca)) == 0, procs.log("trusting")
        assert "round 0: upload taken" in procs.log("trusting")
        for name, extra in (("system-only", ()), ("other-ca", ("--ca-cert", str(other.ca)))):
            assert miner(name, *extra) == 1, procs.log(name)
            last = procs.log(name).strip().splitlines()[-1]
            assert "TLS certificate of 127.0.0.1 does not verify" in last and "--ca-cert" in last, last
            assert "Traceback" not in procs.log(name)
        status = gradpool("status", "--coordinator", url, "--ca-cert", str(tls.ca), "--json")
        assert status.returncode == 0 and '"miners": 1' in status.stdout, status.stderr
        replicas = gradpool("status", "--coordinator", f"https://127.0.0.1:9,{url}", "--ca-cert", str(tls.ca))
        assert replicas.returncode == 0 and f"answered by {url} (1 before it" in replicas.stdout, (
            replicas.stderr
        )
        untrusted = gradpool("status", "--coordinator", url)
        assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
    finally:
        procs.stop_all()


def test_a_certificate_without_its_key_is_refused_at_start(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "tls")
    state = ["--state-dir", str(tmp_path / "s")]
    half = gradpool("coordinator", "serve", *state, "--ssl-certfile", str(tls.cert))
    assert half.returncode == 2 and "ssl_certfile and ssl_keyfile go together" in half.stderr, half.stderr
    swapped = ["--ssl-certfile", str(tls.key), "--ssl-keyfile", str(tls.cert)]
    bad = gradpool("coordinator", "serve", *state, "--port", "0", *swapped)
    assert bad.returncode == 2 and "cannot serve HTTPS" in bad.stderr and "Traceback" not in bad.stderr
    nothing = ["--ssl-certfile", str(tmp_path / "none.pem"), "--ssl-keyfile", str(tmp_path / "none.key")]
    missing = gradpool("coordinator", "serve", *state, "--port", "0", *nothing)
    assert missing.returncode == 2 and "cannot serve HTTPS" in missing.stderr, missing.stderr
