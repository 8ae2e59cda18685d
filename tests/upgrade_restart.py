"""Restart command of the rolling upgrade tests: `python upgrade_restart.py RUN_DIR NODE`.

It reads RUN_DIR/NODE.spec.json, written by test_upgrade.py: the daemon's command line
(argv), environment (env), log file (log) and pid file (pid_file), and whether to wait
for the test (gate). With gate set it creates RUN_DIR/NODE.ready and waits for the test
to create RUN_DIR/NODE.go, so that the test can check the cluster before the node goes
down. Then it stops the running daemon with SIGTERM (SIGKILL after STOP_TIMEOUT_S), writes
the time it was gone to RUN_DIR/NODE.stopped, and starts the new one without EMS_PROTO_MIN
and EMS_PROTO_MAX, so that it speaks the build's range. It exits without waiting for the new daemon to serve, as `systemctl restart`
does; `ems upgrade` waits for that.
"""
import json
import os
import signal
import subprocess
import sys
import time

GATE_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 20.0


def gone(pid: int) -> bool:
    """Whether the process has exited. A zombie counts: the test process reaps its own
    children later."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.02)
    return gone(pid)


def main(run_dir: str, node: str) -> int:
    with open(os.path.join(run_dir, f"{node}.spec.json")) as f:
        spec = json.load(f)

    if spec.get("gate"):
        open(os.path.join(run_dir, f"{node}.ready"), "w").close()
        go = os.path.join(run_dir, f"{node}.go")
        deadline = time.monotonic() + GATE_TIMEOUT_S
        while not os.path.exists(go):
            if time.monotonic() > deadline:
                print(f"the test did not allow the restart of {node} within "
                      f"{GATE_TIMEOUT_S:.0f} s", file=sys.stderr)
                return 4
            time.sleep(0.02)

    with open(spec["pid_file"]) as f:
        old_pid = int(f.read())
    if not gone(old_pid):
        os.kill(old_pid, signal.SIGTERM)
        if not wait_gone(old_pid, STOP_TIMEOUT_S):
            os.kill(old_pid, signal.SIGKILL)
            wait_gone(old_pid, 5.0)
    # The time the old process was gone: blocks written to the node later are in the new
    # process.
    with open(os.path.join(run_dir, f"{node}.stopped"), "w") as f:
        f.write(repr(time.time()))

    env = {name: value for name, value in spec["env"].items()
           if name not in ("EMS_PROTO_MIN", "EMS_PROTO_MAX")}
    with open(spec["log"], "a") as log:
        process = subprocess.Popen(spec["argv"], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    with open(spec["pid_file"], "w") as f:
        f.write(str(process.pid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
