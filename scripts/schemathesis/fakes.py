"""The outside services of scripts/check-api, faked on 127.0.0.1 at the network boundary.

- Stripe's API (`TALLY_STRIPE_API_BASE`): Checkout and Billing Portal sessions, subscription
  cancellation.
- Google (`TALLY_GOOGLE_API_BASE`, the service account's `token_uri`,
  `TALLY_GOOGLE_PUSH_JWKS_URL`): the OAuth2 token endpoint, the Play Developer API (which knows
  no purchase token: every one is unknown, as a made-up token is), and the push JWKS.
- An SMTP sink (`TALLY_SMTP_URL`) that accepts every mail, and keeps each in MAIL_DIR when
  given (scripts/check-readme reads the codes of the README's password examples there).

Usage: fakes.py HTTP_PORT SMTP_PORT JWKS_FILE [MAIL_DIR]. Runs until killed.
"""

import itertools
import json
import os
import socketserver
import sys
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HTTP_PORT, SMTP_PORT, JWKS_FILE = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
MAIL_DIR = sys.argv[4] if len(sys.argv) > 4 else None
MAIL_NUMBERS = itertools.count(1)
with open(JWKS_FILE) as f:
    JWKS = f.read()


class Http(BaseHTTPRequestHandler):
    """Stripe and Google."""

    def log_message(self, *args):
        pass

    def answer(self, status, body):
        data = json.dumps(body).encode() if not isinstance(body, str) else body.encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def read_body(self):
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def do_GET(self):
        if self.path == "/jwks":
            return self.answer(200, JWKS)
        if self.path.startswith("/androidpublisher/"):
            return self.answer(404, {"error": {"code": 404, "message": "The purchase token was not found.", "status": "NOT_FOUND"}})
        self.answer(404, {"error": {"message": f"no such fake route {self.path}"}})

    def do_POST(self):
        self.read_body()
        if self.path == "/token":
            return self.answer(200, {"access_token": f"fake-{uuid.uuid4()}", "expires_in": 3600, "token_type": "Bearer"})
        if self.path == "/v1/checkout/sessions":
            sid = f"cs_test_{uuid.uuid4().hex}"
            return self.answer(200, {"id": sid, "object": "checkout.session", "url": f"https://checkout.example.com/{sid}"})
        if self.path == "/v1/billing_portal/sessions":
            sid = f"bps_{uuid.uuid4().hex}"
            return self.answer(200, {"id": sid, "object": "billing_portal.session", "url": f"https://billing.example.com/{sid}"})
        if self.path.startswith("/androidpublisher/"):
            return self.answer(404, {"error": {"code": 404, "message": "The purchase token was not found.", "status": "NOT_FOUND"}})
        self.answer(404, {"error": {"message": f"no such fake route {self.path}"}})

    def do_DELETE(self):
        if self.path.startswith("/v1/subscriptions/"):
            sub = self.path.rsplit("/", 1)[-1]
            return self.answer(200, {"id": sub, "object": "subscription", "status": "canceled"})
        self.answer(404, {"error": {"message": f"no such fake route {self.path}"}})


class Smtp(socketserver.StreamRequestHandler):
    """Just enough SMTP to accept a mail: EHLO, MAIL, RCPT, DATA, QUIT."""

    def reply(self, line):
        self.wfile.write((line + "\r\n").encode())

    def handle(self):
        self.reply("220 sink ESMTP")
        in_data = False
        mail = []
        for raw in self.rfile:
            line = raw.decode(errors="replace").rstrip("\r\n")
            if in_data:
                if line == ".":
                    in_data = False
                    if MAIL_DIR:
                        path = os.path.join(MAIL_DIR, f"{next(MAIL_NUMBERS):05}.eml")
                        with open(path + ".part", "w") as f:
                            f.write("\n".join(mail) + "\n")
                        os.replace(path + ".part", path)
                    mail = []
                    self.reply("250 kept")
                else:
                    mail.append(line[1:] if line.startswith("..") else line)
                continue
            verb = line[:4].upper()
            if verb == "EHLO":
                self.reply("250 sink")
            elif verb == "DATA":
                in_data = True
                self.reply("354 go on")
            elif verb == "QUIT":
                self.reply("221 bye")
                return
            else:
                self.reply("250 ok")


class SmtpServer(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


smtp = SmtpServer(("127.0.0.1", SMTP_PORT), Smtp)
threading.Thread(target=smtp.serve_forever, daemon=True).start()
ThreadingHTTPServer(("127.0.0.1", HTTP_PORT), Http).serve_forever()
