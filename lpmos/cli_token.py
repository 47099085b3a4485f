"""``lpmos token``: API tokens and the users they belong to."""

from __future__ import annotations

import argparse
import getpass
import json
import sys
import time

from lpmos.auth import Auth, Role
from lpmos.config import Config, Setting
from lpmos.models import ValidationError
from lpmos.runtime import open_store

HELP = "create, list and revoke API tokens and users"
DESCRIPTION = (
    "Manage API tokens. 'create' makes the user if needed (with the given role) and prints a "
    "new token once: etcd keeps only its SHA-256. 'list' shows token ids, users and roles; "
    "'revoke ID' deletes tokens by id prefix. 'passwd' sets a user's console password.")
SETTINGS: tuple[Setting, ...] = ()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("action", choices=["create", "list", "revoke", "passwd"],
                        help="create a token, list tokens, revoke a token, set a password")
    parser.add_argument("token_id", nargs="?", default=None,
                        help="for revoke: the token id (or a prefix of 6+ hex digits)")
    parser.add_argument("--user", default=None, help="user name (create, passwd)")
    parser.add_argument("--role", default=None,
                        choices=[r.label for r in Role],
                        help="role of a new user, or the new role of an existing one (create)")
    parser.add_argument("--label", default="", help="free text stored with the token (create)")
    parser.add_argument("--password", default=None,
                        help="console password for the user (create, passwd; prompted for "
                             "passwd when omitted; prefer the prompt)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")


def run(config: Config, args: argparse.Namespace) -> int:
    with open_store(config) as handle:
        auth = Auth(handle.store, handle.keys)
        try:
            return _run(auth, args)
        except ValidationError as exc:
            sys.stderr.write(f"lpmos token: {exc}\n")
            return 2


def _run(auth: Auth, args: argparse.Namespace) -> int:
    if args.action == "create":
        if not args.user:
            raise ValidationError("user", "--user is required")
        user = auth.get_user(args.user)
        if user is None or args.role:
            if not args.role and user is None:
                raise ValidationError("role", "--role is required for a new user")
            auth.put_user(args.user, args.role or user.role if user else args.role,
                          args.password)
        elif args.password:
            auth.put_user(args.user, user.role, args.password)
        token, record = auth.create_token(args.user, label=args.label)
        if args.json:
            print(json.dumps({"token": token, "id": record.id, "user": record.user}))
        else:
            print(token)
            sys.stderr.write(f"token {record.id} for {record.user} created; it is shown only "
                             "once\n")
        return 0
    if args.action == "list":
        users = {u.name: u for u in auth.users()}
        rows = []
        for t in sorted(auth.tokens(), key=lambda r: r.created_at):
            u = users.get(t.user)
            rows.append({"id": t.id, "user": t.user, "role": u.role if u else "?",
                         "created": time.strftime("%Y-%m-%d %H:%M:%S",
                                                  time.gmtime(t.created_at)),
                         "label": t.label})
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"{'ID':<12}  {'USER':<16}  {'ROLE':<9}  {'CREATED (UTC)':<19}  LABEL")
            for r in rows:
                print(f"{r['id']:<12}  {r['user']:<16}  {r['role']:<9}  {r['created']:<19}  "
                      f"{r['label']}")
        return 0
    if args.action == "revoke":
        if not args.token_id:
            raise ValidationError("id", "give the token id to revoke (see 'lpmos token list')")
        count = auth.revoke_token(args.token_id)
        if count == 0:
            sys.stderr.write(f"lpmos token: no token with id {args.token_id}\n")
            return 1
        print(f"revoked {count} token(s)")
        return 0
    if args.action == "passwd":
        if not args.user:
            raise ValidationError("user", "--user is required")
        user = auth.get_user(args.user)
        if user is None:
            raise ValidationError("user", f"no user named {args.user}")
        password = args.password or getpass.getpass(f"new password for {args.user}: ")
        if len(password) < 8:
            raise ValidationError("password", "at least 8 characters")
        auth.put_user(args.user, user.role, password)
        print(f"password of {args.user} set")
        return 0
    return 2
