#!/usr/bin/env python3
"""A small Triage agent: claim -> think -> submit, against the HTTP API.

Standard library only. Run one per role, e.g.:

    TRIAGE_TOKEN=trg_... python3 examples/agent.py --url http://127.0.0.1:8080 --role classifier

The "thinking" is a stand-in for a model call: keyword rules for the
classifier, a template for the drafter, a length check for the escalator.

How it stays correct with many agents at once:
- every submission names its claim and sends If-Match: the revision the
  decision was made on; a 409 means the ticket moved on (another agent, an
  expired lease), so the agent drops it and claims again;
- every command carries an Idempotency-Key, reused only when retrying the
  same request after a network error, so a retry is never applied twice.
"""

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
import uuid

CATEGORIES = {
    "billing": ["charge", "refund", "invoice", "bill", "paid"],
    "outage": ["down", "outage", "unavailable", "not loading"],
    "account_access": ["password", "log in", "login", "locked", "2fa"],
    "bug": ["error", "crash", "broken", "bug"],
    "feature_request": ["feature", "would be nice", "please add"],
}


class Api:
    def __init__(self, url, token, timeout=10.0):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def call(self, method, path, body=None, key=None, revision=None, retries=3):
        """Returns (status, json). Network errors are retried with the same
        Idempotency-Key, so the server applies the command at most once."""
        data = None if body is None else json.dumps(body).encode()
        headers = {"Authorization": "Bearer " + self.token, "Accept": "application/json"}
        if data is not None:
            headers["Content-Type"] = "application/json"
        if key is not None:
            headers["Idempotency-Key"] = key
        if revision is not None:
            headers["If-Match"] = '"%d"' % revision
        for attempt in range(retries + 1):
            request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                    return response.status, (json.loads(raw) if raw else None)
            except urllib.error.HTTPError as error:
                raw = error.read()
                return error.code, (json.loads(raw) if raw else None)
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if attempt == retries:
                    raise
                time.sleep(0.2 * (attempt + 1))
        raise RuntimeError("unreachable")


def classify(ticket):
    text = (ticket["subject"] + " " + ticket["body"]).lower()
    for category, words in CATEGORIES.items():
        if any(word in text for word in words):
            return {"category": category, "priority": "high" if category == "outage" else "normal", "confidence": 0.8}
    return {"category": "other", "priority": "low", "confidence": 0.4}


def draft(ticket):
    category = (ticket.get("classification") or {}).get("category", "other").replace("_", " ")
    return "Hello,\n\nThank you for writing about \"%s\". We have looked into your %s question and " \
           "will follow up shortly.\n\nBest regards,\nSupport" % (ticket["subject"], category)


def work_once(api, role, log):
    """Claims one ticket and completes it. Returns 'done', 'lost' or 'idle'."""
    status, claim = api.call("POST", "/v1/work/claim", {"role": role}, key=str(uuid.uuid4()))
    if status == 204:
        return "idle"
    if status != 200:
        raise RuntimeError("claim failed: %s %s" % (status, claim))
    ticket = claim["ticket"]
    claim_id = claim["claim_id"]
    revision = claim["revision"]
    log("claimed %s (%s) at revision %d" % (ticket["id"], ticket["state"], revision))

    # Think. A real agent would call its model here, and send a heartbeat
    # (POST /v1/claims/{claim_id}/heartbeat) if that takes long. A heartbeat
    # is an event on the ticket: take the revision it answers as the one to
    # send in If-Match, or the submission is refused as stale.
    if role == "classifier":
        path, body = "classification", dict(classify(ticket), claim_id=claim_id)
    elif role == "drafter":
        path, body = "draft", {"claim_id": claim_id, "body": draft(ticket)}
    elif role == "escalator":
        if ticket.get("draft") and len(ticket["draft"]) >= 20:
            path, body = "resolution", {"claim_id": claim_id, "resolution": "sent the reviewed draft"}
        else:
            path, body = "escalation", {"claim_id": claim_id, "reason": "the draft is too short to send"}
    else:
        raise SystemExit("role %s has no work queue" % role)

    status, outcome = api.call("POST", "/v1/tickets/%s/%s" % (ticket["id"], path), body,
                               key=str(uuid.uuid4()), revision=revision)
    if status == 200:
        log("%s -> %s at revision %d" % (ticket["id"], outcome["ticket"]["state"], outcome["revision"]))
        return "done"
    if status == 409:
        # The ticket moved on since we decided: never re-apply, claim again.
        log("%s: %s (%s)" % (ticket["id"], outcome.get("code"), outcome.get("detail")))
        return "lost"
    if status == 422:
        # Our output failed validation: give the claim back with the reason.
        api.call("POST", "/v1/claims/%s/release" % claim_id, {"reason": outcome.get("detail", "invalid")},
                 key=str(uuid.uuid4()))
        return "lost"
    raise RuntimeError("submit failed: %s %s" % (status, outcome))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default=os.environ.get("TRIAGE_URL", "http://127.0.0.1:8080"))
    parser.add_argument("--token", default=os.environ.get("TRIAGE_TOKEN"))
    parser.add_argument("--role", required=True, choices=["classifier", "drafter", "escalator"])
    parser.add_argument("--max-tickets", type=int, default=0, help="stop after this many (0: never)")
    parser.add_argument("--idle-exit", type=float, default=0.0,
                        help="stop after this many seconds without work (0: never)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    if not args.token:
        parser.error("give --token or set TRIAGE_TOKEN")

    def log(message):
        if not args.quiet:
            print("[%s] %s" % (args.role, message), flush=True)

    api = Api(args.url, args.token)
    done = 0
    idle_since = None
    delay = 0.05
    while not args.max_tickets or done < args.max_tickets:
        result = work_once(api, args.role, log)
        if result == "idle":
            idle_since = idle_since or time.monotonic()
            if args.idle_exit and time.monotonic() - idle_since >= args.idle_exit:
                break
            time.sleep(delay)
            delay = min(delay * 2, 1.0)
            continue
        idle_since, delay = None, 0.05
        if result == "done":
            done += 1
    print("%s finished %d ticket(s)" % (args.role, done), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
