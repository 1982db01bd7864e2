#!/usr/bin/env python3
"""The Swift tests' services, run on the host (outside the Swift root): one real tally-server
(its embedded PostgreSQL in a throwaway data dir, as the Kotlin suite's TestServer starts it), a
fake Google Play on loopback (the OAuth2 token endpoint checking the service account's RS256
assertion, and the Play Developer API's subscriptionsv2.get, products.get, :acknowledge and
:consume, answering only access tokens it issued; the keys are the server's Google fixtures),
and a control endpoint for the tests: identity tokens of the test identity provider (HS256),
store purchases to put in the fake, and what the fake acknowledged and consumed.

    testkit.py --server-bin PATH -- COMMAND...

runs COMMAND with TALLY_SWIFT_SERVER_URL (the server), TALLY_SWIFT_SERVER_KEYS (its
GET /v1/keys) and TALLY_SWIFT_KIT_URL (the control endpoint) set, then stops everything and
exits with COMMAND's status. Control endpoint (JSON bodies and answers):

    GET  /id-token?sub=S[&secret=X]        an HS256 identity token of S (signed with X if given)
    PUT  /play/subscriptions/TOKEN         {"product","state","expiry_ms","account","order"}
    PUT  /play/products/PRODUCT/TOKEN      {"state" (0 purchased, 1 canceled, 2 pending),"account","order"}
    GET  /play/acknowledged, /play/consumed   ["product:token", ...] in order
"""
import argparse
import base64
import hashlib
import hmac
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent.parent
FIXTURES = ROOT / "server/tests/fixtures/google"
CATALOG = HERE / "catalog.json"
JWT_SECRET = "swift-test-identity-secret"
PACKAGE = "com.example.tally"
SA_EMAIL = "tally-verifier@example-project.iam.gserviceaccount.com"
SCOPE = "https://www.googleapis.com/auth/androidpublisher"


def b64url(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def id_token(sub, secret=JWT_SECRET):
    """An HS256 identity token of `sub`, valid for an hour."""
    now = int(time.time())
    header = b64url(b'{"alg":"HS256","typ":"JWT"}')
    claims = b64url(json.dumps({"sub": sub, "iat": now, "exp": now + 3600, "email": f"{sub}@example.com",
                                "email_verified": True}, separators=(",", ":")).encode())
    sig = hmac.new(secret.encode(), f"{header}.{claims}".encode(), hashlib.sha256).digest()
    return f"{header}.{claims}.{b64url(sig)}"


def rfc3339(ms):
    return datetime.fromtimestamp(ms / 1000, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


class Play:
    """The fake Google's state: resources by token, the access tokens it issued, and what was
    acknowledged and consumed."""

    def __init__(self):
        self.lock = threading.Lock()
        self.subscriptions = {}
        self.products = {}
        self.acknowledged = []
        self.consumed = []
        self.issued = set()
        self.base = ""

    def subscription(self, body):
        """A subscriptionsv2 resource of one line item bound to `account` (as Play answers it)."""
        resource = {
            "kind": "androidpublisher#subscriptionPurchaseV2", "regionCode": "US",
            "startTime": rfc3339(int(time.time() * 1000)), "subscriptionState": body["state"],
            "latestOrderId": body["order"], "acknowledgementState": "ACKNOWLEDGEMENT_STATE_PENDING",
            "lineItems": [{"productId": body["product"], "expiryTime": rfc3339(body["expiry_ms"]),
                           "autoRenewingPlan": {"autoRenewEnabled": body["state"] != "SUBSCRIPTION_STATE_CANCELED"},
                           "offerDetails": {"basePlanId": "monthly"}, "offerPhase": {"basePrice": {}}}],
        }
        if body.get("account"):
            resource["externalAccountIdentifiers"] = {"obfuscatedExternalAccountId": body["account"]}
        return resource

    def product(self, body):
        """A products resource bound to `account`."""
        resource = {
            "kind": "androidpublisher#productPurchase", "purchaseTimeMillis": str(int(time.time() * 1000)),
            "purchaseState": body["state"], "consumptionState": 0, "acknowledgementState": 0,
            "orderId": body["order"], "regionCode": "US", "quantity": 1,
        }
        if body.get("account"):
            resource["obfuscatedExternalAccountId"] = body["account"]
        return resource

    def valid_assertion(self, jwt):
        """The service account's RS256 assertion, checked with openssl against its public key."""
        parts = jwt.split(".")
        if len(parts) != 3:
            return False
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "data").write_bytes(f"{parts[0]}.{parts[1]}".encode())
            try:
                (Path(d) / "sig").write_bytes(b64url_decode(parts[2]))
            except ValueError:
                return False
            ok = subprocess.run(["openssl", "dgst", "-sha256", "-verify", str(FIXTURES / "test-service-account-pub.pem"),
                                 "-signature", str(Path(d) / "sig"), str(Path(d) / "data")],
                                capture_output=True).returncode == 0
        if not ok:
            return False
        try:
            claims = json.loads(b64url_decode(parts[1]))
        except ValueError:
            return False
        return (claims.get("iss") == SA_EMAIL and claims.get("aud") == f"{self.base}/token"
                and claims.get("scope") == SCOPE and int(claims.get("exp", 0)) > time.time())


class Handler(BaseHTTPRequestHandler):
    play = None

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = b"" if status == 204 else (body if isinstance(body, str) else json.dumps(body)).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))


def google_error(code, message):
    return {"error": {"code": code, "message": message, "status": "NOT_FOUND" if code == 404 else "UNAUTHENTICATED"}}


class GoogleHandler(Handler):
    """Google's OAuth2 token endpoint and the Play Developer API, at the network boundary."""

    def do_POST(self):
        play = self.play
        if self.path == "/token":
            form = dict(urllib.parse.parse_qsl(self.body().decode()))
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer" or not play.valid_assertion(form.get("assertion", "")):
                return self.answer(400, {"error": "invalid_grant", "error_description": "bad assertion"})
            with play.lock:
                token = f"ya29.fake-{len(play.issued) + 1}"
                play.issued.add(token)
            return self.answer(200, {"access_token": token, "expires_in": 3599, "token_type": "Bearer"})
        self.api("POST")

    def do_GET(self):
        self.api("GET")

    def api(self, method):
        play = self.play
        self.body()
        bearer = (self.headers.get("Authorization") or "").removeprefix("Bearer ")
        with play.lock:
            if bearer not in play.issued:
                return self.answer(401, google_error(401, "Request had invalid authentication credentials."))
        prefix = "/androidpublisher/v3/applications/"
        if not self.path.startswith(prefix):
            return self.answer(404, google_error(404, "no such method"))
        path = self.path[len(prefix):].split("?")[0].split("/")
        if path[0] != PACKAGE:
            return self.answer(404, google_error(404, "No application was found for the given package name."))
        rest = path[2:]
        not_found = google_error(404, "The purchase token was not found.")
        with play.lock:
            if method == "GET" and len(rest) == 3 and rest[0] == "subscriptionsv2":
                found = play.subscriptions.get(rest[2])
                return self.answer(200, found) if found else self.answer(404, not_found)
            if method == "GET" and len(rest) == 4 and rest[0] == "products":
                found = play.products.get(f"{rest[1]}:{rest[3]}")
                return self.answer(200, found) if found else self.answer(404, not_found)
            if method == "POST" and len(rest) == 4 and rest[0] == "subscriptions" and rest[3].endswith(":acknowledge"):
                token = rest[3].removesuffix(":acknowledge")
                found = play.subscriptions.get(token)
                if not found:
                    return self.answer(404, not_found)
                found["acknowledgementState"] = "ACKNOWLEDGEMENT_STATE_ACKNOWLEDGED"
                play.acknowledged.append(f"{rest[1]}:{token}")
                return self.answer(204, "")
            if method == "POST" and len(rest) == 4 and rest[0] == "products":
                token, _, action = rest[3].partition(":")
                key = f"{rest[1]}:{token}"
                found = play.products.get(key)
                if not found:
                    return self.answer(404, not_found)
                if action == "consume":
                    found["consumptionState"] = 1
                    play.consumed.append(key)
                else:
                    found["acknowledgementState"] = 1
                    play.acknowledged.append(key)
                return self.answer(204, "")
        return self.answer(404, google_error(404, "no such method"))


class KitHandler(Handler):
    """The tests' control endpoint (see the module's doc)."""

    def do_GET(self):
        url = urllib.parse.urlparse(self.path)
        query = dict(urllib.parse.parse_qsl(url.query))
        with self.play.lock:
            if url.path == "/id-token" and query.get("sub"):
                return self.answer(200, {"token": id_token(query["sub"], query.get("secret", JWT_SECRET))})
            if url.path == "/play/acknowledged":
                return self.answer(200, list(self.play.acknowledged))
            if url.path == "/play/consumed":
                return self.answer(200, list(self.play.consumed))
        self.answer(404, {"error": "no such control route"})

    def do_PUT(self):
        parts = self.path.strip("/").split("/")
        body = json.loads(self.body() or b"{}")
        with self.play.lock:
            if len(parts) == 3 and parts[:2] == ["play", "subscriptions"]:
                self.play.subscriptions[parts[2]] = self.play.subscription(body)
                return self.answer(204, "")
            if len(parts) == 4 and parts[:2] == ["play", "products"]:
                self.play.products[f"{parts[2]}:{parts[3]}"] = self.play.product(body)
                return self.answer(204, "")
        self.answer(404, {"error": "no such control route"})


def serve(handler, play):
    cls = type(handler.__name__, (handler,), {"play": play})
    server = ThreadingHTTPServer(("127.0.0.1", 0), cls)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url):
    with urllib.request.urlopen(url, timeout=5) as r:
        return r.read().decode()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--server-bin", required=True)
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command to run")

    play = Play()
    google, play.base = serve(GoogleHandler, play)
    kit, kit_url = serve(KitHandler, play)
    work = Path(tempfile.mkdtemp(prefix="tally-swift-kit-"))
    # The embedded PostgreSQL runs as the `postgres` user when we are root: let it in.
    work.chmod(0o755)
    key = (FIXTURES / "test-service-account-key.pem").read_text()
    (work / "service-account.json").write_text(json.dumps({
        "type": "service_account", "project_id": "example-project", "private_key_id": "test-sa-key-1",
        "private_key": key, "client_email": SA_EMAIL, "token_uri": f"{play.base}/token"}))
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if k != "TALLY_DATABASE_URL"}
    env.update({
        "TALLY_LISTEN": f"127.0.0.1:{port}", "TALLY_DATA_DIR": str(work / "data"), "TALLY_JWT_SECRET": JWT_SECRET,
        "TALLY_PLANS_FILE": str(CATALOG), "TALLY_GOOGLE_SERVICE_ACCOUNT_FILE": str(work / "service-account.json"),
        "TALLY_GOOGLE_PACKAGE_NAME": PACKAGE, "TALLY_GOOGLE_API_BASE": play.base,
    })
    log = open(work / "server.log", "wb")
    server = subprocess.Popen([args.server_bin, "serve"], env=env, stdout=log, stderr=subprocess.STDOUT)
    status = 1
    try:
        deadline = time.monotonic() + 120
        keys = None
        while time.monotonic() < deadline and server.poll() is None:
            try:
                get(f"{base}/healthz")
                keys = get(f"{base}/v1/keys")
                break
            except OSError:
                time.sleep(0.2)
        if keys is None:
            sys.stderr.write(f"testkit: tally-server did not come up:\n{(work / 'server.log').read_text()}\n")
            return 1
        print(f"testkit: tally-server at {base} (PostgreSQL in {work}), fake Google Play at {play.base}, control at {kit_url}",
              flush=True)
        run_env = dict(os.environ, TALLY_SWIFT_SERVER_URL=base, TALLY_SWIFT_SERVER_KEYS=keys, TALLY_SWIFT_KIT_URL=kit_url)
        status = subprocess.run(command, env=run_env).returncode
        if status != 0:
            sys.stderr.write(f"testkit: the command failed ({status}); the server's log ends with:\n")
            sys.stderr.write("\n".join((work / "server.log").read_text(errors="replace").splitlines()[-40:]) + "\n")
        return status
    finally:
        server.send_signal(signal.SIGTERM)  # the server stops its embedded PostgreSQL
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        google.shutdown()
        kit.shutdown()
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
