#!/usr/bin/env python3
"""Fetches the Debian fortune corpora without root, pinned by version and SHA-256.

    python3 datasets/fortunes.py [DEST]          # default: datasets/fortunes
    python3 datasets/fortunes.py --check [DEST]  # exit 0 where DEST is these pins' corpus

Downloads `fortunes-min`, `fortunes` and `fortunes-ru` from a Debian mirror
(`DEBIAN_MIRROR`, default http://deb.debian.org/debian), checks each package against the
SHA-256 Debian publishes for it, and unpacks their fortune files into DEST: the English files
at its top, the Russian ones in `DEST/ru`, as Debian installs them under
/usr/share/games/fortunes. Then, for example:

    FORTUNES_DIR=../datasets/fortunes orchestrate run pipelines/full.yaml

Why pinned: two machines with different Debian releases (or a laptop that is not Debian)
would otherwise train on different corpora under one pipeline. A package whose bytes differ
from the pinned digest is refused, never unpacked. Only the standard library is used, so it
runs wherever python3 does (macOS included: no dpkg needed). DEST is replaced whole, and
only once every package has been checked and unpacked beside it; `DEST.pinned` then names
the packages it was made from, which `--check` compares with the pins here (`.ci/main`
fetches again where they differ).
"""

import hashlib
import http.client
import io
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request

# (package, version, path in the pool, SHA-256, size), as Debian 12 "bookworm" ships them.
PACKAGES = [
    ("fortunes-min", "1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes-min_1.99.1-7.3_all.deb",
     "9eed5b45064e41133dae0967cf3a17588ad77c014fcc7bf1527fa3ea48e44d07", 56492),
    ("fortunes", "1:1.99.1-7.3", "pool/main/f/fortune-mod/fortunes_1.99.1-7.3_all.deb",
     "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5", 848988),
    ("fortunes-ru", "1.52-3.1", "pool/main/f/fortunes-ru/fortunes-ru_1.52-3.1_all.deb",
     "2dc76af9c0e02e2926d36f88dcb685bb171fab8677e553a6def41efe8a551cc6", 729496),
]
INSTALLED_UNDER = "usr/share/games/fortunes/"


def fail(message):
    print(f"datasets/fortunes.py: {message}", file=sys.stderr)
    sys.exit(1)


def download(url, sha256, size):
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            data = response.read(size + 1)
    except (OSError, http.client.HTTPException) as e:
        fail(f"cannot download {url}: {e} (set DEBIAN_MIRROR to a reachable Debian mirror)")
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        fail(f"{url} is not the pinned package: SHA-256 {digest}, expected {sha256}")
    return data


def data_member(deb, name):
    """The `data.tar.*` member of a .deb, which is an `ar` archive."""
    if not deb.startswith(b"!<arch>\n"):
        fail(f"{name} is not a Debian package (no ar header)")
    at = 8
    while at + 60 <= len(deb):
        header = deb[at:at + 60]
        member = header[:16].decode("ascii", "replace").strip().rstrip("/")
        try:
            length = int(header[48:58].decode("ascii").strip())
        except ValueError:
            fail(f"{name}: damaged ar header at byte {at}")
        body = deb[at + 60:at + 60 + length]
        if member.startswith("data.tar"):
            return body
        at += 60 + length + (length % 2)  # members are padded to an even offset
    fail(f"{name} has no data.tar member")


def unpack(data, name, dest):
    """Writes the package's fortune files (not the .dat indexes, not the .u8 links) to dest."""
    written = 0
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        for entry in tar:
            path = entry.name[2:] if entry.name.startswith("./") else entry.name
            if not path.startswith(INSTALLED_UNDER) or not entry.isfile():
                continue
            rel = path[len(INSTALLED_UNDER):]
            parts = rel.split("/")
            if rel.endswith(".dat") or any(p in ("", ".", "..") for p in parts):
                continue
            target = os.path.join(dest, *parts)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            with tar.extractfile(entry) as src, open(target, "wb") as out:
                shutil.copyfileobj(src, out)
            written += 1
    if written == 0:
        fail(f"{name} holds no files under /{INSTALLED_UNDER}")
    return written


def pins():
    """The packages pinned, one line each: what a fetched corpus was made from."""
    return "".join(f"{name} {version} {sha256}\n" for name, version, _, sha256, _ in PACKAGES)


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    args = [a for a in sys.argv[1:] if a != "--check"]
    dest = os.path.abspath(args[0] if args else os.path.join(here, "fortunes"))
    # Beside the corpus, not in it (ingest reads every file of the folder).
    stamp = dest + ".pinned"
    if "--check" in sys.argv[1:]:
        # Whether dest holds the corpus of these very pins (a pin changed since: fetch again).
        try:
            with open(stamp) as f:
                current = f.read() == pins() and os.path.isdir(os.path.join(dest, "ru"))
        except OSError:
            current = False
        sys.exit(0 if current else 1)
    mirror = os.environ.get("DEBIAN_MIRROR", "http://deb.debian.org/debian").rstrip("/")
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".fortunes-", dir=parent)
    try:
        for name, version, pool_path, sha256, size in PACKAGES:
            deb = download(f"{mirror}/{pool_path}", sha256, size)
            n = unpack(data_member(deb, name), name, staging)
            print(f"{name} {version}: {n} files", file=sys.stderr)
        if os.path.islink(dest):
            os.unlink(dest)
        elif os.path.isdir(dest):
            shutil.rmtree(dest)
        os.rename(staging, dest)
        with open(stamp, "w") as f:
            f.write(pins())
    finally:
        if os.path.isdir(staging):
            shutil.rmtree(staging)
    print(dest)


if __name__ == "__main__":
    main()
