"""Test-suite hygiene: a run stopped by SIGTERM (a CI timeout) still stops the processes its tests started."""

import os
import subprocess
import sys
import time

TEST = """
import subprocess, time, pytest

@pytest.fixture
def child(tmp_path_factory):
    process = subprocess.Popen(["sleep", "300"])
    with open(PID_FILE + ".tmp", "w") as f:
        f.write(str(process.pid))
    os.replace(PID_FILE + ".tmp", PID_FILE)
    yield process
    process.kill()
    process.wait()

def test_runs_until_stopped(child):
    time.sleep(300)
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_sigterm_unwinds_fixtures_and_stops_their_processes(tmp_path):
    pid_file = tmp_path / "child.pid"
    (tmp_path / "test_stopped.py").write_text(f"import os\nPID_FILE = {str(pid_file)!r}\n" + TEST)
    env = dict(os.environ, PYTHONPATH=os.path.dirname(__file__) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider", "test_stopped.py"]
    run = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    child = None
    try:
        deadline = time.monotonic() + 120
        while child is None and time.monotonic() < deadline and run.poll() is None:
            if pid_file.exists():
                child = int(pid_file.read_text())
            time.sleep(0.2)
        assert child is not None and alive(child), run.stdout.read().decode() if run.poll() is not None else ""
        run.terminate()  # SIGTERM, as a CI timeout sends
        run.wait(timeout=60)
        deadline = time.monotonic() + 10
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not alive(child), "the fixture's process outlived the SIGTERMed test run"
    finally:
        if run.poll() is None:
            run.kill()
            run.wait(timeout=30)
        if child is not None and alive(child):
            os.kill(child, 9)
