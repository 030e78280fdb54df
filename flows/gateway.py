"""`make gateway`: the OpenAI-compatible gateway (serving/gateway/) on serving.gateway.host:port until Ctrl-C, in
front of the replicas `make serve` runs; `make token NAME=alice ROLE=user|admin` creates an API token and prints it
once (only its SHA-256 digest is stored).

    .venv/bin/python -m llmops gateway [--port 8080]
    .venv/bin/python -m llmops gateway --token NAME [--role user|admin]
"""
from __future__ import annotations

import argparse
import sys

from serving.gateway import GatewayDb, GatewayDbError, database_url, parse_lifetime
from serving.serve import with_serve_key
from workspace.config import ConfigError, add_cli_args, load_config
from workspace.processes import port_is_free
from workspace.tracking import configure


def usage_text(host: str, port: int, model: str = "champion") -> str:
    url = f"http://{host}:{port}"
    return f"""gateway at {url}   (chat page: {url}/   health: {url}/healthz   schema: {url}/openapi.json, admin)
  token:  make token NAME=alice ROLE=user      (admin tokens: ROLE=admin; export GATEWAY_TOKEN=<the printed token>)
  curl {url}/v1/chat/completions -H "Authorization: Bearer $GATEWAY_TOKEN" -H 'Content-Type: application/json' \\
    -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "회원 목록 화면을 생성해주세요. 필드: 이름, 이메일"}}]}}'
  python: import os; from openai import OpenAI; c = OpenAI(base_url="{url}/v1", api_key=os.environ["GATEWAY_TOKEN"])
          c.chat.completions.create(model="{model}", messages=[{{"role": "user", "content": "..."}}], stream=True)
  usage (admin): curl {url}/admin/usage.csv -H "Authorization: Bearer $GATEWAY_TOKEN"      stop: Ctrl-C"""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_cli_args(ap)
    ap.add_argument("--port", type=int, default=None)
    ap.add_argument("--token", metavar="NAME", help="create an API token for NAME, print it once, and exit")
    ap.add_argument("--role", default="user", choices=["user", "admin"])
    ap.add_argument("--expires", metavar="LIFETIME", default=None,
                    help="with --token: the token stops working after this long (30d, 12h, 45m); default: until revoked")
    ap.add_argument("--revoke", metavar="NAME", help="revoke NAME's token (its name can be given out again) and exit")
    args = ap.parse_args(argv)
    try:
        loaded = load_config(args.config, args.profile, args.overrides)
        if args.revoke is not None:
            db = GatewayDb(database_url(loaded))
            if not db.revoke_token(args.revoke):
                print(f"[error] no token named {args.revoke!r} (make token lists none; GET /admin/tokens lists them)",
                      file=sys.stderr)
                return 2
            print(f"[token] {args.revoke!r} revoked: a running gateway refuses it within 5 s (its auth cache); the name is free again")
            return 0
        if args.token is not None:
            db = GatewayDb(database_url(loaded))
            lifetime = parse_lifetime(args.expires) if args.expires else None
            token = db.create_token(args.token, args.role, lifetime)
            until = f", valid for {args.expires.strip()}" if lifetime else ""
            print(f"[token] {args.role} token for {args.token!r}{until} (shown once; only its digest is stored in "
                  f"{db._safe(db.url)}):\n{token}")
            return 0
        import uvicorn

        from serving.gateway.app import create_app

        loaded = with_serve_key(loaded, args.config, args.profile, args.overrides)  # the key make serve uses
        configure(loaded)
        gw = loaded.config.serving.gateway
        port = args.port or gw.port
        if not port_is_free(gw.host, port):
            print(f"[error] port {port} on {gw.host} is in use: stop what runs there or pass PORT=", file=sys.stderr)
            return 2
        app = create_app(loaded)
        db = app.state.gateway.db
        if db.revision_before != db.revision:  # migrations/: the schema brought up to this code's, rows kept
            print(f"[gateway] database {db._safe(db.url)}: schema {db.revision_before or 'new'} -> {db.revision}")
        print(usage_text(gw.host, port), flush=True)
        uvicorn.run(app, host=gw.host, port=port, log_level="warning", timeout_graceful_shutdown=10)
        return 0
    except (ConfigError, GatewayDbError) as exc:
        print(f"[error] {exc}", file=sys.stderr)
        return 2

