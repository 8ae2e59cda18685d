"""`ems activate`: verify an activation credential and write it to the cluster's activation
znode, where every daemon with --manage-public-key reads it.

Exit status: 0 when written; 2 when the credential or an argument is rejected (nothing is
written); 1 when ZooKeeper fails.
"""
from __future__ import annotations

import argparse
import os
import sys

from kazoo.exceptions import KazooException

from ems.errors import MembershipError
from ems.manage import zkstate
from ems.manage.activation import format_time
from ems.manage.tokens import TokenError, load_public_key, verify_credential, verify_standing


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ems activate", description="Activate a cluster: verify "
                                "a credential from the management service and write it to "
                                "ZooKeeper, where the cluster's daemons read it.")
    p.add_argument("--credential", required=True,
                   help="file holding the credential token")
    p.add_argument("--zookeeper", default=os.environ.get("EMS_ZOOKEEPER"),
                   help="ZooKeeper hosts, e.g. 127.0.0.1:2181 (default: EMS_ZOOKEEPER)")
    p.add_argument("--cluster", default=os.environ.get("EMS_CLUSTER"),
                   help="cluster name, as given to `ems serve --cluster` (default: "
                        "EMS_CLUSTER)")
    p.add_argument("--public-key", default=os.environ.get("EMS_MANAGE_PUBLIC_KEY"),
                   help="PEM file of the management service's public key (default: "
                        "EMS_MANAGE_PUBLIC_KEY)")
    return p


def _fail(code: int, message: str) -> int:
    print(f"ems activate: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for option, value in (("--zookeeper", args.zookeeper), ("--cluster", args.cluster),
                          ("--public-key", args.public_key)):
        if not value:
            return _fail(2, f"{option} is missing (or set its environment variable)")

    # Step 1: verify everything that needs no ZooKeeper.
    try:
        zkstate.activation_path(args.cluster)
        zkstate.check_hosts(args.zookeeper)
        public_key = load_public_key(args.public_key)
        with open(args.credential, encoding="ascii", errors="replace") as f:
            token = f.read().strip()
    except (OSError, ValueError) as exc:
        return _fail(2, str(exc))
    try:
        credential = verify_credential(public_key, token, cluster=args.cluster)
    except TokenError as exc:
        return _fail(2, f"credential in {args.credential} rejected, nothing written: {exc}")

    # Step 2: refuse a credential that the cluster's standing notice revokes, then write.
    path = zkstate.activation_path(args.cluster)
    try:
        client = zkstate.connect(args.zookeeper)
    except MembershipError as exc:
        return _fail(1, str(exc))
    try:
        notice_token = zkstate.read(client, zkstate.standing_path(args.cluster))
        notice = None
        if notice_token:
            try:
                notice = verify_standing(public_key, notice_token, cluster=args.cluster)
            except TokenError:
                notice = None   # daemons ignore it too
        if notice is not None and notice.account == credential.account and \
                credential.id in notice.revoked:
            return _fail(2, f"credential {credential.id} is revoked by the cluster's standing "
                            f"notice; nothing written")
        zkstate.write(client, path, token)
    except KazooException as exc:
        return _fail(1, f"ZooKeeper at {args.zookeeper} failed: {exc!r}; the credential may "
                        f"not be written")
    finally:
        client.stop()
        client.close()

    print(f"activated cluster {credential.cluster}: credential {credential.id} of account "
          f"{credential.account}, expires {format_time(credential.expires)}; written to "
          f"{path} at {args.zookeeper}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
