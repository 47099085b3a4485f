#!/usr/bin/python3
"""lpmos-report: tell the LPMOS regional node how cloud-init's run ended.

Installed by the image install's user-data as /usr/local/sbin/lpmos-report
and run once by lpmos-report.service, which is ordered after
cloud-final.service.  It waits for cloud-init (``cloud-init status --wait
--long``, bounded), reads cloud-init's own record of the run
(/run/cloud-init/status.json and result.json), and POSTs one JSON report to
the node's ``POST /callback/<sn>`` with the machine token:

    {"event": "cloud-init", "status": "succeeded" | "failed",
     "message": one line (on failure cloud-init's first error),
     "seq": N,
     "cloud_init": {"status": "done" | "error" | "degraded" | "running",
                    "stages": {NAME: {"start": t, "finished": t, "errors": [...]}},
                    "errors": [...], "recoverable_errors": [...]},
     "firmware": {"mode": "uefi" | "bios", "secure_boot": true | false | null},
     "hostname": ..., "boot_id": ...}

Only ``done`` is success: an error, a degraded run (cloud-init 23.4+
``recoverable_errors``) or a run still going when the wait gives up
(``running``) reports ``failed``.  ``firmware`` is how the installed system
itself booted: ``uefi`` when /sys/firmware/efi exists, and Secure Boot
from the SecureBoot EFI variable as agent/inventory/system.py reads it
(true only for the value 1; null on UEFI when the variable cannot be
read; false under BIOS, which has no Secure Boot).  Delivery is retried with jittered
exponential backoff within a deadline; every step is logged on stdout
(the journal).  Once the node has the report, /etc/lpmos/report.json (the
callback and the token) is removed: the token has no further use, and a
later run finds nothing to report.

Python 3 standard library only: it runs on a stock cloud image where
python3 is there for cloud-init and curl may not be.  Exit status 0: sent,
or nothing to send; 1: not sent.
"""

import argparse
import json
import os
import random
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

CONFIG = "/etc/lpmos/report.json"
STATUS = "/run/cloud-init/status.json"
RESULT = "/run/cloud-init/result.json"
STATUS_CMD = "cloud-init status --wait --long"
BOOT_ID = "/proc/sys/kernel/random/boot_id"
EFI_DIR = "/sys/firmware/efi"
#: the SecureBoot variable of the EFI global variable GUID
SECURE_BOOT_VAR = "SecureBoot-8be4df61-93ca-11d2-aa0d-00e098032b8c"

#: cloud-init's stages, in the order they run (status.json's ``v1`` keys).
STAGES = ("init-local", "init", "modules-init", "modules-config", "modules-final")

ERRORS_MAX = 20          # errors kept per stage and in the report
ERROR_CHARS = 300        # characters of one error
MESSAGE_CHARS = 500      # characters of the report's message
FILE_BYTES = 1 << 20     # read at most this much of a status file
RESPONSE_BYTES = 4096    # read at most this much of the node's answer
BACKOFF_CAP = 60.0       # longest pause between two attempts, seconds


def log(message: str) -> None:
    print("lpmos-report: " + message, flush=True)


def one_line(text: Any, limit: int) -> str:
    """``text`` on one line without control characters, at most ``limit`` characters."""
    clean = "".join(c if c.isprintable() else " " for c in str(text))
    clean = " ".join(clean.split())
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


def number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def read_json(path: str) -> dict[str, Any] | None:
    """The JSON object in ``path``; None when it is missing or no object."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(FILE_BYTES).decode("utf-8", "replace"))
    except (OSError, ValueError) as exc:
        if not isinstance(exc, FileNotFoundError):
            log(f"cannot read {path}: {exc}")
        return None
    return data if isinstance(data, dict) else None


def run_status(command: str, timeout: float) -> tuple[int | None, str]:
    """Run ``command`` (cloud-init status --wait --long) for at most
    ``timeout`` seconds: (exit status or None when it did not finish or
    could not start, its output)."""
    if not command:
        return None, ""
    try:
        done = subprocess.run(shlex.split(command), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        log(f"{command!r} still waiting after {timeout:.0f} s; "
            "reading cloud-init's files as they are")
        return None, ""
    except OSError as exc:
        log(f"cannot run {command!r}: {exc}")
        return None, ""
    text = done.stdout.decode("utf-8", "replace")[-4000:]
    for line in text.splitlines()[:20]:
        if line.strip(" ."):
            log("| " + one_line(line, 200))
    return done.returncode, text


def _recoverable(stage: str, value: Any) -> list[str]:
    """cloud-init 23.4+ ``recoverable_errors``: {LEVEL: [message, ...]}."""
    out: list[str] = []
    if isinstance(value, dict):
        for level, messages in sorted(value.items()):
            if isinstance(messages, list):
                for m in messages:
                    prefix = stage + ": " if stage else ""
                    out.append(one_line(f"{prefix}{level}: {m}", ERROR_CHARS))
    return out


def summarize(status_doc: dict[str, Any] | None, result_doc: dict[str, Any] | None,
              rc: int | None, status_text: str = "") -> dict[str, Any]:
    """What cloud-init's files (and the status command's exit status
    ``rc``: 0 done, 1 error, 2 degraded, None unknown) say of the run:
    the report's ``cloud_init`` object.  Pure.

    The files decide as ``cloud-init status`` does (any stage's errors →
    error; a stage started and not finished, a current ``stage`` or no
    result.json → running); a worse exit status of the command wins."""
    v1 = status_doc.get("v1") if isinstance(status_doc, dict) else None
    v1 = v1 if isinstance(v1, dict) else {}
    stages: dict[str, dict[str, Any]] = {}
    errors: list[str] = []
    recoverable = _recoverable("", v1.get("recoverable_errors"))
    running = bool(v1.get("stage")) or not isinstance(result_doc, dict)
    for name in STAGES:
        st = v1.get(name)
        if not isinstance(st, dict):
            continue
        start, finished = number(st.get("start")), number(st.get("finished"))
        if start is None and finished is None:
            continue            # a stage that did not run this boot
        raw = st.get("errors")
        raw = raw if isinstance(raw, list) else []
        errs = [one_line(e, ERROR_CHARS) for e in raw[:ERRORS_MAX]]
        stages[name] = {"start": start, "finished": finished, "errors": errs}
        errors.extend(f"{name}: {e}" for e in errs)
        recoverable.extend(_recoverable(name, st.get("recoverable_errors")))
        if start is not None and finished is None:
            running = True
    r1 = result_doc.get("v1") if isinstance(result_doc, dict) else None
    if isinstance(r1, dict) and isinstance(r1.get("errors"), list):
        known = {e.split(": ", 1)[-1] for e in errors}
        for e in r1["errors"][:ERRORS_MAX]:
            line = one_line(e, ERROR_CHARS)
            if line not in known:
                errors.append("result: " + line)
        if not recoverable:
            recoverable = _recoverable("", r1.get("recoverable_errors"))
    if not stages:
        running = True
    if errors or rc == 1:
        status = "error"
        if not errors:
            errors.append("cloud-init status: " + (one_line(status_text, ERROR_CHARS)
                                                   or "error"))
    elif running:
        status = "running"
    elif recoverable or rc == 2:
        status = "degraded"
    else:
        status = "done"
    return {"status": status, "stages": stages, "errors": errors[:ERRORS_MAX],
            "recoverable_errors": recoverable[:ERRORS_MAX]}


def describe(summary: dict[str, Any]) -> str:
    """The report's one-line message for ``summary``."""
    status = summary["status"]
    if status == "error":
        return one_line("cloud-init failed: " + summary["errors"][0], MESSAGE_CHARS)
    if status == "degraded":
        first = (summary["recoverable_errors"] or ["cloud-init status reports degraded"])[0]
        return one_line("cloud-init degraded: " + first, MESSAGE_CHARS)
    if status == "running":
        names = [n for n, s in summary["stages"].items() if s["finished"] is None]
        where = " in " + names[0] if names else ""
        return one_line(f"cloud-init did not finish{where} before lpmos-report gave up waiting",
                        MESSAGE_CHARS)
    times = [t for s in summary["stages"].values() for t in (s["start"], s["finished"])
             if t is not None]
    took = f" in {round(max(times) - min(times))} s" if times else ""
    return f"cloud-init done{took} ({', '.join(summary['stages'])})"


def build_report(config: dict[str, Any], summary: dict[str, Any], hostname: str,
                 boot_id: str, firmware: dict[str, Any]) -> dict[str, Any]:
    return {
        "event": "cloud-init",
        "status": "succeeded" if summary["status"] == "done" else "failed",
        "message": describe(summary),
        "seq": config["seq"],
        "cloud_init": summary,
        "firmware": firmware,
        "hostname": one_line(hostname, 64),
        "boot_id": one_line(boot_id, 64),
    }


def parse_config(data: Any) -> dict[str, Any]:
    """report.json's callback, token, sn and seq, checked; ValueError names what is wrong."""
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    url = data.get("callback")
    if not isinstance(url, str) or not url.startswith(("http://", "https://")):
        raise ValueError("'callback' is not an http(s) URL")
    token = data.get("token")
    if not isinstance(token, str) or not token or any(not c.isprintable() for c in token):
        raise ValueError("'token' is missing")
    seq = data.get("seq", 1)
    if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0:
        raise ValueError("'seq' is not a non-negative integer")
    return {"callback": url, "token": token, "sn": str(data.get("sn") or ""), "seq": seq}


class Permanent(Exception):
    """The node refused the report in a way that a retry cannot change."""


def post(url: str, token: str, body: dict[str, Any], timeout: float) -> str:
    """POST ``body``; the node's answer on 2xx.  Permanent on a 4xx other
    than 408/425/429; any other failure raises OSError (retry)."""
    data = json.dumps(body).encode()
    # the scheme is http(s): parse_config checked it
    headers = {"Content-Type": "application/json", "Authorization": "Bearer " + token,
               "User-Agent": "lpmos-report"}
    req = urllib.request.Request(url, data=data, method="POST", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:  # noqa: S310
            answer: bytes = resp.read(RESPONSE_BYTES)
            return answer.decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        text = one_line(exc.read(RESPONSE_BYTES).decode("utf-8", "replace"), 300)
        if 400 <= exc.code < 500 and exc.code not in (408, 425, 429):
            raise Permanent(f"HTTP {exc.code}: {text}") from None
        raise OSError(f"HTTP {exc.code}: {text}") from None


def deliver(url: str, token: str, body: dict[str, Any], deadline: float, backoff: float,
            request_timeout: float) -> bool:
    """Send until the node takes it or ``deadline`` (monotonic) passes;
    the pause before retry n is random in [backoff, min(cap, backoff * 2**n)]."""
    attempt = 0
    while True:
        attempt += 1
        left = deadline - time.monotonic()
        try:
            answer = post(url, token, body, max(1.0, min(request_timeout, left)))
            log(f"report delivered (attempt {attempt}): {one_line(answer, 200)}")
            return True
        except Permanent as exc:
            log(f"the node refused the report, not retrying: {exc}")
            return False
        except (OSError, ValueError) as exc:
            pause = random.uniform(backoff, max(backoff, min(BACKOFF_CAP, backoff * 2 ** attempt)))
            left = deadline - time.monotonic()
            if left <= pause:
                log(f"attempt {attempt} failed ({exc}); deadline reached, giving up")
                return False
            log(f"attempt {attempt} failed ({exc}); retrying in {pause:.1f} s")
            time.sleep(pause)


def read_boot_id(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read(64).strip()
    except OSError:
        return ""


def parse_secure_boot(var: bytes | None) -> bool | None:
    """The SecureBoot variable as efivarfs gives it (4 bytes of attributes,
    then the UINT8 value) as on (1) or off (anything else); None when it
    could not be read or is too short.  Pure."""
    if var is None or len(var) < 5:
        return None
    return var[4] == 1


def read_secure_boot_var(efi_dir: str) -> bytes | None:
    """The SecureBoot variable under ``efi_dir``: efivarfs, else the old
    sysfs ``vars/.../data`` (no attribute bytes there, so four are put in
    front); None when neither can be read."""
    try:
        with open(os.path.join(efi_dir, "efivars", SECURE_BOOT_VAR), "rb") as f:
            return f.read(64)
    except OSError:
        pass
    try:
        with open(os.path.join(efi_dir, "vars", SECURE_BOOT_VAR, "data"), "rb") as f:
            return b"\x00\x00\x00\x00" + f.read(60)
    except OSError:
        return None


def read_firmware(efi_dir: str) -> dict[str, Any]:
    """The report's ``firmware``: ``uefi`` when ``efi_dir`` exists, else
    ``bios`` (no Secure Boot: false)."""
    if not os.path.isdir(efi_dir):
        return {"mode": "bios", "secure_boot": False}
    return {"mode": "uefi", "secure_boot": parse_secure_boot(read_secure_boot_var(efi_dir))}


def describe_firmware(firmware: dict[str, Any]) -> str:
    """``firmware`` as the log says it."""
    if firmware["mode"] == "bios":
        return "BIOS"
    state = {True: "on", False: "off", None: "unknown"}[firmware["secure_boot"]]
    return f"UEFI, Secure Boot {state}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ.get
    p = argparse.ArgumentParser(prog="lpmos-report", description=__doc__.split("\n")[0])
    p.add_argument("--config", default=env("LPMOS_REPORT_CONFIG", CONFIG))
    p.add_argument("--status-json", default=env("LPMOS_REPORT_STATUS", STATUS))
    p.add_argument("--result-json", default=env("LPMOS_REPORT_RESULT", RESULT))
    p.add_argument("--status-cmd", default=env("LPMOS_REPORT_STATUS_CMD", STATUS_CMD),
                   help="the command that waits for cloud-init ('' to skip)")
    p.add_argument("--wait", type=float, default=float(env("LPMOS_REPORT_WAIT", "900")),
                   help="seconds to wait for cloud-init to finish")
    p.add_argument("--deadline", type=float, default=float(env("LPMOS_REPORT_DEADLINE", "600")),
                   help="seconds to keep trying to deliver the report")
    p.add_argument("--backoff", type=float, default=float(env("LPMOS_REPORT_BACKOFF", "2")),
                   help="shortest pause between two attempts, seconds")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds per request")
    p.add_argument("--boot-id", default=BOOT_ID)
    p.add_argument("--efi-dir", default=EFI_DIR,
                   help="where the kernel shows EFI (absent: the system booted BIOS)")
    return p.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    try:
        with open(args.config, "rb") as f:
            raw = f.read(FILE_BYTES)
    except FileNotFoundError:
        log(f"no {args.config}: nothing to report (already reported?)")
        return 0
    except OSError as exc:
        log(f"cannot read {args.config}: {exc}; cannot report")
        return 1
    try:
        config = parse_config(json.loads(raw.decode("utf-8", "replace")))
    except ValueError as exc:
        log(f"{args.config}: {exc}; cannot report")
        return 1
    rc, text = run_status(args.status_cmd, args.wait)
    summary = summarize(read_json(args.status_json), read_json(args.result_json), rc, text)
    firmware = read_firmware(args.efi_dir)
    log(f"booted {describe_firmware(firmware)}")
    body = build_report(config, summary, socket.gethostname(), read_boot_id(args.boot_id),
                        firmware)
    log(f"cloud-init {summary['status']}; reporting {body['status']}: {body['message']}")
    sent = deliver(config["callback"], config["token"], body,
                   time.monotonic() + args.deadline, args.backoff, args.timeout)
    if not sent:
        return 1
    try:
        os.unlink(args.config)
    except FileNotFoundError:
        pass
    except OSError as exc:
        log(f"cannot remove {args.config}: {exc}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
