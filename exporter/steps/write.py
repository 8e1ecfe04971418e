"""Writing bundles: files staged in a temporary directory, hashed, then moved into place."""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from exporter.args import StepOptions, arg
from exporter.errors import ExportError
from runtime.bundle import sha256_file
from runtime.manifest import MANIFEST_NAME, FileEntry, Limits, Manifest, Source, Stage
from runtime.signing import SIGNATURE_NAME
from runtime.spec import FeatureSpec

if TYPE_CHECKING:
    from exporter.pipeline import ExportContext

log = logging.getLogger(__name__)
FileContent = bytes | str | onnx.ModelProto | dict | list | Path | Callable[[Path], None]


def toolchain_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ugsep")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


EXTERNAL_DATA_BYTES = 1 << 30  # ONNX graphs larger than this keep their weights in a .data file


def write_file(path: Path, content: FileContent, *, external_data_bytes: int = EXTERNAL_DATA_BYTES) -> None:
    """Write one bundle file: ONNX protos, JSON-able data, bytes/str, or a file to copy.

    An ONNX graph over ``external_data_bytes`` (protobuf cannot serialise 2 GiB) is written
    with its weights in ``<name>.data`` next to it (onnx's external data, a path relative
    to the bundle) and checked by ``onnx.checker`` on the file. Saving moves the weights
    out of ``content``: the proto is written last (the write step).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, onnx.ModelProto) and content.ByteSize() > external_data_bytes:
        onnx.save_model(content, str(tmp), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
        try:
            onnx.checker.check_model(str(tmp))
        except onnx.checker.ValidationError as e:
            raise ExportError(f"the ONNX graph '{path.name}' (external data) is invalid: {e}") from e
    elif isinstance(content, onnx.ModelProto):
        onnx.save_model(content, str(tmp))
    elif isinstance(content, (dict, list)):
        tmp.write_text(json.dumps(content, indent=2) + "\n")
    elif isinstance(content, Path):
        shutil.copyfile(content, tmp)
    elif isinstance(content, str):
        tmp.write_text(content)
    elif callable(content):  # a writer that streams the file itself (the embedding store)
        content(tmp)
    else:
        tmp.write_bytes(content)
    os.replace(tmp, path)


class BundleWriter:
    """Collects files and stages, then writes ``manifest.json`` with every file's sha256.

    Nothing appears at ``out_dir`` until ``finish``; an existing bundle there is only
    replaced with ``overwrite=True``.
    """

    def __init__(
        self, out_dir: str | Path, *, overwrite: bool = False, external_data_bytes: int = EXTERNAL_DATA_BYTES
    ) -> None:
        self.out_dir = Path(out_dir)
        self.external_data_bytes = external_data_bytes
        if self.out_dir.exists() and not overwrite:
            raise ExportError(f"'{self.out_dir}' already exists; pass --overwrite to replace it")
        self.overwrite = overwrite
        self.out_dir.parent.mkdir(parents=True, exist_ok=True)
        self._stage_dir = Path(tempfile.mkdtemp(prefix=".ugsep-", dir=self.out_dir.parent))
        self.stages: dict[str, Stage] = {}

    def add(self, rel: str, content: FileContent) -> Path:
        path = self._stage_dir / rel
        write_file(path, content, external_data_bytes=self.external_data_bytes)
        return path

    def add_stage(self, stage: str, rel: str, model: onnx.ModelProto, **meta: Any) -> Path:
        """Write a stage's graph; ``meta`` adds keys to its manifest entry (e.g. max_rows).
        Returns the path written (staged until ``finish``)."""
        path = self.add(rel, model)
        self.stages[stage] = Stage(
            file=rel,
            inputs=[i.name for i in model.graph.input],
            outputs=[o.name for o in model.graph.output],
            **meta,
        )
        return path

    def finish(self, *, model_name: str, spec: FeatureSpec, **fields: Any) -> Manifest:
        """Write ``manifest.json`` and move the bundle into place. ``fields`` are the other
        Manifest fields: typed sections (runtime.manifest), checked as the runtime reads them."""
        manifest = Manifest(
            model_name=model_name,
            spec=spec,
            stages=self.stages,
            files=hash_files(self._stage_dir),
            toolchain_version=toolchain_version(),
            created=_dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
            **fields,
        ).checked(f"{self.out_dir / MANIFEST_NAME} (as written)")
        (self._stage_dir / MANIFEST_NAME).write_text(manifest.dumps())
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        os.replace(self._stage_dir, self.out_dir)
        return manifest

    def abort(self) -> None:
        shutil.rmtree(self._stage_dir, ignore_errors=True)


def hash_files(root: Path) -> dict[str, FileEntry]:
    """{relative path: its sha256 and bytes} for every file under ``root`` but the manifest."""
    return {str(p.relative_to(root)): file_entry(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME}


def file_entry(path: Path) -> FileEntry:
    return FileEntry(sha256=sha256_file(path), bytes=path.stat().st_size)


def update_bundle(bundle_dir: str | Path, files: dict[str, FileContent], **fields: Any) -> Manifest:
    """Add or replace files in an existing bundle and update manifest fields (typed sections,
    or their JSON, checked as the runtime reads them); re-hashes the files."""
    root = Path(bundle_dir)
    manifest = Manifest.read(root)
    for rel, content in files.items():
        write_file(root / rel, content)
        manifest.files[rel] = file_entry(root / rel)
    for key, value in fields.items():
        if not hasattr(manifest, key):
            raise ExportError(f"manifest has no field '{key}'")
        setattr(manifest, key, value)
    manifest = manifest.checked(f"{root / MANIFEST_NAME} (as updated)")
    tmp = root / (MANIFEST_NAME + ".tmp")
    tmp.write_text(manifest.dumps())
    os.replace(tmp, root / MANIFEST_NAME)
    _drop_stale_signature(root)
    return manifest


def _drop_stale_signature(root: Path) -> None:
    """A signature of the old manifest vouches for nothing now: remove it, and say so."""
    sig = root / SIGNATURE_NAME
    if sig.is_file():
        sig.unlink()
        log.warning("bundle '%s' changed, so its signature %s was removed: re-sign it with "
                    "`ugsep sign %s --key KEY`", root, SIGNATURE_NAME, root)


# ---- pipeline step (exporter.pipeline) ----------------------------------------------------


@dataclass
class WriteOptions(StepOptions):
    """Step ``write``: how the bundle's files are laid out."""

    external_data_bytes: int = arg("--external-data-bytes", type=int, default=EXTERNAL_DATA_BYTES,
                                   metavar="BYTES",
                                   help="ONNX graphs larger than BYTES keep their weights in a .data "
                                   "file beside the graph (default 1 GiB; ONNX protobufs stop at 2 GiB)")


def step_write(ctx: ExportContext) -> None:
    """Pipeline step ``write``: the bundle directory, ONNX files, manifest.json with every sha256."""
    from exporter.steps.graph_record import reconcile

    writer = BundleWriter(ctx.out_dir, overwrite=ctx.options.overwrite,
                          external_data_bytes=ctx.options.write.external_data_bytes)
    try:
        paths = {s: writer.add_stage(s, f"{s}.onnx", m) for s, m in ctx.stages.items()}
        # the manifest describes the files as written (layers, boundary, threads), not the plan
        written = {s: onnx.load(str(p), load_external_data=False) for s, p in paths.items()}
        reconcile(ctx.manifest_fields, ctx.stage_meta, written)
        for stage, meta in ctx.stage_meta.items():
            for key, value in meta.items() if stage in writer.stages else ():
                setattr(writer.stages[stage], key, value)
        for rel, content in ctx.extra_files.items():
            writer.add(rel, content)
        fields = {
            "precision": ctx.options.precision,
            "source": Source.from_dict(ctx.loaded.source, "the loaded model"),
            "limits": Limits.default(max_candidates=ctx.options.max_candidates),
            **ctx.manifest_fields,
        }
        writer.finish(model_name=ctx.spec.name, spec=ctx.spec, **fields)
    except BaseException:
        writer.abort()
        raise
