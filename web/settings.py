"""The control plane's settings (``web.*``): the one table of their flags,
types and defaults.  ``lpmos control-plane`` (:mod:`web.cli`) offers them as
flags; :func:`web.app.create_app` falls back on :data:`DEFAULTS` for any the
config it is given does not hold."""

from __future__ import annotations

from typing import Any

from lpmos.config import (
    Setting,
    float_range,
    int_range,
    parse_bool,
    parse_hostport,
    parse_optional_path,
    parse_optional_url,
    parse_str,
    parsed_defaults,
    str_list,
)
from web.ldap import filter_template, parse_dn_list, parse_ldap_url, parse_optional_dn

SETTINGS: tuple[Setting, ...] = (
    Setting("web.listen", "--listen", "127.0.0.1:8080", parse_hostport,
            "HOST:PORT the console and API listen on", metavar="HOST:PORT"),
    Setting("web.threads", "--threads", 128, int_range(8, 2048),
            "worker threads; each open live console (WebSocket) holds one", metavar="N"),
    Setting("web.secret_key_file", "--secret-key-file", None, parse_optional_path,
            "file holding the session-signing key (created with mode 0600 when missing; "
            "default: STATE_DIR/web-secret.key). Replicas behind one load balancer must share it",
            metavar="FILE"),
    Setting("web.four_eyes", "--four-eyes", False, parse_bool,
            "four-eyes rule: the creator of a task may not approve it", metavar="BOOL"),
    Setting("web.debug", "--debug", False, parse_bool,
            "serve with Flask's development server and debug logging (never in production)",
            metavar="BOOL"),
    Setting("web.allowed_origins", "--allowed-origins", [], str_list,
            "extra Origins (scheme://host[:port]) allowed to open the WebSocket and send "
            "session requests; the console's own origin is always allowed", metavar="LIST"),
    Setting("web.max_body", "--max-body", 1024 * 1024, int_range(1024, 64 * 1024 * 1024),
            "largest request body in bytes (refused with 413 before it is read)",
            metavar="BYTES"),
    Setting("web.batch_max", "--batch-max", 100, int_range(1, 120),
            "most tasks in one batch import (one etcd transaction; etcd's default "
            "--max-txn-ops is 128)", metavar="N"),
    Setting("web.login_rate", "--login-rate", 10.0, float_range(0.1, 10000),
            "login attempts allowed per minute per client address and per user name",
            metavar="PER_MIN"),
    Setting("web.mutate_rate", "--mutate-rate", 300.0, float_range(1, 100000),
            "mutating API calls allowed per minute per user (burst of a quarter of it)",
            metavar="PER_MIN"),
    Setting("web.ws_max_clients", "--ws-max-clients", 100, int_range(1, 2000),
            "most WebSocket clients at once; more are refused with 503", metavar="N"),
    Setting("web.ws_queue", "--ws-queue", 512, int_range(8, 100000),
            "messages queued per WebSocket client; a client that falls further behind is "
            "dropped (it reconnects and resyncs)", metavar="N"),
    Setting("web.ws_ping_interval", "--ws-ping-interval", 20.0, float_range(1, 600),
            "seconds between WebSocket pings; no pong by the next ping closes the socket",
            metavar="SECONDS"),
    Setting("web.session_hours", "--session-hours", 12.0, float_range(0.05, 24 * 30),
            "console session lifetime in hours", metavar="HOURS"),
    Setting("web.secure_cookies", "--secure-cookies", False, parse_bool,
            "mark the session cookie Secure (set when serving behind HTTPS)", metavar="BOOL"),
    Setting("web.header_timeout", "--header-timeout", 5.0, float_range(0.5, 300),
            "seconds a client has to send a request's complete headers, from connecting (or "
            "from the first byte of a kept-alive connection's next request); slower clients "
            "get 408 and are closed, counted as lpmos_web_refused_total{reason=\"header_timeout\"}",
            metavar="SECONDS"),
    Setting("web.body_timeout", "--body-timeout", 30.0, float_range(0.5, 3600),
            "seconds a client has to send a request's whole body once its headers are in; "
            "slower clients get 408 and are closed, counted as "
            "lpmos_web_refused_total{reason=\"body_timeout\"}", metavar="SECONDS"),
    Setting("web.node_timeout", "--node-timeout", 3.0, float_range(0.2, 60),
            "seconds the control plane waits for a regional node's answer (a task's full "
            "install log) before it answers 504", metavar="SECONDS"),
    Setting("web.webhook_timeout", "--webhook-timeout", 5.0, float_range(0.1, 120),
            "seconds one webhook delivery attempt may take, connecting to the last byte of "
            "the answer", metavar="SECONDS"),
    Setting("web.webhook_deadline", "--webhook-deadline", 600.0, float_range(1, 86400),
            "seconds from a change to its last delivery retry; then it is dropped and "
            "counted as lpmos_webhook_dropped_total{reason=\"deadline\"}", metavar="SECONDS"),
    Setting("web.webhook_queue", "--webhook-queue", 1000, int_range(1, 100000),
            "deliveries waiting, new and retrying; more are dropped and counted "
            "(lpmos_webhook_dropped_total{reason=\"queue_full\"})", metavar="N"),
    Setting("web.webhook_log", "--webhook-log", 50, int_range(1, 10000),
            "delivery attempts kept per webhook for the API and the console (in memory, per "
            "control plane process)", metavar="N"),
    Setting("web.webhook_workers", "--webhook-workers", 2, int_range(1, 64),
            "threads delivering webhooks", metavar="N"),
    Setting("web.webhook_backoff", "--webhook-backoff", 1.0, float_range(0.01, 3600),
            "first retry delay in seconds; it doubles per attempt, jittered", metavar="SECONDS"),
    Setting("web.webhook_backoff_max", "--webhook-backoff-max", 60.0, float_range(0.01, 3600),
            "longest retry delay in seconds", metavar="SECONDS"),
    # -- LDAP sign-in (web/ldap.py, docs/ldap.md); off while web.ldap_url is empty
    Setting("web.ldap_url", "--ldap-url", "", parse_ldap_url,
            "LDAP directory for console sign-in and API tokens of directory users: "
            "ldap://HOST[:PORT] (StartTLS) or ldaps://HOST[:PORT]; empty: local users only. "
            "Local users are checked first", metavar="URL"),
    Setting("web.ldap_start_tls", "--ldap-start-tls", True, parse_bool,
            "StartTLS on ldap:// connections before any bind or search", metavar="BOOL"),
    Setting("web.ldap_insecure_plaintext", "--ldap-insecure-plaintext", False, parse_bool,
            "allow ldap:// without StartTLS: passwords cross the network in clear text "
            "(a lab on loopback only, never in production)", metavar="BOOL"),
    Setting("web.ldap_ca_file", "--ldap-ca-file", None, parse_optional_path,
            "CA certificates (PEM) that verify the directory's certificate (default: the "
            "system's CAs); the certificate is always verified and must name the host",
            metavar="FILE"),
    Setting("web.ldap_bind_dn", "--ldap-bind-dn", "", parse_optional_dn,
            "service account DN that searches the directory (empty: anonymous searches)",
            metavar="DN"),
    Setting("web.ldap_bind_password_file", "--ldap-bind-password-file", None,
            parse_optional_path,
            "file holding the service account's password (read once at start; there is no "
            "password flag)", metavar="FILE"),
    Setting("web.ldap_user_base", "--ldap-user-base", "", parse_optional_dn,
            "DN of the subtree searched for the signing-in user", metavar="DN"),
    Setting("web.ldap_user_filter", "--ldap-user-filter", "(uid={user})",
            filter_template("user", required=("user",)),
            "filter that finds the user; {user} is the login name, escaped (RFC 4515). "
            "Active Directory: (&(objectClass=user)(sAMAccountName={user}))",
            metavar="FILTER"),
    Setting("web.ldap_group_base", "--ldap-group-base", "", parse_optional_dn,
            "DN of the subtree searched for the user's groups (empty: no group search; "
            "then web.ldap_member_of_attribute)", metavar="DN"),
    Setting("web.ldap_group_filter", "--ldap-group-filter", "(member={dn})",
            filter_template("dn", "user", required=("dn", "user")),
            "filter that finds the user's groups; {dn} is the user's DN and {user} the login "
            "name, both escaped: (member={dn}), (uniqueMember={dn}), (memberUid={user})",
            metavar="FILTER"),
    Setting("web.ldap_member_of_attribute", "--ldap-member-of-attribute", "", parse_str,
            "attribute of the user's entry that lists their groups (Active Directory and "
            "the OpenLDAP memberof overlay: memberOf); empty: not read", metavar="ATTR"),
    Setting("web.ldap_viewer_groups", "--ldap-viewer-groups", [], parse_dn_list,
            "group DNs whose members get the viewer role, separated by ';'", metavar="DNS"),
    Setting("web.ldap_operator_groups", "--ldap-operator-groups", [], parse_dn_list,
            "group DNs whose members get the operator role", metavar="DNS"),
    Setting("web.ldap_approver_groups", "--ldap-approver-groups", [], parse_dn_list,
            "group DNs whose members get the approver role", metavar="DNS"),
    Setting("web.ldap_admin_groups", "--ldap-admin-groups", [], parse_dn_list,
            "group DNs whose members get the admin role; a user in several mapped groups "
            "gets the highest role, a user in none is refused", metavar="DNS"),
    Setting("web.ldap_timeout", "--ldap-timeout", 5.0, float_range(1, 60),
            "seconds each directory call (connect, StartTLS, bind, search) may take; a "
            "directory that does not answer makes sign-in fail with 503, not hang",
            metavar="SECONDS"),
    Setting("web.ldap_recheck", "--ldap-recheck", 300.0, float_range(1, 86400),
            "seconds a directory user's role is trusted before the directory is asked again "
            "(on their next request, session or API token); removed users lose access then",
            metavar="SECONDS"),
    Setting("web.ldap_offline_grace", "--ldap-offline-grace", 3600.0, float_range(0, 7 * 86400),
            "while the directory cannot be reached, seconds past the re-check deadline that "
            "a directory user keeps their last role for reads; changes are refused (503) "
            "until the directory answers", metavar="SECONDS"),
    Setting("web.image_store", "--image-store", None, parse_optional_path,
            "directory holding the images operators upload (default: STATE_DIR/images); "
            "regional nodes fetch them from here, so it needs room for every uploaded image",
            metavar="DIR"),
    Setting("web.public_url", "--public-url", None, parse_optional_url,
            "the URL regional nodes reach this control plane at (scheme://host[:port]), "
            "written into uploaded images' records; default: the URL the upload came to",
            metavar="URL"),
)

#: Each setting's default as a resolved config holds it (parsed: ``web.listen``
#: is a (host, port) pair).
DEFAULTS: dict[str, Any] = parsed_defaults(SETTINGS)
