"""Settings of the node's managed-image cache (``lpmos regional``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lpmos.config import Config, Setting, float_range, int_range, parse_optional_path

SETTINGS: tuple[Setting, ...] = (
    Setting("images.cache", "--image-cache", None, parse_optional_path,
            "directory where this node keeps the managed images it fetched and verified "
            "(default: STATE_DIR/images)", metavar="DIR"),
    Setting("images.cache_bytes", "--image-cache-bytes", 100 * 1024 ** 3,
            int_range(1024 * 1024, 1 << 50),
            "bound of the image cache in bytes; past it, ready images no longer wanted "
            "and then images no active task needs are evicted, least recently used first",
            metavar="BYTES"),
    Setting("images.connect_timeout", "--image-connect-timeout", 10.0, float_range(0.1, 600.0),
            "seconds to wait for an image source to accept a connection", metavar="SECONDS"),
    Setting("images.read_timeout", "--image-read-timeout", 30.0, float_range(0.1, 3600.0),
            "seconds an image download may go without a byte before the attempt fails",
            metavar="SECONDS"),
    Setting("images.retries", "--image-fetch-retries", 4, int_range(0, 100),
            "attempts after the first one, with back-off, before an image download that "
            "keeps failing (connection, timeout, 5xx) reports failed; it is tried again "
            "later, from 1 minute to 1 hour apart", metavar="N"),
)


@dataclass(frozen=True)
class ImageSettings:
    cache: Path
    cache_bytes: int = 100 * 1024 ** 3
    connect_timeout: float = 10.0
    read_timeout: float = 30.0
    retries: int = 4

    @classmethod
    def from_config(cls, config: Config) -> ImageSettings:
        values = {s.key: s.default for s in SETTINGS}
        values.update({k: v for k in values if (v := config.get(k)) is not None})
        cache = values["images.cache"] or Path(config.get("state_dir", "/var/lib/lpmos")) / \
            "images"
        return cls(cache=Path(cache), cache_bytes=int(values["images.cache_bytes"]),
                   connect_timeout=float(values["images.connect_timeout"]),
                   read_timeout=float(values["images.read_timeout"]),
                   retries=int(values["images.retries"]))
