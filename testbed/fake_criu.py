"""A stand-in `criu` for the operator-command tests: `check`, `dump --stream` and
`restore --stream -d` speaking the real wire protocol through imgmig.criu_sim.

`dump -t PID` sends a checkpoint whose images name PID and then SIGKILLs PID, as CRIU
does; `restore` reads every image, checks inventory.img, starts a `sleep` as "the
restored process" and writes its PID to --pidfile. It also records in the -W dir which
checkpoint it read (restored.json), so a test can see exactly what it got.
Environment: FAKE_CRIU_MIB (size of pages-1.img, default 8), FAKE_CRIU_SLOW (seconds
per MiB written), FAKE_CRIU_FAIL_RESTORE=1 (read inventory.img, then exit 1),
FAKE_CRIU_FAIL_ONCE_AFTER_READ=PATH (read every image, then exit 1 if PATH does not exist
yet, creating it: the first restore fails after reading everything, a retry succeeds),
FAKE_CRIU_FAIL_CHECK=1, FAKE_CRIU_EXPECT_FILE=PATH (restore fails unless PATH exists).

Run as: python3 -m testbed.fake_criu ARGS (PYTHONPATH at the repo root).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from imgmig import criu_sim

MIB = 1 << 20
NAMES = ["files.img", "core-1.img", "mm-1.img", "pagemap-1.img", "pages-1.img", "pstree.img", "inventory.img"]


def images(pid: int, mib: int) -> list[tuple[str, bytes]]:
    """A checkpoint of PID in the order CRIU writes it: inventory.img last."""
    result = []
    for name in NAMES:
        seed = hashlib.sha256(f"{pid}/{name}".encode()).digest()
        size = mib * MIB if name == "pages-1.img" else 512
        data = (seed * (size // len(seed) + 1))[:size]
        if name == "inventory.img":
            data = json.dumps({"pid": pid, "mib": mib}).encode()
        result.append((name, data))
    return result


def dump(images_dir: str, pid: int) -> int:
    slow = float(os.environ.get("FAKE_CRIU_SLOW", "0"))
    client = criu_sim.DumpClient(images_dir)
    for name, data in images(pid, int(os.environ.get("FAKE_CRIU_MIB", "8"))):
        fd = client.open_image(name)
        try:
            for start in range(0, len(data), MIB):
                criu_sim.write_all(fd, data[start:start + MIB])
                time.sleep(slow)
        finally:
            os.close(fd)
    os.kill(pid, signal.SIGKILL)  # CRIU's default after a dump: the task is gone from here
    client.close()
    return 0


def restore(images_dir: str, pidfile: str, workdir: Path) -> int:
    client = criu_sim.RestoreClient(images_dir)
    inventory = client.read_image("inventory.img")
    if inventory is None:
        print("Error: no inventory.img", file=sys.stderr)
        return 1
    expected_file = os.environ.get("FAKE_CRIU_EXPECT_FILE")
    if expected_file and not Path(expected_file).exists():
        print(f"Error (fake): {expected_file} is not there before the restore", file=sys.stderr)
        return 1
    if os.environ.get("FAKE_CRIU_FAIL_RESTORE") == "1":
        print("Error (fake): restore failed on purpose after inventory.img", file=sys.stderr)
        return 1
    dumped = json.loads(inventory)
    pid = dumped["pid"]
    digests = {}
    for name, expected in images(pid, dumped["mib"]):
        if name == "inventory.img":
            continue
        got = client.read_image(name)
        if got != expected:
            print(f"Error: {name} differs from what was dumped", file=sys.stderr)
            return 1
        digests[name] = hashlib.sha256(got).hexdigest()
    client.close()
    read = {"dumped_pid": pid, "images": digests}
    fail_once = os.environ.get("FAKE_CRIU_FAIL_ONCE_AFTER_READ")
    if fail_once and not Path(fail_once).exists():
        Path(fail_once).touch()
        (workdir / "restored.json").write_text(json.dumps(read | {"pid": None}))
        print("Error (fake): restore failed on purpose after reading every image", file=sys.stderr)
        return 1
    process = subprocess.Popen(["sleep", "300"], start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    Path(pidfile).write_text(f"{process.pid}\n")
    (workdir / "restored.json").write_text(json.dumps(read | {"pid": process.pid}))
    return 0


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fake-criu")
    parser.add_argument("action", choices=["check", "dump", "restore"])
    parser.add_argument("--stream", action="store_true")
    parser.add_argument("-D", dest="images_dir")
    parser.add_argument("-t", dest="pid", type=int)
    parser.add_argument("-d", dest="detach", action="store_true")
    parser.add_argument("--pidfile")
    parser.add_argument("-o", dest="log")
    parser.add_argument("-W", dest="workdir", default=".")
    parser.add_argument("--feature")
    args, _unknown = parser.parse_known_args(argv)
    if args.action == "check" and args.feature == "uffd-noncoop" and os.environ.get("FAKE_CRIU_NO_UFFD") == "1":
        print("Error (fake): UFFD is not supported", file=sys.stderr)  # as without userfaultfd
        return 1
    if args.action == "check":
        if os.environ.get("FAKE_CRIU_FAIL_CHECK") == "1":
            print("Error (fake): the kernel lacks what CRIU needs", file=sys.stderr)
            return 1
        print("Looks good.")
        return 0
    if args.action == "dump":
        return dump(args.images_dir, args.pid)
    return restore(args.images_dir, args.pidfile, Path(args.workdir))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
