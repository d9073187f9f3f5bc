"""What several test modules share: a coordinator app driven in-process (``pool``), short real networks of
cheating miners (``cheats``), miner processes (``miners``) and bounded waiting (``waiting``). Test modules
import from here, never from one another (tests/unit/test_test_layout.py checks it)."""
