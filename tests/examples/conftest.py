"""Fixtures for the example tests: built artifacts and a real `litevfs serve` on loopback."""

import os
import pathlib
import subprocess
import threading

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
READY = "litevfs serve: listening on "


def artifact(env: str, rel: str) -> pathlib.Path:
    path = pathlib.Path(os.environ.get(env) or ROOT / rel)
    if not path.exists():
        pytest.fail(f"{path} is missing: run `cargo xtask test` (it builds the artifacts first)")
    return path


@pytest.fixture(scope="session")
def bin_path() -> pathlib.Path:
    return artifact("LITEVFS_BIN", "target/release/litevfs")


@pytest.fixture(scope="session")
def ext_path() -> pathlib.Path:
    return artifact("LITEVFS_EXT", "target/release/liblitevfs.so")


@pytest.fixture(scope="session")
def examples_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("LITEVFS_EXAMPLES_DIR") or ROOT / "target/release/examples")


@pytest.fixture
def server(bin_path, tmp_path):
    """A page store on a free loopback port; yields its base URL."""
    proc = subprocess.Popen(
        [bin_path, "serve", "--listen", "127.0.0.1:0", "--data-dir", tmp_path / "data"],
        stdout=subprocess.PIPE,
        text=True,
    )
    found = {}

    def wait_ready():
        for line in proc.stdout:
            if line.startswith(READY):
                found["url"] = line[len(READY):].strip()
                break
        for _ in proc.stdout:  # keep draining so the server never blocks on a full pipe
            pass

    threading.Thread(target=wait_ready, daemon=True).start()
    for _ in range(200):
        if "url" in found or proc.poll() is not None:
            break
        threading.Event().wait(0.05)
    if "url" not in found:
        proc.kill()
        pytest.fail("litevfs serve did not start")
    yield found["url"]
    proc.kill()
    proc.wait()


@pytest.fixture
def client_env(server, tmp_path):
    """Environment for one client process: the store's URL and a cache dir of its own."""

    def make(name: str) -> dict:
        env = dict(os.environ)
        env["LITEFS_CLOUD_HOST"] = server
        env["LITEVFS_CACHE_DIR"] = str(tmp_path / f"cache-{name}")
        return env

    return make
