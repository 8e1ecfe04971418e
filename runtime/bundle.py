"""Reading, verifying and packing bundles (directories, or ``.tar`` archives of one)."""

from __future__ import annotations

import hashlib
import logging
import shutil
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from runtime.bundle_checks import check_graphs, check_layout
from runtime.errors import BundleError, ParityError
from runtime.manifest import MANIFEST_NAME, Manifest
from runtime.signing import BundleKey, verify_manifest

log = logging.getLogger(__name__)
_CHUNK = 1 << 20


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class Bundle:
    """A verified bundle on disk: its root directory and manifest."""

    root: Path
    manifest: Manifest
    _tmpdir: tempfile.TemporaryDirectory | None = None

    def path(self, rel: str) -> Path:
        return self.root / rel

    def stage_path(self, stage: str) -> Path:
        try:
            return self.root / self.manifest.stages[stage].file
        except KeyError as e:
            raise BundleError(
                f"bundle '{self.root}' has no '{stage}' stage "
                f"(it has: {', '.join(self.manifest.stages)})"
            ) from e

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        verify: bool = True,
        key: str | Path | BundleKey | None = None,
        allow_extra_files: bool = False,
    ) -> Bundle:
        """Open a bundle directory or ``.tar``.

        With ``verify`` (default) the bundle must be what its manifest says: every file's
        sha256, the layout and each stage graph's structure (``verify()``). With ``key``
        (a PEM Ed25519 key file, ``hmac:FILE`` or a loaded ``BundleKey``) the manifest must
        also carry that key's signature (runtime/signing.py), checked before anything in
        it is trusted. ``allow_extra_files`` ignores unlisted files with a warning instead
        of refusing the bundle.
        """
        path = Path(path)
        tmp = None
        if path.is_file() and tarfile.is_tarfile(path):
            tmp = tempfile.TemporaryDirectory(prefix="ugsep-bundle-")
            root = _safe_extract(path, Path(tmp.name))
        elif path.is_dir():
            root = path
        else:
            raise BundleError(f"bundle '{path}' is neither a directory nor a .tar archive")
        data = Manifest.read_data(root)
        if key is not None:
            verify_manifest(root, data, key)
        manifest = Manifest.from_dict(data, where=str(root / MANIFEST_NAME))
        bundle = cls(root=root, manifest=manifest, _tmpdir=tmp)
        if verify or key is not None:
            bundle.verify(allow_extra_files=allow_extra_files)
        return bundle

    def verify(self, *, allow_extra_files: bool = False) -> None:
        """Refuse the bundle unless it is what its manifest says: paths inside it, no links or
        unlisted files (runtime/bundle_checks.py), every listed file present with its sha256,
        and each stage graph matching the spec, the boundary and the vocabularies."""
        m = self.manifest
        for stage, st in m.stages.items():
            if st.file not in m.files:
                raise BundleError(
                    f"bundle '{self.root}': stage '{stage}' file '{st.file}' is not listed "
                    "in the manifest's files, so it cannot be verified"
                )
        check_layout(self.root, m, allow_extra_files=allow_extra_files)
        for rel, meta in m.files.items():
            p = (self.root / rel).resolve()
            if self.root.resolve() not in p.parents:
                raise BundleError(f"bundle '{self.root}': file path '{rel}' escapes the bundle")
            if not p.is_file():
                raise BundleError(f"bundle '{self.root}': listed file '{rel}' is missing")
            got = sha256_file(p)
            if got != meta.sha256:
                raise BundleError(
                    f"bundle '{self.root}': file '{rel}' does not match its manifest sha256 "
                    f"(expected {meta.sha256[:16]}…, found {got[:16]}…): the bundle is corrupt "
                    "or was modified after export; re-export it"
                )
        check_graphs(self.root, m)

    def check_parity(self, *, allow_unverified: bool = False) -> None:
        """Refuse a bundle with no parity record or a failed one unless explicitly allowed."""
        p = self.manifest.parity
        problem = None
        if p is None:
            problem = "has no parity record (run `ugsep check` on it first)"
        elif not p.passed:
            failed = ", ".join(p.failed_stages) or "see parity.json"
            problem = f"failed its parity check ({failed})"
        if problem is None:
            return
        if allow_unverified:
            log.warning("serving bundle '%s' although it %s", self.root, problem)
            return
        raise ParityError(
            f"bundle '{self.root}' {problem}; refusing to serve it. Pass "
            "allow_unverified=True (CLI: --allow-unverified) to serve it anyway"
        )


def pack(bundle_dir: str | Path, tar_path: str | Path) -> Path:
    """Pack a bundle directory into an uncompressed ``.tar`` (entries relative to the root)."""
    bundle_dir, tar_path = Path(bundle_dir), Path(tar_path)
    Manifest.read(bundle_dir)  # refuse to pack something that is not a bundle
    with tarfile.open(tar_path, "w") as tar:
        for p in sorted(bundle_dir.rglob("*")):
            if p.is_file():
                tar.add(p, arcname=str(p.relative_to(bundle_dir)))
    return tar_path


def _safe_extract(tar_path: Path, dest: Path) -> Path:
    try:
        with tarfile.open(tar_path) as tar:
            tar.extractall(dest, filter="data")  # refuses links and paths outside dest
    except (tarfile.TarError, OSError) as e:
        raise BundleError(f"cannot unpack bundle archive '{tar_path}': {e}") from e
    if (dest / MANIFEST_NAME).is_file():
        return dest
    subdirs = [p for p in dest.iterdir() if p.is_dir()]
    if len(subdirs) == 1 and (subdirs[0] / MANIFEST_NAME).is_file():
        return subdirs[0]
    raise BundleError(f"archive '{tar_path}' holds no {MANIFEST_NAME} at its root")


def copy_bundle(src: str | Path, dst: str | Path) -> Path:
    """Copy a bundle directory (used by tests and reload)."""
    return Path(shutil.copytree(src, dst))
