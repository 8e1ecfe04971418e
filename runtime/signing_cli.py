"""CLI pieces for bundle authenticity: ``ugsep keygen``, ``ugsep sign`` and the shared
``--verify KEY`` / ``--allow-extra-files`` flags of serve, check, triton and inspect.

    ugsep keygen --out keys/release            # keys/release (private PEM) + keys/release.pub
    ugsep keygen --hmac --out keys/shared      # a 256-bit shared secret (use as hmac:keys/shared)
    ugsep sign BUNDLE --key keys/release       # writes BUNDLE/manifest.sig
    ugsep serve BUNDLE --verify keys/release.pub

Nothing here imports ``cryptography`` until a key is used (``ugsep --help`` stays light).
"""

from __future__ import annotations

import argparse

KEY_HELP = ("a PEM Ed25519 key file (from `ugsep keygen`), or hmac:FILE for a shared "
            "HMAC-SHA256 secret")


def add_verify_arguments(p: argparse.ArgumentParser) -> None:
    """``--verify KEY`` and ``--allow-extra-files`` (runtime.load's ``verify`` and
    ``allow_extra_files``)."""
    p.add_argument("--verify", metavar="KEY", default=None,
                   help="refuse a bundle that is not signed by this key, or whose manifest was "
                   f"altered after signing: {KEY_HELP} (an Ed25519 public key is enough)")
    p.add_argument("--allow-extra-files", action="store_true",
                   help="ignore files in the bundle that its manifest does not list (with a "
                   "warning) instead of refusing the bundle")


def add_keygen_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", "-o", required=True, metavar="FILE",
                   help="Ed25519: FILE gets the private key (PEM, mode 600), FILE.pub the public "
                   "key; --hmac: FILE gets the secret")
    p.add_argument("--hmac", action="store_true",
                   help="make a shared HMAC-SHA256 secret instead of an Ed25519 key pair")
    p.add_argument("--overwrite", action="store_true")


def run_keygen(args: argparse.Namespace) -> int:
    from runtime.signing import ED25519, HMAC_PREFIX, HMAC_SHA256, generate_key

    paths = generate_key(args.out, algorithm=HMAC_SHA256 if args.hmac else ED25519,
                         overwrite=args.overwrite)
    if args.hmac:
        print(f"wrote HMAC-SHA256 secret {paths[0]}: sign and verify with --key/--verify "
              f"{HMAC_PREFIX}{paths[0]}; keep it secret")
    else:
        print(f"wrote Ed25519 private key {paths[0]} (sign: ugsep export --sign / ugsep sign "
              f"--key) and public key {paths[1]} (verify: --verify)")
    return 0


def add_sign_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="bundle directory (sign before packing a .tar)")
    p.add_argument("--key", required=True, metavar="KEY", help=f"the signing key: {KEY_HELP}")


def run_sign(args: argparse.Namespace) -> int:
    from runtime.signing import load_key, sign_bundle

    key = load_key(args.key)
    path = sign_bundle(args.bundle, key)
    print(f"signed {args.bundle} with {key.algorithm} key {key.key_id}: {path}")
    return 0
