"""lpmos.images: the managed image record, its validation and its catalog entry."""

from __future__ import annotations

import pytest

from lpmos.catalog import Catalog, Image
from lpmos.images import (
    ImageFile,
    ImageRecordError,
    ManagedImage,
    NodeImageState,
    parse_add_request,
)
from lpmos.models import ValidationError
from lpmos.store.keys import Keys

SHA = "ab" * 32


def url_body(**over: object) -> dict[str, object]:
    body: dict[str, object] = {
        "name": "golden-1", "os_type": "Debian 12", "os_family": "debian", "version": "12",
        "format": "raw.zst", "source": "url",
        "files": {"disk_image": {"url": "http://mirror.example/golden.raw.zst", "sha256": SHA}}}
    body.update(over)
    return body


def test_url_image_is_available_at_once_and_round_trips() -> None:
    img = parse_add_request(url_body(idcs=["dc1", "dc1"]), user="alice", now=5.0)
    assert img.offered and img.state == "available"
    assert img.idcs == ("dc1",) and img.wanted_in("dc1") and not img.wanted_in("dc2")
    assert img.sha256 == SHA and img.created_by == "alice" and img.created_at == 5.0
    assert ManagedImage.from_json(img.to_json()) == img
    public = img.public()
    assert public["sha256"] == SHA and public["files"]["disk_image"]["url"].startswith("http://")


def test_every_idc_when_none_given() -> None:
    img = parse_add_request(url_body())
    assert img.wanted_in("dc1") and img.wanted_in("anything")


@pytest.mark.parametrize(("over", "field"), [
    ({"name": "Bad Name"}, "name"),
    ({"name": ""}, "name"),
    ({"format": "vmdk"}, "format"),
    ({"os_family": "windows"}, "os_family"),
    ({"source": "ftp"}, "source"),
    ({"architectures": ["sparc"]}, "architectures"),
    ({"architectures": []}, "architectures"),
    ({"idcs": ["Bad IDC"]}, "idcs"),
    ({"idcs": "dc1"}, "idcs"),
    ({"files": {"disk_image": {"url": "http://x/y"}}}, "files.disk_image.sha256"),
    ({"files": {"disk_image": {"url": "file:///etc/passwd", "sha256": SHA}}},
     "files.disk_image.url"),
    ({"files": {"disk_image": {"url": "http://x/y", "sha256": "xyz"}}}, "files.disk_image.sha256"),
    ({"files": {"disk_image": {"url": "http://x/y", "sha256": SHA, "size": -1}}},
     "files.disk_image.size"),
    ({"files": {"disk_image": {"url": "http://x/y", "sha256": SHA, "extra": 1}}},
     "files.disk_image.extra"),
    ({"files": {"kernel": {"url": "http://x/y", "sha256": SHA}}}, "files"),
    ({"files": {}}, "files.disk_image"),
    ({"colour": "blue"}, "colour"),
    ({"description": "x\x00y"}, "description"),
])
def test_bad_input_names_the_field(over: dict[str, object], field: str) -> None:
    with pytest.raises(ValidationError) as exc:
        parse_add_request(url_body(**over))
    assert exc.value.field == field


def test_upload_waits_for_every_file_and_drops_a_given_url() -> None:
    img = parse_add_request({"name": "inst", "os_type": "Debian 12", "os_family": "debian",
                             "format": "installer", "source": "upload",
                             "files": {"kernel": {"url": "http://evil/x", "sha256": SHA}}})
    assert img.state == "uploading" and not img.offered
    assert img.file_roles == ("kernel", "initrd")
    assert img.files["kernel"].url == "" and img.files["kernel"].sha256 == SHA
    img = img.with_file("kernel", ImageFile("http://cp/api/v1/images/inst/files/kernel", SHA, 10))
    assert not img.offered
    img = img.with_file("initrd", ImageFile("http://cp/api/v1/images/inst/files/initrd", SHA, 20))
    assert img.offered and img.size == 30
    assert ManagedImage.from_json(img.to_json()) == img


def test_catalog_image_needs_every_local_file_and_joins_the_catalog() -> None:
    img = parse_add_request(url_body())
    with pytest.raises(ValueError, match="disk_image"):
        img.catalog_image({})
    entry = img.catalog_image({"disk_image": "/var/cache/lpmos/golden-1/disk"})
    assert entry.managed and entry.mode == "image" and entry.disk_format == "raw.zst"
    assert entry.sha256 == SHA and entry.installable
    seed = Catalog({"golden-1": Image(name="golden-1", os_type="Seed", os_family="lab",
                                      disk_image="x")})
    merged = Catalog().with_images([entry])
    assert merged.resolve("", image="golden-1") is entry
    assert seed.with_images([entry]).images["golden-1"].os_type == "Seed"


def test_bad_records_are_refused() -> None:
    for raw in (b"", b"[]", b'{"name": "x"}', b'{"name":"x","os_type":"a","os_family":"lab",'
                b'"source":"url","format":"raw","files":{}}'):
        with pytest.raises(ImageRecordError):
            ManagedImage.from_json(raw)


def test_node_state_describes_itself() -> None:
    st = NodeImageState("golden-1", SHA, "fetching", bytes=42, total=100)
    assert st.describe("n1") == "fetching on node n1, 42 %"
    assert NodeImageState.from_json(st.to_json()) == st
    failed = NodeImageState("golden-1", SHA, "failed", reason="sha256 mismatch")
    assert failed.describe("n1") == "failed on node n1: sha256 mismatch"
    with pytest.raises(ImageRecordError):
        NodeImageState.from_json(b'{"name": "x", "state": "weird"}')


def test_keys() -> None:
    keys = Keys("/os")
    assert keys.image("g") == "/os/images/g"
    parsed = keys.parse(keys.node_image("dc1", "n1", "g"))
    assert parsed is not None and (parsed.kind, parsed.idc, parsed.name) == \
        ("node_image", "dc1", "n1/g")
    parsed = keys.parse(keys.image("g"))
    assert parsed is not None and (parsed.kind, parsed.name) == ("image", "g")
    assert keys.parse(keys.node("dc1", "n1")).kind == "node"  # type: ignore[union-attr]


def test_seed_catalog_may_not_claim_managed(tmp_path: object) -> None:
    from lpmos.catalog import CatalogError, parse_catalog
    with pytest.raises(CatalogError, match="managed"):
        parse_catalog({"image": [{"name": "a", "os_type": "A", "os_family": "lab",
                                  "disk_image": "x", "managed": True}]})
