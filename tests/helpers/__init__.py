"""What several test modules share: a coordinator app driven in-process (``pool``), short real networks of
cheating miners (``cheats``), miner processes (``miners``), a coordinator process held before each commit
(``held_coordinator``), a clock the test moves (``clock``), results kept for the session (``memo``) and
bounded waiting (``waiting``). Test modules import from here, never from one another
(tests/unit/test_test_layout.py checks it)."""
