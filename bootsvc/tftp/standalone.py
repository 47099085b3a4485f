"""``python -m bootsvc.tftp.standalone ROOT``: the TFTP server alone, with no
node, store or other service (the benches run it side by side with other
TFTP servers).  Its defaults are the node's (:data:`bootsvc.tftp.settings.SETTINGS`),
except that it listens on 127.0.0.1:6969."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from bootsvc.tftp.server import TftpServer
from bootsvc.tftp.settings import DEFAULTS, TftpSettings

PROG = "python -m bootsvc.tftp.standalone"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description="serve ROOT over TFTP, nothing else")
    parser.add_argument("root", type=Path)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=6969)
    parser.add_argument("--timeout", type=float, default=DEFAULTS["tftp.timeout"])
    parser.add_argument("--retries", type=int, default=DEFAULTS["tftp.retries"])
    parser.add_argument("--max-sessions", type=int, default=DEFAULTS["tftp.max_sessions"])
    parser.add_argument("--max-sessions-per-client", type=int,
                        default=DEFAULTS["tftp.max_sessions_per_client"])
    parser.add_argument("--max-windowsize", type=int, default=DEFAULTS["tftp.max_windowsize"])
    parser.add_argument("--max-blksize", type=int, default=DEFAULTS["tftp.max_blksize"])
    parser.add_argument("--no-gso", action="store_true", help="one send per block")
    parser.add_argument("--spin", type=int, default=DEFAULTS["tftp.spin_us"], metavar="USEC",
                        help="microseconds the server busy-polls for the next ACK before it "
                             "sleeps (0: never)")
    return parser.parse_args(argv)


def settings_from_args(args: argparse.Namespace) -> TftpSettings:
    return TftpSettings.from_values({
        "tftp.port": args.port, "tftp.timeout": args.timeout, "tftp.retries": args.retries,
        "tftp.max_sessions": args.max_sessions,
        "tftp.max_sessions_per_client": args.max_sessions_per_client,
        "tftp.max_windowsize": args.max_windowsize, "tftp.max_blksize": args.max_blksize,
        "tftp.spin_us": args.spin})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

    async def serve() -> None:
        server = TftpServer(args.root, settings_from_args(args), host=args.host,
                            use_gso=not args.no_gso)
        await server.start()
        print(f"listening {args.host}:{server.port}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await server.stop()

    try:
        asyncio.run(serve())
    except KeyboardInterrupt:
        pass
    return 0


__all__ = ["main", "parse_args", "settings_from_args"]

if __name__ == "__main__":
    raise SystemExit(main())
