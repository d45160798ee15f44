"""A WhatsApp sender that asks tiergate before each business-initiated message.

For each recipient it calls Admit; when the message is admitted it sends it (simulated here), and
when the send fails it calls Release so the recipient does not use up a slot of the limit. When
Admit answers DENIED with a retry_after (LIMIT_REACHED, HEADROOM_RESERVED), it waits that long and
asks again, up to --max-wait; other denials are final.

The stubs are generated from proto/tiergate/v1/limiter.proto (see README.md). Recipients are never
printed in full: only their last four digits.
"""

import argparse
import os
import sys
import time

import grpc

from tiergate.v1 import limiter_pb2 as pb
from tiergate.v1 import limiter_pb2_grpc as rpc


def masked(recipient):
    """A recipient as it may appear in logs: its last four digits."""
    return "…" + recipient[-4:]


def send(recipient, failing):
    """Sends the message through the WhatsApp Cloud API; simulated: fails for `failing` ones."""
    return recipient not in failing


def admit(stub, metadata, args, recipient):
    """Admit, waiting out retry_after while the total wait stays within --max-wait.

    Returns the last answer: ADMITTED, or DENIED for good.
    """
    waited = 0.0
    while True:
        request = pb.AdmitRequest(
            portfolio_id=args.portfolio,
            sender_id=args.sender,
            recipient=recipient,
            category=pb.UTILITY,
            template=args.template,
        )
        answer = stub.Admit(request, metadata=metadata, timeout=5)
        if answer.decision == pb.ADMITTED or not answer.HasField("retry_after"):
            return answer
        delay = answer.retry_after.ToTimedelta().total_seconds()
        if waited + delay > args.max_wait:
            return answer
        print(f"{masked(recipient)} denied ({pb.Reason.Name(answer.reason)}), retrying in {delay:.1f}s", flush=True)
        time.sleep(delay)
        waited += delay


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipients", nargs="+", help="phone numbers (E.164) to message")
    # host:port, as every gRPC client but tonic takes it (no http://).
    parser.add_argument("--target", default=os.environ.get("TIERGATE_ADDR", "127.0.0.1:50051"))
    parser.add_argument("--portfolio", required=True)
    parser.add_argument("--sender", required=True, help="the sending phone number id")
    parser.add_argument("--template", default="", help="the template the message uses")
    parser.add_argument("--fail", default="", help="comma-separated recipients whose send fails (simulation)")
    parser.add_argument("--max-wait", type=float, default=60.0, help="seconds to wait for a slot, per recipient")
    args = parser.parse_args()

    token = os.environ.get("TIERGATE_SENDER_TOKEN")
    metadata = [("authorization", f"Bearer {token}")] if token else []
    failing = set(filter(None, args.fail.split(",")))
    counts = {"sent": 0, "failed": 0, "denied": 0}
    with grpc.insecure_channel(args.target) as channel:
        stub = rpc.LimiterStub(channel)
        for recipient in args.recipients:
            answer = admit(stub, metadata, args, recipient)
            reason = pb.Reason.Name(answer.reason)
            if answer.decision != pb.ADMITTED:
                counts["denied"] += 1
                print(f"{masked(recipient)} denied ({reason})", flush=True)
            elif send(recipient, failing):
                counts["sent"] += 1
                print(f"{masked(recipient)} admitted ({reason}), sent", flush=True)
            else:
                counts["failed"] += 1
                # Only a counted recipient carries a lease; giving it back frees the slot.
                released = answer.lease and stub.Release(
                    pb.ReleaseRequest(lease=answer.lease), metadata=metadata, timeout=5
                ).released
                outcome = "slot released" if released else "nothing to release"
                print(f"{masked(recipient)} admitted ({reason}), send failed, {outcome}", flush=True)
    print(f"sent {counts['sent']}, failed {counts['failed']}, denied {counts['denied']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
